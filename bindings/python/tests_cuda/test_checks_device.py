"""Python-side checks of device arrays, made before the library is called:
the all-host-or-all-device rule, contiguity, element and byte counts,
writable outputs, outputs that cannot be allocated, type strings and the
interface's other entries, and arguments that stay host memory."""

import array

import cudalib
import mlart
from cudalib import DROP, CpuTensor, Foreign, R, TorchBf16

D_QK, D_V, H_Q, BS = 576, 512, 3, 16


class DeviceArgumentChecksTest(cudalib.CudaTestCase):
    def setUp(self):
        rand = R.rng(31)
        lens = [2, 18]
        self.cache = c = cudalib.paged_cache(
            "bf16", D_QK, BS, [R.random_f32(n * D_QK, rand) for n in lens]
        )
        self.host = dict(
            q=R.random_f32(2 * H_Q * D_QK, rand), kv=c["kv"], block_table=c["block_table"],
            seqlens=c["seqlens"], out=array.array("f", bytes(4 * 2 * H_Q * D_V)),
            lse=array.array("f", bytes(4 * 2 * H_Q)),
            attn_sink=array.array("f", [0.25] * H_Q),
        )
        self.dev = {k: self.upload(v) for k, v in self.host.items()}
        self.base = dict(batch=2, h_q=H_Q, d_qk=D_QK, d_v=D_V, kv_format="bf16",
                         num_blocks=c["num_blocks"], block_size=BS,
                         block_table_stride=c["stride"])

    def call(self, **overrides):
        """decode_paged over the device arrays with `overrides`; asserts
        that the library is not called when the call raises."""
        args = dict(self.base, **self.dev)
        args.update(overrides)
        with cudalib.recording("decode_paged") as seen:
            try:
                return self.gpu.decode_paged(**args)
            except (TypeError, ValueError):
                self.assertEqual(seen, [], "the library was called before the check")
                raise

    def test_the_arguments_are_valid_as_built(self):
        r = self.call()
        h = self.gpu.decode_paged(**dict(self.base, **self.host))
        self.assertEqual(r.out.to_host().tobytes(), h.out.tobytes())
        self.assertEqual(r.lse.to_host().tobytes(), h.lse.tobytes())

    def test_mixed_host_and_device_tensors_are_a_type_error_naming_the_first_odd_one(self):
        for name in ["kv", "block_table", "seqlens", "attn_sink", "out", "lse"]:
            with self.subTest(host=name):
                with self.assertRaisesRegex(
                    TypeError, r"^%s is host memory \(.*\) but q is CUDA device memory \(.*\): "
                               r"a call's tensors must all be host memory or all CUDA device "
                               r"memory" % name
                ):
                    self.call(**{name: self.host[name]})
        with self.assertRaisesRegex(TypeError, r"^block_table is host memory \(list\)"):
            self.call(block_table=list(self.host["block_table"]))
        # Host q: then the first device tensor is the odd one.
        host_args = dict(self.base, **self.host)
        host_args["seqlens"] = self.dev["seqlens"]
        with self.assertRaisesRegex(
            TypeError, r"^seqlens is CUDA device memory \(DeviceArray .*\) but q is host memory"
        ):
            self.gpu.decode_paged(**host_args)
        # Sparse fields too.
        sparse = dict(block_table=None, seqlens=None, topk=2,
                      indices=self.upload(array.array("i", [0, -1] * 2)))
        with self.assertRaisesRegex(TypeError, "^topk_length is host memory"):
            self.call(topk_length=[1, 1], **sparse)
        x = dict(extra_kv=self.dev["kv"], extra_num_blocks=self.cache["num_blocks"],
                 extra_block_size=BS, extra_topk=2)
        with self.assertRaisesRegex(TypeError, "^extra_indices is host memory"):
            self.call(extra_indices=array.array("i", [0, -1] * 2), **sparse, **x)
        with self.assertRaisesRegex(TypeError, "^extra_kv is host memory"):
            self.call(**dict(sparse, **dict(x, extra_kv=self.host["kv"])),
                      extra_indices=self.dev["block_table"])

    def test_strided_device_arrays_are_a_value_error(self):
        q = self.dev["q"]
        n = q.size
        with self.assertRaisesRegex(
            ValueError, r"^q must be C-contiguous \(a strided view is not\), got Foreign "
                        r"\(CUDA device memory: typestr '<f4', shape \(%d,\)\) with strides "
                        r"\(8,\)$" % (n // 2)
        ):
            self.call(q=Foreign(q, shape=(n // 2,), strides=(8,)))
        with self.assertRaisesRegex(ValueError, "^kv must be C-contiguous"):
            self.call(kv=Foreign(self.dev["kv"], shape=(2, 9216), strides=(1, 2)))
        with self.assertRaisesRegex(ValueError, "^out must be C-contiguous"):
            self.call(out=Foreign(self.dev["out"], shape=(2, H_Q, D_V),
                                  strides=(4 * D_V, 8 * D_V, 4)))
        # C-contiguous strides spelled out, and any stride of a dimension of
        # one element, are contiguous.
        r = self.call(q=Foreign(q, shape=(2, 1, H_Q, D_QK),
                                strides=(4 * H_Q * D_QK, 12345, 4 * D_QK, 4)))
        self.assertIsNotNone(r)

    def test_short_device_buffers_are_value_errors_like_host_ones(self):
        want = {
            "q": r"^q has 3455 elements but q \[batch=2, s_q=1, h_q=3, d_qk=576\] needs 3456$",
            "kv": r"^kv has \d+ bytes but kv \[num_blocks=\d+\] x 18432-byte blocks needs \d+$",
            "block_table": r"^block_table has \d+ elements but block_table \[batch=2, "
                           r"block_table_stride=\d+\] needs \d+$",
            "seqlens": r"^seqlens has 1 elements but seqlens \[batch=2\] needs 2$",
            "attn_sink": r"^attn_sink has 2 elements but attn_sink \[h_q=3\] needs 3$",
            "out": r"^out has 3071 elements but out \[batch=2, s_q=1, h_q=3, d_v=512\] needs 3072$",
            "lse": r"^lse has 5 elements but lse \[batch=2, h_q=3, s_q=1\] needs 6$",
        }
        for name, pattern in want.items():
            with self.subTest(name=name):
                d = self.dev[name]
                short = Foreign(d, shape=(d.size - 1,))
                with self.assertRaisesRegex(ValueError, pattern):
                    self.call(**{name: short})
                # The same message as for the host buffer one element short.
                host = dict(self.base, **self.host)
                host[name] = memoryview(self.host[name])[:-1]
                with self.assertRaisesRegex(ValueError, pattern):
                    self.gpu.decode_paged(**host)

    def test_read_only_device_outputs_are_a_type_error_inputs_are_fine(self):
        for name in ["out", "lse"]:
            ro = Foreign(self.dev[name], data=(self.dev[name].address, True))
            with self.assertRaisesRegex(
                TypeError, r"^%s must be writable: it is an output, got a read-only device "
                           r"array \(__cuda_array_interface__ data\[1\] is True\)" % name
            ):
                self.call(**{name: ro})
        ro_q = Foreign(self.dev["q"], data=(self.dev["q"].address, True))
        self.assertIsNotNone(self.call(q=ro_q))

    def test_a_device_call_cannot_allocate_its_outputs(self):
        with self.assertRaisesRegex(
            TypeError, r"^out is required when the call's tensors are CUDA device memory "
                       r"\(q is\): the binding allocates host outputs only"
        ):
            self.call(out=None)
        with self.assertRaisesRegex(TypeError, "^lse is required when the call's tensors"):
            self.call(lse=True)
        r = self.call(lse=None)
        self.assertIsNone(r.lse)

    def test_type_strings(self):
        q = self.dev["q"]
        for typestr in ["<f8", ">f4", "<u4", "|b1", "<c8"]:
            with self.subTest(typestr=typestr):
                with self.assertRaisesRegex(TypeError, r"^q must be a float32, float16 or "
                                                       r"uint16 \(bf16/f16 bits\) buffer, got "
                                                       r"Foreign \(CUDA device memory: typestr"):
                    self.call(q=Foreign(q, typestr=typestr))
        for typestr in ["f4", "<x", "<f", "<f0", 4, None]:
            with self.subTest(typestr=typestr):
                with self.assertRaisesRegex(TypeError, r"^q: __cuda_array_interface__ typestr "
                                                       r".* is not a valid type string"):
                    self.call(q=Foreign(q, typestr=typestr))
        with self.assertRaisesRegex(TypeError, r"^block_table must be an int32 buffer"):
            self.call(block_table=Foreign(self.dev["block_table"], typestr="<u4"))
        with self.assertRaisesRegex(TypeError, r"^attn_sink must be a float32 buffer"):
            self.call(attn_sink=Foreign(self.dev["attn_sink"], typestr="<i4"))
        with self.assertRaisesRegex(TypeError, r"^lse must be a float32 buffer"):
            self.call(lse=Foreign(self.dev["lse"], typestr="<f2", shape=(12,)))
        with self.assertRaisesRegex(TypeError, r"^out is a float32 buffer \(format 'f'\) but "
                                               r"out_dtype is 'bf16'"):
            self.call(out_dtype="bf16")
        # A cache is measured in bytes, whatever its element type.
        kv = self.dev["kv"]
        self.assertIsNotNone(self.call(kv=Foreign(kv, typestr="<f4", shape=(kv.nbytes // 4,))))

    def test_the_interfaces_other_entries(self):
        q = self.dev["q"]
        cases = [
            (ValueError, r"^q: __cuda_array_interface__ version 4 is not one this binding reads",
             dict(version=4)),
            (ValueError, r"version None", dict(version=DROP)),
            (TypeError, r"^q: __cuda_array_interface__ shape must be a tuple of non-negative ints",
             dict(shape=(-1,))),
            (TypeError, r"shape must be", dict(shape=None)),
            (TypeError, r"^q: __cuda_array_interface__ data must be \(pointer, read_only\)",
             dict(data=q.address)),
            (TypeError, r"data must be", dict(data=(-1, False))),
            (TypeError, r"^q: masked device arrays", dict(mask=object())),
            (TypeError, r"^q: __cuda_array_interface__ strides must be None or one int per "
                        r"dimension", dict(strides=(4, 4))),
        ]
        for exc, pattern, entries in cases:
            with self.subTest(entries=entries):
                with self.assertRaisesRegex(exc, pattern):
                    self.call(q=Foreign(q, **entries))
        with self.assertRaisesRegex(TypeError, r"^q: __cuda_array_interface__ must be a dict"):
            f = Foreign(q)
            f.cai = [1]
            self.call(q=f)
        with self.assertRaisesRegex(
            TypeError, r"^q: its __cuda_array_interface__ cannot be read: TypeError: dtype "
                       r"torch.bfloat16 .*\(a torch.bfloat16 tensor: pass t.view\(torch.int16\)"
        ):
            self.call(q=TorchBf16())
        # Versions 0 to 3 are read alike; a mask of None is no mask.
        for v in (0, 1, 2):
            self.assertIsNotNone(self.call(q=Foreign(q, version=v, stream=DROP, mask=None)))
        # A torch CPU tensor (AttributeError) has no interface: not device memory.
        with self.assertRaisesRegex(TypeError, r"^q must be a float32, float16 or uint16 "
                                               r"\(bf16/f16 bits\) buffer, got CpuTensor$"):
            self.gpu.decode_paged(**dict(self.base, **dict(self.host, q=CpuTensor())))

    def test_arguments_that_stay_host_memory_refuse_device_arrays(self):
        d = self.dev["q"]
        with self.assertRaisesRegex(TypeError, r"^rows must be a float32, float16 or uint16 "
                                               r"\(bf16/f16 bits\) buffer in host memory, got "
                                               r"DeviceArray \(CUDA device memory: typestr "
                                               r"'<f4', shape \(3456,\)\): this argument takes "
                                               r"host memory only$"):
            mlart.kv_quantize("bf16", D_QK, BS, d)
        with self.assertRaisesRegex(TypeError, "^src must be .* in host memory"):
            mlart.kv_dequantize("bf16", D_QK, BS, 1, self.dev["kv"])
        with self.assertRaisesRegex(TypeError, "^dst must be .* in host memory"):
            mlart.kv_quantize("bf16", D_QK, BS, self.host["q"], n_tokens=1,
                              dst=self.dev["kv"])
        with mlart.KvPool(self.gpu, d_qk=D_QK, num_blocks=4, block_size=BS) as pool:
            pool.create_seq(1)
            with self.assertRaisesRegex(TypeError, "^rows must be .* in host memory"):
                pool.append(1, 0, d)
            self.assertEqual(pool.seq_length(1), 0)

    def test_a_closed_device_array_is_a_closed_error(self):
        q = self.gpu.device_array(self.dev["q"].shape)
        q.close()
        with self.assertRaisesRegex(mlart.ClosedError, "^mlart: this DeviceArray is closed$"):
            self.call(q=q)
        with self.assertRaises(mlart.ClosedError):
            self.call(out=q)
