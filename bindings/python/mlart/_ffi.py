"""ctypes declarations of include/mlart.h: the library, its structs and functions.

Every struct is declared field by field in the header's order; the *_init
functions of the library report each struct's size, which `init_struct`
compares with ``ctypes.sizeof`` before any use (a mismatch is a clear
error, never a write past a struct). Pointer fields are ``c_void_p``: the
binding stores raw addresses of buffers it keeps alive for the call.
"""

import ctypes
import os

# ---------------------------------------------------------------------------
# Library lookup

#: ``bindings/python`` (the folder holding this package).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The library this checkout builds (``cargo build --release``), relative to
#: ``bindings/python`` as the Node binding looks it up from ``bindings/node``.
DEFAULT_LIBRARY = os.path.normpath(
    os.path.join(_PACKAGE_ROOT, "..", "..", "target", "release", "libmlart.so")
)

#: ABI version this binding is written against (``MLART_ABI_VERSION``).
ABI_VERSION = 0

#: Room given to every ``*_init`` call: a library with larger (newer)
#: structs then reports its size instead of writing past ours.
INIT_ROOM = 4096


class LibraryError(ImportError):
    """The shared library cannot be found or loaded, or does not match."""


LibraryError.__module__ = "mlart"


def locate_library():
    """``$MLART_LIBRARY`` when set (non-empty), else `DEFAULT_LIBRARY`."""
    from_env = os.environ.get("MLART_LIBRARY") or None
    candidate = os.path.abspath(from_env) if from_env else DEFAULT_LIBRARY
    if not os.path.exists(candidate):
        env_part = (
            "MLART_LIBRARY=%s does not exist" % from_env
            if from_env
            else "MLART_LIBRARY is not set"
        )
        tried = (
            "was not tried (MLART_LIBRARY takes precedence)"
            if from_env
            else "does not exist"
        )
        raise LibraryError(
            "mlart: cannot find the mlart shared library: %s, and the default %s %s. "
            "Build it with `cargo build --release` at the repository root, or set "
            "MLART_LIBRARY to the path of libmlart.so." % (env_part, DEFAULT_LIBRARY, tried)
        )
    return candidate


LIBRARY_PATH = locate_library()
try:
    lib = ctypes.CDLL(LIBRARY_PATH)
except OSError as e:
    raise LibraryError("mlart: cannot load %s: %s" % (LIBRARY_PATH, e)) from e

# ---------------------------------------------------------------------------
# Structs, field by field as in mlart.h (enum typedefs are uint32_t)

_u32 = ctypes.c_uint32
_i32 = ctypes.c_int32
_u64 = ctypes.c_uint64
_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p

#: ``bool (*mlart_progress_fn)(float fraction, const char *stage, void *user_data)``
PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_char_p, ctypes.c_void_p)


class DecodeArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("batch", _i32),
        ("s_q", _i32),
        ("h_q", _i32),
        ("d_qk", _i32),
        ("d_v", _i32),
        ("softmax_scale", ctypes.c_float),
        ("causal", ctypes.c_bool),
        ("memory", _u32),
        ("q_dtype", _u32),
        ("q", _ptr),
        ("kv_format", _u32),
        ("kv", _ptr),
        ("num_blocks", _i32),
        ("block_size", _i32),
        ("block_table", _ptr),
        ("block_table_stride", _i32),
        ("seqlens", _ptr),
        ("indices", _ptr),
        ("topk", _i32),
        ("topk_length", _ptr),
        ("extra_kv", _ptr),
        ("extra_num_blocks", _i32),
        ("extra_block_size", _i32),
        ("extra_indices", _ptr),
        ("extra_topk", _i32),
        ("extra_topk_length", _ptr),
        ("attn_sink", _ptr),
        ("out_dtype", _u32),
        ("out", _ptr),
        ("lse", _ptr),
        ("stream", _ptr),
    ]


class DeviceProps(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("device_index", _i32),
        ("name", ctypes.c_char * 128),
        ("compute_major", _i32),
        ("compute_minor", _i32),
        ("sm_count", _i32),
        ("total_memory", _u64),
        ("has_kernels", ctypes.c_bool),
        ("kernels", ctypes.c_char * 128),
    ]


class EngineOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("backend", _u32),
        ("device_index", _i32),
        ("num_threads", _i32),
        ("thread_affinity", _u32),
    ]


class EngineProps(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("backend", _u32),
        ("cpu_isa", _u32),
        ("num_threads", _i32),
        ("device_index", _i32),
        ("device_name", ctypes.c_char * 128),
        ("cpu_features", ctypes.c_char * 128),
        ("reason", ctypes.c_char * 256),
        ("thread_placement", ctypes.c_char * 128),
    ]


class ModelOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("first_layer", _i32),
        ("num_layers", _i32),
        ("convert_weights", ctypes.c_bool),
        ("weight_dtype", _u32),
        ("progress", PROGRESS_FN),
        ("progress_user_data", _ptr),
        ("activations", _u32),
        ("reserved0", _u32),
        ("gpu_projections", _i32),
        ("reserved1", _u32),
        ("kept_keys_bytes", _u64),
    ]


class ModelProps(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("num_layers", _i32),
        ("first_layer", _i32),
        ("loaded_layers", _i32),
        ("hidden_size", _i32),
        ("num_heads", _i32),
        ("q_lora_rank", _i32),
        ("kv_lora_rank", _i32),
        ("qk_nope_head_dim", _i32),
        ("qk_rope_head_dim", _i32),
        ("v_head_dim", _i32),
        ("d_qk", _i32),
        ("rope_theta", ctypes.c_double),
        ("yarn", ctypes.c_bool),
        ("yarn_factor", ctypes.c_double),
        ("yarn_original_max_position", _i64),
        ("yarn_beta_fast", ctypes.c_double),
        ("yarn_beta_slow", ctypes.c_double),
        ("yarn_mscale", ctypes.c_double),
        ("yarn_mscale_all_dim", ctypes.c_double),
        ("softmax_scale", ctypes.c_double),
        ("weight_dtype", _u32),
        ("bytes_loaded", _u64),
        ("activations", _u32),
        ("projection_isa", _u32),
        ("index_n_heads", _i32),
        ("index_head_dim", _i32),
        ("index_topk", _i32),
        ("projections_on_gpu", _i32),
        ("kept_keys_bytes", _u64),
    ]


class ForwardArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("layer", _i32),
        ("batch", _i32),
        ("seq_ids", _ptr),
        ("n_tokens", _ptr),
        ("x_dtype", _u32),
        ("x", _ptr),
        ("out_dtype", _u32),
        ("out", _ptr),
        ("index_out", _ptr),
        ("memory", _u32),
        ("stream", _ptr),
    ]


class KvPoolOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("kv_format", _u32),
        ("d_qk", _i32),
        ("num_layers", _i32),
        ("block_size", _i32),
        ("num_blocks", _i32),
        ("index_head_dim", _i32),
    ]


class KvPoolStats(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("blocks_total", _i64),
        ("blocks_used", _i64),
        ("blocks_free", _i64),
        ("sequences", _i64),
        ("bytes_per_block", _i64),
        ("bytes_total", _i64),
    ]


class KvPoolDecodeArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", _u32),
        ("layer", _i32),
        ("batch", _i32),
        ("seq_ids", _ptr),
        ("s_q", _i32),
        ("h_q", _i32),
        ("d_v", _i32),
        ("softmax_scale", ctypes.c_float),
        ("causal", ctypes.c_bool),
        ("memory", _u32),
        ("q_dtype", _u32),
        ("q", _ptr),
        ("indices", _ptr),
        ("topk", _i32),
        ("topk_length", _ptr),
        ("attn_sink", _ptr),
        ("out_dtype", _u32),
        ("out", _ptr),
        ("lse", _ptr),
        ("stream", _ptr),
    ]


# ---------------------------------------------------------------------------
# Functions. Fallible ones return `mlart_error *` as c_void_p (None = OK);
# handles are c_void_p integers.


def _fn(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_err = ctypes.c_void_p
P = ctypes.POINTER

version = _fn("mlart_version", ctypes.c_char_p)
abi_version = _fn("mlart_abi_version", _u32)

error_code = _fn("mlart_error_code", _u32, _ptr)
error_message = _fn("mlart_error_message", ctypes.c_char_p, _ptr)
error_free = _fn("mlart_error_free", None, _ptr)
status_name = _fn("mlart_status_name", ctypes.c_char_p, _u32)

decode_args_init = _fn("mlart_decode_args_init", None, _ptr)
decode_paged = _fn("mlart_decode_paged", _err, _ptr, P(DecodeArgs))

device_props_init = _fn("mlart_device_props_init", None, _ptr)
device_count = _fn("mlart_device_count", _err, P(_i32))
device_info = _fn("mlart_device_info", _err, _i32, P(DeviceProps))

engine_options_init = _fn("mlart_engine_options_init", None, _ptr)
engine_props_init = _fn("mlart_engine_props_init", None, _ptr)
engine_create = _fn("mlart_engine_create", _err, P(EngineOptions), P(_ptr))
engine_free = _fn("mlart_engine_free", None, _ptr)
engine_info = _fn("mlart_engine_info", _err, _ptr, P(EngineProps))
engine_mem_alloc = _fn("mlart_engine_mem_alloc", _err, _ptr, ctypes.c_size_t, P(_ptr))
engine_mem_free = _fn("mlart_engine_mem_free", _err, _ptr, _ptr)
engine_mem_copy = _fn(
    "mlart_engine_mem_copy", _err, _ptr, _ptr, _u32, _ptr, _u32, ctypes.c_size_t
)

kv_row_bytes = _fn("mlart_kv_row_bytes", _err, _u32, _i32, P(ctypes.c_size_t))
kv_block_bytes = _fn("mlart_kv_block_bytes", _err, _u32, _i32, _i32, P(ctypes.c_size_t))
kv_quantize = _fn("mlart_kv_quantize", _err, _u32, _i32, _i32, _i32, _u32, _ptr, _ptr)
kv_dequantize = _fn("mlart_kv_dequantize", _err, _u32, _i32, _i32, _i32, _ptr, _u32, _ptr)

model_options_init = _fn("mlart_model_options_init", None, _ptr)
model_props_init = _fn("mlart_model_props_init", None, _ptr)
forward_args_init = _fn("mlart_forward_args_init", None, _ptr)
model_load = _fn("mlart_model_load", _err, _ptr, ctypes.c_char_p, P(ModelOptions), P(_ptr))
model_free = _fn("mlart_model_free", None, _ptr)
model_info = _fn("mlart_model_info", _err, _ptr, P(ModelProps))
model_forward = _fn("mlart_model_forward", _err, _ptr, _ptr, P(ForwardArgs))

kv_pool_options_init = _fn("mlart_kv_pool_options_init", None, _ptr)
kv_pool_stats_init = _fn("mlart_kv_pool_stats_init", None, _ptr)
kv_pool_decode_args_init = _fn("mlart_kv_pool_decode_args_init", None, _ptr)
kv_pool_create = _fn("mlart_kv_pool_create", _err, _ptr, P(KvPoolOptions), P(_ptr))
kv_pool_free = _fn("mlart_kv_pool_free", None, _ptr)
kv_pool_stats_get = _fn("mlart_kv_pool_stats_get", _err, _ptr, P(KvPoolStats))
kv_seq_create = _fn("mlart_kv_seq_create", _err, _ptr, _u64)
kv_seq_free = _fn("mlart_kv_seq_free", _err, _ptr, _u64)
kv_seq_fork = _fn("mlart_kv_seq_fork", _err, _ptr, _u64, _u64)
kv_seq_truncate = _fn("mlart_kv_seq_truncate", _err, _ptr, _u64, _i64)
kv_seq_length = _fn("mlart_kv_seq_length", _err, _ptr, _u64, _i32, P(_i64))
kv_append = _fn("mlart_kv_append", _err, _ptr, _u64, _i32, _i32, _u32, _ptr)
kv_pool_decode = _fn("mlart_kv_pool_decode", _err, _ptr, P(KvPoolDecodeArgs))


def check_abi(library_abi, expected=ABI_VERSION, path=LIBRARY_PATH):
    """Raises LibraryError unless the library's ABI is the binding's."""
    if library_abi != expected:
        raise LibraryError(
            "mlart: %s has ABI version %d but this binding was written for %d"
            % (path, library_abi, expected)
        )


check_abi(abi_version())

#: Each struct with the function that fills its defaults (or struct_size).
STRUCTS = {
    "mlart_decode_args": (DecodeArgs, decode_args_init),
    "mlart_device_props": (DeviceProps, device_props_init),
    "mlart_engine_options": (EngineOptions, engine_options_init),
    "mlart_engine_props": (EngineProps, engine_props_init),
    "mlart_model_options": (ModelOptions, model_options_init),
    "mlart_model_props": (ModelProps, model_props_init),
    "mlart_forward_args": (ForwardArgs, forward_args_init),
    "mlart_kv_pool_options": (KvPoolOptions, kv_pool_options_init),
    "mlart_kv_pool_stats": (KvPoolStats, kv_pool_stats_init),
    "mlart_kv_pool_decode_args": (KvPoolDecodeArgs, kv_pool_decode_args_init),
}


def init_struct(init_fn, struct_type, name):
    """A `struct_type` filled by the library's `init_fn`.

    The library writes its whole struct into a buffer of `INIT_ROOM`
    bytes; the ``struct_size`` it reports must be ``ctypes.sizeof`` of the
    binding's declaration, else this raises RuntimeError naming both.
    """
    size = ctypes.sizeof(struct_type)
    buf = ctypes.create_string_buffer(max(size, INIT_ROOM))
    init_fn(buf)
    reported = _u32.from_buffer(buf).value
    if reported != size:
        raise RuntimeError(
            "mlart: %s is %d bytes in %s but %d in this binding"
            % (name, reported, LIBRARY_PATH, size)
        )
    return struct_type.from_buffer_copy(buf, 0)


def new_struct(name):
    """The struct `name` (e.g. ``"mlart_decode_args"``) with its defaults."""
    struct_type, init_fn = STRUCTS[name]
    return init_struct(init_fn, struct_type, name)
