"""Errors: Python-side checks (before any C call) and the library's statuses."""

import array
import unittest

import testlib
import mlart
from testlib import reference as R
from testlib.cache import build_cache

D_QK = 64
H_Q = 3
BLOCK = 5


def shorten(buf):
    """The same buffer, one element short."""
    return memoryview(buf)[:-1]


class DecodeArgumentErrorsTest(testlib.EngineTestCase):
    def dense_args(self, **overrides):
        rand = R.rng(21)
        lens = [3, 8]
        bb = mlart.kv_block_bytes("f32", D_QK, BLOCK)
        c = build_cache("f32", D_QK, BLOCK, bb, [R.random_f32(n * D_QK, rand) for n in lens], 21)
        d_v = overrides.get("d_v", 48)
        args = dict(
            batch=2, s_q=1, h_q=H_Q, d_qk=D_QK, d_v=d_v,
            q=R.random_f32(2 * H_Q * D_QK, rand),
            kv_format="f32", kv=c.kv, num_blocks=c.num_blocks, block_size=BLOCK,
            block_table=c.block_table, block_table_stride=c.stride, seqlens=c.seqlens,
            out=array.array("f", bytes(4 * 2 * H_Q * d_v)), lse=array.array("f", bytes(4 * 2 * H_Q)),
            attn_sink=array.array("f", bytes(4 * H_Q)),
        )
        args.update(overrides)
        return args

    def assert_lib_error(self, code, pattern, fn, *args, **kwargs):
        with self.assertRaises(mlart.MlartError) as cm:
            fn(*args, **kwargs)
        e = cm.exception
        self.assertEqual(e.code, code, str(e))
        self.assertEqual(e.status, mlart.Status[code])
        self.assertRegex(str(e), pattern)
        return e

    def test_the_dense_arguments_are_valid_as_built(self):
        self.engine.decode_paged(**self.dense_args())

    def test_a_too_short_buffer_is_a_value_error_raised_before_the_library_is_called(self):
        # d_v > d_qk makes the library itself reject the call (naming d_v) ...
        self.assert_lib_error("INVALID_ARGUMENT", "d_v", self.engine.decode_paged, **self.dense_args(d_v=D_QK + 1))
        # ... so a ValueError instead proves the Python check came first.
        for name in ["q", "kv", "block_table", "seqlens", "out", "lse", "attn_sink"]:
            args = self.dense_args(d_v=D_QK + 1)
            args[name] = shorten(args[name])
            with self.assertRaises(ValueError, msg="short %s" % name) as cm:
                self.engine.decode_paged(**args)
            self.assertTrue(str(cm.exception).startswith("%s has " % name), str(cm.exception))
        args = self.dense_args()
        args["q"] = shorten(args["q"])
        with self.assertRaisesRegex(ValueError, r"^q has 383 elements but q \[batch=2, s_q=1, h_q=3, d_qk=64\] needs 384$"):
            self.engine.decode_paged(**args)
        args = self.dense_args()
        args["kv"] = shorten(args["kv"])
        with self.assertRaisesRegex(ValueError, r"^kv has \d+ bytes but kv \[num_blocks=\d+\] x 1280-byte blocks needs \d+$"):
            self.engine.decode_paged(**args)

    def test_sparse_and_extra_buffers_are_checked_too(self):
        base = self.dense_args(block_table=None, seqlens=None)
        topk = 4
        indices = array.array("i", [-1] * (2 * topk))
        indices[0] = 0
        indices[topk] = 1
        self.engine.decode_paged(indices=indices, topk=topk, topk_length=array.array("i", [1, 2]), **base)
        with self.assertRaisesRegex(ValueError, "^indices has 7 elements"):
            self.engine.decode_paged(indices=shorten(indices), topk=topk, **base)
        with self.assertRaisesRegex(ValueError, "^topk_length has 1 elements"):
            self.engine.decode_paged(indices=indices, topk=topk, topk_length=[1], **base)
        with self.assertRaisesRegex(TypeError, "^topk_length is only meaningful with indices"):
            self.engine.decode_paged(**self.dense_args(topk_length=[1, 1]))
        extra = bytearray(mlart.kv_block_bytes("f32", D_QK, 2))
        ok = dict(indices=indices, topk=topk, extra_kv=extra, extra_num_blocks=1, extra_block_size=2,
                  extra_indices=[0, -1, 1, 0], extra_topk=2)
        self.engine.decode_paged(**ok, **base)
        with self.assertRaisesRegex(ValueError, "^extra_kv has"):
            self.engine.decode_paged(**dict(ok, extra_num_blocks=2), **base)
        with self.assertRaisesRegex(ValueError, r"^extra_indices has 3 elements but extra_indices \[batch=2, s_q=1, extra_topk=2\] needs 4"):
            self.engine.decode_paged(**dict(ok, extra_indices=[0, 0, 0]), **base)
        with self.assertRaisesRegex(ValueError, "^extra_topk_length has 1 elements"):
            self.engine.decode_paged(**dict(ok, extra_topk_length=[1]), **base)
        with self.assertRaisesRegex(TypeError, "need extra_kv"):
            self.engine.decode_paged(indices=indices, topk=topk, extra_indices=[0], **base)

    def test_wrong_buffer_types_are_type_errors_naming_the_argument(self):
        cases = {
            "q": array.array("d", [0.0] * (2 * H_Q * D_QK)),
            "block_table": array.array("I", [0] * 100),
            "seqlens": array.array("q", [3, 8]),
            "kv": [1, 2, 3],
            "lse": array.array("d", [0.0] * 6),
            "attn_sink": array.array("H", [0] * 3),
            "out": array.array("i", [0] * (2 * H_Q * 48)),
            "h_q": 2.5,
            "batch": "2",
            "softmax_scale": "0.1",
            "kv_format": 3.0,
        }
        for name, value in cases.items():
            with self.assertRaisesRegex(TypeError, "^%s " % name, msg=name):
                self.engine.decode_paged(**self.dense_args(**{name: value}))
        with self.assertRaisesRegex(TypeError, "^q is a uint16 buffer .* but q_dtype is 'f32'"):
            self.engine.decode_paged(**self.dense_args(q=array.array("H", [0] * (2 * H_Q * D_QK)), q_dtype="f32"))
        with self.assertRaisesRegex(ValueError, "^kv_format = 'fp4' is not one of 'bf16', 'f16', 'f32', 'fp8_v32', 'fp8_model1'"):
            self.engine.decode_paged(**self.dense_args(kv_format="fp4"))
        with self.assertRaisesRegex(TypeError, "^kv_format must be a KvFormat, a string or an int, got DType.F16"):
            self.engine.decode_paged(**self.dense_args(kv_format=mlart.DType.F16))
        with self.assertRaisesRegex(ValueError, "^batch = 4294967296 does not fit in int32_t"):
            self.engine.decode_paged(**self.dense_args(batch=1 << 32))
        with self.assertRaisesRegex(TypeError, "^block_table must be an int32 buffer"):
            self.engine.decode_paged(**self.dense_args(block_table=b"\0" * 400))
        with self.assertRaisesRegex(ValueError, r"^block_table\[1\] = 4294967296 does not fit in int32_t"):
            self.engine.decode_paged(**self.dense_args(block_table=[0, 1 << 32]))
        # Keyword-only arguments: a positional call is Python's TypeError.
        with self.assertRaises(TypeError):
            self.engine.decode_paged(2, 3)

    def test_outputs_must_be_writable_and_every_buffer_contiguous(self):
        args = self.dense_args()
        ro_out = memoryview(bytes(4 * 2 * H_Q * 48)).cast("f")
        with self.assertRaisesRegex(TypeError, "^out must be writable: it is an output, got a read-only bytes"):
            self.engine.decode_paged(**dict(args, out=ro_out))
        with self.assertRaisesRegex(TypeError, "^lse must be writable"):
            self.engine.decode_paged(**dict(args, lse=memoryview(bytes(24)).cast("f")))
        strided = memoryview(array.array("f", [0.0] * (4 * H_Q * D_QK)))[::2]
        with self.assertRaisesRegex(ValueError, "^q must be C-contiguous"):
            self.engine.decode_paged(**dict(args, q=strided))
        strided_out = memoryview(array.array("f", [0.0] * (4 * 2 * H_Q * 48)))[::2]
        with self.assertRaisesRegex(ValueError, "^out must be C-contiguous"):
            self.engine.decode_paged(**dict(args, out=strided_out))

    def test_h_q_0_is_the_library_invalid_argument_naming_h_q(self):
        e = self.assert_lib_error("INVALID_ARGUMENT", "h_q", self.engine.decode_paged, **self.dense_args(h_q=0))
        self.assertIsInstance(e, Exception)
        self.assertEqual(e.function, "mlart_decode_paged")
        self.assertEqual(e.message, str(e))
        self.assertIn("INVALID_ARGUMENT", repr(e))

    def test_block_id_outside_the_cache_is_the_library_invalid_argument(self):
        args = self.dense_args()
        bt = array.array("i", args["block_table"])
        bt[0] = args["num_blocks"]  # within seq 0's length
        out = array.array("f", [-7.0] * (2 * H_Q * 48))
        self.assert_lib_error("INVALID_ARGUMENT", "block_table", self.engine.decode_paged,
                              **dict(args, block_table=bt, out=out))
        self.assertEqual(set(out), {-7.0}, "a failed decode wrote its output")
        # The binding lets go of the buffers although a kept traceback keeps its frames.
        try:
            self.engine.decode_paged(**dict(args, block_table=bt, out=out))
        except mlart.MlartError as err:
            saved = err
        self.assertIsNotNone(saved.__traceback__.tb_next)
        out.append(0.0)
        bt.append(0)
        args["q"].append(0.0)
        kv = args["kv"]
        kv += b"\0"  # bytearray resize
        with self.assertRaisesRegex(ValueError, "^q has 383 elements"):
            self.engine.decode_paged(**dict(args, q=shorten(args["q"])[:-1]))
        args["q"].append(0.0)  # released after a Python-side error too

    def test_bad_enum_values_reach_the_library_which_names_them(self):
        self.assert_lib_error("INVALID_ARGUMENT", "kv_format", self.engine.decode_paged,
                              **self.dense_args(kv_format=99, kv=bytearray(1 << 16)))
        self.assert_lib_error("INVALID_ARGUMENT", "format", mlart.kv_row_bytes, 99, 64)
        self.assert_lib_error("INVALID_ARGUMENT", "thread_affinity = 7", mlart.Engine, thread_affinity=7)


class PoolErrorsTest(unittest.TestCase):
    def setUp(self):
        self.engine = mlart.Engine("cpu")
        self.addCleanup(self.engine.close)

    def test_short_buffers_and_duplicate_or_missing_ids(self):
        with mlart.KvPool(self.engine, kv_format="bf16", d_qk=D_QK, block_size=BLOCK, num_blocks=8) as pool:
            pool.create_seq(5)
            with self.assertRaises(mlart.MlartError) as cm:
                pool.create_seq(5)
            self.assertEqual((cm.exception.code, cm.exception.status), ("INVALID_ARGUMENT", mlart.Status.INVALID_ARGUMENT))
            self.assertIn("seq_id", str(cm.exception))
            self.assertEqual(cm.exception.function, "mlart_kv_seq_create")
            with self.assertRaises(mlart.MlartError) as cm:
                pool.fork_seq(5, 5)
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
            for call in (lambda: pool.free_seq(6), lambda: pool.fork_seq(6, 7), lambda: pool.truncate_seq(6, 0),
                         lambda: pool.append(6, 0, array.array("f", bytes(4 * D_QK)))):
                with self.assertRaises(mlart.MlartError) as cm:
                    call()
                self.assertEqual(cm.exception.code, "NOT_FOUND")
            with self.assertRaisesRegex(ValueError, "^rows has 65 elements, not a multiple of the pool's d_qk = 64"):
                pool.append(5, 0, array.array("f", bytes(4 * (D_QK + 1))))
            with self.assertRaisesRegex(ValueError, r"^rows has 127 elements but rows \[n_tokens=2, d_qk=64\] needs 128"):
                pool.append(5, 0, array.array("f", bytes(4 * (2 * D_QK - 1))), n_tokens=2)
            with self.assertRaisesRegex(TypeError, "^rows must be a float32, float16 or uint16"):
                pool.append(5, 0, array.array("d", [0.0] * D_QK))
            with self.assertRaises(mlart.MlartError) as cm:
                pool.append(5, 3, array.array("f", bytes(4 * D_QK)))
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
            self.assertIn("layer", str(cm.exception))
            with self.assertRaises(mlart.MlartError) as cm:
                pool.truncate_seq(5, -1)
            self.assertIn("length", str(cm.exception))
            with self.assertRaisesRegex(ValueError, "^length = 9223372036854775808 does not fit in int64_t"):
                pool.truncate_seq(5, 1 << 63)
            self.assertEqual(pool.seq_length(5), 0)
            pool.append(5, 0, array.array("f", bytes(4 * 2 * D_QK)))
            ok = dict(seq_ids=[5, 5], h_q=H_Q, d_v=48, q=array.array("f", bytes(4 * 2 * H_Q * D_QK)),
                      out=array.array("f", bytes(4 * 2 * H_Q * 48)), lse=array.array("f", bytes(4 * 2 * H_Q)))
            pool.decode(**ok)
            for name in ["q", "out", "lse"]:
                with self.assertRaisesRegex(ValueError, "^%s has " % name, msg="short %s" % name):
                    pool.decode(**dict(ok, **{name: shorten(ok[name])}))
            with self.assertRaisesRegex(ValueError, "^attn_sink has 2 elements"):
                pool.decode(**dict(ok, attn_sink=array.array("f", [0.0, 0.0])))
            with self.assertRaisesRegex(ValueError, "^indices has 3 elements"):
                pool.decode(**dict(ok, indices=[0, 1, 0], topk=2))
            with self.assertRaises(mlart.MlartError) as cm:
                pool.decode(**dict(ok, h_q=0))
            self.assertIn("h_q", str(cm.exception))
            with self.assertRaises(mlart.MlartError) as cm:
                pool.decode(**dict(ok, seq_ids=[5, 9]))
            self.assertEqual(cm.exception.code, "NOT_FOUND")
            self.assertEqual(cm.exception.function, "mlart_kv_pool_decode")
            with self.assertRaises(mlart.MlartError) as cm:
                pool.decode(**dict(ok, indices=[0, 5, 0, 0], topk=2))  # position 5 of a 2-token sequence
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")

    def test_pool_options_are_the_library_to_reject(self):
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.KvPool(self.engine, d_qk=D_QK)  # num_blocks defaults to 0
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("num_blocks", str(cm.exception))
        self.assertEqual(cm.exception.function, "mlart_kv_pool_create")
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.KvPool(self.engine, kv_format=42, num_blocks=1)
        self.assertIn("kv_format", str(cm.exception))
        with self.assertRaisesRegex(TypeError, "^engine must be an Engine, got dict"):
            mlart.KvPool({}, num_blocks=1)

    def test_kv_quantize_and_dequantize_check_their_buffers(self):
        rows = array.array("f", bytes(4 * 3 * 8))
        with self.assertRaisesRegex(ValueError, r"^dst has 63 bytes but ceil\(n_tokens=3 / block_size=2\) blocks of 32 bytes needs 64"):
            mlart.kv_quantize("bf16", 8, 2, rows, dst=bytearray(63))
        with self.assertRaisesRegex(TypeError, "^dst must be writable"):
            mlart.kv_quantize("bf16", 8, 2, rows, dst=bytes(64))
        with self.assertRaisesRegex(ValueError, "^rows has 24 elements, not a multiple of d_qk = 7"):
            mlart.kv_quantize("bf16", 7, 2, rows)
        with self.assertRaisesRegex(ValueError, r"^src has 63 bytes but ceil\(n_tokens=3 / block_size=2\) blocks of 32 bytes needs 64"):
            mlart.kv_dequantize("bf16", 8, 2, 3, bytearray(63))
        with self.assertRaisesRegex(ValueError, r"^out has 23 elements but out \[n_tokens=3, d_qk=8\] needs 24"):
            mlart.kv_dequantize("bf16", 8, 2, 3, bytes(64), out=array.array("f", bytes(4 * 23)))
        with self.assertRaisesRegex(ValueError, "^dtype must be 'f32', 'bf16' or 'f16'"):
            mlart.kv_dequantize("bf16", 8, 2, 3, bytes(64), dtype="fp8_e4m3")
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.kv_block_bytes("fp8_v32", 64, 4)  # FP8_V32 rows are 576 wide
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("d_qk", str(cm.exception))


class ClosedHandlesTest(unittest.TestCase):
    def test_every_method_of_a_closed_handle_raises_closed_error(self):
        engine = mlart.Engine("cpu", num_threads=1)
        pool = mlart.KvPool(engine, kv_format="f32", d_qk=16, block_size=4, num_blocks=4)
        pool.close()
        engine.close()
        self.assertTrue(issubclass(mlart.ClosedError, ValueError))
        for call in (
            engine.info,
            lambda: engine.decode_paged(batch=1, h_q=1, d_qk=64, d_v=64, q=None, kv=None,
                                        num_blocks=1, block_size=1),
            lambda: mlart.KvPool(engine, num_blocks=4),
            lambda: mlart.Model.load(engine, "/nonexistent"),
        ):
            with self.assertRaisesRegex(mlart.ClosedError, "^mlart: this Engine is closed$"):
                call()
        for call in (
            pool.stats, lambda: pool.create_seq(1), lambda: pool.free_seq(1), lambda: pool.fork_seq(1, 2),
            lambda: pool.truncate_seq(1, 0), lambda: pool.seq_length(1),
            lambda: pool.append(1, 0, None),
            lambda: pool.decode(seq_ids=[1], h_q=1, d_v=16, q=None),
        ):
            with self.assertRaisesRegex(mlart.ClosedError, "^mlart: this KvPool is closed$"):
                call()
        self.assertEqual(repr(pool), "<mlart.KvPool closed>")

    def test_model_is_not_constructed_directly(self):
        with self.assertRaisesRegex(TypeError, "use Model.load"):
            mlart.Model(None, 1)


if __name__ == "__main__":
    unittest.main()
