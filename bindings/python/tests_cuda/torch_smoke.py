"""PyTorch CUDA tensors through mlart's Python binding, zero-copy: run by
scripts/gpu-check.sh on a GPU machine that has torch (this one does not,
so it is not a unittest module). Exits non-zero on any mismatch.

A dense BF16 and a sparse FP8_V32 decode whose q, cache, tables, out and
lse are torch tensors on the GPU, enqueued on torch's current stream, must
match the CPU engine's decode of the same host bytes (the GPU suite's
tolerances); then a CUDA pool decodes torch queries into torch outputs and
must match its own host-memory decode byte for byte.
"""

import array
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mlart  # noqa: E402
import torch  # noqa: E402

D_QK, D_V, BS = 576, 512, 64


def bits(t):
    """A bf16 tensor's bits as array('H') (host memory)."""
    return array.array("H", [v & 0xFFFF for v in t.view(torch.int16).flatten().tolist()])


def rel_l2(got, want):
    num = sum((a - b) ** 2 for a, b in zip(got, want))
    den = sum(b * b for b in want)
    return math.sqrt(num / den) if den else math.sqrt(num)


def main():
    torch.manual_seed(0)
    gpu, cpu = mlart.Engine("cuda"), mlart.Engine("cpu")
    print("engine:", gpu.info().reason)
    stream = torch.cuda.current_stream()
    failures = 0
    for fmt, sparse in (("bf16", False), ("fp8_v32", True)):
        batch, h_q, lens = 2, 16, [700, 129]
        blocks = [(n + BS - 1) // BS for n in lens]
        rows = torch.randn(sum(blocks) * BS, D_QK) * 0.5
        kv_host = mlart.kv_quantize(fmt, D_QK, BS, array.array("f", rows.flatten().tolist()))
        table = torch.tensor(
            [list(range(blocks[0])),
             list(range(blocks[0], blocks[0] + blocks[1])) + [0] * (blocks[0] - blocks[1])],
            dtype=torch.int32,
        )
        q = (torch.randn(batch, 1, h_q, D_QK) * 0.5).to(torch.bfloat16)
        args = dict(batch=batch, h_q=h_q, d_qk=D_QK, d_v=D_V, num_blocks=sum(blocks), block_size=BS,
                    kv_format=fmt)
        if sparse:
            topk = 64
            idx = torch.stack([torch.randint(0, n, (1, topk), dtype=torch.int32) for n in lens])
            idx = idx + torch.tensor([0, blocks[0] * BS], dtype=torch.int32).view(2, 1, 1)
            host_keys = dict(indices=array.array("i", idx.flatten().tolist()), topk=topk)
        else:
            host_keys = dict(block_table=array.array("i", table.flatten().tolist()),
                             block_table_stride=blocks[0], seqlens=array.array("i", lens))
        want = cpu.decode_paged(q=bits(q),
                                kv=kv_host, out_dtype="f32", lse=True, **args, **host_keys)
        dev = lambda t: t.cuda()  # noqa: E731
        kv = dev(torch.frombuffer(bytearray(kv_host), dtype=torch.uint8))
        out = torch.empty(batch, 1, h_q, D_V, dtype=torch.float32, device="cuda")
        lse = torch.empty(batch, h_q, 1, dtype=torch.float32, device="cuda")
        if sparse:
            dev_keys = dict(indices=dev(idx), topk=topk)
        else:
            dev_keys = dict(block_table=dev(table), block_table_stride=blocks[0],
                            seqlens=dev(torch.tensor(lens, dtype=torch.int32)))
        gpu.decode_paged(q=dev(q).view(torch.int16), kv=kv, out=out, out_dtype="f32", lse=lse,
                         stream=stream, **args, **dev_keys)
        stream.synchronize()
        e = rel_l2(out.cpu().flatten().tolist(), list(want.out))
        el = max(abs(a - b) for a, b in zip(lse.cpu().flatten().tolist(), list(want.lse)))
        ok = e <= 1e-2 and el <= 2e-2 + 4e-3 * max(abs(x) for x in want.lse)
        failures += not ok
        print("%s %s decode_paged with torch tensors: rel L2 %.2e, lse max diff %.2e: %s"
              % (fmt, "sparse" if sparse else "dense", e, el, "ok" if ok else "FAILED"))

    with mlart.KvPool(gpu, d_qk=D_QK, num_blocks=8, block_size=BS) as pool:
        for sid, n in ((1, 150), (2, 9)):
            pool.create_seq(sid)
            pool.append(sid, 0, array.array("f", (torch.randn(n * D_QK) * 0.5).tolist()))
        qb = (torch.randn(2, 1, 16, D_QK) * 0.5).to(torch.bfloat16)
        want = pool.decode(seq_ids=[1, 2], h_q=16, d_v=D_V, q=bits(qb), out_dtype="f32", lse=True)
        out = torch.empty(2, 1, 16, D_V, dtype=torch.float32, device="cuda")
        lse = torch.empty(2, 16, 1, dtype=torch.float32, device="cuda")
        pool.decode(seq_ids=[1, 2], h_q=16, d_v=D_V, q=qb.cuda().view(torch.int16), out=out,
                    out_dtype="f32", lse=lse, stream=stream)
        stream.synchronize()
        ok = (out.cpu().flatten().tolist() == list(want.out)
              and lse.cpu().flatten().tolist() == list(want.lse))
        failures += not ok
        print("CUDA pool decode with torch q/out/lse: %s" % ("byte-identical: ok" if ok else "FAILED"))
    gpu.close()
    cpu.close()
    print("torch smoke: %d failed" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
