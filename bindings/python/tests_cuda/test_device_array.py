"""DeviceArray: engine memory (mlart_engine_mem_alloc) with
__cuda_array_interface__, its copies, and its lifetime."""

import array
import gc

import cudalib
import mlart
from cudalib import Foreign


class DeviceArrayTest(cudalib.CudaTestCase):
    def test_shape_dtype_and_interface(self):
        cases = [
            ((2, 3), "f32", "<f4", 4, "f"), (5, "bf16", "<u2", 2, "H"),
            ([4], "f16", "<f2", 2, "H"), (7, "int32", "<i4", 4, "i"),
            ((3, 2), "uint8", "|u1", 1, "B"), (2, "uint64", "<u8", 8, "Q"),
            (3, mlart.DType.BF16, "<u2", 2, "H"), (3, mlart.DType.F32, "<f4", 4, "f"),
            (3, "<i2", "<i2", 2, "h"), (3, "=f4", "<f4", 4, "f"), (3, "<u1", "|u1", 1, "B"),
            (3, "<V2", "<V2", 2, "H"),
        ]
        for shape, dtype, typestr, itemsize, code in cases:
            with self.subTest(dtype=dtype):
                with self.gpu.device_array(shape, dtype) as d:
                    dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
                    n = 1
                    for x in dims:
                        n *= x
                    self.assertEqual((d.shape, d.typestr, d.itemsize, d.size, d.nbytes),
                                     (dims, typestr, itemsize, n, n * itemsize))
                    self.assertIs(d.engine, self.gpu)
                    self.assertEqual(d.__cuda_array_interface__, {
                        "shape": dims, "typestr": typestr, "data": (d.address, False),
                        "strides": None, "stream": None, "version": 3,
                    })
                    self.assertNotEqual(d.address, 0)
                    host = d.copy_from(bytes(range(d.nbytes))).to_host()
                    self.assertEqual(host.typecode, code)
                    self.assertEqual(bytes(host), bytes(range(d.nbytes)))

    def test_bad_shapes_and_dtypes(self):
        with self.assertRaisesRegex(ValueError, r"^dtype = 'f8' is not one of 'f32'"):
            self.gpu.device_array(4, "f8")
        for bad in ("<f3", ">f4", "|f4", "<x2"):
            with self.assertRaisesRegex(ValueError, "not one of"):
                self.gpu.device_array(4, bad)
        with self.assertRaisesRegex(ValueError, "^dtype fp8_e4m3 has no device array type"):
            self.gpu.device_array(4, mlart.DType.FP8_E4M3)
        with self.assertRaisesRegex(TypeError, "^dtype must be a DType"):
            self.gpu.device_array(4, mlart.KvFormat.BF16)
        with self.assertRaisesRegex(TypeError, "^dtype must be a DType"):
            self.gpu.device_array(4, 3)
        with self.assertRaisesRegex(ValueError, r"^shape\[1\] = -2 is negative"):
            self.gpu.device_array((3, -2))
        with self.assertRaisesRegex(TypeError, r"^shape\[0\] must be an integer"):
            self.gpu.device_array((1.5,))

        class NumpyDtype:
            str = "<i4"

        with self.gpu.device_array(2, NumpyDtype()) as d:
            self.assertEqual(d.typestr, "<i4")
        # Zero bytes: the library's rule (bytes > 0), its error.
        with self.assertRaises(mlart.MlartError) as cm:
            self.gpu.device_array((4, 0))
        self.assertEqual(cm.exception.function, "mlart_engine_mem_alloc")
        with self.assertRaisesRegex(TypeError, "^use engine.device_array"):
            mlart.DeviceArray(None, self.gpu, (1,), "<f4", 4)

    def test_a_cpu_engine_makes_none(self):
        with self.assertRaisesRegex(ValueError, "^device_array needs a CUDA engine: this engine "
                                                "runs on cpu"):
            self.cpu.device_array(4)
        with self.assertRaisesRegex(ValueError, "^device_array needs a CUDA engine"):
            self.cpu.to_device(array.array("f", [1.0]))

    def test_copies_check_byte_counts_and_writability(self):
        d = self.upload(array.array("f", [1.0, 2.0, 3.0]))
        self.assertEqual((d.shape, d.typestr), ((3,), "<f4"))
        with self.assertRaisesRegex(ValueError, r"^src has 8 bytes but the DeviceArray "
                                                r"<mlart.DeviceArray open shape=\(3,\) "
                                                r"typestr='<f4'> holds 12: copies are whole"):
            d.copy_from(array.array("f", [1.0, 2.0]))
        with self.assertRaisesRegex(ValueError, "^dst has 16 bytes but"):
            d.copy_to(bytearray(16))
        with self.assertRaisesRegex(TypeError, "^dst must be writable"):
            d.copy_to(bytes(12))
        with self.assertRaisesRegex(ValueError, "^src must be C-contiguous"):
            d.copy_from(memoryview(array.array("f", [0.0] * 6))[::2])
        with self.assertRaisesRegex(TypeError, "^src must be a C-contiguous host buffer or a "
                                               "device array"):
            d.copy_from([1.0, 2.0, 3.0])
        # Read-only sources (bytes, read-only memoryviews) are fine.
        d.copy_from(memoryview(array.array("f", [4.0, 5.0, 6.0]).tobytes()).cast("f"))
        self.assertEqual(list(d.to_host()), [4.0, 5.0, 6.0])
        # Device to device: a DeviceArray, or any device array.
        e = self.empty(3)
        e.copy_from(d)
        self.assertEqual(list(e.to_host()), [4.0, 5.0, 6.0])
        d.copy_from(array.array("f", [7.0, 8.0, 9.0]))
        d.copy_to(Foreign(e))
        self.assertEqual(list(e.to_host()), [7.0, 8.0, 9.0])
        with self.assertRaisesRegex(TypeError, "^dst must be writable, got a read-only device"):
            d.copy_to(Foreign(e, data=(e.address, True)))
        with self.assertRaisesRegex(ValueError, "^src has 8 bytes"):
            d.copy_from(Foreign(e, shape=(2,)))
        # to_device: the buffer's type, or dtype= / shape=.
        b = self.upload(mlart.f32_to_bf16([1.0, 2.0, 3.0, 4.0]), shape=(2, 2))
        self.assertEqual((b.shape, b.typestr), ((2, 2), "<u2"))
        self.assertEqual(list(mlart.bf16_to_f32(b.to_host())), [1.0, 2.0, 3.0, 4.0])
        i = self.upload(bytes(8), dtype="int32")
        self.assertEqual((i.shape, list(i.to_host())), ((2,), [0, 0]))
        with self.assertRaisesRegex(ValueError, "^data has 7 bytes, not a multiple of 4"):
            self.gpu.to_device(bytes(7), dtype="f32")
        with self.assertRaisesRegex(TypeError, "^data has format '\\?', which has no device "
                                               "type: pass dtype="):
            self.gpu.to_device(memoryview(bytes(2)).cast("?"))
        self.assertEqual(self.upload(memoryview(bytes(2)).cast("?"), dtype="u8").typestr, "|u1")
        with self.assertRaisesRegex(TypeError, r"^data must be a C-contiguous buffer in host "
                                               r"memory, got DeviceArray"):
            self.gpu.to_device(d)

    def test_close_with_and_closed_use(self):
        before = mlart.handle_stats()
        d = self.gpu.device_array(4)
        self.assertFalse(d.closed)
        d.close()
        d.close()
        self.assertTrue(d.closed)
        self.assertIn("closed", repr(d))
        with self.assertRaisesRegex(mlart.ClosedError, "DeviceArray is closed"):
            d.__cuda_array_interface__
        for fn in (lambda: d.address, lambda: d.to_host(),
                   lambda: d.copy_from(bytes(16)), lambda: d.copy_to(bytearray(16))):
            with self.assertRaises(mlart.ClosedError):
                fn()
        e = self.gpu.device_array(4)
        with self.assertRaises(mlart.ClosedError):
            e.copy_from(d)
        with e:
            pass
        self.assertTrue(e.closed)
        after = mlart.handle_stats()
        self.assertEqual(after["created"] - before["created"], 2)
        self.assertEqual(after["closed"] - before["closed"], 2)

    def test_garbage_collection_frees_an_unclosed_array(self):
        before = mlart.handle_stats()["finalized"]
        d = self.gpu.device_array(1024)
        del d
        gc.collect()
        self.assertEqual(mlart.handle_stats()["finalized"] - before, 1)

    def test_an_array_keeps_its_engine_alive(self):
        engine = cudalib.cuda_engine()
        d = engine.device_array(3)
        engine.close()
        self.assertTrue(engine.closed)
        with self.assertRaises(mlart.ClosedError):
            engine.device_array(3)
        self.assertIsNotNone(engine._ptr)  # the C engine lives on for the array
        d.copy_from(array.array("f", [1.0, 2.0, 3.0]))
        self.assertEqual(list(d.to_host()), [1.0, 2.0, 3.0])
        d.close()
        self.assertIsNone(engine._ptr)  # freed with the last array
        # An engine dropped without close() stays alive while its arrays do.
        before = mlart.handle_stats()["finalized"]
        d = cudalib.cuda_engine().device_array(2)
        gc.collect()
        d.copy_from(array.array("f", [5.0, 6.0]))
        self.assertEqual(list(d.to_host()), [5.0, 6.0])
        self.assertEqual(mlart.handle_stats()["finalized"], before)
        del d
        gc.collect()
        self.assertEqual(mlart.handle_stats()["finalized"] - before, 2)

    def test_close_during_a_call_frees_the_memory_when_the_call_returns(self):
        out = self.gpu.device_array(4)
        x = self.upload(array.array("f", [1.0, 2.0, 3.0, 4.0]))
        real = mlart._ffi.engine_mem_copy
        state = {}

        def copy_while_closing(*args):
            out.close()  # another thread's close(), as it were
            state["ptr during"] = out._ptr
            return real(*args)

        mlart._ffi.engine_mem_copy = copy_while_closing
        try:
            out.copy_from(x)
        finally:
            mlart._ffi.engine_mem_copy = real
        self.assertIsNotNone(state["ptr during"])
        self.assertTrue(out.closed)
        self.assertIsNone(out._ptr)
