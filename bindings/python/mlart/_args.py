"""Python-side argument checks: integers, enumerations and buffers.

Every check here runs before the library is called and raises TypeError or
ValueError naming the argument. Argument *values* the library understands
better (``h_q = 0``, a bad block id, an unknown sequence) are left to it.
"""

import array
import ctypes
import enum
import operator
import sys

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1

_LITTLE = sys.byteorder == "little"


class Keep:
    """Objects that must stay alive (and exported) until a C call returns,
    and the call's memory space.

    A context manager: on exit it drops the ctypes views of the caller's
    buffers and releases the memoryviews, so the buffers are free to be
    resized again even while an exception's traceback keeps the frame, and
    releases the `DeviceArray` handles the call holds (`acquire`).

    The first tensor a device-capable call notes (`note_space`) decides
    whether the call is on host or CUDA device memory; a later tensor of
    the other kind is a TypeError naming it. `streams` collects the
    ``stream`` entries of the device arrays' ``__cuda_array_interface__``."""

    __slots__ = ("refs", "handles", "first", "streams")

    def __init__(self):
        self.refs = []
        self.handles = []
        self.first = None  # (name, is_device, value) of the first tensor noted
        self.streams = []  # (name, stream int or None)

    def add(self, obj):
        self.refs.append(obj)
        return obj

    def acquire(self, handle):
        """Holds `handle` (a DeviceArray) until the call returns: a close()
        meanwhile frees it only then. Raises ClosedError when closed."""
        handle._acquire()
        self.handles.append(handle)

    def note_space(self, name, device, value):
        """Records that tensor `name` is host (`device` False) or device
        memory; TypeError when it differs from the call's first tensor."""
        if self.first is None:
            self.first = (name, device, value)
            return
        first_name, first_device, first_value = self.first
        if device != first_device:
            raise TypeError(
                "%s is %s but %s is %s: a call's tensors must all be host memory or all "
                "CUDA device memory (__cuda_array_interface__)"
                % (name, _space_label(device, value), first_name,
                   _space_label(first_device, first_value))
            )

    @property
    def device(self):
        """Whether the call's tensors are device memory."""
        return self.first is not None and self.first[1]

    @property
    def memory(self):
        """The call's mlart_memory: 1 (MLART_MEMORY_DEVICE) or 0 (HOST)."""
        return 1 if self.device else 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        views = [r for r in self.refs if isinstance(r, memoryview)]
        self.refs = []  # frees the ctypes arrays: their exports end
        for mv in reversed(views):
            try:
                mv.release()
            except BufferError:  # still exported elsewhere: refcounting ends it
                pass
        handles, self.handles = self.handles, []
        for h in reversed(handles):
            h._release()


def _space_label(device, value):
    if device:
        return "CUDA device memory (%s)" % describe(value)
    return "host memory (%s)" % describe(value)


def describe(value):
    """A short description of `value` for messages."""
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float)):
        return "%s %r" % (type(value).__name__, value)
    if isinstance(value, str):
        return "str %r" % value
    try:
        mv = memoryview(value)
    except TypeError:
        return _describe_device(value) or type(value).__name__
    with mv:
        return "%s of format %r with %d elements" % (
            type(value).__name__,
            mv.format,
            mv.nbytes // mv.itemsize if mv.itemsize else 0,
        )


def _integer(value, name, what="an integer"):
    if isinstance(value, (bool, float, enum.Enum)):
        raise TypeError("%s must be %s, got %s" % (name, what, describe(value)))
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError("%s must be %s, got %s" % (name, what, describe(value))) from None


_REQUIRED = object()


def int32(value, name, default=_REQUIRED):
    """An int32_t; None gives `default` (required when not given)."""
    if value is None:
        if default is _REQUIRED:
            raise TypeError("%s is required (an integer)" % name)
        return default
    v = _integer(value, name)
    if not INT32_MIN <= v <= INT32_MAX:
        raise ValueError("%s = %d does not fit in int32_t" % (name, v))
    return v


def int64(value, name):
    v = _integer(value, name)
    if not -(1 << 63) <= v < (1 << 63):
        raise ValueError("%s = %d does not fit in int64_t" % (name, v))
    return v


def uint32(value, name):
    v = _integer(value, name)
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError("%s = %d does not fit in uint32_t" % (name, v))
    return v


def uint64(value, name, default=_REQUIRED):
    """A uint64_t; None gives `default` (required when not given)."""
    if value is None:
        if default is _REQUIRED:
            raise TypeError("%s is required (a non-negative integer)" % name)
        return default
    v = _integer(value, name, "a non-negative integer")
    if not 0 <= v < (1 << 64):
        raise ValueError("%s = %d is outside the uint64_t range" % (name, v))
    return v


def seq_id(value, name="seq_id"):
    """A uint64_t sequence id."""
    v = _integer(value, name, "a non-negative integer")
    if not 0 <= v < (1 << 64):
        raise ValueError("%s = %d is outside the uint64_t range" % (name, v))
    return v


def number(value, name, default):
    """A float (ints and numpy scalars too); None gives `default`."""
    if value is None:
        return default
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError("%s must be a number, got %s" % (name, describe(value)))
    return float(value)


def enum_value(value, name, enum_cls, aliases, default=_REQUIRED):
    """A uint32_t enumeration value: a member of `enum_cls`, one of its
    string `aliases` (case-insensitive) or an int (unknown numbers are the
    library's to reject)."""
    if value is None:
        if default is _REQUIRED:
            raise TypeError(
                "%s is required (one of %s)" % (name, ", ".join(repr(k) for k in aliases))
            )
        return default
    if isinstance(value, enum.Enum):
        if not isinstance(value, enum_cls):
            raise TypeError(
                "%s must be a %s, a string or an int, got %s.%s"
                % (name, enum_cls.__name__, type(value).__name__, value.name)
            )
        return int(value)
    if isinstance(value, str):
        v = aliases.get(value.lower())
        if v is None:
            raise ValueError(
                "%s = %r is not one of %s" % (name, value, ", ".join(repr(k) for k in aliases))
            )
        return v
    if isinstance(value, bool):
        raise TypeError("%s must be a %s, a string or an int, got %s" % (name, enum_cls.__name__, describe(value)))
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            "%s must be a %s, a string or an int, got %s"
            % (name, enum_cls.__name__, describe(value))
        ) from None
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError("%s = %d is not a valid enumeration value" % (name, v))
    return v


def prod(*xs):
    """Product of the non-negative parts (negative sizes are the library's
    to reject)."""
    p = 1
    for x in xs:
        p *= max(0, x)
    return p


# ---------------------------------------------------------------------------
# Buffers


def native_format(fmt):
    """The struct format character of a buffer, without a native byte-order
    prefix; '' for what is not one native element type."""
    if not fmt:
        return "B"
    if fmt[0] in "@=":
        fmt = fmt[1:]
    elif fmt[0] == "<" and _LITTLE:
        fmt = fmt[1:]
    elif fmt[0] in ">!" and not _LITTLE:
        fmt = fmt[1:]
    return fmt if len(fmt) == 1 else ""


def view(obj, name, what):
    """A C-contiguous memoryview of `obj`, or TypeError / ValueError."""
    if isinstance(obj, (str, int, float)) or obj is None:
        raise TypeError("%s must be %s, got %s" % (name, what, describe(obj)))
    try:
        mv = memoryview(obj)
    except TypeError:
        if _looks_device(obj):
            raise TypeError(
                "%s must be %s in host memory, got %s: this argument takes host memory only"
                % (name, what, describe(obj))
            ) from None
        raise TypeError("%s must be %s, got %s" % (name, what, describe(obj))) from None
    if not mv.c_contiguous:
        raise ValueError(
            "%s must be C-contiguous (a strided view is not), got %s" % (name, describe(obj))
        )
    return mv


def elements(mv):
    return mv.nbytes // mv.itemsize if mv.itemsize else 0


def need_elements(mv, n, name, shape):
    have = elements(mv)
    if have < n:
        raise ValueError("%s has %d elements but %s needs %d" % (name, have, shape, n))


def need_bytes(mv, n, name, shape):
    if mv.nbytes < n:
        raise ValueError("%s has %d bytes but %s needs %d" % (name, mv.nbytes, shape, n))


def address(mv, keep, name, writable=False):
    """The address of `mv`'s memory, valid while `keep` lives.

    Writable buffers are passed in place (their exporter cannot be resized
    meanwhile). A read-only buffer can only be an input: a whole ``bytes``
    object is passed in place; any other read-only buffer is copied once.
    """
    if isinstance(mv, CudaArray):
        if writable and mv.readonly:
            raise TypeError(
                "%s must be writable: it is an output, got a read-only device array "
                "(__cuda_array_interface__ data[1] is True): %s" % (name, describe(mv.obj))
            )
        keep.add(mv.obj)
        return mv.ptr or None
    n = mv.nbytes
    if mv.readonly:
        if writable:
            raise TypeError(
                "%s must be writable: it is an output, got a read-only %s"
                % (name, type(mv.obj).__name__)
            )
        obj = mv.obj
        if type(obj) is bytes and len(obj) == n:
            p = keep.add(ctypes.c_char_p(obj))
            return ctypes.cast(p, ctypes.c_void_p).value
        c = keep.add((ctypes.c_char * n).from_buffer_copy(mv))
    else:
        c = keep.add((ctypes.c_char * n).from_buffer(mv))
    return ctypes.addressof(c)


# Typed buffers ---------------------------------------------------------------


def _is_int32(mv):
    return native_format(mv.format) in ("i", "l") and mv.itemsize == 4


def int32_array(value, name, keep, optional=False, device=False):
    """(memoryview, address) of an int32 buffer, or of a list/tuple of ints
    converted to one; (None, None) for an optional None. With `device`, a
    device array (typestr '<i4') too (a `CudaArray` for the memoryview)."""
    if value is None:
        if optional:
            return None, None
        raise TypeError("%s is required (an int32 buffer or a list of ints)" % name)
    if isinstance(value, (list, tuple)):
        if device:
            keep.note_space(name, False, value)
        vals = [int32(v, "%s[%d]" % (name, i)) for i, v in enumerate(value)]
        value = array.array("i", vals)
        mv = view(value, name, "an int32 buffer")
    else:
        mv = tensor(value, name, keep, "an int32 buffer (format 'i') or a list of ints", device)
    if not _is_int32(mv):
        raise TypeError(
            "%s must be an int32 buffer (format 'i') or a list of ints, got %s"
            % (name, describe(value))
        )
    keep.add(mv)
    return mv, address(mv, keep, name)


def int32_out(value, name, keep):
    """(memoryview, address) of a writable int32 buffer."""
    mv = view(value, name, "a writable int32 buffer (format 'i')")
    if not _is_int32(mv):
        raise TypeError(
            "%s must be a writable int32 buffer (format 'i'), got %s" % (name, describe(value))
        )
    keep.add(mv)
    return mv, address(mv, keep, name, writable=True)


def float32_array(value, name, keep, optional=False, writable=False, device=False):
    if value is None:
        if optional:
            return None, None
        raise TypeError("%s is required (a float32 buffer)" % name)
    mv = tensor(value, name, keep, "a float32 buffer (format 'f')", device)
    if native_format(mv.format) != "f" or mv.itemsize != 4:
        raise TypeError("%s must be a float32 buffer (format 'f'), got %s" % (name, describe(value)))
    keep.add(mv)
    return mv, address(mv, keep, name, writable=writable)


def byte_buffer(value, name, keep, optional=False, writable=False, device=False):
    """Any C-contiguous buffer, measured in bytes (cache memory); with
    `device`, a device array of any typestr too."""
    if value is None:
        if optional:
            return None, None
        raise TypeError("%s is required (a bytes-like buffer)" % name)
    mv = tensor(
        value, name, keep, "a bytes-like buffer (bytearray, memoryview, array, numpy array)", device
    )
    keep.add(mv)
    return mv, address(mv, keep, name, writable=writable)


_INT_FORMATS = frozenset("bBhHiIlLqQnN")


def seq_id_array(value, name, keep, device=False):
    """(count, address) of uint64 sequence ids: an int, a list/tuple of
    ints, a uint64 buffer (format 'Q', passed in place) or another integer
    buffer (copied after checking each id). With `device`, a device array
    of typestr '<u8' too (its ids are not read here), and the ids' memory
    space is noted like a tensor's."""
    if device:
        dev = cuda_array(value, name, keep)
        if dev is not None:
            keep.note_space(name, True, value)
            if dev.format != "Q":
                raise TypeError(
                    "%s must be a uint64 device array (typestr '<u8'), got %s"
                    % (name, describe(value))
                )
            keep.add(dev)
            return elements(dev), address(dev, keep, name)
        keep.note_space(name, False, value)
    elif hasattr(value, "__cuda_array_interface__"):
        raise TypeError(
            "%s must be host memory (a list of ids or an integer buffer), got a CUDA device array"
            % name
        )
    if isinstance(value, (list, tuple)):
        ids = array.array("Q", [seq_id(v, "%s[%d]" % (name, i)) for i, v in enumerate(value)])
    elif isinstance(value, int) and not isinstance(value, bool):
        ids = array.array("Q", [seq_id(value, "%s[0]" % name)])
    else:
        what = "a list of ids (ints) or an integer buffer (uint64: format 'Q')"
        if isinstance(value, (str, float)) or value is None:
            raise TypeError("%s must be %s, got %s" % (name, what, describe(value)))
        try:
            mv = memoryview(value)
        except TypeError:
            raise TypeError("%s must be %s, got %s" % (name, what, describe(value))) from None
        fmt = native_format(mv.format)
        if fmt not in _INT_FORMATS:
            raise TypeError("%s must be %s, got %s" % (name, what, describe(value)))
        if fmt in ("Q", "L") and mv.itemsize == 8:
            ids = value
        else:
            if not mv.c_contiguous:
                raise ValueError("%s must be C-contiguous, got %s" % (name, describe(value)))
            with mv.cast("B") as raw, raw.cast(fmt) as vals:
                ids = array.array(
                    "Q", [seq_id(v, "%s[%d]" % (name, i)) for i, v in enumerate(vals)]
                )
    mv = view(ids, name, "a uint64 buffer")
    keep.add(mv)
    return elements(mv), address(mv, keep, name)


# ---------------------------------------------------------------------------
# CUDA device arrays (__cuda_array_interface__, versions 0-3) and streams

#: ``CU_STREAM_LEGACY`` and ``CU_STREAM_PER_THREAD``: the CUstream handle
#: values CUDA defines for the legacy and the per-thread default stream,
#: which the protocol's ``stream`` entry spells 1 and 2 as well.
CU_STREAM_LEGACY = 0x1
CU_STREAM_PER_THREAD = 0x2

_PTR_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1

# (kind, itemsize) of a typestr -> the struct format the checks read it as:
# bf16 bits come as uint16, int16 (torch's t.view(torch.int16)) or 'V2'
# (torch's and ml_dtypes' bfloat16).
_TYPESTR_FORMATS = {
    ("f", 4): "f", ("f", 2): "e", ("f", 8): "d",
    ("u", 2): "H", ("i", 2): "H", ("V", 2): "H",
    ("i", 4): "i", ("u", 4): "I", ("i", 8): "q", ("u", 8): "Q",
    ("u", 1): "B", ("i", 1): "b", ("b", 1): "?", ("V", 1): "B",
}


class CudaArray:
    """A device array as the checks see it: its ``__cuda_array_interface__``
    read and validated, with ``nbytes``, ``itemsize``, ``format`` (the
    struct character the host path would have: 'f', 'e', 'H' for 16-bit
    integers and bf16, 'i', 'B', ...; the typestr itself when none) and
    ``readonly``, as a memoryview has them."""

    __slots__ = ("obj", "ptr", "readonly", "shape", "typestr", "format", "itemsize", "nbytes",
                 "stream")

    def __repr__(self):
        return "CudaArray(ptr=%#x, typestr=%r, shape=%r)" % (self.ptr, self.typestr, self.shape)


def _read_cai(obj):
    """obj.__cuda_array_interface__, or None when it has none
    (AttributeError: torch raises it for CPU tensors)."""
    if obj is None or isinstance(obj, (str, bytes, bytearray, memoryview, int, float, list, tuple,
                                       array.array)):
        return None
    try:
        return obj.__cuda_array_interface__
    except AttributeError:
        return None


def _looks_device(obj):
    """Whether `obj` offers device memory (its interface may fail to read)."""
    try:
        return _read_cai(obj) is not None
    except Exception:  # noqa: BLE001 - any failure of the property: it has one
        return True


def _describe_device(value):
    try:
        cai = _read_cai(value)
    except Exception:  # noqa: BLE001 - a description must not raise
        return None
    if not isinstance(cai, dict):
        return None
    return "%s (CUDA device memory: typestr %r, shape %r)" % (
        type(value).__name__, cai.get("typestr"), cai.get("shape"),
    )


def _typestr(typestr, name):
    """(format, itemsize) of a typestr such as '<f4'."""
    bad = TypeError(
        "%s: __cuda_array_interface__ typestr %r is not a valid type string "
        "(e.g. '<f4', '<u2', '|u1')" % (name, typestr)
    )
    if not isinstance(typestr, str) or len(typestr) < 3 or typestr[0] not in "<>|=":
        raise bad
    kind, size = typestr[1], typestr[2:]
    if not size.isdigit() or int(size) <= 0:
        raise bad
    itemsize = int(size)
    order = typestr[0]
    native = itemsize == 1 or order == "<" or (order == "=" and _LITTLE)
    fmt = _TYPESTR_FORMATS.get((kind, itemsize)) if native else None
    return fmt or typestr, itemsize


def _c_contiguous(shape, strides, itemsize):
    if strides is None or any(n == 0 for n in shape):
        return True
    expect = itemsize
    for n, st in zip(reversed(shape), reversed(strides)):
        if n != 1 and st != expect:
            return False
        expect *= n
    return True


def _stream_entry(value, name):
    """The ``stream`` of an interface: None or a CUstream handle (1 and 2
    are CU_STREAM_LEGACY and CU_STREAM_PER_THREAD, as in CUDA)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            "%s: __cuda_array_interface__ stream must be None or an int, got %s"
            % (name, describe(value))
        )
    if value == 0:
        raise ValueError(
            "%s: __cuda_array_interface__ stream is 0, which the protocol disallows "
            "(1: the legacy default stream, 2: the per-thread default stream)" % name
        )
    if not 0 < value <= _PTR_MAX:
        raise ValueError("%s: __cuda_array_interface__ stream %d is not a CUstream handle"
                         % (name, value))
    return value


def cuda_array(value, name, keep=None):
    """A `CudaArray` for an object with ``__cuda_array_interface__``, None
    for any other object. A DeviceArray is acquired by `keep` first (a
    closed one raises ClosedError). TypeError / ValueError name `name`."""
    if keep is not None and getattr(type(value), "_mlart_device_array", False):
        keep.acquire(value)
    try:
        cai = _read_cai(value)
    except Exception as e:  # noqa: BLE001 - re-raised as TypeError naming the argument
        hint = ""
        if "bfloat16" in str(e) or "BFloat16" in str(e):
            hint = " (a torch.bfloat16 tensor: pass t.view(torch.int16), bf16 bits)"
        raise TypeError(
            "%s: its __cuda_array_interface__ cannot be read: %s: %s%s"
            % (name, type(e).__name__, e, hint)
        ) from e
    if cai is None:
        return None
    if not isinstance(cai, dict):
        raise TypeError("%s: __cuda_array_interface__ must be a dict, got %s"
                        % (name, type(cai).__name__))
    version = cai.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 3:
        raise ValueError("%s: __cuda_array_interface__ version %r is not one this binding reads "
                         "(0 to 3)" % (name, version))
    shape = cai.get("shape")
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise TypeError("%s: __cuda_array_interface__ shape must be a tuple of non-negative ints, "
                        "got %r" % (name, shape))
    shape = tuple(shape)
    fmt, itemsize = _typestr(cai.get("typestr"), name)
    data = cai.get("data")
    if (
        not isinstance(data, (tuple, list)) or len(data) != 2
        or isinstance(data[0], bool) or not isinstance(data[0], int)
        or not 0 <= data[0] <= _PTR_MAX
    ):
        raise TypeError("%s: __cuda_array_interface__ data must be (pointer, read_only), got %r"
                        % (name, data))
    if cai.get("mask") is not None:
        raise TypeError("%s: masked device arrays (__cuda_array_interface__ mask) are not "
                        "supported" % name)
    strides = cai.get("strides")
    if strides is not None:
        if not isinstance(strides, (tuple, list)) or len(strides) != len(shape):
            raise TypeError("%s: __cuda_array_interface__ strides must be None or one int per "
                            "dimension, got %r" % (name, strides))
        strides = tuple(strides)
    if not _c_contiguous(shape, strides, itemsize):
        raise ValueError(
            "%s must be C-contiguous (a strided view is not), got %s with strides %r"
            % (name, describe(value), strides)
        )
    arr = CudaArray()
    arr.obj = value
    arr.ptr = data[0]
    arr.readonly = bool(data[1])
    arr.shape = shape
    arr.typestr = cai.get("typestr")
    arr.format = fmt
    arr.itemsize = itemsize
    arr.nbytes = prod(*shape) * itemsize
    arr.stream = _stream_entry(cai.get("stream"), name) if version >= 3 else None
    if keep is not None:
        keep.streams.append((name, arr.stream))
    return arr


def tensor(value, name, keep, what, device=False):
    """A host buffer's memoryview, or, when `device` allows it, a device
    array's `CudaArray`, recording which in `keep` (device-capable calls
    only: their tensors must all be host or all be device memory)."""
    if device:
        arr = cuda_array(value, name, keep)
        if arr is not None:
            keep.note_space(name, True, value)
            return arr
        keep.note_space(name, False, value)
    return view(value, name, what)


def stream_handle(value, name="stream"):
    """A CUstream handle (int) or None for NULL, from None, an int, or a
    stream object: ``__cuda_stream__()`` (the CUDA stream protocol, as
    cuda.core has it), ``cuda_stream`` (torch.cuda.Stream), ``ptr``
    (cupy.cuda.Stream) or ``handle`` (numba's streams)."""
    if value is None:
        return None
    what = ("None, an int (a CUstream handle) or a stream object (torch.cuda.Stream, "
            "cupy.cuda.Stream, numba, or one with __cuda_stream__)")
    if isinstance(value, (bool, float, str, bytes)):
        raise TypeError("%s must be %s, got %s" % (name, what, describe(value)))
    if isinstance(value, ctypes.c_void_p):
        handle = value.value or 0
    elif hasattr(value, "__index__"):
        handle = operator.index(value)
    else:
        proto = getattr(value, "__cuda_stream__", None)
        if proto is not None:
            got = proto() if callable(proto) else proto
            if not isinstance(got, tuple) or len(got) != 2:
                raise TypeError("%s: __cuda_stream__ must give (version, handle), got %r"
                                % (name, got))
            handle = got[1]
        elif hasattr(value, "cuda_stream"):
            handle = value.cuda_stream
        elif hasattr(value, "ptr"):
            handle = value.ptr
        elif hasattr(value, "handle"):
            handle = value.handle
            if isinstance(handle, ctypes.c_void_p):
                handle = handle.value or 0
        else:
            raise TypeError("%s must be %s, got %s" % (name, what, describe(value)))
        if isinstance(handle, bool) or not hasattr(handle, "__index__"):
            raise TypeError("%s: the stream handle of %s must be an int, got %s"
                            % (name, type(value).__name__, describe(handle)))
        handle = operator.index(handle)
    if not 0 <= handle <= _PTR_MAX:
        raise ValueError("%s = %d is not a CUstream handle" % (name, handle))
    return handle or None


def call_stream(value, keep, name="stream"):
    """The CUstream of a call: `value` when given (None: NULL); else the one
    stream the device arrays' interfaces name (ValueError when they name
    different ones), or NULL when none names one."""
    if value is not None:
        return stream_handle(value, name)
    named = [(n, s) for n, s in keep.streams if s is not None]
    for n, s in named[1:]:
        if s != named[0][1]:
            raise ValueError(
                "%s's __cuda_array_interface__ names stream %#x but %s's names stream %#x: "
                "pass stream= to choose the call's stream (and order the other's work before it)"
                % (named[0][0], named[0][1], n, s)
            )
    return named[0][1] if named else None
