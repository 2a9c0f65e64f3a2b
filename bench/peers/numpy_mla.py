#!/usr/bin/env python3
"""MLA decode written the way a numpy user would: fp32 cache, OpenBLAS GEMMs.

One peer for `bench/peers/run.sh`. For each point h_q:N:batch it times
    S = Q K^T * scale;  P = exp(S - max S);  O = (P V) / sum P,  V = K[:, :512]
per sequence (s_q = 1), and prints one JSON line with the median time and
GFLOP/s counted as mlart counts them: 2 * keys * h_q * (576 + 512) per sequence.

Before timing, the same function is checked against a float64 evaluation on a
small random case; a mismatch exits non-zero, so a figure is never printed for
a wrong computation.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

D_QK, D_V = 576, 512


def decode(q, k, scale, s_buf):
    """q: [h, 576], k: [N, 576] fp32 -> [h, 512]; s_buf: [h, N] scratch."""
    np.matmul(q, k.T, out=s_buf)
    s_buf *= scale
    s_buf -= s_buf.max(axis=1, keepdims=True)
    np.exp(s_buf, out=s_buf)
    denom = s_buf.sum(axis=1, keepdims=True)
    out = s_buf @ k[:, :D_V]
    out /= denom
    return out


def check(rng):
    h, n = 16, 300
    q = rng.standard_normal((h, D_QK), dtype=np.float32)
    k = rng.standard_normal((n, D_QK), dtype=np.float32)
    scale = 1.0 / np.sqrt(192.0)
    got = decode(q, k, scale, np.empty((h, n), np.float32))
    s = (q.astype(np.float64) @ k.astype(np.float64).T) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    want = (p @ k[:, :D_V].astype(np.float64)) / p.sum(axis=1, keepdims=True)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    if not err < 1e-5:
        sys.exit(f"numpy_mla: check failed, rel-L2 {err:.3e}")
    return float(err)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", required=True, help="h_q:N:batch,...")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    rng = np.random.default_rng(20261201)
    err = check(rng)
    scale = 1.0 / np.sqrt(192.0)
    for spec in args.points.split(","):
        h, n, b = (int(x) for x in spec.split(":"))
        q = rng.standard_normal((b, h, D_QK), dtype=np.float32)
        k = rng.standard_normal((b, n, D_QK), dtype=np.float32)
        s_buf = np.empty((h, n), np.float32)

        def step():
            for i in range(b):
                decode(q[i], k[i], scale, s_buf)

        step()
        times = []
        t_end = time.perf_counter() + args.seconds
        while len(times) < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        flops = 2.0 * b * n * h * (D_QK + D_V)
        print(json.dumps({
            "peer": "numpy", "kv": "f32", "h_q": h, "s_q": 1, "n": n, "batch": b,
            "calls": len(times), "median_ms": med * 1e3, "gflops": flops / med / 1e9,
            "threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "numpy": np.__version__, "check_rel_l2": err,
        }), flush=True)


if __name__ == "__main__":
    main()
