// The elementwise steps of a layer forward kept on the GPU, one row per
// block: read `cols` values of a row (f32, or the caller's bf16/f16 hidden
// states; with a stride, so a column range of a wider row), optionally RMS-normalize them (DeepSeek's RMSNorm: x / sqrt(
// mean(x^2) + eps) * w), optionally rotate interleaved pairs (x[2k], x[2k+1])
// by the row's token's (cos, sin) (DeepSeek's RoPE; the host computes the
// table, with YaRN's scale folded in, exactly as it does for itself), then
// write them to `dst` in its dtype and/or as the bf16 hi (+ lo) parts the
// projection kernels take (mla_linear.cuh). The host does the same steps in
// src/model/linear.rs (rms_norm), src/model/rope.rs and
// src/backend/cuda/linear.rs (split_bf16).
//
// `dst` may be `src` (same dtype and stride): each thread writes only the
// pairs it read, after the row's sum of squares is complete.
#pragma once
#include "mla_math.cuh"

#define MLA_ROWS_THREADS 256

// Mirrored by `RowsParams` in src/backend/cuda/params.rs.
struct MlaRowsParams {
    // ---- 4-byte fields
    int32_t rows;            // rows to process
    int32_t cols;            // values per row, even
    int32_t src_stride;      // src_dtype elements from one source row to the next
    int32_t dst_stride;      // elements from one dst row to the next
    int32_t dst_dtype;       // MLA_DT_*
    int32_t rows_per_token;  // RoPE: row r belongs to token r / rows_per_token
    int32_t rope;            // 1: rotate pairs by cos_sin[token]
    float eps;               // RMSNorm epsilon (with `norm`)
    int32_t src_dtype;       // MLA_DT_*
    int32_t pad0;
    // ---- 8-byte fields
    const void* src;       // row r at src + r * src_stride (src_dtype)
    const float* norm;     // [cols] RMSNorm weight, or null
    const float* cos_sin;  // RoPE: [tokens, cols / 2] (cos, sin) pairs, f32
    void* dst;             // row r at dst + r * dst_stride (dst_dtype), or null
    uint16_t* hi;          // [rows, cols] bf16 nearest even, or null
    uint16_t* lo;          // [rows, cols] bf16(x - hi), or null
};
#define MLA_ROWS_PARAMS_SIZE 88
static_assert(sizeof(MlaRowsParams) == MLA_ROWS_PARAMS_SIZE, "update params.rs");
static_assert(offsetof(MlaRowsParams, src) == 40, "update params.rs");
static_assert(offsetof(MlaRowsParams, lo) == 80, "update params.rs");

extern "C" __global__ void __launch_bounds__(MLA_ROWS_THREADS)
    mla_rows(const __grid_constant__ MlaRowsParams p) {
    __shared__ float partial[MLA_ROWS_THREADS / 32];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int pairs = p.cols / 2;
    for (int r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const int64_t src0 = (int64_t)r * p.src_stride;
        float inv = 1.f;
        if (p.norm) {
            float ss = 0.f;
            for (int k = tid; k < p.cols; k += MLA_ROWS_THREADS) {
                const float x = mla::load_elem(p.src, p.src_dtype, src0 + k);
                ss += x * x;
            }
            for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
            if (lane == 0) partial[warp] = ss;
            __syncthreads();
            float total = 0.f;
            for (int w = 0; w < MLA_ROWS_THREADS / 32; ++w) total += partial[w];
            inv = 1.f / sqrtf(total / (float)p.cols + p.eps);
        }
        const float* cs = p.rope ? p.cos_sin + (int64_t)(r / p.rows_per_token) * p.cols : nullptr;
        for (int i = tid; i < pairs; i += MLA_ROWS_THREADS) {
            float a = mla::load_elem(p.src, p.src_dtype, src0 + 2 * i);
            float b = mla::load_elem(p.src, p.src_dtype, src0 + 2 * i + 1);
            if (p.norm) {
                a = a * inv * p.norm[2 * i];
                b = b * inv * p.norm[2 * i + 1];
            }
            if (cs) {
                const float c = cs[2 * i], sn = cs[2 * i + 1];
                const float ra = a * c - b * sn;
                const float rb = a * sn + b * c;
                a = ra;
                b = rb;
            }
            if (p.dst) {
                const int64_t d = (int64_t)r * p.dst_stride + 2 * i;
                mla::store_elem(p.dst, p.dst_dtype, d, a);
                mla::store_elem(p.dst, p.dst_dtype, d + 1, b);
            }
            const int64_t h = (int64_t)r * p.cols + 2 * i;
            if (p.hi) {
                const uint16_t ha = mla::bf16_bits(a), hb = mla::bf16_bits(b);
                p.hi[h] = ha;
                p.hi[h + 1] = hb;
                if (p.lo) {
                    p.lo[h] = mla::bf16_bits(a - mla::bf16_value(ha));
                    p.lo[h + 1] = mla::bf16_bits(b - mla::bf16_value(hb));
                }
            }
        }
        // `partial` is reused by the next row.
        if (p.norm) __syncthreads();
    }
}
