// DeepSeek-V3.2's lightning indexer on the GPU (src/model/indexer.rs has the
// CPU twin and the semantics): for each new token, score every earlier token
// of its sequence against the indexer keys kept in the device pool, then keep
// the `topk` best. Three kernels:
//
// - mla_index_scatter: writes rows of 32-bit words to pool slots (the
//   indexer keys of an append: `dim` E4M3 codes then the f32 scale).
// - mla_index_score (CUDA cores) and mla_index_score_mma (tensor cores,
//   heads of a multiple of 16 values): score[t][s] = k_scale[s] * sum_h w[t][h] *
//   relu(q[t][h] . k[s]) for positions s < tok_len[t], keys found through
//   the token's sequence's block table. q holds E4M3 code values (exact in
//   f32 and bf16), k the pool's codes; products are exact, only the order of
//   the f32 sums differs from the CPU.
// - mla_index_topk: per token, the `topk` highest scores among its tok_len
//   candidates (ties: the earlier position), written as ascending logical
//   positions and/or physical pool slots, -1 past the last. A token with at
//   most `topk` candidates keeps them all, in order. The order is f32
//   totalOrder (Rust's f32::total_cmp), so NaN and -0 sort as on the host.
#pragma once
#include "mla_math.cuh"

#define MLA_INDEX_SCORE_KEYS 128  // keys (threads) per score block
#define MLA_INDEX_TOPK_THREADS 512
#define MLA_INDEX_SCATTER_THREADS 256
#define MLA_INDEX_MAX_DIM 128
#define MLA_INDEX_MMA_KEYS 64     // keys per block of the tensor-core score kernel

// Mirrored by `IndexScoreParams` in src/backend/cuda/params.rs.
// Grid: (ceil(max tok_len / MLA_INDEX_SCORE_KEYS), tokens); for
// mla_index_score_mma (dim a multiple of 16): MLA_INDEX_MMA_KEYS per block.
struct MlaIndexScoreParams {
    // ---- 4-byte fields
    int32_t tokens;        // query tokens
    int32_t heads;         // indexer heads, >= 1
    int32_t dim;           // elements per head and key: multiple of 4, <= MLA_INDEX_MAX_DIM
    int32_t block_size;    // tokens per pool block
    int32_t table_stride;  // entries from one block table row to the next
    int32_t score_stride;  // floats from one token's scores to the next
    int32_t row_bytes;     // bytes of one key row: dim + 4 (codes, then f32 scale)
    int32_t pad0;
    // ---- 8-byte fields
    const float* q;          // [tokens, heads, dim] E4M3 code values
    const float* w;          // [tokens, heads] head weights (query scale folded in)
    const uint8_t* keys;     // [num_blocks, block_size, row_bytes]
    const int32_t* table;    // [sequences, table_stride] block ids
    const int32_t* tok_seq;  // [tokens] the token's row of `table`
    const int32_t* tok_len;  // [tokens] candidates: positions 0 .. tok_len - 1
    float* scores;           // [tokens, score_stride]; entries >= tok_len untouched
};
#define MLA_INDEX_SCORE_PARAMS_SIZE 88
static_assert(sizeof(MlaIndexScoreParams) == MLA_INDEX_SCORE_PARAMS_SIZE, "update params.rs");
static_assert(offsetof(MlaIndexScoreParams, q) == 32, "update params.rs");

// Mirrored by `IndexTopkParams` in src/backend/cuda/params.rs.
// Grid: (tokens), MLA_INDEX_TOPK_THREADS threads.
struct MlaIndexTopkParams {
    // ---- 4-byte fields
    int32_t tokens;
    int32_t topk;          // >= 1
    int32_t score_stride;
    int32_t block_size;
    int32_t table_stride;
    int32_t pad0;
    // ---- 8-byte fields
    const float* scores;     // [tokens, score_stride]; only the first tok_len read
    const int32_t* table;    // as for the score kernel (read only with `slots`)
    const int32_t* tok_seq;
    const int32_t* tok_len;
    int32_t* positions;      // [tokens, topk] ascending positions, -1 past; or null
    int32_t* slots;          // [tokens, topk] the same as pool slots
                             // (block * block_size + offset), -1 past; or null
};
#define MLA_INDEX_TOPK_PARAMS_SIZE 72
static_assert(sizeof(MlaIndexTopkParams) == MLA_INDEX_TOPK_PARAMS_SIZE, "update params.rs");
static_assert(offsetof(MlaIndexTopkParams, scores) == 24, "update params.rs");

// Mirrored by `ScatterParams` in src/backend/cuda/params.rs.
// Grid: (ceil(rows * row_words / MLA_INDEX_SCATTER_THREADS) capped), threads loop.
struct MlaScatterParams {
    // ---- 4-byte fields
    int32_t rows;
    int32_t row_words;     // 32-bit words per row
    // ---- 8-byte fields
    const uint32_t* src;   // [rows, row_words]
    const int32_t* slots;  // [rows] destination row of each source row (negative: skipped)
    uint32_t* dst;         // row s at dst + s * row_words
};
#define MLA_SCATTER_PARAMS_SIZE 32
static_assert(sizeof(MlaScatterParams) == MLA_SCATTER_PARAMS_SIZE, "update params.rs");

namespace mla {

// A float's place in f32 totalOrder (Rust's f32::total_cmp) as an unsigned
// key: negative values (sign set) reversed, positive ones above them, so a
// larger key is a larger score, -0 < +0, and NaNs sit past the infinities.
__device__ __forceinline__ uint32_t index_order_key(float x) {
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Codes 0 and 2 of a word (codes 1 and 3: pass it shifted right by 8) as the
// f16 pair of their values / 256: e4m3_to_float's mapping, two at a time
// and without its final scaling (exact: a power of two).
__device__ __forceinline__ uint32_t index_e4m3_pair(uint32_t c) {
    return ((c & 0x00800080u) << 8) | ((c & 0x007f007fu) << 7);
}
__device__ __forceinline__ float index_half_lo(uint32_t h) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xffffu)));
}
__device__ __forceinline__ float index_half_hi(uint32_t h) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h >> 16)));
}

// Hides a register's value from the compiler, so work derived from it is
// redone where it is used instead of hoisted out of the loop around it (the
// score kernel's key conversions: hoisted, 128 floats stay live and spill).
#ifdef MLA_EMULATE
#define MLA_INDEX_OPAQUE(x) ((void)0)
#else
#define MLA_INDEX_OPAQUE(x) asm volatile("" : "+r"(x))
#endif

// The pool slot of position `i` of a sequence whose block table row is `row`.
__device__ __forceinline__ int32_t index_slot(const int32_t* row, int block_size, int i) {
    return row[i / block_size] * block_size + i % block_size;
}

}  // namespace mla

// Rows of 32-bit words to their slots: word i of the source goes to word
// i % row_words of row slots[i / row_words] (negative: skipped, as
// mla_append skips it).
extern "C" __global__ void __launch_bounds__(MLA_INDEX_SCATTER_THREADS)
    mla_index_scatter(const __grid_constant__ MlaScatterParams p) {
    const int64_t total = (int64_t)p.rows * p.row_words;
    const int64_t step = (int64_t)gridDim.x * MLA_INDEX_SCATTER_THREADS;
    for (int64_t i = (int64_t)blockIdx.x * MLA_INDEX_SCATTER_THREADS + threadIdx.x; i < total; i += step) {
        const int64_t r = i / p.row_words;
        const int64_t c = i - r * p.row_words;
        const int32_t slot = p.slots[r];
        if (slot >= 0) p.dst[(int64_t)slot * p.row_words + c] = p.src[i];
    }
}

// One key per thread, MLA_INDEX_SCORE_KEYS keys of one token per block. The
// key's codes stay in registers (as 32-bit words); the token's query rows
// go through shared memory 16 heads at a time, read by every thread at the
// same address (broadcast). The occupancy hint (4 blocks, <= 128 registers)
// is what keeps ptxas from spilling a few bytes for sm_100a, where its own
// choice is 96 registers.
extern "C" __global__ void __launch_bounds__(MLA_INDEX_SCORE_KEYS, 4)
    mla_index_score(const __grid_constant__ MlaIndexScoreParams p) {
    constexpr int HT = 16;                     // heads per tile
    constexpr int WORDS = MLA_INDEX_MAX_DIM / 4;  // code words per key, at most
    __shared__ float4 qs4[HT][MLA_INDEX_MAX_DIM / 4];
    float* const qs = &qs4[0][0].x;  // [HT][MLA_INDEX_MAX_DIM]
    __shared__ float ws[HT];
    const int tid = threadIdx.x;
    const int t = blockIdx.y;
    const int len = p.tok_len[t];
    const int s0 = blockIdx.x * MLA_INDEX_SCORE_KEYS;
    // The whole block has nothing to score (a shorter token of the grid).
    if (s0 >= len) return;
    const int s = s0 + tid;
    const bool valid = s < len;
    const int dim = p.dim, nw = dim / 4;

    uint32_t kw[WORDS];
    float k_scale = 0.f;
    if (valid) {
        const int32_t blk = p.table[(int64_t)p.tok_seq[t] * p.table_stride + s / p.block_size];
        const int64_t slot = (int64_t)blk * p.block_size + s % p.block_size;
        const uint8_t* row = p.keys + slot * p.row_bytes;
        const uint32_t* rw = reinterpret_cast<const uint32_t*>(row);
#pragma unroll
        for (int j = 0; j < WORDS; ++j) kw[j] = j < nw ? rw[j] : 0u;
        k_scale = *reinterpret_cast<const float*>(row + dim);
    } else {
#pragma unroll
        for (int j = 0; j < WORDS; ++j) kw[j] = 0u;
    }

    const float* qt = p.q + (int64_t)t * p.heads * dim;
    const float* wt = p.w + (int64_t)t * p.heads;
    float total = 0.f;
    for (int h0 = 0; h0 < p.heads; h0 += HT) {
        const int nh = min(HT, p.heads - h0);
        // The previous tile's rows are read by every thread before they go.
        __syncthreads();
        for (int i = tid; i < HT * dim; i += MLA_INDEX_SCORE_KEYS) {
            const int h = i / dim, d = i - h * dim;
            qs[h * MLA_INDEX_MAX_DIM + d] = h < nh ? qt[(int64_t)(h0 + h) * dim + d] : 0.f;
        }
        if (tid < HT) ws[tid] = tid < nh ? wt[h0 + tid] : 0.f;
        __syncthreads();
        float acc[HT];
#pragma unroll
        for (int h = 0; h < HT; ++h) acc[h] = 0.f;
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
            if (j < nw) {
                uint32_t c = kw[j];
                MLA_INDEX_OPAQUE(c);
                // The codes' values / 256 (the 256 is applied to the score).
                const uint32_t h02 = mla::index_e4m3_pair(c), h13 = mla::index_e4m3_pair(c >> 8);
                const float k0 = mla::index_half_lo(h02), k2 = mla::index_half_hi(h02);
                const float k1 = mla::index_half_lo(h13), k3 = mla::index_half_hi(h13);
#pragma unroll
                for (int h = 0; h < HT; ++h) {
                    const float4 qv = qs4[h][j];
                    float a = acc[h];
                    a = fmaf(qv.x, k0, a);
                    a = fmaf(qv.y, k1, a);
                    a = fmaf(qv.z, k2, a);
                    a = fmaf(qv.w, k3, a);
                    acc[h] = a;
                }
            }
        }
#pragma unroll
        for (int h = 0; h < HT; ++h)
            if (h < nh) total += ws[h] * fmaxf(acc[h], 0.f);
    }
    if (valid) p.scores[(int64_t)t * p.score_stride + s] = k_scale * (256.f * total);
}

// mla_index_score on tensor cores, for heads of a multiple of 16 values
// (V3.2's 128): MLA_INDEX_MMA_KEYS keys of one token per block, 4 warps. The
// keys' codes and the query's E4M3 values are bf16 values exactly, so
// `mma.sync` m16n8k16 bf16 multiplies them exactly and sums in f32 (only
// the order of the sums differs from the CPU, as in the kernel above).
// Per tile of 64 heads, warp w takes heads 16w..16w+15 against all the
// block's keys: relu, the head weights, and the sum over its 16 heads (a
// lane holds two heads of two keys of each 8-key column tile; shuffles add
// the 8 lane groups); the warps' sums then meet in shared memory. Rows of
// the shared tiles are padded by 8 bf16 so that the 32 lanes of a fragment
// load hit 32 banks.
extern "C" __global__ void __launch_bounds__(128)
    mla_index_score_mma(const __grid_constant__ MlaIndexScoreParams p) {
    constexpr int KEYS = MLA_INDEX_MMA_KEYS, HT = 64, LD = MLA_INDEX_MAX_DIM + 8;
    constexpr int NT = KEYS / 8;  // 8-key column tiles
    __align__(16) __shared__ uint16_t ks[KEYS][LD];
    __align__(16) __shared__ uint16_t qs[HT][LD];
    __shared__ float ws[HT], kscale[KEYS], partial[4][KEYS];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, q4 = lane % 4;
    const int t = blockIdx.y, len = p.tok_len[t], s0 = blockIdx.x * KEYS, dim = p.dim;
    if (s0 >= len) return;  // the whole block: a shorter token of the grid
    // The keys as bf16 (zero past the token's candidates), two threads a key.
    {
        const int k = tid / 2, half = tid % 2, s = s0 + k;
        const int per = dim / 2;  // codes per thread
        uint16_t* dst = &ks[k][half * per];
        float scale = 0.f;
        if (s < len) {
            const int32_t* row_of = p.table + (int64_t)p.tok_seq[t] * p.table_stride;
            const uint8_t* row = p.keys + (int64_t)mla::index_slot(row_of, p.block_size, s) * p.row_bytes;
            const uint32_t* rw = reinterpret_cast<const uint32_t*>(row + half * per);
            for (int j = 0; j < per / 4; ++j) {
                const uint32_t c = rw[j];
                for (int b = 0; b < 4; ++b)
                    dst[4 * j + b] = mla::bf16_bits(mla::e4m3_to_float((c >> (8 * b)) & 0xffu));
            }
            scale = *reinterpret_cast<const float*>(row + dim);
        } else {
            for (int j = 0; j < per; ++j) dst[j] = 0;
        }
        if (half == 0) kscale[k] = scale;
    }
    const float* qt = p.q + (int64_t)t * p.heads * dim;
    const float* wt = p.w + (int64_t)t * p.heads;
    // Per lane: the sums of its keys 8 * nt + 2 * q4 (+1) over the heads.
    float tot[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) tot[nt][0] = tot[nt][1] = 0.f;
    for (int h0 = 0; h0 < p.heads; h0 += HT) {
        const int nh = min(HT, p.heads - h0);
        __syncthreads();  // the keys are in; the previous tile is read
        for (int i = tid; i < HT * dim; i += 128) {
            const int h = i / dim, d = i - h * dim;
            qs[h][d] = h < nh ? mla::bf16_bits(qt[(int64_t)(h0 + h) * dim + d]) : (uint16_t)0;
        }
        if (tid < HT) ws[tid] = tid < nh ? wt[h0 + tid] : 0.f;
        __syncthreads();
        if (16 * warp >= nh) continue;  // this warp's heads are all padding
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
        const int r0 = 16 * warp + g;
        for (int k0 = 0; k0 < dim; k0 += 16) {
            uint32_t a[4];
            a[0] = *reinterpret_cast<const uint32_t*>(&qs[r0][k0 + 2 * q4]);
            a[1] = *reinterpret_cast<const uint32_t*>(&qs[r0 + 8][k0 + 2 * q4]);
            a[2] = *reinterpret_cast<const uint32_t*>(&qs[r0][k0 + 2 * q4 + 8]);
            a[3] = *reinterpret_cast<const uint32_t*>(&qs[r0 + 8][k0 + 2 * q4 + 8]);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&ks[8 * nt + g][k0 + 2 * q4]);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&ks[8 * nt + g][k0 + 2 * q4 + 8]);
                mla::OpBf16::mma(acc[nt], a, b0, b1);
            }
        }
        // Rows r0 and r0 + 8 (heads), columns 8 nt + 2 q4 (+1) (keys).
        const float w0 = ws[r0], w1 = ws[r0 + 8];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            for (int c = 0; c < 2; ++c)
                tot[nt][c] += w0 * fmaxf(acc[nt][c], 0.f) + w1 * fmaxf(acc[nt][2 + c], 0.f);
    }
    // Sum over the 8 lane groups (heads), then over the warps.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        for (int c = 0; c < 2; ++c) {
            float v = tot[nt][c];
            for (int off = 4; off < 32; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (g == 0) partial[warp][8 * nt + 2 * q4 + c] = v;
        }
    __syncthreads();
    if (tid < KEYS && s0 + tid < len) {
        const float sum = partial[0][tid] + partial[1][tid] + partial[2][tid] + partial[3][tid];
        p.scores[(int64_t)t * p.score_stride + s0 + tid] = kscale[tid] * sum;
    }
}

// One token per block. A token with more than `topk` candidates: a radix
// select over the order keys (four passes of 8 bits, a shared histogram of
// the keys that agree with the bits chosen so far) finds the key T of the
// topk-th best and `need`, how many keys equal to T are kept (the earliest
// ones); one ordered pass then writes every position with a key above T and
// the first `need` equal to it, ranked by a block-wide prefix count (warp
// ballots, then the warps' totals through shared memory). Nothing depends
// on the order the threads run in. (The occupancy hint of one block lets
// ptxas use the registers it needs: left alone it chose 32 for sm_80 and
// spilled.)
extern "C" __global__ void __launch_bounds__(MLA_INDEX_TOPK_THREADS, 1)
    mla_index_topk(const __grid_constant__ MlaIndexTopkParams p) {
    constexpr int THREADS = MLA_INDEX_TOPK_THREADS, WARPS = THREADS / 32;
    static_assert(THREADS >= 256 && THREADS % 32 == 0, "one histogram bin per thread");
    __shared__ int hist[256];
    __shared__ int group[16];  // the sums of 16 bins
    __shared__ int pick[2];    // the pass's digit, and how many of it to keep
    __shared__ int warp_gt[2][WARPS], warp_eq[2][WARPS];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int t = blockIdx.x;
    const int n = p.tok_len[t];
    const int topk = p.topk;
    const float* sc = p.scores + (int64_t)t * p.score_stride;
    int32_t* const pos_out = p.positions ? p.positions + (int64_t)t * topk : nullptr;
    int32_t* const slot_out = p.slots ? p.slots + (int64_t)t * topk : nullptr;
    const int32_t* const row = p.slots ? p.table + (int64_t)p.tok_seq[t] * p.table_stride : nullptr;

    if (n <= topk) {
        for (int i = tid; i < topk; i += THREADS) {
            if (pos_out) pos_out[i] = i < n ? i : -1;
            if (slot_out) slot_out[i] = i < n ? mla::index_slot(row, p.block_size, i) : -1;
        }
        return;
    }

    // ---- the threshold key, 8 bits a pass from the top
    uint32_t prefix = 0;
    int remaining = topk;  // still to take among the keys matching `prefix`
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        const uint32_t high = pass == 0 ? 0u : 0xffffffffu << (shift + 8);
        if (tid < 256) hist[tid] = 0;
        __syncthreads();
        // Scores of one magnitude share their top bits: the lanes of a warp
        // with the same digit add once, through their leader (shared-memory
        // atomics on one address serialize).
        for (int c = 0; c < n; c += THREADS) {
            const int i = c + tid;
            const uint32_t u = i < n ? mla::index_order_key(sc[i]) : 0u;
            const bool in = i < n && ((u ^ prefix) & high) == 0;
            const uint32_t digit = in ? (u >> shift) & 0xffu : 256u;
            const unsigned peers = __match_any_sync(0xffffffffu, digit);
            if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
        }
        __syncthreads();
        if (tid < 16) {
            int sum = 0;
            for (int k = 0; k < 16; ++k) sum += hist[16 * tid + k];
            group[tid] = sum;
        }
        __syncthreads();
        if (tid < 16) {
            // Exactly one group holds the remaining-th largest key.
            int above = 0;
            for (int g = tid + 1; g < 16; ++g) above += group[g];
            if (above < remaining && remaining <= above + group[tid]) {
                for (int k = 15; k >= 0; --k) {
                    const int c = hist[16 * tid + k];
                    if (above + c >= remaining) {
                        pick[0] = 16 * tid + k;
                        pick[1] = remaining - above;
                        break;
                    }
                    above += c;
                }
            }
        }
        __syncthreads();
        prefix |= (uint32_t)pick[0] << shift;
        remaining = pick[1];
    }
    const uint32_t T = prefix;
    const int need = remaining;  // >= 1

    // ---- the kept positions in order; the warps' totals alternate between
    // two buffers, so one barrier a chunk keeps a buffer until all have read it.
    int out_base = 0, eq_base = 0;
    const unsigned below = (1u << lane) - 1u;
    for (int c = 0, b = 0; c < n && out_base < topk; c += THREADS, b ^= 1) {
        const int i = c + tid;
        const uint32_t u = i < n ? mla::index_order_key(sc[i]) : 0u;
        const bool gt = i < n && u > T, eq = i < n && u == T;
        const unsigned bg = __ballot_sync(0xffffffffu, gt);
        const unsigned be = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) {
            warp_gt[b][warp] = __popc(bg);
            warp_eq[b][warp] = __popc(be);
        }
        __syncthreads();
        int gt_before = __popc(bg & below), eq_before = __popc(be & below);
        int gt_total = 0, eq_total = 0;
        for (int w = 0; w < WARPS; ++w) {
            const int g = warp_gt[b][w], e = warp_eq[b][w];
            if (w < warp) {
                gt_before += g;
                eq_before += e;
            }
            gt_total += g;
            eq_total += e;
        }
        // Equal keys still to take: those ranked below `need` overall.
        const int eq_left = max(0, need - eq_base);
        if (gt || (eq && eq_before < eq_left)) {
            const int o = out_base + gt_before + min(eq_before, eq_left);
            if (pos_out) pos_out[o] = i;
            if (slot_out) slot_out[o] = mla::index_slot(row, p.block_size, i);
        }
        out_base += gt_total + min(eq_total, eq_left);
        eq_base += eq_total;
    }
}
