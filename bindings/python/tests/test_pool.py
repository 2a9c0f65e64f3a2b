"""KvPool: sequences, append, fork (copy-on-write), truncate, stats, decode."""

import array
import math
import unittest

import testlib  # noqa: F401
import mlart
from testlib import reference as R

D_QK = 64
D_V = 48
BLOCK = 5
NUM_BLOCKS = 40


class KvPoolTest(unittest.TestCase):
    def setUp(self):
        self.engine = mlart.Engine("cpu")
        self.addCleanup(self.engine.close)

    def test_lifecycle_fork_truncate_stats_and_decode_against_the_reference(self):
        pool = mlart.KvPool(self.engine, kv_format="f32", d_qk=D_QK, num_layers=2, block_size=BLOCK,
                            num_blocks=NUM_BLOCKS)
        self.addCleanup(pool.close)
        rand = R.rng(11)
        self.assertEqual(pool.d_qk, D_QK)
        self.assertEqual(pool.kv_format, mlart.KvFormat.F32)
        self.assertEqual((pool.num_layers, pool.block_size, pool.num_blocks), (2, BLOCK, NUM_BLOCKS))
        self.assertEqual(pool.index_head_dim, 0, "index_head_dim defaults to 0")
        per_block = 2 * BLOCK * D_QK * 4
        self.assertEqual(
            pool.stats(),
            mlart.KvPoolStats(blocks_total=NUM_BLOCKS, blocks_used=0, blocks_free=NUM_BLOCKS, sequences=0,
                              bytes_per_block=per_block, bytes_total=NUM_BLOCKS * per_block),
        )

        # Sequence 1: 12 tokens in layer 0, 7 in layer 1.
        pool.create_seq(1)
        a0 = R.random_f32(12 * D_QK, rand)
        a1 = R.random_f32(7 * D_QK, rand)
        pool.append(1, 0, memoryview(a0)[:4 * D_QK])
        pool.append(1, 0, memoryview(a0)[4 * D_QK:])  # appends continue the sequence
        pool.append(1, 1, a1)
        pool.append(1, 1, None)  # zero tokens: nothing changes
        self.assertEqual(pool.seq_length(1, 0), 12)
        self.assertEqual(pool.seq_length(1, layer=1), 7)
        s = pool.stats()
        self.assertEqual(s.sequences, 1)
        self.assertEqual(s.blocks_used, 3)  # ceil(12 / 5); a block covers every layer
        self.assertEqual(s.blocks_free, NUM_BLOCKS - 3)

        # Fork into 2, then append 3 rows: copy-on-write.
        pool.fork_seq(1, 2)
        self.assertEqual(pool.seq_length(2, 0), 12)
        self.assertEqual(pool.seq_length(2, 1), 7)
        b0 = R.random_f32(3 * D_QK, rand)
        pool.append(2, 0, b0)
        self.assertEqual(pool.seq_length(2, 0), 15)
        self.assertEqual(pool.seq_length(1, 0), 12, "an append to the fork changed the source")

        # Truncate 2 to 13: rows 0..11 of seq 1, then b0 row 0.
        pool.truncate_seq(2, 13)
        self.assertEqual(pool.seq_length(2, 0), 13)
        self.assertEqual(pool.seq_length(2, 1), 7)
        s = pool.stats()
        self.assertEqual(s.sequences, 2)
        self.assertEqual(s.blocks_used, 4)  # 3 of seq 1 + seq 2's private copy of the third block

        # Sequence 3: bf16 rows appended to the f32 pool (exact).
        pool.create_seq(3)
        c0 = R.to_bf16_array(R.random_f32(6 * D_QK, rand))
        pool.append(3, 0, c0)
        self.assertEqual(pool.seq_length(3, 0), 6)

        keys0 = {
            1: R.rows_of(a0, D_QK),
            2: R.rows_of(a0, D_QK) + R.rows_of(b0, D_QK)[:1],
            3: R.rows_of(R.from_bf16_array(c0), D_QK),
        }
        ids = [1, 2, 3, 1]
        h_q, s_q = 7, 2
        q = R.random_f32(len(ids) * s_q * h_q * D_QK, rand, 2.0)
        lse = array.array("f", [math.nan] * (len(ids) * h_q * s_q))
        r = pool.decode(layer=0, seq_ids=ids, s_q=s_q, h_q=h_q, d_v=D_V, q=q, lse=lse)
        self.assertIs(r.lse, lse)
        ref_out, ref_lse = R.reference_decode(len(ids), s_q, h_q, D_QK, D_V, list(q), [keys0[i] for i in ids])
        self.assertLessEqual(R.rel_l2(r.out, ref_out), 1e-5)
        self.assertLessEqual(R.rel_l2(lse, ref_lse), 1e-5)

        # Layer 1 (seq 3 has no tokens there: out 0, lse +inf), causal, bf16 q and out,
        # ids as a uint64 buffer.
        q1 = R.to_bf16_array(R.random_f32(3 * s_q * h_q * D_QK, rand, 2.0))
        r1 = pool.decode(layer=1, seq_ids=array.array("Q", [1, 2, 3]), s_q=s_q, h_q=h_q, d_v=D_V, q=q1,
                         causal=True, out_dtype="bf16", lse=True)
        a1_rows = R.rows_of(a1, D_QK)
        ref1, ref1_lse = R.reference_decode(3, s_q, h_q, D_QK, D_V, R.from_bf16_array(q1),
                                            [a1_rows, a1_rows, []], causal=True)
        self.assertEqual(r1.out.typecode, "H")
        self.assertLessEqual(R.rel_l2(R.from_bf16_array(r1.out), ref1), 4e-3)
        self.assertLessEqual(R.rel_l2(r1.lse, ref1_lse), 1e-5)
        self.assertEqual(list(r1.lse[2 * h_q * s_q:]), [math.inf] * (h_q * s_q))

        # Sparse decode over logical positions (-1 = none), with topk_length.
        q2 = R.random_f32(2 * h_q * D_QK, rand, 2.0)
        r2 = pool.decode(layer=0, seq_ids=[1, 3], h_q=h_q, d_v=D_V, q=q2,
                         indices=[11, 0, 0, -1, 5, 2, -1, 1], topk=4, topk_length=[4, 3], lse=True)
        k1, k3 = keys0[1], keys0[3]
        ref2, ref2_lse = R.reference_decode(2, 1, h_q, D_QK, D_V, list(q2), [[k1[11], k1[0], k1[0]], [k3[5], k3[2]]])
        self.assertLessEqual(R.rel_l2(r2.out, ref2), 1e-5)
        self.assertLessEqual(R.rel_l2(r2.lse, ref2_lse), 1e-5)

        # Truncating further frees seq 2's private block; free seq 2.
        pool.truncate_seq(2, 10)
        self.assertEqual(pool.seq_length(2, 0), 10)
        self.assertEqual(pool.stats().blocks_used, 3 + 2)  # seq 1: 3, seq 3: 2
        pool.free_seq(2)
        self.assertEqual(pool.stats().sequences, 2)
        with self.assertRaises(mlart.MlartError) as cm:
            pool.seq_length(2)
        self.assertEqual((cm.exception.code, cm.exception.status), ("NOT_FOUND", mlart.Status.NOT_FOUND))
        self.assertEqual(cm.exception.function, "mlart_kv_seq_length")
        pool.free_seq(1)
        pool.free_seq(3)
        self.assertEqual(pool.stats().blocks_used, 0)

    def test_fp8_pool_decodes_the_quantized_rows(self):
        pool = mlart.KvPool(self.engine, kv_format=mlart.KvFormat.FP8_V32, d_qk=576, block_size=4, num_blocks=8)
        self.addCleanup(pool.close)
        rand = R.rng(12)
        rows = R.random_f32(6 * 576, rand, 5.0)
        pool.create_seq(9)
        pool.append(9, 0, rows)
        keys = [R.fp8_v32_token(row)[1] for row in R.rows_of(rows, 576)]
        q = R.random_f32(3 * 576, rand)
        r = pool.decode(seq_ids=9, h_q=3, d_v=512, q=q, lse=True)
        ref, ref_lse = R.reference_decode(1, 1, 3, 576, 512, list(q), [keys])
        self.assertLessEqual(R.rel_l2(r.out, ref), 1e-5)
        self.assertLessEqual(R.rel_l2(r.lse, ref_lse), 1e-5)

    def test_full_pool_is_pool_exhausted_and_nothing_changes(self):
        pool = mlart.KvPool(self.engine, kv_format="bf16", d_qk=D_QK, block_size=4, num_blocks=2)
        try:
            pool.create_seq(7)
            pool.append(7, 0, array.array("f", bytes(4 * 6 * D_QK)))
            with self.assertRaises(mlart.MlartError) as cm:
                pool.append(7, 0, array.array("f", bytes(4 * 3 * D_QK)))
            self.assertEqual((cm.exception.code, cm.exception.status),
                             ("POOL_EXHAUSTED", mlart.Status.POOL_EXHAUSTED))
            self.assertEqual(pool.seq_length(7), 6)
            pool.append(7, 0, array.array("f", bytes(4 * 2 * D_QK)))
            self.assertEqual(pool.seq_length(7), 8)
        finally:
            pool.close()
            pool.close()
        self.assertTrue(pool.closed)
        with self.assertRaisesRegex(mlart.ClosedError, "this KvPool is closed"):
            pool.stats()

    def test_seq_ids_cover_uint64_and_bad_ids_are_rejected_in_python(self):
        with mlart.KvPool(self.engine, kv_format="f32", d_qk=8, block_size=2, num_blocks=4) as pool:
            big = (1 << 64) - 1
            pool.create_seq(big)
            pool.append(big, 0, array.array("f", [2.0] * 8))
            self.assertEqual(pool.seq_length(big), 1)
            r = pool.decode(seq_ids=[big], h_q=1, d_v=8, q=array.array("f", [0.0] * 8))
            self.assertEqual(list(r.out), [2.0] * 8)
            with self.assertRaisesRegex(ValueError, r"^seq_id = -1 is outside the uint64_t range"):
                pool.create_seq(-1)
            with self.assertRaisesRegex(ValueError, "outside the uint64_t range"):
                pool.create_seq(1 << 64)
            with self.assertRaisesRegex(TypeError, "^seq_id must be a non-negative integer, got float 1.5"):
                pool.create_seq(1.5)
            with self.assertRaisesRegex(TypeError, "^seq_id must be"):
                pool.create_seq("3")
            with self.assertRaisesRegex(TypeError, "^seq_id must be"):
                pool.create_seq(True)
            with self.assertRaisesRegex(ValueError, r"^seq_ids\[1\] = -2"):
                pool.decode(seq_ids=[big, -2], h_q=1, d_v=8, q=array.array("f", [0.0] * 16))
            # Other integer buffers are converted, each id checked.
            r = pool.decode(seq_ids=array.array("Q", [big]), h_q=1, d_v=8, q=array.array("f", [0.0] * 8))
            self.assertEqual(list(r.out), [2.0] * 8)
            pool.create_seq(3)
            pool.append(3, 0, array.array("f", [5.0] * 8))
            r = pool.decode(seq_ids=array.array("h", [3, 3]), h_q=1, d_v=8, q=array.array("f", [0.0] * 16))
            self.assertEqual(list(r.out), [5.0] * 16)
            with self.assertRaisesRegex(ValueError, r"^seq_ids\[1\] = -1 is outside the uint64_t range"):
                pool.decode(seq_ids=array.array("q", [3, -1]), h_q=1, d_v=8, q=array.array("f", [0.0] * 16))
            with self.assertRaisesRegex(TypeError, "^seq_ids must be a list of ids"):
                pool.decode(seq_ids=array.array("d", [1.0]), h_q=1, d_v=8, q=array.array("f", [0.0] * 8))
            with self.assertRaisesRegex(TypeError, "^seq_ids must be a list of ids"):
                pool.decode(seq_ids="1", h_q=1, d_v=8, q=array.array("f", [0.0] * 8))
        self.assertTrue(pool.closed)

    def test_index_head_dim_round_trip_room_per_block_append_refused(self):
        opts = dict(kv_format="f32", d_qk=80, block_size=4, num_blocks=8)
        with mlart.KvPool(self.engine, **opts) as plain, \
                mlart.KvPool(self.engine, index_head_dim=32, **opts) as pool:
            self.assertEqual(plain.index_head_dim, 0)
            self.assertEqual(pool.index_head_dim, 32)
            self.assertEqual(pool.d_qk, 80)
            self.assertGreater(pool.stats().bytes_per_block, plain.stats().bytes_per_block,
                               "indexer keys take no room")
            pool.create_seq(1)
            with self.assertRaises(mlart.MlartError) as cm:
                pool.append(1, 0, array.array("f", [0.0] * 80))
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
            self.assertIn("index_head_dim", str(cm.exception))
            self.assertEqual(pool.seq_length(1), 0)
            with self.assertRaises(mlart.MlartError) as cm:
                mlart.KvPool(self.engine, index_head_dim=-1, **opts)
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
            self.assertIn("index_head_dim", cm.exception.message)
            with self.assertRaisesRegex(TypeError, "^index_head_dim must be an integer"):
                mlart.KvPool(self.engine, index_head_dim=1.5, **opts)

    def test_pool_attributes_are_read_only(self):
        with mlart.KvPool(self.engine, num_blocks=1) as pool:
            self.assertEqual((pool.kv_format, pool.d_qk, pool.num_layers, pool.block_size),
                             (mlart.KvFormat.BF16, 576, 1, 64))  # the library's defaults
            with self.assertRaises(AttributeError):
                pool.d_qk = 3


if __name__ == "__main__":
    unittest.main()
