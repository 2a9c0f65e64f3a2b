// C++17 consumer of bindings/cpp/mlart.hpp (and nothing else of mlart): the
// RAII handles, mlart::Error, paged and pool decodes checked against a
// double-precision reference computed here, sequence bookkeeping, the model
// API with a std::function progress callback, and moved-from objects.
//
// argv[1]: a tiny DeepSeek-V3-style checkpoint directory; argv[2], optional:
// a tiny DeepSeek-V3.2 one (gen-model --preset tiny-v3.2), for the indexer's
// pool option and forward selections. Linked twice by CMakeLists.txt
// (libmlart.so and libmlart.a). Exits non-zero if any check fails, after
// printing every failed check.
#include "mlart.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// ------------------------------------------------------------------ checks

int g_checks = 0;
int g_failures = 0;

void record(bool ok, const char *what, const std::string &detail, const char *file, int line) {
    ++g_checks;
    if (!ok) {
        ++g_failures;
        std::cerr << file << ':' << line << ": check failed: " << what << ": " << detail << '\n';
    }
}

// CHECK(cond, a << b): the detail is an ostream expression, built on failure.
#define CHECK(cond, detail)                                              \
    do {                                                                 \
        const bool c_ok_ = static_cast<bool>(cond);                      \
        std::ostringstream c_os_;                                        \
        if (!c_ok_) c_os_ << detail;                                     \
        record(c_ok_, #cond, c_os_.str(), __FILE__, __LINE__);           \
    } while (0)

// Runs `body`, which must throw mlart::Error with `status` and a message
// containing `needle` (empty: any non-empty message).
template <typename F>
void expect_error(F &&body, mlart::Status status, const std::string &needle, const char *what,
                  const char *file, int line) {
    std::ostringstream d;
    bool ok = false;
    try {
        body();
        d << "no exception; expected [" << mlart::status_name(status) << "]";
    } catch (const mlart::Error &e) {
        const std::string msg = e.what();
        ok = e.status() == status && !msg.empty() &&
             (needle.empty() || msg.find(needle) != std::string::npos);
        d << "expected [" << mlart::status_name(status) << "] containing \"" << needle
          << "\", got [" << e.status_name() << "] \"" << msg << "\"";
    } catch (const std::exception &e) {
        d << "unexpected exception: " << e.what();
    }
    record(ok, what, d.str(), file, line);
}
#define EXPECT_ERROR(stmt, status, needle) \
    expect_error([&] { stmt; }, (status), (needle), #stmt, __FILE__, __LINE__)

// Runs one test section; an exception escaping it is a failed check.
template <typename F>
void section(const char *name, F &&body) {
    try {
        body();
    } catch (const mlart::Error &e) {
        record(false, name, std::string("mlart::Error [") + e.status_name() + "] " + e.what(),
               __FILE__, __LINE__);
    } catch (const std::exception &e) {
        record(false, name, std::string("exception: ") + e.what(), __FILE__, __LINE__);
    }
}

// ---------------------------------------------------------------- numerics

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::mt19937 g_rng(0x6d6c6172u);

float uniform() { return std::uniform_real_distribution<float>(-1.0f, 1.0f)(g_rng); }

// float -> bfloat16 bits, round to nearest even (inputs here are finite).
std::uint16_t bf16_bits(float f) {
    std::uint32_t u = 0;
    std::memcpy(&u, &f, 4);
    const std::uint32_t lsb = (u >> 16) & 1u;
    return static_cast<std::uint16_t>((u + 0x7FFFu + lsb) >> 16);
}

float bf16_value(std::uint16_t b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    float f = 0.0f;
    std::memcpy(&f, &u, 4);
    return f;
}

// n random floats; exactly representable in bf16 when `bf16_exact`.
std::vector<float> random_floats(std::size_t n, bool bf16_exact) {
    std::vector<float> v(n);
    for (float &x : v) x = bf16_exact ? bf16_value(bf16_bits(uniform())) : uniform();
    return v;
}

std::vector<std::uint16_t> to_bf16(const std::vector<float> &v) {
    std::vector<std::uint16_t> b(v.size());
    std::transform(v.begin(), v.end(), b.begin(), bf16_bits);
    return b;
}

std::vector<float> from_bf16(const std::vector<std::uint16_t> &b) {
    std::vector<float> v(b.size());
    std::transform(b.begin(), b.end(), v.begin(), bf16_value);
    return v;
}

struct Attn {
    int s_q, h_q, d_qk, d_v;
    bool causal;
    double scale;
};

// Reference attention of one sequence in double precision: q [s_q, h_q, d_qk]
// against rows [len, d_qk] (V = first d_v of each row). Appends
// out [s_q, h_q, d_v] and lse [h_q, s_q] (+inf, out 0 for no visible key).
void attend(const float *q, const std::vector<float> &rows, const Attn &a,
            std::vector<double> &out, std::vector<double> &lse) {
    const int len = static_cast<int>(rows.size() / static_cast<std::size_t>(a.d_qk));
    const std::size_t o0 = out.size(), l0 = lse.size();
    out.resize(o0 + static_cast<std::size_t>(a.s_q) * a.h_q * a.d_v, 0.0);
    lse.resize(l0 + static_cast<std::size_t>(a.h_q) * a.s_q, kInf);
    for (int i = 0; i < a.s_q; ++i) {
        const int visible = a.causal ? std::max(0, len - (a.s_q - 1 - i)) : len;
        if (visible == 0) continue;
        for (int h = 0; h < a.h_q; ++h) {
            const float *qv = q + (static_cast<std::size_t>(i) * a.h_q + h) * a.d_qk;
            std::vector<double> score(static_cast<std::size_t>(visible));
            for (int t = 0; t < visible; ++t) {
                double dot = 0.0;
                for (int c = 0; c < a.d_qk; ++c)
                    dot += double(qv[c]) * double(rows[static_cast<std::size_t>(t) * a.d_qk + c]);
                score[t] = dot * a.scale;
            }
            const double mx = *std::max_element(score.begin(), score.end());
            double z = 0.0;
            for (double s : score) z += std::exp(s - mx);
            double *o = &out[o0 + (static_cast<std::size_t>(i) * a.h_q + h) * a.d_v];
            for (int t = 0; t < visible; ++t) {
                const double p = std::exp(score[t] - mx) / z;
                for (int c = 0; c < a.d_v; ++c)
                    o[c] += p * double(rows[static_cast<std::size_t>(t) * a.d_qk + c]);
            }
            lse[l0 + static_cast<std::size_t>(h) * a.s_q + i] = mx + std::log(z);
        }
    }
}

// ||got - want|| / ||want||; NaN anywhere gives +inf.
double rel_l2(const std::vector<float> &got, const std::vector<double> &want) {
    if (got.size() != want.size()) return kInf;
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(got[i])) return kInf;
        num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
        den += want[i] * want[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

// Largest |got - want| over finite references; an infinite reference needs
// the same infinity.
double lse_error(const std::vector<float> &got, const std::vector<double> &want) {
    if (got.size() != want.size()) return kInf;
    double worst = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (std::isinf(want[i])) {
            if (!(std::isinf(got[i]) && got[i] > 0)) return kInf;
        } else {
            const double e = std::fabs(double(got[i]) - want[i]);
            if (std::isnan(e)) return kInf;
            worst = std::max(worst, e);
        }
    }
    return worst;
}

bool all_finite(const std::vector<float> &v) {
    return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// -------------------------------------------------------------- the tests

void test_basics() {
    const std::string want = std::to_string(MLART_VERSION_MAJOR) + "." +
                             std::to_string(MLART_VERSION_MINOR) + "." +
                             std::to_string(MLART_VERSION_PATCH);
    CHECK(mlart::version() == want, mlart::version() << " != " << want);
    CHECK(mlart::abi_version() == MLART_ABI_VERSION, mlart::abi_version());
    CHECK(std::string(mlart::status_name(mlart::Status::NotFound)) == "not found",
          mlart::status_name(mlart::Status::NotFound));

    // Ownership contract, at compile time.
    CHECK((std::is_nothrow_move_constructible<mlart::Engine>::value &&
           std::is_nothrow_move_assignable<mlart::Engine>::value &&
           std::is_nothrow_move_constructible<mlart::KvPool>::value &&
           std::is_nothrow_move_assignable<mlart::KvPool>::value &&
           std::is_nothrow_move_constructible<mlart::Model>::value &&
           std::is_nothrow_move_assignable<mlart::Model>::value),
          "moves must be noexcept");
    CHECK((!std::is_copy_constructible<mlart::Engine>::value &&
           !std::is_copy_assignable<mlart::KvPool>::value &&
           !std::is_copy_constructible<mlart::Model>::value),
          "handles must be move-only");
    CHECK((std::is_base_of<std::runtime_error, mlart::Error>::value), "Error is a runtime_error");

    CHECK(mlart::kv_row_bytes(mlart::KvFormat::Bf16, 576) == 1152,
          mlart::kv_row_bytes(mlart::KvFormat::Bf16, 576));
    CHECK(mlart::kv_row_bytes(mlart::KvFormat::Fp8V32, 576) == 656,
          mlart::kv_row_bytes(mlart::KvFormat::Fp8V32, 576));
    CHECK(mlart::kv_block_bytes(mlart::KvFormat::F32, 72, 7) == 72u * 4u * 7u,
          mlart::kv_block_bytes(mlart::KvFormat::F32, 72, 7));
    EXPECT_ERROR(static_cast<void>(mlart::kv_row_bytes(mlart::KvFormat::Bf16, 0)),
                 mlart::Status::InvalidArgument, "d_qk");
    EXPECT_ERROR(static_cast<void>(mlart::kv_row_bytes(static_cast<mlart::KvFormat>(99), 64)),
                 mlart::Status::InvalidArgument, "99");

    // Quantize / dequantize: exact through an F32 cache, close through FP8.
    const int d = 576, bs = 3, n = 5;
    const std::vector<float> rows = random_floats(static_cast<std::size_t>(n) * d, false);
    std::vector<std::uint8_t> blocks(2 * mlart::kv_block_bytes(mlart::KvFormat::F32, d, bs));
    mlart::kv_quantize(mlart::KvFormat::F32, d, bs, n, rows.data(), blocks.data());
    std::vector<float> back(rows.size(), kNaN);
    mlart::kv_dequantize(mlart::KvFormat::F32, d, bs, n, blocks.data(), back.data());
    CHECK(back == rows, "F32 round trip changed values");
    std::vector<std::uint8_t> fp8(2 * mlart::kv_block_bytes(mlart::KvFormat::Fp8V32, d, bs));
    mlart::kv_quantize(mlart::KvFormat::Fp8V32, d, bs, n, rows.data(), fp8.data());
    std::vector<std::uint16_t> back16(rows.size(), 0xFFFF);
    mlart::kv_dequantize(mlart::KvFormat::Fp8V32, d, bs, n, fp8.data(), mlart::bf16(back16.data()));
    const std::vector<double> rows_d(rows.begin(), rows.end());
    const double e8 = rel_l2(from_bf16(back16), rows_d);
    CHECK(e8 > 0.0 && e8 < 0.08, "FP8_V32 round trip rel-L2 " << e8);

    CHECK(mlart::device_count() >= 0, mlart::device_count());
}

mlart::Engine test_engine() {
    mlart::EngineOptions eo;
    eo.backend = mlart::Backend::Cpu;
    eo.num_threads = 3;  // not the default (one per core) on a small machine
    mlart::Engine engine = mlart::Engine::create(eo);
    CHECK(static_cast<bool>(engine) && engine.get() != nullptr, "engine handle");
    const mlart::EngineInfo info = engine.info();
    CHECK(info.backend == mlart::Backend::Cpu, static_cast<unsigned>(info.backend));
    CHECK(info.num_threads == 3, info.num_threads);
    CHECK(!info.reason.empty(), "empty reason");
    CHECK(!info.device_name.empty(), "empty device name");
    CHECK(!info.thread_placement.empty(), "empty thread placement");
    {
        mlart::EngineOptions none = eo;
        none.thread_affinity = mlart::ThreadAffinity::None;
        const std::string placed = mlart::Engine::create(none).info().thread_placement;
        CHECK(placed == "not pinned (affinity NONE)", placed);
    }
    std::cout << "engine: isa " << static_cast<unsigned>(info.cpu_isa) << ", device \""
              << info.device_name << "\", features \"" << info.cpu_features << "\"\n"
              << "engine: reason \"" << info.reason << "\"\n";

    // A bad option comes back as an Error, and no engine.
    mlart::EngineOptions bad;
    bad.backend = static_cast<mlart::Backend>(77);
    EXPECT_ERROR(static_cast<void>(mlart::Engine::create(bad)), mlart::Status::InvalidArgument,
                 "77");
    return engine;
}

// A caller-owned paged cache of several sequences in shuffled blocks, every
// unused slot NaN (never to be read).
struct Cache {
    int d_qk, block_size, stride, num_blocks;
    std::vector<std::int32_t> lens, table;
    std::vector<std::vector<float>> rows;  // logical rows per sequence
    std::vector<float> slots;              // [num_blocks, block_size, d_qk]

    Cache(std::vector<std::int32_t> lengths, int d, int bs, bool bf16_exact)
        : d_qk(d), block_size(bs), stride(0), num_blocks(0), lens(std::move(lengths)) {
        int used = 0;
        for (int l : lens) {
            stride = std::max(stride, (l + bs - 1) / bs);
            used += (l + bs - 1) / bs;
        }
        stride += 1;               // a spare column, never read
        num_blocks = used + 3;     // spare blocks, never read
        std::vector<std::int32_t> perm(static_cast<std::size_t>(num_blocks));
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), g_rng);
        slots.assign(static_cast<std::size_t>(num_blocks) * bs * d, kNaN);
        table.assign(lens.size() * static_cast<std::size_t>(stride), 1 << 30);
        std::size_t next = 0;
        for (std::size_t b = 0; b < lens.size(); ++b) {
            rows.push_back(random_floats(static_cast<std::size_t>(lens[b]) * d, bf16_exact));
            for (int j = 0; j < (lens[b] + bs - 1) / bs; ++j)
                table[b * stride + j] = perm[next++];
            for (int t = 0; t < lens[b]; ++t) {
                const std::size_t blk = static_cast<std::size_t>(table[b * stride + t / bs]);
                std::copy_n(&rows[b][static_cast<std::size_t>(t) * d], d,
                            &slots[(blk * bs + t % bs) * d]);
            }
        }
    }
};

void test_paged(const mlart::Engine &engine) {
    // h_q = 5 (not a multiple of 16), block size 7, one empty sequence and
    // one shorter than s_q under the causal mask.
    const std::vector<std::int32_t> lens = {13, 1, 30, 0, 22};
    const int batch = static_cast<int>(lens.size());
    const int s_q = 2, h_q = 5, d_qk = 72, d_v = 40, bs = 7;
    const std::size_t q_per = static_cast<std::size_t>(s_q) * h_q * d_qk;
    const std::size_t out_n = static_cast<std::size_t>(batch) * s_q * h_q * d_v;
    const std::size_t lse_n = static_cast<std::size_t>(batch) * h_q * s_q;

    // F32 throughout, the raw C struct, an explicit scale.
    {
        const Cache cache(lens, d_qk, bs, false);
        const std::vector<float> q = random_floats(q_per * batch, false);
        std::vector<float> out(out_n, kNaN), lse(lse_n, kNaN);
        mlart_decode_args a = mlart::decode_args();
        a.batch = batch;
        a.s_q = s_q;
        a.h_q = h_q;
        a.d_qk = d_qk;
        a.d_v = d_v;
        a.softmax_scale = 0.3f;
        a.q_dtype = MLART_DTYPE_F32;
        a.q = q.data();
        a.kv_format = MLART_KV_FORMAT_F32;
        a.kv = cache.slots.data();
        a.num_blocks = cache.num_blocks;
        a.block_size = bs;
        a.block_table = cache.table.data();
        a.block_table_stride = cache.stride;
        a.seqlens = cache.lens.data();
        a.out_dtype = MLART_DTYPE_F32;
        a.out = out.data();
        a.lse = lse.data();
        engine.decode_paged(a);

        std::vector<double> ro, rl;
        const Attn at{s_q, h_q, d_qk, d_v, false, double(0.3f)};
        for (int b = 0; b < batch; ++b) attend(&q[q_per * b], cache.rows[b], at, ro, rl);
        const double e = rel_l2(out, ro), el = lse_error(lse, rl);
        std::cout << "paged f32: rel-L2 " << e << ", lse err " << el << '\n';
        CHECK(e < 1e-5, "paged f32 rel-L2 " << e);
        CHECK(el < 1e-4, "paged f32 lse err " << el);

        // Errors: nothing written, the message names the argument.
        std::fill(out.begin(), out.end(), kNaN);
        mlart_decode_args bad = a;
        bad.h_q = 0;
        EXPECT_ERROR(engine.decode_paged(bad), mlart::Status::InvalidArgument, "h_q");
        bad = a;
        bad.q = nullptr;
        EXPECT_ERROR(engine.decode_paged(bad), mlart::Status::NullPointer, "q");
        bad = a;
        bad.struct_size = 0;  // forgot *_init
        EXPECT_ERROR(engine.decode_paged(bad), mlart::Status::InvalidArgument, "struct_size");
        CHECK(std::all_of(out.begin(), out.end(), [](float x) { return std::isnan(x); }),
              "a failed decode wrote out");
    }

    // BF16 q and cache through the convenience overload; causal; out BF16
    // and F32.
    for (const bool out_bf16 : {true, false}) {
        const Cache cache(lens, d_qk, bs, true);
        const std::vector<std::uint16_t> kv16 = to_bf16(cache.slots);
        const std::vector<float> q = random_floats(q_per * batch, true);
        const std::vector<std::uint16_t> q16 = to_bf16(q);
        std::vector<std::uint16_t> out16(out_n, 0x7FC0);  // NaN
        std::vector<float> out32(out_n, kNaN), lse(lse_n, kNaN);

        mlart::PagedKv kv;
        kv.format = mlart::KvFormat::Bf16;
        kv.data = kv16.data();
        kv.d_qk = d_qk;
        kv.num_blocks = cache.num_blocks;
        kv.block_size = bs;
        kv.batch = batch;
        kv.block_table = cache.table.data();
        kv.block_table_stride = cache.stride;
        kv.seqlens = cache.lens.data();
        mlart::DecodeShape shape;
        shape.s_q = s_q;
        shape.h_q = h_q;
        shape.d_v = d_v;
        shape.causal = true;
        if (out_bf16)
            engine.decode_paged(kv, shape, mlart::bf16(q16.data()), mlart::bf16(out16.data()),
                                lse.data());
        else
            engine.decode_paged(kv, shape, mlart::bf16(q16.data()), out32.data(), lse.data());

        std::vector<double> ro, rl;
        const Attn at{s_q, h_q, d_qk, d_v, true, 1.0 / std::sqrt(double(d_qk))};
        for (int b = 0; b < batch; ++b) attend(&q[q_per * b], cache.rows[b], at, ro, rl);
        const double e = rel_l2(out_bf16 ? from_bf16(out16) : out32, ro);
        const double el = lse_error(lse, rl);
        const double tol = out_bf16 ? 8e-3 : 1e-5;
        std::cout << "paged bf16 causal, out " << (out_bf16 ? "bf16" : "f32") << ": rel-L2 " << e
                  << ", lse err " << el << '\n';
        CHECK(e < tol, "paged bf16 rel-L2 " << e << " >= " << tol);
        CHECK(el < 1e-3, "paged bf16 lse err " << el);
        // Sequence 3 is empty: out 0, lse +inf.
        const std::size_t o3 = 3 * static_cast<std::size_t>(s_q) * h_q * d_v;
        CHECK(out32.size() == out_n && (out_bf16 ? out16[o3] == 0 : out32[o3] == 0.0f),
              "empty sequence output not 0");
        CHECK(std::isinf(lse[3 * static_cast<std::size_t>(h_q) * s_q]),
              "empty sequence lse " << lse[3 * static_cast<std::size_t>(h_q) * s_q]);
    }
}

// What the test believes one pool sequence holds, per layer (bf16-exact).
using Seq = std::vector<std::vector<float>>;

void test_pool(const mlart::Engine &engine) {
    const int d_qk = 72, layers = 2, bs = 5, blocks = 40;
    mlart::KvPoolOptions po;
    po.format = mlart::KvFormat::Bf16;
    po.d_qk = d_qk;
    po.num_layers = layers;
    po.block_size = bs;
    po.num_blocks = blocks;
    mlart::KvPool pool = mlart::KvPool::create(engine, po);
    CHECK(pool.get() != nullptr && pool.d_qk() == d_qk, "pool handle");

    auto rows = [&](int n) { return random_floats(static_cast<std::size_t>(n) * d_qk, true); };
    auto add = [](std::vector<float> &to, const std::vector<float> &from) {
        to.insert(to.end(), from.begin(), from.end());
    };

    Seq s1(layers), s2;
    pool.seq_create(1);
    CHECK(pool.seq_length(1, 0) == 0 && pool.seq_length(1, 1) == 0, "new sequence not empty");
    const std::vector<float> r0 = rows(9), r1 = rows(4), r2 = rows(6);
    pool.append(1, 0, r0);  // std::vector<float>: F32, 9 tokens
    const std::vector<std::uint16_t> r1_16 = to_bf16(r1);
    pool.append(1, 0, 4, mlart::bf16(r1_16.data()));  // tagged bf16
    pool.append(1, 1, 6, r2.data());                  // float pointer: F32
    add(s1[0], r0);
    add(s1[0], r1);
    add(s1[1], r2);
    CHECK(pool.seq_length(1, 0) == 13 && pool.seq_length(1, 1) == 6,
          pool.seq_length(1, 0) << ", " << pool.seq_length(1, 1));

    mlart::KvPoolStats st = pool.stats();
    CHECK(st.blocks_total == blocks && st.blocks_used == 3 && st.blocks_free == blocks - 3 &&
              st.sequences == 1 &&
              st.bytes_per_block == std::int64_t(bs) * d_qk * 2 * layers &&
              st.bytes_total == st.bytes_per_block * blocks,
          "stats: total " << st.blocks_total << " used " << st.blocks_used << " free "
                          << st.blocks_free << " seqs " << st.sequences << " bytes/block "
                          << st.bytes_per_block << " bytes " << st.bytes_total);

    // Errors: a duplicate id, an unknown one, a ragged vector.
    EXPECT_ERROR(pool.seq_create(1), mlart::Status::InvalidArgument, "seq_id = 1");
    EXPECT_ERROR(static_cast<void>(pool.seq_length(99, 0)), mlart::Status::NotFound, "99");
    EXPECT_ERROR(pool.append(1, 0, std::vector<float>(d_qk + 1, 0.5f)),
                 mlart::Status::InvalidArgument, "d_qk");
    EXPECT_ERROR(pool.append(1, layers, 1, r2.data()), mlart::Status::InvalidArgument, "layer");
    CHECK(pool.seq_length(1, 0) == 13, "failed appends changed the sequence");

    // Fork, diverge, truncate.
    pool.seq_fork(1, 2);
    s2 = s1;
    CHECK(pool.stats().blocks_used == 3 && pool.stats().sequences == 2,
          "fork copied blocks: " << pool.stats().blocks_used);
    EXPECT_ERROR(pool.seq_fork(1, 2), mlart::Status::InvalidArgument, "2");
    const std::vector<float> r3 = rows(3), r4 = rows(2);
    pool.append(2, 0, r3);
    pool.append(1, 0, r4);
    add(s2[0], r3);
    add(s1[0], r4);
    pool.seq_truncate(2, 10);
    s2[0].resize(10u * d_qk);
    CHECK(pool.seq_length(1, 0) == 15 && pool.seq_length(2, 0) == 10 &&
              pool.seq_length(2, 1) == 6,
          pool.seq_length(1, 0) << ", " << pool.seq_length(2, 0) << ", "
                                << pool.seq_length(2, 1));

    // Pool decode vs the reference on the mirrored rows, both layers; ids
    // may repeat.
    const std::vector<std::uint64_t> ids = {2, 1, 2};
    const std::vector<const Seq *> mirrors = {&s2, &s1, &s2};
    const int s_q = 3, h_q = 7, d_v = 56;
    for (int layer = 0; layer < layers; ++layer) {
        const std::size_t q_per = static_cast<std::size_t>(s_q) * h_q * d_qk;
        const std::vector<float> q = random_floats(q_per * ids.size(), true);
        const std::vector<std::uint16_t> q16 = to_bf16(q);
        std::vector<float> out(ids.size() * s_q * h_q * d_v, kNaN);
        std::vector<float> lse(ids.size() * h_q * s_q, kNaN);
        const bool causal = layer == 0;
        if (layer == 0) {
            mlart::DecodeShape shape;
            shape.s_q = s_q;
            shape.h_q = h_q;
            shape.d_v = d_v;
            shape.causal = causal;
            pool.decode(layer, ids, shape, mlart::bf16(q16.data()), out.data(), lse.data());
        } else {
            mlart_kv_pool_decode_args a = mlart::pool_decode_args();
            a.layer = layer;
            a.batch = static_cast<std::int32_t>(ids.size());
            a.seq_ids = ids.data();
            a.s_q = s_q;
            a.h_q = h_q;
            a.d_v = d_v;
            a.q_dtype = MLART_DTYPE_F32;
            a.q = q.data();
            a.out_dtype = MLART_DTYPE_F32;
            a.out = out.data();
            a.lse = lse.data();
            pool.decode(a);
        }
        std::vector<double> ro, rl;
        const Attn at{s_q, h_q, d_qk, d_v, causal, 1.0 / std::sqrt(double(d_qk))};
        for (std::size_t b = 0; b < ids.size(); ++b)
            attend(&q[q_per * b], (*mirrors[b])[static_cast<std::size_t>(layer)], at, ro, rl);
        const double e = rel_l2(out, ro), el = lse_error(lse, rl);
        std::cout << "pool layer " << layer << ": rel-L2 " << e << ", lse err " << el << '\n';
        CHECK(e < 1e-5, "pool layer " << layer << " rel-L2 " << e);
        CHECK(el < 1e-3, "pool layer " << layer << " lse err " << el);
    }
    mlart::DecodeShape zero;
    zero.h_q = 0;
    std::vector<float> q(static_cast<std::size_t>(d_qk)), out(64);
    EXPECT_ERROR(pool.decode(0, {1}, zero, q.data(), out.data()), mlart::Status::InvalidArgument,
                 "h_q");
    mlart::DecodeShape one;
    one.h_q = 1;
    one.d_v = 64;
    EXPECT_ERROR(pool.decode(0, {1}, one, static_cast<const float *>(nullptr), out.data()),
                 mlart::Status::NullPointer, "q");
    EXPECT_ERROR(pool.decode(0, {77}, one, q.data(), out.data()), mlart::Status::NotFound, "77");

    // Freeing gives every block back.
    pool.seq_free(2);
    pool.seq_free(1);
    st = pool.stats();
    CHECK(st.blocks_used == 0 && st.blocks_free == blocks && st.sequences == 0,
          "after free: used " << st.blocks_used << " seqs " << st.sequences);
    EXPECT_ERROR(pool.seq_free(1), mlart::Status::NotFound, "1");

    // Exhaustion on a 2-block pool; nothing changes.
    po.num_blocks = 2;
    mlart::KvPool small = mlart::KvPool::create(engine, po);
    small.seq_create(5);
    EXPECT_ERROR(small.append(5, 0, rows(2 * bs + 1)), mlart::Status::PoolExhausted, "");
    CHECK(small.seq_length(5, 0) == 0 && small.stats().blocks_free == 2, "failed append took");
    small.append(5, 0, rows(2 * bs));
    CHECK(small.seq_length(5, 0) == 2 * bs, small.seq_length(5, 0));

    // A pool needs a block count: the C default 0 is rejected.
    po.num_blocks = 0;
    EXPECT_ERROR(static_cast<void>(mlart::KvPool::create(engine, po)),
                 mlart::Status::InvalidArgument, "num_blocks");
}

void test_moves() {
    mlart::EngineOptions eo;
    eo.backend = mlart::Backend::Cpu;
    eo.num_threads = 1;
    mlart::Engine a = mlart::Engine::create(eo);
    mlart_engine *const raw = a.get();
    mlart::Engine b = std::move(a);
    CHECK(!a && a.get() == nullptr && b.get() == raw, "move construction");
    // A moved-from object passes NULL on: the library reports it, no crash.
    EXPECT_ERROR(static_cast<void>(a.info()), mlart::Status::NullPointer, "engine");

    mlart::KvPoolOptions po;
    po.d_qk = 16;
    po.num_blocks = 4;
    po.block_size = 4;
    mlart::KvPool p = mlart::KvPool::create(b, po);
    mlart::KvPool q = mlart::KvPool::create(b, po);
    p.seq_create(3);
    mlart_kv_pool *const praw = p.get();
    q = std::move(p);  // frees q's old pool
    CHECK(!p && q.get() == praw && q.seq_length(3, 0) == 0, "move assignment");
    EXPECT_ERROR(p.seq_create(4), mlart::Status::NullPointer, "pool");
    EXPECT_ERROR(static_cast<void>(p.stats()), mlart::Status::NullPointer, "pool");

    // The pool keeps the engine alive: drop the engine, keep using the pool.
    { mlart::Engine gone = std::move(b); }
    CHECK(!b, "engine moved out");
    q.append(3, 0, std::vector<float>(2 * 16, 0.25f));
    CHECK(q.seq_length(3, 0) == 2, q.seq_length(3, 0));

    // Self-move leaves a usable object (unique_ptr semantics).
    mlart::KvPool &alias = q;
    q = std::move(alias);
    CHECK(q.get() == praw, "self move-assignment");

    // Default-constructed and moved-from objects destroy as no-ops; release()
    // hands the handle over, to be freed by the caller.
    mlart::Model none;
    mlart::Model moved = std::move(none);
    CHECK(!none && !moved, "empty model");
    mlart_kv_pool *const released = q.release();
    CHECK(released == praw && !q, "release");
    mlart::KvPool readopted(released, 16);
    CHECK(readopted.seq_length(3, 0) == 2, "re-adopted pool");
}

struct ProgressLog {
    std::vector<float> fractions;
    std::vector<std::string> stages;
};

struct CallbackFailure : std::runtime_error {
    CallbackFailure() : std::runtime_error("thrown by the progress callback") {}
};

void test_model(const mlart::Engine &engine, const std::string &dir) {
    // Load with a recording progress callback.
    ProgressLog log;
    mlart::ModelOptions mo;
    mo.progress = [&log](float fraction, const char *stage) {
        log.fractions.push_back(fraction);
        log.stages.emplace_back(stage != nullptr ? stage : "");
        return true;
    };
    const mlart::Model model = mlart::Model::load(engine, dir, mo);
    CHECK(model.get() != nullptr, "model handle");
    bool ordered = !log.fractions.empty(), named = true;
    for (std::size_t i = 0; i < log.fractions.size(); ++i) {
        const float f = log.fractions[i];
        ordered = ordered && f >= 0.0f && f <= 1.0f && (i == 0 || f >= log.fractions[i - 1]);
        named = named && !log.stages[i].empty();
    }
    CHECK(ordered && log.fractions.back() == 1.0f,
          log.fractions.size() << " calls, not non-decreasing in [0, 1] ending at 1");
    CHECK(named, "a progress call without a stage name");
    std::cout << "model: " << log.fractions.size() << " progress calls, first stage \""
              << (log.stages.empty() ? "" : log.stages.front()) << "\"\n";

    const mlart::ModelInfo p = model.info();
    CHECK(p.num_layers == 2 && p.loaded_layers == 2 && p.first_layer == 0 &&
              p.hidden_size == 256 && p.num_heads == 4 && p.kv_lora_rank == 64 &&
              p.qk_rope_head_dim == 16 && p.q_lora_rank == 96 && p.d_qk == 80 && p.yarn &&
              p.softmax_scale > 0.0 && p.bytes_loaded > 0 && p.index_n_heads == 0 &&
              p.index_head_dim == 0 && p.index_topk == 0,
          "props: layers " << p.num_layers << "/" << p.loaded_layers << " hidden "
                           << p.hidden_size << " heads " << p.num_heads << " d_qk " << p.d_qk);

    // Cancelling at the third call; the callback is not called again.
    int calls = 0;
    mlart::ModelOptions cancel;
    cancel.progress = [&calls](float, const char *) { return ++calls < 3; };
    EXPECT_ERROR(static_cast<void>(mlart::Model::load(engine, dir, cancel)),
                 mlart::Status::Cancelled, "cancelled");
    CHECK(calls == 3, calls << " calls");

    // An exception from the callback cancels the load and comes back out.
    mlart::ModelOptions throwing;
    throwing.progress = [](float, const char *) -> bool { throw CallbackFailure(); };
    bool rethrown = false;
    try {
        static_cast<void>(mlart::Model::load(engine, dir, throwing));
    } catch (const CallbackFailure &) {
        rethrown = true;
    } catch (const std::exception &e) {
        std::cerr << "unexpected: " << e.what() << '\n';
    }
    CHECK(rethrown, "callback exception not rethrown");

    // Layer range and weight conversion options reach the library.
    mlart::ModelOptions part;
    part.first_layer = 1;
    part.num_layers = 1;
    part.convert_weights = mlart::Dtype::F32;
    const mlart::ModelInfo pp = mlart::Model::load(engine, dir, part).info();
    CHECK(pp.first_layer == 1 && pp.loaded_layers == 1 && pp.weight_dtype == MLART_DTYPE_F32,
          "first " << pp.first_layer << " loaded " << pp.loaded_layers << " dtype "
                   << pp.weight_dtype);

    // Missing directory: what the library returns is an I/O error naming
    // config.json.
    EXPECT_ERROR(static_cast<void>(mlart::Model::load(engine, dir + "/does-not-exist")),
                 mlart::Status::Io, "config.json");

    // Forward: 3 tokens of random hidden states on layer 0.
    mlart::KvPoolOptions po;
    po.format = mlart::KvFormat::F32;
    po.d_qk = p.d_qk;
    po.num_layers = p.loaded_layers;
    po.block_size = 16;
    po.num_blocks = 16;
    mlart::KvPool pool = mlart::KvPool::create(engine, po);
    const int n = 3;
    const std::size_t hid = static_cast<std::size_t>(p.hidden_size);
    const std::vector<float> x = random_floats(n * hid, false);
    std::vector<float> x2 = x;
    x2[2 * hid + 5] += 0.5f;  // only the last token differs
    std::vector<float> out(n * hid, kNaN), out_same(n * hid, kNaN), out2(n * hid, kNaN);
    for (std::uint64_t id : {10u, 11u, 12u}) pool.seq_create(id);

    model.forward(pool, 0, 10, n, x.data(), out.data());
    CHECK(all_finite(out) && std::any_of(out.begin(), out.end(), [](float v) { return v != 0; }),
          "forward output not finite and non-zero");
    CHECK(pool.seq_length(10, 0) == n && pool.seq_length(10, 1) == 0,
          pool.seq_length(10, 0) << ", " << pool.seq_length(10, 1));

    // The same input on a fresh sequence (raw struct this time) gives the
    // same output; a changed input changes it.
    const std::uint64_t id11 = 11;
    const std::int32_t n11 = n;
    mlart_forward_args a = mlart::forward_args();
    a.layer = 0;
    a.batch = 1;
    a.seq_ids = &id11;
    a.n_tokens = &n11;
    a.x = x.data();
    a.out = out_same.data();
    model.forward(pool, a);
    const std::vector<double> out_d(out.begin(), out.end());
    const double same = rel_l2(out_same, out_d);
    CHECK(same < 1e-6, "same input, rel-L2 " << same);

    const std::vector<std::uint64_t> ids12 = {12};  // the vector overload
    const std::vector<std::int32_t> ns12 = {n};
    model.forward(pool, 0, ids12, ns12, x2.data(), out2.data());
    const std::vector<double> first2(out.begin(), out.begin() + 2 * hid);
    const double prefix = rel_l2(std::vector<float>(out2.begin(), out2.begin() + 2 * hid), first2);
    const double last = rel_l2(std::vector<float>(out2.begin() + 2 * hid, out2.end()),
                               std::vector<double>(out.begin() + 2 * hid, out.end()));
    std::cout << "forward: same-input rel-L2 " << same << ", changed token rel-L2 " << last
              << ", causal prefix rel-L2 " << prefix << '\n';
    CHECK(all_finite(out2) && last > 1e-4, "changed input, last token rel-L2 " << last);
    CHECK(prefix < 1e-6, "a later token changed earlier outputs: " << prefix);

    // Bf16 activations reach the library: the same tokens on a fresh
    // sequence give an output close to the precise one, but not equal.
    mlart::ModelOptions rounded;
    rounded.activations = mlart::Activations::Bf16;
    const mlart::Model model_bf16 = mlart::Model::load(engine, dir, rounded);
    CHECK(model_bf16.info().activations == MLART_ACTIVATIONS_BF16 &&
              p.activations == MLART_ACTIVATIONS_PRECISE &&
              model_bf16.info().projection_isa == p.projection_isa,
          "info: activations " << model_bf16.info().activations << " / " << p.activations);
    std::vector<float> out_bf16(n * hid, kNaN);
    pool.seq_create(13);
    model_bf16.forward(pool, 0, 13, n, x.data(), out_bf16.data());
    const double bf16_diff = rel_l2(out_bf16, out_d);
    std::cout << "forward: bf16 activations vs precise rel-L2 " << bf16_diff << '\n';
    CHECK(all_finite(out_bf16) && bf16_diff > 1e-5 && bf16_diff < 1e-2,
          "bf16 activations vs precise, rel-L2 " << bf16_diff);

    // GPU projections: a CPU engine accepts the request and ignores it (the
    // projections stay on the CPU, with the same output); a raw value other
    // than -1, 0 or 1 is the library's error naming the field.
    CHECK(p.projections_on_gpu == 0 && !mlart::ModelOptions{}.gpu_projections,
          "projections_on_gpu " << p.projections_on_gpu);
    for (const bool on : {true, false}) {
        mlart::ModelOptions placed;
        placed.gpu_projections = on;
        const mlart::Model model_placed = mlart::Model::load(engine, dir, placed);
        const mlart::ModelInfo pi = model_placed.info();
        CHECK(pi.projections_on_gpu == 0,
              "gpu_projections " << on << ": projections_on_gpu " << pi.projections_on_gpu);
        const std::uint64_t id = on ? 14 : 15;
        std::vector<float> out_placed(n * hid, kNaN);
        pool.seq_create(id);
        model_placed.forward(pool, 0, id, n, x.data(), out_placed.data());
        const double d = rel_l2(out_placed, out_d);
        CHECK(d < 1e-6, "gpu_projections " << on << " on a CPU engine, rel-L2 " << d);
    }
    mlart_model_options raw;
    mlart_model_options_init(&raw);
    CHECK(raw.gpu_projections == -1 && raw.struct_size == sizeof raw,
          "gpu_projections " << raw.gpu_projections << ", struct_size " << raw.struct_size);
    raw.gpu_projections = 7;
    EXPECT_ERROR(static_cast<void>(mlart::Model::load(engine, dir, raw)),
                 mlart::Status::InvalidArgument, "gpu_projections = 7");

    // Kept keys: 0 (the default) reads back as 1 GiB, a set value as itself
    // (UINT64_MAX: no limit), through ModelOptions and the raw struct alike.
    CHECK(raw.kept_keys_bytes == 0 && mlart::ModelOptions{}.kept_keys_bytes == 0 &&
              p.kept_keys_bytes == std::uint64_t{1} << 30,
          "kept_keys_bytes: raw " << raw.kept_keys_bytes << ", info " << p.kept_keys_bytes);
    for (const std::uint64_t kept : {std::uint64_t{1}, std::uint64_t{5} << 20,
                                     std::uint64_t{3} << 30, UINT64_MAX}) {
        mlart::ModelOptions limited;
        limited.kept_keys_bytes = kept;
        const std::uint64_t got = mlart::Model::load(engine, dir, limited).info().kept_keys_bytes;
        CHECK(got == kept, "kept_keys_bytes " << kept << ": info " << got);
    }
    mlart_model_options raw_kept;
    mlart_model_options_init(&raw_kept);
    raw_kept.kept_keys_bytes = 12345;
    CHECK(mlart::Model::load(engine, dir, raw_kept).info().kept_keys_bytes == 12345,
          "raw kept_keys_bytes 12345");

    // Device memory (args.memory) needs a CUDA engine; the pool is unchanged.
    CHECK(a.memory == MLART_MEMORY_HOST && a.stream == nullptr &&
              a.struct_size == sizeof(mlart_forward_args),
          "forward_args(): memory " << a.memory << ", struct_size " << a.struct_size);
    mlart_forward_args on_device = a;
    on_device.memory = MLART_MEMORY_DEVICE;
    EXPECT_ERROR(model.forward(pool, on_device), mlart::Status::Unsupported,
                 "memory = MLART_MEMORY_DEVICE but this engine runs on the CPU");
    CHECK(pool.seq_length(11, 0) == n, pool.seq_length(11, 0));

    // A decode step continues the sequence.
    std::vector<float> step(hid, kNaN);
    model.forward(pool, 0, 10, 1, x.data(), step.data());
    CHECK(all_finite(step) && pool.seq_length(10, 0) == n + 1, pool.seq_length(10, 0));

    // Errors leave the pool as it was.
    EXPECT_ERROR(model.forward(pool, 0, 99, 1, x.data(), step.data()), mlart::Status::NotFound,
                 "99");
    EXPECT_ERROR(model.forward(pool, 2, 10, 1, x.data(), step.data()),
                 mlart::Status::InvalidArgument, "layer");
    EXPECT_ERROR(model.forward(pool, 0, {10, 11}, {1}, x.data(), step.data()),
                 mlart::Status::InvalidArgument, "n_tokens");
    EXPECT_ERROR(model.forward(pool, 0, 10, 0, x.data(), step.data()),
                 mlart::Status::InvalidArgument, "n_tokens");
    // No indexer: index_out and a pool with indexer keys are the library's
    // errors.
    std::vector<std::int32_t> sel(8, 0);
    EXPECT_ERROR(model.forward(pool, 0, 10, 1, x.data(), step.data(), sel.data()),
                 mlart::Status::InvalidArgument, "index_out");
    EXPECT_ERROR(model.forward(pool, 0, 10, 1, x.data(), step.data(), sel),
                 mlart::Status::InvalidArgument, "index_out");
    CHECK(mlart::KvPoolOptions{}.index_head_dim == 0, mlart::KvPoolOptions{}.index_head_dim);
    po.index_head_dim = 32;
    mlart::KvPool keyed = mlart::KvPool::create(engine, po);
    keyed.seq_create(10);
    EXPECT_ERROR(model.forward(keyed, 0, 10, 1, x.data(), step.data()),
                 mlart::Status::InvalidArgument, "index_head_dim");
    CHECK(pool.seq_length(10, 0) == n + 1 && keyed.seq_length(10, 0) == 0,
          "failed forwards changed the pool");
}

// Rows of index_out for tokens at positions first..: a token at p < topk
// attends to 0..p then -1; a later one to topk ascending positions in [0, p].
bool selection_ok(const std::vector<std::int32_t> &sel, int first, int topk) {
    for (std::size_t r = 0; r < sel.size() / static_cast<std::size_t>(topk); ++r) {
        const int p = first + static_cast<int>(r);
        const std::int32_t *row = &sel[r * static_cast<std::size_t>(topk)];
        for (int j = 0; j < topk; ++j) {
            const bool ok = p < topk ? row[j] == (j <= p ? j : -1)
                                     : row[j] >= 0 && row[j] <= p && (j == 0 || row[j] > row[j - 1]);
            if (!ok) {
                std::cerr << "position " << p << " attended to";
                for (int k = 0; k < topk; ++k) std::cerr << ' ' << row[k];
                std::cerr << '\n';
                return false;
            }
        }
    }
    return true;
}

// DeepSeek-V3.2: the indexer's props, the pool option, and index_out over a
// 13-token prefill (past top-8: the last 5 tokens attend sparsely) and a
// decode step.
void test_model_v32(const mlart::Engine &engine, const std::string &dir) {
    const mlart::Model model = mlart::Model::load(engine, dir);
    const mlart::ModelInfo p = model.info();
    CHECK(p.index_n_heads == 4 && p.index_head_dim == 32 && p.index_topk == 8 && p.d_qk == 80,
          "props: index " << p.index_n_heads << " heads of " << p.index_head_dim << ", top-"
                          << p.index_topk << ", d_qk " << p.d_qk);
    const int topk = p.index_topk, n = 13;
    const std::size_t hid = static_cast<std::size_t>(p.hidden_size);
    mlart::KvPoolOptions po;
    po.d_qk = p.d_qk;
    po.num_layers = p.loaded_layers;
    po.block_size = 4;
    po.num_blocks = 16;
    mlart::KvPool plain = mlart::KvPool::create(engine, po);
    po.index_head_dim = p.index_head_dim;
    mlart::KvPool pool = mlart::KvPool::create(engine, po);
    const std::vector<float> x = random_floats((n + 1) * hid, false);
    std::vector<float> out(n * hid, kNaN), out2(n * hid, kNaN), step(hid, kNaN);
    plain.seq_create(1);
    pool.seq_create(1);
    pool.seq_create(2);

    EXPECT_ERROR(model.forward(plain, 0, 1, n, x.data(), out.data()),
                 mlart::Status::InvalidArgument, "index_head_dim");
    std::vector<std::int32_t> short_sel(static_cast<std::size_t>(n * topk - 1));
    EXPECT_ERROR(model.forward(pool, 0, 1, n, x.data(), out.data(), short_sel),
                 mlart::Status::InvalidArgument,
                 "index_out.size() = 103 is less than sum(n_tokens) * index_topk = 13 * 8 = 104");
    CHECK(pool.seq_length(1, 0) == 0 && plain.seq_length(1, 0) == 0,
          "failed forwards changed the pool");

    std::vector<std::int32_t> sel(static_cast<std::size_t>(n * topk), 12345);
    model.forward(pool, 0, 1, n, x.data(), out.data(), sel);
    CHECK(all_finite(out), "prefill output not finite");
    CHECK(selection_ok(sel, 0, topk), "prefill selections");
    // index_out only reports: the same tokens without it give the same output.
    model.forward(pool, 0, 2, n, x.data(), out2.data());
    CHECK(out2 == out, "index_out changed the output");

    std::vector<std::int32_t> step_sel(static_cast<std::size_t>(topk), 12345);
    model.forward(pool, 0, 1, 1, x.data() + n * hid, step.data(), step_sel.data());
    CHECK(all_finite(step) && pool.seq_length(1, 0) == n + 1, pool.seq_length(1, 0));
    CHECK(selection_ok(step_sel, n, topk), "decode selection");
    std::cout << "model v3.2: decode step at position " << n << " attended to";
    for (std::int32_t v : step_sel) std::cout << ' ' << v;
    std::cout << '\n';
}

}  // namespace

int main(int argc, char **argv) {
    std::cout.setf(std::ios::unitbuf);
    if (argc != 2 && argc != 3) {
        std::cerr << "usage: " << argv[0] << " <checkpoint dir> [<tiny-v3.2 checkpoint dir>]\n";
        return 2;
    }
    section("basics", test_basics);
    mlart::Engine engine;
    section("engine", [&] { engine = test_engine(); });
    if (engine) {
        section("paged", [&] { test_paged(engine); });
        section("pool", [&] { test_pool(engine); });
        section("model", [&] { test_model(engine, argv[1]); });
        if (argc == 3) section("model v3.2", [&] { test_model_v32(engine, argv[2]); });
    }
    section("moves", test_moves);
    if (g_failures != 0 || g_checks == 0) {
        std::cerr << "test_bindings_cpp: " << g_failures << " of " << g_checks
                  << " checks FAILED\n";
        return 1;
    }
    std::cout << "test_bindings_cpp: " << g_checks << " checks passed\n";
    return 0;
}
