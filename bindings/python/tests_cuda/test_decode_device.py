"""Engine.decode_paged over device arrays on a CUDA engine: against the
float64 reference at the GPU suite's tolerance, against the same call over
host buffers (the engine stages them through the same kernels: identical
bytes), and the CPU engine's answer to device memory."""

import array

import cudalib
import mlart
from cudalib import Foreign, R

D_QK, D_V = 576, 512


class DenseDecodeTest(cudalib.CudaTestCase):
    def dense_case(self, fmt, lens, h_q, block_size, seed):
        rand = R.rng(seed)
        seqs = [R.random_f32(n * D_QK, rand) for n in lens]
        c = cudalib.paged_cache(fmt, D_QK, block_size, seqs)
        q = R.random_f32(len(lens) * h_q * D_QK, rand, 2.0)
        return c, q

    def test_bf16_cache_f32_and_bf16_queries_and_outputs(self):
        lens, h_q, bs = [0, 5, 19], 3, 16
        c, q32 = self.dense_case("bf16", lens, h_q, bs, 1)
        batch = len(lens)
        n_out, n_lse = batch * h_q * D_V, batch * h_q
        base = dict(batch=batch, h_q=h_q, d_qk=D_QK, d_v=D_V, kv_format="bf16",
                    num_blocks=c["num_blocks"], block_size=bs, block_table_stride=c["stride"])
        dev = dict(kv=self.upload(c["kv"]), block_table=self.upload(c["block_table"]),
                   seqlens=self.upload(c["seqlens"]))
        host = dict(kv=c["kv"], block_table=c["block_table"], seqlens=c["seqlens"])
        q16 = mlart.f32_to_bf16(q32)
        for q, out_dtype in [(q32, "f32"), (q16, "bf16")]:
            with self.subTest(q=q.typecode, out=out_dtype):
                q_ref = list(q32) if q.typecode == "f" else R.from_bf16_array(q16)
                want, want_lse = R.reference_decode(batch, 1, h_q, D_QK, D_V, q_ref, c["keys"])
                out = self.empty((batch, 1, h_q, D_V), out_dtype)
                lse = self.empty(n_lse)
                dq = self.upload(q)
                with cudalib.recording("decode_paged") as seen:
                    r = self.gpu.decode_paged(q=dq, out=out, lse=lse, **base, **dev)
                self.assertIs(r.out, out)
                self.assertIs(r.lse, lse)
                self.assertEqual((seen[0].memory, seen[0].stream), (mlart.Memory.DEVICE, None))
                self.assertEqual(seen[0].q, dq.address)
                self.assertEqual(seen[0].out_dtype, mlart.DType[out_dtype.upper()])
                got = out.to_host()
                got_f = R.from_bf16_array(got) if out_dtype == "bf16" else list(got)
                got_lse = lse.to_host()
                cudalib.check_out(self, got_f, want, got_lse, want_lse, batch, h_q * D_V,
                                  "device call")
                # The same call over host buffers, staged by the engine.
                h = self.gpu.decode_paged(q=q, lse=True, out_dtype=out_dtype, **base, **host)
                self.assertEqual(h.out.tobytes(), got.tobytes())
                self.assertEqual(h.lse.tobytes(), got_lse.tobytes())
                # The CPU engine's answer is within the same tolerance.
                cpu = self.cpu.decode_paged(q=q, lse=True, **base, **host)
                cudalib.check_out(self, got_f, list(cpu.out), got_lse, list(cpu.lse), batch,
                                  h_q * D_V, "against the CPU engine")
                self.assertEqual(n_out, len(got_f))

    def test_fp8_v32_sparse_with_extra_cache_sink_and_topk_lengths(self):
        rand = R.rng(2)
        h_q, bs, xbs, topk, xtopk = 2, 16, 4, 8, 4
        lens = [7, 20]
        seqs = [R.random_f32(n * D_QK, rand, 3.0) for n in lens]
        c = cudalib.paged_cache("fp8_v32", D_QK, bs, seqs)
        xseqs = [R.random_f32(6 * D_QK, rand, 3.0)]
        x = cudalib.paged_cache("fp8_v32", D_QK, xbs, xseqs, spare=1)
        # Positions: -1 (none) and a duplicate; topk_length cuts the first row.
        idx = [[c["pos"](0, t) for t in (0, 3, 3, 6)] + [-1, c["pos"](0, 1), -1, -1],
               [c["pos"](1, t) for t in (19, 0, 17, 8, 9, 10, 2, 5)]]
        tlen = [6, 8]
        xidx = [[x["pos"](0, 5), x["pos"](0, 0), -1, x["pos"](0, 2)],
                [x["pos"](0, 1), x["pos"](0, 1), x["pos"](0, 4), x["pos"](0, 3)]]
        xlen = [4, 3]
        sink = array.array("f", [0.5, -1.25])
        q = R.random_f32(2 * h_q * D_QK, rand, 2.0)

        def rows(idx_row, n, keys_of):
            return [keys_of(p) for p in idx_row[:n] if p >= 0]

        def main_key(p):
            for b, n in enumerate(lens):
                for t in range(n):
                    if c["pos"](b, t) == p:
                        return c["keys"][b][t]
            raise AssertionError(p)

        def extra_key(p):
            for t in range(6):
                if x["pos"](0, t) == p:
                    return x["keys"][0][t]
            raise AssertionError(p)

        keys = [rows(idx[b], tlen[b], main_key) + rows(xidx[b], xlen[b], extra_key)
                for b in range(2)]
        want, want_lse = R.reference_decode(2, 1, h_q, D_QK, D_V, list(q), keys, sink=sink)

        flat = array.array("i", idx[0] + idx[1])
        xflat = array.array("i", xidx[0] + xidx[1])
        host = dict(q=q, kv=c["kv"], indices=flat, topk_length=array.array("i", tlen),
                    extra_kv=x["kv"], extra_indices=xflat,
                    extra_topk_length=array.array("i", xlen), attn_sink=sink)
        dev = {k: self.upload(v) for k, v in host.items()}
        base = dict(batch=2, h_q=h_q, d_qk=D_QK, d_v=D_V, kv_format="fp8_v32",
                    num_blocks=c["num_blocks"], block_size=bs, topk=topk,
                    extra_num_blocks=x["num_blocks"], extra_block_size=xbs, extra_topk=xtopk)
        out = self.empty((2, h_q, D_V))
        lse = self.empty((2, h_q))
        self.gpu.decode_paged(out=out, lse=lse, **base, **dev)
        got, got_lse = out.to_host(), lse.to_host()
        cudalib.check_out(self, got, want, got_lse, want_lse, 2, h_q * D_V, "sparse device call")
        h = self.gpu.decode_paged(lse=True, **base, **host)
        self.assertEqual(h.out.tobytes(), got.tobytes())
        self.assertEqual(h.lse.tobytes(), got_lse.tobytes())

    def test_bf16_bits_as_int16_or_V2_and_f16_bits_by_q_dtype(self):
        # torch exposes bfloat16 as '<V2' (or, viewed as int16, '<i2');
        # uint16 bits are f16 with q_dtype='f16', as for host 'H' buffers.
        lens, h_q, bs = [9], 2, 16
        c, q32 = self.dense_case("bf16", lens, h_q, bs, 3)
        base = dict(batch=1, h_q=h_q, d_qk=D_QK, d_v=D_V, kv_format="bf16",
                    num_blocks=c["num_blocks"], block_size=bs, block_table_stride=c["stride"],
                    kv=self.upload(c["kv"]), block_table=self.upload(c["block_table"]),
                    seqlens=self.upload(c["seqlens"]))
        q16 = self.upload(mlart.f32_to_bf16(q32))
        results = []
        for typestr in ["<u2", "<i2", "<V2"]:
            out = self.empty((h_q, D_V))
            with cudalib.recording("decode_paged") as seen:
                self.gpu.decode_paged(q=Foreign(q16, typestr=typestr), out=out, **base)
            self.assertEqual(seen[0].q_dtype, mlart.DType.BF16, typestr)
            results.append(out.to_host().tobytes())
        self.assertEqual(results[0], results[1])
        self.assertEqual(results[0], results[2])
        qf16 = self.upload(array.array("H", [0x3C00] * (h_q * D_QK)))  # 1.0 in f16
        out = self.empty((h_q, D_V))
        with cudalib.recording("decode_paged") as seen:
            self.gpu.decode_paged(q=qf16, q_dtype="f16", out=out, **base)
        self.assertEqual(seen[0].q_dtype, mlart.DType.F16)
        want, _ = R.reference_decode(1, 1, h_q, D_QK, D_V, [1.0] * (h_q * D_QK), c["keys"])
        self.assertLessEqual(R.rel_l2(out.to_host(), want), 1e-2)
        with self.assertRaisesRegex(TypeError, "^q is a uint16 buffer"):
            self.gpu.decode_paged(q=qf16, q_dtype="f32", out=out, **base)

    def test_a_cpu_engine_answers_device_memory_with_its_own_error(self):
        c, q = self.dense_case("bf16", [3], 1, 16, 4)
        args = dict(batch=1, h_q=1, d_qk=D_QK, d_v=D_V, kv_format="bf16",
                    num_blocks=c["num_blocks"], block_size=16, block_table_stride=c["stride"],
                    q=self.upload(q), kv=self.upload(c["kv"]),
                    block_table=self.upload(c["block_table"]), seqlens=self.upload(c["seqlens"]),
                    out=self.empty(D_V))
        with self.assertRaises(mlart.MlartError) as cm:
            self.cpu.decode_paged(**args)
        self.assertEqual(cm.exception.code, "UNSUPPORTED")
        self.assertEqual(cm.exception.function, "mlart_decode_paged")
        self.assertIn("MLART_MEMORY_DEVICE", str(cm.exception))

    def test_a_host_pointer_in_an_interface_is_the_library_error_naming_it(self):
        c, q = self.dense_case("bf16", [3], 1, 16, 5)
        host_q = array.array("f", q)
        addr, _ = host_q.buffer_info()
        fake = Foreign(None, shape=(len(q),), typestr="<f4", data=(addr, False), version=3)
        args = dict(batch=1, h_q=1, d_qk=D_QK, d_v=D_V, kv_format="bf16",
                    num_blocks=c["num_blocks"], block_size=16, block_table_stride=c["stride"],
                    kv=self.upload(c["kv"]), block_table=self.upload(c["block_table"]),
                    seqlens=self.upload(c["seqlens"]), out=self.empty(D_V))
        with self.assertRaises(mlart.MlartError) as cm:
            self.gpu.decode_paged(q=fake, **args)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertRegex(str(cm.exception), "^q = .*not memory of a CUDA device")
        # A device buffer shorter than it claims is the library's to find too.
        short = self.gpu.device_array(8)
        self.addCleanup(short.close)
        with self.assertRaises(mlart.MlartError) as cm:
            self.gpu.decode_paged(q=Foreign(short, shape=(D_QK,)), **args)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("q = ", str(cm.exception))
