// The per-row steps of DeepSeek-V3.2's indexer on the GPU, the device twin
// of `Indexer::prepare` in src/model/indexer.rs: one row (a query head, or a
// token's key) per block, one thread per element:
//
//   [LayerNorm (weight, bias; keys)] -> RoPE on the first `rope` values in
//   half-split pairs (i, i + rope/2) -> Hadamard rotation (butterflies in the
//   host's order, then * hadamard_scale) -> E4M3 codes with one scale per
//   row (amax floored at 1e-4, / 448, rounded up to a power of two with
//   ue8m0 scales).
//
// Queries come out as the codes' values (f32) and fold their scale into the
// row's head weight; keys come out as pool rows (codes, then the f32
// scale). The butterflies, the scale and the codes are the host's exact
// operations; LayerNorm and RoPE round differently (the host sums in f64).
#pragma once
#include "mla_append.cuh"

#define MLA_INDEX_ROWS_THREADS 128  // >= the longest indexer head

// Mirrored by `IndexRowsParams` in src/backend/cuda/params.rs.
struct MlaIndexRowsParams {
    // ---- 4-byte fields
    int32_t rows;            // rows to process
    int32_t dim;             // values per row: a power of two <= MLA_INDEX_ROWS_THREADS
    int32_t src_stride;      // floats from one source row to the next
    int32_t rows_per_token;  // row r belongs to token r / rows_per_token
    int32_t rope;            // values rotated (even, <= dim; 0: none)
    int32_t cs_stride;       // floats from one token's cos/sin pairs to the next
    int32_t pow2_scales;     // 1: scales rounded up to a power of two (ue8m0)
    float eps;               // LayerNorm epsilon (with `norm_w`)
    float hadamard_scale;    // dim^-0.5, as the host computes it
    float w_scale;           // queries: heads^-0.5 * dim^-0.5
    // ---- 8-byte fields
    const float* src;        // row r at src + r * src_stride
    const float* norm_w;     // [dim] LayerNorm weight, or null (no LayerNorm)
    const float* norm_b;     // [dim] LayerNorm bias (with norm_w)
    const float* cos_sin;    // [tokens, cs_stride]: (cos, sin) of pair k at 2k
    float* values;           // [rows, dim] the codes' values, or null
    float* w;                // [rows] multiplied by w_scale * scale, or null
    uint8_t* key_rows;       // [rows, dim + 4] codes then f32 scale, or null
};
#define MLA_INDEX_ROWS_PARAMS_SIZE 96
static_assert(sizeof(MlaIndexRowsParams) == MLA_INDEX_ROWS_PARAMS_SIZE, "update params.rs");
static_assert(offsetof(MlaIndexRowsParams, src) == 40, "update params.rs");

namespace mla {

// Sum (max_abs = false) or largest magnitude over the block's threads.
__device__ __forceinline__ float index_rows_reduce(float v, bool max_abs, float* scratch) {
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = max_abs ? fmaxf(v, o) : v + o;
    }
    __syncthreads();  // scratch is free (an earlier reduction has read it)
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = scratch[0];
    for (int w = 1; w < MLA_INDEX_ROWS_THREADS / 32; ++w)
        r = max_abs ? fmaxf(r, scratch[w]) : r + scratch[w];
    return r;
}

}  // namespace mla

extern "C" __global__ void __launch_bounds__(MLA_INDEX_ROWS_THREADS)
    mla_index_rows(const __grid_constant__ MlaIndexRowsParams p) {
    __shared__ float x[MLA_INDEX_ROWS_THREADS];
    __shared__ float scratch[MLA_INDEX_ROWS_THREADS / 32];
    const int i = threadIdx.x;
    const bool on = i < p.dim;
    for (int r = blockIdx.x; r < p.rows; r += gridDim.x) {
        float v = on ? p.src[(int64_t)r * p.src_stride + i] : 0.f;
        if (p.norm_w) {
            const float mean = mla::index_rows_reduce(v, false, scratch) / (float)p.dim;
            const float d = on ? v - mean : 0.f;
            const float var = mla::index_rows_reduce(d * d, false, scratch) / (float)p.dim;
            if (on) v = d * (1.f / sqrtf(var + p.eps)) * p.norm_w[i] + p.norm_b[i];
        }
        __syncthreads();  // the previous row is done with x
        x[i] = v;
        __syncthreads();
        const int half = p.rope / 2;
        if (i < half) {
            const float* cs = p.cos_sin + (int64_t)(r / p.rows_per_token) * p.cs_stride + 2 * i;
            const float a = x[i], b = x[i + half], c = cs[0], s = cs[1];
            x[i] = a * c - b * s;
            x[i + half] = a * s + b * c;
        }
        for (int h = 1; h < p.dim; h *= 2) {
            __syncthreads();
            if (on && (i & h) == 0) {
                const float a = x[i], b = x[i + h];
                x[i] = a + b;
                x[i + h] = a - b;
            }
        }
        __syncthreads();
        v = on ? x[i] * p.hadamard_scale : 0.f;
        const float amax = fmaxf(mla::index_rows_reduce(fabsf(v), true, scratch), 1e-4f);
        const float ratio = amax * (1.f / 448.f);
        float scale = ratio;
        if (p.pow2_scales) {
            const uint32_t bits = __float_as_uint(ratio);
            int e = (int)(bits >> 23) - 127 + ((bits & 0x7fffffu) ? 1 : 0);
            e = e < -126 ? -126 : (e > 127 ? 127 : e);
            scale = __uint_as_float((uint32_t)(e + 127) << 23);
        }
        const uint32_t code = mla::float_to_e4m3(fminf(fmaxf(v / scale, -448.f), 448.f));
        if (on) {
            if (p.values) p.values[(int64_t)r * p.dim + i] = mla::e4m3_to_float(code);
            if (p.key_rows) {
                uint8_t* row = p.key_rows + (int64_t)r * (p.dim + 4);
                row[i] = (uint8_t)code;
                if (i == 0) *reinterpret_cast<float*>(row + p.dim) = scale;
            }
        }
        if (i == 0 && p.w) p.w[r] *= p.w_scale * scale;
    }
}
