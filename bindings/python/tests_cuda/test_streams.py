"""The `stream=` keyword and the ``stream`` entry of device arrays'
interfaces: which CUstream each call passes, and that work enqueued on a
real stream (the driver's, through ctypes) gives the synchronous call's
result once the stream is synchronized."""

import cudalib
import mlart
from cudalib import DROP, CupyStream, Foreign, ProtocolStream, R, TorchStream

D_QK, D_V, H_Q, BS = 576, 512, 2, 16


class StreamTest(cudalib.CudaTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.driver = cudalib.Driver()
        cls.stream = cls.driver.stream()
        cls.other = cls.driver.stream()

    @classmethod
    def tearDownClass(cls):
        cls.driver.destroy(cls.stream)
        cls.driver.destroy(cls.other)
        super().tearDownClass()

    def setUp(self):
        rand = R.rng(11)
        lens = [4, 17]
        c = cudalib.paged_cache("bf16", D_QK, BS, [R.random_f32(n * D_QK, rand) for n in lens])
        self.q = self.upload(R.random_f32(2 * H_Q * D_QK, rand))
        self.args = dict(
            batch=2, h_q=H_Q, d_qk=D_QK, d_v=D_V, kv_format="bf16", num_blocks=c["num_blocks"],
            block_size=BS, block_table_stride=c["stride"], kv=self.upload(c["kv"]),
            block_table=self.upload(c["block_table"]), seqlens=self.upload(c["seqlens"]),
        )
        out = self.empty((2, H_Q, D_V))
        self.gpu.decode_paged(q=self.q, out=out, **self.args)
        self.want = out.to_host().tobytes()

    def decode(self, stream=None, q=None, out=None, call=True, **extra):
        """One decode; returns (the struct passed, out's bytes after the
        stream, if any, is synchronized)."""
        out = out if out is not None else self.empty((2, H_Q, D_V))
        with cudalib.recording("decode_paged", call=call) as seen:
            self.gpu.decode_paged(q=q if q is not None else self.q, out=out, stream=stream,
                                  **dict(self.args, **extra))
        d = seen[0]
        if call and d.stream:
            self.driver.synchronize(d.stream)
        host = getattr(out, "base", out)  # a Foreign over a DeviceArray
        return d, host.to_host().tobytes() if call else None

    def test_stream_none_and_0_are_null_the_call_waits(self):
        for s in (None, 0):
            d, got = self.decode(stream=s)
            self.assertEqual((d.memory, d.stream), (mlart.Memory.DEVICE, None))
            self.assertEqual(got, self.want)

    def test_an_int_handle_or_a_stream_object_is_the_call_stream(self):
        s = self.stream
        for stream in (s, TorchStream(s), CupyStream(s), ProtocolStream(s)):
            with self.subTest(stream=type(stream).__name__):
                d, got = self.decode(stream=stream)
                self.assertEqual(d.stream, s)
                self.assertEqual(got, self.want)

    def test_the_interfaces_stream_is_used_when_all_that_name_one_agree(self):
        s = self.stream
        q = Foreign(self.q, stream=s)
        out = Foreign(self.empty((2, H_Q, D_V)), stream=s)
        # The others name none (v3 stream None, or v2 without the entry).
        kv = Foreign(self.args["kv"], version=2, stream=DROP)
        d, _ = self.decode(q=q, out=out, kv=kv)
        self.assertEqual(d.stream, s)
        self.assertEqual(out.base.to_host().tobytes(), self.want)
        # stream= takes precedence (0: NULL, the call waits).
        d, _ = self.decode(q=q, out=out, stream=0)
        self.assertIsNone(d.stream)
        d, _ = self.decode(q=q, out=out, stream=TorchStream(self.other))
        self.assertEqual(d.stream, self.other)
        # A version-2 interface's stream entry is not one (v3 added it).
        d, _ = self.decode(q=Foreign(self.q, version=2, stream=s))
        self.assertIsNone(d.stream)

    def test_interfaces_naming_different_streams_are_a_value_error(self):
        q = Foreign(self.q, stream=self.stream)
        out = Foreign(self.empty((2, H_Q, D_V)), stream=self.other)
        with cudalib.recording("decode_paged") as seen:
            with self.assertRaisesRegex(
                ValueError, r"^q's __cuda_array_interface__ names stream 0x[0-9a-f]+ but out's "
                            r"names stream 0x[0-9a-f]+: pass stream="
            ):
                self.gpu.decode_paged(q=q, out=out, **self.args)
        self.assertEqual(seen, [])
        # ... unless stream= chooses.
        d, _ = self.decode(q=q, out=out, stream=self.stream)
        self.assertEqual(d.stream, self.stream)

    def test_protocol_streams_1_and_2_are_cu_stream_legacy_and_per_thread(self):
        # Not run on a driver: the emulated one has no legacy stream handles.
        self.assertEqual((mlart.CU_STREAM_LEGACY, mlart.CU_STREAM_PER_THREAD), (1, 2))
        for cai_stream in (1, 2):
            d, _ = self.decode(q=Foreign(self.q, stream=cai_stream), call=False)
            self.assertEqual((d.memory, d.stream), (mlart.Memory.DEVICE, cai_stream))
        d, _ = self.decode(stream=mlart.CU_STREAM_PER_THREAD, call=False)
        self.assertEqual(d.stream, 2)

    def test_bad_streams(self):
        with self.assertRaisesRegex(ValueError, "stream is 0, which the protocol disallows"):
            self.decode(q=Foreign(self.q, stream=0), call=False)
        with self.assertRaisesRegex(TypeError, "stream must be None or an int"):
            self.decode(q=Foreign(self.q, stream="1"), call=False)
        for bad in (True, 1.5, "s", object()):
            with self.assertRaisesRegex(TypeError, "^stream must be None, an int"):
                self.decode(stream=bad, call=False)
        with self.assertRaisesRegex(ValueError, "^stream = -1 is not a CUstream handle"):
            self.decode(stream=-1, call=False)
        with self.assertRaisesRegex(TypeError, "must be an int"):
            self.decode(stream=TorchStream(1.0), call=False)

    def test_host_calls_pass_the_stream_on_and_finish_before_returning(self):
        h = self.gpu.decode_paged(
            q=self.q.to_host(), kv=self.args["kv"].to_host(),
            block_table=self.args["block_table"].to_host(),
            seqlens=self.args["seqlens"].to_host(), stream=self.stream,
            **{k: v for k, v in self.args.items()
               if k not in ("kv", "block_table", "seqlens")},
        )
        self.assertEqual(h.out.tobytes(), self.want)
