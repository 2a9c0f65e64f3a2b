"""Python binding of mlart (include/mlart.h) over ctypes.

mlart runs DeepSeek-style Multi-head Latent Attention decode behind a
stable C ABI. This package adds only what Python expects — handles as
objects with ``close()`` and ``with``, errors as exceptions, any
buffer-protocol object (``array.array``, ``bytearray``, ``memoryview``,
numpy arrays) for tensors, or, on a CUDA engine, CUDA device arrays
(``__cuda_array_interface__``: torch, CuPy, Numba, `DeviceArray`) — and
checks every buffer against the shape it will be read or written with
before calling C, so the library never reads or writes past a Python
buffer. Argument values (``h_q = 0``, a bad block
id, an unknown sequence) are validated by the library itself and reported
as `MlartError`.

ctypes releases the GIL during every library call: calls may run in
parallel from several threads, under the rules of mlart.h (see `Engine`,
`KvPool`, `Model`).
"""

import array
import collections
import ctypes
import dataclasses
import enum
import functools
import os
import threading
import weakref
from typing import Any, Callable, Optional

from . import _args as A
from . import _ffi as C
from ._args import CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
from ._ffi import ABI_VERSION, LIBRARY_PATH, LibraryError

__all__ = [
    "ABI_VERSION",
    "LIBRARY_PATH",
    "Activations",
    "Backend",
    "CU_STREAM_LEGACY",
    "CU_STREAM_PER_THREAD",
    "ClosedError",
    "CpuIsa",
    "DType",
    "DecodeResult",
    "DeviceArray",
    "DeviceInfo",
    "Engine",
    "EngineInfo",
    "KvFormat",
    "KvPool",
    "KvPoolStats",
    "LibraryError",
    "Memory",
    "MlartError",
    "Model",
    "ModelInfo",
    "Status",
    "ThreadAffinity",
    "abi_version",
    "bf16_to_f32",
    "device_count",
    "device_info",
    "f32_to_bf16",
    "handle_stats",
    "kv_block_bytes",
    "kv_dequantize",
    "kv_quantize",
    "kv_row_bytes",
    "status_name",
    "version",
]

# ---------------------------------------------------------------------------
# Constants (mlart.h)


class Status(enum.IntEnum):
    """mlart_status: the category of a failed call."""

    OK = 0
    INVALID_ARGUMENT = 1
    NULL_POINTER = 2
    OUT_OF_MEMORY = 3
    POOL_EXHAUSTED = 4
    UNSUPPORTED = 5
    DEVICE = 6
    IO = 7
    FORMAT = 8
    NOT_FOUND = 9
    CANCELLED = 10
    INTERNAL = 11


class DType(enum.IntEnum):
    """mlart_dtype: element type of queries, outputs, rows and weights."""

    F32 = 0
    BF16 = 1
    F16 = 2
    FP8_E4M3 = 3


class KvFormat(enum.IntEnum):
    """mlart_kv_format: layout of one KV-cache row."""

    BF16 = 0
    F16 = 1
    F32 = 2
    FP8_V32 = 3
    FP8_MODEL1 = 4


class Memory(enum.IntEnum):
    """mlart_memory: where a call's tensors live. The binding sets it from
    the arrays passed: DEVICE when they are CUDA device arrays
    (``__cuda_array_interface__``), HOST for buffers."""

    HOST = 0
    DEVICE = 1


class Backend(enum.IntEnum):
    """mlart_backend."""

    AUTO = 0
    CPU = 1
    CUDA = 2


class CpuIsa(enum.IntEnum):
    """mlart_cpu_isa: the CPU kernel variant."""

    SCALAR = 0
    AVX2 = 1
    AVX512 = 2
    AMX = 3
    AVX512_BF16 = 4


class ThreadAffinity(enum.IntEnum):
    """mlart_thread_affinity: whether CPU worker threads are pinned."""

    AUTO = 0
    NONE = 1
    PIN = 2


class Activations(enum.IntEnum):
    """mlart_activations: how a model's projections take their inputs."""

    PRECISE = 0
    BF16 = 1


_DTYPE_ALIASES = {
    "f32": 0, "float32": 0, "bf16": 1, "bfloat16": 1, "f16": 2, "float16": 2, "fp8_e4m3": 3,
}
_KV_FORMAT_ALIASES = {"bf16": 0, "f16": 1, "f32": 2, "fp8_v32": 3, "fp8_model1": 4}
_BACKEND_ALIASES = {"auto": 0, "cpu": 1, "cuda": 2}
_AFFINITY_ALIASES = {"auto": 0, "none": 1, "pin": 2}
_ACTIVATIONS_ALIASES = {"precise": 0, "bf16": 1}


def _as_enum(cls, value):
    try:
        return cls(value)
    except ValueError:
        return value


# ---------------------------------------------------------------------------
# Errors


class MlartError(Exception):
    """A failed library call.

    Attributes: ``code`` (the status name, e.g. ``'INVALID_ARGUMENT'``),
    ``status`` (the `Status` number), ``function`` (the C function that
    failed) and ``message`` (the library's message, also ``str(err)``).
    """

    def __init__(self, status, message, function=None):
        super().__init__(message)
        self.status = _as_enum(Status, status)
        self.code = (
            self.status.name if isinstance(self.status, Status) else "STATUS_%d" % status
        )
        self.message = message
        self.function = function

    def __repr__(self):
        return "MlartError(code=%r, function=%r, message=%r)" % (
            self.code,
            self.function,
            self.message,
        )


class ClosedError(ValueError):
    """A method of an Engine, KvPool or Model called after its close()."""


def _check(err, function):
    """Raises MlartError for a non-NULL mlart_error*, always freeing it."""
    if not err:
        return
    try:
        status = C.error_code(err)
        raw = C.error_message(err)
    finally:
        C.error_free(err)
    message = raw.decode("utf-8", "replace") if raw is not None else ""
    raise MlartError(status, message, function)


# ---------------------------------------------------------------------------
# Handles

_stats_lock = threading.Lock()
_stats = {"created": 0, "closed": 0, "finalized": 0}


def _count(key):
    with _stats_lock:
        _stats[key] += 1


def handle_stats():
    """Diagnostics: handles created, closed, and released by the garbage
    collector (``weakref.finalize``) without ``close()``."""
    with _stats_lock:
        return dict(_stats)


def _finalize(free, ptr):
    # The Python object was collected without close(): no call can be in
    # flight (a call holds a reference to it).
    _count("finalized")
    free(ptr)


class _Handle:
    """A C object. A call holds it for its duration (`_acquire` /
    `_release`); `close` marks it closed at once and the C object is freed
    when no call is in flight, so a free never races with a call."""

    _kind = "handle"

    def _init_handle(self, ptr, free):
        self._ptr = ptr
        self._free = free
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _finalize, free, ptr)
        self._finalizer.atexit = False  # the process's exit reclaims everything
        _count("created")

    def _ensure_open(self):
        """Raises ClosedError early, before argument checks (the call itself
        acquires the handle again)."""
        if self._closed:
            raise ClosedError("mlart: this %s is closed" % self._kind)

    def _acquire(self):
        with self._lock:
            if self._closed:
                raise ClosedError("mlart: this %s is closed" % self._kind)
            self._users += 1
            return self._ptr

    def _release(self):
        with self._lock:
            self._users -= 1
            if not (self._closed and self._users == 0 and self._ptr is not None):
                return
            ptr, self._ptr = self._ptr, None
        self._free(ptr)

    @property
    def closed(self):
        """Whether close() has been called."""
        return getattr(self, "_closed", True)

    def close(self):
        """Releases the C object. Safe to call more than once; later calls
        of other methods raise ClosedError. A call in flight on another
        thread finishes first: the C object is freed when it returns."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # construction failed
            return
        with lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer.detach()
            _count("closed")
            if self._users:
                return
            ptr, self._ptr = self._ptr, None
        self._free(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<mlart.%s %s>" % (self._kind, "closed" if self.closed else "open")


class _Using:
    """Acquires handles for one call (context manager)."""

    __slots__ = ("handles", "ptrs")

    def __init__(self, *handles):
        self.handles = []
        self.ptrs = []
        try:
            for h in handles:
                self.ptrs.append(h._acquire())
                self.handles.append(h)
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self):
        return self.ptrs if len(self.ptrs) != 1 else self.ptrs[0]

    def __exit__(self, *exc):
        for h in reversed(self.handles):
            h._release()
        self.handles = []


def _str(raw):
    return raw.decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Activations and outputs


def _dtype_of_format(fmt, dtype, name, dtype_name):
    """The mlart_dtype of a buffer of struct format `fmt` (byte order
    stripped): 'f' is F32, 'e' F16, 'H' (uint16 bits) BF16 or, with
    `dtype` 'f16', F16."""
    dt = A.enum_value(dtype, dtype_name, DType, _DTYPE_ALIASES, None)
    if fmt == "f":
        if dt is not None and dt != DType.F32:
            raise TypeError(
                "%s is a float32 buffer (format 'f') but %s is %r"
                % (name, dtype_name, _dtype_label(dt))
            )
        return int(DType.F32)
    if fmt == "e":
        if dt is not None and dt != DType.F16:
            raise TypeError(
                "%s is a float16 buffer (format 'e') but %s is %r"
                % (name, dtype_name, _dtype_label(dt))
            )
        return int(DType.F16)
    if fmt == "H":
        if dt is None:
            return int(DType.BF16)
        if dt not in (DType.BF16, DType.F16):
            raise TypeError(
                "%s is a uint16 buffer (bf16 or f16 bits, format 'H') but %s is %r"
                % (name, dtype_name, _dtype_label(dt))
            )
        return dt
    raise TypeError(
        "%s must be a float32 (format 'f'), float16 (format 'e') or uint16 "
        "(format 'H': bf16 bits, or f16 bits with %s='f16') buffer, got format %r"
        % (name, dtype_name, fmt)
    )


def _dtype_label(dt):
    try:
        return DType(dt).name.lower()
    except ValueError:
        return dt


def _activation(value, dtype, name, dtype_name, keep, writable=False, device=False):
    """(memoryview, address, mlart_dtype) of an activation buffer; with
    `device`, of a device array too (typestr '<f4', '<f2', or '<u2' / '<i2'
    / '<V2' for bf16 or f16 bits)."""
    what = "a float32, float16 or uint16 (bf16/f16 bits) buffer"
    if value is None:
        raise TypeError("%s is required (%s)" % (name, what))
    mv = A.tensor(value, name, keep, what, device)
    fmt = A.native_format(mv.format)
    if mv.itemsize != {"f": 4, "e": 2, "H": 2}.get(fmt):
        raise TypeError("%s must be %s, got %s" % (name, what, A.describe(value)))
    dt = _dtype_of_format(fmt, dtype, name, dtype_name)
    keep.add(mv)
    return mv, A.address(mv, keep, name, writable=writable), dt


def _no_device_allocation(name, keep):
    raise TypeError(
        "%s is required when the call's tensors are CUDA device memory (%s is): the "
        "binding allocates host outputs only; pass a device array (a DeviceArray from "
        "engine.device_array(...), or a torch/CuPy/Numba one)" % (name, keep.first[0])
    )


def _output(out, dtype, n, name, dtype_name, shape, keep, device=False):
    """(buffer, address, mlart_dtype) of an output of `n` elements: `out`
    checked, or a new ``array.array`` ('f' for f32, 'H' for bf16/f16 bits)
    for a host call (TypeError for a device call)."""
    if out is None:
        if keep.device:
            _no_device_allocation(name, keep)
        dt = A.enum_value(dtype, dtype_name, DType, _DTYPE_ALIASES, int(DType.F32))
        if dt == DType.F32:
            out = array.array("f", bytes(4 * n))
        elif dt in (DType.BF16, DType.F16):
            out = array.array("H", bytes(2 * n))
        else:
            raise ValueError("%s must be 'f32', 'bf16' or 'f16', got %r" % (dtype_name, dtype))
    mv, addr, dt = _activation(out, dtype, name, dtype_name, keep, writable=True, device=device)
    A.need_elements(mv, n, name, shape)
    return out, addr, dt


def _lse(value, n, shape, keep):
    """lse: a float32 buffer (host or device), True (allocate one: host
    calls only), or None/False (none)."""
    if value is True:
        if keep.device:
            _no_device_allocation("lse", keep)
        value = array.array("f", bytes(4 * n))
    elif value is False or value is None:
        return None, None
    mv, addr = A.float32_array(value, "lse", keep, writable=True, device=True)
    A.need_elements(mv, n, "lse", shape)
    return value, addr


DecodeResult = collections.namedtuple("DecodeResult", ["out", "lse"])
DecodeResult.__doc__ = """A decode's output buffer and its lse buffer (None when not requested)."""


def _lower_indices(d, keep, indices, topk, topk_length, batch, s_q, device=True):
    mv, addr = A.int32_array(indices, "indices", keep, device=device)
    d.topk = A.int32(topk, "topk")
    A.need_elements(
        mv, A.prod(batch, s_q, d.topk), "indices",
        "indices [batch=%d, s_q=%d, topk=%d]" % (batch, s_q, d.topk),
    )
    d.indices = addr
    tl, tl_addr = A.int32_array(topk_length, "topk_length", keep, optional=True, device=device)
    if tl is not None:
        A.need_elements(tl, A.prod(batch), "topk_length", "topk_length [batch=%d]" % batch)
    d.topk_length = tl_addr


def _lower_outputs(d, keep, attn_sink, out, out_dtype, lse, batch, s_q, h_q, d_v, stream,
                   sink_device=True):
    """attn_sink, out and lse, then the call's memory and stream."""
    sink, sink_addr = A.float32_array(
        attn_sink, "attn_sink", keep, optional=True, device=sink_device
    )
    if sink is not None:
        A.need_elements(sink, A.prod(h_q), "attn_sink", "attn_sink [h_q=%d]" % h_q)
    d.attn_sink = sink_addr
    n_out = A.prod(batch, s_q, h_q, d_v)
    out, out_addr, d.out_dtype = _output(
        out, out_dtype, n_out, "out", "out_dtype",
        "out [batch=%d, s_q=%d, h_q=%d, d_v=%d]" % (batch, s_q, h_q, d_v), keep, device=True,
    )
    d.out = out_addr
    lse, lse_addr = _lse(
        lse, A.prod(batch, h_q, s_q), "lse [batch=%d, h_q=%d, s_q=%d]" % (batch, h_q, s_q), keep
    )
    d.lse = lse_addr
    d.memory = keep.memory
    d.stream = A.call_stream(stream, keep)
    return DecodeResult(out, lse)


# ---------------------------------------------------------------------------
# Engine


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What an engine runs on (mlart_engine_props)."""

    backend: Any  # Backend (never AUTO)
    cpu_isa: Any  # CpuIsa (CPU engines)
    num_threads: int
    device_index: int
    device_name: str
    cpu_features: str
    reason: str
    thread_placement: str


class Engine(_Handle):
    """A compute engine: one backend (CPU thread pool or GPU), its
    workspace and its memory space.

    Thread-safety (mlart.h): every method may be called concurrently from
    any threads; concurrent decodes share the engine's worker threads.
    Pools and models made from an engine keep the C engine alive: closing
    the Engine first is fine.
    """

    _kind = "Engine"

    def __init__(self, backend=None, *, device_index=None, num_threads=None, thread_affinity=None):
        """`backend`: 'auto' (default), 'cpu', 'cuda', a `Backend` or the C
        value; `num_threads`: CPU worker threads (0/None: one per core);
        `thread_affinity`: 'auto', 'none', 'pin' or a `ThreadAffinity`."""
        opts = C.new_struct("mlart_engine_options")
        opts.backend = A.enum_value(backend, "backend", Backend, _BACKEND_ALIASES, opts.backend)
        opts.device_index = A.int32(device_index, "device_index", opts.device_index)
        opts.num_threads = A.int32(num_threads, "num_threads", opts.num_threads)
        opts.thread_affinity = A.enum_value(
            thread_affinity, "thread_affinity", ThreadAffinity, _AFFINITY_ALIASES,
            opts.thread_affinity,
        )
        out = ctypes.c_void_p()
        _check(C.engine_create(ctypes.byref(opts), ctypes.byref(out)), "mlart_engine_create")
        self._init_handle(out.value, C.engine_free)

    @classmethod
    def create(cls, backend=None, **options):
        """Same as ``Engine(...)``."""
        return cls(backend, **options)

    def info(self):
        """What the engine runs on, as an `EngineInfo`."""
        p = C.new_struct("mlart_engine_props")
        with _Using(self) as ptr:
            _check(C.engine_info(ptr, ctypes.byref(p)), "mlart_engine_info")
        return EngineInfo(
            backend=_as_enum(Backend, p.backend),
            cpu_isa=_as_enum(CpuIsa, p.cpu_isa),
            num_threads=p.num_threads,
            device_index=p.device_index,
            device_name=_str(p.device_name),
            cpu_features=_str(p.cpu_features),
            reason=_str(p.reason),
            thread_placement=_str(p.thread_placement),
        )

    def _backend(self):
        b = getattr(self, "_backend_cache", None)
        if b is None:
            b = self._backend_cache = self.info().backend
        return b

    def device_array(self, shape, dtype="f32"):
        """A new `DeviceArray` of `shape` (an int or a tuple of ints) and
        `dtype` in this CUDA engine's device memory
        (``mlart_engine_mem_alloc``; contents undefined).

        `dtype`: 'f32' (the default), 'f16', 'bf16' (uint16 bits, typestr
        '<u2'), 'int32', 'uint8', 'uint64', ..., a `DType` member, or a
        little-endian typestr ('<f4', '<u2', '|u1', ...). A CPU engine
        raises ValueError: its memory is host memory, so pass host buffers.
        """
        self._ensure_open()
        typestr, itemsize = _device_typestr(dtype)
        if isinstance(shape, (list, tuple)):
            dims = tuple(A.int64(n, "shape[%d]" % i) for i, n in enumerate(shape))
        else:
            dims = (A.int64(shape, "shape"),)
        for i, n in enumerate(dims):
            if n < 0:
                raise ValueError("shape[%d] = %d is negative" % (i, n))
        if self._backend() != Backend.CUDA:
            raise ValueError(
                "device_array needs a CUDA engine: this engine runs on %s, whose memory is "
                "host memory (pass host buffers to it)" % _enum_label(self._backend())
            )
        return DeviceArray(_CREATE, self, dims, typestr, itemsize)

    def to_device(self, data, *, dtype=None, shape=None):
        """A new `DeviceArray` holding a copy of the host buffer `data`:
        its type from the buffer's format ('f' -> '<f4', 'e' -> '<f2', 'H'
        -> '<u2' (bf16 bits), 'i' -> '<i4', 'B' -> '|u1', ...) unless
        `dtype` says otherwise, its shape ``(elements,)`` unless `shape`
        says otherwise (the byte counts must match)."""
        self._ensure_open()
        mv = A.view(data, "data", "a C-contiguous buffer")
        with mv:
            fmt, nbytes, itemsize = mv.format, mv.nbytes, mv.itemsize
        if dtype is None:
            typestr = _FORMAT_TYPESTRS.get((A.native_format(fmt), itemsize))
            if typestr is None:
                raise TypeError(
                    "data has format %r, which has no device type: pass dtype=" % fmt
                )
            dtype = typestr
        typestr, size = _device_typestr(dtype)
        if shape is None:
            if nbytes % size:
                raise ValueError(
                    "data has %d bytes, not a multiple of %d (dtype %r)" % (nbytes, size, typestr)
                )
            shape = (nbytes // size,)
        arr = self.device_array(shape, typestr)
        try:
            arr.copy_from(data)
        except BaseException:
            arr.close()
            raise
        return arr

    def decode_paged(
        self, *, batch, h_q, d_qk, d_v, q, kv, num_blocks, block_size,
        s_q=1, softmax_scale=None, causal=None, q_dtype=None, kv_format=None,
        block_table=None, block_table_stride=None, seqlens=None,
        indices=None, topk=None, topk_length=None,
        extra_kv=None, extra_num_blocks=None, extra_block_size=None,
        extra_indices=None, extra_topk=None, extra_topk_length=None,
        attn_sink=None, out=None, out_dtype=None, lse=None, stream=None,
    ):
        """mlart_decode_paged over buffers the caller owns: all host buffers,
        or all CUDA device arrays (``__cuda_array_interface__``: a
        `DeviceArray`, torch/CuPy/Numba arrays) on a CUDA engine.

        Shapes: ``q [batch, s_q, h_q, d_qk]``, ``kv``: ``num_blocks`` blocks
        of `kv_block_bytes` (kv_format, d_qk, block_size) bytes,
        ``block_table [batch, block_table_stride]``, ``seqlens [batch]``
        (dense), or ``indices [batch, s_q, topk]`` and ``topk_length
        [batch]`` (sparse), ``out [batch, s_q, h_q, d_v]``, ``lse [batch,
        h_q, s_q]`` (a float32 buffer, or True to allocate one). `out` is
        allocated when omitted (f32 unless `out_dtype` says 'bf16'/'f16');
        a device call must pass `out` (and `lse`, if wanted).
        `stream` (device calls): None, an int CUstream handle or a stream
        object (see README: streams); None takes the stream the arrays'
        interfaces name, else NULL (the call waits).
        Returns ``DecodeResult(out, lse)``.
        """
        self._ensure_open()
        with A.Keep() as keep:
            d = C.new_struct("mlart_decode_args")
            d.batch = A.int32(batch, "batch")
            d.s_q = A.int32(s_q, "s_q", 1)
            d.h_q = A.int32(h_q, "h_q")
            d.d_qk = A.int32(d_qk, "d_qk")
            d.d_v = A.int32(d_v, "d_v")
            d.softmax_scale = A.number(softmax_scale, "softmax_scale", d.softmax_scale)
            if causal is not None:
                d.causal = bool(causal)
            d.kv_format = A.enum_value(kv_format, "kv_format", KvFormat, _KV_FORMAT_ALIASES, d.kv_format)
            d.num_blocks = A.int32(num_blocks, "num_blocks")
            d.block_size = A.int32(block_size, "block_size")
            b, sq, hq, dqk, dv = d.batch, d.s_q, d.h_q, d.d_qk, d.d_v

            q_mv, d.q, d.q_dtype = _activation(q, q_dtype, "q", "q_dtype", keep, device=True)
            A.need_elements(
                q_mv, A.prod(b, sq, hq, dqk), "q",
                "q [batch=%d, s_q=%d, h_q=%d, d_qk=%d]" % (b, sq, hq, dqk),
            )

            kv_mv, d.kv = A.byte_buffer(kv, "kv", keep, device=True)
            block_bytes = kv_block_bytes(d.kv_format, dqk, d.block_size)
            A.need_bytes(
                kv_mv, A.prod(d.num_blocks) * block_bytes, "kv",
                "kv [num_blocks=%d] x %d-byte blocks" % (d.num_blocks, block_bytes),
            )

            sparse = indices is not None
            bt, bt_addr = A.int32_array(
                block_table, "block_table", keep, optional=sparse, device=True
            )
            sl, sl_addr = A.int32_array(seqlens, "seqlens", keep, optional=sparse, device=True)
            if bt is not None:
                d.block_table_stride = A.int32(block_table_stride, "block_table_stride")
                A.need_elements(
                    bt, A.prod(b, d.block_table_stride), "block_table",
                    "block_table [batch=%d, block_table_stride=%d]" % (b, d.block_table_stride),
                )
            else:
                d.block_table_stride = A.int32(
                    block_table_stride, "block_table_stride", d.block_table_stride
                )
            if sl is not None:
                A.need_elements(sl, A.prod(b), "seqlens", "seqlens [batch=%d]" % b)
            d.block_table = bt_addr
            d.seqlens = sl_addr

            if sparse:
                _lower_indices(d, keep, indices, topk, topk_length, b, sq)
            elif topk_length is not None:
                raise TypeError("topk_length is only meaningful with indices (sparse decode)")

            if extra_kv is not None:
                ekv, d.extra_kv = A.byte_buffer(extra_kv, "extra_kv", keep, device=True)
                d.extra_num_blocks = A.int32(extra_num_blocks, "extra_num_blocks")
                d.extra_block_size = A.int32(extra_block_size, "extra_block_size")
                eb = kv_block_bytes(d.kv_format, dqk, d.extra_block_size)
                A.need_bytes(
                    ekv, A.prod(d.extra_num_blocks) * eb, "extra_kv",
                    "extra_kv [extra_num_blocks=%d] x %d-byte blocks" % (d.extra_num_blocks, eb),
                )
                ei, d.extra_indices = A.int32_array(
                    extra_indices, "extra_indices", keep, device=True
                )
                d.extra_topk = A.int32(extra_topk, "extra_topk")
                A.need_elements(
                    ei, A.prod(b, sq, d.extra_topk), "extra_indices",
                    "extra_indices [batch=%d, s_q=%d, extra_topk=%d]" % (b, sq, d.extra_topk),
                )
                etl, d.extra_topk_length = A.int32_array(
                    extra_topk_length, "extra_topk_length", keep, optional=True, device=True
                )
                if etl is not None:
                    A.need_elements(
                        etl, A.prod(b), "extra_topk_length", "extra_topk_length [batch=%d]" % b
                    )
            elif extra_indices is not None or extra_topk_length is not None:
                raise TypeError("extra_indices / extra_topk_length need extra_kv")

            result = _lower_outputs(
                d, keep, attn_sink, out, out_dtype, lse, b, sq, hq, dv, stream
            )
            with _Using(self) as ptr:
                _check(C.decode_paged(ptr, ctypes.byref(d)), "mlart_decode_paged")
            return result


# ---------------------------------------------------------------------------
# KvPool


@dataclasses.dataclass(frozen=True)
class KvPoolStats:
    """Occupancy of a pool (mlart_kv_pool_stats)."""

    blocks_total: int
    blocks_used: int
    blocks_free: int
    sequences: int
    bytes_per_block: int
    bytes_total: int


class KvPool(_Handle):
    """A pool of KV-cache blocks for several layers, holding sequences
    identified by caller-chosen uint64 ids.

    Thread-safety (mlart.h): every method may be called concurrently from
    any threads. Mutations (create/free/fork/truncate_seq, append) are
    serialized against each other and against decodes; decodes and queries
    (seq_length, stats) run concurrently. A decode sees either all or none
    of a concurrent append. The pool keeps its engine alive.
    """

    _kind = "KvPool"

    def __init__(
        self, engine, *, num_blocks=None, kv_format=None, d_qk=None, num_layers=None,
        block_size=None, index_head_dim=None,
    ):
        """`num_blocks` is required (the library rejects its default 0);
        `kv_format` defaults to 'bf16', `d_qk` to 576, `num_layers` to 1,
        `block_size` to 64 and `index_head_dim` (a DeepSeek-V3.2 model's
        ``info().index_head_dim``) to 0, none."""
        if not isinstance(engine, Engine):
            raise TypeError("engine must be an Engine, got %s" % A.describe(engine))
        engine._ensure_open()
        o = C.new_struct("mlart_kv_pool_options")
        o.kv_format = A.enum_value(kv_format, "kv_format", KvFormat, _KV_FORMAT_ALIASES, o.kv_format)
        o.d_qk = A.int32(d_qk, "d_qk", o.d_qk)
        o.num_layers = A.int32(num_layers, "num_layers", o.num_layers)
        o.block_size = A.int32(block_size, "block_size", o.block_size)
        o.num_blocks = A.int32(num_blocks, "num_blocks", o.num_blocks)
        o.index_head_dim = A.int32(index_head_dim, "index_head_dim", o.index_head_dim)
        out = ctypes.c_void_p()
        with _Using(engine) as eptr:
            _check(C.kv_pool_create(eptr, ctypes.byref(o), ctypes.byref(out)), "mlart_kv_pool_create")
        self._init_handle(out.value, C.kv_pool_free)
        self._opts = (
            _as_enum(KvFormat, o.kv_format), o.d_qk, o.num_layers, o.block_size,
            o.num_blocks, o.index_head_dim,
        )

    @property
    def kv_format(self):
        """Cache row format (`KvFormat`)."""
        return self._opts[0]

    @property
    def d_qk(self):
        """Elements per cache row."""
        return self._opts[1]

    @property
    def num_layers(self):
        return self._opts[2]

    @property
    def block_size(self):
        """Tokens per block."""
        return self._opts[3]

    @property
    def num_blocks(self):
        return self._opts[4]

    @property
    def index_head_dim(self):
        """Elements of a DeepSeek-V3.2 indexer key per token and layer; 0 for none."""
        return self._opts[5]

    def stats(self):
        """The pool's occupancy, as `KvPoolStats`."""
        s = C.new_struct("mlart_kv_pool_stats")
        with _Using(self) as ptr:
            _check(C.kv_pool_stats_get(ptr, ctypes.byref(s)), "mlart_kv_pool_stats_get")
        return KvPoolStats(
            s.blocks_total, s.blocks_used, s.blocks_free, s.sequences,
            s.bytes_per_block, s.bytes_total,
        )

    def create_seq(self, seq_id):
        """Creates an empty sequence (an id not in use)."""
        sid = A.seq_id(seq_id, "seq_id")
        with _Using(self) as ptr:
            _check(C.kv_seq_create(ptr, sid), "mlart_kv_seq_create")

    def free_seq(self, seq_id):
        """Frees a sequence; blocks no other sequence shares become free."""
        sid = A.seq_id(seq_id, "seq_id")
        with _Using(self) as ptr:
            _check(C.kv_seq_free(ptr, sid), "mlart_kv_seq_free")

    def fork_seq(self, src_id, dst_id):
        """Creates `dst_id` as a copy-on-write copy of `src_id`."""
        src = A.seq_id(src_id, "src_id")
        dst = A.seq_id(dst_id, "dst_id")
        with _Using(self) as ptr:
            _check(C.kv_seq_fork(ptr, src, dst), "mlart_kv_seq_fork")

    def truncate_seq(self, seq_id, length):
        """Cuts every layer of a sequence to at most `length` tokens."""
        sid = A.seq_id(seq_id, "seq_id")
        n = A.int64(length, "length")
        with _Using(self) as ptr:
            _check(C.kv_seq_truncate(ptr, sid, n), "mlart_kv_seq_truncate")

    def seq_length(self, seq_id, layer=0):
        """Tokens stored in `layer` of a sequence."""
        sid = A.seq_id(seq_id, "seq_id")
        lay = A.int32(layer, "layer")
        out = ctypes.c_int64()
        with _Using(self) as ptr:
            _check(C.kv_seq_length(ptr, sid, lay, ctypes.byref(out)), "mlart_kv_seq_length")
        return out.value

    def append(self, seq_id, layer, rows, *, dtype=None, n_tokens=None):
        """Appends rows ``[n_tokens, d_qk]`` to `layer` of a sequence,
        converted to the pool's format. `rows`: a float32 buffer, a float16
        one, or a uint16 one of bf16 bits (f16 bits with ``dtype='f16'``);
        `n_tokens` defaults to its element count / d_qk. ``rows=None``
        appends nothing."""
        self._ensure_open()
        with A.Keep() as keep:
            sid = A.seq_id(seq_id, "seq_id")
            lay = A.int32(layer, "layer")
            if rows is None and not n_tokens:
                n = 0
                dt = A.enum_value(dtype, "dtype", DType, _DTYPE_ALIASES, int(DType.F32))
                addr = None
            else:
                mv, addr, dt = _activation(rows, dtype, "rows", "dtype", keep)
                if n_tokens is None:
                    have = A.elements(mv)
                    if self.d_qk <= 0 or have % self.d_qk != 0:
                        raise ValueError(
                            "rows has %d elements, not a multiple of the pool's d_qk = %d"
                            % (have, self.d_qk)
                        )
                    n = A.int32(have // self.d_qk, "n_tokens")
                else:
                    n = A.int32(n_tokens, "n_tokens")
                    A.need_elements(
                        mv, A.prod(n, self.d_qk), "rows",
                        "rows [n_tokens=%d, d_qk=%d]" % (n, self.d_qk),
                    )
            with _Using(self) as ptr:
                _check(C.kv_append(ptr, sid, lay, n, dt, addr), "mlart_kv_append")

    def decode(
        self, *, seq_ids, h_q, d_v, q, layer=0, s_q=1, softmax_scale=None, causal=None,
        q_dtype=None, indices=None, topk=None, topk_length=None, attn_sink=None,
        out=None, out_dtype=None, lse=None, stream=None,
    ):
        """mlart_kv_pool_decode: decodes `layer` for the sequences
        `seq_ids` (repeats allowed). ``q [batch, s_q, h_q, d_qk]``,
        ``out [batch, s_q, h_q, d_v]``, ``lse [batch, h_q, s_q]`` (or True);
        sparse ``indices [batch, s_q, topk]`` are logical token positions.
        Returns ``DecodeResult(out, lse)``.

        Device memory (a CUDA engine's pool): `q`, `out` and `lse` may be
        CUDA device arrays (all three, or none), while `seq_ids`, `indices`,
        `topk_length` and `attn_sink` stay host memory (the pool translates
        them on the host); `stream` as for `Engine.decode_paged`."""
        self._ensure_open()
        with A.Keep() as keep:
            d = C.new_struct("mlart_kv_pool_decode_args")
            # q first: it decides the call's memory space (out and lse follow
            # it; the ids are host memory either way).
            q_mv, d.q, d.q_dtype = _activation(q, q_dtype, "q", "q_dtype", keep, device=True)
            n_ids, d.seq_ids = A.seq_id_array(seq_ids, "seq_ids", keep)
            d.layer = A.int32(layer, "layer", 0)
            d.batch = A.int32(n_ids, "len(seq_ids)")
            d.s_q = A.int32(s_q, "s_q", 1)
            d.h_q = A.int32(h_q, "h_q")
            d.d_v = A.int32(d_v, "d_v")
            d.softmax_scale = A.number(softmax_scale, "softmax_scale", d.softmax_scale)
            if causal is not None:
                d.causal = bool(causal)
            b, sq, hq, dv, dqk = d.batch, d.s_q, d.h_q, d.d_v, self.d_qk
            A.need_elements(
                q_mv, A.prod(b, sq, hq, dqk), "q",
                "q [batch=%d, s_q=%d, h_q=%d, d_qk=%d]" % (b, sq, hq, dqk),
            )
            if indices is not None:
                _lower_indices(d, keep, indices, topk, topk_length, b, sq, device=False)
            elif topk_length is not None:
                raise TypeError("topk_length is only meaningful with indices (sparse decode)")
            result = _lower_outputs(
                d, keep, attn_sink, out, out_dtype, lse, b, sq, hq, dv, stream, sink_device=False
            )
            with _Using(self) as ptr:
                _check(C.kv_pool_decode(ptr, ctypes.byref(d)), "mlart_kv_pool_decode")
            return result


# ---------------------------------------------------------------------------
# Model


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model is (mlart_model_props)."""

    num_layers: int
    first_layer: int
    loaded_layers: int
    hidden_size: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    d_qk: int
    rope_theta: float
    yarn: bool
    yarn_factor: float
    yarn_original_max_position: int
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_mscale: float
    yarn_mscale_all_dim: float
    softmax_scale: float
    weight_dtype: Any  # DType
    bytes_loaded: int
    activations: Any  # Activations
    projection_isa: Any  # CpuIsa
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    projections_on_gpu: bool
    kept_keys_bytes: int  # the load option in effect; 0 resolved to 1 GiB


class _ProgressState:
    __slots__ = ("fn", "exc")

    def __init__(self, fn):
        self.fn = fn
        self.exc = None


def _gpu_projections(value, default):
    """True (1, the GPU), False (0, the CPU), None (the default, -1), or
    the C value as an int (others are the library's to reject)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, float):
        raise TypeError("gpu_projections must be an integer (the C value -1, 0 or 1), got %s" % A.describe(value))
    if isinstance(value, int) or hasattr(value, "__index__"):
        return A.int32(value, "gpu_projections")
    raise TypeError(
        "gpu_projections must be a bool (or the C value -1, 0 or 1), got %s" % A.describe(value)
    )


_CREATE = object()


# ---------------------------------------------------------------------------
# Device memory

_DEVICE_DTYPES = {
    "f32": "<f4", "float32": "<f4", "f16": "<f2", "float16": "<f2",
    "bf16": "<u2", "bfloat16": "<u2", "uint16": "<u2", "int16": "<i2",
    "i32": "<i4", "int32": "<i4", "u32": "<u4", "uint32": "<u4",
    "u8": "|u1", "uint8": "|u1", "bytes": "|u1", "i8": "|i1", "int8": "|i1",
    "u64": "<u8", "uint64": "<u8", "i64": "<i8", "int64": "<i8", "f64": "<f8", "float64": "<f8",
}

_FORMAT_TYPESTRS = {
    ("f", 4): "<f4", ("e", 2): "<f2", ("d", 8): "<f8", ("H", 2): "<u2", ("h", 2): "<i2",
    ("i", 4): "<i4", ("l", 4): "<i4", ("I", 4): "<u4", ("L", 4): "<u4",
    ("B", 1): "|u1", ("b", 1): "|i1", ("c", 1): "|u1",
    ("Q", 8): "<u8", ("L", 8): "<u8", ("q", 8): "<i8", ("l", 8): "<i8",
}

# A device array's typestr -> the array.array type code to_host() gives
# (array has no f16 code: f16 comes back as its bits, 'H').
_HOST_CODES = {
    "<f4": "f", "<f8": "d", "<u2": "H", "<i2": "h", "<V2": "H", "<f2": "H", "<i4": "i",
    "<u4": "I",
    "|u1": "B", "|i1": "b", "<u8": "Q", "<i8": "q",
}


def _enum_label(v):
    return v.name.lower() if isinstance(v, enum.Enum) else repr(v)


def _device_typestr(dtype):
    """(typestr, itemsize) of a DeviceArray dtype."""
    if isinstance(dtype, DType):
        if dtype == DType.FP8_E4M3:
            raise ValueError("dtype fp8_e4m3 has no device array type: use 'uint8'")
        return {DType.F32: ("<f4", 4), DType.BF16: ("<u2", 2), DType.F16: ("<f2", 2)}[dtype]
    if isinstance(dtype, enum.Enum) or isinstance(dtype, bool):
        raise TypeError("dtype must be a DType, a string or a typestr, got %s" % A.describe(dtype))
    if not isinstance(dtype, str):
        as_str = getattr(dtype, "str", None)  # a numpy dtype
        if not isinstance(as_str, str):
            raise TypeError(
                "dtype must be a DType, a string or a typestr, got %s" % A.describe(dtype)
            )
        dtype = as_str
    typestr = _DEVICE_DTYPES.get(dtype.lower())
    if typestr is None:
        t = dtype
        if len(t) >= 3 and t[0] == "=" and A._LITTLE:
            t = "<" + t[1:]
        if len(t) >= 3 and t[0] in "<|" and t[2:].isdigit():
            size = int(t[2:])
            if (t[1], size) in A._TYPESTR_FORMATS and (t[0] == "<" or size == 1):
                typestr = ("|" if size == 1 else "<") + t[1:]
    if typestr is None:
        raise ValueError(
            "dtype = %r is not one of %s, nor a little-endian typestr such as '<f4'"
            % (dtype, ", ".join(repr(k) for k in _DEVICE_DTYPES))
        )
    return typestr, int(typestr[2:])


def _free_device(engine, eptr, ptr):
    """Frees a DeviceArray's memory, then lets go of its engine."""
    try:
        err = C.engine_mem_free(eptr, ptr)
    finally:
        engine._release()
    _check(err, "mlart_engine_mem_free")


class DeviceArray(_Handle):
    """Device memory of a CUDA engine (``mlart_engine_mem_alloc``), made by
    `Engine.device_array` or `Engine.to_device`, exposed to every call that
    takes device arrays (and to torch, CuPy, Numba) through
    ``__cuda_array_interface__`` (version 3, C-contiguous, ``stream``
    None: its data is ready for any stream after a copy).

    ``close()`` (or a ``with`` block, or garbage collection) frees it; a
    call in flight on it finishes first. It keeps its engine alive, as a
    pool does: closing the Engine first is fine. Work enqueued on a stream
    that uses it must be finished before it is freed.
    """

    _kind = "DeviceArray"
    _mlart_device_array = True  # acquired for the duration of calls that take it

    def __init__(self, _token, engine, shape, typestr, itemsize):
        if _token is not _CREATE:
            raise TypeError("use engine.device_array(shape, dtype) to make a DeviceArray")
        nbytes = A.prod(*shape) * itemsize
        eptr = engine._acquire()
        try:
            out = ctypes.c_void_p()
            _check(
                C.engine_mem_alloc(eptr, nbytes, ctypes.byref(out)), "mlart_engine_mem_alloc"
            )
        except BaseException:
            engine._release()
            raise
        self._engine = engine
        self._eptr = eptr
        self._shape = tuple(shape)
        self._typestr = typestr
        self._itemsize = itemsize
        self._nbytes = nbytes
        self._init_handle(out.value, functools.partial(_free_device, engine, eptr))

    @property
    def shape(self):
        return self._shape

    @property
    def typestr(self):
        """The element type as ``__cuda_array_interface__`` spells it ('<f4', '<u2', ...)."""
        return self._typestr

    @property
    def itemsize(self):
        return self._itemsize

    @property
    def size(self):
        """Elements."""
        return A.prod(*self._shape)

    @property
    def nbytes(self):
        return self._nbytes

    @property
    def engine(self):
        """The Engine whose memory this is."""
        return self._engine

    @property
    def address(self):
        """The device address (an int)."""
        self._ensure_open()
        return self._ptr

    @property
    def __cuda_array_interface__(self):
        if self._closed:
            raise ClosedError("mlart: this DeviceArray is closed")
        return {
            "shape": self._shape,
            "typestr": self._typestr,
            "data": (self._ptr, False),
            "strides": None,
            "stream": None,
            "version": 3,
        }

    def _copy(self, other, name, to_device):
        """mlart_engine_mem_copy between this array and `other` (a host
        buffer or a device array) of exactly its byte count."""
        self._ensure_open()
        with A.Keep() as keep:
            dev = A.cuda_array(other, name, keep)
            if dev is not None:
                if not to_device and dev.readonly:
                    raise TypeError("%s must be writable, got a read-only device array %s"
                                    % (name, A.describe(other)))
                n, addr, mem = dev.nbytes, dev.ptr, int(Memory.DEVICE)
            else:
                what = "a C-contiguous host buffer or a device array"
                mv = keep.add(A.view(other, name, what))
                n, mem = mv.nbytes, int(Memory.HOST)
                addr = A.address(mv, keep, name, writable=not to_device)
            if n != self._nbytes:
                raise ValueError(
                    "%s has %d bytes but the DeviceArray %r holds %d: copies are whole arrays"
                    % (name, n, self, self._nbytes)
                )
            with _Using(self) as ptr:
                if to_device:
                    err = C.engine_mem_copy(self._eptr, ptr, int(Memory.DEVICE), addr, mem, n)
                else:
                    err = C.engine_mem_copy(self._eptr, addr, mem, ptr, int(Memory.DEVICE), n)
                _check(err, "mlart_engine_mem_copy")

    def copy_from(self, src):
        """Copies `src` (a host buffer, or a device array) into this array;
        its byte count must be this array's. Returns self."""
        self._copy(src, "src", True)
        return self

    def copy_to(self, dst):
        """Copies this array into `dst` (a writable host buffer, or a
        device array) of the same byte count. Returns `dst`."""
        self._copy(dst, "dst", False)
        return dst

    def to_host(self):
        """A host copy: an ``array.array`` of the matching type code ('f'
        for '<f4', 'H' for '<u2' (bf16 bits) and for '<f2' (f16 bits: pass
        ``dtype='f16'`` where they go back in), 'i' for '<i4', 'B' for
        '|u1', ...)."""
        code = _HOST_CODES.get(self._typestr)
        if code is not None:
            out = array.array(code, bytes(self._nbytes))
        else:
            out = bytearray(self._nbytes)
        return self.copy_to(out)

    def __repr__(self):
        return "<mlart.DeviceArray %s shape=%r typestr=%r>" % (
            "closed" if self.closed else "open", getattr(self, "_shape", None),
            getattr(self, "_typestr", None),
        )


class Model(_Handle):
    """A loaded model: the attention weights of a range of layers of a
    DeepSeek V2/V2-Lite/V3/V3.2 checkpoint. Made by `Model.load`.

    Thread-safety (mlart.h): immutable after loading; any number of threads
    may run `forward` at once on disjoint sets of sequences (forwards that
    share a sequence must not overlap). A model keeps its engine alive.
    """

    _kind = "Model"

    def __init__(self, _token, _ptr):
        if _token is not _CREATE:
            raise TypeError("use Model.load(engine, dir, ...) to make a Model")
        self._init_handle(_ptr, C.model_free)
        try:
            self._info = self.info()
        except BaseException:
            self.close()
            raise

    @classmethod
    def load(
        cls, engine, dir, *, first_layer=None, num_layers=None, convert_weights=None,
        weight_dtype=None, activations=None, gpu_projections=None, kept_keys_bytes=None,
        progress: Optional[Callable[[float, str], Any]] = None,
    ):
        """Loads config.json and the attention tensors of a checkpoint
        directory.

        `progress(fraction, stage)` is called during the load; returning
        False cancels it (an MlartError with code 'CANCELLED'); an
        exception it raises cancels the load and is re-raised here.
        `activations`: 'precise' (default) or 'bf16'; `gpu_projections`:
        True, False or None (the default; CPU engines ignore it).

        `kept_keys_bytes`: the most bytes of up-projected keys (K and V of
        every head) one `forward` keeps between the passes of a long prompt
        (a sequence's new tokens past 512 run in passes); past it, the
        positions beyond the kept ones are up-projected again in every pass,
        which costs time, not correctness. None or 0: the default of 1 GiB;
        less than one 64-position block's rows keeps none; ``2**64 - 1``
        sets no limit. An int in [0, 2**64); ``info().kept_keys_bytes`` is
        the value in effect.
        """
        if not isinstance(engine, Engine):
            raise TypeError("engine must be an Engine, got %s" % A.describe(engine))
        engine._ensure_open()
        if isinstance(dir, (str, bytes, os.PathLike)):
            path = os.fsencode(dir)
        else:
            raise TypeError("dir must be a str or os.PathLike, got %s" % A.describe(dir))
        if b"\0" in path:
            raise ValueError("dir contains a NUL byte: %r" % (dir,))
        o = C.new_struct("mlart_model_options")
        o.first_layer = A.int32(first_layer, "first_layer", o.first_layer)
        o.num_layers = A.int32(num_layers, "num_layers", o.num_layers)
        if convert_weights is not None:
            o.convert_weights = bool(convert_weights)
        o.weight_dtype = A.enum_value(weight_dtype, "weight_dtype", DType, _DTYPE_ALIASES, o.weight_dtype)
        o.activations = A.enum_value(
            activations, "activations", Activations, _ACTIVATIONS_ALIASES, o.activations
        )
        o.gpu_projections = _gpu_projections(gpu_projections, o.gpu_projections)
        o.kept_keys_bytes = A.uint64(kept_keys_bytes, "kept_keys_bytes", o.kept_keys_bytes)

        state = None
        callback = None
        if progress is not None:
            if not callable(progress):
                raise TypeError("progress must be callable, got %s" % A.describe(progress))
            state = _ProgressState(progress)

            def trampoline(fraction, stage, _user_data):
                if state.exc is not None:
                    return False
                try:
                    r = state.fn(float(fraction), _str(stage) if stage is not None else "")
                    return r is None or bool(r)
                except BaseException as e:  # noqa: B036 - re-raised by load()
                    state.exc = e
                    return False

            callback = C.PROGRESS_FN(trampoline)
            o.progress = callback

        out = ctypes.c_void_p()
        with _Using(engine) as eptr:
            err = C.model_load(eptr, path, ctypes.byref(o), ctypes.byref(out))
        del callback  # the library keeps no pointer to it after the call
        if state is not None and state.exc is not None:
            exc = state.exc
            state.exc = None
            if err:
                C.error_free(err)
            elif out.value:
                C.model_free(out.value)
            raise exc
        _check(err, "mlart_model_load")
        return cls(_CREATE, out.value)

    def info(self):
        """What the model is, as `ModelInfo`."""
        p = C.new_struct("mlart_model_props")
        with _Using(self) as ptr:
            _check(C.model_info(ptr, ctypes.byref(p)), "mlart_model_info")
        return ModelInfo(
            num_layers=p.num_layers,
            first_layer=p.first_layer,
            loaded_layers=p.loaded_layers,
            hidden_size=p.hidden_size,
            num_heads=p.num_heads,
            q_lora_rank=p.q_lora_rank,
            kv_lora_rank=p.kv_lora_rank,
            qk_nope_head_dim=p.qk_nope_head_dim,
            qk_rope_head_dim=p.qk_rope_head_dim,
            v_head_dim=p.v_head_dim,
            d_qk=p.d_qk,
            rope_theta=p.rope_theta,
            yarn=bool(p.yarn),
            yarn_factor=p.yarn_factor,
            yarn_original_max_position=p.yarn_original_max_position,
            yarn_beta_fast=p.yarn_beta_fast,
            yarn_beta_slow=p.yarn_beta_slow,
            yarn_mscale=p.yarn_mscale,
            yarn_mscale_all_dim=p.yarn_mscale_all_dim,
            softmax_scale=p.softmax_scale,
            weight_dtype=_as_enum(DType, p.weight_dtype),
            bytes_loaded=p.bytes_loaded,
            activations=_as_enum(Activations, p.activations),
            projection_isa=_as_enum(CpuIsa, p.projection_isa),
            index_n_heads=p.index_n_heads,
            index_head_dim=p.index_head_dim,
            index_topk=p.index_topk,
            projections_on_gpu=p.projections_on_gpu != 0,
            kept_keys_bytes=p.kept_keys_bytes,
        )

    def forward(self, pool, *, layer, seq_ids, n_tokens, x, x_dtype=None, out=None,
                out_dtype=None, index_out=None, stream=None):
        """Runs one layer's MLA attention block for a batch of sequences,
        appending their new cache rows to `pool`.

        ``x``, ``out``: ``[sum(n_tokens), hidden_size]`` (out allocated,
        f32 unless `out_dtype` says otherwise, when omitted); `n_tokens`:
        an int (one sequence) or one int per sequence. DeepSeek-V3.2 models
        only: a writable int32 `index_out` ``[sum(n_tokens), index_topk]``
        receives the positions each new token attended to (ascending, -1
        after the last). Returns `out`.

        `x` and `out` may both be CUDA device arrays (a model whose
        projections run on the GPU, ``info().projections_on_gpu``, over a
        pool of the same engine; 16-byte aligned); `out` must then be given.
        `seq_ids`, `n_tokens` and `index_out` stay host memory. `stream` as
        for `Engine.decode_paged`.
        """
        if not isinstance(pool, KvPool):
            raise TypeError("pool must be a KvPool, got %s" % A.describe(pool))
        self._ensure_open()
        pool._ensure_open()
        with A.Keep() as keep:
            f = C.new_struct("mlart_forward_args")
            n_ids, f.seq_ids = A.seq_id_array(seq_ids, "seq_ids", keep)
            f.layer = A.int32(layer, "layer")
            f.batch = A.int32(n_ids, "len(seq_ids)")
            if isinstance(n_tokens, int) and not isinstance(n_tokens, bool):
                n_tokens = [A.int32(n_tokens, "n_tokens")]
            nt, f.n_tokens = A.int32_array(n_tokens, "n_tokens", keep)
            A.need_elements(nt, n_ids, "n_tokens", "n_tokens [batch=%d]" % n_ids)
            with nt.cast("B") as raw, raw.cast("i") as counts:
                total = sum(max(0, counts[i]) for i in range(n_ids))
            hidden = self._info.hidden_size
            shape = "[sum(n_tokens)=%d, hidden_size=%d]" % (total, hidden)
            x_mv, f.x, f.x_dtype = _activation(x, x_dtype, "x", "x_dtype", keep, device=True)
            A.need_elements(x_mv, A.prod(total, hidden), "x", "x " + shape)
            out, f.out, f.out_dtype = _output(
                out, out_dtype, A.prod(total, hidden), "out", "out_dtype", "out " + shape, keep,
                device=True,
            )
            if index_out is not None:
                # Without an indexer the library rejects index_out, naming it.
                topk = self._info.index_topk
                io, f.index_out = A.int32_out(index_out, "index_out", keep)
                A.need_elements(
                    io, A.prod(total, topk), "index_out",
                    "index_out [sum(n_tokens)=%d, index_topk=%d]" % (total, topk),
                )
            f.memory = keep.memory
            f.stream = A.call_stream(stream, keep)
            with _Using(self, pool) as (mptr, pptr):
                _check(C.model_forward(mptr, pptr, ctypes.byref(f)), "mlart_model_forward")
            return out


# ---------------------------------------------------------------------------
# Free functions


def version():
    """The library version, "MAJOR.MINOR.PATCH"."""
    return _str(C.version())


def abi_version():
    """The ABI version of the loaded library (see `ABI_VERSION`)."""
    return C.abi_version()


def kv_row_bytes(format, d_qk):
    """Bytes one token occupies in `format` with rows of `d_qk`."""
    out = ctypes.c_size_t()
    _check(
        C.kv_row_bytes(
            A.enum_value(format, "format", KvFormat, _KV_FORMAT_ALIASES),
            A.int32(d_qk, "d_qk"),
            ctypes.byref(out),
        ),
        "mlart_kv_row_bytes",
    )
    return out.value


def kv_block_bytes(format, d_qk, block_size):
    """Bytes of one cache block (padding included: the stride between blocks)."""
    out = ctypes.c_size_t()
    _check(
        C.kv_block_bytes(
            A.enum_value(format, "format", KvFormat, _KV_FORMAT_ALIASES),
            A.int32(d_qk, "d_qk"),
            A.int32(block_size, "block_size"),
            ctypes.byref(out),
        ),
        "mlart_kv_block_bytes",
    )
    return out.value


def _blocks_bytes(n, block_size, block_bytes):
    return -(-max(0, n) // block_size) * block_bytes if block_size > 0 else 0


def kv_quantize(format, d_qk, block_size, rows, *, dtype=None, n_tokens=None, dst=None):
    """Writes rows ``[n_tokens, d_qk]`` (float32, float16, or uint16 bf16/f16
    bits) into ``ceil(n_tokens / block_size)`` blocks of `format` (FP8
    formats quantized as FlashMLA does). Returns `dst`, a new bytearray
    when not given (then slots past n_tokens in the last block are zero)."""
    with A.Keep() as keep:
        f = A.enum_value(format, "format", KvFormat, _KV_FORMAT_ALIASES)
        d = A.int32(d_qk, "d_qk")
        bs = A.int32(block_size, "block_size")
        mv, src_addr, dt = _activation(rows, dtype, "rows", "dtype", keep)
        if n_tokens is None:
            have = A.elements(mv)
            if d <= 0 or have % d != 0:
                raise ValueError("rows has %d elements, not a multiple of d_qk = %d" % (have, d))
            n = A.int32(have // d, "n_tokens")
        else:
            n = A.int32(n_tokens, "n_tokens")
            A.need_elements(mv, A.prod(n, d), "rows", "rows [n_tokens=%d, d_qk=%d]" % (n, d))
        bb = kv_block_bytes(f, d, bs)
        need = _blocks_bytes(n, bs, bb)
        if dst is None:
            dst = bytearray(need)
        dmv, dst_addr = A.byte_buffer(dst, "dst", keep, writable=True)
        A.need_bytes(
            dmv, need, "dst", "ceil(n_tokens=%d / block_size=%d) blocks of %d bytes" % (n, bs, bb)
        )
        _check(C.kv_quantize(f, d, bs, n, dt, src_addr, dst_addr), "mlart_kv_quantize")
        return dst


def kv_dequantize(format, d_qk, block_size, n_tokens, src, *, dtype=None, out=None):
    """Reads `n_tokens` tokens from blocks of `format` as rows ``[n_tokens,
    d_qk]``: an array('f') by default (exact for every format), or uint16
    bits with ``dtype='bf16'`` / ``'f16'``, or into `out`."""
    with A.Keep() as keep:
        f = A.enum_value(format, "format", KvFormat, _KV_FORMAT_ALIASES)
        d = A.int32(d_qk, "d_qk")
        bs = A.int32(block_size, "block_size")
        n = A.int32(n_tokens, "n_tokens")
        smv, src_addr = A.byte_buffer(src, "src", keep)
        bb = kv_block_bytes(f, d, bs)
        A.need_bytes(
            smv, _blocks_bytes(n, bs, bb), "src",
            "ceil(n_tokens=%d / block_size=%d) blocks of %d bytes" % (n, bs, bb),
        )
        out, out_addr, dt = _output(
            out, dtype, A.prod(n, d), "out", "dtype", "out [n_tokens=%d, d_qk=%d]" % (n, d), keep
        )
        _check(C.kv_dequantize(f, d, bs, n, src_addr, dt, out_addr), "mlart_kv_dequantize")
        return out


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """One CUDA device (mlart_device_props)."""

    device_index: int
    name: str
    compute_major: int
    compute_minor: int
    sm_count: int
    total_memory: int
    has_kernels: bool
    kernels: str


def device_count():
    """Number of CUDA devices (0 without a driver)."""
    out = ctypes.c_int32()
    _check(C.device_count(ctypes.byref(out)), "mlart_device_count")
    return out.value


def device_info(index):
    """Describes CUDA device `index`, as `DeviceInfo`."""
    i = A.int32(index, "index")
    p = C.new_struct("mlart_device_props")
    _check(C.device_info(i, ctypes.byref(p)), "mlart_device_info")
    return DeviceInfo(
        device_index=p.device_index,
        name=_str(p.name),
        compute_major=p.compute_major,
        compute_minor=p.compute_minor,
        sm_count=p.sm_count,
        total_memory=p.total_memory,
        has_kernels=bool(p.has_kernels),
        kernels=_str(p.kernels),
    )


def status_name(status):
    """The library's human-readable name of a status ("invalid argument", ...)."""
    if isinstance(status, Status):
        status = int(status)
    return _str(C.status_name(A.uint32(status, "status")))


# bf16 helpers (round to nearest even; NaN stays NaN) ------------------------


def _f32_bits(src, name):
    """uint32 bit patterns of `src` (a float32 buffer or floats)."""
    try:
        mv = memoryview(src)
    except TypeError:
        mv = None
    if mv is not None:
        fmt = A.native_format(mv.format)
        if fmt != "f" or mv.itemsize != 4:
            raise TypeError("%s must be a float32 buffer or an iterable of floats, got %s" % (name, A.describe(src)))
        if not mv.c_contiguous:
            raise ValueError("%s must be C-contiguous, got %s" % (name, A.describe(src)))
        return mv.cast("B").cast("I")
    return memoryview(array.array("f", src)).cast("B").cast("I")


def f32_to_bf16(src):
    """bf16 bits (array('H')) of float32 values, rounded to nearest even."""
    bits = _f32_bits(src, "src")
    out = array.array("H", bytes(2 * len(bits)))
    for i, u in enumerate(bits):
        if (u & 0x7FFFFFFF) > 0x7F800000:
            out[i] = (u >> 16) | 0x40  # quiet NaN
        else:
            out[i] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return out


def bf16_to_f32(src):
    """float32 values (array('f')) of bf16 bits (a uint16 buffer or ints)."""
    try:
        mv = memoryview(src)
    except TypeError:
        vals = []
        for i, v in enumerate(src):
            u = A.uint32(v, "src[%d]" % i)
            if u > 0xFFFF:
                raise ValueError("src[%d] = %d is not a 16-bit bf16 bit pattern" % (i, u))
            vals.append(u)
    else:
        if A.native_format(mv.format) != "H" or mv.itemsize != 2:
            raise TypeError(
                "src must be a uint16 buffer (format 'H') or an iterable of ints, got %s"
                % A.describe(src)
            )
        if not mv.c_contiguous:
            raise ValueError("src must be C-contiguous, got %s" % A.describe(src))
        vals = mv.cast("B").cast("H")
    out = array.array("f")
    out.frombytes(array.array("I", [v << 16 for v in vals]).tobytes())
    return out
