// mlart.hpp — header-only C++17 RAII wrapper over the mlart C ABI (mlart.h).
//
// It adds ownership (move-only handles that free themselves) and exceptions
// (mlart::Error carrying the library's status and message), and nothing
// else: every call is the C call of the same name, and every raw struct and
// handle stays reachable for what the wrapper does not spell out.
//
//   mlart::Engine engine = mlart::Engine::create({mlart::Backend::Cpu});
//   mlart::KvPoolOptions po;
//   po.d_qk = 64; po.block_size = 16; po.num_blocks = 32;
//   mlart::KvPool pool = mlart::KvPool::create(engine, po);
//   pool.seq_create(7);
//   pool.append(7, /*layer=*/0, rows);              // std::vector<float>, 64 per token
//   mlart::DecodeShape shape;
//   shape.h_q = 4; shape.d_v = 48;
//   try { pool.decode(0, {7}, shape, q.data(), out.data()); }  // float* = F32
//   catch (const mlart::Error &e) { std::cerr << e.status_name() << ": " << e.what(); }
//
// bf16 / f16 data travels as std::uint16_t; say which with mlart::bf16(p) or
// mlart::f16(p) (a float pointer is F32 by itself).
//
// Thread-safety is the C library's (see mlart.h): engines, pools and models
// may be used from several threads; a wrapper object itself is not
// synchronised, so do not move or destroy one while another thread uses it.
#ifndef MLART_HPP
#define MLART_HPP

#include "mlart.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mlart {

// ------------------------------------------------------------------ enums
// Values equal the MLART_* constants, so a static_cast converts either way.

enum class Status : std::uint32_t {
    Ok = MLART_STATUS_OK,
    InvalidArgument = MLART_STATUS_INVALID_ARGUMENT,
    NullPointer = MLART_STATUS_NULL_POINTER,
    OutOfMemory = MLART_STATUS_OUT_OF_MEMORY,
    PoolExhausted = MLART_STATUS_POOL_EXHAUSTED,
    Unsupported = MLART_STATUS_UNSUPPORTED,
    Device = MLART_STATUS_DEVICE,
    Io = MLART_STATUS_IO,
    Format = MLART_STATUS_FORMAT,
    NotFound = MLART_STATUS_NOT_FOUND,
    Cancelled = MLART_STATUS_CANCELLED,
    Internal = MLART_STATUS_INTERNAL,
};

enum class Dtype : std::uint32_t {
    F32 = MLART_DTYPE_F32,
    Bf16 = MLART_DTYPE_BF16,
    F16 = MLART_DTYPE_F16,
    Fp8E4m3 = MLART_DTYPE_FP8_E4M3,
};

enum class KvFormat : std::uint32_t {
    Bf16 = MLART_KV_FORMAT_BF16,
    F16 = MLART_KV_FORMAT_F16,
    F32 = MLART_KV_FORMAT_F32,
    Fp8V32 = MLART_KV_FORMAT_FP8_V32,
    Fp8Model1 = MLART_KV_FORMAT_FP8_MODEL1,
};

enum class Memory : std::uint32_t {
    Host = MLART_MEMORY_HOST,
    Device = MLART_MEMORY_DEVICE,
};

enum class Backend : std::uint32_t {
    Auto = MLART_BACKEND_AUTO,
    Cpu = MLART_BACKEND_CPU,
    Cuda = MLART_BACKEND_CUDA,
};

enum class ThreadAffinity : std::uint32_t {
    Auto = MLART_AFFINITY_AUTO,
    None = MLART_AFFINITY_NONE,
    Pin = MLART_AFFINITY_PIN,
};

enum class Activations : std::uint32_t {
    Precise = MLART_ACTIVATIONS_PRECISE,
    Bf16 = MLART_ACTIVATIONS_BF16,
};

enum class CpuIsa : std::uint32_t {
    Scalar = MLART_CPU_ISA_SCALAR,
    Avx2 = MLART_CPU_ISA_AVX2,
    Avx512 = MLART_CPU_ISA_AVX512,
    Amx = MLART_CPU_ISA_AMX,
    Avx512Bf16 = MLART_CPU_ISA_AVX512_BF16,
};

// "invalid argument", "not found", ... (static storage).
[[nodiscard]] inline const char *status_name(Status s) noexcept {
    return mlart_status_name(static_cast<mlart_status>(s));
}

// ------------------------------------------------------------------ errors

// A failed mlart call. what() is the library's message verbatim (it names
// the argument and the value at fault); status() is its stable category.
class Error : public std::runtime_error {
public:
    Error(Status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}

    [[nodiscard]] Status status() const noexcept { return status_; }
    [[nodiscard]] const char *status_name() const noexcept { return mlart::status_name(status_); }

private:
    Status status_;
};

namespace detail {

struct ErrorFree {
    void operator()(mlart_error *e) const noexcept { mlart_error_free(e); }
};

// The one place a C error becomes an exception: the C error is freed
// whatever happens (even if copying its message throws bad_alloc).
inline void check(mlart_error *raw) {
    if (raw == nullptr) return;
    const std::unique_ptr<mlart_error, ErrorFree> owned(raw);
    const char *msg = mlart_error_message(raw);
    throw Error(static_cast<Status>(mlart_error_code(raw)), msg != nullptr ? msg : "");
}

// Fixed-size C string fields may in theory lack their NUL; never read past.
template <std::size_t N>
std::string from_field(const char (&field)[N]) {
    return std::string(field, std::find(field, field + N, '\0'));
}

struct EngineFree {
    void operator()(mlart_engine *p) const noexcept { mlart_engine_free(p); }
};
struct KvPoolFree {
    void operator()(mlart_kv_pool *p) const noexcept { mlart_kv_pool_free(p); }
};
struct ModelFree {
    void operator()(mlart_model *p) const noexcept { mlart_model_free(p); }
};

}  // namespace detail

// ------------------------------------------------------- typed pointers
// The C ABI passes tensors as (dtype, void*) pairs; these keep the pair
// together. A float pointer converts implicitly (F32); 16-bit data needs
// bf16() / f16() because std::uint16_t alone cannot say which it is.

struct MutData {
    Dtype dtype;
    void *ptr;

    MutData(Dtype d, void *p) noexcept : dtype(d), ptr(p) {}
    MutData(float *p) noexcept : dtype(Dtype::F32), ptr(p) {}  // NOLINT: implicit by design
};

struct ConstData {
    Dtype dtype;
    const void *ptr;

    ConstData(Dtype d, const void *p) noexcept : dtype(d), ptr(p) {}
    ConstData(const float *p) noexcept : dtype(Dtype::F32), ptr(p) {}  // NOLINT: implicit by design
    ConstData(MutData m) noexcept : dtype(m.dtype), ptr(m.ptr) {}      // NOLINT: implicit by design
};

[[nodiscard]] inline ConstData bf16(const std::uint16_t *p) noexcept { return {Dtype::Bf16, p}; }
[[nodiscard]] inline MutData bf16(std::uint16_t *p) noexcept { return {Dtype::Bf16, p}; }
[[nodiscard]] inline ConstData f16(const std::uint16_t *p) noexcept { return {Dtype::F16, p}; }
[[nodiscard]] inline MutData f16(std::uint16_t *p) noexcept { return {Dtype::F16, p}; }

// ----------------------------------------------------- raw-struct helpers
// Every C struct must go through its *_init before use; these return one
// already initialised, to be filled field by field (all fields reachable).

[[nodiscard]] inline mlart_decode_args decode_args() noexcept {
    mlart_decode_args a;
    mlart_decode_args_init(&a);
    return a;
}
[[nodiscard]] inline mlart_kv_pool_decode_args pool_decode_args() noexcept {
    mlart_kv_pool_decode_args a;
    mlart_kv_pool_decode_args_init(&a);
    return a;
}
[[nodiscard]] inline mlart_forward_args forward_args() noexcept {
    mlart_forward_args a;
    mlart_forward_args_init(&a);
    return a;
}

// ---------------------------------------------------------- free functions

// "MAJOR.MINOR.PATCH" of the loaded library.
[[nodiscard]] inline std::string version() { return mlart_version(); }

// Compare with MLART_ABI_VERSION to detect a header/library mismatch.
[[nodiscard]] inline std::uint32_t abi_version() noexcept { return mlart_abi_version(); }

[[nodiscard]] inline std::size_t kv_row_bytes(KvFormat format, int d_qk) {
    std::size_t n = 0;
    detail::check(mlart_kv_row_bytes(static_cast<mlart_kv_format>(format), d_qk, &n));
    return n;
}

[[nodiscard]] inline std::size_t kv_block_bytes(KvFormat format, int d_qk, int block_size) {
    std::size_t n = 0;
    detail::check(
        mlart_kv_block_bytes(static_cast<mlart_kv_format>(format), d_qk, block_size, &n));
    return n;
}

// Rows src [n_tokens, d_qk] into ceil(n_tokens / block_size) blocks at dst.
inline void kv_quantize(KvFormat format, int d_qk, int block_size, int n_tokens, ConstData src,
                        void *dst) {
    detail::check(mlart_kv_quantize(static_cast<mlart_kv_format>(format), d_qk, block_size,
                                    n_tokens, static_cast<mlart_dtype>(src.dtype), src.ptr, dst));
}

// Blocks at src back into rows dst [n_tokens, d_qk].
inline void kv_dequantize(KvFormat format, int d_qk, int block_size, int n_tokens,
                          const void *src, MutData dst) {
    detail::check(mlart_kv_dequantize(static_cast<mlart_kv_format>(format), d_qk, block_size,
                                      n_tokens, src, static_cast<mlart_dtype>(dst.dtype),
                                      dst.ptr));
}

// CUDA devices; 0 without an NVIDIA driver.
[[nodiscard]] inline int device_count() {
    std::int32_t n = 0;
    detail::check(mlart_device_count(&n));
    return n;
}

struct DeviceInfo {
    int device_index = 0;
    std::string name;
    int compute_major = 0;
    int compute_minor = 0;
    int sm_count = 0;
    std::uint64_t total_memory = 0;
    bool has_kernels = false;
    std::string kernels;
};

[[nodiscard]] inline DeviceInfo device_info(int device_index) {
    mlart_device_props p;
    mlart_device_props_init(&p);
    detail::check(mlart_device_info(device_index, &p));
    DeviceInfo d;
    d.device_index = p.device_index;
    d.name = detail::from_field(p.name);
    d.compute_major = p.compute_major;
    d.compute_minor = p.compute_minor;
    d.sm_count = p.sm_count;
    d.total_memory = p.total_memory;
    d.has_kernels = p.has_kernels;
    d.kernels = detail::from_field(p.kernels);
    return d;
}

// ---------------------------------------------------------- decode shapes

// Query and attention shape shared by Engine::decode_paged and
// KvPool::decode conveniences. Defaults are the C defaults.
struct DecodeShape {
    int s_q = 1;                 // query tokens per sequence
    int h_q = 0;                 // query heads (required)
    int d_v = 512;               // value dimension, <= d_qk
    bool causal = false;         // bottom-right-aligned causal mask among the s_q tokens
    float softmax_scale = 0.0f;  // 0: 1/sqrt(d_qk)
};

// A caller-owned paged cache and the sequences in it, for a dense decode.
// A view: it owns nothing, and every pointer must outlive the call.
struct PagedKv {
    KvFormat format = KvFormat::Bf16;
    const void *data = nullptr;  // [num_blocks] blocks of kv_block_bytes(format, d_qk, block_size)
    int d_qk = 576;
    int num_blocks = 0;
    int block_size = 64;
    int batch = 0;                              // sequences
    const std::int32_t *block_table = nullptr;  // [batch, block_table_stride]
    int block_table_stride = 0;
    const std::int32_t *seqlens = nullptr;  // [batch]
};

// The C struct for a dense host-memory decode of `kv`; adjust any field
// (sparse indices, attn_sink, stream, ...) before passing it on.
[[nodiscard]] inline mlart_decode_args dense_decode_args(const PagedKv &kv,
                                                         const DecodeShape &shape, ConstData q,
                                                         MutData out,
                                                         float *lse = nullptr) noexcept {
    mlart_decode_args a = decode_args();
    a.batch = kv.batch;
    a.s_q = shape.s_q;
    a.h_q = shape.h_q;
    a.d_qk = kv.d_qk;
    a.d_v = shape.d_v;
    a.softmax_scale = shape.softmax_scale;
    a.causal = shape.causal;
    a.q_dtype = static_cast<mlart_dtype>(q.dtype);
    a.q = q.ptr;
    a.kv_format = static_cast<mlart_kv_format>(kv.format);
    a.kv = kv.data;
    a.num_blocks = kv.num_blocks;
    a.block_size = kv.block_size;
    a.block_table = kv.block_table;
    a.block_table_stride = kv.block_table_stride;
    a.seqlens = kv.seqlens;
    a.out_dtype = static_cast<mlart_dtype>(out.dtype);
    a.out = out.ptr;
    a.lse = lse;
    return a;
}

// ------------------------------------------------------------------ Engine

struct EngineOptions {
    Backend backend = Backend::Auto;
    int device_index = 0;  // GPU ordinal; 0 for the CPU
    int num_threads = 0;   // CPU workers; 0 = one per core
    ThreadAffinity thread_affinity = ThreadAffinity::Auto;
};

struct EngineInfo {
    Backend backend = Backend::Auto;
    CpuIsa cpu_isa = CpuIsa::Scalar;
    int num_threads = 0;
    int device_index = 0;
    std::string device_name;
    std::string cpu_features;  // space separated
    std::string reason;        // why this backend and kernel variant
    std::string thread_placement;  // CPU: "pinned to CPUs ..." or "not pinned (...)"
};

// Owns an mlart_engine. Pools and models made from it keep it alive, so it
// may be destroyed before them.
class Engine {
public:
    Engine() noexcept = default;  // empty: get() == nullptr
    explicit Engine(mlart_engine *adopt) noexcept : handle_(adopt) {}

    [[nodiscard]] static Engine create(const mlart_engine_options &options) {
        mlart_engine *raw = nullptr;
        detail::check(mlart_engine_create(&options, &raw));
        return Engine(raw);
    }

    [[nodiscard]] static Engine create(const EngineOptions &options = {}) {
        mlart_engine_options o;
        mlart_engine_options_init(&o);
        o.backend = static_cast<mlart_backend>(options.backend);
        o.device_index = options.device_index;
        o.num_threads = options.num_threads;
        o.thread_affinity = static_cast<mlart_thread_affinity>(options.thread_affinity);
        return create(o);
    }

    [[nodiscard]] mlart_engine *get() const noexcept { return handle_.get(); }
    [[nodiscard]] mlart_engine *release() noexcept { return handle_.release(); }
    explicit operator bool() const noexcept { return handle_ != nullptr; }

    [[nodiscard]] EngineInfo info() const {
        mlart_engine_props p;
        mlart_engine_props_init(&p);
        detail::check(mlart_engine_info(get(), &p));
        EngineInfo i;
        i.backend = static_cast<Backend>(p.backend);
        i.cpu_isa = static_cast<CpuIsa>(p.cpu_isa);
        i.num_threads = p.num_threads;
        i.device_index = p.device_index;
        i.device_name = detail::from_field(p.device_name);
        i.cpu_features = detail::from_field(p.cpu_features);
        i.reason = detail::from_field(p.reason);
        i.thread_placement = detail::from_field(p.thread_placement);
        return i;
    }

    // Every field of the C struct; start from mlart::decode_args().
    void decode_paged(const mlart_decode_args &args) const {
        detail::check(mlart_decode_paged(get(), &args));
    }

    // Dense host-memory decode of a caller-owned paged cache.
    void decode_paged(const PagedKv &kv, const DecodeShape &shape, ConstData q, MutData out,
                      float *lse = nullptr) const {
        const mlart_decode_args a = dense_decode_args(kv, shape, q, out, lse);
        decode_paged(a);
    }

    // Engine memory (device memory on a CUDA engine); release with mem_free.
    [[nodiscard]] void *mem_alloc(std::size_t bytes) const {
        void *p = nullptr;
        detail::check(mlart_engine_mem_alloc(get(), bytes, &p));
        return p;
    }
    void mem_free(void *ptr) const { detail::check(mlart_engine_mem_free(get(), ptr)); }
    void mem_copy(void *dst, Memory dst_memory, const void *src, Memory src_memory,
                  std::size_t bytes) const {
        detail::check(mlart_engine_mem_copy(get(), dst, static_cast<mlart_memory>(dst_memory),
                                            src, static_cast<mlart_memory>(src_memory), bytes));
    }

private:
    std::unique_ptr<mlart_engine, detail::EngineFree> handle_;
};

// ------------------------------------------------------------------ KvPool

struct KvPoolOptions {
    KvFormat format = KvFormat::Bf16;
    int d_qk = 576;
    int num_layers = 1;
    int block_size = 64;
    int num_blocks = 0;  // required
    // DeepSeek-V3.2: the model's index_head_dim (Model::info()), whose
    // forward needs a pool keeping its indexer keys (such a pool takes rows
    // only from that forward, not from append); 0 = none.
    int index_head_dim = 0;
};

using KvPoolStats = mlart_kv_pool_stats;

// Owns an mlart_kv_pool: a paged KV cache of sequences with caller-chosen
// ids. Method names follow the C functions (seq_create = mlart_kv_seq_create).
class KvPool {
public:
    KvPool() noexcept = default;  // empty: get() == nullptr
    // `d_qk` is the pool's row width, only needed by the vector overloads.
    KvPool(mlart_kv_pool *adopt, int d_qk) noexcept : handle_(adopt), d_qk_(d_qk) {}

    [[nodiscard]] static KvPool create(const Engine &engine, const mlart_kv_pool_options &options) {
        mlart_kv_pool *raw = nullptr;
        detail::check(mlart_kv_pool_create(engine.get(), &options, &raw));
        return KvPool(raw, options.d_qk);
    }

    [[nodiscard]] static KvPool create(const Engine &engine, const KvPoolOptions &options) {
        mlart_kv_pool_options o;
        mlart_kv_pool_options_init(&o);
        o.kv_format = static_cast<mlart_kv_format>(options.format);
        o.d_qk = options.d_qk;
        o.num_layers = options.num_layers;
        o.block_size = options.block_size;
        o.num_blocks = options.num_blocks;
        o.index_head_dim = options.index_head_dim;
        return create(engine, o);
    }

    [[nodiscard]] mlart_kv_pool *get() const noexcept { return handle_.get(); }
    [[nodiscard]] mlart_kv_pool *release() noexcept { return handle_.release(); }
    explicit operator bool() const noexcept { return handle_ != nullptr; }
    [[nodiscard]] int d_qk() const noexcept { return d_qk_; }

    [[nodiscard]] KvPoolStats stats() const {
        KvPoolStats s;
        mlart_kv_pool_stats_init(&s);
        detail::check(mlart_kv_pool_stats_get(get(), &s));
        return s;
    }

    void seq_create(std::uint64_t seq) { detail::check(mlart_kv_seq_create(get(), seq)); }
    void seq_free(std::uint64_t seq) { detail::check(mlart_kv_seq_free(get(), seq)); }
    void seq_fork(std::uint64_t src, std::uint64_t dst) {
        detail::check(mlart_kv_seq_fork(get(), src, dst));
    }
    void seq_truncate(std::uint64_t seq, std::int64_t length) {
        detail::check(mlart_kv_seq_truncate(get(), seq, length));
    }
    [[nodiscard]] std::int64_t seq_length(std::uint64_t seq, int layer) const {
        std::int64_t n = 0;
        detail::check(mlart_kv_seq_length(get(), seq, layer, &n));
        return n;
    }

    // rows [n_tokens, d_qk] of `dtype` (F32, BF16 or F16).
    void append(std::uint64_t seq, int layer, int n_tokens, Dtype dtype, const void *rows) {
        detail::check(mlart_kv_append(get(), seq, layer, n_tokens,
                                      static_cast<mlart_dtype>(dtype), rows));
    }
    // Typed: a float pointer appends F32, mlart::bf16(p) / f16(p) 16-bit rows.
    void append(std::uint64_t seq, int layer, int n_tokens, ConstData rows) {
        append(seq, layer, n_tokens, rows.dtype, rows.ptr);
    }
    // F32 rows, size() / d_qk() tokens. The C call cannot see the vector's
    // size, so a size that is not whole rows is rejected here, before it.
    void append(std::uint64_t seq, int layer, const std::vector<float> &rows) {
        const std::size_t d = d_qk_ > 0 ? static_cast<std::size_t>(d_qk_) : 0;
        if (d == 0 || rows.size() % d != 0) {
            throw Error(Status::InvalidArgument,
                        "rows.size() = " + std::to_string(rows.size()) +
                            " is not a multiple of d_qk = " + std::to_string(d_qk_));
        }
        append(seq, layer, static_cast<int>(rows.size() / d), Dtype::F32,
               rows.empty() ? nullptr : rows.data());
    }

    // Every field of the C struct; start from mlart::pool_decode_args().
    void decode(const mlart_kv_pool_decode_args &args) const {
        detail::check(mlart_kv_pool_decode(get(), &args));
    }

    // Dense host-memory decode of `layer` for the sequences `seq_ids`.
    void decode(int layer, const std::vector<std::uint64_t> &seq_ids, const DecodeShape &shape,
                ConstData q, MutData out, float *lse = nullptr) const {
        mlart_kv_pool_decode_args a = pool_decode_args();
        a.layer = layer;
        a.batch = static_cast<std::int32_t>(seq_ids.size());
        a.seq_ids = seq_ids.data();
        a.s_q = shape.s_q;
        a.h_q = shape.h_q;
        a.d_v = shape.d_v;
        a.softmax_scale = shape.softmax_scale;
        a.causal = shape.causal;
        a.q_dtype = static_cast<mlart_dtype>(q.dtype);
        a.q = q.ptr;
        a.out_dtype = static_cast<mlart_dtype>(out.dtype);
        a.out = out.ptr;
        a.lse = lse;
        decode(a);
    }

private:
    std::unique_ptr<mlart_kv_pool, detail::KvPoolFree> handle_;
    int d_qk_ = 0;
};

// ------------------------------------------------------------------- Model

struct ModelOptions {
    int first_layer = 0;
    int num_layers = 0;  // 0 = all from first_layer on
    // Empty: keep weights as stored; else convert at load (F32, Bf16, F16).
    std::optional<Dtype> convert_weights;
    // How the projections take their activations: Precise (about 16 bits
    // kept), or Bf16 (rounded, as DeepSeek's reference; faster prefill).
    Activations activations = Activations::Precise;
    // Where a CUDA engine runs the projections: empty (default: as
    // MLART_CUDA_PROJECTIONS says, else the CPU), false (the CPU) or true
    // (the GPU; bf16 and FP8 weights). CPU engines ignore it; the
    // outcome is info().projections_on_gpu.
    std::optional<bool> gpu_projections;
    // The most bytes of up-projected keys (K and V of every head) one forward
    // keeps between the passes of a long prompt (a sequence's new tokens past
    // 512 run in passes); past it, the positions beyond the kept ones are
    // up-projected again in every pass, which costs time, not correctness.
    // 0: the default of 1 GiB; less than one 64-position block's rows keeps
    // none; UINT64_MAX sets no limit. The value in effect is
    // info().kept_keys_bytes.
    std::uint64_t kept_keys_bytes = 0;
    // Called as tensors load with a fraction in [0, 1] and the tensor's name
    // (valid during the call); return false to cancel (Status::Cancelled).
    // An exception it throws cancels the load and is rethrown by load().
    std::function<bool(float fraction, const char *stage)> progress;
};

// The C struct; projections_on_gpu is 1 when the projections run on the GPU,
// kept_keys_bytes is the option in effect (0 resolved to 1 GiB).
using ModelInfo = mlart_model_props;

// Owns an mlart_model: the attention weights of a range of layers.
class Model {
public:
    Model() noexcept = default;  // empty: get() == nullptr
    explicit Model(mlart_model *adopt) noexcept : handle_(adopt) {}

    // Raw options: `options.progress` is called as is (a C function pointer).
    [[nodiscard]] static Model load(const Engine &engine, const std::string &path,
                                    const mlart_model_options &options) {
        mlart_model *raw = nullptr;
        detail::check(mlart_model_load(engine.get(), path.c_str(), &options, &raw));
        return Model(raw);
    }

    [[nodiscard]] static Model load(const Engine &engine, const std::string &path,
                                    const ModelOptions &options = {}) {
        mlart_model_options o;
        mlart_model_options_init(&o);
        o.first_layer = options.first_layer;
        o.num_layers = options.num_layers;
        if (options.convert_weights) {
            o.convert_weights = true;
            o.weight_dtype = static_cast<mlart_dtype>(*options.convert_weights);
        }
        o.activations = static_cast<mlart_activations>(options.activations);
        if (options.gpu_projections) o.gpu_projections = *options.gpu_projections ? 1 : 0;
        o.kept_keys_bytes = options.kept_keys_bytes;
        Progress bridge{&options.progress, nullptr};
        if (options.progress) {
            o.progress = &Progress::call;
            o.progress_user_data = &bridge;
        }
        mlart_model *raw = nullptr;
        mlart_error *err = mlart_model_load(engine.get(), path.c_str(), &o, &raw);
        Model model(raw);  // owns it even if we throw below
        if (bridge.thrown) {
            mlart_error_free(err);  // the CANCELLED this caused; the callback's own is better
            std::rethrow_exception(bridge.thrown);
        }
        detail::check(err);
        return model;
    }

    [[nodiscard]] mlart_model *get() const noexcept { return handle_.get(); }
    [[nodiscard]] mlart_model *release() noexcept { return handle_.release(); }
    explicit operator bool() const noexcept { return handle_ != nullptr; }

    [[nodiscard]] ModelInfo info() const {
        ModelInfo p;
        mlart_model_props_init(&p);
        detail::check(mlart_model_info(get(), &p));
        return p;
    }

    // Every field of the C struct (memory and stream included: device
    // memory on a CUDA engine whose projections run on the GPU); start from
    // mlart::forward_args().
    void forward(KvPool &pool, const mlart_forward_args &args) const {
        detail::check(mlart_model_forward(get(), pool.get(), &args));
    }

    // Attention block of `layer` for several sequences: x and out hold
    // [sum(n_tokens), hidden_size], sequence by sequence. DeepSeek-V3.2
    // models only: `index_out`, if not null, receives [sum(n_tokens),
    // index_topk] positions each new token attended to (ascending, -1 after
    // the last); the library rejects it for a model without an indexer.
    void forward(KvPool &pool, int layer, const std::vector<std::uint64_t> &seq_ids,
                 const std::vector<std::int32_t> &n_tokens, ConstData x, MutData out,
                 std::int32_t *index_out = nullptr) const {
        // The C call reads `batch` entries of both; a shorter one would be
        // read past its end, so the mismatch is caught here.
        if (n_tokens.size() != seq_ids.size()) {
            throw Error(Status::InvalidArgument,
                        "n_tokens.size() = " + std::to_string(n_tokens.size()) +
                            " differs from seq_ids.size() = " + std::to_string(seq_ids.size()));
        }
        mlart_forward_args a = forward_args();
        a.layer = layer;
        a.batch = static_cast<std::int32_t>(seq_ids.size());
        a.seq_ids = seq_ids.data();
        a.n_tokens = n_tokens.data();
        a.x_dtype = static_cast<mlart_dtype>(x.dtype);
        a.x = x.ptr;
        a.out_dtype = static_cast<mlart_dtype>(out.dtype);
        a.out = out.ptr;
        a.index_out = index_out;
        forward(pool, a);
    }

    // One sequence.
    void forward(KvPool &pool, int layer, std::uint64_t seq_id, int n_tokens, ConstData x,
                 MutData out, std::int32_t *index_out = nullptr) const {
        forward(pool, layer, std::vector<std::uint64_t>{seq_id},
                std::vector<std::int32_t>{n_tokens}, x, out, index_out);
    }

    // With the selections in a vector of at least sum(n_tokens) *
    // index_topk entries. The C call cannot see its size, so a shorter one
    // is rejected here, before it.
    void forward(KvPool &pool, int layer, const std::vector<std::uint64_t> &seq_ids,
                 const std::vector<std::int32_t> &n_tokens, ConstData x, MutData out,
                 std::vector<std::int32_t> &index_out) const {
        std::int64_t total = 0;
        for (std::size_t i = 0; i < std::min(n_tokens.size(), seq_ids.size()); ++i)
            total += std::max<std::int32_t>(n_tokens[i], 0);
        const std::int64_t topk = info().index_topk;
        if (static_cast<std::int64_t>(index_out.size()) < total * topk) {
            throw Error(Status::InvalidArgument,
                        "index_out.size() = " + std::to_string(index_out.size()) +
                            " is less than sum(n_tokens) * index_topk = " +
                            std::to_string(total) + " * " + std::to_string(topk) + " = " +
                            std::to_string(total * topk));
        }
        forward(pool, layer, seq_ids, n_tokens, x, out,
                index_out.empty() ? nullptr : index_out.data());
    }

    // One sequence, with the selections in a vector (checked as above).
    void forward(KvPool &pool, int layer, std::uint64_t seq_id, int n_tokens, ConstData x,
                 MutData out, std::vector<std::int32_t> &index_out) const {
        forward(pool, layer, std::vector<std::uint64_t>{seq_id},
                std::vector<std::int32_t>{n_tokens}, x, out, index_out);
    }

private:
    // Bridges mlart_progress_fn to the std::function. No exception may
    // unwind through the library's frames, so one is parked here and the
    // load cancelled; load() rethrows it.
    struct Progress {
        const std::function<bool(float, const char *)> *fn;
        std::exception_ptr thrown;

        static bool call(float fraction, const char *stage, void *user_data) noexcept {
            auto *self = static_cast<Progress *>(user_data);
            try {
                return (*self->fn)(fraction, stage);
            } catch (...) {
                self->thrown = std::current_exception();
                return false;
            }
        }
    };

    std::unique_ptr<mlart_model, detail::ModelFree> handle_;
};

}  // namespace mlart

#endif  // MLART_HPP
