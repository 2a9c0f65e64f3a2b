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
    """Objects that must stay alive (and exported) until a C call returns.

    A context manager: on exit it drops the ctypes views of the caller's
    buffers and releases the memoryviews, so the buffers are free to be
    resized again even while an exception's traceback keeps the frame."""

    __slots__ = ("refs",)

    def __init__(self):
        self.refs = []

    def add(self, obj):
        self.refs.append(obj)
        return obj

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
        return type(value).__name__
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


def int32_array(value, name, keep, optional=False):
    """(memoryview, address) of an int32 buffer, or of a list/tuple of ints
    converted to one; (None, None) for an optional None."""
    if value is None:
        if optional:
            return None, None
        raise TypeError("%s is required (an int32 buffer or a list of ints)" % name)
    if isinstance(value, (list, tuple)):
        vals = [int32(v, "%s[%d]" % (name, i)) for i, v in enumerate(value)]
        value = array.array("i", vals)
    mv = view(value, name, "an int32 buffer (format 'i') or a list of ints")
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


def float32_array(value, name, keep, optional=False, writable=False):
    if value is None:
        if optional:
            return None, None
        raise TypeError("%s is required (a float32 buffer)" % name)
    mv = view(value, name, "a float32 buffer (format 'f')")
    if native_format(mv.format) != "f" or mv.itemsize != 4:
        raise TypeError("%s must be a float32 buffer (format 'f'), got %s" % (name, describe(value)))
    keep.add(mv)
    return mv, address(mv, keep, name, writable=writable)


def byte_buffer(value, name, keep, optional=False, writable=False):
    """Any C-contiguous buffer, measured in bytes (cache memory)."""
    if value is None:
        if optional:
            return None, None
        raise TypeError("%s is required (a bytes-like buffer)" % name)
    mv = view(value, name, "a bytes-like buffer (bytearray, memoryview, array, numpy array)")
    keep.add(mv)
    return mv, address(mv, keep, name, writable=writable)


_INT_FORMATS = frozenset("bBhHiIlLqQnN")


def seq_id_array(value, name, keep):
    """(count, address) of uint64 sequence ids: an int, a list/tuple of
    ints, a uint64 buffer (format 'Q', passed in place) or another integer
    buffer (copied after checking each id)."""
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
