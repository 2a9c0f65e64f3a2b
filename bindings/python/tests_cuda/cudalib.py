"""Support for the CUDA device-memory tests: the environment they need, a
ctypes view of the CUDA driver for streams (the tests have no CUDA runtime,
torch or CuPy), device arrays as other libraries expose them, paged caches
built with mlart.kv_quantize, and a recorder of the structs the binding
passes to C.

These tests run on a CUDA engine: a GPU, or the project's emulated driver
(kernels/emu/fake_cuda.cpp built as libcuda.so.1, found through
LD_LIBRARY_PATH). They fail, never skip, when MLART_TEST_CUDA=1 is not set
or no CUDA engine can be created.
"""

import array
import contextlib
import ctypes
import math
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
if TESTS not in sys.path:
    sys.path.insert(1, TESTS)

import testlib  # noqa: E402  (puts this checkout's package first on sys.path)
import mlart  # noqa: E402
from mlart import _ffi  # noqa: E402
from testlib import reference as R  # noqa: E402

SETUP = (
    "these tests need a CUDA engine. Without a GPU, build the emulated driver "
    "(`c++ -std=c++17 -O1 -shared -fPIC -w -I kernels kernels/emu/fake_cuda.cpp -o DIR/libcuda.so.1` "
    "and `ln -s libcuda.so.1 DIR/libcuda.so` at the repository root), build the library with "
    "its CUDA kernels (`CUDA_HOME=$PWD/.cuda cargo build --release`), and run with "
    "LD_LIBRARY_PATH=DIR MLART_TEST_CUDA=1 (plus MLART_TEST_SMALL_MODEL_DIR for the model "
    "tests). `cargo test --release --test bindings python_binding_cuda` does all of this."
)


def require_env():
    if os.environ.get("MLART_TEST_CUDA") != "1":
        raise AssertionError("MLART_TEST_CUDA=1 is not set: " + SETUP)


def cuda_engine():
    """A new CUDA engine, or an AssertionError saying how to get one."""
    require_env()
    try:
        e = mlart.Engine("cuda")
    except mlart.MlartError as err:
        raise AssertionError(
            "no CUDA engine can be created (%s: %s): %s" % (err.code, err, SETUP)
        ) from None
    if e.info().backend != mlart.Backend.CUDA:
        e.close()
        raise AssertionError("Engine('cuda') did not make a CUDA engine: " + SETUP)
    return e


def small_model_dir():
    """The `small` checkpoint (d_qk 576: the smallest model a CUDA engine runs)."""
    require_env()
    return testlib.checkpoint_dir("MLART_TEST_SMALL_MODEL_DIR", "small", 1)


class CudaTestCase(unittest.TestCase):
    """Tests sharing one CUDA engine (``self.gpu``) and one CPU engine
    (``self.cpu``), made for the class."""

    @classmethod
    def setUpClass(cls):
        cls.gpu = cuda_engine()
        cls.cpu = mlart.Engine("cpu")

    @classmethod
    def tearDownClass(cls):
        cls.gpu.close()
        cls.cpu.close()

    def upload(self, data, **kw):
        """A DeviceArray copy of a host buffer, closed after the test."""
        d = self.gpu.to_device(data, **kw)
        self.addCleanup(d.close)
        return d

    def empty(self, shape, dtype="f32", fill=0xFF):
        """A DeviceArray of `shape`, every byte `fill`, closed after the test."""
        d = self.gpu.device_array(shape, dtype)
        self.addCleanup(d.close)
        d.copy_from(bytes([fill]) * d.nbytes)
        return d


# ---------------------------------------------------------------------------
# The CUDA driver, for streams


class Driver:
    """The CUDA driver the library runs on (libcuda.so.1: NVIDIA's, or the
    emulated one), for creating, synchronizing and destroying streams."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise AssertionError("cannot load libcuda.so.1 (%s): %s" % (e, SETUP)) from None
        self.call("cuInit", 0)
        dev = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(dev), 0)
        ctx = ctypes.c_void_p()
        self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
        self.call("cuCtxSetCurrent", ctx)

    def call(self, name, *args):
        f = getattr(self.lib, name)
        f.restype = ctypes.c_int
        r = f(*args)
        if r != 0:
            raise AssertionError("%s failed: CUresult %d" % (name, r))

    def stream(self):
        """A new stream (CU_STREAM_NON_BLOCKING), as an int handle."""
        s = ctypes.c_void_p()
        self.call("cuStreamCreate", ctypes.byref(s), 1)
        return s.value

    def synchronize(self, s):
        self.call("cuStreamSynchronize", ctypes.c_void_p(s))

    def destroy(self, s):
        self.call("cuStreamDestroy_v2", ctypes.c_void_p(s))


class TorchStream:
    """Shaped like torch.cuda.Stream: the handle in `cuda_stream`."""

    def __init__(self, handle):
        self.cuda_stream = handle


class CupyStream:
    """Shaped like cupy.cuda.Stream: the handle in `ptr`."""

    def __init__(self, handle):
        self.ptr = handle


class ProtocolStream:
    """The CUDA stream protocol (cuda.core): __cuda_stream__() -> (0, handle)."""

    def __init__(self, handle):
        self.handle_value = handle

    def __cuda_stream__(self):
        return (0, self.handle_value)


# ---------------------------------------------------------------------------
# Device arrays as other libraries expose them

DROP = object()


class Foreign:
    """A device array as torch, CuPy or Numba exposes one: nothing but
    ``__cuda_array_interface__``, here describing `base`'s memory (a
    DeviceArray the test keeps open) with entries replaced (DROP removes
    one)."""

    def __init__(self, base, **entries):
        self.base = base
        cai = dict(base.__cuda_array_interface__) if base is not None else {}
        for k, v in entries.items():
            if v is DROP:
                cai.pop(k, None)
            else:
                cai[k] = v
        self.cai = cai

    @property
    def __cuda_array_interface__(self):
        return self.cai


class TorchBf16:
    """An older torch's bfloat16 CUDA tensor: reading the interface fails."""

    @property
    def __cuda_array_interface__(self):
        raise TypeError("dtype torch.bfloat16 is not supported by __cuda_array_interface__")


class CpuTensor:
    """A torch CPU tensor: the property raises AttributeError, so it has no
    interface (and no buffer protocol either)."""

    @property
    def __cuda_array_interface__(self):
        raise AttributeError("Can't get __cuda_array_interface__ on non-CUDA tensor type")


# ---------------------------------------------------------------------------
# Recording what the binding passes to C


@contextlib.contextmanager
def recording(function, call=True):
    """Replaces ``mlart._ffi.<function>`` (taking a struct by reference as
    its last argument) with a recorder: yields a list that gets a copy of
    each struct passed (`call`: then calls the library, else returns
    success without calling it)."""
    real = getattr(_ffi, function)
    seen = []

    def recorder(*args):
        s = args[-1]._obj
        seen.append(type(s).from_buffer_copy(s))
        return real(*args) if call else None

    setattr(_ffi, function, recorder)
    try:
        yield seen
    finally:
        setattr(_ffi, function, real)


# ---------------------------------------------------------------------------
# Caches and references


def paged_cache(fmt, d_qk, block_size, seqs, spare=2):
    """A paged cache of each sequence's rows (flat float32 [len, d_qk]),
    written by mlart.kv_quantize into blocks of 0xff bytes (NaN in every
    format, so a slot past a length that were read would show): `spare`
    blocks no sequence uses first, then the sequences' blocks, the last
    sequence's first.

    Returns a dict: kv (bytearray), num_blocks, block_table (array('i')
    [batch, stride]), stride, seqlens (array('i')), keys (per sequence, its
    rows as the cache holds them: mlart.kv_dequantize, exact), pos(b, t)
    (the cache position of token t of sequence b).
    """
    bb = mlart.kv_block_bytes(fmt, d_qk, block_size)
    lens = [len(s) // d_qk for s in seqs]
    need = [-(-n // block_size) for n in lens]
    stride = max([1] + need) + 1
    blocks = [b"\xff" * bb] * spare
    first = [0] * len(seqs)
    keys = [None] * len(seqs)
    for b in reversed(range(len(seqs))):
        first[b] = len(blocks)
        if need[b] == 0:
            keys[b] = []
            continue
        dst = bytearray(b"\xff" * (need[b] * bb))
        mlart.kv_quantize(fmt, d_qk, block_size, seqs[b], dst=dst)
        blocks += [bytes(dst[i * bb:(i + 1) * bb]) for i in range(need[b])]
        keys[b] = R.rows_of(mlart.kv_dequantize(fmt, d_qk, block_size, lens[b], dst), d_qk)
    table = array.array("i", [0x7FFFFFFF] * (len(seqs) * stride))
    for b in range(len(seqs)):
        for j in range(need[b]):
            table[b * stride + j] = first[b] + j
    kv = bytearray(b"".join(blocks))

    def pos(b, t):
        return (first[b] + t // block_size) * block_size + t % block_size

    return dict(
        kv=kv, num_blocks=len(blocks), block_table=table, stride=stride,
        seqlens=array.array("i", lens), keys=keys, pos=pos, block_bytes=bb,
    )


def check_out(test, got, want, lse, want_lse, batch, per, what):
    """The GPU suite's tolerances (tests/cuda_decode.rs): out within 1e-2
    relative L2 per sequence (exactly 0 where no key is seen), lse within
    2e-2 + 4e-3 |lse| (+inf exactly)."""
    got = list(got)
    test.assertTrue(all(math.isfinite(x) for x in got), "%s: out not finite" % what)
    for b in range(batch):
        g, w = got[b * per:(b + 1) * per], want[b * per:(b + 1) * per]
        if all(x == 0.0 for x in w):
            test.assertEqual(g, [0.0] * per, "%s: sequence %d sees no key" % (what, b))
            continue
        e = R.rel_l2(g, w)
        test.assertLessEqual(e, 1e-2, "%s: sequence %d: out rel L2 %.3e" % (what, b, e))
    if lse is not None:
        for j, (g, w) in enumerate(zip(lse, want_lse)):
            if w == math.inf:
                test.assertEqual(g, math.inf, "%s: lse[%d]" % (what, j))
            else:
                test.assertLessEqual(
                    abs(g - w), 2e-2 + 4e-3 * abs(w), "%s: lse[%d] = %r, want %r" % (what, j, g, w)
                )
