"""Engine, free functions, library lookup and handle lifetime."""

import array
import gc
import os
import re
import subprocess
import sys
import unittest

import testlib
import mlart
from mlart import _ffi


class EngineTest(unittest.TestCase):
    def test_version_and_abi(self):
        self.assertRegex(mlart.version(), r"^\d+\.\d+\.\d+$")
        self.assertEqual(mlart.abi_version(), mlart.ABI_VERSION)
        self.assertEqual(mlart.ABI_VERSION, 0)
        self.assertTrue(os.path.isfile(mlart.LIBRARY_PATH))

    def test_cpu_engine_info(self):
        with mlart.Engine.create("cpu", num_threads=2) as engine:
            info = engine.info()
            self.assertIsInstance(info, mlart.EngineInfo)
            self.assertEqual(info.backend, mlart.Backend.CPU)
            self.assertIsInstance(info.backend, mlart.Backend)
            self.assertEqual(info.num_threads, 2)
            self.assertEqual(info.device_index, 0)
            self.assertIsInstance(info.cpu_isa, mlart.CpuIsa)
            self.assertIsInstance(info.device_name, str)
            self.assertIsInstance(info.cpu_features, str)
            self.assertGreater(len(info.reason), 0, "reason is empty")
            self.assertNotIn("\0", info.reason)
            self.assertIn(info.cpu_isa.name.lower().replace("_", ""), info.reason)
            self.assertGreater(len(info.thread_placement), 0, "thread_placement is empty")
        self.assertTrue(engine.closed)

    def test_thread_affinity_option(self):
        with mlart.Engine(mlart.Backend.CPU, num_threads=2, thread_affinity="none") as engine:
            self.assertEqual(engine.info().thread_placement, "not pinned (affinity NONE)")
        with mlart.Engine("cpu", num_threads=1, thread_affinity=mlart.ThreadAffinity.NONE) as engine:
            self.assertEqual(engine.info().thread_placement, "not pinned (affinity NONE)")
        with self.assertRaisesRegex(ValueError, "^thread_affinity = 'everywhere' is not one of 'auto', 'none', 'pin'"):
            mlart.Engine(thread_affinity="everywhere")
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.Engine(thread_affinity=7)
        self.assertIn("thread_affinity = 7", str(cm.exception))

    def test_default_options(self):
        engine = mlart.Engine()
        self.assertNotEqual(engine.info().backend, mlart.Backend.AUTO)
        engine.close()

    def test_close_twice_is_safe_and_a_closed_engine_raises(self):
        engine = mlart.Engine("cpu")
        self.assertFalse(engine.closed)
        self.assertEqual(repr(engine), "<mlart.Engine open>")
        engine.close()
        engine.close()
        self.assertTrue(engine.closed)
        with self.assertRaisesRegex(mlart.ClosedError, "closed"):
            engine.info()
        with self.assertRaisesRegex(mlart.ClosedError, "closed"):
            mlart.KvPool(engine, num_blocks=4)

    def test_a_pool_outlives_the_engine_it_was_made_from(self):
        engine = mlart.Engine("cpu")
        pool = mlart.KvPool(engine, kv_format="f32", d_qk=16, block_size=4, num_blocks=4)
        engine.close()
        del engine
        gc.collect()
        pool.create_seq(1)
        pool.append(1, 0, array.array("f", [1.0] * 16))
        r = pool.decode(seq_ids=[1], h_q=2, d_v=16, q=array.array("f", [0.0] * 32))
        self.assertEqual(list(r.out), [1.0] * 32)
        pool.close()

    def test_unknown_backend_name_is_value_error_unknown_number_the_library_error(self):
        with self.assertRaisesRegex(ValueError, "^backend = 'tpu' is not one of 'auto', 'cpu', 'cuda'"):
            mlart.Engine(backend="tpu")
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.Engine(backend=77)
        e = cm.exception
        self.assertEqual((e.code, e.status, e.function), ("INVALID_ARGUMENT", mlart.Status.INVALID_ARGUMENT,
                                                          "mlart_engine_create"))
        self.assertIn("backend = 77", e.message)
        with self.assertRaisesRegex(TypeError, "^num_threads must be an integer"):
            mlart.Engine("cpu", num_threads="2")

    def test_device_count_and_device_info(self):
        n = mlart.device_count()
        self.assertIsInstance(n, int)
        self.assertGreaterEqual(n, 0)
        if n == 0:
            with self.assertRaises(mlart.MlartError) as cm:
                mlart.device_info(0)
            self.assertIn(cm.exception.code, ("UNSUPPORTED", "NOT_FOUND"))
            self.assertEqual(cm.exception.function, "mlart_device_info")
        else:
            d = mlart.device_info(0)
            self.assertIsInstance(d.name, str)
            self.assertGreater(d.total_memory, 0)
            self.assertEqual(d.device_index, 0)
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.device_info(n + 5)
        self.assertIn(cm.exception.code, ("UNSUPPORTED", "NOT_FOUND"))

    def test_kv_row_bytes_and_kv_block_bytes(self):
        self.assertEqual(mlart.kv_row_bytes("bf16", 576), 1152)
        self.assertEqual(mlart.kv_row_bytes("F32", 64), 256)
        self.assertEqual(mlart.kv_row_bytes(mlart.KvFormat.FP8_V32, 576), 656)
        self.assertEqual(mlart.kv_row_bytes(mlart.KvFormat.FP8_MODEL1, 512), 584)
        self.assertEqual(mlart.kv_block_bytes("f32", 64, 7), 7 * 256)
        self.assertEqual(mlart.kv_block_bytes("fp8_model1", 512, 64), 64 * 584 + (-(64 * 584) % 576))
        with self.assertRaises(mlart.MlartError) as cm:
            mlart.kv_row_bytes(99, 64)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("format", str(cm.exception))

    def test_status_name_and_constants(self):
        self.assertEqual(mlart.Status.INVALID_ARGUMENT, 1)
        self.assertEqual(mlart.Status.INTERNAL, 11)
        self.assertEqual((mlart.DType.F32, mlart.DType.BF16, mlart.DType.F16, mlart.DType.FP8_E4M3), (0, 1, 2, 3))
        self.assertEqual([int(f) for f in mlart.KvFormat], [0, 1, 2, 3, 4])
        self.assertEqual((mlart.Memory.HOST, mlart.Memory.DEVICE), (0, 1))
        self.assertEqual((mlart.Backend.AUTO, mlart.Backend.CPU, mlart.Backend.CUDA), (0, 1, 2))
        self.assertEqual((mlart.CpuIsa.SCALAR, mlart.CpuIsa.AMX, mlart.CpuIsa.AVX512_BF16), (0, 3, 4))
        self.assertRegex(mlart.status_name(mlart.Status.POOL_EXHAUSTED), re.compile("pool|exhaust", re.I))
        self.assertEqual(mlart.status_name(1), "invalid argument")
        with self.assertRaisesRegex(ValueError, "^status = -1 does not fit in uint32_t"):
            mlart.status_name(-1)
        err = mlart.MlartError(99, "odd")
        self.assertEqual((err.code, err.status), ("STATUS_99", 99))

    def test_abi_mismatch_is_a_clear_error(self):
        _ffi.check_abi(0)
        with self.assertRaisesRegex(ImportError, "has ABI version 1 but this binding was written for 0"):
            _ffi.check_abi(1)
        self.assertTrue(issubclass(mlart.LibraryError, ImportError))

    def run_python(self, code, **env):
        full = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **env)
        return subprocess.run(
            [sys.executable, "-c", code], cwd=testlib.PACKAGE_ROOT, env=full,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
        )

    def test_a_missing_library_is_a_clear_error_naming_both_paths(self):
        r = self.run_python("import mlart", MLART_LIBRARY="/nonexistent/libmlart.so")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("mlart.LibraryError", r.stderr)
        self.assertIn("MLART_LIBRARY=/nonexistent/libmlart.so does not exist", r.stderr)
        self.assertIn("target/release/libmlart.so", r.stderr)
        self.assertIn("cargo build --release", r.stderr)

    def test_a_file_that_is_no_library_is_a_clear_error(self):
        r = self.run_python("import mlart", MLART_LIBRARY=os.path.abspath(__file__))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("mlart: cannot load", r.stderr)

    def test_mlart_library_selects_the_library(self):
        r = self.run_python("import mlart; print(mlart.LIBRARY_PATH)", MLART_LIBRARY=mlart.LIBRARY_PATH)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), mlart.LIBRARY_PATH)


class HandleLifetimeTest(unittest.TestCase):
    def test_garbage_collection_releases_unclosed_handles(self):
        before = mlart.handle_stats()
        for _ in range(20):
            e = mlart.Engine("cpu", num_threads=1)
            p = mlart.KvPool(e, kv_format="f32", d_qk=64, block_size=16, num_blocks=64)
            p.create_seq(1)
        del e, p
        gc.collect()
        after = mlart.handle_stats()
        self.assertEqual(after["created"] - before["created"], 40)
        self.assertEqual(after["closed"] - before["closed"], 0)
        self.assertEqual(after["finalized"] - before["finalized"], 40)

    def test_close_and_with_count_once_and_detach_the_finalizer(self):
        before = mlart.handle_stats()
        with mlart.Engine("cpu", num_threads=1) as e:
            with mlart.KvPool(e, num_blocks=2) as p:
                p.close()
        del e, p
        gc.collect()
        after = mlart.handle_stats()
        self.assertEqual(after["created"] - before["created"], 2)
        self.assertEqual(after["closed"] - before["closed"], 2)
        self.assertEqual(after["finalized"] - before["finalized"], 0)

    def test_a_failed_constructor_makes_no_handle(self):
        before = mlart.handle_stats()
        with self.assertRaises(mlart.MlartError):
            mlart.Engine(backend=99)
        with self.assertRaises(ValueError):
            mlart.Engine(backend="nope")
        self.assertEqual(mlart.handle_stats(), before)


if __name__ == "__main__":
    unittest.main()
