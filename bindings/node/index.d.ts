// Type declarations of the mlart Node.js binding (index.js).

/** Status numbers (mlart_status). */
export declare const Status: Readonly<{
  OK: 0;
  INVALID_ARGUMENT: 1;
  NULL_POINTER: 2;
  OUT_OF_MEMORY: 3;
  POOL_EXHAUSTED: 4;
  UNSUPPORTED: 5;
  DEVICE: 6;
  IO: 7;
  FORMAT: 8;
  NOT_FOUND: 9;
  CANCELLED: 10;
  INTERNAL: 11;
}>;
export type StatusName = keyof typeof Status;

export declare const DType: Readonly<{ F32: 0; BF16: 1; F16: 2; FP8_E4M3: 3 }>;
export declare const KvFormat: Readonly<{ BF16: 0; F16: 1; F32: 2; FP8_V32: 3; FP8_MODEL1: 4 }>;
export declare const Memory: Readonly<{ HOST: 0; DEVICE: 1 }>;
export declare const Backend: Readonly<{ AUTO: 0; CPU: 1; CUDA: 2 }>;
export declare const CpuIsa: Readonly<{ SCALAR: 0; AVX2: 1; AVX512: 2; AMX: 3; AVX512_BF16: 4 }>;

/** ABI version this binding was written for (MLART_ABI_VERSION). */
export declare const ABI_VERSION: number;
/** Path of the loaded libmlart.so. */
export declare const LIBRARY_PATH: string;

/** An activation dtype name (case-insensitive) or an mlart_dtype number. */
export type DTypeName = 'f32' | 'bf16' | 'f16' | 'float32' | 'bfloat16' | 'float16' | number;
/** A KV cache format name (case-insensitive) or an mlart_kv_format number. */
export type KvFormatName = 'bf16' | 'f16' | 'f32' | 'fp8_v32' | 'fp8_model1' | number;
export type BackendName = 'auto' | 'cpu' | 'cuda' | number;

/** Float32Array (f32) or Uint16Array holding bf16 (default) or f16 bits. */
export type Activations = Float32Array | Uint16Array;
/** A sequence id: a BigInt or a non-negative safe integer (uint64_t). */
export type SeqId = bigint | number;

/** An error returned by the library. */
export declare class MlartError extends Error {
  name: 'MlartError';
  /** Status name, e.g. 'INVALID_ARGUMENT'. */
  code: StatusName | string;
  /** Status number (mlart_status). */
  status: number;
  /** The C function that failed, e.g. 'mlart_decode_paged'. */
  function?: string;
}

declare abstract class Handle {
  /** Whether close() has been called. */
  readonly closed: boolean;
  /** Releases the C object. Safe to call more than once; later use throws. */
  close(): void;
  [Symbol.dispose](): void;
}

export interface EngineOptions {
  backend?: BackendName;
  /** CPU worker threads; 0 (default) = one per core. */
  threads?: number;
  /** GPU ordinal (CUDA backend). */
  deviceIndex?: number;
  /**
   * Whether CPU worker threads are pinned: 'auto' (default; pinned when
   * the pool has one thread per CPU the process may use), 'none', 'pin'.
   */
  threadAffinity?: 'auto' | 'none' | 'pin' | number;
}

export interface EngineInfo {
  backend: 'cpu' | 'cuda' | string;
  cpuIsa: 'scalar' | 'avx2' | 'avx512' | 'amx' | 'avx512bf16' | string;
  numThreads: number;
  deviceIndex: number;
  deviceName: string;
  cpuFeatures: string;
  reason: string;
  /** CPU engines: "pinned to CPUs 0,1 (...)" or "not pinned (...)". */
  threadPlacement: string;
}

/** Arguments of Engine.decodePaged (mlart_decode_args, host memory). */
export interface DecodePagedArgs {
  batch: number;
  /** Query tokens per sequence; default 1. */
  sQ?: number;
  hQ: number;
  dQk: number;
  dV: number;
  /** 0 (default) = 1/sqrt(dQk). */
  softmaxScale?: number;
  causal?: boolean;
  /** [batch, sQ, hQ, dQk]. */
  q: Activations;
  /** For a Uint16Array q: 'bf16' (default) or 'f16'. */
  qDtype?: DTypeName;
  /** Default 'bf16'. */
  kvFormat?: KvFormatName;
  /** numBlocks blocks of kvBlockBytes(kvFormat, dQk, blockSize) bytes. */
  kv: ArrayBufferView;
  numBlocks: number;
  blockSize: number;
  /** [batch, blockTableStride] (dense decode). */
  blockTable?: Int32Array | number[];
  blockTableStride?: number;
  /** [batch] (dense decode). */
  seqlens?: Int32Array | number[];
  /** Sparse decode: [batch, sQ, topk] cache positions (-1 = none). */
  indices?: Int32Array | number[];
  topk?: number;
  /** [batch]. */
  topkLength?: Int32Array | number[];
  extraKv?: ArrayBufferView;
  extraNumBlocks?: number;
  extraBlockSize?: number;
  extraIndices?: Int32Array | number[];
  extraTopk?: number;
  extraTopkLength?: Int32Array | number[];
  /** [hQ]. */
  attnSink?: Float32Array;
  /** [batch, sQ, hQ, dV]; allocated (f32 unless outDtype says otherwise) when absent. */
  out?: Activations;
  outDtype?: DTypeName;
  /** [batch, hQ, sQ]; `true` to allocate one. */
  lse?: Float32Array | boolean;
}

export interface DecodeResult<O extends Activations = Activations> {
  out: O;
  lse?: Float32Array;
}

export declare class Engine extends Handle {
  constructor(options?: EngineOptions);
  static create(options?: EngineOptions): Engine;
  info(): EngineInfo;
  /** mlart_decode_paged; every buffer length is checked against the shape first. */
  decodePaged(args: DecodePagedArgs): DecodeResult;
}

export interface KvPoolOptions {
  /** Default 'bf16'. */
  kvFormat?: KvFormatName;
  /** Default 576. */
  dQk?: number;
  /** Default 1. */
  numLayers?: number;
  /** Default 64. */
  blockSize?: number;
  /** Required. */
  numBlocks: number;
  /**
   * Elements of a DeepSeek-V3.2 indexer key per token and layer: a V3.2
   * model's forward needs its `info().indexHeadDim` here (such a pool takes
   * rows only from that forward, not from append). Default 0: none.
   */
  indexHeadDim?: number;
}

export interface KvPoolStats {
  blocksTotal: number;
  blocksUsed: number;
  blocksFree: number;
  sequences: number;
  bytesPerBlock: number;
  bytesTotal: number;
}

export interface AppendOptions {
  /** For a Uint16Array: 'bf16' (default) or 'f16'. */
  dtype?: DTypeName;
  /** Default rows.length / dQk. */
  nTokens?: number;
}

/** Arguments of KvPool.decode (mlart_kv_pool_decode_args). */
export interface PoolDecodeArgs {
  /** Default 0. */
  layer?: number;
  /** Sequence ids [batch] (repeats allowed). */
  seqIds: BigUint64Array | SeqId[] | SeqId;
  sQ?: number;
  hQ: number;
  dV: number;
  softmaxScale?: number;
  causal?: boolean;
  /** [batch, sQ, hQ, pool.dQk]. */
  q: Activations;
  qDtype?: DTypeName;
  /** Sparse: [batch, sQ, topk] logical token positions (-1 = none). */
  indices?: Int32Array | number[];
  topk?: number;
  topkLength?: Int32Array | number[];
  attnSink?: Float32Array;
  out?: Activations;
  outDtype?: DTypeName;
  lse?: Float32Array | boolean;
}

export declare class KvPool extends Handle {
  constructor(engine: Engine, options: KvPoolOptions);
  readonly kvFormat: number;
  readonly dQk: number;
  readonly numLayers: number;
  readonly blockSize: number;
  readonly numBlocks: number;
  /** 0 when the pool keeps no DeepSeek-V3.2 indexer keys. */
  readonly indexHeadDim: number;
  stats(): KvPoolStats;
  createSeq(id: SeqId): void;
  freeSeq(id: SeqId): void;
  forkSeq(srcId: SeqId, dstId: SeqId): void;
  truncateSeq(id: SeqId, length: number | bigint): void;
  /** Tokens in `layer` (default 0). */
  seqLength(id: SeqId, layer?: number): number;
  /** Appends rows [nTokens, dQk]; `rows` may be null for zero tokens. */
  append(seq: SeqId, layer: number, rows: Activations | null, options?: AppendOptions): void;
  decode(args: PoolDecodeArgs): DecodeResult;
}

export interface ModelLoadOptions {
  firstLayer?: number;
  /** 0 (default) = all from firstLayer on. */
  numLayers?: number;
  convertWeights?: boolean;
  weightDtype?: DTypeName;
  /**
   * How the projections take their activations: 'precise' (default; about
   * 16 bits kept) or 'bf16' (rounded, as DeepSeek's reference; faster prefill).
   */
  activations?: 'precise' | 'bf16';
  /**
   * Where a CUDA engine runs the projections (mlart_model_options.gpu_projections):
   * true: the GPU (bf16 and FP8 weights; f32/f16 ones stay on the CPU);
   * false: the CPU; absent (default): as MLART_CUDA_PROJECTIONS says, else the
   * CPU. A number is passed as the C value (-1, 0 or 1; others are the
   * library's INVALID_ARGUMENT). CPU engines ignore it; `info().projectionsOnGpu`
   * tells the outcome.
   */
  gpuProjections?: boolean | number;
  /**
   * The most bytes of up-projected keys (K and V of every head) one `forward`
   * keeps between the passes of a long prompt (mlart_model_options.kept_keys_bytes;
   * a sequence's new tokens past 512 run in passes). Past it, the positions
   * beyond the kept ones are up-projected again in every pass: time, not
   * correctness. 0 or absent (default): 1 GiB; less than one 64-position
   * block's rows keeps none; 2n ** 64n - 1n: no limit. A non-negative integer
   * (a safe-integer Number or a BigInt below 2 ** 64); only the CPU's prefill
   * keeps keys. `info().keptKeysBytes` tells the value in effect.
   */
  keptKeysBytes?: number | bigint;
  /** Called during the load; return false to cancel (MlartError 'CANCELLED'). */
  progress?: (fraction: number, stage: string) => boolean | void;
}

export interface ModelInfo {
  numLayers: number;
  firstLayer: number;
  loadedLayers: number;
  hiddenSize: number;
  numHeads: number;
  qLoraRank: number;
  kvLoraRank: number;
  qkNopeHeadDim: number;
  qkRopeHeadDim: number;
  vHeadDim: number;
  /** Pool row width: kvLoraRank + qkRopeHeadDim. */
  dQk: number;
  ropeTheta: number;
  yarn: boolean;
  yarnFactor: number;
  yarnOriginalMaxPosition: number;
  yarnBetaFast: number;
  yarnBetaSlow: number;
  yarnMscale: number;
  yarnMscaleAllDim: number;
  softmaxScale: number;
  weightDtype: 'f32' | 'bf16' | 'f16' | 'fp8_e4m3' | string;
  bytesLoaded: number;
  /** How the projections take their activations (the load option). */
  activations: 'precise' | 'bf16' | string;
  /** The projections' vector code: the engine's CPU kernel variant capped by the CPU. */
  projectionIsa: 'scalar' | 'avx2' | 'avx512' | 'avx512bf16' | string;
  /** DeepSeek-V3.2's sparse-attention indexer: heads; 0 without one. */
  indexNHeads: number;
  /** Indexer key width; a pool for this model needs it as `indexHeadDim`. */
  indexHeadDim: number;
  /** Positions each token attends to once past them; 0 without an indexer. */
  indexTopk: number;
  /**
   * True when the projections run on the GPU (a CUDA engine asked for it with
   * `gpuProjections` or MLART_CUDA_PROJECTIONS; bf16 or FP8 weights); always
   * false on a CPU engine.
   */
  projectionsOnGpu: boolean;
  /**
   * The `keptKeysBytes` in effect, 0 resolved to its default of 1 GiB
   * (1073741824). A Number, like `bytesLoaded`: exact up to 2 ** 53 (no
   * limit, 2n ** 64n - 1n, reads as 2 ** 64).
   */
  keptKeysBytes: number;
}

export interface ForwardArgs {
  /** Absolute layer index. */
  layer: number;
  seqIds: BigUint64Array | SeqId[] | SeqId;
  /** New tokens per sequence [batch]. */
  nTokens: Int32Array | number[] | number;
  /** [sum(nTokens), hiddenSize]. */
  x: Activations;
  xDtype?: DTypeName;
  /** [sum(nTokens), hiddenSize]; allocated when absent. */
  out?: Activations;
  outDtype?: DTypeName;
  /**
   * DeepSeek-V3.2 models only: receives [sum(nTokens), indexTopk] positions
   * each new token attended to, ascending, -1 after the last (a token at
   * position p < indexTopk attends to all of 0..p).
   */
  indexOut?: Int32Array;
}

export declare class Model extends Handle {
  private constructor();
  static load(engine: Engine, dir: string, options?: ModelLoadOptions): Model;
  info(): ModelInfo;
  /** Runs one layer's attention block, appending to `pool`; returns out. */
  forward(pool: KvPool, args: ForwardArgs): Activations;
}

export interface DeviceInfo {
  deviceIndex: number;
  name: string;
  computeMajor: number;
  computeMinor: number;
  smCount: number;
  totalMemory: number;
  hasKernels: boolean;
  kernels: string;
}

export declare function version(): string;
export declare function abiVersion(): number;
export declare function kvRowBytes(format: KvFormatName, dQk: number): number;
export declare function kvBlockBytes(format: KvFormatName, dQk: number, blockSize: number): number;
export declare function kvQuantize(
  format: KvFormatName,
  dQk: number,
  blockSize: number,
  rows: Activations,
  options?: { dtype?: DTypeName; nTokens?: number; dst?: ArrayBufferView }
): ArrayBufferView;
export declare function kvDequantize(
  format: KvFormatName,
  dQk: number,
  blockSize: number,
  nTokens: number,
  src: ArrayBufferView,
  options?: { dtype?: DTypeName; out?: Activations }
): Activations;
export declare function deviceCount(): number;
export declare function deviceInfo(index: number): DeviceInfo;
export declare function statusName(status: number): string;
/** float32 -> bf16 bits, round to nearest even. */
export declare function f32ToBf16(src: ArrayLike<number>): Uint16Array;
export declare function bf16ToF32(src: Uint16Array): Float32Array;
/** Diagnostics: handles created, closed, and released by the finalizer. */
export declare function handleStats(): { created: number; closed: number; finalized: number };
