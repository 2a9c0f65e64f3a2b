"""Model: load the tiny checkpoints, forward on a pool, the V3.2 indexer,
load progress."""

import array
import math
import os
import pathlib
import tempfile
import unittest

import testlib
import mlart
from testlib import reference as R

NAN = float("nan")


def nans(n):
    return array.array("f", [NAN] * n)


def rel(a, b):
    num = sum((x - y) ** 2 for x, y in zip(a, b))
    den = sum(y * y for y in b)
    return math.sqrt(num / den)


class ModelTest(testlib.EngineTestCase):
    def test_load_info_and_forward_on_a_pool(self):
        model_dir = testlib.model_dir()
        model = mlart.Model.load(self.engine, model_dir, first_layer=0, num_layers=2)
        info = model.info()
        self.assertIsInstance(info, mlart.ModelInfo)
        self.assertEqual((info.num_layers, info.first_layer, info.loaded_layers), (2, 0, 2))
        self.assertEqual((info.hidden_size, info.num_heads, info.kv_lora_rank, info.qk_rope_head_dim), (256, 4, 64, 16))
        self.assertEqual(info.d_qk, info.kv_lora_rank + info.qk_rope_head_dim)
        self.assertEqual(info.weight_dtype, mlart.DType.BF16)
        self.assertEqual(info.activations, mlart.Activations.PRECISE)
        self.assertIn(info.projection_isa, (mlart.CpuIsa.SCALAR, mlart.CpuIsa.AVX2, mlart.CpuIsa.AVX512,
                                            mlart.CpuIsa.AVX512_BF16))
        self.assertGreater(info.bytes_loaded, 0)
        self.assertGreater(info.softmax_scale, 0)
        self.assertTrue(info.yarn)  # the harness's checkpoints have rope_scaling
        self.assertGreater(info.yarn_factor, 1)
        self.assertEqual((info.index_n_heads, info.index_head_dim, info.index_topk), (0, 0, 0))
        self.assertIs(info.projections_on_gpu, False)
        self.assertEqual(info.kept_keys_bytes, 1073741824)  # the default: 1 GiB

        hidden = info.hidden_size
        pool = mlart.KvPool(self.engine, d_qk=info.d_qk, num_layers=info.loaded_layers, block_size=16, num_blocks=8)
        try:
            rand = R.rng(31)
            x = R.random_f32(3 * hidden, rand)

            def forward(sid, inp):
                pool.create_seq(sid)
                out = nans(3 * hidden)
                r = model.forward(pool, layer=0, seq_ids=[sid], n_tokens=array.array("i", [3]), x=inp, out=out)
                self.assertIs(r, out)
                self.assertEqual(pool.seq_length(sid, 0), 3)
                self.assertEqual(pool.seq_length(sid, 1), 0)
                return out

            out1 = forward(1, x)
            self.assertTrue(all(math.isfinite(v) for v in out1), "non-finite output")
            self.assertTrue(any(v != 0 for v in out1), "all-zero output")
            out2 = forward(2, x)  # same input, same positions: same output
            self.assertEqual(list(out2), list(out1))
            x3 = array.array("f", x)
            for i in range(hidden):
                x3[2 * hidden + i] += 0.5  # change the last token only
            out3 = forward(3, x3)
            self.assertGreater(sum(abs(out3[2 * hidden + i] - out1[2 * hidden + i]) for i in range(hidden)), 1e-3,
                               "output did not change with the input")
            # Causal: the first two tokens do not see the third.
            self.assertEqual(list(out3[:2 * hidden]), list(out1[:2 * hidden]))

            # Bf16 activations reach the library: close to the precise output, not equal.
            with mlart.Model.load(self.engine, pathlib.Path(model_dir), activations="bf16") as rounded:
                self.assertEqual(rounded.info().activations, mlart.Activations.BF16)
                pool.create_seq(4)
                out4 = rounded.forward(pool, layer=0, seq_ids=[4], n_tokens=[3], x=x)
                d = rel(out4, out1)
                self.assertTrue(1e-5 < d < 1e-2, "bf16 activations vs precise: rel-L2 %g" % d)
            with self.assertRaisesRegex(ValueError, "^activations = 'fp8' is not one of 'precise', 'bf16'"):
                mlart.Model.load(self.engine, model_dir, activations="fp8")
            with self.assertRaises(mlart.MlartError) as cm:
                mlart.Model.load(self.engine, model_dir, activations=9)
            self.assertIn("activations = 9", str(cm.exception))

            # A decode step continues the positions; bf16 input and an allocated output.
            step = model.forward(pool, layer=0, seq_ids=1, n_tokens=1,
                                 x=mlart.f32_to_bf16(R.random_f32(hidden, rand)), x_dtype="bf16")
            self.assertEqual((step.typecode, len(step)), ("f", hidden))
            self.assertTrue(all(math.isfinite(v) for v in step))
            self.assertEqual(pool.seq_length(1, 0), 4)
            step16 = model.forward(pool, layer=0, seq_ids=[1], n_tokens=[1], x=x[:hidden], out_dtype="bf16")
            self.assertEqual((step16.typecode, len(step16)), ("H", hidden))

            # Short buffers are caught in Python; a layer not loaded is the library's error.
            with self.assertRaisesRegex(ValueError, r"^x has 511 elements but x \[sum\(n_tokens\)=2, hidden_size=256\] needs 512$"):
                model.forward(pool, layer=0, seq_ids=[1], n_tokens=[2], x=array.array("f", bytes(4 * (2 * hidden - 1))))
            with self.assertRaisesRegex(ValueError, "^out has 256 elements"):
                model.forward(pool, layer=0, seq_ids=[1], n_tokens=[2], x=array.array("f", bytes(8 * hidden)),
                              out=array.array("f", bytes(4 * hidden)))
            with self.assertRaisesRegex(ValueError, r"^n_tokens has 1 elements but n_tokens \[batch=2\] needs 2"):
                model.forward(pool, layer=0, seq_ids=[1, 2], n_tokens=[1], x=array.array("f", bytes(8 * hidden)))
            with self.assertRaisesRegex(TypeError, "^out must be writable"):
                model.forward(pool, layer=0, seq_ids=[1], n_tokens=[1], x=x[:hidden], out=memoryview(bytes(4 * hidden)).cast("f"))
            with self.assertRaisesRegex(TypeError, "^pool must be a KvPool"):
                model.forward(None, layer=0, seq_ids=[1], n_tokens=[1], x=x[:hidden])
            with self.assertRaises(mlart.MlartError) as cm:
                model.forward(pool, layer=5, seq_ids=[1], n_tokens=[1], x=x[:hidden])
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
            self.assertIn("layer", str(cm.exception))
            self.assertEqual(cm.exception.function, "mlart_model_forward")
            with self.assertRaises(mlart.MlartError) as cm:
                model.forward(pool, layer=0, seq_ids=[77], n_tokens=[1], x=x[:hidden])
            self.assertEqual(cm.exception.code, "NOT_FOUND")
            # No indexer: index_out, and a pool with indexer keys, are the library's errors.
            with self.assertRaises(mlart.MlartError) as cm:
                model.forward(pool, layer=0, seq_ids=[1], n_tokens=[1], x=x[:hidden], index_out=array.array("i", [0] * 8))
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
            self.assertIn("index_out", str(cm.exception))
            with mlart.KvPool(self.engine, d_qk=info.d_qk, num_layers=2, block_size=16, num_blocks=2,
                              index_head_dim=32) as keyed:
                keyed.create_seq(1)
                with self.assertRaises(mlart.MlartError) as cm:
                    model.forward(keyed, layer=0, seq_ids=[1], n_tokens=[1], x=x[:hidden])
                self.assertIn("index_head_dim", str(cm.exception))
            self.assertEqual(pool.seq_length(1, 0), 5, "a failed forward changed the pool")
        finally:
            pool.close()
            model.close()
            model.close()
        with self.assertRaisesRegex(mlart.ClosedError, "this Model is closed"):
            model.info()
        with self.assertRaisesRegex(mlart.ClosedError, "this Model is closed"):
            model.forward(pool, layer=0, seq_ids=[1], n_tokens=[1], x=x[:hidden])

    def test_forward_on_a_closed_pool_raises(self):
        with mlart.Model.load(self.engine, testlib.model_dir(), num_layers=1) as model:
            pool = mlart.KvPool(self.engine, d_qk=model.info().d_qk, num_blocks=2)
            pool.close()
            with self.assertRaisesRegex(mlart.ClosedError, "this KvPool is closed"):
                model.forward(pool, layer=0, seq_ids=[1], n_tokens=[1], x=array.array("f", bytes(4 * 256)))

    def test_decoding_token_by_token_equals_the_prefill(self):
        # An F32 pool keeps the attention in f32: one forward of 5 tokens and
        # five forwards of one give the same rows, up to the GEMM's order of sums.
        with mlart.Model.load(self.engine, testlib.model_dir()) as model:
            info = model.info()
            hidden = info.hidden_size
            with mlart.KvPool(self.engine, kv_format="f32", d_qk=info.d_qk, num_layers=2, block_size=4,
                              num_blocks=16) as pool:
                x = R.random_f32(5 * hidden, R.rng(33))
                pool.create_seq(1)
                pool.create_seq(2)
                prefill = model.forward(pool, layer=1, seq_ids=[1], n_tokens=5, x=x)
                steps = array.array("f")
                for t in range(5):
                    steps += model.forward(pool, layer=1, seq_ids=[2], n_tokens=1, x=x[t * hidden:(t + 1) * hidden])
                self.assertEqual((pool.seq_length(1, 1), pool.seq_length(2, 1)), (5, 5))
                d = rel(steps, prefill)
                self.assertLess(d, 1e-4, "token by token vs prefill: rel-L2 %g" % d)
                # Both sequences in one batched step: the same as each alone.
                pool.create_seq(3)
                model.forward(pool, layer=1, seq_ids=[3], n_tokens=4, x=x[:4 * hidden])
                extra = R.random_f32(hidden, R.rng(34))
                both = model.forward(pool, layer=1, seq_ids=[1, 3], n_tokens=[1, 1], x=extra + x[4 * hidden:])
                alone = model.forward(pool, layer=1, seq_ids=[2], n_tokens=[1], x=extra)
                self.assertLess(rel(both[:hidden], alone), 1e-4)

    def test_gpu_projections_is_accepted_and_ignored_by_a_cpu_engine(self):
        model_dir = testlib.model_dir()
        with mlart.Model.load(self.engine, model_dir) as base, \
                mlart.KvPool(self.engine, d_qk=base.info().d_qk, num_layers=2, block_size=16, num_blocks=16) as pool:
            hidden = base.info().hidden_size
            x = R.random_f32(2 * hidden, R.rng(41))
            ids = iter(range(1, 100))

            def forward(model):
                sid = next(ids)
                pool.create_seq(sid)
                return list(model.forward(pool, layer=1, seq_ids=[sid], n_tokens=[2], x=x))

            want = forward(base)
            for gp in (True, False, None, -1, 0, 1):
                with mlart.Model.load(self.engine, model_dir, gpu_projections=gp) as model:
                    self.assertIs(model.info().projections_on_gpu, False, "gpu_projections %r" % gp)
                    self.assertEqual(forward(model), want, "gpu_projections %r changed the output" % gp)
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.Model.load(self.engine, model_dir, gpu_projections=2)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("gpu_projections = 2", str(cm.exception))
        with self.assertRaisesRegex(TypeError, "^gpu_projections must be a bool"):
            mlart.Model.load(self.engine, model_dir, gpu_projections="gpu")
        with self.assertRaisesRegex(TypeError, "^gpu_projections must be an integer"):
            mlart.Model.load(self.engine, model_dir, gpu_projections=0.5)

    def test_kept_keys_bytes_is_in_info_and_keeps_the_output(self):
        model_dir = testlib.model_dir()
        gib = 1 << 30
        for value, want in ((None, gib), (0, gib), (1, 1), (5 << 20, 5 << 20), (3 * gib, 3 * gib),
                            ((1 << 64) - 1, (1 << 64) - 1)):
            with mlart.Model.load(self.engine, model_dir, kept_keys_bytes=value) as model:
                self.assertEqual(model.info().kept_keys_bytes, want, "kept_keys_bytes %r" % (value,))

        # Past 512 new tokens a forward runs in passes; keeping no keys
        # between them up-projects the earlier positions again: the same
        # attention.
        ntok = 600
        with mlart.Model.load(self.engine, model_dir) as base, \
                mlart.Model.load(self.engine, model_dir, kept_keys_bytes=1) as none, \
                mlart.KvPool(self.engine, d_qk=base.info().d_qk, num_layers=2, block_size=64, num_blocks=64) as pool:
            x = R.random_f32(ntok * base.info().hidden_size, R.rng(43))
            pool.create_seq(1)
            want = base.forward(pool, layer=1, seq_ids=[1], n_tokens=[ntok], x=x)
            pool.create_seq(2)
            got = none.forward(pool, layer=1, seq_ids=[2], n_tokens=[ntok], x=x)
            self.assertLess(rel(got, want), 1e-6, "kept_keys_bytes=1 changed a %d-token prompt" % ntok)

        for bad in (-1, 1 << 64):
            with self.assertRaisesRegex(ValueError, "^kept_keys_bytes = %d is outside the uint64_t range$" % bad):
                mlart.Model.load(self.engine, model_dir, kept_keys_bytes=bad)
        for bad in (0.5, "1GiB", True):
            with self.assertRaisesRegex(TypeError, "^kept_keys_bytes must be a non-negative integer, got "):
                mlart.Model.load(self.engine, model_dir, kept_keys_bytes=bad)

    def test_convert_weights_and_layer_range(self):
        model_dir = testlib.model_dir()
        with mlart.Model.load(self.engine, model_dir, convert_weights=True, weight_dtype="f32",
                              first_layer=1, num_layers=1) as model:
            info = model.info()
            self.assertEqual(info.weight_dtype, mlart.DType.F32)
            self.assertEqual((info.first_layer, info.loaded_layers), (1, 1))
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.Model.load(self.engine, model_dir, first_layer=7)
        self.assertEqual(cm.exception.function, "mlart_model_load")
        with self.assertRaisesRegex(ValueError, "NUL byte"):
            mlart.Model.load(self.engine, model_dir + "\0x")
        with self.assertRaisesRegex(TypeError, "^dir must be a str or os.PathLike, got int"):
            mlart.Model.load(self.engine, 3)
        with self.assertRaisesRegex(TypeError, "^engine must be an Engine"):
            mlart.Model.load(None, model_dir)

    def test_a_missing_directory_is_an_mlart_error_with_the_library_status(self):
        d = os.path.join(tempfile.gettempdir(), "mlart-no-such-model-%d" % os.getpid())
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.Model.load(self.engine, d)
        e = cm.exception
        self.assertIn(e.code, ("IO", "NOT_FOUND"))
        self.assertEqual(e.status, mlart.Status[e.code])
        self.assertIn(d, e.message)
        self.assertIn("config.json", e.message)

    def test_load_progress_is_reported_false_cancels_an_exception_propagates(self):
        model_dir = testlib.model_dir()
        seen = []
        model = mlart.Model.load(self.engine, model_dir, num_layers=1, progress=lambda f, s: seen.append((f, s)))
        model.close()
        self.assertGreater(len(seen), 0)
        self.assertEqual(seen[-1][0], 1.0)
        fractions = [f for f, _ in seen]
        self.assertEqual(fractions, sorted(fractions), "progress fractions not monotone")
        for f, s in seen:
            self.assertTrue(0.0 <= f <= 1.0)
            self.assertIsInstance(s, str)
            self.assertGreater(len(s), 0)

        calls = []

        def cancel(f, s):
            calls.append(f)
            return False

        with self.assertRaises(mlart.MlartError) as cm:
            mlart.Model.load(self.engine, model_dir, progress=cancel)
        self.assertEqual((cm.exception.code, cm.exception.status), ("CANCELLED", mlart.Status.CANCELLED))
        self.assertEqual(len(calls), 1, "the load went on after a cancel")
        # Truthy values and None continue.
        with mlart.Model.load(self.engine, model_dir, progress=lambda f, s: 1):
            pass

        boom = RuntimeError("boom")
        calls.clear()
        before = mlart.handle_stats()

        def explode(f, s):
            calls.append(f)
            raise boom

        with self.assertRaises(RuntimeError) as cm:
            mlart.Model.load(self.engine, model_dir, progress=explode)
        self.assertIs(cm.exception, boom)
        self.assertEqual(len(calls), 1, "the load went on after the callback raised")
        self.assertEqual(mlart.handle_stats()["created"], before["created"], "a model was made")

        # Raised on the last call (after the last tensor): the half-made model
        # is freed and the exception still propagates.
        last = []

        def explode_at_end(f, s):
            last.append(f)
            if f >= 1.0:
                raise KeyError("at the end")

        with self.assertRaises(KeyError):
            mlart.Model.load(self.engine, model_dir, progress=explode_at_end)
        self.assertEqual(last[-1], 1.0)
        self.assertEqual(mlart.handle_stats()["created"], before["created"])
        with self.assertRaisesRegex(TypeError, "^progress must be callable"):
            mlart.Model.load(self.engine, model_dir, progress=3)


class CheckpointEnvironmentTest(unittest.TestCase):
    def test_a_missing_checkpoint_variable_fails_saying_how_to_set_it(self):
        from unittest import mock

        with mock.patch.dict(os.environ):
            os.environ.pop("MLART_TEST_MODEL_DIR", None)
            with self.assertRaisesRegex(AssertionError, "MLART_TEST_MODEL_DIR is not set: generate one with "
                                        "`./target/release/mlart gen-model --preset tiny --layers 2"):
                testlib.model_dir()
            os.environ["MLART_TEST_MODEL_V32_DIR"] = tempfile.gettempdir()
            with self.assertRaisesRegex(AssertionError, "holds no config.json: .*--preset tiny-v3.2"):
                testlib.model_v32_dir()


def check_selection(test, sel, first, topk):
    """Rows of index_out for tokens at positions first..: a token at p < topk
    attends to 0..p then -1; a later one to topk ascending positions in [0, p]."""
    for r in range(len(sel) // topk):
        p = first + r
        row = list(sel[r * topk:(r + 1) * topk])
        if p < topk:
            test.assertEqual(row, [j if j <= p else -1 for j in range(topk)], "position %d" % p)
        else:
            test.assertTrue(all(0 <= v <= p for v in row) and row == sorted(set(row)),
                            "position %d: %s" % (p, row))


class ModelV32Test(testlib.EngineTestCase):
    def test_indexer_info_pool_index_head_dim_and_index_out(self):
        model = mlart.Model.load(self.engine, testlib.model_v32_dir())
        self.addCleanup(model.close)
        info = model.info()
        self.assertEqual((info.index_n_heads, info.index_head_dim, info.index_topk, info.d_qk), (4, 32, 8, 80))
        hidden, topk = info.hidden_size, info.index_topk
        opts = dict(d_qk=info.d_qk, num_layers=info.loaded_layers, block_size=4, num_blocks=16)
        plain = mlart.KvPool(self.engine, **opts)
        self.addCleanup(plain.close)
        pool = mlart.KvPool(self.engine, index_head_dim=info.index_head_dim, **opts)
        self.addCleanup(pool.close)
        n = 13  # past top-8: the last 5 tokens attend sparsely
        x = R.random_f32((n + 1) * hidden, R.rng(32))
        prefill = x[:n * hidden]
        plain.create_seq(1)
        pool.create_seq(1)
        with self.assertRaises(mlart.MlartError) as cm:
            model.forward(plain, layer=0, seq_ids=[1], n_tokens=[n], x=prefill)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("index_head_dim", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            model.forward(pool, layer=0, seq_ids=[1], n_tokens=[n], x=prefill, index_out=array.array("i", [0] * (n * topk - 1)))
        self.assertEqual(
            str(cm.exception),
            "index_out has %d elements but index_out [sum(n_tokens)=%d, index_topk=%d] needs %d"
            % (n * topk - 1, n, topk, n * topk),
        )
        with self.assertRaisesRegex(TypeError, "^index_out must be a writable int32 buffer"):
            model.forward(pool, layer=0, seq_ids=[1], n_tokens=[n], x=prefill, index_out=[0] * (n * topk))
        with self.assertRaisesRegex(TypeError, "^index_out must be writable"):
            model.forward(pool, layer=0, seq_ids=[1], n_tokens=[n], x=prefill,
                          index_out=memoryview(bytes(4 * n * topk)).cast("i"))
        self.assertEqual(pool.seq_length(1), 0, "a failed forward changed the pool")

        sel = array.array("i", [12345] * (n * topk))
        out = model.forward(pool, layer=0, seq_ids=[1], n_tokens=[n], x=prefill, index_out=sel)
        self.assertTrue(all(math.isfinite(v) for v in out), "non-finite output")
        check_selection(self, sel, 0, topk)

        # index_out only reports: the same tokens without it give the same output.
        pool.create_seq(2)
        self.assertEqual(list(model.forward(pool, layer=0, seq_ids=[2], n_tokens=[n], x=prefill)), list(out))

        step = array.array("i", [0] * topk)
        model.forward(pool, layer=0, seq_ids=[1], n_tokens=1, x=x[n * hidden:], index_out=step)
        check_selection(self, step, n, topk)
        self.assertEqual(pool.seq_length(1), n + 1)

        # Token by token, sequence 3 selects the same positions as the prefill.
        pool.create_seq(3)
        by_token = array.array("i")
        for t in range(n):
            one = array.array("i", [0] * topk)
            model.forward(pool, layer=0, seq_ids=[3], n_tokens=[1], x=x[t * hidden:(t + 1) * hidden], index_out=one)
            by_token += one
        self.assertEqual(list(by_token), list(sel))


if __name__ == "__main__":
    unittest.main()
