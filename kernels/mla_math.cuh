// Small device helpers: element conversions, FP8 decoding, and the warp-level
// tensor-core instructions (mma.sync m16n8k16, ldmatrix, cp.async) that every
// architecture from sm_80 up runs.
#pragma once
#ifdef MLA_EMULATE
#include "emu/mla_emu.h"  // CPU emulation for tests (kernels/emu/)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

#include "mla_params.cuh"

namespace mla {

// Loads element i of a tensor of run-time type `dt` as float.
__device__ __forceinline__ float load_elem(const void* base, int dt, int64_t i) {
    if (dt == MLA_DT_F32) return static_cast<const float*>(base)[i];
    if (dt == MLA_DT_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    return __half2float(static_cast<const __half*>(base)[i]);
}

// Stores two consecutive elements (i, i + 1) of run-time type `dt`.
__device__ __forceinline__ void store_pair(void* base, int dt, int64_t i, float a, float b) {
    if (dt == MLA_DT_F32) {
        float* p = static_cast<float*>(base) + i;
        p[0] = a;
        p[1] = b;
    } else if (dt == MLA_DT_BF16) {
        __nv_bfloat16* p = static_cast<__nv_bfloat16*>(base) + i;
        p[0] = __float2bfloat16_rn(a);
        p[1] = __float2bfloat16_rn(b);
    } else {
        __half* p = static_cast<__half*>(base) + i;
        p[0] = __float2half_rn(a);
        p[1] = __float2half_rn(b);
    }
}

__device__ __forceinline__ void store_elem(void* base, int dt, int64_t i, float a) {
    if (dt == MLA_DT_F32) {
        static_cast<float*>(base)[i] = a;
    } else if (dt == MLA_DT_BF16) {
        static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(a);
    } else {
        static_cast<__half*>(base)[i] = __float2half_rn(a);
    }
}

// OCP E4M3 byte -> float, exact, the same table as src/format/fp8.rs: the
// sign, exponent and mantissa shifted into an f16 (whose bias is 8 more),
// then scaled by 2^8. Only the NaN code (S.1111.111) differs, which caches
// never hold.
__device__ __forceinline__ float e4m3_to_float(uint32_t b) {
    uint32_t h = ((b & 0x80u) << 8) | ((b & 0x7fu) << 7);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h))) * 256.0f;
}

// A ue8m0 scale byte: 2^(b - 127).
__device__ __forceinline__ float ue8m0_to_float(uint32_t b) {
    if (b == 0xffu) return __uint_as_float(0x7fc00000u);
    return b == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(b << 23);
}

// The tensor-core operand type: bf16, or f16 for F16 caches (which keeps
// their 11-bit mantissa).
struct OpBf16 {
    using T = __nv_bfloat16;
    static __device__ __forceinline__ T from_float(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    // D = A * B + D, A 16x16 (row), B 16x8 (col), f32 accumulators.
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
#ifdef MLA_EMULATE
        emu::mma(d, a, b0, b1, false);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};

struct OpF16 {
    using T = __half;
    static __device__ __forceinline__ T from_float(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
#ifdef MLA_EMULATE
        emu::mma(d, a, b0, b1, true);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};

#ifdef MLA_EMULATE
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    emu::ldmatrix_x4_trans(r, row);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) { memcpy(dst, src, 16); }
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) { memcpy(dst, src, 8); }
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory, transposed: lanes 8i..8i+7 give
// the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// 16-byte asynchronous global -> shared copy (bypasses L1).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
// 8-byte asynchronous copy (through L1: .cg takes 16 bytes only).
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

__device__ __forceinline__ uint32_t lds32(const void* p) {
    return *static_cast<const uint32_t*>(p);
}

}  // namespace mla
