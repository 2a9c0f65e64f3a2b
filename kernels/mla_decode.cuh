// Split-KV flash decode for MLA (one KV head, V = the first 512 dims of K).
//
// One block takes one work item (a group's keys [start, end)) for 16 * RG
// of the group's query rows: RG = 1 (4 warps, 16 rows; any GPU) or RG = 4
// (8 warps, 64 rows; 162 KiB of shared memory: A100, H100/H200, B200),
// which reads each K tile once for 64 heads instead of 16. Warp w owns
// row group w / (WARPS / RG) and a slice of the value columns. Per 32-key tile:
//   S  = Q Kᵀ   each warp 4 / (WARPS / RG) 16x8 slices over all d_qk (mma.sync m16n8k16)
//   P  = online softmax of S in f32, rounded to the operand type
//   O += P V    each warp 512 / (WARPS / RG) value columns of its 16 rows (ldmatrix.trans)
// K tiles are double-buffered: cp.async for BF16/F16 caches, a converting
// load (FP8 dequantized with its tile scales, F32 rounded) otherwise. Keys
// that are masked or past the item's end are zero-filled in shared memory,
// so NaN-poisoned unused slots are never read.
//
// A group with one item writes the output (sink applied) and lse; otherwise
// the item writes its normalized partial output and lse for mla_combine.
//
// WG (Hopper, sm_90a; 64 rows, two warpgroups): the same block with both
// GEMMs on wgmma, operands read from shared memory in place. Q, K and P
// tiles are then kept as 8x8 core matrices (tile_at); warpgroup w computes
// S for all 32 keys over half of d_qk (the softmax adds the halves), and
// O for value columns 256w..256w+255.
#pragma once
#include "mla_keys.cuh"
#include "mla_math.cuh"

#define MLA_DV 512
#define MLA_ROWS 16      // rows of one row group (one m16 tile)
#define MLA_TOKENS 32
#define MLA_THREADS 128  // threads of an RG = 1 block; RG = 4 blocks have 256
#define MLA_ERR_LAUNCH 8  // the block got less shared memory than it needs, or a
                          // wgmma kernel ran on a GPU without wgmma

namespace mla {

// Threads of a block with RG row groups.
template <int RG>
struct Shape {
    static constexpr int WARPS = RG == 1 ? 4 : 8;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int ROWS = MLA_ROWS * RG;
    static constexpr int COL_GROUPS = WARPS / RG;         // warps sharing a row group
    static constexpr int NT = MLA_DV / COL_GROUPS / 8;    // value n-tiles per warp
    static constexpr int S_TILES = (MLA_TOKENS / 8) / COL_GROUPS;  // S n-tiles per warp
    static constexpr int TPR = THREADS / ROWS;            // softmax threads per row
    static constexpr int KPT = MLA_TOKENS / TPR;          // keys per softmax thread
};
static_assert(Shape<1>::S_TILES == 1 && Shape<4>::S_TILES == 2, "S partition");
static_assert(Shape<1>::KPT == 4 && Shape<4>::KPT == 8, "softmax partition");

// FP8 caches are staged raw: cp.async copies each key row's bytes (V32: 656;
// MODEL1: 576 data + its 8 scale bytes, padded to 592) for the next tile
// while the current one computes, then the block converts them to bf16.
template <int KV>
struct Raw {
    static constexpr bool ON = KV == MLA_KV_FP8_V32 || KV == MLA_KV_FP8_MODEL1;
    static constexpr int ROW = KV == MLA_KV_FP8_V32 ? 656 : 592;
    static constexpr int BYTES = ON ? MLA_TOKENS * ROW : 0;
    static constexpr int K_BUFFERS = ON ? 1 : 2;  // bf16 K tiles in shared memory
};

// Shared-memory layout; row strides padded by 8 elements (16 bytes) so the
// fragment loads and ldmatrix hit 32 different banks.
// WG tiles are unpadded core matrices (wgmma reads them whole).
template <int DQK, int RG, int KV, bool WG = false>
struct Smem {
    static_assert(!WG || RG == 4, "wgmma blocks have 64 rows");
    static constexpr int ROWS = MLA_ROWS * RG;
    static constexpr int KSTRIDE = WG ? DQK : DQK + 8;    // elements
    static constexpr int SSTRIDE = MLA_TOKENS + 4;        // floats
    static constexpr int PSTRIDE = WG ? MLA_TOKENS : MLA_TOKENS + 8;  // elements
    static constexpr int Q = 0;
    static constexpr int K = Q + ROWS * KSTRIDE * 2;
    static constexpr int RAW = K + Raw<KV>::K_BUFFERS * MLA_TOKENS * KSTRIDE * 2;
    static constexpr int S = RAW + Raw<KV>::BYTES;
    static constexpr int S_PLANES = WG ? 2 : 1;  // WG: one per half of d_qk
    static constexpr int P = S + S_PLANES * ROWS * SSTRIDE * 4;
    static constexpr int TOK_ROW = P + ROWS * PSTRIDE * 2;  // [2][32] row pointers
    static constexpr int TOK_AUX = TOK_ROW + 2 * MLA_TOKENS * 8;  // [2][32] scale pointers
    static constexpr int ROW_M = TOK_AUX + 2 * MLA_TOKENS * 8;
    static constexpr int ROW_L = ROW_M + ROWS * 4;
    static constexpr int ROW_SCALE = ROW_L + ROWS * 4;
    static constexpr int ROW_LIMIT = ROW_SCALE + ROWS * 4;
    static constexpr int BYTES = ROW_LIMIT + ROWS * 4;
    static_assert(K % 16 == 0 && RAW % 16 == 0 && S % 16 == 0 && TOK_ROW % 16 == 0, "alignment");
};
static_assert(Smem<576, 1, MLA_KV_BF16>::BYTES == 98304, "update launch.rs: decode_smem_bytes");
static_assert(Smem<512, 1, MLA_KV_BF16>::BYTES == 88064, "update launch.rs: decode_smem_bytes");
static_assert(Smem<576, 4, MLA_KV_BF16>::BYTES == 165888, "update launch.rs: decode_smem_bytes");
static_assert(Smem<512, 4, MLA_KV_BF16>::BYTES == 149504, "update launch.rs: decode_smem_bytes");
static_assert(Smem<576, 1, MLA_KV_FP8_V32>::BYTES == 81920, "update launch.rs: decode_smem_bytes");
static_assert(Smem<576, 4, MLA_KV_FP8_V32>::BYTES == 149504, "update launch.rs: decode_smem_bytes");
static_assert(Smem<512, 1, MLA_KV_FP8_MODEL1>::BYTES == 73728, "update launch.rs: decode_smem_bytes");
static_assert(Smem<512, 4, MLA_KV_FP8_MODEL1>::BYTES == 135168, "update launch.rs: decode_smem_bytes");
static_assert(Smem<576, 4, MLA_KV_BF16, true>::BYTES == 172032, "update launch.rs: decode_smem_bytes");
static_assert(Smem<512, 4, MLA_KV_BF16, true>::BYTES == 155648, "update launch.rs: decode_smem_bytes");
static_assert(Smem<576, 4, MLA_KV_FP8_V32, true>::BYTES == 156160, "update launch.rs: decode_smem_bytes");
static_assert(Smem<512, 4, MLA_KV_FP8_MODEL1, true>::BYTES == 141824, "update launch.rs: decode_smem_bytes");

// Element offset of (row r, column k) in a tile whose rows are STRIDE
// elements apart; for wgmma, in the canonical layout instead: 8x8 core
// matrices of 64 contiguous elements, row block r / 8 holding STRIDE / 8 of
// them in column order.
template <bool WG, int STRIDE>
__device__ __forceinline__ int tile_at(int r, int k) {
    if constexpr (WG) {
        return ((r >> 3) * (STRIDE >> 3) + (k >> 3)) * 64 + (r & 7) * 8 + (k & 7);
    } else {
        return r * STRIDE + k;
    }
}

__device__ __forceinline__ uint32_t dyn_smem_bytes() {
#ifdef MLA_EMULATE
    return emu::st().dyn_smem;
#else
    uint32_t r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
#endif
}

// Fills a K buffer with the keys whose row pointers are in `rows` (BF16/F16
// by cp.async, F32 converted; FP8 goes through issue_raw/convert_raw).
template <int KV, int DQK, typename Op, int THREADS, bool WG>
__device__ __forceinline__ void load_tile(typename Op::T* ks, const uint8_t* const* rows,
                                          const uint8_t* const* aux) {
    using T = typename Op::T;
    constexpr int KS = WG ? DQK : DQK + 8;
    static_assert(!Raw<KV>::ON, "FP8 tiles are staged raw");
    const int tid = threadIdx.x;
    if constexpr (KV == MLA_KV_BF16 || KV == MLA_KV_F16) {
        constexpr int PER_ROW = DQK / 8;  // 16-byte pieces
        for (int c = tid; c < MLA_TOKENS * PER_ROW; c += THREADS) {
            // WG: eight keys' same piece per 8 threads, so the block writes
            // its core matrices in address order.
            const int t = WG ? (c / (8 * PER_ROW)) * 8 + (c & 7) : c / PER_ROW;
            const int part = WG ? (c >> 3) % PER_ROW : c % PER_ROW;
            T* dst = ks + tile_at<WG, KS>(t, part * 8);
            if (rows[t]) {
                cp_async_16(dst, rows[t] + part * 16);
            } else {
                *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
            }
        }
    } else {
        constexpr int PER_ROW = DQK / 4;
        for (int c = tid; c < MLA_TOKENS * PER_ROW; c += THREADS) {
            const int t = c / PER_ROW, part = c % PER_ROW;
            uint2 v = make_uint2(0, 0);
            if (rows[t]) {
                const float4 f = __ldg(reinterpret_cast<const float4*>(rows[t]) + part);
                v = make_uint2(Op::pack(f.x, f.y), Op::pack(f.z, f.w));
            }
            *reinterpret_cast<uint2*>(ks + tile_at<WG, KS>(t, part * 4)) = v;
        }
    }
}

// Starts the copies of the raw FP8 rows of one tile into `raw` (rows whose
// pointer is null are skipped; convert_raw zero-fills them).
template <int KV, int THREADS>
__device__ __forceinline__ void issue_raw(uint8_t* raw, const uint8_t* const* rows,
                                          const uint8_t* const* aux) {
    constexpr bool V32 = KV == MLA_KV_FP8_V32;
    constexpr int PIECES = V32 ? 41 : 37;  // 16-byte pieces (MODEL1: 36 + the 8 scale bytes)
    for (int c = threadIdx.x; c < MLA_TOKENS * PIECES; c += THREADS) {
        const int t = c / PIECES, part = c % PIECES;
        if (!rows[t]) continue;
        uint8_t* dst = raw + t * Raw<KV>::ROW + part * 16;
        if (!V32 && part == 36) {
            cp_async_8(dst, aux[t]);
        } else {
            cp_async_16(dst, rows[t] + part * 16);
        }
    }
}

// Dequantizes a staged raw tile into bf16 key rows.
template <int KV, int DQK, typename Op, int THREADS, bool WG>
__device__ __forceinline__ void convert_raw(typename Op::T* ks, const uint8_t* raw,
                                            const uint8_t* const* rows) {
    constexpr int KS = WG ? DQK : DQK + 8;
    constexpr bool V32 = KV == MLA_KV_FP8_V32;
    constexpr int NOPE = V32 ? 512 : 448;
    constexpr int TILE = V32 ? 128 : 64;
    constexpr int ROPE_AT = V32 ? 528 : 448;
    constexpr int SCALES_AT = V32 ? 512 : 576;
    constexpr int PIECES = NOPE / 16 + 8;
    for (int c = threadIdx.x; c < MLA_TOKENS * PIECES; c += THREADS) {
        // WG: consecutive threads take consecutive keys, so each 8 of them
        // store one core matrix's 128 contiguous bytes (no bank conflicts).
        const int t = WG ? c % MLA_TOKENS : c / PIECES;
        const int part = WG ? c / MLA_TOKENS : c % PIECES;
        const uint8_t* row = raw + t * Raw<KV>::ROW;
        const bool live = rows[t] != nullptr;
        if (part < NOPE / 16) {
            uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
            if (live) {
                const int tile = part * 16 / TILE;
                const float scale = V32 ? reinterpret_cast<const float*>(row + SCALES_AT)[tile]
                                        : ue8m0_to_float(row[SCALES_AT + tile]);
                const uint4 codes = reinterpret_cast<const uint4*>(row)[part];
                const uint32_t w[4] = {codes.x, codes.y, codes.z, codes.w};
                uint32_t o[8];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    o[2 * i] = Op::pack(e4m3_to_float(w[i] & 0xff) * scale,
                                        e4m3_to_float((w[i] >> 8) & 0xff) * scale);
                    o[2 * i + 1] = Op::pack(e4m3_to_float((w[i] >> 16) & 0xff) * scale,
                                            e4m3_to_float(w[i] >> 24) * scale);
                }
                lo = make_uint4(o[0], o[1], o[2], o[3]);
                hi = make_uint4(o[4], o[5], o[6], o[7]);
            }
            *reinterpret_cast<uint4*>(ks + tile_at<WG, KS>(t, part * 16)) = lo;
            *reinterpret_cast<uint4*>(ks + tile_at<WG, KS>(t, part * 16 + 8)) = hi;
        } else {
            const int r = part - NOPE / 16;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (live) v = reinterpret_cast<const uint4*>(row + ROPE_AT)[r];
            *reinterpret_cast<uint4*>(ks + tile_at<WG, KS>(t, NOPE + r * 8)) = v;
        }
    }
}

template <int KV, int DQK, typename Op, int RG, bool WG>
__device__ __forceinline__ void decode_item(const MlaParams& p, int item_ix, int row0,
                                            uint8_t* smem) {
    using T = typename Op::T;
    using L = Smem<DQK, RG, KV, WG>;
    using B = Shape<RG>;
    constexpr int ROWS = B::ROWS;
    constexpr int KS = L::KSTRIDE;
    constexpr int ROW_BYTES = KV == MLA_KV_BF16 || KV == MLA_KV_F16 ? DQK * 2
                            : KV == MLA_KV_F32                       ? DQK * 4
                            : KV == MLA_KV_FP8_V32                   ? 656
                                                                     : 576;
    const int R = p.rows_per_group;
    T* qs = reinterpret_cast<T*>(smem + L::Q);
    T* kbuf = reinterpret_cast<T*>(smem + L::K);
    uint8_t* raw = smem + L::RAW;
    float* ss = reinterpret_cast<float*>(smem + L::S);
    T* ps = reinterpret_cast<T*>(smem + L::P);
    const uint8_t** tok_row = reinterpret_cast<const uint8_t**>(smem + L::TOK_ROW);
    const uint8_t** tok_aux = reinterpret_cast<const uint8_t**>(smem + L::TOK_AUX);
    float* row_m = reinterpret_cast<float*>(smem + L::ROW_M);
    float* row_l = reinterpret_cast<float*>(smem + L::ROW_L);
    float* row_scale = reinterpret_cast<float*>(smem + L::ROW_SCALE);
    int* row_limit = reinterpret_cast<int*>(smem + L::ROW_LIMIT);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, q4 = lane % 4;  // mma fragment row group / quad
    // This warp's 16-row group and column group (WG: warp w of warpgroup
    // cg holds rows 16w..16w+15 of the warpgroup's accumulators).
    const int rg = WG ? warp % 4 : warp / B::COL_GROUPS;
    const int cg = WG ? warp / 4 : warp % B::COL_GROUPS;

    const int4 item = p.items[item_ix];
    const int g = item.x, kstart = item.y, kend = item.z, splits = item.w;
    const int n_main = main_keys(p, g);
    const int n_all = n_main + extra_keys(p, g);

    // Queries of this block's rows, converted to the operand type; rows past
    // the group are zero.
    const int64_t q_row0 = (int64_t)g * R + row0;
    for (int i = tid; i < ROWS * DQK; i += B::THREADS) {
        const int r = i / DQK, k = i % DQK;
        float v = 0.f;
        if (row0 + r < R) v = load_elem(p.q, p.q_dtype, (q_row0 + r) * DQK + k);
        qs[tile_at<WG, KS>(r, k)] = Op::from_float(v);
    }
    if (tid < ROWS) {
        const int r = row0 + tid;
        int limit = 0;
        if (r < R) {
            limit = n_all;
            if (!p.sparse && p.causal) limit = n_all - (p.s_q - 1 - r / p.h_q);
        }
        row_limit[tid] = limit;
        row_m[tid] = -INFINITY;
        row_l[tid] = 0.f;
    }

    // Key rows of the tile at `start` into slot `buf` (warp 0).
    auto locate_tile = [&](int start, int buf) {
        if (warp == 0) {
            const int j = start + lane;
            const uint8_t* row = nullptr;
            const uint8_t* aux = nullptr;
            const uint8_t* block;
            int slot, bs;
            if (j < kend && locate_key(p, g, n_main, j, &block, &slot, &bs)) {
                if (KV == MLA_KV_FP8_MODEL1) {
                    row = block + (int64_t)slot * 576;
                    aux = block + (int64_t)bs * 576 + (int64_t)slot * 8;
                } else {
                    row = block + (int64_t)slot * ROW_BYTES;
                }
            }
            tok_row[buf * MLA_TOKENS + lane] = row;
            tok_aux[buf * MLA_TOKENS + lane] = aux;
        }
    };

    float o[B::NT][4];
#pragma unroll
    for (int n = 0; n < B::NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

    const int tiles = (kend - kstart + MLA_TOKENS - 1) / MLA_TOKENS;
    if (tiles > 0) {
        locate_tile(kstart, 0);
        __syncthreads();
        if constexpr (Raw<KV>::ON) {
            issue_raw<KV, B::THREADS>(raw, tok_row, tok_aux);
        } else {
            load_tile<KV, DQK, Op, B::THREADS, WG>(kbuf, tok_row, tok_aux);
        }
        cp_async_commit();
    }
    for (int t = 0; t < tiles; ++t) {
        const int buf = t & 1;
        const int tstart = kstart + t * MLA_TOKENS;
        T* ks = kbuf;
        if constexpr (Raw<KV>::ON) {
            // This tile's raw rows landed: convert them, then start the next
            // tile's copies into the freed raw buffer.
            cp_async_wait<0>();
            __syncthreads();
            convert_raw<KV, DQK, Op, B::THREADS, WG>(kbuf, raw, tok_row + buf * MLA_TOKENS);
            if constexpr (WG) fence_async_smem();  // for wgmma's reads
            __syncthreads();
            if (t + 1 < tiles) {
                locate_tile(tstart + MLA_TOKENS, buf ^ 1);
                __syncthreads();
                issue_raw<KV, B::THREADS>(raw, tok_row + (buf ^ 1) * MLA_TOKENS,
                                          tok_aux + (buf ^ 1) * MLA_TOKENS);
                cp_async_commit();
            }
        } else {
            ks = kbuf + buf * MLA_TOKENS * KS;
            // Prefetch the next tile into the other buffer.
            if (t + 1 < tiles) {
                locate_tile(tstart + MLA_TOKENS, buf ^ 1);
                __syncthreads();
                load_tile<KV, DQK, Op, B::THREADS, WG>(kbuf + (buf ^ 1) * MLA_TOKENS * KS,
                                                   tok_row + (buf ^ 1) * MLA_TOKENS,
                                                   tok_aux + (buf ^ 1) * MLA_TOKENS);
            }
            cp_async_commit();   // (possibly empty) group of the next tile
            cp_async_wait<1>();  // this tile's group has landed
            if constexpr (WG) fence_async_smem();  // for wgmma's reads
            __syncthreads();
        }

        // S = Q Kᵀ: this warp's S_TILES x 8 keys against its 16 rows.
        if constexpr (WG) {
            // Warpgroup cg: all 32 keys of the 64 rows over half of d_qk,
            // into its own plane of S (the softmax adds the two). N = 32 per
            // wgmma reads each Q slice for twice the keys that splitting the
            // keys would, and shared-memory bandwidth bounds this GEMM.
            // Descriptors advance by k (16-byte units: k / 8 core matrices
            // of 128 bytes); a row block of core matrices spans DQK / 8.
            float s[16] = {};
#ifdef MLA_HAS_WGMMA
            constexpr int HALF = DQK / 2;
            constexpr uint32_t ROW_BLOCK = (DQK / 8) * 128;
            const uint64_t da = wg_desc(qs, 128, ROW_BLOCK) + cg * HALF;
            const uint64_t db = wg_desc(ks, 128, ROW_BLOCK) + cg * HALF;
            wg_fence();
#pragma unroll 2
            for (int k = 0; k < HALF; k += 16) wgmma_n32<Op::F16, false>(s, da + k, db + k);
            wg_commit();
            wg_wait_all();
#endif
            float* plane = ss + cg * ROWS * L::SSTRIDE;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float* s0 = plane + (rg * 16 + gq) * L::SSTRIDE + j * 8 + q4 * 2;
                s0[0] = s[4 * j];
                s0[1] = s[4 * j + 1];
                s0[8 * L::SSTRIDE] = s[4 * j + 2];
                s0[8 * L::SSTRIDE + 1] = s[4 * j + 3];
            }
        } else {
            const T* q0 = qs + (rg * 16 + gq) * KS + q4 * 2;
            const T* q8 = q0 + 8 * KS;
            // Each Q fragment feeds all of this warp's S tiles.
            float s[B::S_TILES][4] = {};
#pragma unroll 2
            for (int k = 0; k < DQK; k += 16) {
                const uint32_t a[4] = {lds32(q0 + k), lds32(q8 + k), lds32(q0 + k + 8),
                                       lds32(q8 + k + 8)};
#pragma unroll
                for (int st = 0; st < B::S_TILES; ++st) {
                    const T* kr = ks + ((cg * B::S_TILES + st) * 8 + gq) * KS + q4 * 2;
                    Op::mma(s[st], a, lds32(kr + k), lds32(kr + k + 8));
                }
            }
#pragma unroll
            for (int st = 0; st < B::S_TILES; ++st) {
                const int key0 = (cg * B::S_TILES + st) * 8;
                float* s0 = ss + (rg * 16 + gq) * L::SSTRIDE + key0 + q4 * 2;
                s0[0] = s[st][0];
                s0[1] = s[st][1];
                s0[8 * L::SSTRIDE] = s[st][2];
                s0[8 * L::SSTRIDE + 1] = s[st][3];
            }
        }
        __syncthreads();

        // Online softmax: TPR threads per row, KPT keys each.
        {
            const int r = tid / B::TPR, sub = tid % B::TPR;
            const int limit = row_limit[r];
            const float m_old = row_m[r];
            float sv[B::KPT];
            float mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < B::KPT; ++i) {
                const int j = sub * B::KPT + i;
                const bool ok = tok_row[buf * MLA_TOKENS + j] != nullptr && tstart + j < limit;
                float sij = ss[r * L::SSTRIDE + j];
                if constexpr (WG) sij += ss[(ROWS + r) * L::SSTRIDE + j];
                sv[i] = ok ? sij * p.scale_log2 : -INFINITY;
                mx = fmaxf(mx, sv[i]);
            }
#pragma unroll
            for (int off = 1; off < B::TPR; off <<= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float m_new = fmaxf(m_old, mx);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;
            float sum = 0.f;
            uint32_t pk[B::KPT / 2];
#pragma unroll
            for (int i = 0; i < B::KPT; i += 2) {
                const float p0 = exp2f(sv[i] - m_use), p1 = exp2f(sv[i + 1] - m_use);
                sum += p0 + p1;
                pk[i / 2] = Op::pack(p0, p1);
            }
#pragma unroll
            for (int i = 0; i < B::KPT / 2; i += 2)
                *reinterpret_cast<uint2*>(ps + tile_at<WG, L::PSTRIDE>(r, sub * B::KPT + 2 * i)) =
                    make_uint2(pk[i], pk[i + 1]);
#pragma unroll
            for (int off = 1; off < B::TPR; off <<= 1)
                sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (sub == 0) {
                const float corr = exp2f(m_old - m_use);
                row_m[r] = m_new;
                row_l[r] = row_l[r] * corr + sum;
                row_scale[r] = corr;
            }
        }
        if constexpr (WG) fence_async_smem();  // P, for wgmma's reads
        __syncthreads();

        // O = O * corr + P V over this warp's value columns of its rows.
        {
            const float c0 = row_scale[rg * 16 + gq], c8 = row_scale[rg * 16 + gq + 8];
#pragma unroll
            for (int n = 0; n < B::NT; ++n) {
                o[n][0] *= c0;
                o[n][1] *= c0;
                o[n][2] *= c8;
                o[n][3] *= c8;
            }
            if constexpr (WG) {
#ifdef MLA_HAS_WGMMA
                // O(64 x 256 of warpgroup cg) += P V: A = P (K-major, 4 core
                // matrices per row block), B = V read N-major from the K tile
                // (LBO: the next 8 keys, SBO: the next 8 value columns).
                static_assert(B::NT == 32, "a warpgroup owns 256 value columns");
                constexpr uint32_t ROW_BLOCK = (DQK / 8) * 128;
                const uint64_t da = wg_desc(ps, 128, (MLA_TOKENS / 8) * 128);
                const uint64_t db = wg_desc(ks + cg * 32 * 64, ROW_BLOCK, 128);
                float(&acc)[128] = reinterpret_cast<float(&)[128]>(o);
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < MLA_TOKENS; kk += 16)
                    wgmma_n256<Op::F16, true>(acc, da + kk, db + kk * (DQK / 8));
                wg_commit();
                wg_wait_all();
#endif
            } else {
#pragma unroll
            for (int kk = 0; kk < MLA_TOKENS; kk += 16) {
                const T* p0 = ps + (rg * 16 + gq) * L::PSTRIDE + kk + q4 * 2;
                const uint32_t a[4] = {lds32(p0), lds32(p0 + 8 * L::PSTRIDE), lds32(p0 + 8),
                                       lds32(p0 + 8 * L::PSTRIDE + 8)};
                // ldmatrix rows: lanes 0-7 keys kk..+7, 8-15 keys kk+8..+15 (n-tile n),
                // 16-31 the same keys for n-tile n + 1.
                const int key = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
                const T* vrow = ks + key * KS + cg * (B::NT * 8) + (lane >> 4) * 8;
#pragma unroll
                for (int n = 0; n < B::NT; n += 2) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, vrow + n * 8);
                    Op::mma(o[n], a, b[0], b[1]);
                    Op::mma(o[n + 1], a, b[2], b[3]);
                }
            }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    // Normalize and write: the output itself when the group has one item,
    // else this item's partial result.
    const float LN2 = 0.69314718055994530942f;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int rl = rg * 16 + gq + half * 8;
        const int r = row0 + rl;
        if (r >= R) continue;
        const float l = row_l[rl];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const float lse = l > 0.f ? (row_m[rl] + log2f(l)) * LN2 : -INFINITY;
        float f = inv;
        const int h = p.sparse ? r : r % p.h_q;
        if (splits == 1 && p.sink) f *= 1.f / (1.f + expf(p.sink[h] - lse));
        if (l <= 0.f) f = 0.f;
        const int64_t orow = (int64_t)g * R + r;
#pragma unroll
        for (int n = 0; n < B::NT; ++n) {
            const int col = cg * (B::NT * 8) + n * 8 + q4 * 2;
            const float v0 = o[n][half * 2] * f, v1 = o[n][half * 2 + 1] * f;
            if (splits == 1) {
                store_pair(p.out, p.out_dtype, orow * MLA_DV + col, v0, v1);
            } else {
                float* dst = p.part_o + ((int64_t)item_ix * R + r) * MLA_DV + col;
                dst[0] = v0;
                dst[1] = v1;
            }
        }
        if (cg == 0 && q4 == 0) {
            if (splits == 1) {
                if (p.lse) {
                    const int b = p.sparse ? g / p.s_q : g;
                    const int i = p.sparse ? g % p.s_q : r / p.h_q;
                    p.lse[((int64_t)b * p.h_q + h) * p.s_q + i] = l > 0.f ? lse : INFINITY;
                }
            } else {
                p.part_lse[(int64_t)item_ix * R + r] = lse;
            }
        }
    }
}

template <int KV, int DQK, typename Op, int RG, bool WG = false>
__device__ __forceinline__ void decode_block(const MlaParams& p) {
    MLA_DYNAMIC_SMEM(smem);
#ifndef MLA_HAS_WGMMA
    if constexpr (WG) {
        // Built for a GPU without wgmma; the host launches these on sm_90 only.
        if (threadIdx.x == 0) report(p, MLA_ERR_LAUNCH);
        return;
    }
#endif
    if (dyn_smem_bytes() < (uint32_t)Smem<DQK, RG, KV, WG>::BYTES) {
        if (threadIdx.x == 0) report(p, MLA_ERR_LAUNCH);
        return;
    }
    const int row0 = blockIdx.y * Shape<RG>::ROWS;
    if (row0 >= p.rows_per_group) return;
    if constexpr (RG == 1) {
        // A persistent block: the items the plan dealt to this part, so a
        // memory-bound decode has no partly empty last wave.
        const int it_end = p.part_first[blockIdx.x + 1];
        for (int item_ix = p.part_first[blockIdx.x]; item_ix < it_end; ++item_ix) {
            decode_item<KV, DQK, Op, RG, false>(p, item_ix, row0, smem);
            __syncthreads();  // shared memory is reused by the next item
        }
    } else {
        // 64-row blocks run one item each: a loop around the body costs
        // registers these blocks do not have (they use ~240 of 255).
        if ((int)blockIdx.x < *p.num_items) decode_item<KV, DQK, Op, RG, WG>(p, blockIdx.x, row0, smem);
    }
}


}  // namespace mla
