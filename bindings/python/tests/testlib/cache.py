"""Builds a paged KV cache by hand (F32 or BF16 rows, or FP8 blocks from
the reference quantizer), with shuffled block ids, NaN in every slot no
sequence uses and invalid ids in block-table entries past each sequence's
length."""

import array
import math
import random
import struct
from types import SimpleNamespace

from . import reference as R

NAN_F32 = struct.pack("<I", 0x7FC00000)
NAN_BF16 = struct.pack("<H", 0x7FC0)


def build_cache(fmt, d_qk, block_size, block_bytes, seqs, seed):
    """fmt: 'f32', 'bf16', 'fp8_v32' (d_qk 576) or 'fp8_model1' (d_qk 512);
    block_bytes: from mlart.kv_block_bytes (the stride between blocks);
    seqs: flat float32 rows [len, d_qk] of each sequence.

    Returns a namespace: kv (bytearray), num_blocks, block_table
    (array('i') [batch, stride]), stride, seqlens (array('i')), keys
    (per sequence, the rows as the cache holds them, in float64), and pos(b,
    t), the cache position (block * block_size + slot) of token t of
    sequence b.
    """
    shuffle = random.Random(seed)
    lens = [len(s) // d_qk for s in seqs]
    need = [-(-n // block_size) for n in lens]
    stride = max([1] + need) + 2
    used = sum(need)
    num_blocks = used + 3
    ids = list(range(num_blocks))
    shuffle.shuffle(ids)

    # NaN everywhere first: slots past a length and unused blocks must not be
    # read. (0xff bytes are NaN in every FP8 field: e4m3 codes, f32 and
    # ue8m0 scales, bf16 rope.)
    if fmt == "f32":
        kv = bytearray(NAN_F32 * (num_blocks * block_bytes // 4))
    elif fmt == "bf16":
        kv = bytearray(NAN_BF16 * (num_blocks * block_bytes // 2))
    else:
        kv = bytearray(b"\xff" * (num_blocks * block_bytes))

    block_table = array.array("i", [0x7FFFFFFF] * (len(seqs) * stride))
    keys = []
    nxt = 0
    for b, seq in enumerate(seqs):
        for j in range(need[b]):
            block_table[b * stride + j] = ids[nxt]
            nxt += 1
        rows = R.rows_of(seq, d_qk)
        held = []
        if fmt in ("f32", "bf16"):
            for t, row in enumerate(rows):
                block = block_table[b * stride + t // block_size]
                base = block * block_bytes + (t % block_size) * d_qk * (4 if fmt == "f32" else 2)
                if fmt == "f32":
                    struct.pack_into("<%df" % d_qk, kv, base, *row)
                    held.append(list(row))
                else:
                    bits = [R.to_bf16_bits(x) for x in row]
                    struct.pack_into("<%dH" % d_qk, kv, base, *bits)
                    held.append([R.from_bf16_bits(x) for x in bits])
        elif fmt == "fp8_v32":
            for t, row in enumerate(rows):
                block = block_table[b * stride + t // block_size]
                base = block * block_bytes + (t % block_size) * 656
                data, values = R.fp8_v32_token(row)
                kv[base:base + 656] = data
                held.append(values)
        elif fmt == "fp8_model1":
            for j in range(need[b]):
                block = block_table[b * stride + j]
                chunk = rows[j * block_size:(j + 1) * block_size]
                data, values = R.fp8_model1_block(chunk, block_size, block_bytes)
                # Slots past the sequence keep their NaN bytes.
                for i in range(len(chunk)):
                    base = block * block_bytes
                    kv[base + 576 * i:base + 576 * (i + 1)] = data[576 * i:576 * (i + 1)]
                    s0 = 576 * block_size + 8 * i
                    kv[base + s0:base + s0 + 8] = data[s0:s0 + 8]
                held += values
        else:
            raise ValueError(fmt)
        keys.append(held)

    def pos(b, t):
        return block_table[b * stride + t // block_size] * block_size + t % block_size

    return SimpleNamespace(
        kv=kv,
        num_blocks=num_blocks,
        block_table=block_table,
        stride=stride,
        seqlens=array.array("i", lens),
        keys=keys,
        pos=pos,
    )


def expect_finite(test, values, what):
    for i, v in enumerate(values):
        if not math.isfinite(v):
            test.fail("%s[%d] = %r is not finite" % (what, i, v))
