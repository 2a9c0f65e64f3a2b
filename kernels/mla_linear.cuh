// The model's projections on the GPU: y = x · Wᵀ per group, with W kept in
// its stored precision (bf16, or DeepSeek-V3's e4m3 codes with f32 scales
// per block) and the activations given as bf16 `hi` (+ `lo`) parts, the
// same split the CPU's bf16 units take (src/model/fp8_bf16.rs): `hi + lo`
// keeps about 16 bits of each f32 activation; without `lo` they are rounded
// to bf16, as DeepSeek's reference runs its projections.
//
// Groups are independent products sharing one launch (grid.z): the absorbed
// per-head steps of MLA (W_UV reads kv_b_proj's rows in place; W_UK a
// transposed copy of them). Weight row of group g, output n:
// w_row0 + g * w_group_rows + n; x is [T, G, K], y [T, G, N].
//
// Each warp owns 8 output columns (8 weight rows, the B operand of
// mma.m16n8k16) and streams them once for 16 * MF tokens. Thread 4r + q
// loads 16 bytes of weight row r at a time straight into registers: mma
// sums over k, so k may be permuted as long as A and B agree. For bf16 the
// 8 elements at k0 + 8q feed two mmas (elements 4j..4j+3 as mma j's k pairs
// (2q, 2q+1) and (2q+8, 2q+9)); for FP8 the 16 codes at k0 + 16q feed four.
// The activations are read the same way (16 bytes at the same k), through
// L1, shared by the block's warps. FP8 products of each 64 keys are summed
// before their block scale multiplies them, so codes convert to bf16
// exactly (every e4m3 value is a bf16 value).
//
// Long K on few columns (decode) is split across grid.y into k_split
// ranges written to `partial`; mla_linear_reduce sums them in a fixed
// order, so results do not depend on timing.
#pragma once
#include "mla_math.cuh"

// Mirrored by `LinearParams` in src/backend/cuda/params.rs.
struct MlaLinearParams {
    // ---- 4-byte fields
    int32_t tokens;      // T
    int32_t n_out;       // N, output columns per group
    int32_t k_in;        // K, a multiple of 8 (of 16 for FP8)
    int32_t groups;      // G, grid.z
    int32_t k_split;     // K ranges; > 1 writes partials
    int32_t k_chunk;     // keys per range, a multiple of MLA_LINEAR_STEP
    int32_t m_tiles;     // token tiles of 16 * MF; grid.y = m_tiles * k_split
    int32_t scale_rdiv;  // FP8: weight rows per scale row (128, or 1)
    int32_t scale_kdiv;  // FP8: keys per scale column (128 or 64)
    int32_t scale_cols;  // FP8: scales per scale row
    // ---- 8-byte fields
    int64_t w_group_rows;  // weight rows from one group to the next
    int64_t w_row0;        // first weight row of group 0
    const uint16_t* x_hi;  // [T, G, K] bf16
    const uint16_t* x_lo;  // [T, G, K] bf16, or null
    const uint8_t* w;      // [rows, K] bf16 or e4m3
    const float* scales;   // FP8: [rows / scale_rdiv, scale_cols]; a multiplier
    float* y;              // [T, G, N]
    float* partial;        // [k_split, T, G, N] when k_split > 1
};
#define MLA_LINEAR_PARAMS_SIZE 104
static_assert(sizeof(MlaLinearParams) == MLA_LINEAR_PARAMS_SIZE, "update params.rs");
static_assert(offsetof(MlaLinearParams, w_group_rows) == 40, "update params.rs");
static_assert(offsetof(MlaLinearParams, partial) == 96, "update params.rs");

#define MLA_LINEAR_WARPS 4
#define MLA_LINEAR_THREADS (32 * MLA_LINEAR_WARPS)
#define MLA_LINEAR_COLS (8 * MLA_LINEAR_WARPS)  // output columns per block
#define MLA_LINEAR_STEP 128                     // K ranges are multiples of it
#define MLA_REDUCE_THREADS 256

namespace mla {

__device__ __forceinline__ uint4 load16(const void* p, bool ok) {
    if (!ok) return make_uint4(0, 0, 0, 0);
    return *static_cast<const uint4*>(p);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Codes (byte 2i, 2i + 1) of a 16-byte load as a bf16 pair, exactly.
__device__ __forceinline__ uint32_t e4m3_pair(const uint4& v, int i) {
    const uint32_t w = word(v, i / 2) >> (16 * (i % 2));
    return OpBf16::pack(e4m3_to_float(w & 0xffu), e4m3_to_float((w >> 8) & 0xffu));
}

// `a` if B else `b`, chosen at compile time (a run-time choice between two
// register arrays would put both in local memory).
template <bool B>
__device__ __forceinline__ float (&pick(float (&a)[4], float (&b)[4]))[4] {
    if constexpr (B) return a;
    else return b;
}

// The activations of token rows r and r + 8 of fragment f for 8 (bf16
// weights) or 16 (FP8) keys at k; zero past the tokens or the keys.
template <bool FP8>
struct XRows {
    uint4 a[2][FP8 ? 2 : 1];  // [row r / r + 8][16-byte part]
};

template <bool FP8>
__device__ __forceinline__ XRows<FP8> load_x(const uint16_t* x, const MlaLinearParams& p, int g, int t,
                                             int k, bool k_ok) {
    XRows<FP8> out;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int tt = t + 8 * h;
        const bool ok = k_ok && tt < p.tokens;
        const uint16_t* row = x + ((int64_t)tt * p.groups + g) * p.k_in + k;
#pragma unroll
        for (int part = 0; part < (FP8 ? 2 : 1); ++part) out.a[h][part] = load16(row + 8 * part, ok);
    }
    return out;
}

// mma j of a load: A words 2j and 2j + 1 of rows r and r + 8.
template <bool FP8>
__device__ __forceinline__ void a_frag(uint32_t (&a)[4], const XRows<FP8>& x, int j) {
    const int w0 = 2 * j, w1 = 2 * j + 1;
    a[0] = word(x.a[0][w0 / 4], w0 % 4);
    a[1] = word(x.a[1][w0 / 4], w0 % 4);
    a[2] = word(x.a[0][w1 / 4], w1 % 4);
    a[3] = word(x.a[1][w1 / 4], w1 % 4);
}

template <int MF, bool FP8>
__device__ __forceinline__ void linear_block(const MlaLinearParams& p) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = lane / 4, q = lane % 4;
    const int g = blockIdx.z;
    const int mt = blockIdx.y % p.m_tiles, ks = blockIdx.y / p.m_tiles;
    const int n0 = blockIdx.x * MLA_LINEAR_COLS + warp * 8;  // the warp's 8 output columns
    if (n0 >= p.n_out) return;  // the whole warp; no block-wide barrier follows
    const int t0 = mt * 16 * MF;
    const int K = p.k_in;
    const int kb = ks * p.k_chunk, ke = min(K, kb + p.k_chunk);
    const int64_t row_base = p.w_row0 + (int64_t)g * p.w_group_rows;
    const bool row_ok = n0 + r < p.n_out;
    const uint8_t* wrow = p.w + (row_base + n0 + r) * (int64_t)K * (FP8 ? 1 : 2);

    // FP8: where the scales of this thread's two accumulator columns start
    // (-1 past the last column).
    int srow0 = -1, srow1 = -1;
    if constexpr (FP8) {
        const int n = n0 + 2 * q;
        if (n < p.n_out) srow0 = (int)((row_base + n) / p.scale_rdiv) * p.scale_cols;
        if (n + 1 < p.n_out) srow1 = (int)((row_base + n + 1) / p.scale_rdiv) * p.scale_cols;
    }

    float acc[MF][4];
#pragma unroll
    for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[f][i] = 0.f;

    // Per step, two 16-byte weight loads per lane, each spanning SPAN keys
    // of the warp's rows; the next step's loads are issued before this
    // step's mmas.
    constexpr int LOADS = 2;
    constexpr int LANE_K = FP8 ? 16 : 8;  // keys per lane per load
    constexpr int SPAN = 4 * LANE_K;      // keys per load
    static_assert(MLA_LINEAR_STEP % (LOADS * SPAN) == 0, "K ranges hold whole steps");
    // This lane's bytes of the step at k0 (zero past the keys or rows).
    const uint8_t* wlane = wrow + (int64_t)(kb + LANE_K * q) * (FP8 ? 1 : 2);
    const int kq = LANE_K * q;
    uint4 wn0 = load16(wlane, row_ok && kb + kq < ke);
    uint4 wn1 = load16(wlane + SPAN * (FP8 ? 1 : 2), row_ok && kb + SPAN + kq < ke);
    for (int k0 = kb; k0 < ke; k0 += LOADS * SPAN) {
        const uint4 wv[LOADS] = {wn0, wn1};
        const int kn = k0 + LOADS * SPAN;  // the next step, in flight during this one's mmas
        if (kn < ke) {
            const uint8_t* at = wlane + (int64_t)(kn - kb) * (FP8 ? 1 : 2);
            wn0 = load16(at, row_ok && kn + kq < ke);
            wn1 = load16(at + SPAN * (FP8 ? 1 : 2), row_ok && kn + SPAN + kq < ke);
        }
#pragma unroll
        for (int l = 0; l < LOADS; ++l) {
            const int k = k0 + SPAN * l + LANE_K * q;
            const bool k_ok = k < ke;
            constexpr int MMAS = FP8 ? 4 : 2;
            uint32_t b[MMAS][2];
#pragma unroll
            for (int j = 0; j < MMAS; ++j) {
                if constexpr (FP8) {
                    b[j][0] = e4m3_pair(wv[l], 2 * j);
                    b[j][1] = e4m3_pair(wv[l], 2 * j + 1);
                } else {
                    b[j][0] = word(wv[l], 2 * j);
                    b[j][1] = word(wv[l], 2 * j + 1);
                }
            }
            // bf16 products go straight into the accumulators; FP8 ones
            // first sum over their 64 keys, then take the block scale.
            float part[MF][4];
#pragma unroll
            for (int f = 0; f < MF; ++f)
#pragma unroll
                for (int i = 0; i < 4; ++i) part[f][i] = 0.f;
#pragma unroll
            for (int f = 0; f < MF; ++f) {
                const int t = t0 + 16 * f + r;
                float(&d)[4] = pick<FP8>(part[f], acc[f]);
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const uint16_t* x = half ? p.x_lo : p.x_hi;
                    if (!x) continue;
                    const XRows<FP8> xr = load_x<FP8>(x, p, g, t, k, k_ok);
#pragma unroll
                    for (int j = 0; j < MMAS; ++j) {
                        uint32_t a[4];
                        a_frag<FP8>(a, xr, j);
                        OpBf16::mma(d, a, b[j][0], b[j][1]);
                    }
                }
            }
            // (A load wholly past the keys has no scale column to read.)
            if constexpr (FP8) if (k0 + SPAN * l < ke) {
                const int col = (k0 + SPAN * l) / p.scale_kdiv;
                const float s0 = srow0 >= 0 ? __ldg(p.scales + srow0 + col) : 0.f;
                const float s1 = srow1 >= 0 ? __ldg(p.scales + srow1 + col) : 0.f;
#pragma unroll
                for (int f = 0; f < MF; ++f)
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[f][i] += part[f][i] * (i % 2 ? s1 : s0);
            }
        }
    }

    const int64_t TGN = (int64_t)p.tokens * p.groups * p.n_out;
    float* dst = p.k_split > 1 ? p.partial + ks * TGN : p.y;
#pragma unroll
    for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int t = t0 + 16 * f + r + (i >= 2 ? 8 : 0);
            const int n = n0 + 2 * q + (i % 2);
            if (t < p.tokens && n < p.n_out) dst[((int64_t)t * p.groups + g) * p.n_out + n] = acc[f][i];
        }
}

}  // namespace mla

// y = the sum of the k_split partials, in order.
extern "C" __global__ void __launch_bounds__(MLA_REDUCE_THREADS)
    mla_linear_reduce(const __grid_constant__ MlaLinearParams p) {
    const int64_t TGN = (int64_t)p.tokens * p.groups * p.n_out;
    const int64_t i = (int64_t)blockIdx.x * MLA_REDUCE_THREADS + threadIdx.x;
    if (i >= TGN) return;
    float s = 0.f;
    for (int ks = 0; ks < p.k_split; ++ks) s += p.partial[ks * TGN + i];
    p.y[i] = s;
}
