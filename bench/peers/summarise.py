#!/usr/bin/env python3
"""Summarise bench/peers/run.sh's JSON lines: per point, each peer's median
GFLOP/s over rounds (min-max in brackets) and mlart's speed-up over numpy and
llama.cpp (each round's ratio, then the median over rounds), the ratios issue #4 sets targets for (>= 16x numpy, >= 90x llama.cpp
on a machine with AMX). Standard library only."""
import json
import statistics
import sys
from collections import defaultdict


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = defaultdict(list)
    for r in rows:
        by[(r["peer"], r["h_q"], r["n"], r["batch"])].append(r)
    peers = sorted({r["peer"] for r in rows if r["peer"].startswith("mlart")})
    points = sorted({(r["h_q"], r["n"], r["batch"]) for r in rows}, key=lambda p: (-p[0], p[2], p[1]))
    rounds = max(r.get("round", 1) for r in rows)

    def med(peer, pt, key="gflops"):
        vals = [r[key] for r in by.get((peer, *pt), []) if r.get(key) is not None]
        return (statistics.median(vals), min(vals), max(vals)) if vals else None

    def ratio(peer, other, pt):
        # Round by round (the peers of one round saw the VM in about the
        # same state), then the median over rounds.
        mine = {r.get("round", 1): r["gflops"] for r in by.get((peer, *pt), [])}
        theirs = {r.get("round", 1): r["gflops"] for r in by.get((other, *pt), [])}
        rs = [mine[k] / theirs[k] for k in mine if k in theirs and theirs[k] > 0]
        return f"{statistics.median(rs):.1f}x" if rs else "-"

    def cell(m):
        return f"{m[0]:.1f} ({m[1]:.0f}-{m[2]:.0f})" if m else "-"

    print(f"Medians over {rounds} round(s) (min-max in brackets); GFLOP/s as mlart counts them, "
          f"2·N·h_q·(576+512) per sequence. Speed-ups: the median over rounds of each round's ratio.\n")
    head = ["h_q", "N", "batch"] + [f"{p} bf16" for p in peers] + ["numpy fp32", "llama.cpp f16"]
    for p in peers:
        head += [f"{p.split()[1]} / numpy", f"{p.split()[1]} / llama.cpp", f"{p.split()[1]} % ceiling"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for pt in points:
        cells = [str(x) for x in pt]
        cells += [cell(med(p, pt)) for p in peers]
        np_m, ll_m = med("numpy", pt), med("llama.cpp", pt)
        cells += [cell(np_m), cell(ll_m)]
        for p in peers:
            m = med(p, pt)
            frac = med(p, pt, "fraction_of_ceiling")
            cells.append(ratio(p, "numpy", pt))
            cells.append(ratio(p, "llama.cpp", pt))
            bound = by[(p, *pt)][0]["bound"] if m else ""
            cells.append(f"{100 * frac[0]:.0f}% {bound}" if frac else "-")
        print("| " + " | ".join(cells) + " |")
    ceil = [r["ceilings"] for r in rows if "ceilings" in r]
    if ceil:
        def span(key):
            v = [c[key] for c in ceil if c.get(key)]
            return f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" if v else "-"
        print(f"\nCeilings read by mlart bench in the same rounds (median, min-max): "
              f"FMA {span('fma_gflops')} GFLOP/s, AMX {span('amx_gflops')} GFLOP/s, "
              f"DRAM read {span('read_gbytes_per_s')} GB/s.")
    checks = {r["peer"]: r["check_rel_l2"] for r in rows if "check_rel_l2" in r}
    print("Peers' own check against float64 before timing (rel-L2): " +
          ", ".join(f"{k} {v:.1e}" for k, v in sorted(checks.items())) + ".")


if __name__ == "__main__":
    main(sys.argv[1])
