// Appends rows to a paged cache on the device: converts them to BF16/F16/F32
// or quantizes them to FP8 exactly as src/format/fp8.rs does (FlashMLA's
// rule: per tile, scale = 2^ceil(log2(max(amax / 448, 1e-4))), codes
// e4m3(x / scale) rounded to nearest even and saturated), so a cache written
// here is byte-identical to one written on the host.
//
// One block of 128 threads per row; `slots[i]` is row i's flat position
// `block * block_size + slot` (negative: skipped).
#pragma once
#include "mla_math.cuh"

#define MLA_APPEND_THREADS 128

// Mirrored by `AppendParams` in src/backend/cuda/params.rs.
struct MlaAppendParams {
    int32_t n_rows, d_qk, src_dtype, kv_format, block_size, pad0;
    int64_t block_bytes;
    const void* src;       // [n_rows, d_qk] of src_dtype
    const int32_t* slots;  // [n_rows]
    uint8_t* kv;
};
#define MLA_APPEND_PARAMS_SIZE 56
static_assert(sizeof(MlaAppendParams) == MLA_APPEND_PARAMS_SIZE, "update params.rs");

namespace mla {

// Nearest E4M3 code (ties to even), saturating at +-448; NaN -> 0x7f.
__device__ __forceinline__ uint32_t float_to_e4m3(float x) {
    if (isnan(x)) return 0x7f;
    const uint32_t sign = signbit(x) ? 0x80u : 0u;
    const float a = fabsf(x);
    if (a >= 448.f) return sign | 0x7e;
    int e = a == 0.f ? -6 : max((int)(__float_as_uint(a) >> 23) - 127, -6);
    const float quantum = __uint_as_float((uint32_t)(e - 3 + 127) << 23);
    uint32_t m = (uint32_t)rintf(a / quantum);
    if (m == 16) {
        m = 8;
        e += 1;
    }
    if (m < 8) return sign | m;
    const uint32_t code = ((uint32_t)(e + 7) << 3) | (m - 8);
    return sign | (code > 0x7e ? 0x7eu : code);
}

// The power-of-two scale of a tile whose largest magnitude is `amax`.
__device__ __forceinline__ float tile_scale(float amax) {
    const float v = fmaxf(amax / 448.f, 1e-4f);
    if (isnan(v)) return 1.f;
    const uint32_t bits = __float_as_uint(v);
    int e = (int)(bits >> 23) - 127 + ((bits & 0x7fffffu) ? 1 : 0);
    e = e < -126 ? -126 : (e > 127 ? 127 : e);
    return __uint_as_float((uint32_t)(e + 127) << 23);
}

__device__ __forceinline__ void store_bf16(uint8_t* p, float x) {
    *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(x);
}

}  // namespace mla

extern "C" __global__ void __launch_bounds__(MLA_APPEND_THREADS)
    mla_append(const __grid_constant__ MlaAppendParams p) {
    const int i = blockIdx.x;
    if (i >= p.n_rows) return;
    const int pos = p.slots[i];
    if (pos < 0) return;
    const int bs = p.block_size;
    uint8_t* block = p.kv + (int64_t)(pos / bs) * p.block_bytes;
    const int slot = pos % bs;
    const int64_t src0 = (int64_t)i * p.d_qk;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    if (p.kv_format == MLA_KV_BF16 || p.kv_format == MLA_KV_F16 || p.kv_format == MLA_KV_F32) {
        const int dt = p.kv_format == MLA_KV_BF16 ? MLA_DT_BF16
                     : p.kv_format == MLA_KV_F16  ? MLA_DT_F16
                                                  : MLA_DT_F32;
        const int esize = dt == MLA_DT_F32 ? 4 : 2;
        void* row = block + (int64_t)slot * p.d_qk * esize;
        for (int k = tid; k < p.d_qk; k += MLA_APPEND_THREADS)
            mla::store_elem(row, dt, k, mla::load_elem(p.src, p.src_dtype, src0 + k));
        return;
    }
    const bool v32 = p.kv_format == MLA_KV_FP8_V32;
    const int nope = v32 ? 512 : 448, tile = v32 ? 128 : 64, tiles = v32 ? 4 : 7;
    uint8_t* row = block + (int64_t)slot * (v32 ? 656 : 576);
    uint8_t* scales = block + (int64_t)bs * 576 + slot * 8;  // MODEL1 only
    // One warp per tile: amax by shuffles, then the codes.
    for (int t = warp; t < tiles; t += MLA_APPEND_THREADS / 32) {
        float amax = 0.f;
        for (int k = lane; k < tile; k += 32)
            amax = fmaxf(amax, fabsf(mla::load_elem(p.src, p.src_dtype, src0 + t * tile + k)));
        for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const float scale = mla::tile_scale(amax);
        for (int k = lane; k < tile; k += 32) {
            const float x = mla::load_elem(p.src, p.src_dtype, src0 + t * tile + k);
            row[t * tile + k] = (uint8_t)mla::float_to_e4m3(x / scale);
        }
        if (lane == 0) {
            if (v32) {
                *reinterpret_cast<float*>(row + nope + 4 * t) = scale;
            } else {
                scales[t] = (uint8_t)((__float_as_uint(scale) >> 23) & 0xff);
            }
        }
    }
    if (!v32 && tid == 0) scales[7] = 0;
    // The rope dims stay bf16.
    uint8_t* rope = row + (v32 ? 528 : 448);
    for (int k = tid; k < 64; k += MLA_APPEND_THREADS)
        mla::store_bf16(rope + 2 * k, mla::load_elem(p.src, p.src_dtype, src0 + nope + k));
}
