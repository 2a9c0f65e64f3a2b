'use strict';
// Node.js binding of mlart (include/mlart.h) over koffi.
//
// The binding adds only what JavaScript expects — handles as objects with
// close(), errors as exceptions, TypedArrays for tensors — and checks every
// buffer length against the shape before calling C, so the library never
// reads or writes past a JS buffer. Everything else (argument values, shapes,
// ids) is validated by the library itself and reported as an MlartError.

const fs = require('node:fs');
const path = require('node:path');
const koffi = require('koffi');

// ---------------------------------------------------------------------------
// Library lookup

const DEFAULT_LIBRARY = path.resolve(__dirname, '..', '..', 'target', 'release', 'libmlart.so');

function locateLibrary() {
  const fromEnv = process.env.MLART_LIBRARY;
  const candidate = fromEnv ? path.resolve(fromEnv) : DEFAULT_LIBRARY;
  if (!fs.existsSync(candidate)) {
    const envPart = fromEnv
      ? `MLART_LIBRARY=${fromEnv} does not exist`
      : 'MLART_LIBRARY is not set';
    throw new Error(
      `mlart: cannot find the mlart shared library: ${envPart}, and the default ` +
        `${DEFAULT_LIBRARY} ${fromEnv ? 'was not tried (MLART_LIBRARY takes precedence)' : 'does not exist'}. ` +
        'Build it with `cargo build --release` at the repository root, or set ' +
        'MLART_LIBRARY to the path of libmlart.so.'
    );
  }
  return candidate;
}

const LIBRARY_PATH = locateLibrary();
let lib;
try {
  lib = koffi.load(LIBRARY_PATH);
} catch (e) {
  throw new Error(`mlart: cannot load ${LIBRARY_PATH}: ${e.message}`, { cause: e });
}

/** ABI version this binding is written against (MLART_ABI_VERSION). */
const ABI_VERSION = 0;

// ---------------------------------------------------------------------------
// Constants (mlart.h)

const Status = Object.freeze({
  OK: 0,
  INVALID_ARGUMENT: 1,
  NULL_POINTER: 2,
  OUT_OF_MEMORY: 3,
  POOL_EXHAUSTED: 4,
  UNSUPPORTED: 5,
  DEVICE: 6,
  IO: 7,
  FORMAT: 8,
  NOT_FOUND: 9,
  CANCELLED: 10,
  INTERNAL: 11,
});
const STATUS_NAMES = Object.freeze(
  Object.fromEntries(Object.entries(Status).map(([k, v]) => [v, k]))
);

const DType = Object.freeze({ F32: 0, BF16: 1, F16: 2, FP8_E4M3: 3 });
const KvFormat = Object.freeze({ BF16: 0, F16: 1, F32: 2, FP8_V32: 3, FP8_MODEL1: 4 });
const Memory = Object.freeze({ HOST: 0, DEVICE: 1 });
const Backend = Object.freeze({ AUTO: 0, CPU: 1, CUDA: 2 });
const CpuIsa = Object.freeze({ SCALAR: 0, AVX2: 1, AVX512: 2, AMX: 3, AVX512_BF16: 4 });

const DTYPE_ALIASES = { f32: 0, float32: 0, bf16: 1, bfloat16: 1, f16: 2, float16: 2, fp8_e4m3: 3 };
const KV_FORMAT_ALIASES = { bf16: 0, f16: 1, f32: 2, fp8_v32: 3, fp8_model1: 4 };
const BACKEND_ALIASES = { auto: 0, cpu: 1, cuda: 2 };
const AFFINITY_ALIASES = { auto: 0, none: 1, pin: 2 };
const ACTIVATIONS_ALIASES = { precise: 0, bf16: 1 };
const CPU_ISA_NAMES = { 0: 'scalar', 1: 'avx2', 2: 'avx512', 3: 'amx', 4: 'avx512bf16' };
const DTYPE_NAMES = { 0: 'f32', 1: 'bf16', 2: 'f16', 3: 'fp8_e4m3' };
const BACKEND_NAMES = { 0: 'auto', 1: 'cpu', 2: 'cuda' };
const ACTIVATIONS_NAMES = { 0: 'precise', 1: 'bf16' };

// ---------------------------------------------------------------------------
// Types and structs, field by field as in mlart.h

const mlart_error = koffi.opaque('mlart_error');
koffi.opaque('mlart_engine');
koffi.opaque('mlart_kv_pool');
koffi.opaque('mlart_model');
void mlart_error;

const mlart_decode_args = koffi.struct('mlart_decode_args', {
  struct_size: 'uint32_t',
  batch: 'int32_t',
  s_q: 'int32_t',
  h_q: 'int32_t',
  d_qk: 'int32_t',
  d_v: 'int32_t',
  softmax_scale: 'float',
  causal: 'bool',
  memory: 'uint32_t',
  q_dtype: 'uint32_t',
  q: 'const void *',
  kv_format: 'uint32_t',
  kv: 'const void *',
  num_blocks: 'int32_t',
  block_size: 'int32_t',
  block_table: 'const int32_t *',
  block_table_stride: 'int32_t',
  seqlens: 'const int32_t *',
  indices: 'const int32_t *',
  topk: 'int32_t',
  topk_length: 'const int32_t *',
  extra_kv: 'const void *',
  extra_num_blocks: 'int32_t',
  extra_block_size: 'int32_t',
  extra_indices: 'const int32_t *',
  extra_topk: 'int32_t',
  extra_topk_length: 'const int32_t *',
  attn_sink: 'const float *',
  out_dtype: 'uint32_t',
  out: 'void *',
  lse: 'float *',
  stream: 'void *',
});

const mlart_device_props = koffi.struct('mlart_device_props', {
  struct_size: 'uint32_t',
  device_index: 'int32_t',
  name: koffi.array('char', 128),
  compute_major: 'int32_t',
  compute_minor: 'int32_t',
  sm_count: 'int32_t',
  total_memory: 'uint64_t',
  has_kernels: 'bool',
  kernels: koffi.array('char', 128),
});

const mlart_engine_options = koffi.struct('mlart_engine_options', {
  struct_size: 'uint32_t',
  backend: 'uint32_t',
  device_index: 'int32_t',
  num_threads: 'int32_t',
  thread_affinity: 'uint32_t',
});

const mlart_engine_props = koffi.struct('mlart_engine_props', {
  struct_size: 'uint32_t',
  backend: 'uint32_t',
  cpu_isa: 'uint32_t',
  num_threads: 'int32_t',
  device_index: 'int32_t',
  device_name: koffi.array('char', 128),
  cpu_features: koffi.array('char', 128),
  reason: koffi.array('char', 256),
  thread_placement: koffi.array('char', 128),
});

const mlart_progress_fn = koffi.proto(
  'bool mlart_progress_fn(float fraction, const char *stage, void *user_data)'
);

const mlart_model_options = koffi.struct('mlart_model_options', {
  struct_size: 'uint32_t',
  first_layer: 'int32_t',
  num_layers: 'int32_t',
  convert_weights: 'bool',
  weight_dtype: 'uint32_t',
  progress: koffi.pointer(mlart_progress_fn),
  progress_user_data: 'void *',
  activations: 'uint32_t',
  reserved0: 'uint32_t',
  gpu_projections: 'int32_t',
  reserved1: 'uint32_t',
  kept_keys_bytes: 'uint64_t',
});

const mlart_model_props = koffi.struct('mlart_model_props', {
  struct_size: 'uint32_t',
  num_layers: 'int32_t',
  first_layer: 'int32_t',
  loaded_layers: 'int32_t',
  hidden_size: 'int32_t',
  num_heads: 'int32_t',
  q_lora_rank: 'int32_t',
  kv_lora_rank: 'int32_t',
  qk_nope_head_dim: 'int32_t',
  qk_rope_head_dim: 'int32_t',
  v_head_dim: 'int32_t',
  d_qk: 'int32_t',
  rope_theta: 'double',
  yarn: 'bool',
  yarn_factor: 'double',
  yarn_original_max_position: 'int64_t',
  yarn_beta_fast: 'double',
  yarn_beta_slow: 'double',
  yarn_mscale: 'double',
  yarn_mscale_all_dim: 'double',
  softmax_scale: 'double',
  weight_dtype: 'uint32_t',
  bytes_loaded: 'uint64_t',
  activations: 'uint32_t',
  projection_isa: 'uint32_t',
  index_n_heads: 'int32_t',
  index_head_dim: 'int32_t',
  index_topk: 'int32_t',
  projections_on_gpu: 'int32_t',
  kept_keys_bytes: 'uint64_t',
});

const mlart_forward_args = koffi.struct('mlart_forward_args', {
  struct_size: 'uint32_t',
  layer: 'int32_t',
  batch: 'int32_t',
  seq_ids: 'const uint64_t *',
  n_tokens: 'const int32_t *',
  x_dtype: 'uint32_t',
  x: 'const void *',
  out_dtype: 'uint32_t',
  out: 'void *',
  index_out: 'int32_t *',
  memory: 'uint32_t',
  stream: 'void *',
});

const mlart_kv_pool_options = koffi.struct('mlart_kv_pool_options', {
  struct_size: 'uint32_t',
  kv_format: 'uint32_t',
  d_qk: 'int32_t',
  num_layers: 'int32_t',
  block_size: 'int32_t',
  num_blocks: 'int32_t',
  index_head_dim: 'int32_t',
});

const mlart_kv_pool_stats = koffi.struct('mlart_kv_pool_stats', {
  struct_size: 'uint32_t',
  blocks_total: 'int64_t',
  blocks_used: 'int64_t',
  blocks_free: 'int64_t',
  sequences: 'int64_t',
  bytes_per_block: 'int64_t',
  bytes_total: 'int64_t',
});

const mlart_kv_pool_decode_args = koffi.struct('mlart_kv_pool_decode_args', {
  struct_size: 'uint32_t',
  layer: 'int32_t',
  batch: 'int32_t',
  seq_ids: 'const uint64_t *',
  s_q: 'int32_t',
  h_q: 'int32_t',
  d_v: 'int32_t',
  softmax_scale: 'float',
  causal: 'bool',
  memory: 'uint32_t',
  q_dtype: 'uint32_t',
  q: 'const void *',
  indices: 'const int32_t *',
  topk: 'int32_t',
  topk_length: 'const int32_t *',
  attn_sink: 'const float *',
  out_dtype: 'uint32_t',
  out: 'void *',
  lse: 'float *',
  stream: 'void *',
});

// ---------------------------------------------------------------------------
// Functions. Scalar out-parameters are passed as one-element TypedArrays
// (plain pointers); handle out-parameters as one-element JS arrays.

const C = {
  version: lib.func('const char *mlart_version(void)'),
  abi_version: lib.func('uint32_t mlart_abi_version(void)'),

  error_code: lib.func('uint32_t mlart_error_code(const mlart_error *error)'),
  error_message: lib.func('const char *mlart_error_message(const mlart_error *error)'),
  error_free: lib.func('void mlart_error_free(mlart_error *error)'),
  status_name: lib.func('const char *mlart_status_name(uint32_t status)'),

  decode_args_init: lib.func('void mlart_decode_args_init(void *args)'),
  decode_paged: lib.func(
    'mlart_error *mlart_decode_paged(mlart_engine *engine, const mlart_decode_args *args)'
  ),

  device_props_init: lib.func('void mlart_device_props_init(void *props)'),
  device_count: lib.func('mlart_error *mlart_device_count(int32_t *out)'),
  device_info: lib.func(
    'mlart_error *mlart_device_info(int32_t device_index, _Inout_ mlart_device_props *out)'
  ),

  engine_options_init: lib.func(
    'void mlart_engine_options_init(void *options)'
  ),
  engine_props_init: lib.func('void mlart_engine_props_init(void *props)'),
  engine_create: lib.func(
    'mlart_error *mlart_engine_create(const mlart_engine_options *options, _Out_ mlart_engine **out)'
  ),
  engine_free: lib.func('void mlart_engine_free(mlart_engine *engine)'),
  engine_info: lib.func(
    'mlart_error *mlart_engine_info(const mlart_engine *engine, _Inout_ mlart_engine_props *out)'
  ),

  kv_row_bytes: lib.func('mlart_error *mlart_kv_row_bytes(uint32_t format, int32_t d_qk, size_t *out)'),
  kv_block_bytes: lib.func(
    'mlart_error *mlart_kv_block_bytes(uint32_t format, int32_t d_qk, int32_t block_size, size_t *out)'
  ),
  kv_quantize: lib.func(
    'mlart_error *mlart_kv_quantize(uint32_t format, int32_t d_qk, int32_t block_size, int32_t n_tokens, uint32_t src_dtype, const void *src, void *dst)'
  ),
  kv_dequantize: lib.func(
    'mlart_error *mlart_kv_dequantize(uint32_t format, int32_t d_qk, int32_t block_size, int32_t n_tokens, const void *src, uint32_t dst_dtype, void *dst)'
  ),

  model_options_init: lib.func('void mlart_model_options_init(void *options)'),
  model_props_init: lib.func('void mlart_model_props_init(void *props)'),
  forward_args_init: lib.func('void mlart_forward_args_init(void *args)'),
  model_load: lib.func(
    'mlart_error *mlart_model_load(mlart_engine *engine, const char *path, const mlart_model_options *options, _Out_ mlart_model **out)'
  ),
  model_free: lib.func('void mlart_model_free(mlart_model *model)'),
  model_info: lib.func(
    'mlart_error *mlart_model_info(const mlart_model *model, _Inout_ mlart_model_props *out)'
  ),
  model_forward: lib.func(
    'mlart_error *mlart_model_forward(mlart_model *model, mlart_kv_pool *pool, const mlart_forward_args *args)'
  ),

  kv_pool_options_init: lib.func(
    'void mlart_kv_pool_options_init(void *options)'
  ),
  kv_pool_stats_init: lib.func('void mlart_kv_pool_stats_init(void *stats)'),
  kv_pool_decode_args_init: lib.func(
    'void mlart_kv_pool_decode_args_init(void *args)'
  ),
  kv_pool_create: lib.func(
    'mlart_error *mlart_kv_pool_create(mlart_engine *engine, const mlart_kv_pool_options *options, _Out_ mlart_kv_pool **out)'
  ),
  kv_pool_free: lib.func('void mlart_kv_pool_free(mlart_kv_pool *pool)'),
  kv_pool_stats_get: lib.func(
    'mlart_error *mlart_kv_pool_stats_get(const mlart_kv_pool *pool, _Inout_ mlart_kv_pool_stats *out)'
  ),
  kv_seq_create: lib.func('mlart_error *mlart_kv_seq_create(mlart_kv_pool *pool, uint64_t seq_id)'),
  kv_seq_free: lib.func('mlart_error *mlart_kv_seq_free(mlart_kv_pool *pool, uint64_t seq_id)'),
  kv_seq_fork: lib.func(
    'mlart_error *mlart_kv_seq_fork(mlart_kv_pool *pool, uint64_t src_id, uint64_t dst_id)'
  ),
  kv_seq_truncate: lib.func(
    'mlart_error *mlart_kv_seq_truncate(mlart_kv_pool *pool, uint64_t seq_id, int64_t length)'
  ),
  kv_seq_length: lib.func(
    'mlart_error *mlart_kv_seq_length(const mlart_kv_pool *pool, uint64_t seq_id, int32_t layer, int64_t *out_length)'
  ),
  kv_append: lib.func(
    'mlart_error *mlart_kv_append(mlart_kv_pool *pool, uint64_t seq_id, int32_t layer, int32_t n_tokens, uint32_t dtype, const void *rows)'
  ),
  kv_pool_decode: lib.func(
    'mlart_error *mlart_kv_pool_decode(mlart_kv_pool *pool, const mlart_kv_pool_decode_args *args)'
  ),
};

const libAbi = C.abi_version();
if (libAbi !== ABI_VERSION) {
  throw new Error(
    `mlart: ${LIBRARY_PATH} has ABI version ${libAbi} but this binding was written for ${ABI_VERSION}`
  );
}

// Sanity: the JS struct layouts match what the library's *_init functions report.
// The *_init functions write the library's whole struct: they get a buffer
// with room for a larger (newer) one, so a layout mismatch is this error
// rather than a write past koffi's copy of the struct.
const INIT_ROOM = 4096;

function initStruct(initFn, type, name) {
  const buf = Buffer.alloc(Math.max(koffi.sizeof(type), INIT_ROOM));
  initFn(buf);
  const size = buf.readUInt32LE(0);
  if (size !== koffi.sizeof(type)) {
    throw new Error(
      `mlart: ${name} is ${size} bytes in ${LIBRARY_PATH} but ${koffi.sizeof(type)} in this binding`
    );
  }
  return koffi.decode(buf, type);
}

// ---------------------------------------------------------------------------
// Errors

class MlartError extends Error {
  /**
   * @param {number} status  mlart_status number
   * @param {string} message the library's message
   */
  constructor(status, message, fn) {
    super(message);
    this.name = 'MlartError';
    /** Status name, e.g. 'INVALID_ARGUMENT'. */
    this.code = STATUS_NAMES[status] ?? `STATUS_${status}`;
    /** Status number (mlart_status). */
    this.status = status;
    /** The C function that failed. */
    if (fn) this.function = fn;
  }
}

/** Throws an MlartError for a non-NULL mlart_error*, freeing it. */
function check(err, fn) {
  if (err === null || err === undefined || err === 0n) return;
  let status;
  let message;
  try {
    status = C.error_code(err);
    message = C.error_message(err);
  } finally {
    C.error_free(err);
  }
  throw new MlartError(status, message, fn);
}

// ---------------------------------------------------------------------------
// Argument helpers (JS-side checks: types and buffer sizes only)

const INT32_MIN = -2147483648;
const INT32_MAX = 2147483647;

function int32(value, name, dflt) {
  if (value === undefined || value === null) {
    if (dflt === undefined) throw new TypeError(`${name} is required (an integer)`);
    return dflt;
  }
  if (typeof value !== 'number' || !Number.isInteger(value)) {
    throw new TypeError(`${name} must be an integer, got ${describe(value)}`);
  }
  if (value < INT32_MIN || value > INT32_MAX) {
    throw new RangeError(`${name} = ${value} does not fit in int32_t`);
  }
  return value;
}

function int64(value, name) {
  if (typeof value === 'bigint') {
    if (value < -(1n << 63n) || value >= 1n << 63n) {
      throw new RangeError(`${name} = ${value} does not fit in int64_t`);
    }
    return value;
  }
  if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
    throw new TypeError(`${name} must be a safe integer or a BigInt, got ${describe(value)}`);
  }
  return BigInt(value);
}

/**
 * A uint64_t option: a non-negative safe-integer Number or a BigInt below
 * 2**64; undefined or null gives `dflt`.
 */
function uint64(value, name, dflt) {
  if (value === undefined || value === null) return dflt;
  let v;
  if (typeof value === 'bigint') {
    v = value;
  } else if (typeof value === 'number' && Number.isInteger(value)) {
    if (!Number.isSafeInteger(value)) {
      throw new RangeError(`${name} = ${value} is not a safe integer (pass a BigInt for values past 2**53)`);
    }
    v = BigInt(value);
  } else {
    throw new TypeError(`${name} must be a non-negative integer (a Number or a BigInt), got ${describe(value)}`);
  }
  if (v < 0n || v >= 1n << 64n) {
    throw new RangeError(`${name} = ${v} is outside the uint64_t range`);
  }
  return v;
}

function seqId(value, name = 'seqId') {
  let v;
  if (typeof value === 'bigint') {
    v = value;
  } else if (typeof value === 'number' && Number.isSafeInteger(value)) {
    v = BigInt(value);
  } else {
    throw new TypeError(`${name} must be a non-negative integer or BigInt, got ${describe(value)}`);
  }
  if (v < 0n || v >= 1n << 64n) {
    throw new RangeError(`${name} = ${v} is outside the uint64_t range`);
  }
  return v;
}

function seqIdArray(value, name = 'seqIds') {
  if (value instanceof BigUint64Array) return value;
  if (typeof value === 'bigint' || typeof value === 'number') {
    return BigUint64Array.of(seqId(value, `${name}[0]`));
  }
  if (!Array.isArray(value)) {
    throw new TypeError(
      `${name} must be an array of ids (numbers or BigInts) or a BigUint64Array, got ${describe(value)}`
    );
  }
  const out = new BigUint64Array(value.length);
  for (let i = 0; i < value.length; i++) out[i] = seqId(value[i], `${name}[${i}]`);
  return out;
}

function int32Array(value, name, { optional = false } = {}) {
  if (value === undefined || value === null) {
    if (optional) return null;
    throw new TypeError(`${name} is required (an Int32Array)`);
  }
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) int32(value[i], `${name}[${i}]`);
    return Int32Array.from(value);
  }
  if (!(value instanceof Int32Array)) {
    throw new TypeError(`${name} must be an Int32Array, got ${describe(value)}`);
  }
  return value;
}

function float32Array(value, name, { optional = false } = {}) {
  if (value === undefined || value === null) {
    if (optional) return null;
    throw new TypeError(`${name} is required (a Float32Array)`);
  }
  if (!(value instanceof Float32Array)) {
    throw new TypeError(`${name} must be a Float32Array, got ${describe(value)}`);
  }
  return value;
}

function byteView(value, name, { optional = false } = {}) {
  if (value === undefined || value === null) {
    if (optional) return null;
    throw new TypeError(`${name} is required (a Uint8Array or Buffer)`);
  }
  if (!ArrayBuffer.isView(value)) {
    throw new TypeError(`${name} must be a Uint8Array, Buffer or other ArrayBufferView, got ${describe(value)}`);
  }
  return value;
}

const REQUIRED = Symbol('required');

function enumValue(value, name, aliases, dflt = REQUIRED) {
  if (value === undefined || value === null) {
    if (dflt === REQUIRED) {
      throw new TypeError(`${name} is required (one of ${Object.keys(aliases).map((k) => `'${k}'`).join(', ')})`);
    }
    return dflt;
  }
  if (typeof value === 'number') {
    if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
      throw new RangeError(`${name} = ${value} is not a valid enumeration value`);
    }
    return value; // unknown numbers are the library's to reject
  }
  if (typeof value === 'string') {
    const v = aliases[value.toLowerCase()];
    if (v !== undefined) return v;
    throw new RangeError(
      `${name} = '${value}' is not one of ${Object.keys(aliases).map((k) => `'${k}'`).join(', ')}`
    );
  }
  throw new TypeError(`${name} must be a string or a number, got ${describe(value)}`);
}

/**
 * The dtype of an activation array: Float32Array is F32; Uint16Array holds
 * bf16 (default) or f16 bits, chosen by `dtypeOpt`.
 */
function activationDtype(arr, dtypeOpt, name, dtypeName) {
  const dt = enumValue(dtypeOpt, dtypeName, DTYPE_ALIASES, null);
  if (arr instanceof Float32Array) {
    if (dt !== null && dt !== DType.F32) {
      throw new TypeError(`${name} is a Float32Array but ${dtypeName} is '${DTYPE_NAMES[dt] ?? dt}'`);
    }
    return DType.F32;
  }
  if (arr instanceof Uint16Array) {
    if (dt === null) return DType.BF16;
    if (dt !== DType.BF16 && dt !== DType.F16) {
      throw new TypeError(
        `${name} is a Uint16Array (bf16 or f16 bits) but ${dtypeName} is '${DTYPE_NAMES[dt] ?? dt}'`
      );
    }
    return dt;
  }
  throw new TypeError(
    `${name} must be a Float32Array (f32) or a Uint16Array (bf16/f16 bits), got ${describe(arr)}`
  );
}

/** Allocates an output array for `dtypeOpt` (default f32) when none is given. */
function outputArray(out, dtypeOpt, n, name, dtypeName) {
  if (out === undefined || out === null) {
    const dt = enumValue(dtypeOpt, dtypeName, DTYPE_ALIASES, DType.F32);
    if (dt === DType.F32) return [new Float32Array(n), dt];
    if (dt === DType.BF16 || dt === DType.F16) return [new Uint16Array(n), dt];
    throw new RangeError(`${dtypeName} must be 'f32', 'bf16' or 'f16'`);
  }
  return [out, activationDtype(out, dtypeOpt, name, dtypeName)];
}

function needElements(arr, n, name, shape) {
  if (arr !== null && arr.length < n) {
    throw new RangeError(
      `${name} has ${arr.length} elements but ${shape} needs ${n}`
    );
  }
}

function needBytes(arr, n, name, shape) {
  if (arr !== null && arr.byteLength < n) {
    throw new RangeError(`${name} has ${arr.byteLength} bytes but ${shape} needs ${n}`);
  }
}

/** Product of the non-negative parts (negative sizes are the library's to reject). */
function prod(...xs) {
  let p = 1;
  for (const x of xs) p *= Math.max(0, x);
  return p;
}

/**
 * mlart_model_options.gpu_projections: true (1, the GPU), false (0, the
 * CPU), undefined or null (the default, -1: MLART_CUDA_PROJECTIONS, else the
 * CPU), or the C value as a number (others are the library's to reject).
 */
function gpuProjections(value, dflt) {
  if (value === undefined || value === null) return dflt;
  if (typeof value === 'boolean') return value ? 1 : 0;
  if (typeof value === 'number') return int32(value, 'gpuProjections');
  throw new TypeError(`gpuProjections must be a boolean (or the C value -1, 0 or 1), got ${describe(value)}`);
}

function describe(v) {
  if (v === null) return 'null';
  if (ArrayBuffer.isView(v)) return `${v.constructor.name}(${v.length ?? v.byteLength})`;
  if (Array.isArray(v)) return `Array(${v.length})`;
  if (typeof v === 'object') return v.constructor ? v.constructor.name : 'object';
  if (typeof v === 'string') return `'${v}'`;
  return `${typeof v} ${String(v)}`;
}

function optionsObject(o, name) {
  if (o === undefined || o === null) return {};
  if (typeof o !== 'object') throw new TypeError(`${name} must be an object, got ${describe(o)}`);
  return o;
}

// ---------------------------------------------------------------------------
// Handles

const handleStats = { created: 0, closed: 0, finalized: 0 };

const registry = new FinalizationRegistry((held) => {
  // The JS object was collected without close(): release the C handle.
  handleStats.finalized++;
  try {
    held.free(held.ptr);
  } catch {
    /* nothing can be reported from a finalizer */
  }
});

class Handle {
  #ptr;
  #kind;
  #free;

  constructor(kind, ptr, free) {
    this.#kind = kind;
    this.#ptr = ptr;
    this.#free = free;
    handleStats.created++;
    registry.register(this, { ptr, free }, this);
  }

  /** The C pointer (a BigInt); throws if closed. */
  get _ptr() {
    if (this.#ptr === null) throw new Error(`mlart: this ${this.#kind} is closed`);
    return this.#ptr;
  }

  /** Whether close() has been called. */
  get closed() {
    return this.#ptr === null;
  }

  /** Releases the C object. Safe to call more than once. */
  close() {
    if (this.#ptr === null) return;
    const ptr = this.#ptr;
    this.#ptr = null;
    registry.unregister(this);
    handleStats.closed++;
    this.#free(ptr);
  }

  [Symbol.dispose]() {
    this.close();
  }
}

// ---------------------------------------------------------------------------
// Engine

class Engine extends Handle {
  /**
   * @param {{backend?: 'auto'|'cpu'|'cuda'|number, threads?: number, deviceIndex?: number, threadAffinity?: 'auto'|'none'|'pin'|number}} [options]
   */
  constructor(options) {
    const o = optionsObject(options, 'options');
    const opts = initStruct(C.engine_options_init, mlart_engine_options, 'mlart_engine_options');
    opts.backend = enumValue(o.backend, 'backend', BACKEND_ALIASES, opts.backend);
    opts.num_threads = int32(o.threads, 'threads', opts.num_threads);
    opts.device_index = int32(o.deviceIndex, 'deviceIndex', opts.device_index);
    opts.thread_affinity = enumValue(o.threadAffinity, 'threadAffinity', AFFINITY_ALIASES, opts.thread_affinity);
    const out = [null];
    check(C.engine_create(opts, out), 'mlart_engine_create');
    super('Engine', out[0], C.engine_free);
  }

  static create(options) {
    return new Engine(options);
  }

  /** What the engine runs on. */
  info() {
    const p = initStruct(C.engine_props_init, mlart_engine_props, 'mlart_engine_props');
    check(C.engine_info(this._ptr, p), 'mlart_engine_info');
    return {
      backend: BACKEND_NAMES[p.backend] ?? String(p.backend),
      cpuIsa: CPU_ISA_NAMES[p.cpu_isa] ?? String(p.cpu_isa),
      numThreads: p.num_threads,
      deviceIndex: p.device_index,
      deviceName: p.device_name,
      cpuFeatures: p.cpu_features,
      reason: p.reason,
      threadPlacement: p.thread_placement,
    };
  }

  /**
   * mlart_decode_paged over host TypedArrays. Returns {out, lse}.
   */
  decodePaged(args) {
    const a = optionsObject(args, 'args');
    const engine = this._ptr;
    const d = initStruct(C.decode_args_init, mlart_decode_args, 'mlart_decode_args');

    d.batch = int32(a.batch, 'batch');
    d.s_q = int32(a.sQ, 'sQ', 1);
    d.h_q = int32(a.hQ, 'hQ');
    d.d_qk = int32(a.dQk, 'dQk');
    d.d_v = int32(a.dV, 'dV');
    d.softmax_scale = number(a.softmaxScale, 'softmaxScale', d.softmax_scale);
    d.causal = a.causal === undefined ? d.causal : Boolean(a.causal);
    d.memory = Memory.HOST;
    d.kv_format = enumValue(a.kvFormat, 'kvFormat', KV_FORMAT_ALIASES, d.kv_format);
    d.num_blocks = int32(a.numBlocks, 'numBlocks');
    d.block_size = int32(a.blockSize, 'blockSize');

    const { batch, s_q, h_q, d_qk, d_v } = d;
    const qShape = `q [batch=${batch}, sQ=${s_q}, hQ=${h_q}, dQk=${d_qk}]`;

    d.q_dtype = activationDtype(a.q, a.qDtype, 'q', 'qDtype');
    needElements(a.q, prod(batch, s_q, h_q, d_qk), 'q', qShape);
    d.q = a.q;

    const kv = byteView(a.kv, 'kv');
    const blockBytes = kvBlockBytes(d.kv_format, d_qk, d.block_size);
    needBytes(kv, prod(d.num_blocks) * blockBytes, 'kv',
      `kv [numBlocks=${d.num_blocks}] x ${blockBytes}-byte blocks`);
    d.kv = kv;

    const sparse = a.indices !== undefined && a.indices !== null;
    const blockTable = int32Array(a.blockTable, 'blockTable', { optional: sparse });
    const seqlens = int32Array(a.seqlens, 'seqlens', { optional: sparse });
    if (blockTable !== null) {
      d.block_table_stride = int32(a.blockTableStride, 'blockTableStride');
      needElements(blockTable, prod(batch, d.block_table_stride), 'blockTable',
        `blockTable [batch=${batch}, blockTableStride=${d.block_table_stride}]`);
    } else {
      d.block_table_stride = int32(a.blockTableStride, 'blockTableStride', d.block_table_stride);
    }
    needElements(seqlens, prod(batch), 'seqlens', `seqlens [batch=${batch}]`);
    d.block_table = blockTable;
    d.seqlens = seqlens;

    if (sparse) lowerIndices(d, a, batch, s_q);
    else if (a.topkLength != null) {
      throw new TypeError('topkLength is only meaningful with indices (sparse decode)');
    }

    const extraKv = byteView(a.extraKv, 'extraKv', { optional: true });
    if (extraKv !== null) {
      d.extra_num_blocks = int32(a.extraNumBlocks, 'extraNumBlocks');
      d.extra_block_size = int32(a.extraBlockSize, 'extraBlockSize');
      const eb = kvBlockBytes(d.kv_format, d_qk, d.extra_block_size);
      needBytes(extraKv, prod(d.extra_num_blocks) * eb, 'extraKv',
        `extraKv [extraNumBlocks=${d.extra_num_blocks}] x ${eb}-byte blocks`);
      d.extra_kv = extraKv;
      const extraIndices = int32Array(a.extraIndices, 'extraIndices');
      d.extra_topk = int32(a.extraTopk, 'extraTopk');
      needElements(extraIndices, prod(batch, s_q, d.extra_topk), 'extraIndices',
        `extraIndices [batch=${batch}, sQ=${s_q}, extraTopk=${d.extra_topk}]`);
      d.extra_indices = extraIndices;
      const etl = int32Array(a.extraTopkLength, 'extraTopkLength', { optional: true });
      needElements(etl, prod(batch), 'extraTopkLength', `extraTopkLength [batch=${batch}]`);
      d.extra_topk_length = etl;
    } else if (a.extraIndices != null || a.extraTopkLength != null) {
      throw new TypeError('extraIndices / extraTopkLength need extraKv');
    }

    const { out, lse } = lowerOutputs(d, a, batch, s_q, h_q, d_v);

    check(C.decode_paged(engine, d), 'mlart_decode_paged');
    return { out, lse: lse ?? undefined };
  }
}

// Sparse indices [batch, sQ, topk] and the optional topkLength [batch],
// checked against the shape, into either decode struct.
function lowerIndices(d, a, batch, s_q) {
  const indices = int32Array(a.indices, 'indices');
  d.topk = int32(a.topk, 'topk');
  needElements(indices, prod(batch, s_q, d.topk), 'indices',
    `indices [batch=${batch}, sQ=${s_q}, topk=${d.topk}]`);
  d.indices = indices;
  const tl = int32Array(a.topkLength, 'topkLength', { optional: true });
  needElements(tl, prod(batch), 'topkLength', `topkLength [batch=${batch}]`);
  d.topk_length = tl;
}

// The sink, output and lse fields shared by both decode structs, checked
// against the shape; returns the output arrays (allocated when omitted).
function lowerOutputs(d, a, batch, s_q, h_q, d_v) {
  const sink = float32Array(a.attnSink, 'attnSink', { optional: true });
  needElements(sink, prod(h_q), 'attnSink', `attnSink [hQ=${h_q}]`);
  d.attn_sink = sink;

  const nOut = prod(batch, s_q, h_q, d_v);
  const [out, outDtype] = outputArray(a.out, a.outDtype, nOut, 'out', 'outDtype');
  needElements(out, nOut, 'out', `out [batch=${batch}, sQ=${s_q}, hQ=${h_q}, dV=${d_v}]`);
  d.out_dtype = outDtype;
  d.out = out;

  const lse = lseArray(a.lse, prod(batch, h_q, s_q));
  needElements(lse, prod(batch, h_q, s_q), 'lse', `lse [batch=${batch}, hQ=${h_q}, sQ=${s_q}]`);
  d.lse = lse;
  d.stream = null;
  return { out, lse };
}

function number(value, name, dflt) {
  if (value === undefined || value === null) return dflt;
  if (typeof value !== 'number') throw new TypeError(`${name} must be a number, got ${describe(value)}`);
  return value;
}

/** lse: a Float32Array, `true` to allocate one, or absent. */
function lseArray(value, n) {
  if (value === true) return new Float32Array(n);
  if (value === false) return null;
  return float32Array(value, 'lse', { optional: true });
}

// ---------------------------------------------------------------------------
// KvPool

class KvPool extends Handle {
  /**
   * @param {Engine} engine
   * @param {{kvFormat?: string|number, dQk?: number, numLayers?: number, blockSize?: number, numBlocks: number,
   *          indexHeadDim?: number}} options  indexHeadDim: a DeepSeek-V3.2 model's
   *   (model.info().indexHeadDim), or 0 (default) for none
   */
  constructor(engine, options) {
    if (!(engine instanceof Engine)) throw new TypeError(`engine must be an Engine, got ${describe(engine)}`);
    const o = optionsObject(options, 'options');
    const opts = initStruct(C.kv_pool_options_init, mlart_kv_pool_options, 'mlart_kv_pool_options');
    opts.kv_format = enumValue(o.kvFormat, 'kvFormat', KV_FORMAT_ALIASES, opts.kv_format);
    opts.d_qk = int32(o.dQk, 'dQk', opts.d_qk);
    opts.num_layers = int32(o.numLayers, 'numLayers', opts.num_layers);
    opts.block_size = int32(o.blockSize, 'blockSize', opts.block_size);
    opts.num_blocks = int32(o.numBlocks, 'numBlocks', opts.num_blocks);
    opts.index_head_dim = int32(o.indexHeadDim, 'indexHeadDim', opts.index_head_dim);
    const out = [null];
    check(C.kv_pool_create(engine._ptr, opts, out), 'mlart_kv_pool_create');
    super('KvPool', out[0], C.kv_pool_free);
    /** Cache row format (mlart_kv_format number). */
    this.kvFormat = opts.kv_format;
    /** Elements per cache row. */
    this.dQk = opts.d_qk;
    this.numLayers = opts.num_layers;
    this.blockSize = opts.block_size;
    this.numBlocks = opts.num_blocks;
    /** Elements of a DeepSeek-V3.2 indexer key per token and layer; 0 for none. */
    this.indexHeadDim = opts.index_head_dim;
    Object.freeze(this);
  }

  /** Occupancy (numbers). */
  stats() {
    const s = initStruct(C.kv_pool_stats_init, mlart_kv_pool_stats, 'mlart_kv_pool_stats');
    check(C.kv_pool_stats_get(this._ptr, s), 'mlart_kv_pool_stats_get');
    return {
      blocksTotal: Number(s.blocks_total),
      blocksUsed: Number(s.blocks_used),
      blocksFree: Number(s.blocks_free),
      sequences: Number(s.sequences),
      bytesPerBlock: Number(s.bytes_per_block),
      bytesTotal: Number(s.bytes_total),
    };
  }

  createSeq(id) {
    check(C.kv_seq_create(this._ptr, seqId(id, 'id')), 'mlart_kv_seq_create');
  }

  freeSeq(id) {
    check(C.kv_seq_free(this._ptr, seqId(id, 'id')), 'mlart_kv_seq_free');
  }

  forkSeq(srcId, dstId) {
    check(C.kv_seq_fork(this._ptr, seqId(srcId, 'srcId'), seqId(dstId, 'dstId')), 'mlart_kv_seq_fork');
  }

  truncateSeq(id, length) {
    check(C.kv_seq_truncate(this._ptr, seqId(id, 'id'), int64(length, 'length')), 'mlart_kv_seq_truncate');
  }

  /** Tokens stored in `layer` (default 0) of sequence `id`. */
  seqLength(id, layer = 0) {
    const out = new BigInt64Array(1);
    check(C.kv_seq_length(this._ptr, seqId(id, 'id'), int32(layer, 'layer'), out), 'mlart_kv_seq_length');
    return Number(out[0]);
  }

  /**
   * Appends rows [nTokens, dQk] to `layer` of `seq`. `rows` is a
   * Float32Array (f32) or Uint16Array (bf16 bits, or f16 with
   * {dtype: 'f16'}); nTokens defaults to rows.length / dQk.
   */
  append(seq, layer, rows, options) {
    const o = optionsObject(options, 'options');
    const id = seqId(seq, 'seq');
    const l = int32(layer, 'layer');
    let nTokens;
    let dtype;
    if ((rows === null || rows === undefined) && (o.nTokens === undefined || o.nTokens === 0)) {
      nTokens = 0;
      dtype = enumValue(o.dtype, 'dtype', DTYPE_ALIASES, DType.F32);
      rows = null;
    } else {
      dtype = activationDtype(rows, o.dtype, 'rows', 'dtype');
      if (o.nTokens === undefined) {
        if (this.dQk <= 0 || rows.length % this.dQk !== 0) {
          throw new RangeError(
            `rows has ${rows.length} elements, not a multiple of the pool's dQk = ${this.dQk}`
          );
        }
        nTokens = int32(rows.length / this.dQk, 'nTokens');
      } else {
        nTokens = int32(o.nTokens, 'nTokens');
        needElements(rows, prod(nTokens, this.dQk), 'rows', `rows [nTokens=${nTokens}, dQk=${this.dQk}]`);
      }
    }
    check(C.kv_append(this._ptr, id, l, nTokens, dtype, rows), 'mlart_kv_append');
  }

  /** mlart_kv_pool_decode. Returns {out, lse}. */
  decode(args) {
    const a = optionsObject(args, 'args');
    const pool = this._ptr;
    const d = initStruct(C.kv_pool_decode_args_init, mlart_kv_pool_decode_args, 'mlart_kv_pool_decode_args');
    const ids = seqIdArray(a.seqIds, 'seqIds');
    d.layer = int32(a.layer, 'layer', 0);
    d.batch = int32(ids.length, 'seqIds.length');
    d.seq_ids = ids;
    d.s_q = int32(a.sQ, 'sQ', 1);
    d.h_q = int32(a.hQ, 'hQ');
    d.d_v = int32(a.dV, 'dV');
    d.softmax_scale = number(a.softmaxScale, 'softmaxScale', d.softmax_scale);
    d.causal = a.causal === undefined ? d.causal : Boolean(a.causal);
    d.memory = Memory.HOST;
    const { batch, s_q, h_q, d_v } = d;
    const d_qk = this.dQk;

    d.q_dtype = activationDtype(a.q, a.qDtype, 'q', 'qDtype');
    needElements(a.q, prod(batch, s_q, h_q, d_qk), 'q',
      `q [batch=${batch}, sQ=${s_q}, hQ=${h_q}, dQk=${d_qk}]`);
    d.q = a.q;

    if (a.indices !== undefined && a.indices !== null) lowerIndices(d, a, batch, s_q);
    else if (a.topkLength != null) {
      throw new TypeError('topkLength is only meaningful with indices (sparse decode)');
    }

    const { out, lse } = lowerOutputs(d, a, batch, s_q, h_q, d_v);

    check(C.kv_pool_decode(pool, d), 'mlart_kv_pool_decode');
    return { out, lse: lse ?? undefined };
  }
}

// ---------------------------------------------------------------------------
// Model

const progressPtrType = koffi.pointer(mlart_progress_fn);

class Model extends Handle {
  #info;

  constructor(ptr) {
    super('Model', ptr, C.model_free);
    try {
      this.#info = this.info();
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /**
   * Loads the attention layers of a DeepSeek checkpoint directory.
   * @param {Engine} engine
   * @param {string} dir
   * @param {{firstLayer?: number, numLayers?: number, convertWeights?: boolean,
   *          weightDtype?: string|number, activations?: 'precise'|'bf16'|number,
   *          gpuProjections?: boolean|number, keptKeysBytes?: number|bigint,
   *          progress?: (fraction: number, stage: string) => boolean|void}} [options]
   */
  static load(engine, dir, options) {
    if (!(engine instanceof Engine)) throw new TypeError(`engine must be an Engine, got ${describe(engine)}`);
    if (typeof dir !== 'string') throw new TypeError(`dir must be a string, got ${describe(dir)}`);
    const o = optionsObject(options, 'options');
    const opts = initStruct(C.model_options_init, mlart_model_options, 'mlart_model_options');
    opts.first_layer = int32(o.firstLayer, 'firstLayer', opts.first_layer);
    opts.num_layers = int32(o.numLayers, 'numLayers', opts.num_layers);
    if (o.convertWeights !== undefined) opts.convert_weights = Boolean(o.convertWeights);
    opts.weight_dtype = enumValue(o.weightDtype, 'weightDtype', DTYPE_ALIASES, opts.weight_dtype);
    opts.activations = enumValue(o.activations, 'activations', ACTIVATIONS_ALIASES, opts.activations);
    opts.gpu_projections = gpuProjections(o.gpuProjections, opts.gpu_projections);
    opts.kept_keys_bytes = uint64(o.keptKeysBytes, 'keptKeysBytes', opts.kept_keys_bytes);

    let cb = null;
    let thrown;
    if (o.progress !== undefined && o.progress !== null) {
      if (typeof o.progress !== 'function') {
        throw new TypeError(`progress must be a function, got ${describe(o.progress)}`);
      }
      const fn = o.progress;
      cb = koffi.register((fraction, stage) => {
        try {
          return fn(fraction, stage) !== false;
        } catch (e) {
          thrown = e;
          return false;
        }
      }, progressPtrType);
      opts.progress = cb;
    }
    const engPtr = engine._ptr;
    const out = [null];
    let err;
    try {
      err = C.model_load(engPtr, dir, opts, out);
    } finally {
      if (cb !== null) koffi.unregister(cb);
    }
    if (thrown !== undefined) {
      if (!err) C.model_free(out[0]);
      else C.error_free(err);
      throw thrown;
    }
    check(err, 'mlart_model_load');
    return new Model(out[0]);
  }

  /** What the model is (numbers and a dtype name). */
  info() {
    const p = initStruct(C.model_props_init, mlart_model_props, 'mlart_model_props');
    check(C.model_info(this._ptr, p), 'mlart_model_info');
    return {
      numLayers: p.num_layers,
      firstLayer: p.first_layer,
      loadedLayers: p.loaded_layers,
      hiddenSize: p.hidden_size,
      numHeads: p.num_heads,
      qLoraRank: p.q_lora_rank,
      kvLoraRank: p.kv_lora_rank,
      qkNopeHeadDim: p.qk_nope_head_dim,
      qkRopeHeadDim: p.qk_rope_head_dim,
      vHeadDim: p.v_head_dim,
      dQk: p.d_qk,
      ropeTheta: p.rope_theta,
      yarn: p.yarn,
      yarnFactor: p.yarn_factor,
      yarnOriginalMaxPosition: Number(p.yarn_original_max_position),
      yarnBetaFast: p.yarn_beta_fast,
      yarnBetaSlow: p.yarn_beta_slow,
      yarnMscale: p.yarn_mscale,
      yarnMscaleAllDim: p.yarn_mscale_all_dim,
      softmaxScale: p.softmax_scale,
      weightDtype: DTYPE_NAMES[p.weight_dtype] ?? String(p.weight_dtype),
      bytesLoaded: Number(p.bytes_loaded),
      activations: ACTIVATIONS_NAMES[p.activations] ?? String(p.activations),
      projectionIsa: CPU_ISA_NAMES[p.projection_isa] ?? String(p.projection_isa),
      indexNHeads: p.index_n_heads,
      indexHeadDim: p.index_head_dim,
      indexTopk: p.index_topk,
      projectionsOnGpu: p.projections_on_gpu !== 0,
      keptKeysBytes: Number(p.kept_keys_bytes),
    };
  }

  /**
   * Runs one layer's MLA attention block, appending to `pool`.
   * x, out: [sum(nTokens), hiddenSize]. Returns out. DeepSeek-V3.2 models
   * only: an `indexOut` Int32Array [sum(nTokens), indexTopk] receives the
   * positions each new token attended to (ascending, -1 after the last).
   */
  forward(pool, args) {
    const model = this._ptr;
    if (!(pool instanceof KvPool)) throw new TypeError(`pool must be a KvPool, got ${describe(pool)}`);
    const poolPtr = pool._ptr;
    const a = optionsObject(args, 'args');
    const f = initStruct(C.forward_args_init, mlart_forward_args, 'mlart_forward_args');
    const ids = seqIdArray(a.seqIds, 'seqIds');
    f.layer = int32(a.layer, 'layer');
    f.batch = int32(ids.length, 'seqIds.length');
    f.seq_ids = ids;
    let nTokens = a.nTokens;
    if (typeof nTokens === 'number') nTokens = Int32Array.of(int32(nTokens, 'nTokens'));
    nTokens = int32Array(nTokens, 'nTokens');
    needElements(nTokens, ids.length, 'nTokens', `nTokens [batch=${ids.length}]`);
    f.n_tokens = nTokens;
    let total = 0;
    for (let i = 0; i < ids.length; i++) total += Math.max(0, nTokens[i]);
    const hidden = this.#info.hiddenSize;
    const shape = `[sum(nTokens)=${total}, hiddenSize=${hidden}]`;
    f.x_dtype = activationDtype(a.x, a.xDtype, 'x', 'xDtype');
    needElements(a.x, prod(total, hidden), 'x', `x ${shape}`);
    f.x = a.x;
    const [out, outDtype] = outputArray(a.out, a.outDtype, prod(total, hidden), 'out', 'outDtype');
    needElements(out, prod(total, hidden), 'out', `out ${shape}`);
    f.out_dtype = outDtype;
    f.out = out;
    if (a.indexOut !== undefined && a.indexOut !== null) {
      if (!(a.indexOut instanceof Int32Array)) {
        throw new TypeError(`indexOut must be an Int32Array, got ${describe(a.indexOut)}`);
      }
      // Without an indexer the library rejects indexOut, naming it.
      const topk = this.#info.indexTopk;
      needElements(a.indexOut, prod(total, topk), 'indexOut',
        `indexOut [sum(nTokens)=${total}, indexTopk=${topk}]`);
      f.index_out = a.indexOut;
    }
    f.memory = Memory.HOST; // TypedArrays; stream stays NULL
    check(C.model_forward(model, poolPtr, f), 'mlart_model_forward');
    return out;
  }
}

// ---------------------------------------------------------------------------
// Free functions

function version() {
  return C.version();
}

function abiVersion() {
  return C.abi_version();
}

/** Bytes one token occupies in `format` with rows of `dQk`. */
function kvRowBytes(format, dQk) {
  const out = new BigUint64Array(1);
  check(
    C.kv_row_bytes(enumValue(format, 'format', KV_FORMAT_ALIASES), int32(dQk, 'dQk'), out),
    'mlart_kv_row_bytes'
  );
  return Number(out[0]);
}

/** Bytes of one cache block (the stride between blocks). */
function kvBlockBytes(format, dQk, blockSize) {
  const out = new BigUint64Array(1);
  check(
    C.kv_block_bytes(
      enumValue(format, 'format', KV_FORMAT_ALIASES),
      int32(dQk, 'dQk'),
      int32(blockSize, 'blockSize'),
      out
    ),
    'mlart_kv_block_bytes'
  );
  return Number(out[0]);
}

/**
 * Writes rows [nTokens, dQk] (Float32Array, or Uint16Array bf16/f16) into
 * ceil(nTokens / blockSize) blocks of `format`. Returns `dst` (allocated
 * when not given).
 */
function kvQuantize(format, dQk, blockSize, rows, options) {
  const o = optionsObject(options, 'options');
  const f = enumValue(format, 'format', KV_FORMAT_ALIASES);
  const d = int32(dQk, 'dQk');
  const bs = int32(blockSize, 'blockSize');
  const dtype = activationDtype(rows, o.dtype, 'rows', 'dtype');
  let n;
  if (o.nTokens === undefined) {
    if (d <= 0 || rows.length % d !== 0) {
      throw new RangeError(`rows has ${rows.length} elements, not a multiple of dQk = ${d}`);
    }
    n = int32(rows.length / d, 'nTokens');
  } else {
    n = int32(o.nTokens, 'nTokens');
    needElements(rows, prod(n, d), 'rows', `rows [nTokens=${n}, dQk=${d}]`);
  }
  const bb = kvBlockBytes(f, d, bs);
  const need = bs > 0 ? Math.ceil(Math.max(0, n) / bs) * bb : 0;
  const dst = o.dst === undefined ? new Uint8Array(need) : byteView(o.dst, 'dst');
  needBytes(dst, need, 'dst', `ceil(nTokens=${n} / blockSize=${bs}) blocks of ${bb} bytes`);
  check(C.kv_quantize(f, d, bs, n, dtype, rows, dst), 'mlart_kv_quantize');
  return dst;
}

/**
 * Reads nTokens tokens from blocks of `format` as rows [nTokens, dQk]
 * (Float32Array by default, or Uint16Array with {dtype: 'bf16'|'f16'}).
 */
function kvDequantize(format, dQk, blockSize, nTokens, src, options) {
  const o = optionsObject(options, 'options');
  const f = enumValue(format, 'format', KV_FORMAT_ALIASES);
  const d = int32(dQk, 'dQk');
  const bs = int32(blockSize, 'blockSize');
  const n = int32(nTokens, 'nTokens');
  const s = byteView(src, 'src');
  const bb = kvBlockBytes(f, d, bs);
  needBytes(s, bs > 0 ? Math.ceil(Math.max(0, n) / bs) * bb : 0, 'src',
    `ceil(nTokens=${n} / blockSize=${bs}) blocks of ${bb} bytes`);
  const [out, dtype] = outputArray(o.out, o.dtype, prod(n, d), 'out', 'dtype');
  needElements(out, prod(n, d), 'out', `out [nTokens=${n}, dQk=${d}]`);
  check(C.kv_dequantize(f, d, bs, n, s, dtype, out), 'mlart_kv_dequantize');
  return out;
}

/** Number of CUDA devices (0 without a driver). */
function deviceCount() {
  const out = new Int32Array(1);
  check(C.device_count(out), 'mlart_device_count');
  return out[0];
}

/** Describes CUDA device `index`. */
function deviceInfo(index) {
  const p = initStruct(C.device_props_init, mlart_device_props, 'mlart_device_props');
  check(C.device_info(int32(index, 'index'), p), 'mlart_device_info');
  return {
    deviceIndex: p.device_index,
    name: p.name,
    computeMajor: p.compute_major,
    computeMinor: p.compute_minor,
    smCount: p.sm_count,
    totalMemory: Number(p.total_memory),
    hasKernels: p.has_kernels,
    kernels: p.kernels,
  };
}

/** The library's human-readable name of a status ("invalid argument", ...). */
function statusName(status) {
  return C.status_name(status >>> 0);
}

// bf16 helpers (round to nearest even; NaN stays NaN).
const cvtF32 = new Float32Array(1);
const cvtU32 = new Uint32Array(cvtF32.buffer);

function f32ToBf16(src) {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) {
    cvtF32[0] = src[i];
    const u = cvtU32[0];
    if ((u & 0x7fffffff) > 0x7f800000) {
      out[i] = (u >>> 16) | 0x40; // quiet NaN
    } else {
      out[i] = ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
    }
  }
  return out;
}

function bf16ToF32(src) {
  const out = new Float32Array(src.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) u[i] = src[i] << 16;
  return out;
}

module.exports = {
  Engine,
  KvPool,
  Model,
  MlartError,
  Status,
  DType,
  KvFormat,
  Memory,
  Backend,
  CpuIsa,
  ABI_VERSION,
  LIBRARY_PATH,
  version,
  abiVersion,
  kvRowBytes,
  kvBlockBytes,
  kvQuantize,
  kvDequantize,
  deviceCount,
  deviceInfo,
  statusName,
  f32ToBf16,
  bf16ToF32,
  /** Diagnostics: handles created, closed and released by the finalizer. */
  handleStats: () => ({ ...handleStats }),
};
