// C++17 consumer of the mlart C ABI: RAII handles, F32 and BF16 paged decode
// against a double-precision reference, FP8_V32 / FP8_MODEL1 sparse decode
// (extra cache, topk_length, attention sink) against the dequantized rows,
// error handling and a BF16 KV pool.
//
// Linked twice by CMakeLists.txt (libmlart.so and libmlart.a). Exits non-zero
// if any check fails, after printing every failed check.
#include "mlart.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

// ------------------------------------------------------------------ checks

int g_checks = 0;
int g_failures = 0;

void check(bool ok, const char *cond, const std::string &detail, const char *file, int line) {
    ++g_checks;
    if (!ok) {
        ++g_failures;
        std::cerr << file << ':' << line << ": check failed: " << cond << ": " << detail << '\n';
    }
}

// CHECK(cond, a << b << ...): the second argument is an ostream expression.
#define CHECK(cond, detail)                                                  \
    do {                                                                     \
        const bool check_ok_ = static_cast<bool>(cond);                      \
        std::ostringstream check_os_;                                        \
        if (!check_ok_) check_os_ << detail;                                 \
        check(check_ok_, #cond, check_os_.str(), __FILE__, __LINE__);        \
    } while (0)

// ---------------------------------------------------------- RAII handles

struct Free {
    void operator()(mlart_engine *e) const noexcept { mlart_engine_free(e); }
    void operator()(mlart_kv_pool *p) const noexcept { mlart_kv_pool_free(p); }
    void operator()(mlart_error *e) const noexcept { mlart_error_free(e); }
};
using Engine = std::unique_ptr<mlart_engine, Free>;
using Pool = std::unique_ptr<mlart_kv_pool, Free>;
using Error = std::unique_ptr<mlart_error, Free>;

std::string describe(const Error &e) {
    if (!e) return "ok";
    return std::string("[") + mlart_status_name(mlart_error_code(e.get())) + "] " +
           mlart_error_message(e.get());
}

// Takes ownership of a call's result and checks it is success.
bool ok_(mlart_error *raw, const char *call, const char *file, int line) {
    Error e(raw);
    check(!e, call, describe(e), file, line);
    return !e;
}
#define OK(call) ok_((call), #call, __FILE__, __LINE__)

// Takes ownership of a call's result and checks its status and message.
void expect_error_(mlart_error *raw, mlart_status status, const char *needle, const char *call,
                   const char *file, int line) {
    Error e(raw);
    const std::string msg = e ? mlart_error_message(e.get()) : "";
    const bool ok = e && mlart_error_code(e.get()) == status && !msg.empty() &&
                    (needle == nullptr || msg.find(needle) != std::string::npos);
    std::ostringstream d;
    d << "expected [" << mlart_status_name(status) << "] containing \"" << (needle ? needle : "")
      << "\", got " << describe(e);
    check(ok, call, d.str(), file, line);
}
#define EXPECT_ERROR(call, status, needle) \
    expect_error_((call), (status), (needle), #call, __FILE__, __LINE__)

// ------------------------------------------------------------ numerics

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::mt19937_64 g_rng(20240607);

float rnd() { return std::uniform_real_distribution<float>(-1.0f, 1.0f)(g_rng); }

// bfloat16 with round-to-nearest-even, as every converter does.
std::uint16_t to_bf16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (std::isnan(f)) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>(u >> 16);
}

float from_bf16(std::uint16_t h) {
    const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

float round_bf16(float f) { return from_bf16(to_bf16(f)); }

std::size_t dtype_size(mlart_dtype t) { return t == MLART_DTYPE_F32 ? 4 : 2; }

// Random values exactly representable in `t` (F32 or BF16).
std::vector<float> random_values(std::size_t n, mlart_dtype t) {
    std::vector<float> v(n);
    for (auto &x : v) x = t == MLART_DTYPE_BF16 ? round_bf16(rnd()) : rnd();
    return v;
}

// Host bytes of `values` in element type `t` (F32 or BF16).
std::vector<std::uint8_t> encode(const std::vector<float> &values, mlart_dtype t) {
    std::vector<std::uint8_t> bytes(values.size() * dtype_size(t));
    for (std::size_t i = 0; i < values.size(); ++i) {
        if (t == MLART_DTYPE_BF16) {
            const std::uint16_t h = to_bf16(values[i]);
            std::memcpy(&bytes[i * 2], &h, 2);
        } else {
            std::memcpy(&bytes[i * 4], &values[i], 4);
        }
    }
    return bytes;
}

std::vector<float> decode_values(const std::vector<std::uint8_t> &bytes, mlart_dtype t) {
    std::vector<float> v(bytes.size() / dtype_size(t));
    for (std::size_t i = 0; i < v.size(); ++i) {
        if (t == MLART_DTYPE_BF16) {
            std::uint16_t h;
            std::memcpy(&h, &bytes[i * 2], 2);
            v[i] = from_bf16(h);
        } else {
            std::memcpy(&v[i], &bytes[i * 4], 4);
        }
    }
    return v;
}

// Output buffer of `n` elements of `t`, every element NaN.
std::vector<std::uint8_t> nan_buffer(std::size_t n, mlart_dtype t) {
    return encode(std::vector<float>(n, kNaN), t);
}

struct Shape {
    int s_q, h_q, d_qk, d_v;
    bool causal;
    double scale;  // resolved
};

struct Reference {
    std::vector<double> out;  // [batch, s_q, h_q, d_v]
    std::vector<double> lse;  // [batch, h_q, s_q]
};

// Appends one sequence's reference: q [s_q, h_q, d_qk] against its logical
// rows keys [seqlen, d_qk] (V = the first d_v elements of each row).
void reference(const float *q, const std::vector<float> &keys, int seqlen, const Shape &s,
               Reference &r) {
    const std::size_t o0 = r.out.size(), l0 = r.lse.size();
    r.out.resize(o0 + static_cast<std::size_t>(s.s_q * s.h_q * s.d_v), 0.0);
    r.lse.resize(l0 + static_cast<std::size_t>(s.h_q * s.s_q), kInf);
    std::vector<double> scores(static_cast<std::size_t>(std::max(seqlen, 1)));
    for (int i = 0; i < s.s_q; ++i) {
        const int n = std::max(0, s.causal ? seqlen - (s.s_q - 1 - i) : seqlen);
        for (int h = 0; h < s.h_q; ++h) {
            if (n == 0) continue;  // out = 0, lse = +inf
            const float *qr = q + static_cast<std::size_t>(i * s.h_q + h) * s.d_qk;
            double m = -kInf;
            for (int t = 0; t < n; ++t) {
                double acc = 0.0;
                for (int c = 0; c < s.d_qk; ++c)
                    acc += double(qr[c]) * double(keys[static_cast<std::size_t>(t) * s.d_qk + c]);
                scores[t] = acc * s.scale;
                m = std::max(m, scores[t]);
            }
            double sum = 0.0;
            double *o = &r.out[o0 + static_cast<std::size_t>(i * s.h_q + h) * s.d_v];
            for (int t = 0; t < n; ++t) {
                const double p = std::exp(scores[t] - m);
                sum += p;
                for (int c = 0; c < s.d_v; ++c)
                    o[c] += p * double(keys[static_cast<std::size_t>(t) * s.d_qk + c]);
            }
            for (int c = 0; c < s.d_v; ++c) o[c] /= sum;
            r.lse[l0 + static_cast<std::size_t>(h * s.s_q + i)] = m + std::log(sum);
        }
    }
}

// Largest |got - want|; NaN or a mismatched infinity counts as +inf.
double max_error(const std::vector<float> &got, const std::vector<double> &want) {
    if (got.size() != want.size()) return kInf;
    double worst = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i) {
        double e;
        if (std::isinf(want[i])) {
            e = std::isinf(got[i]) && (got[i] > 0) == (want[i] > 0) ? 0.0 : kInf;
        } else {
            e = std::fabs(double(got[i]) - want[i]);
            if (std::isnan(e)) e = kInf;
        }
        worst = std::max(worst, e);
    }
    return worst;
}

const char *dtype_name(mlart_dtype t) { return t == MLART_DTYPE_BF16 ? "bf16" : "f32"; }

// ------------------------------------------------------------- the tests

void test_versions() {
    const std::string want = std::to_string(MLART_VERSION_MAJOR) + "." +
                             std::to_string(MLART_VERSION_MINOR) + "." +
                             std::to_string(MLART_VERSION_PATCH);
    const char *v = mlart_version();
    CHECK(v != nullptr && want == v, "mlart_version() = " << (v ? v : "(null)") << ", header says "
                                                          << want);
    CHECK(mlart_abi_version() == MLART_ABI_VERSION,
          "mlart_abi_version() = " << mlart_abi_version() << ", header says " << MLART_ABI_VERSION);
    CHECK(mlart_error_code(nullptr) == MLART_STATUS_OK, "mlart_error_code(nullptr)");
    CHECK(std::string(mlart_error_message(nullptr)) == "ok", "mlart_error_message(nullptr)");
    CHECK(std::string(mlart_status_name(MLART_STATUS_INVALID_ARGUMENT)) == "invalid argument",
          mlart_status_name(MLART_STATUS_INVALID_ARGUMENT));
    mlart_error_free(nullptr);
    mlart_engine_free(nullptr);
    mlart_kv_pool_free(nullptr);
}

Engine create_engine() {
    mlart_engine_options opts;
    mlart_engine_options_init(&opts);
    opts.backend = MLART_BACKEND_CPU;
    opts.num_threads = 2;
    mlart_engine *raw = nullptr;
    if (!OK(mlart_engine_create(&opts, &raw)) || raw == nullptr) return nullptr;
    Engine engine(raw);

    mlart_engine_props props;
    mlart_engine_props_init(&props);
    if (OK(mlart_engine_info(engine.get(), &props))) {
        CHECK(props.backend == MLART_BACKEND_CPU, props.backend);
        CHECK(props.num_threads == 2, props.num_threads);
        CHECK(props.device_name[sizeof props.device_name - 1] == '\0' &&
                  props.reason[sizeof props.reason - 1] == '\0',
              "unterminated strings");
        std::cout << "engine: isa " << props.cpu_isa << ", " << props.num_threads
                  << " threads, device \"" << props.device_name << "\"\n"
                  << "engine: reason \"" << props.reason << "\"\n";
    }
    mlart_engine_props wrong = props;
    wrong.struct_size = sizeof wrong - 1;
    EXPECT_ERROR(mlart_engine_info(engine.get(), &wrong), MLART_STATUS_INVALID_ARGUMENT,
                 "struct_size");
    return engine;
}

// A caller-owned paged cache: `batch` sequences, shuffled block ids, NaN in
// every slot no sequence uses.
struct PagedCache {
    static constexpr int kBlockSize = 16;
    static constexpr int kStride = 12;
    static constexpr int kNumBlocks = 24;
    int d_qk;
    mlart_dtype dtype;
    std::vector<std::int32_t> seqlens;
    std::vector<std::int32_t> table;
    std::vector<std::vector<float>> keys;  // logical rows per sequence
    std::vector<std::uint8_t> kv;          // [kNumBlocks, kBlockSize, d_qk] of dtype

    PagedCache(std::vector<std::int32_t> lens, int d_qk_, mlart_dtype t)
        : d_qk(d_qk_), dtype(t), seqlens(std::move(lens)) {
        std::vector<std::int32_t> perm(kNumBlocks);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), g_rng);
        std::vector<float> cache(static_cast<std::size_t>(kNumBlocks) * kBlockSize * d_qk, kNaN);
        table.assign(seqlens.size() * kStride, -1);
        std::size_t next = 0;
        for (std::size_t b = 0; b < seqlens.size(); ++b) {
            const int used = (seqlens[b] + kBlockSize - 1) / kBlockSize;
            for (int j = 0; j < used; ++j) table[b * kStride + j] = perm.at(next++);
            // Entries past the length are never read.
            for (int j = used; j < kStride; ++j) table[b * kStride + j] = 1 << 30;
            keys.push_back(random_values(static_cast<std::size_t>(seqlens[b]) * d_qk, t));
            for (int tok = 0; tok < seqlens[b]; ++tok) {
                const int block = table[b * kStride + tok / kBlockSize];
                std::copy_n(&keys[b][static_cast<std::size_t>(tok) * d_qk], d_qk,
                            &cache[(static_cast<std::size_t>(block) * kBlockSize +
                                    tok % kBlockSize) * d_qk]);
            }
        }
        kv = encode(cache, t);
    }
};

struct PagedCase {
    mlart_dtype q_dtype;
    mlart_dtype kv_dtype;  // MLART_DTYPE_F32 or _BF16; the kv format follows
    mlart_dtype out_dtype;
    bool causal;
    float scale;
    double tol_out;
    double tol_lse;
};

void test_paged(mlart_engine *engine, const PagedCase &c) {
    const std::vector<std::int32_t> lens = {0, 5, 37, 150};
    const int batch = static_cast<int>(lens.size());
    const Shape s{2, 4, 64, 48, c.causal,
                  c.scale == 0.0f ? 1.0 / std::sqrt(64.0) : double(c.scale)};
    PagedCache cache(lens, s.d_qk, c.kv_dtype);
    const std::size_t q_per = static_cast<std::size_t>(s.s_q * s.h_q * s.d_qk);
    const std::vector<float> q = random_values(q_per * batch, c.q_dtype);
    const std::vector<std::uint8_t> q_bytes = encode(q, c.q_dtype);
    std::vector<std::uint8_t> out =
        nan_buffer(static_cast<std::size_t>(batch * s.s_q * s.h_q * s.d_v), c.out_dtype);
    std::vector<float> lse(static_cast<std::size_t>(batch * s.h_q * s.s_q), kNaN);

    Reference ref;
    for (int b = 0; b < batch; ++b) reference(&q[q_per * b], cache.keys[b], lens[b], s, ref);

    mlart_decode_args a;
    mlart_decode_args_init(&a);
    a.batch = batch;
    a.s_q = s.s_q;
    a.h_q = s.h_q;
    a.d_qk = s.d_qk;
    a.d_v = s.d_v;
    a.softmax_scale = c.scale;
    a.causal = c.causal;
    a.q_dtype = c.q_dtype;
    a.q = q_bytes.data();
    a.kv_format = c.kv_dtype == MLART_DTYPE_BF16 ? MLART_KV_FORMAT_BF16 : MLART_KV_FORMAT_F32;
    a.kv = cache.kv.data();
    a.num_blocks = PagedCache::kNumBlocks;
    a.block_size = PagedCache::kBlockSize;
    a.block_table = cache.table.data();
    a.block_table_stride = PagedCache::kStride;
    a.seqlens = cache.seqlens.data();
    a.out_dtype = c.out_dtype;
    a.out = out.data();
    a.lse = lse.data();

    std::ostringstream name;
    name << "paged q " << dtype_name(c.q_dtype) << " kv " << dtype_name(c.kv_dtype) << " out "
         << dtype_name(c.out_dtype) << " causal=" << c.causal << " scale=" << c.scale;
    if (OK(mlart_decode_paged(engine, &a))) {
        const double e_out = max_error(decode_values(out, c.out_dtype), ref.out);
        const double e_lse = max_error(lse, ref.lse);
        std::cout << name.str() << ": max |out err| " << e_out << ", max |lse err| " << e_lse
                  << '\n';
        CHECK(e_out < c.tol_out, name.str() << ": out error " << e_out << " >= " << c.tol_out);
        CHECK(e_lse < c.tol_lse, name.str() << ": lse error " << e_lse << " >= " << c.tol_lse);
    }

    // Errors leave out and lse untouched.
    out = nan_buffer(out.size() / dtype_size(c.out_dtype), c.out_dtype);
    std::fill(lse.begin(), lse.end(), kNaN);
    const std::vector<std::uint8_t> poisoned_out = out;
    EXPECT_ERROR(mlart_decode_paged(nullptr, &a), MLART_STATUS_NULL_POINTER, "engine");
    mlart_decode_args wrong = a;
    wrong.struct_size = sizeof(mlart_decode_args) + 16;
    EXPECT_ERROR(mlart_decode_paged(engine, &wrong), MLART_STATUS_INVALID_ARGUMENT, "struct_size");
    // Sequence 3 (150 tokens) uses table entries 0..9; poison entry 9.
    const std::int32_t saved = cache.table[3 * PagedCache::kStride + 9];
    cache.table[3 * PagedCache::kStride + 9] = PagedCache::kNumBlocks + 5;
    {
        Error e(mlart_decode_paged(engine, &a));
        const std::string msg = e ? mlart_error_message(e.get()) : "";
        CHECK(mlart_error_code(e.get()) == MLART_STATUS_INVALID_ARGUMENT, describe(e));
        CHECK(msg.find("block_table[") != std::string::npos, msg);
        CHECK(msg.find("block_table[3][9]") != std::string::npos, msg);
    }
    cache.table[3 * PagedCache::kStride + 9] = saved;
    CHECK(out == poisoned_out, "a failed decode wrote out");
    CHECK(std::all_of(lse.begin(), lse.end(), [](float x) { return std::isnan(x); }),
          "a failed decode wrote lse");
}

// ------------------------------------------------------------ FP8 sparse

// An FP8 cache the test owns: `tokens` F32 rows quantized with
// mlart_kv_quantize, their blocks scattered in reverse order after one
// poisoned block (0xFF bytes: NaN codes and scales) that is never indexed.
struct Fp8Cache {
    int block_size = 0;
    int num_blocks = 0;
    std::vector<std::uint8_t> kv;
    std::vector<float> deq;           // [tokens, d_qk], mlart_kv_dequantize of the blocks
    std::vector<std::int32_t> where;  // physical position of each logical token
    bool ok = false;

    Fp8Cache(mlart_kv_format format, int d_qk, int bs, int tokens) : block_size(bs) {
        std::size_t block = 0;
        if (!OK(mlart_kv_block_bytes(format, d_qk, bs, &block))) return;
        const bool v32 = format == MLART_KV_FORMAT_FP8_V32;
        const std::size_t expect =
            v32 ? std::size_t(656) * bs : (std::size_t(584) * bs + 575) / 576 * 576;
        CHECK(block == expect, "block bytes " << block << " != " << expect);
        // Tiles of different amplitudes: different tile scales in one row.
        const int nope = v32 ? 512 : 448, tile = v32 ? 128 : 64;
        const float amps[] = {0.02f, 0.7f, 1.0f, 2.5f, 0.0f};
        std::vector<float> src = random_values(std::size_t(tokens) * d_qk, MLART_DTYPE_F32);
        for (int t = 0; t < tokens; ++t)
            for (int c = 0; c < nope; ++c)
                src[std::size_t(t) * d_qk + c] *= amps[(t + c / tile) % 5];
        const int used = (tokens + bs - 1) / bs;
        std::vector<std::uint8_t> blocks(block * used, 0xA5);
        deq.assign(src.size(), kNaN);
        if (!OK(mlart_kv_quantize(format, d_qk, bs, tokens, MLART_DTYPE_F32, src.data(),
                                  blocks.data())) ||
            !OK(mlart_kv_dequantize(format, d_qk, bs, tokens, blocks.data(), MLART_DTYPE_F32,
                                    deq.data())))
            return;
        num_blocks = used + 1;
        kv.assign(block * num_blocks, 0xFF);
        for (int j = 0; j < used; ++j)  // logical block j -> slot used - j (slot 0 poisoned)
            std::copy_n(&blocks[block * j], block, &kv[block * (used - j)]);
        for (int t = 0; t < tokens; ++t) where.push_back((used - t / bs) * bs + t % bs);
        ok = true;
    }
};

// Random logical lists [rows, topk] over `tokens`: -1 entries and duplicates.
std::vector<std::int32_t> random_lists(int rows, int topk, int tokens) {
    std::vector<std::int32_t> v;
    for (int r = 0; r < rows; ++r) {
        const std::size_t start = v.size();
        for (int k = 0; k < topk; ++k) {
            const int pick = static_cast<int>(g_rng() % 6);
            if (pick == 0)
                v.push_back(-1);
            else if (pick == 1 && k > 0)
                v.push_back(v[start + g_rng() % static_cast<unsigned>(k)]);
            else
                v.push_back(static_cast<std::int32_t>(g_rng() % static_cast<unsigned>(tokens)));
        }
    }
    return v;
}

struct Fp8Case {
    mlart_kv_format format;
    int d_qk, d_v, block_size, tokens;
    int extra_block_size, extra_tokens;  // extra_tokens 0: no extra cache
    bool lengths_and_sink;
};

void test_fp8_sparse(mlart_engine *engine, const Fp8Case &c) {
    constexpr int kBatch = 2, kSq = 2, kHeads = 4, kTopk = 16, kExtraTopk = 6;
    const bool extra = c.extra_tokens > 0;
    std::ostringstream name;
    name << "fp8 sparse format " << c.format << " bs " << c.block_size << " extra "
         << c.extra_tokens << (c.lengths_and_sink ? " lengths+sink" : "");
    Fp8Cache main_cache(c.format, c.d_qk, c.block_size, c.tokens);
    Fp8Cache extra_cache(c.format, c.d_qk, extra ? c.extra_block_size : 1,
                         extra ? c.extra_tokens : 1);
    if (!main_cache.ok || !extra_cache.ok) return;

    const int rows = kBatch * kSq;
    std::vector<std::int32_t> logical = random_lists(rows, kTopk, c.tokens);
    std::fill_n(&logical[1 * kTopk], kTopk, -1);  // query (0, 1): no main key
    logical[2 * kTopk + 1] = logical[2 * kTopk];  // a duplicate for certain
    std::vector<std::int32_t> xlogical = random_lists(rows, kExtraTopk, extra ? c.extra_tokens : 1);
    if (!extra) std::fill(xlogical.begin(), xlogical.end(), -1);
    std::fill_n(&xlogical[1 * kExtraTopk], kExtraTopk, -1);  // ... nor extra key
    const std::int32_t lengths[kBatch] = {kTopk, 5};
    const std::int32_t xlengths[kBatch] = {2, kExtraTopk};
    const float sink[kHeads] = {0.25f, std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity(), -3.0f};

    auto physical = [](const std::vector<std::int32_t> &l, const Fp8Cache &cache, int topk,
                       const std::int32_t *len) {
        std::vector<std::int32_t> p(l.size());
        for (std::size_t i = 0; i < l.size(); ++i) {
            const int b = static_cast<int>(i) / (kSq * topk), k = static_cast<int>(i) % topk;
            if (len != nullptr && k >= len[b])
                p[i] = std::numeric_limits<std::int32_t>::max();  // not read
            else
                p[i] = l[i] < 0 ? -1 : cache.where[l[i]];
        }
        return p;
    };
    const std::int32_t *len = c.lengths_and_sink ? lengths : nullptr;
    const std::int32_t *xlen = c.lengths_and_sink ? xlengths : nullptr;
    const std::vector<std::int32_t> indices = physical(logical, main_cache, kTopk, len);
    const std::vector<std::int32_t> xindices = physical(xlogical, extra_cache, kExtraTopk, xlen);

    const std::vector<float> q =
        random_values(static_cast<std::size_t>(rows) * kHeads * c.d_qk, MLART_DTYPE_F32);
    std::vector<float> out(static_cast<std::size_t>(rows) * kHeads * c.d_v, kNaN);
    std::vector<float> lse(static_cast<std::size_t>(kBatch) * kHeads * kSq, kNaN);

    // Reference from the dequantized rows, one softmax over both caches.
    std::vector<double> ref_out(out.size(), 0.0), ref_lse(lse.size(), kInf);
    const double scale = 1.0 / std::sqrt(double(c.d_qk));
    for (int g = 0; g < rows; ++g) {
        const int b = g / kSq, i = g % kSq;
        std::vector<const float *> keys;
        for (int k = 0; k < (len ? len[b] : kTopk); ++k)
            if (logical[g * kTopk + k] >= 0)
                keys.push_back(&main_cache.deq[std::size_t(logical[g * kTopk + k]) * c.d_qk]);
        for (int k = 0; k < (xlen ? xlen[b] : kExtraTopk); ++k)
            if (xlogical[g * kExtraTopk + k] >= 0)
                keys.push_back(
                    &extra_cache.deq[std::size_t(xlogical[g * kExtraTopk + k]) * c.d_qk]);
        if (keys.empty()) continue;  // out = 0, lse = +inf
        for (int h = 0; h < kHeads; ++h) {
            const float *qr = &q[(std::size_t(g) * kHeads + h) * c.d_qk];
            std::vector<double> s;
            for (const float *k : keys) {
                double acc = 0.0;
                for (int e = 0; e < c.d_qk; ++e) acc += double(qr[e]) * double(k[e]);
                s.push_back(acc * scale);
            }
            const double m = *std::max_element(s.begin(), s.end());
            double sum = 0.0;
            for (double x : s) sum += std::exp(x - m);
            const double l = m + std::log(sum);
            const double factor =
                c.lengths_and_sink ? 1.0 / (1.0 + std::exp(double(sink[h]) - l)) : 1.0;
            double *o = &ref_out[(std::size_t(g) * kHeads + h) * c.d_v];
            for (std::size_t t = 0; t < keys.size(); ++t) {
                const double p = std::exp(s[t] - m) / sum * factor;
                for (int e = 0; e < c.d_v; ++e) o[e] += p * double(keys[t][e]);
            }
            ref_lse[(std::size_t(b) * kHeads + h) * kSq + i] = l;
        }
    }

    mlart_decode_args a;
    mlart_decode_args_init(&a);
    a.batch = kBatch;
    a.s_q = kSq;
    a.h_q = kHeads;
    a.d_qk = c.d_qk;
    a.d_v = c.d_v;
    a.q_dtype = MLART_DTYPE_F32;
    a.q = q.data();
    a.kv_format = c.format;
    a.kv = main_cache.kv.data();
    a.num_blocks = main_cache.num_blocks;
    a.block_size = c.block_size;
    a.indices = indices.data();
    a.topk = kTopk;
    a.topk_length = len;
    if (extra) {
        a.extra_kv = extra_cache.kv.data();
        a.extra_num_blocks = extra_cache.num_blocks;
        a.extra_block_size = c.extra_block_size;
        a.extra_indices = xindices.data();
        a.extra_topk = kExtraTopk;
        a.extra_topk_length = xlen;
    }
    if (c.lengths_and_sink) a.attn_sink = sink;
    a.out_dtype = MLART_DTYPE_F32;
    a.out = out.data();
    a.lse = lse.data();
    if (!OK(mlart_decode_paged(engine, &a))) return;

    // Errors relative to the largest magnitude (at least 1).
    double mag = 1.0, lmag = 1.0;
    for (double x : ref_out) mag = std::max(mag, std::fabs(x));
    for (double x : ref_lse)
        if (!std::isinf(x)) lmag = std::max(lmag, std::fabs(x));
    const double e_out = max_error(out, ref_out) / mag, e_lse = max_error(lse, ref_lse) / lmag;
    std::cout << name.str() << ": max rel out err " << e_out << ", max rel lse err " << e_lse
              << '\n';
    CHECK(e_out <= 1e-5, name.str() << ": out error " << e_out);
    CHECK(e_lse <= 1e-5, name.str() << ": lse error " << e_lse);
    for (int h = 0; h < kHeads; ++h)
        CHECK(std::isinf(lse[h * kSq + 1]) && lse[h * kSq + 1] > 0,
              name.str() << ": query without keys has lse " << lse[h * kSq + 1]);

    // An index into the poisoned block, or past either cache, is rejected.
    std::vector<float> poisoned = out;
    std::fill(poisoned.begin(), poisoned.end(), kNaN);
    out = poisoned;
    std::vector<std::int32_t> bad = indices;
    bad[0] = main_cache.num_blocks * c.block_size;
    mlart_decode_args wrong = a;
    wrong.indices = bad.data();
    EXPECT_ERROR(mlart_decode_paged(engine, &wrong), MLART_STATUS_INVALID_ARGUMENT,
                 "indices[0][0][0]");
    if (extra) {
        std::vector<std::int32_t> xbad = xindices;
        xbad[1] = -5;
        wrong = a;
        wrong.extra_indices = xbad.data();
        EXPECT_ERROR(mlart_decode_paged(engine, &wrong), MLART_STATUS_INVALID_ARGUMENT,
                     "extra_indices[0][0][1] = -5");
    }
    wrong = a;
    wrong.causal = true;
    EXPECT_ERROR(mlart_decode_paged(engine, &wrong), MLART_STATUS_INVALID_ARGUMENT, "causal");
    CHECK(std::all_of(out.begin(), out.end(), [](float x) { return std::isnan(x); }),
          name.str() << ": a failed decode wrote out");
}

// What the test believes a pool sequence holds (values exactly bf16).
struct Mirror {
    std::uint64_t id;
    std::vector<std::vector<float>> rows;  // per layer, [len, d_qk]
};

constexpr int kPoolDqk = 64;
constexpr int kPoolBlock = 8;
constexpr int kPoolBlocks = 10;
constexpr int kPoolLayers = 3;

// Appends n random rows to `layer` of `m`, passed as `t` (F32 rows are
// pre-rounded to bf16 so the pool's conversion is exact).
mlart_error *append(mlart_kv_pool *pool, Mirror &m, int layer, int n, mlart_dtype t) {
    const std::vector<float> rows =
        random_values(static_cast<std::size_t>(n) * kPoolDqk, MLART_DTYPE_BF16);
    const std::vector<std::uint8_t> bytes = encode(rows, t);
    mlart_error *e = mlart_kv_append(pool, m.id, layer, n, t, bytes.data());
    if (e == nullptr) m.rows[layer].insert(m.rows[layer].end(), rows.begin(), rows.end());
    return e;
}

void check_length(const mlart_kv_pool *pool, const Mirror &m) {
    for (int l = 0; l < kPoolLayers; ++l) {
        std::int64_t len = -1;
        const auto want = static_cast<std::int64_t>(m.rows[l].size() / kPoolDqk);
        if (OK(mlart_kv_seq_length(pool, m.id, l, &len)))
            CHECK(len == want, "seq " << m.id << " layer " << l << ": " << len << " != " << want);
    }
}

mlart_kv_pool_stats stats(const mlart_kv_pool *pool) {
    mlart_kv_pool_stats st;
    mlart_kv_pool_stats_init(&st);
    OK(mlart_kv_pool_stats_get(pool, &st));
    return st;
}

void check_pool_decode(mlart_kv_pool *pool, int layer, const std::vector<const Mirror *> &seqs,
                       bool causal, const std::string &what) {
    const Shape s{3, 2, kPoolDqk, 32, causal, 1.0 / std::sqrt(double(kPoolDqk))};
    const std::size_t batch = seqs.size();
    const std::size_t q_per = static_cast<std::size_t>(s.s_q * s.h_q * s.d_qk);
    std::vector<std::uint64_t> ids;
    for (const Mirror *m : seqs) ids.push_back(m->id);
    const std::vector<float> q = random_values(q_per * batch, MLART_DTYPE_BF16);
    const std::vector<std::uint8_t> q_bytes = encode(q, MLART_DTYPE_BF16);
    std::vector<float> out(batch * s.s_q * s.h_q * s.d_v, kNaN);
    std::vector<float> lse(batch * s.h_q * s.s_q, kNaN);

    mlart_kv_pool_decode_args a;
    mlart_kv_pool_decode_args_init(&a);
    a.layer = layer;
    a.batch = static_cast<std::int32_t>(batch);
    a.seq_ids = ids.data();
    a.s_q = s.s_q;
    a.h_q = s.h_q;
    a.d_v = s.d_v;
    a.causal = causal;
    a.q_dtype = MLART_DTYPE_BF16;
    a.q = q_bytes.data();
    a.out_dtype = MLART_DTYPE_F32;
    a.out = out.data();
    a.lse = lse.data();
    if (!OK(mlart_kv_pool_decode(pool, &a))) return;
    Reference ref;
    for (std::size_t b = 0; b < batch; ++b) {
        const Mirror &m = *seqs[b];
        reference(&q[q_per * b], m.rows[layer], static_cast<int>(m.rows[layer].size() / kPoolDqk),
                  s, ref);
    }
    const double e_out = max_error(out, ref.out), e_lse = max_error(lse, ref.lse);
    std::cout << "pool bf16 (" << what << "): max |out err| " << e_out << ", max |lse err| "
              << e_lse << '\n';
    CHECK(e_out < 2e-2 && e_lse < 1e-3, what << ": out err " << e_out << ", lse err " << e_lse);
}

void test_pool(const Engine &engine) {
    mlart_kv_pool_options opts;
    mlart_kv_pool_options_init(&opts);
    opts.kv_format = MLART_KV_FORMAT_BF16;
    opts.d_qk = kPoolDqk;
    opts.num_layers = kPoolLayers;
    opts.block_size = kPoolBlock;
    opts.num_blocks = kPoolBlocks;
    mlart_kv_pool *raw = nullptr;
    if (!OK(mlart_kv_pool_create(engine.get(), &opts, &raw)) || raw == nullptr) return;
    const Pool pool(raw);

    Mirror a{100, std::vector<std::vector<float>>(kPoolLayers)};
    OK(mlart_kv_seq_create(pool.get(), a.id));
    OK(append(pool.get(), a, 0, 11, MLART_DTYPE_F32));
    OK(append(pool.get(), a, 0, 2, MLART_DTYPE_BF16));  // 13 tokens: blocks 0 and 1
    OK(append(pool.get(), a, 1, 13, MLART_DTYPE_BF16));
    OK(append(pool.get(), a, 2, 4, MLART_DTYPE_F32));
    check_length(pool.get(), a);

    OK(mlart_kv_seq_fork(pool.get(), a.id, 200));
    Mirror f = a;
    f.id = 200;
    mlart_kv_pool_stats st = stats(pool.get());
    CHECK(st.blocks_used == 2 && st.sequences == 2, st.blocks_used << " used, " << st.sequences);
    // Different rows on each side of the fork.
    OK(append(pool.get(), f, 0, 6, MLART_DTYPE_BF16));  // copies block 1, then a new block
    OK(append(pool.get(), a, 0, 1, MLART_DTYPE_F32));
    OK(append(pool.get(), f, 2, 3, MLART_DTYPE_F32));  // copies block 0 for the fork
    check_length(pool.get(), a);
    check_length(pool.get(), f);
    st = stats(pool.get());
    // a: blocks 0, 1 (both its own again); f: copies of 0 and 1, plus one more.
    CHECK(st.blocks_total == kPoolBlocks && st.blocks_used == 5 && st.blocks_free == 5 &&
              st.sequences == 2 &&
              st.bytes_per_block == std::int64_t(kPoolBlock) * kPoolDqk * 2 * kPoolLayers &&
              st.bytes_total == st.bytes_per_block * kPoolBlocks,
          "stats: total " << st.blocks_total << " used " << st.blocks_used << " free "
                          << st.blocks_free << " seqs " << st.sequences << " bytes/block "
                          << st.bytes_per_block << " bytes " << st.bytes_total);

    for (int layer = 0; layer < kPoolLayers; ++layer) {
        check_pool_decode(pool.get(), layer, {&a, &f, &f}, layer != 1,
                          "layer " + std::to_string(layer) + " seq/fork/fork");
    }

    // Exhaustion: 5 free blocks of 8 tokens; nothing changes on failure.
    Mirror x{300, std::vector<std::vector<float>>(kPoolLayers)};
    OK(mlart_kv_seq_create(pool.get(), x.id));
    EXPECT_ERROR(append(pool.get(), x, 1, 5 * kPoolBlock + 1, MLART_DTYPE_BF16),
                 MLART_STATUS_POOL_EXHAUSTED, "free blocks");
    check_length(pool.get(), x);
    CHECK(stats(pool.get()).blocks_free == 5, "a failed append took blocks");
    OK(append(pool.get(), x, 1, 5 * kPoolBlock, MLART_DTYPE_BF16));
    CHECK(stats(pool.get()).blocks_free == 0, stats(pool.get()).blocks_free);
    EXPECT_ERROR(append(pool.get(), x, 1, 1, MLART_DTYPE_F32), MLART_STATUS_POOL_EXHAUSTED,
                 nullptr);
    EXPECT_ERROR(append(pool.get(), a, 0, 8, MLART_DTYPE_F32), MLART_STATUS_POOL_EXHAUSTED,
                 nullptr);
    check_length(pool.get(), x);
    check_length(pool.get(), a);
    check_pool_decode(pool.get(), 1, {&x, &a}, true, "layer 1 on a full pool");

    OK(mlart_kv_seq_free(pool.get(), x.id));
    CHECK(stats(pool.get()).blocks_free == 5 && stats(pool.get()).sequences == 2,
          stats(pool.get()).blocks_free);
    std::int64_t len = 0;
    EXPECT_ERROR(mlart_kv_seq_length(pool.get(), x.id, 0, &len), MLART_STATUS_NOT_FOUND, "300");
}

}  // namespace

int main() {
    std::cout.setf(std::ios::unitbuf);
    test_versions();
    const Engine engine = create_engine();
    if (engine) {
        const PagedCase cases[] = {
            {MLART_DTYPE_F32, MLART_DTYPE_F32, MLART_DTYPE_F32, false, 0.0f, 1e-5, 1e-5},
            {MLART_DTYPE_F32, MLART_DTYPE_F32, MLART_DTYPE_F32, true, 0.25f, 1e-5, 1e-5},
            {MLART_DTYPE_BF16, MLART_DTYPE_BF16, MLART_DTYPE_BF16, true, 0.0f, 2e-2, 1e-3},
            {MLART_DTYPE_BF16, MLART_DTYPE_BF16, MLART_DTYPE_BF16, false, 0.0f, 2e-2, 1e-3},
            {MLART_DTYPE_BF16, MLART_DTYPE_BF16, MLART_DTYPE_F32, true, 0.0f, 2e-2, 1e-3},
        };
        for (const PagedCase &c : cases) test_paged(engine.get(), c);
        const Fp8Case fp8_cases[] = {
            {MLART_KV_FORMAT_FP8_V32, 576, 512, 16, 40, 0, 0, false},
            {MLART_KV_FORMAT_FP8_V32, 576, 512, 64, 70, 16, 20, true},
            {MLART_KV_FORMAT_FP8_MODEL1, 512, 512, 64, 100, 5, 12, true},
            {MLART_KV_FORMAT_FP8_MODEL1, 512, 448, 1, 9, 0, 0, true},
        };
        for (const Fp8Case &c : fp8_cases) test_fp8_sparse(engine.get(), c);
        test_pool(engine);
    }
    if (g_failures != 0) {
        std::cerr << "test_decode_cpp: " << g_failures << " of " << g_checks
                  << " checks FAILED\n";
        return 1;
    }
    std::cout << "test_decode_cpp: " << g_checks << " checks passed\n";
    return 0;
}
