"""Test support, independent of the binding: a seeded PRNG, bf16 and FP8
conversions written from their definitions, and a float64 reference of
MLA decode attention."""

import array
import math
import operator
import random
import struct

INF = float("inf")


def rng(seed):
    """A seeded PRNG returning uniform floats in [-1, 1)."""
    r = random.Random(seed)
    return lambda: r.random() * 2.0 - 1.0


def random_f32(n, rand, scale=1.0):
    """array('f') of `n` uniform values in [-scale, scale)."""
    return array.array("f", [rand() * scale for _ in range(n)])


def f32(x):
    """`x` rounded to float32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def to_bf16_bits(x):
    """float -> bf16 bits, rounded to nearest even (finite inputs): the
    upper half of the float32 pattern, plus one when the lower half is
    above the midpoint, or at it with an odd upper half."""
    u = f32_bits(x)
    hi, lo = u >> 16, u & 0xFFFF
    if lo > 0x8000 or (lo == 0x8000 and hi & 1):
        hi += 1
    return hi & 0xFFFF


def from_bf16_bits(b):
    return struct.unpack("<f", struct.pack("<I", (b & 0xFFFF) << 16))[0]


def to_bf16_array(values):
    return array.array("H", [to_bf16_bits(v) for v in values])


def from_bf16_array(bits):
    return [from_bf16_bits(b) for b in bits]


# FP8 E4M3 (OCP "fn": no infinities, max 448) and the power-of-two tile
# scales of DeepSeek's FP8 caches: scale = 2^ceil(log2(max(amax / 448, 1e-4))).

E4M3_MAX = 448.0


def e4m3(y):
    """(code, value) of `y` in E4M3, rounded to nearest even, saturated at
    +-448."""
    sign = 0x80 if math.copysign(1.0, y) < 0 else 0
    a = abs(y)
    if a >= E4M3_MAX:
        return sign | 0x7E, math.copysign(E4M3_MAX, y)
    # a = f * 2^k with f in [0.5, 1): the binade exponent is k - 1.
    e = max(math.frexp(a)[1] - 1, -6) if a > 0 else -6
    quantum = 2.0 ** (e - 3)
    m = round(a / quantum)  # Python rounds half to even
    value = m * quantum
    if m == 16:
        m, e = 8, e + 1
    if m < 8:
        code = m  # subnormal
    else:
        code = ((e + 7) << 3) | (m - 8)
    if code > 0x7E:
        return sign | 0x7E, math.copysign(E4M3_MAX, y)
    return sign | code, math.copysign(value, y)


def tile_scale(amax):
    """The power-of-two scale of a tile (computed in float32 as the
    library does): the smallest power of two >= max(amax / 448, 1e-4)."""
    v = max(f32(amax / E4M3_MAX), f32(1e-4))
    m, k = math.frexp(v)  # v = m * 2^k, m in [0.5, 1)
    return 2.0 ** (k - 1) if m == 0.5 else 2.0 ** k


def quantize_tile(xs):
    """(codes, dequantized values, scale) of one tile of float32 values."""
    scale = tile_scale(max(abs(x) for x in xs))
    codes = []
    values = []
    for x in xs:
        c, v = e4m3(x / scale)
        codes.append(c)
        values.append(v * scale)
    return codes, values, scale


def fp8_v32_token(row):
    """FlashMLA's V3.2 layout of one 576-wide row: (656 bytes, the 576
    values it dequantizes to)."""
    assert len(row) == 576
    out = bytearray()
    scales = []
    values = []
    for t in range(4):
        codes, vals, s = quantize_tile(row[128 * t:128 * (t + 1)])
        out += bytes(codes)
        scales.append(s)
        values += vals
    out += struct.pack("<4f", *scales)
    rope = [to_bf16_bits(x) for x in row[512:]]
    out += struct.pack("<64H", *rope)
    values += [from_bf16_bits(b) for b in rope]
    return bytes(out), values


def fp8_model1_block(rows, block_size, block_bytes):
    """FlashMLA's MODEL1 layout of one block (up to block_size 512-wide
    rows): (block_bytes bytes, the values of each row). Slots past the rows
    are zero, as is the padding."""
    assert len(rows) <= block_size
    data = bytearray(block_bytes)
    values = []
    for i, row in enumerate(rows):
        assert len(row) == 512
        codes = []
        vals = []
        exps = []
        for t in range(7):
            c, v, s = quantize_tile(row[64 * t:64 * (t + 1)])
            codes += c
            vals += v
            exps.append(math.frexp(s)[1] - 1 + 127)  # ue8m0: log2(scale) + 127
        rope = [to_bf16_bits(x) for x in row[448:]]
        data[576 * i:576 * i + 448] = bytes(codes)
        struct.pack_into("<64H", data, 576 * i + 448, *rope)
        data[576 * block_size + 8 * i:576 * block_size + 8 * i + 8] = bytes(exps + [0])
        values.append(vals + [from_bf16_bits(b) for b in rope])
    return bytes(data), values


# Reference attention ---------------------------------------------------------


def reference_decode(batch, s_q, h_q, d_qk, d_v, q, keys, causal=False, scale=None, sink=None):
    """Reference decode in float64, one KV head.

    q: [batch, s_q, h_q, d_qk] numbers (flat); keys[b]: the rows (length
    d_qk) sequence b attends to (for sparse decode, the indexed rows in
    order, duplicates included). sink: optional per-head attention sink.
    Returns (out [batch, s_q, h_q, d_v], lse [batch, h_q, s_q]) as lists.
    """
    s = (1.0 / math.sqrt(d_qk)) if scale is None else scale
    out = [0.0] * (batch * s_q * h_q * d_v)
    lse = [0.0] * (batch * h_q * s_q)
    mul = operator.mul
    for b in range(batch):
        K = keys[b]
        for i in range(s_q):
            visible = max(0, len(K) - (s_q - 1 - i)) if causal else len(K)
            for h in range(h_q):
                qo = ((b * s_q + i) * h_q + h) * d_qk
                oo = ((b * s_q + i) * h_q + h) * d_v
                lo = (b * h_q + h) * s_q + i
                if visible == 0:
                    lse[lo] = INF
                    continue
                qrow = q[qo:qo + d_qk]
                scores = [sum(map(mul, qrow, K[t])) * s for t in range(visible)]
                mx = max(scores)
                ws = [math.exp(x - mx) for x in scores]
                total = sum(ws)
                acc = [0.0] * d_v
                for t in range(visible):
                    p = ws[t] / total
                    acc = [a + p * r for a, r in zip(acc, K[t])]
                l = mx + math.log(total)
                factor = 1.0
                if sink is not None:
                    factor = 1.0 / (1.0 + math.exp(sink[h] - l))
                out[oo:oo + d_v] = [a * factor for a in acc]
                lse[lo] = l
    return out, lse


def rel_l2(a, b):
    """||a - b|| / ||b|| over the finite entries of b (a must equal b where b
    is not finite)."""
    a = list(a)
    b = list(b)
    if len(a) != len(b):
        raise AssertionError("length %d != %d" % (len(a), len(b)))
    num = 0.0
    den = 0.0
    for x, y in zip(a, b):
        if not math.isfinite(y):
            if x != y:
                return INF
            continue
        d = x - y
        num += d * d
        den += y * y
    return math.sqrt(num) if den == 0 else math.sqrt(num / den)


def rows_of(values, d_qk):
    """Rows (lists of floats) of a flat [n, d_qk] sequence."""
    values = list(values)
    return [values[t * d_qk:(t + 1) * d_qk] for t in range(len(values) // d_qk)]
