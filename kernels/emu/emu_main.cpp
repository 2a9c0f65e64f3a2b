// Runs mlart's CUDA kernels (plan -> decode -> combine) on the CPU emulator
// (mla_emu.h) over random paged-cache problems and checks every output
// against a float64 reference written from the documented semantics.
//
// Cases cover every cache format and both head dimensions, q/out dtypes,
// dense varlen (zero-length sequences, NaN-poisoned unused slots), causal
// MTP, sparse indices with -1 entries and topk_length, an extra cache, the
// attention sink, head counts that are not multiples of 16, block sizes
// 1/16/64/100, sequences split across items (combine), and a bad block id
// (masked and reported). The projection kernels (mla_linear) run bf16 and
// FP8 weights with and without the activations' low part, token tails,
// key tails, K split across blocks, and grouped (per-head) products with the
// layouts MLA's absorbed steps use. The row steps of a device-resident layer
// (mla_rows: RMSNorm, RoPE, conversions and bf16 splits, strided and in
// place) run with buffers exactly their size. The V3.2 indexer (mla_index):
// the key scatter (distinct unsorted slots, untouched rows kept), the scores
// against a float64 reference (sequences sharing one pool through block
// tables, NaN/garbage in unused slots and blocks, block sizes 1/7/64, head
// counts that are not multiples of 16, dims 4/64/128, lengths around 128,
// padding between tokens kept), and the top-k against the host's choice,
// exactly (random scores, ties, signed zeros, infinities and NaNs, at most /
// exactly / one more than topk candidates and thousands, positions and
// slots together and alone). Exit status 0 when all pass.
//
//   c++ -std=c++17 -O1 -I kernels kernels/emu/emu_main.cpp -o emu && ./emu
#define MLA_EMULATE 1
#include "../mlart_kernels.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

std::mt19937_64 rng;

double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng); }
int irange(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }  // [lo, hi]
float sample() {
    double x = std::normal_distribution<double>(0.0, 0.1)(rng);
    return (float)std::max(-1.0, std::min(1.0, x));
}

// ---- independent element codecs ----
double bf16_val(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
double f16_val(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? std::ldexp((double)m, -24) : std::ldexp(1.0 + m / 1024.0, e - 15);
    return s ? -v : v;
}
double e4m3_val(uint8_t c) {
    int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
    return s ? -v : v;
}

int dt_size(int dt) { return dt == MLA_DT_F32 ? 4 : 2; }
// Stores x in dtype dt at bytes p; returns the stored value.
double put(uint8_t* p, int dt, float x) {
    if (dt == MLA_DT_F32) {
        memcpy(p, &x, 4);
        return x;
    }
    uint16_t b = dt == MLA_DT_BF16 ? __float2bfloat16_rn(x).bits : __float2half_rn(x).bits;
    memcpy(p, &b, 2);
    return dt == MLA_DT_BF16 ? bf16_val(b) : f16_val(b);
}
double get(const uint8_t* p, int dt) {
    if (dt == MLA_DT_F32) {
        float f;
        memcpy(&f, p, 4);
        return f;
    }
    uint16_t b;
    memcpy(&b, p, 2);
    return dt == MLA_DT_BF16 ? bf16_val(b) : f16_val(b);
}

// ---- cache layouts (FlashMLA's), independent of the kernels ----
struct Layout {
    int format, d_qk, bs;
    int64_t row_bytes() const {
        switch (format) {
            case MLA_KV_BF16: case MLA_KV_F16: return 2 * d_qk;
            case MLA_KV_F32: return 4 * d_qk;
            case MLA_KV_FP8_V32: return 656;
            default: return 584;
        }
    }
    int64_t block_bytes() const {
        if (format == MLA_KV_FP8_MODEL1) return ((int64_t)584 * bs + 575) / 576 * 576;
        return row_bytes() * bs;
    }
};

// Writes a random row into slot `s` of `block`; returns its values.
std::vector<double> write_row(const Layout& L, uint8_t* block, int s) {
    std::vector<double> v(L.d_qk);
    switch (L.format) {
        case MLA_KV_BF16: case MLA_KV_F16: case MLA_KV_F32: {
            int dt = L.format == MLA_KV_BF16 ? MLA_DT_BF16 : L.format == MLA_KV_F16 ? MLA_DT_F16 : MLA_DT_F32;
            for (int k = 0; k < L.d_qk; ++k)
                v[k] = put(block + s * L.row_bytes() + k * dt_size(dt), dt, sample());
            break;
        }
        case MLA_KV_FP8_V32: {
            uint8_t* r = block + s * 656;
            for (int t = 0; t < 4; ++t) {
                float scale = std::ldexp(1.0f, irange(-12, -4));
                memcpy(r + 512 + 4 * t, &scale, 4);
                for (int k = 0; k < 128; ++k) {
                    uint8_t c = (uint8_t)irange(0, 255);
                    if ((c & 0x7f) == 0x7f) c = 0x00;  // no NaN codes
                    r[t * 128 + k] = c;
                    v[t * 128 + k] = e4m3_val(c) * scale;
                }
            }
            for (int k = 0; k < 64; ++k) v[512 + k] = put(r + 528 + 2 * k, MLA_DT_BF16, sample());
            break;
        }
        default: {  // MODEL1
            uint8_t* r = block + s * 576;
            uint8_t* sc = block + L.bs * 576 + s * 8;
            for (int t = 0; t < 7; ++t) {
                int e = irange(115, 123);
                sc[t] = (uint8_t)e;
                double scale = std::ldexp(1.0, e - 127);
                for (int k = 0; k < 64; ++k) {
                    uint8_t c = (uint8_t)irange(0, 255);
                    if ((c & 0x7f) == 0x7f) c = 0x00;
                    r[t * 64 + k] = c;
                    v[t * 64 + k] = e4m3_val(c) * scale;
                }
            }
            sc[7] = 0;
            for (int k = 0; k < 64; ++k) v[448 + k] = put(r + 448 + 2 * k, MLA_DT_BF16, sample());
            break;
        }
    }
    return v;
}

// Fills slot `s` with NaN-like garbage (0xff bytes, scales included).
void poison_row(const Layout& L, uint8_t* block, int s) {
    if (L.format == MLA_KV_FP8_MODEL1) {
        memset(block + s * 576, 0xff, 576);
        memset(block + L.bs * 576 + s * 8, 0xff, 8);
    } else {
        memset(block + s * L.row_bytes(), 0xff, L.row_bytes());
    }
}

struct Cache {
    Layout L;
    int blocks;
    std::vector<uint8_t> bytes;
    std::vector<std::vector<double>> rows;  // [block * bs + slot], empty = poisoned
    void init(const Layout& l, int n) {
        L = l;
        blocks = n;
        bytes.assign((size_t)(L.block_bytes() * n), 0);
        rows.assign((size_t)n * L.bs, {});
        for (int b = 0; b < n; ++b)
            for (int s = 0; s < L.bs; ++s) poison_row(L, block(b), s);
    }
    uint8_t* block(int b) { return bytes.data() + (size_t)b * L.block_bytes(); }
    void fill(int pos) { rows[pos] = write_row(L, block(pos / L.bs), pos % L.bs); }
};

struct Case {
    std::string name;
    int batch = 1, s_q = 1, h_q = 16, d_qk = 576;
    int format = MLA_KV_BF16, bs = 64;
    int q_dt = MLA_DT_BF16, out_dt = MLA_DT_BF16;
    bool causal = false, sparse = false, sink = false, with_len = true, extra = false;
    bool bad_block = false;
    int rg = 1;  // row groups per block: 1 (16 rows, 4 warps) or 4 (64 rows, 8 warps)
    bool wg = false;  // rg = 4 on wgmma (the sm_90a kernels)
    std::vector<int> seqlens;  // dense lengths, or sparse live tokens per sequence
    int topk = 0, extra_topk = 0, extra_bs = 64;
    int parts = 4;
    double spread = 2.0;  // standard deviation of the score logits (softmax scale chosen for it)
};

struct Outcome {
    double max_err = 0;
    bool ok = true;
};

Outcome run(const Case& c) {
    Outcome res;
    const int d_qk = c.d_qk, d_v = 512;
    Layout L{c.format, d_qk, c.bs};
    const int groups = c.sparse ? c.batch * c.s_q : c.batch;
    const int R = c.sparse ? c.h_q : c.s_q * c.h_q;
    const int row_tiles = (R + 16 * c.rg - 1) / (16 * c.rg);
    const int max_items = groups + c.parts;

    // Queries.
    std::vector<uint8_t> q((size_t)c.batch * c.s_q * c.h_q * d_qk * dt_size(c.q_dt));
    std::vector<double> qv(q.size() / dt_size(c.q_dt));
    for (size_t i = 0; i < qv.size(); ++i) qv[i] = put(q.data() + i * dt_size(c.q_dt), c.q_dt, sample());
    std::vector<float> sink(c.h_q);
    for (int h = 0; h < c.h_q; ++h) sink[h] = h % 5 == 0 ? -INFINITY : (float)(uniform() * 4 - 2);

    // Caches, tables, indices.
    Cache main, xc;
    std::vector<int> table, seqlens, indices, topk_len, xind, xlen;
    int stride = 1;
    if (!c.sparse) {
        for (int l : c.seqlens) stride = std::max(stride, (l + c.bs - 1) / c.bs);
        stride += 1;
        int need = 0;
        for (int l : c.seqlens) need += (l + c.bs - 1) / c.bs;
        main.init(L, need + 2);
        std::vector<int> ids(need + 2);
        for (int i = 0; i < need + 2; ++i) ids[i] = i;
        std::shuffle(ids.begin(), ids.end(), rng);
        table.assign((size_t)c.batch * stride, -3);
        int next = 0;
        for (int b = 0; b < c.batch; ++b) {
            for (int j = 0; j < (c.seqlens[b] + c.bs - 1) / c.bs; ++j) table[b * stride + j] = ids[next++];
            for (int t = 0; t < c.seqlens[b]; ++t) main.fill(table[b * stride + t / c.bs] * c.bs + t % c.bs);
            seqlens.push_back(c.seqlens[b]);
        }
        if (c.bad_block) table[0] = 1 << 20;
    } else {
        int live = 0;
        for (int l : c.seqlens) live += l;
        int nb = (live + c.bs - 1) / c.bs + 2;
        main.init(L, nb);
        std::vector<int> pos;
        for (int p = 0; p < nb * c.bs; ++p)
            if (uniform() < 0.7) { main.fill(p); pos.push_back(p); }
        indices.resize((size_t)groups * c.topk);
        for (auto& x : indices) x = uniform() < 0.1 ? -1 : pos[irange(0, (int)pos.size() - 1)];
        for (int b = 0; b < c.batch; ++b) topk_len.push_back(b % 3 == 0 ? 0 : irange(0, c.topk));
        if (c.extra) {
            Layout XL{c.format, d_qk, c.extra_bs};
            int xb = 3;
            xc.init(XL, xb);
            std::vector<int> xpos;
            for (int p = 0; p < xb * c.extra_bs; ++p)
                if (uniform() < 0.7) { xc.fill(p); xpos.push_back(p); }
            xind.resize((size_t)groups * c.extra_topk);
            for (auto& x : xind) x = uniform() < 0.1 ? -1 : xpos[irange(0, (int)xpos.size() - 1)];
            for (int b = 0; b < c.batch; ++b) xlen.push_back(irange(0, c.extra_topk));
        }
    }

    // Workspace and outputs (NaN-poisoned).
    std::vector<int4> items(max_items);
    std::vector<int> part_first(c.parts + 1, -1);
    std::vector<int2> meta(groups);
    int num_items = -1, flags = 0;
    std::vector<float> part_o((size_t)max_items * R * d_v), part_lse((size_t)max_items * R);
    std::vector<uint8_t> out((size_t)c.batch * c.s_q * c.h_q * d_v * dt_size(c.out_dt), 0xff);
    std::vector<float> lse((size_t)c.batch * c.h_q * c.s_q, NAN);

    MlaParams p{};
    p.batch = c.batch; p.s_q = c.s_q; p.h_q = c.h_q; p.d_qk = d_qk; p.d_v = d_v;
    p.sparse = c.sparse; p.causal = c.causal; p.rows_per_group = R; p.num_groups = groups;
    // The softmax scale gives score logits a standard deviation of c.spread
    // over the first rows and keys: attention is then peaked, as in a model,
    // and a wrong score changes the output (at 1/sqrt(d_qk) these random
    // scores would be near zero and the attention near uniform, blind to them).
    double s2 = 0;
    int ns = 0;
    for (int r = 0; r < std::min(16, c.batch * c.s_q * c.h_q); ++r)
        for (size_t t = 0; t < main.rows.size() && ns < 16 * 64; ++t) {
            if (main.rows[t].empty()) continue;
            double d = 0;
            for (int k = 0; k < d_qk; ++k) d += qv[(size_t)r * d_qk + k] * main.rows[t][k];
            s2 += d * d;
            ++ns;
            if (ns % 64 == 0) break;
        }
    const float scale = ns > 0 && s2 > 0 ? (float)(c.spread / std::sqrt(s2 / ns)) : 1.f;
    p.scale_log2 = scale * 1.4426950408889634f;
    p.q_dtype = c.q_dt; p.out_dtype = c.out_dt; p.kv_format = c.format;
    p.num_blocks = main.blocks; p.block_size = c.bs; p.bt_stride = stride;
    p.block_bytes = L.block_bytes();
    p.parts = c.parts; p.max_items = max_items;
    p.q = q.data(); p.kv = main.bytes.data();
    p.block_table = table.empty() ? nullptr : table.data();
    p.seqlens = seqlens.empty() ? nullptr : seqlens.data();
    if (c.sparse) {
        p.indices = indices.data(); p.topk = c.topk;
        p.topk_length = c.with_len ? topk_len.data() : nullptr;
        if (c.extra) {
            p.extra_kv = xc.bytes.data(); p.extra_num_blocks = xc.blocks; p.extra_block_size = c.extra_bs;
            p.extra_block_bytes = xc.L.block_bytes();
            p.extra_indices = xind.data(); p.extra_topk = c.extra_topk; p.extra_topk_length = xlen.data();
        }
    }
    p.sink = c.sink ? sink.data() : nullptr;
    p.out = out.data(); p.lse = lse.data();
    p.items = items.data(); p.group_meta = meta.data(); p.num_items = &num_items;
    p.part_o = part_o.data(); p.part_lse = part_lse.data(); p.error_flags = &flags;
    p.part_first = part_first.data();

    emu::launch(mla_plan, {1, 1, 1}, {MLA_PLAN_THREADS, 1, 1}, 0, p);
    auto kernel = mla_decode_bf16_d576;
    struct K { int f, d; void (*k)(MlaParams); void (*k64)(MlaParams); void (*kwg)(MlaParams); };
#define MLA_EMU_K(F, D, NAME) {F, D, NAME, NAME##_m64, NAME##_wg}
    const K ks[] = {MLA_EMU_K(MLA_KV_BF16, 576, mla_decode_bf16_d576),
                    MLA_EMU_K(MLA_KV_BF16, 512, mla_decode_bf16_d512),
                    MLA_EMU_K(MLA_KV_F16, 576, mla_decode_f16_d576),
                    MLA_EMU_K(MLA_KV_F16, 512, mla_decode_f16_d512),
                    MLA_EMU_K(MLA_KV_F32, 576, mla_decode_f32_d576),
                    MLA_EMU_K(MLA_KV_F32, 512, mla_decode_f32_d512),
                    MLA_EMU_K(MLA_KV_FP8_V32, 576, mla_decode_fp8v32_d576),
                    MLA_EMU_K(MLA_KV_FP8_MODEL1, 512, mla_decode_fp8model1_d512)};
    for (auto& k : ks)
        if (k.f == c.format && k.d == d_qk) kernel = c.wg ? k.kwg : c.rg == 4 ? k.k64 : k.k;
    uint32_t smem = 0;
#define MLA_EMU_SMEM(KVF, D)                                                                      \
    if (c.format == KVF && d_qk == D)                                                            \
        smem = c.wg ? mla::Smem<D, 4, KVF, true>::BYTES                                          \
                    : c.rg == 4 ? mla::Smem<D, 4, KVF>::BYTES : mla::Smem<D, 1, KVF>::BYTES;
    MLA_EMU_SMEM(MLA_KV_BF16, 576) MLA_EMU_SMEM(MLA_KV_BF16, 512)
    MLA_EMU_SMEM(MLA_KV_F16, 576) MLA_EMU_SMEM(MLA_KV_F16, 512)
    MLA_EMU_SMEM(MLA_KV_F32, 576) MLA_EMU_SMEM(MLA_KV_F32, 512)
    MLA_EMU_SMEM(MLA_KV_FP8_V32, 576) MLA_EMU_SMEM(MLA_KV_FP8_MODEL1, 512)
    // The parts: every item dealt out once, in order.
    if (part_first[0] != 0 || part_first[c.parts] != num_items) {
        printf("  %s: part_first[0] = %d, part_first[parts] = %d (items %d)\n", c.name.c_str(),
               part_first[0], part_first[c.parts], num_items);
        res.ok = false;
        return res;
    }
    for (int q = 0; q < c.parts; ++q)
        if (part_first[q] > part_first[q + 1]) {
            printf("  %s: part_first not monotone at %d\n", c.name.c_str(), q);
            res.ok = false;
            return res;
        }
    emu::launch(kernel, {(unsigned)(c.rg == 4 ? max_items : c.parts), (unsigned)row_tiles, 1},
                {(unsigned)(c.rg == 4 ? mla::Shape<4>::THREADS : mla::Shape<1>::THREADS), 1, 1}, smem, p);
    emu::launch(mla_combine, {(unsigned)groups, (unsigned)((R + 3) / 4), 1}, {32 * MLA_COMBINE_ROWS, 1, 1}, 0, p);

    if (c.bad_block) {
        if (!(flags & MLA_ERR_BLOCK_ID)) {
            printf("  %s: bad block id not reported (flags %d)\n", c.name.c_str(), flags);
            res.ok = false;
        }
        return res;  // outputs are unspecified; the point is no crash and the report
    }
    if (flags != 0) {
        printf("  %s: unexpected error flags %d\n", c.name.c_str(), flags);
        res.ok = false;
    }
    if (num_items < groups || num_items > max_items) {
        printf("  %s: num_items %d outside [%d, %d]\n", c.name.c_str(), num_items, groups, max_items);
        res.ok = false;
        return res;
    }

    // Reference, per group and row.
    for (int g = 0; g < groups; ++g) {
        const int b = c.sparse ? g / c.s_q : g;
        std::vector<const std::vector<double>*> keys;
        if (!c.sparse) {
            for (int t = 0; t < seqlens[b]; ++t)
                keys.push_back(&main.rows[table[b * stride + t / c.bs] * c.bs + t % c.bs]);
        } else {
            int n = c.with_len ? topk_len[b] : c.topk;
            for (int j = 0; j < n; ++j) {
                int x = indices[(size_t)g * c.topk + j];
                keys.push_back(x < 0 ? nullptr : &main.rows[x]);
            }
            if (c.extra)
                for (int j = 0; j < xlen[b]; ++j) {
                    int x = xind[(size_t)g * c.extra_topk + j];
                    keys.push_back(x < 0 ? nullptr : &xc.rows[x]);
                }
        }
        double num = 0, den = 0;
        for (int r = 0; r < R; ++r) {
            const int i = c.sparse ? g % c.s_q : r / c.h_q;
            const int h = c.sparse ? r : r % c.h_q;
            const size_t qrow = ((size_t)(b * c.s_q + i) * c.h_q + h);
            int limit = (int)keys.size();
            if (!c.sparse && c.causal) limit = seqlens[b] - (c.s_q - 1 - i);
            std::vector<double> sc;
            double term_norm = 0;  // largest L2 norm of a logit's d_qk terms
            std::vector<const std::vector<double>*> used;
            for (int t = 0; t < limit; ++t) {
                if (!keys[t]) continue;
                if (keys[t]->empty()) {
                    printf("  %s: reference reads a poisoned slot\n", c.name.c_str());
                    res.ok = false;
                    return res;
                }
                double d = 0, d2 = 0;
                for (int k = 0; k < d_qk; ++k) {
                    const double x = qv[qrow * d_qk + k] * (*keys[t])[k];
                    d += x;
                    d2 += x * x;
                }
                sc.push_back(d * scale);
                term_norm = std::max(term_norm, std::sqrt(d2) * scale);
                used.push_back(keys[t]);
            }
            std::vector<double> o(d_v, 0.0);
            double l = INFINITY;
            if (!sc.empty()) {
                double m = *std::max_element(sc.begin(), sc.end()), s = 0;
                for (double x : sc) s += std::exp(x - m);
                for (size_t t = 0; t < sc.size(); ++t) {
                    double w = std::exp(sc[t] - m) / s;
                    for (int k = 0; k < d_v; ++k) o[k] += w * (*used[t])[k];
                }
                l = m + std::log(s);
                if (c.sink) {
                    double f = 1.0 / (1.0 + std::exp((double)sink[h] - l));
                    for (auto& x : o) x *= f;
                }
            }
            const uint8_t* got = out.data() + qrow * d_v * dt_size(c.out_dt);
            bool all_zero = true;
            for (int k = 0; k < d_v; ++k) {
                double y = get(got + k * dt_size(c.out_dt), c.out_dt);
                if (!std::isfinite(y)) {
                    printf("  %s: out[g %d][row %d][%d] = %g not finite\n", c.name.c_str(), g, r, k, y);
                    res.ok = false;
                    return res;
                }
                all_zero = all_zero && y == 0.0;
                num += (y - o[k]) * (y - o[k]);
                den += o[k] * o[k];
            }
            if (sc.empty() && !all_zero) {
                printf("  %s: group %d row %d sees no key but is not 0\n", c.name.c_str(), g, r);
                res.ok = false;
            }
            float gl = lse[((size_t)b * c.h_q + h) * c.s_q + i];
            // Logits come from bf16 operands: each term's relative error is up
            // to 2^-8 per rounded operand (std ~2.5e-3 for two), so a logit's
            // error scales with the L2 norm of its terms; allow about 6 sigma.
            const double tol = 2e-2 + 1.5e-2 * std::max(std::fabs(l), term_norm);
            if (sc.empty() ? gl != INFINITY : !(std::fabs(gl - l) <= tol)) {
                printf("  %s: lse[b %d][h %d][i %d] = %g, want %g (%zu keys, tolerance %.3g)\n", c.name.c_str(), b, h, i, gl, l, sc.size(), tol);
                res.ok = false;
            }
        }
        double e = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
        res.max_err = std::max(res.max_err, e);
        if (!(e <= 1e-2)) {
            printf("  %s: group %d rel L2 %.3e\n", c.name.c_str(), g, e);
            res.ok = false;
        }
    }
    return res;
}

// ---- mla_append against an independent encoder ----
uint8_t ref_e4m3(float x) {
    // Nearest of the 127 finite magnitudes, ties to the even code.
    uint8_t sign = std::signbit(x) ? 0x80 : 0;
    double a = std::fabs((double)x);
    if (a >= 448.0) return sign | 0x7e;
    int best = 0;
    double bd = 1e300;
    for (int c = 0; c <= 0x7e; ++c) {
        double d = std::fabs(e4m3_val((uint8_t)c) - a);
        if (d < bd || (d == bd && (c & 1) == 0)) {
            bd = d;
            best = c;
        }
    }
    return sign | (uint8_t)best;
}

float ref_scale(float amax) {
    float v = std::max(amax / 448.0f, 1e-4f);
    int e;
    float m = std::frexp(v, &e);  // v = m * 2^e, m in [0.5, 1)
    return std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
}

// Writes `vals` (one row) into slot `pos` of `cache` the way the host does.
void ref_store(const Layout& L, std::vector<uint8_t>& cache, int pos, const std::vector<float>& vals) {
    uint8_t* block = cache.data() + (size_t)(pos / L.bs) * L.block_bytes();
    int s = pos % L.bs;
    if (L.format == MLA_KV_BF16 || L.format == MLA_KV_F16 || L.format == MLA_KV_F32) {
        int dt = L.format == MLA_KV_BF16 ? MLA_DT_BF16 : L.format == MLA_KV_F16 ? MLA_DT_F16 : MLA_DT_F32;
        for (int k = 0; k < L.d_qk; ++k) put(block + s * L.row_bytes() + k * dt_size(dt), dt, vals[k]);
        return;
    }
    bool v32 = L.format == MLA_KV_FP8_V32;
    int nope = v32 ? 512 : 448, tile = v32 ? 128 : 64;
    uint8_t* row = block + s * (v32 ? 656 : 576);
    for (int t = 0; t < nope / tile; ++t) {
        float amax = 0;
        for (int k = 0; k < tile; ++k) amax = std::max(amax, std::fabs(vals[t * tile + k]));
        float scale = ref_scale(amax);
        for (int k = 0; k < tile; ++k) row[t * tile + k] = ref_e4m3(vals[t * tile + k] / scale);
        if (v32) {
            memcpy(row + 512 + 4 * t, &scale, 4);
        } else {
            int e;
            std::frexp(scale, &e);
            block[L.bs * 576 + s * 8 + t] = (uint8_t)(e - 1 + 127);
        }
    }
    if (!v32) block[L.bs * 576 + s * 8 + 7] = 0;
    for (int k = 0; k < 64; ++k) put(row + (v32 ? 528 : 448) + 2 * k, MLA_DT_BF16, vals[nope + k]);
}

bool run_append(int format, int src_dt) {
    const int d_qk = format == MLA_KV_FP8_MODEL1 || (format != MLA_KV_FP8_V32 && src_dt == MLA_DT_F16) ? 512 : 576;
    const int bs = format == MLA_KV_FP8_MODEL1 ? 3 : 16;
    Layout L{format, d_qk, bs};
    const int blocks = 4, n = 7;
    std::vector<uint8_t> got((size_t)L.block_bytes() * blocks, 0), want = got;
    std::vector<int> slots;
    std::vector<int> all(blocks * bs);
    for (int i = 0; i < blocks * bs; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    for (int i = 0; i < n; ++i) slots.push_back(i == 3 ? -1 : all[i]);
    std::vector<uint8_t> src((size_t)n * d_qk * dt_size(src_dt));
    for (int i = 0; i < n; ++i) {
        std::vector<float> vals(d_qk);
        for (int k = 0; k < d_qk; ++k) {
            float x = sample();
            if (i == 1) x *= 5000.f;                       // saturating tiles / big scales
            if (i == 2) x *= 1e-7f;                        // the scale floor, subnormal codes
            if (i == 4 && k < 128) x = 0.f;                // an all-zero tile
            if (i == 5 && k % 37 == 0) x = 448.f * (k % 2 ? 1 : -1);
            put(src.data() + ((size_t)i * d_qk + k) * dt_size(src_dt), src_dt, x);
            vals[k] = (float)get(src.data() + ((size_t)i * d_qk + k) * dt_size(src_dt), src_dt);
        }
        if (slots[i] >= 0) ref_store(L, want, slots[i], vals);
    }
    MlaAppendParams ap{};
    ap.n_rows = n;
    ap.d_qk = d_qk;
    ap.src_dtype = src_dt;
    ap.kv_format = format;
    ap.block_size = bs;
    ap.block_bytes = L.block_bytes();
    ap.src = src.data();
    ap.slots = slots.data();
    ap.kv = got.data();
    emu::launch(mla_append, {(unsigned)n, 1, 1}, {MLA_APPEND_THREADS, 1, 1}, 0, ap);
    for (size_t b = 0; b < got.size(); ++b) {
        if (got[b] != want[b]) {
            printf("  append f%d src dt %d: byte %zu = %#x, want %#x\n", format, src_dt, b, got[b], want[b]);
            return false;
        }
    }
    return true;
}

std::vector<int> lengths(int batch, int max, int bs) {
    std::vector<int> v;
    const int special[] = {0, 1, bs, bs + 1, max};
    for (int b = 0; b < batch; ++b) v.push_back(b < 5 && uniform() < 0.5 ? std::min(special[b], max) : irange(0, max));
    return v;
}

// ---- the wgmma probe against host products ----
// Small integers in bf16, so every product and sum is exact in f32.
bool run_probe() {
    std::vector<uint16_t> q(64 * 64), k(32 * 256), p(64 * 32);
    std::vector<float> qf(q.size()), kf(k.size()), pf(p.size());
    auto fill = [](std::vector<uint16_t>& v, std::vector<float>& f) {
        for (size_t i = 0; i < v.size(); ++i) {
            f[i] = (float)irange(-4, 4);
            v[i] = __float2bfloat16_rn(f[i]).bits;
        }
    };
    fill(q, qf);
    fill(k, kf);
    fill(p, pf);
    std::vector<float> s(64 * 32, NAN), o(64 * 256, NAN);
    MlaProbeParams a{q.data(), k.data(), p.data(), s.data(), o.data()};
    emu::launch(mla_wgmma_probe, {1, 1, 1}, {MLA_PROBE_THREADS, 1, 1}, MLA_PROBE_SMEM, a);
    int bad = 0;
    for (int r = 0; r < 64; ++r) {
        for (int j = 0; j < 32; ++j) {
            float want = 0;
            for (int d = 0; d < 64; ++d) want += qf[r * 64 + d] * kf[j * 256 + d];
            bad += s[r * 32 + j] != want;
        }
        for (int c = 0; c < 256; ++c) {
            float want = 0;
            for (int t = 0; t < 32; ++t) want += pf[r * 32 + t] * kf[t * 256 + c];
            bad += o[r * 256 + c] != want;
        }
    }
    if (bad) printf("  wgmma probe: %d of %d outputs differ from the host products\n", bad, 64 * 288);
    return bad == 0;
}

// ---- the projections (mla_linear) against a float64 product ----
struct LinearCase {
    std::string name;
    int T, N, K, G = 1;
    bool fp8 = false, lo = true;
    int mf = 1, k_split = 1;
    int64_t w_row0 = 0, w_group_rows = 0;  // 0: N (groups back to back)
    int rdiv = 128, kdiv = 128;
};

bool run_linear(const LinearCase& c) {
    const int64_t grows = c.w_group_rows ? c.w_group_rows : c.N;
    const int64_t rows = c.w_row0 + (c.G - 1) * grows + c.N + 3;  // a few rows no group reads
    const int es = c.fp8 ? 1 : 2;
    std::vector<uint8_t> w((size_t)rows * c.K * es);
    std::vector<double> wv((size_t)rows * c.K);
    for (size_t i = 0; i < wv.size(); ++i) {
        if (c.fp8) {
            uint8_t code;
            do code = (uint8_t)irange(0, 255);
            while ((code & 0x7f) == 0x7f);  // no NaN codes
            w[i] = code;
            wv[i] = e4m3_val(code);
        } else {
            wv[i] = put(&w[2 * i], MLA_DT_BF16, sample());
        }
    }
    const int scols = (c.K + c.kdiv - 1) / c.kdiv;
    const int64_t srows = (rows + c.rdiv - 1) / c.rdiv;
    std::vector<float> scales((size_t)(srows * scols));
    for (auto& s : scales) s = (float)(std::ldexp(0.5 + uniform(), irange(-10, 2)));
    std::vector<uint16_t> hi((size_t)c.T * c.G * c.K), lo(hi.size());
    std::vector<double> xv(hi.size());
    for (size_t i = 0; i < hi.size(); ++i) {
        float x = sample() * (i % 7 == 0 ? 300.f : 1.f);
        hi[i] = __float2bfloat16_rn(x).bits;
        lo[i] = __float2bfloat16_rn(x - (float)bf16_val(hi[i])).bits;
        xv[i] = bf16_val(hi[i]) + (c.lo ? bf16_val(lo[i]) : 0.0);
    }
    const int64_t TGN = (int64_t)c.T * c.G * c.N;
    std::vector<float> y((size_t)TGN, NAN), partial((size_t)(TGN * c.k_split), NAN);
    MlaLinearParams p{};
    p.tokens = c.T;
    p.n_out = c.N;
    p.k_in = c.K;
    p.groups = c.G;
    p.k_split = c.k_split;
    p.k_chunk = ((c.K + c.k_split - 1) / c.k_split + MLA_LINEAR_STEP - 1) / MLA_LINEAR_STEP * MLA_LINEAR_STEP;
    p.m_tiles = (c.T + 16 * c.mf - 1) / (16 * c.mf);
    p.scale_rdiv = c.rdiv;
    p.scale_kdiv = c.kdiv;
    p.scale_cols = scols;
    p.w_group_rows = grows;
    p.w_row0 = c.w_row0;
    p.x_hi = hi.data();
    p.x_lo = c.lo ? lo.data() : nullptr;
    p.w = w.data();
    p.scales = scales.data();
    p.y = y.data();
    p.partial = partial.data();
    void (*k)(MlaLinearParams) = c.fp8 ? (c.mf == 1 ? mla_linear_fp8_m1 : mla_linear_fp8_m4)
                                       : (c.mf == 1 ? mla_linear_bf16_m1 : mla_linear_bf16_m4);
    emu::launch(k, {(unsigned)((c.N + MLA_LINEAR_COLS - 1) / MLA_LINEAR_COLS), (unsigned)(p.m_tiles * c.k_split),
                    (unsigned)c.G},
                {MLA_LINEAR_THREADS, 1, 1}, 0, p);
    if (c.k_split > 1)
        emu::launch(mla_linear_reduce, {(unsigned)((TGN + MLA_REDUCE_THREADS - 1) / MLA_REDUCE_THREADS), 1, 1},
                    {MLA_REDUCE_THREADS, 1, 1}, 0, p);
    double worst = 0;
    for (int t = 0; t < c.T; ++t)
        for (int g = 0; g < c.G; ++g)
            for (int n = 0; n < c.N; ++n) {
                const int64_t row = c.w_row0 + g * grows + n;
                double want = 0, mag = 0;
                for (int k = 0; k < c.K; ++k) {
                    double s = c.fp8 ? scales[(size_t)((row / c.rdiv) * scols + k / c.kdiv)] : 1.0;
                    double term = xv[((size_t)t * c.G + g) * c.K + k] * wv[(size_t)row * c.K + k] * s;
                    want += term;
                    mag += std::fabs(term);
                }
                const double got = y[((size_t)t * c.G + g) * c.N + n];
                const double err = std::fabs(got - want) / (mag + 1e-30);
                if (!(err <= 1e-5)) {
                    printf("  %s: y[t %d, g %d, n %d] = %.9g, want %.9g\n", c.name.c_str(), t, g, n, got, want);
                    return false;
                }
                worst = std::max(worst, err);
            }
    printf("ok   linear %s (max error %.1e of the terms' magnitude)\n", c.name.c_str(), worst);
    return true;
}

// ---- the row steps (mla_rows) against a float64 reference ----
struct RowsCase {
    std::string name;
    int rows, cols, src_stride, src_col0 = 0;
    int src_dtype = MLA_DT_F32;
    bool norm = false, rope = false;
    int rows_per_token = 1;
    int dst = 0;  // 0: none, 1: in place (f32, src's stride and columns), 2: separate
    int dst_dtype = MLA_DT_F32, dst_stride = 0, dst_col0 = 0;
    bool hi = false, lo = false;
    unsigned grid = 0;  // 0: one block per row
};

bool run_rows(const RowsCase& c) {
    const int tokens = (c.rows + c.rows_per_token - 1) / c.rows_per_token;
    // Buffers exactly as large as the step may touch (AddressSanitizer
    // catches a read or write past them).
    const size_t src_len = (size_t)(c.rows - 1) * c.src_stride + c.src_col0 + c.cols;
    std::vector<float> src(src_len), norm(c.cols), cs((size_t)tokens * c.cols);
    for (auto& v : src) v = sample() * (uniform() < 0.1 ? 30.f : 1.f);
    // A bf16/f16 source (the caller's hidden states): its values as stored.
    const int ses = dt_size(c.src_dtype);
    std::vector<uint8_t> src_bytes(c.src_dtype == MLA_DT_F32 ? 0 : src_len * ses);
    if (!src_bytes.empty())
        for (size_t i = 0; i < src_len; ++i) src[i] = (float)put(&src_bytes[i * ses], c.src_dtype, src[i]);
    for (auto& v : norm) v = 0.5f + (float)uniform();
    for (int t = 0; t < tokens; ++t)
        for (int i = 0; i < c.cols / 2; ++i) {
            const double a = uniform() * 6.28, sc = 0.9 + 0.2 * uniform();
            cs[(size_t)t * c.cols + 2 * i] = (float)(std::cos(a) * sc);
            cs[(size_t)t * c.cols + 2 * i + 1] = (float)(std::sin(a) * sc);
        }
    const float eps = 1e-6f;
    // The reference, from the inputs as they are before the step.
    std::vector<double> want((size_t)c.rows * c.cols);
    std::vector<double> scale(c.rows);
    for (int r = 0; r < c.rows; ++r) {
        const float* x = &src[(size_t)r * c.src_stride + c.src_col0];
        double inv = 1.0, mag = 0;
        if (c.norm) {
            double ss = 0;
            for (int k = 0; k < c.cols; ++k) ss += (double)x[k] * x[k];
            inv = 1.0 / std::sqrt(ss / c.cols + eps);
        }
        for (int i = 0; i < c.cols / 2; ++i) {
            double a = x[2 * i], b = x[2 * i + 1];
            if (c.norm) {
                a *= inv * norm[2 * i];
                b *= inv * norm[2 * i + 1];
            }
            if (c.rope) {
                const float* t = &cs[(size_t)(r / c.rows_per_token) * c.cols + 2 * i];
                const double ra = a * t[0] - b * t[1], rb = a * t[1] + b * t[0];
                a = ra;
                b = rb;
            }
            want[(size_t)r * c.cols + 2 * i] = a;
            want[(size_t)r * c.cols + 2 * i + 1] = b;
            mag = std::max(mag, std::max(std::fabs(a), std::fabs(b)));
        }
        scale[r] = mag;
    }
    const int es = dt_size(c.dst_dtype);
    std::vector<uint8_t> dst;
    if (c.dst == 2) dst.assign(((size_t)(c.rows - 1) * c.dst_stride + c.dst_col0 + c.cols) * es, 0xff);
    std::vector<uint16_t> hi(c.hi ? (size_t)c.rows * c.cols : 0, 0xffff), lo(c.lo ? hi.size() : 0, 0xffff);
    MlaRowsParams p{};
    p.rows = c.rows;
    p.cols = c.cols;
    p.src_stride = c.src_stride;
    p.dst_stride = c.dst == 1 ? c.src_stride : c.dst_stride;
    p.dst_dtype = c.dst == 1 ? MLA_DT_F32 : c.dst_dtype;
    p.rows_per_token = c.rows_per_token;
    p.rope = c.rope;
    p.eps = eps;
    p.src_dtype = c.src_dtype;
    p.src = src_bytes.empty() ? (const void*)(src.data() + c.src_col0)
                              : (const void*)(src_bytes.data() + (size_t)c.src_col0 * ses);
    p.norm = c.norm ? norm.data() : nullptr;
    p.cos_sin = c.rope ? cs.data() : nullptr;
    p.dst = c.dst == 1 ? (void*)(src.data() + c.src_col0)
          : c.dst == 2 ? (void*)(dst.data() + (size_t)c.dst_col0 * es)
                       : nullptr;
    p.hi = c.hi ? hi.data() : nullptr;
    p.lo = c.lo ? lo.data() : nullptr;
    emu::launch(mla_rows, {c.grid ? c.grid : (unsigned)c.rows, 1, 1}, {MLA_ROWS_THREADS, 1, 1}, 0, p);
    double worst = 0;
    for (int r = 0; r < c.rows; ++r)
        for (int k = 0; k < c.cols; ++k) {
            const double w = want[(size_t)r * c.cols + k], tiny = 1e-30 + scale[r];
            auto check = [&](const char* what, double got, double rel) {
                const double err = std::fabs(got - w) / (std::fabs(w) + 1e-3 * tiny);
                if (!(err <= rel)) {
                    printf("  rows %s: %s[%d][%d] = %.9g, want %.9g\n", c.name.c_str(), what, r, k, got, w);
                    return false;
                }
                worst = std::max(worst, err);
                return true;
            };
            if (c.dst == 1 && !check("dst", src[(size_t)r * c.src_stride + c.src_col0 + k], 2e-6)) return false;
            if (c.dst == 2) {
                const uint8_t* e = &dst[((size_t)r * c.dst_stride + c.dst_col0 + k) * es];
                double got;
                if (es == 4) {
                    float f;
                    memcpy(&f, e, 4);
                    got = f;
                } else if (c.dst_dtype == MLA_DT_F16) {
                    got = f16_val((uint16_t)(e[0] | e[1] << 8));
                } else {
                    got = bf16_val((uint16_t)(e[0] | e[1] << 8));
                }
                const double rel = es == 4 ? 2e-6 : c.dst_dtype == MLA_DT_F16 ? 1.0 / 2048 : 1.0 / 256;
                if (!check("dst", got, rel)) return false;
            }
            const size_t i = (size_t)r * c.cols + k;
            if (c.hi && !check("hi", bf16_val(hi[i]), 1.0 / 256)) return false;
            // hi + lo holds 16 significant bits: within 2^-16 of the value.
            if (c.lo && !check("hi+lo", bf16_val(hi[i]) + bf16_val(lo[i]), 1.0 / 65536 + 2e-6)) return false;
        }
    // Only the addressed columns of a strided dst are written.
    if (c.dst == 2)
        for (int r = 0; r + 1 < c.rows; ++r)
            for (int k = c.cols; k < c.dst_stride; ++k) {
                const uint8_t* e = &dst[((size_t)r * c.dst_stride + c.dst_col0 + k) * es];
                if (e[0] != 0xff || e[1] != 0xff) {
                    printf("  rows %s: wrote dst[%d][%d], outside the step's columns\n", c.name.c_str(), r, k);
                    return false;
                }
            }
    printf("ok   rows %s (max error %.1e)\n", c.name.c_str(), worst);
    return true;
}

std::vector<RowsCase> rows_cases() {
    std::vector<RowsCase> v;
    RowsCase c;
    // q_a's output: RMSNorm, then the bf16 parts for q_b.
    c = {"norm -> hi+lo", 5, 1536, 1536};
    c.norm = c.hi = c.lo = true;
    v.push_back(c);
    // The latent KV: RMSNorm of c in place, then RoPE of k_pe in place.
    c = {"norm in place (strided, 2 blocks for 5 rows)", 5, 512, 576};
    c.norm = true;
    c.dst = 1;
    c.grid = 2;
    v.push_back(c);
    c = {"rope in place (columns 512..575)", 4, 64, 576, 512};
    c.rope = true;
    c.dst = 1;
    v.push_back(c);
    // The queries' rope part into the bf16 queries, 3 heads a token.
    c = {"rope -> bf16 columns 96.. of 160, 3 rows a token", 9, 64, 100, 36};
    c.rope = true;
    c.rows_per_token = 3;
    c.dst = 2;
    c.dst_dtype = MLA_DT_BF16;
    c.dst_stride = 160;
    c.dst_col0 = 96;
    v.push_back(c);
    // The latent queries into the f32 queries' first columns.
    c = {"convert -> f32 columns 0..95 of 160", 6, 96, 96};
    c.dst = 2;
    c.dst_stride = 160;
    v.push_back(c);
    // q_nope's parts (a column range), o's parts (a row wider than a block's pairs).
    c = {"split columns 0..39 of 64", 7, 40, 64};
    c.hi = c.lo = true;
    v.push_back(c);
    c = {"split hi only, 1100 columns", 3, 1100, 1100};
    c.hi = true;
    v.push_back(c);
    // The caller's bf16 and f16 hidden states into the bf16 parts.
    c = {"split from bf16", 4, 300, 300};
    c.src_dtype = MLA_DT_BF16;
    c.hi = c.lo = true;
    v.push_back(c);
    c = {"split from f16", 4, 300, 300};
    c.src_dtype = MLA_DT_F16;
    c.hi = c.lo = true;
    v.push_back(c);
    // The output rows into the caller's f16 out.
    c = {"convert -> f16", 3, 200, 200};
    c.dst = 2;
    c.dst_dtype = MLA_DT_F16;
    c.dst_stride = 200;
    v.push_back(c);
    return v;
}

std::vector<LinearCase> linear_cases() {
    std::vector<LinearCase> v;
    for (int fp8 = 0; fp8 < 2; ++fp8)
        for (int lo = 0; lo < 2; ++lo) {
            const int k16 = fp8 ? 16 : 8;  // the K granularity each weight type needs
            auto add = [&](LinearCase c) {
                c.fp8 = fp8;
                c.lo = lo;
                c.name = std::string(fp8 ? "fp8" : "bf16") + (lo ? " hi+lo " : " hi ") + c.name;
                v.push_back(c);
            };
            add({"decode T1 N72 K320 split3", 1, 72, 320, 1, false, true, 1, 3});
            add({"T5 N40 K96 (key tail)", 5, 40, 96});
            add({"T37 N33 m4", 37, 33, 208 - 8 * (k16 == 8)});
            add({"T70 N64 K256 m4 split2", 70, 64, 256, 1, false, true, 4, 2});
            add({"T17 N31 K128 m1", 17, 31, 128});
            // W_UV: three heads' rows inside kv_b (nope 16, v 32), scales by absolute row.
            add({"groups W_UV-like G3 T3", 3, 32, 128, 3, false, true, 1, 1, 16, 48});
            // W_UK: a transposed copy, scales per row and 64 keys.
            add({"groups W_UK-like G4 T20 m4", 20, 64, 48, 4, false, true, 4, 1, 0, 64, 1, 64});
            add({"groups G2 T2 split2", 2, 24, 192, 2, false, true, 1, 2, 5, 30, 128, 64});
        }
    return v;
}

// ---- the V3.2 indexer (mla_index): scatter, scores and top-k ----
// Buffers are exactly the size the kernels may touch (AddressSanitizer
// catches a read or write past them); what they must not write is poisoned.

struct IndexScatterCase {
    std::string name;
    int rows, row_words, dst_rows;
    unsigned grid = 0;  // 0: one thread per word (capped as the host caps it)
};

bool run_index_scatter(const IndexScatterCase& c) {
    const uint32_t poison = 0xdeadbeefu;
    std::vector<uint32_t> src((size_t)c.rows * c.row_words);
    for (auto& v : src) {
        v = (uint32_t)rng();
        if (v == poison) v ^= 1;
    }
    // Distinct destination rows in no particular order.
    std::vector<int32_t> perm(c.dst_rows);
    for (int i = 0; i < c.dst_rows; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> slots(perm.begin(), perm.begin() + c.rows);
    // Every seventh row is skipped (slot -1, as the append kernel skips).
    for (int r = 3; r < c.rows; r += 7) slots[r] = -1;
    std::vector<uint32_t> dst((size_t)c.dst_rows * c.row_words, poison);
    MlaScatterParams p{};
    p.rows = c.rows;
    p.row_words = c.row_words;
    p.src = src.data();
    p.slots = slots.data();
    p.dst = dst.data();
    const int64_t words = (int64_t)c.rows * c.row_words;
    const unsigned grid =
        c.grid ? c.grid
               : (unsigned)std::min<int64_t>((words + MLA_INDEX_SCATTER_THREADS - 1) / MLA_INDEX_SCATTER_THREADS, 65535);
    emu::launch(mla_index_scatter, {grid, 1, 1}, {MLA_INDEX_SCATTER_THREADS, 1, 1}, 0, p);
    std::vector<int> from(c.dst_rows, -1);
    for (int r = 0; r < c.rows; ++r)
        if (slots[r] >= 0) from[slots[r]] = r;
    for (int d = 0; d < c.dst_rows; ++d)
        for (int k = 0; k < c.row_words; ++k) {
            const uint32_t got = dst[(size_t)d * c.row_words + k];
            const uint32_t want = from[d] < 0 ? poison : src[(size_t)from[d] * c.row_words + k];
            if (got != want) {
                printf("  index %s: dst row %d word %d = %08x, want %08x (%s)\n", c.name.c_str(), d, k, got, want,
                       from[d] < 0 ? "untouched" : "scattered");
                return false;
            }
        }
    printf("ok   index %s (every destination word exact)\n", c.name.c_str());
    return true;
}

std::vector<IndexScatterCase> index_scatter_cases() {
    return {
        {"scatter 1 row of 33 words", 1, 33, 5},
        {"scatter 37 rows of 33 words into 100", 37, 33, 100},
        {"scatter 500 rows of 17 words, 3 blocks (grid-stride)", 500, 17, 777, 3},
        {"scatter 1000 rows of 2 words into 1000", 1000, 2, 1000},
    };
}

// Random E4M3 code that is not NaN.
uint8_t index_code() {
    uint8_t c = (uint8_t)irange(0, 255);
    return (c & 0x7f) == 0x7f ? (uint8_t)(c ^ 1) : c;
}

struct IndexScoreCase {
    std::string name;
    int bs, heads, dim;
    std::vector<int> lens;  // per token
    int seqs;               // tokens share sequences (token t: sequence t % seqs)
};

// `mma`: the tensor-core kernel (heads of a multiple of 16 values).
bool run_index_score(const IndexScoreCase& c, bool mma) {
    const int T = (int)c.lens.size(), dim = c.dim, H = c.heads;
    const int row_bytes = dim + 4;
    std::vector<int32_t> tok_seq(T), tok_len(c.lens.begin(), c.lens.end());
    std::vector<int> seq_len(c.seqs, 0);
    for (int t = 0; t < T; ++t) {
        tok_seq[t] = t % c.seqs;
        seq_len[tok_seq[t]] = std::max(seq_len[tok_seq[t]], tok_len[t]);
    }
    // Sequences hold a few keys past their tokens' candidates (never read).
    for (auto& l : seq_len) l += irange(0, 9);
    std::vector<int> nblocks(c.seqs);
    int used = 0, table_stride = 0;
    for (int q = 0; q < c.seqs; ++q) {
        nblocks[q] = (seq_len[q] + c.bs - 1) / c.bs;
        used += nblocks[q];
        table_stride = std::max(table_stride, nblocks[q]);
    }
    table_stride += 2;
    const int num_blocks = used + 4;  // some blocks no table names
    std::vector<int32_t> ids(num_blocks);
    for (int i = 0; i < num_blocks; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    // Unused table entries point far outside the pool.
    std::vector<int32_t> table((size_t)c.seqs * table_stride, 0x3fffffff);
    for (int q = 0, k = 0; q < c.seqs; ++q)
        for (int b = 0; b < nblocks[q]; ++b) table[(size_t)q * table_stride + b] = ids[k++];
    // The pool: garbage or NaN (0xff codes and scales) everywhere, then the
    // sequences' keys.
    const size_t block_bytes = (size_t)c.bs * row_bytes;
    std::vector<uint8_t> keys((size_t)num_blocks * block_bytes);
    for (int b = 0; b < num_blocks; ++b) {
        const bool nan = b % 2 == 0;
        for (size_t i = 0; i < block_bytes; ++i) keys[b * block_bytes + i] = nan ? 0xff : (uint8_t)irange(0, 255);
    }
    auto slot_of = [&](int t, int s) {
        return (int64_t)table[(size_t)tok_seq[t] * table_stride + s / c.bs] * c.bs + s % c.bs;
    };
    for (int q = 0; q < c.seqs; ++q)
        for (int s = 0; s < seq_len[q]; ++s) {
            const int64_t slot = (int64_t)table[(size_t)q * table_stride + s / c.bs] * c.bs + s % c.bs;
            uint8_t* row = &keys[slot * row_bytes];
            for (int d = 0; d < dim; ++d) row[d] = index_code();
            const float scale = (float)std::ldexp(0.5 + uniform(), irange(-12, -2));
            memcpy(row + dim, &scale, 4);
        }
    std::vector<float> q((size_t)T * H * dim), w((size_t)T * H);
    for (auto& v : q) v = (float)e4m3_val(index_code());
    for (auto& v : w) v = (float)(2 * uniform() - 1);
    int maxlen = 0;
    for (int l : tok_len) maxlen = std::max(maxlen, l);
    const int score_stride = maxlen + 3;  // padding between tokens' rows
    const uint32_t poison = 0x7fa5a5a5u;    // a NaN
    std::vector<uint32_t> scores((size_t)T * score_stride, poison);
    MlaIndexScoreParams p{};
    p.tokens = T;
    p.heads = H;
    p.dim = dim;
    p.block_size = c.bs;
    p.table_stride = table_stride;
    p.score_stride = score_stride;
    p.row_bytes = row_bytes;
    p.q = q.data();
    p.w = w.data();
    p.keys = keys.data();
    p.table = table.data();
    p.tok_seq = tok_seq.data();
    p.tok_len = tok_len.data();
    p.scores = reinterpret_cast<float*>(scores.data());
    if (mma) {
        const unsigned gx = (unsigned)((maxlen + MLA_INDEX_MMA_KEYS - 1) / MLA_INDEX_MMA_KEYS);
        emu::launch(mla_index_score_mma, {gx, (unsigned)T, 1}, {128, 1, 1}, 0, p);
    } else {
        const unsigned gx = (unsigned)((maxlen + MLA_INDEX_SCORE_KEYS - 1) / MLA_INDEX_SCORE_KEYS);
        emu::launch(mla_index_score, {gx, (unsigned)T, 1}, {MLA_INDEX_SCORE_KEYS, 1, 1}, 0, p);
    }
    double worst = 0;
    for (int t = 0; t < T; ++t) {
        std::vector<double> want(tok_len[t]);
        double mag = 0;
        for (int s = 0; s < tok_len[t]; ++s) {
            const uint8_t* row = &keys[slot_of(t, s) * row_bytes];
            float scale;
            memcpy(&scale, row + dim, 4);
            double total = 0;
            for (int h = 0; h < H; ++h) {
                const float* qh = &q[((size_t)t * H + h) * dim];
                double dot = 0;
                for (int d = 0; d < dim; ++d) dot += (double)qh[d] * e4m3_val(row[d]);
                total += w[(size_t)t * H + h] * std::max(dot, 0.0);
            }
            want[s] = scale * total;
            mag = std::max(mag, std::fabs(want[s]));
        }
        for (int s = 0; s < score_stride; ++s) {
            const uint32_t bits = scores[(size_t)t * score_stride + s];
            if (s >= tok_len[t]) {
                if (bits != poison) {
                    printf("  index %s: wrote score[%d][%d] past tok_len %d\n", c.name.c_str(), t, s, tok_len[t]);
                    return false;
                }
                continue;
            }
            float got;
            memcpy(&got, &bits, 4);
            const double err = std::fabs(got - want[s]);
            if (!(err <= 1e-5 * mag + 1e-30)) {
                printf("  index %s: score[%d][%d] = %.9g, want %.9g (token's max %.3g)\n", c.name.c_str(), t, s, got,
                       want[s], mag);
                return false;
            }
            worst = std::max(worst, err / (mag + 1e-30));
        }
    }
    printf("ok   index %s%s (max error %.1e of the token's largest score)\n", c.name.c_str(), mma ? " mma" : "",
           worst);
    return true;
}

std::vector<IndexScoreCase> index_score_cases() {
    return {
        {"score bs1 h1 d4", 1, 1, 4, {1, 127, 128, 129, 300}, 2},
        {"score bs7 h5 d64", 7, 5, 64, {300, 129, 1, 128, 127}, 3},
        // Two tiles of 64 heads for the tensor-core kernel, the second partial.
        {"score bs16 h100 d128", 16, 100, 128, {64, 65, 1, 200}, 2},
        {"score bs64 h16 d128", 64, 16, 128, {127, 300, 128, 129, 1}, 2},
        {"score bs7 h64 d128", 7, 64, 128, {129, 300, 45}, 2},
        {"score bs64 h20 d64", 64, 20, 64, {300, 1, 129, 127, 200}, 3},
        {"score bs1 h37 d4 (a token without candidates)", 1, 37, 4, {256, 0, 5}, 1},
    };
}

struct IndexTopkCase {
    std::string name;
    int topk;
    int kind;     // scores: 0 random, 1 three values, 2 signed zeros/infinities/NaNs, 3 all equal
    int bs;
    int outputs;  // 1 positions, 2 slots, 3 both
    std::vector<int> lens;
    int seqs;
};

// Rust's f32::total_cmp, as Rust writes it: the bits as i32, the magnitude
// bits flipped for negative values.
int32_t total_order(float f) {
    int32_t i;
    memcpy(&i, &f, 4);
    return i ^ (int32_t)((uint32_t)(i >> 31) >> 1);
}

float index_special() {
    static const uint32_t nans[2] = {0x7fc00000u, 0xffc00000u};
    switch (irange(0, 9)) {
        case 0: return 0.0f;
        case 1: return -0.0f;
        case 2: return INFINITY;
        case 3: return -INFINITY;
        case 4: return -1.5f;
        case 5: return 1.5f;
        case 6: return -(float)uniform();
        case 7: return __uint_as_float(nans[irange(0, 1)]);
        case 8: return __uint_as_float((uint32_t)irange(1, 7) | (irange(0, 1) ? 0x80000000u : 0u));  // subnormal
        default: return (float)uniform();
    }
}

bool run_index_topk(const IndexTopkCase& c) {
    const int T = (int)c.lens.size(), K = c.topk;
    std::vector<int32_t> tok_seq(T), tok_len(c.lens.begin(), c.lens.end());
    std::vector<int> seq_len(c.seqs, 0);
    int maxlen = 0;
    for (int t = 0; t < T; ++t) {
        tok_seq[t] = t % c.seqs;
        seq_len[tok_seq[t]] = std::max(seq_len[tok_seq[t]], tok_len[t]);
        maxlen = std::max(maxlen, tok_len[t]);
    }
    int used = 0, table_stride = 0;
    for (int l : seq_len) {
        used += (l + c.bs - 1) / c.bs;
        table_stride = std::max(table_stride, (l + c.bs - 1) / c.bs);
    }
    table_stride += 1;
    std::vector<int32_t> ids(used + 3);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = (int32_t)i;
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int32_t> table((size_t)c.seqs * table_stride, -7777777);
    for (int q = 0, k = 0; q < c.seqs; ++q)
        for (int b = 0; b < (seq_len[q] + c.bs - 1) / c.bs; ++b) table[(size_t)q * table_stride + b] = ids[k++];
    // Scores: past each token's candidates a positive NaN, the largest
    // value there is, so reading one shows.
    const int score_stride = maxlen + 5;
    std::vector<float> scores((size_t)T * score_stride, __uint_as_float(0x7fc00000u));
    const float three[3] = {0.75f, -2.5f, 3.0f};
    const float same = irange(0, 1) ? 1.0f : -0.0f;
    for (int t = 0; t < T; ++t)
        for (int s = 0; s < tok_len[t]; ++s) {
            float v;
            switch (c.kind) {
                case 0: v = (float)std::normal_distribution<double>(0.0, 1.0)(rng); break;
                case 1: v = three[irange(0, 2)]; break;
                case 2: v = index_special(); break;
                default: v = same;
            }
            scores[(size_t)t * score_stride + s] = v;
        }
    // The host's choice (model::indexer::select) and its slots.
    std::vector<int32_t> want_pos((size_t)T * K, -1), want_slot((size_t)T * K, -1);
    for (int t = 0; t < T; ++t) {
        const int n = tok_len[t];
        std::vector<int32_t> order(n);
        for (int i = 0; i < n; ++i) order[i] = i;
        if (n > K) {
            const float* sc = &scores[(size_t)t * score_stride];
            std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
                const int32_t ka = total_order(sc[a]), kb = total_order(sc[b]);
                return ka != kb ? ka > kb : a < b;
            });
            order.resize(K);
            std::sort(order.begin(), order.end());
        }
        for (size_t i = 0; i < order.size(); ++i) {
            const int s = order[i];
            want_pos[(size_t)t * K + i] = s;
            want_slot[(size_t)t * K + i] = table[(size_t)tok_seq[t] * table_stride + s / c.bs] * c.bs + s % c.bs;
        }
    }
    const int32_t poison = 0x5a5a5a5a;
    std::vector<int32_t> pos(c.outputs & 1 ? (size_t)T * K : 0, poison), slots(c.outputs & 2 ? (size_t)T * K : 0, poison);
    MlaIndexTopkParams p{};
    p.tokens = T;
    p.topk = K;
    p.score_stride = score_stride;
    p.block_size = c.bs;
    p.table_stride = table_stride;
    p.scores = scores.data();
    p.table = table.data();
    p.tok_seq = tok_seq.data();
    p.tok_len = tok_len.data();
    p.positions = pos.empty() ? nullptr : pos.data();
    p.slots = slots.empty() ? nullptr : slots.data();
    emu::launch(mla_index_topk, {(unsigned)T, 1, 1}, {MLA_INDEX_TOPK_THREADS, 1, 1}, 0, p);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < K; ++i) {
            const size_t e = (size_t)t * K + i;
            if (!pos.empty() && pos[e] != want_pos[e]) {
                printf("  index %s: token %d (%d candidates) positions[%d] = %d, want %d\n", c.name.c_str(), t,
                       tok_len[t], i, pos[e], want_pos[e]);
                return false;
            }
            if (!slots.empty() && slots[e] != want_slot[e]) {
                printf("  index %s: token %d (%d candidates) slots[%d] = %d, want %d\n", c.name.c_str(), t,
                       tok_len[t], i, slots[e], want_slot[e]);
                return false;
            }
        }
    printf("ok   index %s (exact)\n", c.name.c_str());
    return true;
}

std::vector<IndexTopkCase> index_topk_cases() {
    std::vector<IndexTopkCase> v;
    const char* kinds[4] = {"random", "3 values (ties)", "+-0/+-inf/NaN/subnormal", "all equal"};
    const char* outs[4] = {"", "positions", "slots", "positions+slots"};
    int n = 0;
    for (int K : {1, 7, 512, 2048})
        for (int kind = 0; kind < 4; ++kind, ++n) {
            IndexTopkCase c;
            c.topk = K;
            c.kind = kind;
            c.bs = n % 2 ? 64 : 1;
            c.outputs = (int[]){3, 1, 2}[n % 3];
            c.lens = {1, std::max(1, K - 1), K, K + 1, 5000, irange(K + 2, 6000), 0};
            c.seqs = 1 + n % 3;
            c.name = "topk " + std::to_string(K) + " " + kinds[kind] + " bs" + std::to_string(c.bs) + " " +
                     outs[c.outputs];
            v.push_back(c);
        }
    return v;
}

}  // namespace

// ---- the indexer's row steps (mla_index_rows) against a float64 reference ----
struct IndexRowsCase {
    std::string name;
    int rows, dim, rope;
    int rows_per_token = 1;
    bool layer_norm = false, pow2 = true, queries = true;
    unsigned grid = 0;  // 0: one block per row
};

// The E4M3 code of x under round-to-nearest-even, from the value table.
double e4m3_nearest(double x) {
    double best = 0, err = 1e300;
    for (int c = 0; c < 256; ++c) {
        if ((c & 0x7f) == 0x7f) continue;
        const double v = e4m3_val((uint8_t)c), e = std::fabs(v - x);
        if (e < err) {
            err = e;
            best = v;
        }
    }
    return best;
}

bool run_index_rows(const IndexRowsCase& c) {
    const int dim = c.dim, tokens = (c.rows + c.rows_per_token - 1) / c.rows_per_token;
    const int cs_stride = c.rope + 2;  // a table wider than the pairs used
    std::vector<float> src((size_t)c.rows * dim), nw(dim), nb(dim), cs((size_t)tokens * cs_stride);
    for (auto& v : src) v = sample() * (uniform() < 0.05 ? 40.f : 1.f);
    // A row of zeros: the amax floor gives it a finite scale.
    for (int k = 0; k < dim; ++k) src[k] = 0.f;
    for (int k = 0; k < dim; ++k) {
        nw[k] = 0.5f + (float)uniform();
        nb[k] = 0.1f * sample();
    }
    for (int t = 0; t < tokens; ++t)
        for (int i = 0; i < c.rope / 2; ++i) {
            const double a = uniform() * 6.28, sc = 0.9 + 0.2 * uniform();
            cs[(size_t)t * cs_stride + 2 * i] = (float)(std::cos(a) * sc);
            cs[(size_t)t * cs_stride + 2 * i + 1] = (float)(std::sin(a) * sc);
        }
    std::vector<float> w(c.rows), w_in;
    for (auto& v : w) v = (float)(2 * uniform() - 1);
    w_in = w;
    const float hs = (float)std::pow((double)dim, -0.5), w_scale = 0.125f * hs;
    std::vector<float> values(c.queries ? (size_t)c.rows * dim : 0, -1234.f);
    std::vector<uint8_t> keys(c.queries ? 0 : (size_t)c.rows * (dim + 4), 0xa5);
    MlaIndexRowsParams p{};
    p.rows = c.rows;
    p.dim = dim;
    p.src_stride = dim;
    p.rows_per_token = c.rows_per_token;
    p.rope = c.rope;
    p.cs_stride = cs_stride;
    p.pow2_scales = c.pow2;
    p.eps = 1e-6f;
    p.hadamard_scale = hs;
    p.w_scale = w_scale;
    p.src = src.data();
    p.norm_w = c.layer_norm ? nw.data() : nullptr;
    p.norm_b = c.layer_norm ? nb.data() : nullptr;
    p.cos_sin = c.rope ? cs.data() : nullptr;
    p.values = c.queries ? values.data() : nullptr;
    p.w = c.queries ? w.data() : nullptr;
    p.key_rows = c.queries ? nullptr : keys.data();
    emu::launch(mla_index_rows, {c.grid ? c.grid : (unsigned)c.rows, 1, 1}, {MLA_INDEX_ROWS_THREADS, 1, 1}, 0, p);
    double worst = 0;
    for (int r = 0; r < c.rows; ++r) {
        // The reference in float64: LayerNorm, half-split RoPE, the
        // orthonormal Hadamard matrix, the scale.
        std::vector<double> x(dim), y(dim);
        for (int k = 0; k < dim; ++k) x[k] = src[(size_t)r * dim + k];
        if (c.layer_norm) {
            double mean = 0, var = 0;
            for (double v : x) mean += v;
            mean /= dim;
            for (double v : x) var += (v - mean) * (v - mean);
            var /= dim;
            for (int k = 0; k < dim; ++k) x[k] = (x[k] - mean) / std::sqrt(var + 1e-6) * nw[k] + nb[k];
        }
        const float* t = &cs[(size_t)(r / c.rows_per_token) * cs_stride];
        for (int i = 0; i < c.rope / 2; ++i) {
            const double a = x[i], b = x[i + c.rope / 2];
            x[i] = a * t[2 * i] - b * t[2 * i + 1];
            x[i + c.rope / 2] = a * t[2 * i + 1] + b * t[2 * i];
        }
        double amax = 0;
        for (int k = 0; k < dim; ++k) {
            double s = 0;
            for (int j = 0; j < dim; ++j) s += (__builtin_popcount(k & j) % 2 ? -x[j] : x[j]);
            y[k] = s / std::sqrt((double)dim);
            amax = std::max(amax, std::fabs(y[k]));
        }
        const double ratio = std::max(amax, 1e-4) / 448.0;
        const double want_scale = c.pow2 ? std::ldexp(1.0, (int)std::ceil(std::log2(ratio))) : ratio;
        // The kernel's scale and codes.
        float scale;
        std::vector<double> got(dim);
        if (c.queries) {
            // Its scale, from the head weight: w * (w_scale * scale) (a
            // power of two exactly; a plain one to float rounding).
            const double derived = (double)w[r] / w_in[r] / w_scale;
            scale = c.pow2 ? (float)std::ldexp(1.0, (int)std::lround(std::log2(derived))) : (float)derived;
            for (int k = 0; k < dim; ++k) got[k] = values[(size_t)r * dim + k];
        } else {
            const uint8_t* row = &keys[(size_t)r * (dim + 4)];
            memcpy(&scale, row + dim, 4);
            for (int k = 0; k < dim; ++k) got[k] = e4m3_val(row[k]);
        }
        // A power-of-two scale may round up one binade where the ratio
        // sits on a boundary within float rounding; a plain one is the ratio.
        const double srel = std::fabs(scale - want_scale) / want_scale;
        const bool boundary = std::fabs(std::log2(ratio) - std::round(std::log2(ratio))) < 1e-5;
        const bool scale_ok = c.pow2 ? (srel == 0 || (boundary && (srel == 0.5 || srel == 1))) : srel < 1e-5;
        if (!scale_ok) {
            printf("  index rows %s: row %d scale %.9g, want %.9g\n", c.name.c_str(), r, scale, want_scale);
            return false;
        }
        const double w_want = c.pow2 ? (double)(w_in[r] * (w_scale * scale)) : (double)w_in[r] * w_scale * scale;
        if (c.queries && std::fabs(w[r] - w_want) > (c.pow2 ? 0 : 1e-6 * std::fabs(w_want))) {
            printf("  index rows %s: row %d head weight %.9g, want %.9g\n", c.name.c_str(), r, w[r], w_in[r] * (w_scale * scale));
            return false;
        }
        for (int k = 0; k < dim; ++k) {
            // Every output is a code value; it is the nearest code to the
            // reference unless the reference sits within rounding of the
            // midpoint between two codes.
            const double q = y[k] / scale, near = e4m3_nearest(q);
            // (Float rounding of the steps: about 1e-5 of the row's largest
            // value, 448 in code units.)
            const double err = std::fabs(got[k] - q), tie = std::fabs(std::fabs(near - q) - err);
            if (!(got[k] == e4m3_nearest(got[k])) || (got[k] != near && tie > 5e-3 + 1e-5 * std::fabs(q))) {
                printf("  index rows %s: row %d [%d] = %.9g, want the code %.9g of %.9g\n", c.name.c_str(), r, k, got[k], near,
                       q);
                return false;
            }
            worst = std::max(worst, std::fabs(got[k] - near));
        }
    }
    printf("ok   index rows %s (largest code difference %.2g)\n", c.name.c_str(), worst);
    return true;
}

std::vector<IndexRowsCase> index_rows_cases() {
    std::vector<IndexRowsCase> v;
    IndexRowsCase c;
    // V3.2's queries: 128 values, rope 64, 4 heads a token.
    c = {"queries dim128 rope64 4 heads/token", 12, 128, 64, 4};
    v.push_back(c);
    c = {"queries dim64 rope64, plain scales, 2 blocks for 7 rows", 7, 64, 64, 1};
    c.pow2 = false;
    c.grid = 2;
    v.push_back(c);
    // V3.2's keys: LayerNorm first, rows of codes and a scale.
    c = {"keys dim128 rope64 layernorm", 5, 128, 64};
    c.layer_norm = true;
    c.queries = false;
    v.push_back(c);
    c = {"keys dim8 rope4 layernorm plain scales", 4, 8, 4};
    c.layer_norm = true;
    c.queries = false;
    c.pow2 = false;
    v.push_back(c);
    c = {"queries dim16 no rope", 3, 16, 0};
    v.push_back(c);
    return v;
}

int main() {
    rng.seed(0x6d6c6172743a656dull);
    std::vector<Case> cases;
    const int formats[] = {MLA_KV_BF16, MLA_KV_F16, MLA_KV_F32, MLA_KV_FP8_V32, MLA_KV_FP8_MODEL1};
    const int dts[] = {MLA_DT_BF16, MLA_DT_F16, MLA_DT_F32};
    const int bss[] = {1, 16, 64, 100};
    int n = 0;
    for (int f : formats) {
        for (int v = 0; v < 3; ++v, ++n) {
            Case c;
            c.format = f;
            c.d_qk = f == MLA_KV_FP8_MODEL1 ? 512 : f == MLA_KV_FP8_V32 ? 576 : (v == 1 ? 512 : 576);
            c.bs = bss[(n + v) % 4];
            c.batch = 1 + n % 4;
            c.s_q = 1 + v;
            c.h_q = (int[]){16, 20, 1, 33}[n % 4];
            c.causal = v > 0;
            c.q_dt = dts[n % 3];
            c.out_dt = dts[(n + 1) % 3];
            c.sink = v == 2;
            c.parts = (int[]){1, 4, 16}[v];
            c.spread = v == 1 ? 4.0 : 2.0;
            c.seqlens = lengths(c.batch, v == 2 ? 300 : 150, c.bs);
            c.name = "dense f" + std::to_string(f) + " d" + std::to_string(c.d_qk) + " bs" + std::to_string(c.bs) +
                     " b" + std::to_string(c.batch) + " s_q" + std::to_string(c.s_q) + " h" + std::to_string(c.h_q) +
                     (c.causal ? " causal" : "") + (c.sink ? " sink" : "") + " parts" + std::to_string(c.parts);
            cases.push_back(c);
        }
        for (int v = 0; v < 2; ++v, ++n) {
            Case c;
            c.sparse = true;
            c.format = f;
            c.d_qk = f == MLA_KV_FP8_MODEL1 ? 512 : 576;
            c.bs = bss[(n + 1) % 4];
            c.batch = 2 + v;
            c.s_q = 1 + v;
            c.h_q = v ? 16 : 17;
            c.topk = v ? 100 : 64;
            c.with_len = v == 0;
            c.extra = v == 1;
            c.extra_topk = 40;
            c.extra_bs = 16;
            c.sink = v == 0;
            c.parts = v ? 8 : 2;
            c.q_dt = dts[(n + 2) % 3];
            c.out_dt = dts[n % 3];
            c.seqlens = lengths(c.batch, 200, c.bs);
            c.name = "sparse f" + std::to_string(f) + " bs" + std::to_string(c.bs) + " b" + std::to_string(c.batch) +
                     " s_q" + std::to_string(c.s_q) + " h" + std::to_string(c.h_q) + (c.extra ? " extra" : "") +
                     (c.sink ? " sink" : "") + (c.with_len ? " topk_length" : "");
            cases.push_back(c);
        }
    }
    {
        Case c;  // one long sequence split across 8 items, 64 heads
        c.name = "split-kv long h64";
        c.h_q = 64;
        c.seqlens = {1000};
        c.parts = 8;
        cases.push_back(c);
        Case d;  // bad block id
        d.name = "bad block id";
        d.seqlens = {100, 50};
        d.batch = 2;
        d.bad_block = true;
        cases.push_back(d);
    }
    // The 64-row kernels on every case with at least 32 rows per group (so
    // full and partly filled 64-row tiles), plus wide-head cases.
    const size_t base_cases = cases.size();
    for (size_t i = 0; i < base_cases; ++i) {
        Case c = cases[i];
        int R = c.sparse ? c.h_q : c.s_q * c.h_q;
        if (R < 32 || c.bad_block) continue;
        c.rg = 4;
        c.name += " m64";
        cases.push_back(c);
    }
    // The wgmma kernels on the same cases as the 64-row ones (added below too).
    for (int f : formats) {
        Case c;
        c.rg = 4;
        c.format = f;
        c.d_qk = f == MLA_KV_FP8_MODEL1 ? 512 : 576;
        c.h_q = f == MLA_KV_F16 ? 80 : 128;
        c.batch = 2;
        c.bs = 64;
        c.seqlens = lengths(2, 200, 64);
        c.sparse = f == MLA_KV_FP8_V32;
        c.topk = 96;
        c.with_len = false;  // every group attends (topk_length is covered above)
        c.sink = true;
        c.parts = 4;
        c.name = std::string(c.sparse ? "sparse" : "dense") + " f" + std::to_string(f) + " h" +
                 std::to_string(c.h_q) + " sink m64";
        cases.push_back(c);
    }
    for (size_t i = base_cases, n = cases.size(); i < n; ++i) {
        Case c = cases[i];
        c.wg = true;
        c.name += " wg";
        cases.push_back(c);
    }
    int failed = 0;
    // MLA_EMU_ONLY=text runs only the cases whose name contains it.
    const char* only = getenv("MLA_EMU_ONLY");
    for (auto& c : cases) {
        if (only && c.name.find(only) == std::string::npos) continue;
        Outcome o = run(c);
        printf("%s %s (max rel L2 %.2e)\n", o.ok ? "ok  " : "FAIL", c.name.c_str(), o.max_err);
        failed += !o.ok;
    }
    int appends = 0;
    for (int f : formats)
        for (int dt : dts) {
            bool ok = run_append(f, dt);
            printf("%s append f%d src dt %d (byte-exact vs the host encoder)\n", ok ? "ok  " : "FAIL", f, dt);
            failed += !ok;
            ++appends;
        }
    int linears = 0;
    for (const auto& c : linear_cases()) {
        if (only && c.name.find(only) == std::string::npos) continue;
        const bool ok = run_linear(c);
        if (!ok) printf("FAIL linear %s\n", c.name.c_str());
        failed += !ok;
        ++linears;
    }
    int rows = 0;
    for (const auto& c : rows_cases()) {
        if (only && c.name.find(only) == std::string::npos) continue;
        const bool ok = run_rows(c);
        if (!ok) printf("FAIL rows %s\n", c.name.c_str());
        failed += !ok;
        ++rows;
    }
    int indexes = 0;
    auto index_case = [&](const std::string& name, auto run_it) {
        if (only && ("index " + name).find(only) == std::string::npos) return;
        const bool ok = run_it();
        if (!ok) printf("FAIL index %s\n", name.c_str());
        failed += !ok;
        ++indexes;
    };
    for (const auto& c : index_scatter_cases()) index_case(c.name, [&] { return run_index_scatter(c); });
    for (const auto& c : index_score_cases()) {
        index_case(c.name, [&] { return run_index_score(c, false); });
        if (c.dim % 16 == 0) index_case(c.name + " mma", [&] { return run_index_score(c, true); });
    }
    for (const auto& c : index_topk_cases()) index_case(c.name, [&] { return run_index_topk(c); });
    for (const auto& c : index_rows_cases()) index_case("rows " + c.name, [&] { return run_index_rows(c); });
    const bool probe = run_probe();
    printf("%s wgmma probe (S and O of the _wg kernels' GEMMs, exact)\n", probe ? "ok  " : "FAIL");
    failed += !probe;
    printf("emulated kernels: %zu cases, %d failed\n", cases.size() + appends + linears + rows + indexes + 1, failed);
    return failed ? 1 : 0;
}
