"""mlart_decode_paged against a float64 reference over caches built by hand,
and the cache helpers (kv_quantize / kv_dequantize, bf16 conversions)."""

import array
import ctypes
import math
import struct
import unittest

import testlib  # this checkout's package first on sys.path
import mlart
from testlib import reference as R
from testlib.cache import build_cache

NAN = float("nan")


class DecodeTest(testlib.EngineTestCase):
    def run_case(self, seed, fmt, d_qk, d_v, h_q, block_size, lens, s_q=1, q_dtype="f32",
                 out_dtype="f32", causal=False, scale=1.0):
        """One dense decode; returns the rel-L2 errors of out and lse."""
        rand = R.rng(seed)
        batch = len(lens)
        block_bytes = mlart.kv_block_bytes(fmt, d_qk, block_size)
        if fmt in ("f32", "bf16"):
            self.assertEqual(block_bytes, block_size * d_qk * (4 if fmt == "f32" else 2))
        seqs = [R.random_f32(n * d_qk, rand, scale) for n in lens]
        cache = build_cache(fmt, d_qk, block_size, block_bytes, seqs, seed)

        q_f32 = R.random_f32(batch * s_q * h_q * d_qk, rand, 2.0)
        if q_dtype == "bf16":
            q = R.to_bf16_array(q_f32)
            q_ref = R.from_bf16_array(q)
        else:
            q = q_f32
            q_ref = list(q_f32)
        n_out = batch * s_q * h_q * d_v
        out = array.array("H", [0] * n_out) if out_dtype == "bf16" else array.array("f", [NAN] * n_out)
        lse = array.array("f", [NAN] * (batch * h_q * s_q))

        r = self.engine.decode_paged(
            batch=batch, s_q=s_q, h_q=h_q, d_qk=d_qk, d_v=d_v, causal=causal,
            q=q, q_dtype=q_dtype,
            kv_format=fmt, kv=cache.kv, num_blocks=cache.num_blocks, block_size=block_size,
            block_table=cache.block_table, block_table_stride=cache.stride, seqlens=cache.seqlens,
            out=out, out_dtype=out_dtype, lse=lse,
        )
        self.assertIs(r.out, out)
        self.assertIs(r.lse, lse)

        ref_out, ref_lse = R.reference_decode(batch, s_q, h_q, d_qk, d_v, q_ref, cache.keys, causal=causal)
        got = R.from_bf16_array(out) if out_dtype == "bf16" else list(out)
        # A query that sees no key: out 0, lse +inf.
        per = s_q * h_q * d_v
        for b, n in enumerate(lens):
            if n == 0:
                self.assertEqual(got[b * per:(b + 1) * per], [0.0] * per)
                self.assertEqual(list(lse[b * h_q * s_q:(b + 1) * h_q * s_q]), [math.inf] * (h_q * s_q))
        return R.rel_l2(got, ref_out), R.rel_l2(lse, ref_lse)

    def assert_close(self, errs, out_tol, lse_tol=1e-5):
        out_err, lse_err = errs
        self.assertLessEqual(out_err, out_tol, "out rel-L2 %g" % out_err)
        self.assertLessEqual(lse_err, lse_tol, "lse rel-L2 %g" % lse_err)

    def test_f32_cache_d576_varlen_with_empty_sequence(self):
        # F32 cache, f32 q/out, d_qk 576 / d_v 512, lens 0,1,13,37, h_q 20, block 7.
        self.assert_close(self.run_case(1, "f32", 576, 512, 20, 7, [0, 1, 13, 37]), 1e-5)

    def test_bf16_cache_d576(self):
        # BF16 cache, f32 q/out, lens 1,0,29, h_q 3, block 6.
        self.assert_close(self.run_case(2, "bf16", 576, 512, 3, 6, [1, 0, 29]), 1e-5)

    def test_bf16_cache_bf16_q_and_out(self):
        # d_qk 64 / d_v 48, s_q 2, h_q 5, block 5.
        errs = self.run_case(3, "bf16", 64, 48, 5, 5, [0, 1, 9, 23], s_q=2, q_dtype="bf16", out_dtype="bf16")
        self.assert_close(errs, 4e-3)

    def test_f32_cache_causal_s_q_3(self):
        errs = self.run_case(4, "f32", 64, 48, 17, 3, [2, 0, 1, 11], s_q=3, causal=True)
        self.assert_close(errs, 1e-5)

    def test_fp8_v32_cache(self):
        # The cache written by the reference quantizer (FlashMLA's layout).
        errs = self.run_case(5, "fp8_v32", 576, 512, 2, 4, [0, 5, 11], scale=3.0)
        self.assert_close(errs, 1e-5)

    def test_fp8_model1_cache_causal_bf16_q(self):
        errs = self.run_case(6, "fp8_model1", 512, 512, 3, 3, [4, 0, 7], s_q=2, q_dtype="bf16", causal=True)
        self.assert_close(errs, 1e-5)

    def test_views_are_read_and_written_at_their_offset_and_outputs_allocated(self):
        rand = R.rng(5)
        d_qk, d_v, h_q, block_size, lens = 64, 48, 3, 5, [4, 7]
        bb = mlart.kv_block_bytes("f32", d_qk, block_size)
        cache = build_cache("f32", d_qk, block_size, bb, [R.random_f32(n * d_qk, rand) for n in lens], 5)
        n_q = 2 * h_q * d_qk
        q_big = R.random_f32(n_q + 2 * d_qk, rand)
        q = memoryview(q_big)[d_qk:d_qk + n_q]
        n_out = 2 * h_q * d_v
        out_big = array.array("f", [-5.0] * (n_out + 20))
        out = memoryview(out_big)[10:10 + n_out]
        kv_big = bytearray(len(cache.kv) + 64)
        kv_big[32:32 + len(cache.kv)] = cache.kv
        base = dict(
            batch=2, h_q=h_q, d_qk=d_qk, d_v=d_v, kv_format="f32", num_blocks=cache.num_blocks,
            block_size=block_size, block_table=cache.block_table, block_table_stride=cache.stride,
            seqlens=cache.seqlens, q=q,
        )
        self.engine.decode_paged(kv=memoryview(kv_big)[32:32 + len(cache.kv)], out=out, **base)
        ref_out, ref_lse = R.reference_decode(2, 1, h_q, d_qk, d_v, list(q), cache.keys)
        self.assertLessEqual(R.rel_l2(out, ref_out), 1e-5)
        self.assertEqual(list(out_big[:10]), [-5.0] * 10)
        self.assertEqual(list(out_big[10 + n_out:]), [-5.0] * 10)

        r = self.engine.decode_paged(kv=cache.kv, lse=True, **base)
        self.assertIsInstance(r.out, array.array)
        self.assertEqual((r.out.typecode, len(r.out)), ("f", n_out))
        self.assertLessEqual(R.rel_l2(r.out, ref_out), 1e-5)
        self.assertLessEqual(R.rel_l2(r.lse, ref_lse), 1e-5)
        r16 = self.engine.decode_paged(kv=cache.kv, out_dtype="bf16", **base)
        self.assertEqual((r16.out.typecode, len(r16.out)), ("H", n_out))
        self.assertIsNone(r16.lse)
        self.assertLessEqual(R.rel_l2(R.from_bf16_array(r16.out), ref_out), 4e-3)

        # Read-only inputs (a bytes cache, read-only memoryviews, a ctypes
        # array with a byte-order prefix in its format) give the same result.
        ro = self.engine.decode_paged(
            **dict(base, q=memoryview(bytes(q)).cast("f"),
                   block_table=memoryview(cache.block_table.tobytes()).cast("i")),
            kv=bytes(cache.kv),
        )
        self.assertEqual(list(ro.out), list(r.out))
        cq = (ctypes.c_float * n_q)(*q)
        self.assertEqual(memoryview(cq).format, "<f")
        self.assertEqual(list(self.engine.decode_paged(**dict(base, q=cq), kv=cache.kv).out), list(r.out))

    def test_attention_sink(self):
        rand = R.rng(8)
        d_qk, d_v, h_q, block_size, lens = 64, 64, 4, 4, [6, 0, 9]
        bb = mlart.kv_block_bytes("f32", d_qk, block_size)
        cache = build_cache("f32", d_qk, block_size, bb, [R.random_f32(n * d_qk, rand) for n in lens], 8)
        q = R.random_f32(3 * h_q * d_qk, rand, 2.0)
        sink = array.array("f", [0.5, -math.inf, math.inf, -1.0])
        r = self.engine.decode_paged(
            batch=3, h_q=h_q, d_qk=d_qk, d_v=d_v, q=q, kv_format="f32", kv=cache.kv,
            num_blocks=cache.num_blocks, block_size=block_size, block_table=cache.block_table,
            block_table_stride=cache.stride, seqlens=cache.seqlens, attn_sink=sink, lse=True,
        )
        ref_out, ref_lse = R.reference_decode(3, 1, h_q, d_qk, d_v, list(q), cache.keys, sink=sink)
        self.assertLessEqual(R.rel_l2(r.out, ref_out), 1e-5)
        self.assertLessEqual(R.rel_l2(r.lse, ref_lse), 1e-5)  # lse is unscaled
        # Head 2 (sink +inf) is all zeros; head 1 (-inf) is the plain attention.
        self.assertEqual(list(r.out[2 * d_v:3 * d_v]), [0.0] * d_v)
        plain, _ = R.reference_decode(3, 1, h_q, d_qk, d_v, list(q), cache.keys)
        self.assertLessEqual(R.rel_l2(r.out[d_v:2 * d_v], plain[d_v:2 * d_v]), 1e-5)

    def test_sparse_indices_with_invalid_and_duplicates(self):
        rand = R.rng(7)
        d_qk, d_v, h_q, block_size, lens = 64, 48, 5, 3, [10, 4]
        bb = mlart.kv_block_bytes("bf16", d_qk, block_size)
        cache = build_cache("bf16", d_qk, block_size, bb, [R.random_f32(n * d_qk, rand) for n in lens], 7)
        pos = cache.pos
        topk = 6
        # seq 0: tokens 9, 2, 2 (twice), -1, 5 and a 6th entry cut off by
        # topk_length; seq 1: 0, 3, then -1s.
        indices = [pos(0, 9), pos(0, 2), pos(0, 2), -1, pos(0, 5), pos(0, 7),
                   pos(1, 0), pos(1, 3), -1, -1, -1, -1]
        q = R.random_f32(2 * h_q * d_qk, rand, 2.0)
        r = self.engine.decode_paged(
            batch=2, h_q=h_q, d_qk=d_qk, d_v=d_v, q=q, kv_format="bf16", kv=cache.kv,
            num_blocks=cache.num_blocks, block_size=block_size, indices=indices, topk=topk,
            topk_length=array.array("i", [5, 6]), lse=True,
        )
        K = cache.keys
        keys = [[K[0][9], K[0][2], K[0][2], K[0][5]], [K[1][0], K[1][3]]]
        ref_out, ref_lse = R.reference_decode(2, 1, h_q, d_qk, d_v, list(q), keys)
        self.assertLessEqual(R.rel_l2(r.out, ref_out), 1e-5)
        self.assertLessEqual(R.rel_l2(r.lse, ref_lse), 1e-5)

        # Only invalid indices: the query sees no key (out 0, lse +inf).
        none = self.engine.decode_paged(
            batch=1, h_q=h_q, d_qk=d_qk, d_v=d_v, q=q, kv_format="bf16", kv=cache.kv,
            num_blocks=cache.num_blocks, block_size=block_size, indices=[-1, -1], topk=2, lse=True,
        )
        self.assertEqual(list(none.out), [0.0] * (h_q * d_v))
        self.assertEqual(list(none.lse), [math.inf] * h_q)

    def test_sparse_fp8_model1_with_extra_cache(self):
        rand = R.rng(9)
        d_qk, d_v, h_q = 512, 512, 2
        bb = mlart.kv_block_bytes("fp8_model1", d_qk, 2)
        main = build_cache("fp8_model1", d_qk, 2, bb, [R.random_f32(5 * d_qk, rand)], 9)
        ebb = mlart.kv_block_bytes("fp8_model1", d_qk, 3)
        extra = build_cache("fp8_model1", d_qk, 3, ebb, [R.random_f32(4 * d_qk, rand)], 10)
        q = R.random_f32(2 * h_q * d_qk, rand, 2.0)  # s_q 2
        indices = [main.pos(0, 4), main.pos(0, 0), -1,  # query 0
                   main.pos(0, 1), main.pos(0, 1), main.pos(0, 3)]  # query 1
        extra_indices = [extra.pos(0, 2), -1, extra.pos(0, 0), extra.pos(0, 3)]
        r = self.engine.decode_paged(
            batch=1, s_q=2, h_q=h_q, d_qk=d_qk, d_v=d_v, q=q, kv_format="fp8_model1",
            kv=main.kv, num_blocks=main.num_blocks, block_size=2, indices=indices, topk=3,
            extra_kv=extra.kv, extra_num_blocks=extra.num_blocks, extra_block_size=3,
            extra_indices=extra_indices, extra_topk=2, lse=True,
        )
        K, E = main.keys[0], extra.keys[0]
        ref0, lse0 = R.reference_decode(1, 1, h_q, d_qk, d_v, list(q[:h_q * d_qk]), [[K[4], K[0], E[2]]])
        ref1, lse1 = R.reference_decode(1, 1, h_q, d_qk, d_v, list(q[h_q * d_qk:]), [[K[1], K[1], K[3], E[0], E[3]]])
        self.assertLessEqual(R.rel_l2(r.out, ref0 + ref1), 1e-5)
        # lse [batch, h_q, s_q]
        self.assertLessEqual(R.rel_l2(r.lse, [lse0[0], lse1[0], lse0[1], lse1[1]]), 1e-5)


class CacheHelpersTest(unittest.TestCase):
    def test_kv_quantize_bf16_matches_the_hand_built_layout(self):
        rand = R.rng(6)
        d_qk, block_size, n = 64, 5, 12
        rows = R.random_f32(n * d_qk, rand, 3.0)
        bb = mlart.kv_block_bytes("bf16", d_qk, block_size)
        data = mlart.kv_quantize("bf16", d_qk, block_size, rows)
        self.assertIsInstance(data, bytearray)
        self.assertEqual(len(data), -(-n // block_size) * bb)
        bits = memoryview(data).cast("H")[:n * d_qk]  # blocks contiguous, no padding
        self.assertEqual(list(bits), list(R.to_bf16_array(rows)))
        self.assertEqual(list(mlart.f32_to_bf16(rows)), list(R.to_bf16_array(rows)))
        back = mlart.kv_dequantize("bf16", d_qk, block_size, n, data)
        self.assertEqual((back.typecode, list(back)), ("f", R.from_bf16_array(bits)))
        # Into a given, larger dst; n_tokens from the argument.
        dst = bytearray(b"\xaa" * (len(data) + 10))
        self.assertIs(mlart.kv_quantize("bf16", d_qk, block_size, rows, n_tokens=n, dst=dst), dst)
        self.assertEqual(dst[:n * d_qk * 2], data[:n * d_qk * 2])
        self.assertEqual(dst[len(data):], b"\xaa" * 10)

    def fp8_rows(self, n, d_qk, tile, seed):
        """Rows whose tiles span magnitudes: a zero tile (scale floor), tiny
        values (e4m3 subnormals), large values (scales above 1)."""
        rand = R.rng(seed)
        mags = [1.0, 0.0, 3e-5, 700.0, 0.02, 1.0, 40.0]
        rows = array.array("f")
        for _ in range(n):
            for c in range(d_qk):
                t = c // tile
                rows.append(rand() * (mags[t % len(mags)] if t < len(mags) else 1.0))
        return rows

    def test_kv_quantize_fp8_v32_bytes_and_round_trip(self):
        d_qk, block_size, n = 576, 3, 7
        rows = self.fp8_rows(n, d_qk, 128, 61)
        bb = mlart.kv_block_bytes("fp8_v32", d_qk, block_size)
        self.assertEqual((mlart.kv_row_bytes("fp8_v32", d_qk), bb), (656, 656 * block_size))
        data = mlart.kv_quantize(mlart.KvFormat.FP8_V32, d_qk, block_size, rows)
        want = bytearray(-(-n // block_size) * bb)
        values = []
        for t, row in enumerate(R.rows_of(rows, d_qk)):
            token, vals = R.fp8_v32_token(row)
            off = (t // block_size) * bb + (t % block_size) * 656
            want[off:off + 656] = token
            values += vals
        self.assertEqual(bytes(data), bytes(want))
        back = mlart.kv_dequantize("fp8_v32", d_qk, block_size, n, data)
        self.assertEqual(list(back), values)  # f32 is exact
        back16 = mlart.kv_dequantize("fp8_v32", d_qk, block_size, n, data, dtype="bf16")
        self.assertEqual(list(back16), [R.to_bf16_bits(v) for v in values])
        # Slots past n_tokens in the last block are left as they were.
        dst = bytearray(b"\xaa" * len(want))
        mlart.kv_quantize("fp8_v32", d_qk, block_size, rows, dst=dst)
        self.assertEqual(bytes(dst[:n * 656]), bytes(want[:n * 656]))
        self.assertEqual(bytes(dst[n * 656:]), b"\xaa" * (len(want) - n * 656))

    def test_kv_quantize_fp8_model1_bytes_and_round_trip(self):
        d_qk, block_size, n = 512, 3, 5
        rows = self.fp8_rows(n, d_qk, 64, 62)
        bb = mlart.kv_block_bytes("fp8_model1", d_qk, block_size)
        self.assertEqual((mlart.kv_row_bytes("fp8_model1", d_qk), bb), (584, 2304))  # 3*584 -> 4*576
        bits = R.to_bf16_array(rows)
        data = mlart.kv_quantize("fp8_model1", d_qk, block_size, bits, dtype="bf16")
        # bf16 input: the reference quantizes the bf16 values.
        rs = R.rows_of(R.from_bf16_array(bits), d_qk)
        want = b""
        values = []
        for j in range(0, n, block_size):
            block, vals = R.fp8_model1_block(rs[j:j + block_size], block_size, bb)
            want += block
            for v in vals:
                values += v
        self.assertEqual(bytes(data), want)
        self.assertEqual(list(mlart.kv_dequantize("fp8_model1", d_qk, block_size, n, data)), values)

    def test_bf16_helpers(self):
        vals = [0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.5, 1e-40, 3.0e38, math.inf, -math.inf]
        # Ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even (1.0) wins;
        # 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
        bits = mlart.f32_to_bf16(array.array("f", vals))
        self.assertEqual(bits.typecode, "H")
        self.assertEqual(list(bits), [R.to_bf16_bits(v) for v in vals])
        self.assertEqual(bits[3], 0x3F80)
        self.assertEqual(bits[4], 0x3F82)
        self.assertEqual(list(mlart.f32_to_bf16(vals)), list(bits))  # plain floats too
        nan = mlart.f32_to_bf16([math.nan])[0]
        self.assertEqual(nan & 0x7F80, 0x7F80)
        self.assertNotEqual(nan & 0x7F, 0)
        back = mlart.bf16_to_f32(bits)
        self.assertEqual(back.typecode, "f")
        self.assertEqual(list(back), [R.from_bf16_bits(b) for b in bits])
        self.assertEqual(list(mlart.bf16_to_f32([0x3F80, 0xC060])), [1.0, -3.5])
        with self.assertRaisesRegex(ValueError, r"src\[0\] = 65536"):
            mlart.bf16_to_f32([0x10000])
        with self.assertRaisesRegex(TypeError, "src must be a float32 buffer"):
            mlart.f32_to_bf16(array.array("d", [1.0]))
        with self.assertRaisesRegex(TypeError, "src must be a uint16 buffer"):
            mlart.bf16_to_f32(array.array("f", [1.0]))

    def test_dtype_follows_the_buffer_format(self):
        # numpy float16 arrays export format 'e' (array.array cannot make one).
        f = mlart._dtype_of_format
        self.assertEqual(f("f", None, "q", "q_dtype"), mlart.DType.F32)
        self.assertEqual(f("e", None, "q", "q_dtype"), mlart.DType.F16)
        self.assertEqual(f("e", "f16", "q", "q_dtype"), mlart.DType.F16)
        self.assertEqual(f("H", None, "q", "q_dtype"), mlart.DType.BF16)
        self.assertEqual(f("H", "f16", "q", "q_dtype"), mlart.DType.F16)
        self.assertEqual(f("H", mlart.DType.BF16, "q", "q_dtype"), mlart.DType.BF16)
        with self.assertRaisesRegex(TypeError, r"^q is a float16 buffer \(format 'e'\) but q_dtype is 'bf16'"):
            f("e", "bf16", "q", "q_dtype")
        with self.assertRaisesRegex(TypeError, r"^q is a float32 buffer \(format 'f'\) but q_dtype is 'f16'"):
            f("f", "f16", "q", "q_dtype")
        with self.assertRaisesRegex(TypeError, r"^x is a uint16 buffer .* but x_dtype is 'f32'"):
            f("H", "f32", "x", "x_dtype")
        with self.assertRaisesRegex(TypeError, r"^q must be a float32 .* got format 'd'"):
            f("d", None, "q", "q_dtype")

    def test_f16_rows_from_uint16_bits(self):
        # f16 bits in a uint16 buffer with dtype='f16': 1.0 = 0x3c00, -2.5 = 0xc100.
        rows = array.array("H", [0x3C00, 0xC100] * 4)
        data = mlart.kv_quantize("f32", 8, 4, rows, dtype="f16")
        self.assertEqual(struct.unpack("<8f", data[:32]), (1.0, -2.5) * 4)
        # As bf16 (the default for uint16) the same bits mean other values.
        data = mlart.kv_quantize("f32", 8, 4, rows)
        self.assertEqual(struct.unpack("<2f", data[:8]), (R.from_bf16_bits(0x3C00), R.from_bf16_bits(0xC100)))
        back = mlart.kv_dequantize("f16", 8, 4, 1, mlart.kv_quantize("f16", 8, 4, rows, dtype="f16"), dtype="f16")
        self.assertEqual(list(back), list(rows))


if __name__ == "__main__":
    unittest.main()
