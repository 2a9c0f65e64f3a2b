"""KvPool and Model on a CUDA engine with device arrays: a model layer
whose hidden states stay in device memory (Model.forward x/out), against
the same layer over host buffers and on a CPU engine; and a pool decode
with its queries and outputs in device memory."""

import array

import cudalib
import mlart
from cudalib import R

D_QK, D_V = 576, 512


class PoolDeviceTest(cudalib.CudaTestCase):
    def test_a_cuda_pool_decodes_host_buffers_like_a_cpu_pool(self):
        rand = R.rng(41)
        h_q = 2
        pools = [mlart.KvPool(e, d_qk=D_QK, num_blocks=4, block_size=16)
                 for e in (self.gpu, self.cpu)]
        for p in pools:
            self.addCleanup(p.close)
        rows = R.random_f32(21 * D_QK, rand)
        q = R.random_f32(2 * h_q * D_QK, rand)
        for p in pools:
            p.create_seq(1)
            p.append(1, 0, rows)
            p.fork_seq(1, 2)
        g, c = (p.decode(seq_ids=[1, 2], h_q=h_q, d_v=D_V, q=q, lse=True) for p in pools)
        cudalib.check_out(self, g.out, list(c.out), g.lse, list(c.lse), 2, h_q * D_V, "pool")

    def test_device_memory_pool_decode(self):
        # q, out and lse in device memory; seq_ids, indices, topk_length and
        # attn_sink in host memory. Byte for byte the same pool's
        # host-memory result, dense (causal, two query tokens) and sparse.
        h_q, s_q = 2, 2
        rand = R.rng(42)
        with mlart.KvPool(self.gpu, d_qk=D_QK, num_blocks=4, block_size=16) as pool:
            for sid, n in ((7, 19), (8, 3)):
                pool.create_seq(sid)
                pool.append(sid, 0, R.random_f32(n * D_QK, rand))
            q_host = R.random_f32(2 * s_q * h_q * D_QK, rand)
            q = self.upload(q_host)
            sparse = dict(indices=array.array("i", [0, 5, -1, 18, 2, 1, 0, -1,
                                                   0, 2, 9, 9, 1, 0, -1, 7]), topk=4,
                          topk_length=array.array("i", [4, 2]),
                          attn_sink=array.array("f", [0.5, -1.0]))
            for extra in ({"causal": True}, sparse):
                want = pool.decode(seq_ids=[7, 8], h_q=h_q, d_v=D_V, s_q=s_q, q=q_host,
                                   lse=True, **extra)
                out, lse = self.empty((2, s_q, h_q, D_V)), self.empty((2, h_q, s_q))
                with cudalib.recording("kv_pool_decode") as seen:
                    got = pool.decode(seq_ids=[7, 8], h_q=h_q, d_v=D_V, s_q=s_q, q=q,
                                      out=out, lse=lse, **extra)
                self.assertIs(got.out, out)
                d = seen[0]
                self.assertEqual((d.memory, d.batch, d.q, d.out, d.lse),
                                 (mlart.Memory.DEVICE, 2, q.address, out.address, lse.address))
                self.assertEqual(list(out.to_host()), list(want.out), str(extra))
                self.assertEqual(list(lse.to_host()), list(want.lse), str(extra))
            # The binding's own checks come first.
            out = self.empty((s_q, h_q, D_V))
            one_q = self.upload(R.random_f32(s_q * h_q * D_QK, rand))
            with self.assertRaisesRegex(TypeError, r"^seq_ids must be host memory"):
                pool.decode(seq_ids=self.upload(array.array("Q", [7])), h_q=h_q, d_v=D_V,
                            s_q=s_q, q=one_q, out=out)
            with self.assertRaisesRegex(TypeError, r"^out is required when the call's tensors "
                                                   r"are CUDA device memory"):
                pool.decode(seq_ids=[7], h_q=h_q, d_v=D_V, s_q=s_q, q=one_q)
            with self.assertRaisesRegex(TypeError, r"^indices must be an int32 buffer .* in "
                                                   r"host memory"):
                pool.decode(seq_ids=[7], h_q=h_q, d_v=D_V, s_q=s_q, q=one_q, out=out, topk=1,
                            indices=self.upload(array.array("i", [0, 0])))
            with self.assertRaisesRegex(TypeError, r"^attn_sink must be a float32 buffer .* in "
                                                   r"host memory"):
                pool.decode(seq_ids=[7], h_q=h_q, d_v=D_V, s_q=s_q, q=one_q, out=out,
                            attn_sink=self.upload(array.array("f", [0.0] * h_q)))
            with self.assertRaisesRegex(ValueError, r"^q has 575 elements"):
                pool.decode(seq_ids=[7], h_q=1, d_v=D_V, q=cudalib.Foreign(q, shape=(575,)),
                            out=out)
            self.assertEqual(pool.seq_length(7), 19)


class ModelDeviceTest(cudalib.CudaTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = cudalib.small_model_dir()
        cls.model = mlart.Model.load(cls.gpu, cls.dir, gpu_projections=True)
        cls.info = cls.model.info()

    @classmethod
    def tearDownClass(cls):
        cls.model.close()
        super().tearDownClass()

    def pool(self, engine):
        p = mlart.KvPool(engine, d_qk=self.info.d_qk, num_blocks=8, block_size=16)
        self.addCleanup(p.close)
        p.create_seq(1)
        p.create_seq(2)
        return p

    def test_forward_over_device_hidden_states(self):
        info = self.info
        self.assertTrue(info.projections_on_gpu, "gpu_projections=True: %r" % (info,))
        self.assertEqual(info.d_qk, D_QK)
        hid = info.hidden_size
        cpu_model = mlart.Model.load(self.cpu, self.dir)
        self.addCleanup(cpu_model.close)
        host_pool, dev_pool, cpu_pool = self.pool(self.gpu), self.pool(self.gpu), self.pool(self.cpu)
        driver = cudalib.Driver()
        stream = driver.stream()
        self.addCleanup(driver.destroy, stream)
        rand = R.rng(51)
        # (n_tokens, x dtype, out dtype, on a stream)
        steps = [([3, 2], "f32", "f32", False), ([1, 1], "bf16", "bf16", True),
                 ([2, 1], "f32", "f32", True)]
        for n_tokens, x_dtype, out_dtype, on_stream in steps:
            with self.subTest(n_tokens=n_tokens, x=x_dtype, out=out_dtype, stream=on_stream):
                total = sum(n_tokens)
                xf = R.random_f32(total * hid, rand)
                x = mlart.f32_to_bf16(xf) if x_dtype == "bf16" else xf
                args = dict(layer=0, seq_ids=[1, 2], n_tokens=n_tokens, out_dtype=out_dtype)
                want = self.model.forward(host_pool, x=x, **args)
                dx = self.upload(x)
                dout = self.empty((total, hid), out_dtype)
                with cudalib.recording("model_forward") as seen:
                    got = self.model.forward(dev_pool, x=dx, out=dout,
                                             stream=stream if on_stream else None, **args)
                self.assertIs(got, dout)
                f = seen[0]
                self.assertEqual((f.memory, f.x, f.out, f.stream),
                                 (mlart.Memory.DEVICE, dx.address, dout.address,
                                  stream if on_stream else None))
                if on_stream:
                    driver.synchronize(stream)
                self.assertEqual(dout.to_host().tobytes(), want.tobytes(),
                                 "device memory vs host memory")
                ref = cpu_model.forward(cpu_pool, x=x, **dict(args, out_dtype="f32"))
                g = mlart.bf16_to_f32(want) if out_dtype == "bf16" else want
                e = R.rel_l2(g, ref)
                self.assertLessEqual(e, 2e-2, "against the CPU engine: rel L2 %.3e" % e)
        self.assertEqual(dev_pool.seq_length(1), 6)
        self.assertEqual(dev_pool.seq_length(2), 4)

    def test_forward_checks_and_library_errors(self):
        hid = self.info.hidden_size
        pool = self.pool(self.gpu)
        x = self.upload(R.random_f32(2 * hid, R.rng(52)))
        out = self.empty((2, hid))
        args = dict(layer=0, seq_ids=[1, 2], n_tokens=[1, 1])
        with self.assertRaisesRegex(TypeError, r"^out is required when the call's tensors are "
                                               r"CUDA device memory \(x is\)"):
            self.model.forward(pool, x=x, **args)
        with self.assertRaisesRegex(TypeError, r"^out is host memory .* but x is CUDA device"):
            self.model.forward(pool, x=x, out=array.array("f", bytes(8 * hid)), **args)
        with self.assertRaisesRegex(TypeError, r"^n_tokens must be an int32 buffer .* in host "
                                               r"memory"):
            self.model.forward(pool, x=x, out=out, layer=0, seq_ids=[1, 2],
                               n_tokens=self.upload(array.array("i", [1, 1])))
        with self.assertRaisesRegex(TypeError, r"^seq_ids must be host memory"):
            self.model.forward(pool, x=x, out=out, layer=0, n_tokens=[1, 1],
                               seq_ids=self.upload(array.array("Q", [1, 2])))
        with self.assertRaisesRegex(ValueError, r"^x has 511 elements but x \[sum\(n_tokens\)=2, "
                                                r"hidden_size=256\] needs 512$"):
            self.model.forward(pool, x=cudalib.Foreign(x, shape=(511,)), out=out, **args)
        with self.assertRaisesRegex(TypeError, r"^out must be writable"):
            self.model.forward(pool, x=x, out=cudalib.Foreign(out, data=(out.address, True)),
                               **args)
        # The library's own: alignment, and a model whose projections run on the CPU.
        wide = self.gpu.device_array(2 * hid + 4)
        self.addCleanup(wide.close)
        odd = cudalib.Foreign(wide, shape=(2 * hid,), data=(wide.address + 8, False))
        with self.assertRaises(mlart.MlartError) as cm:
            self.model.forward(pool, x=odd, out=out, **args)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertRegex(str(cm.exception), "x = .*16-byte aligned")
        with mlart.Model.load(self.gpu, self.dir, gpu_projections=False) as cpu_proj:
            with self.assertRaises(mlart.MlartError) as cm:
                cpu_proj.forward(pool, x=x, out=out, **args)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("projections run on the CPU", str(cm.exception))
        self.assertEqual((pool.seq_length(1), pool.seq_length(2)), (0, 0))
