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

// Declares `name`, the block's dynamic shared memory (the emulator's
// buffer under emulation).
#ifdef MLA_EMULATE
#define MLA_DYNAMIC_SMEM(name) uint8_t* name = emu::dynamic_smem()
#else
#define MLA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint8_t name[]
#endif

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

// A float rounded to bf16 (nearest even), as its bits; and back.
__device__ __forceinline__ uint16_t bf16_bits(float x) {
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    return *reinterpret_cast<const uint16_t*>(&b);
}

__device__ __forceinline__ float bf16_value(uint16_t bits) {
    return __uint_as_float((uint32_t)bits << 16);
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
    static constexpr bool F16 = false;
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
    static constexpr bool F16 = true;
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
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) { emu::cp_async(dst, src, 16); }
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) { emu::cp_async(dst, src, 8); }
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    emu::cp_async_wait(N);
}
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

// ---- Hopper warpgroup MMA (sm_90a) --------------------------------------
// wgmma.mma_async: a warpgroup (4 warps, 128 threads) computes D(64 x N) +=
// A(64 x 16) B(16 x N) with A and B read from shared memory through matrix
// descriptors. mlart's operands use the no-swizzle canonical layout: 8x8
// "core matrices" of 128 contiguous bytes (8 rows of 16 bytes). In a
// descriptor, LBO is the byte distance between core matrices adjacent in K
// and SBO between those adjacent in M or N (PTX ISA, "Matrix Descriptor";
// CUTLASS's make_gmma_desc, INTERLEAVE layouts). B is K-major (each key's
// 16 bytes run along K) unless TRANS_B, where they run along N.
// The accumulator layout is mma.sync's C layout per 8 columns: thread
// 32w + 4g + q holds D[16w + g (+8)][8j + 2q (+1)] in d[4j + ...].

// A shared-memory address as the 32-bit offset the descriptors take.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#ifdef MLA_EMULATE
    return static_cast<uint32_t>(static_cast<const uint8_t*>(p) - emu::dynamic_smem());
#else
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// A no-swizzle matrix descriptor: start, LBO and SBO in bytes (16-aligned).
__device__ __forceinline__ uint64_t wg_desc(const void* start, uint32_t lbo, uint32_t sbo) {
    return static_cast<uint64_t>((smem_u32(start) >> 4) & 0x3fffu) |
           (static_cast<uint64_t>((lbo >> 4) & 0x3fffu) << 16) |
           (static_cast<uint64_t>((sbo >> 4) & 0x3fffu) << 32);
}

#if defined(MLA_EMULATE)
#define MLA_HAS_WGMMA 1
__device__ __forceinline__ void wg_fence() {}
__device__ __forceinline__ void wg_commit() {}
__device__ __forceinline__ void wg_wait_all() { emu::wgmma_wait(); }
__device__ __forceinline__ void fence_async_smem() {}
template <bool F16, bool TRANS_B>
__device__ __forceinline__ void wgmma_n32(float (&d)[16], uint64_t da, uint64_t db) {
    emu::wgmma(d, 32, da, db, TRANS_B, F16);
}
template <bool F16, bool TRANS_B>
__device__ __forceinline__ void wgmma_n256(float (&d)[128], uint64_t da, uint64_t db) {
    emu::wgmma(d, 256, da, db, TRANS_B, F16);
}
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MLA_HAS_WGMMA 1
// Orders this thread's register accesses before the warpgroup's next wgmma.
__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Makes this thread's ordinary shared-memory writes (stores, cp.async)
// visible to the async proxy that wgmma reads through.
__device__ __forceinline__ void fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define MLA_F8(d, i)                                                                    \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]),         \
        "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define MLA_WGMMA_N32(TYPE)                                                             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                          \
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " "        \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, " \
                 "%16, %17, p, 1, 1, 0, %19;\n}\n"                                        \
                 : MLA_F8(d, 0), MLA_F8(d, 8)                                           \
                 : "l"(da), "l"(db), "r"(1), "n"(TRANS_B ? 1 : 0))
#define MLA_WGMMA_N256(TYPE)                                                            \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                         \
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "       \
                 "{" \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
                 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
                 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
                 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
                 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" "}, %128, %129, p, 1, 1, 0, %131;\n}\n" \
                 : MLA_F8(d, 0), MLA_F8(d, 8), MLA_F8(d, 16), MLA_F8(d, 24),            \
                   MLA_F8(d, 32), MLA_F8(d, 40), MLA_F8(d, 48), MLA_F8(d, 56),          \
                   MLA_F8(d, 64), MLA_F8(d, 72), MLA_F8(d, 80), MLA_F8(d, 88),          \
                   MLA_F8(d, 96), MLA_F8(d, 104), MLA_F8(d, 112), MLA_F8(d, 120)        \
                 : "l"(da), "l"(db), "r"(1), "n"(TRANS_B ? 1 : 0))

// D(64 x 32) += A B, scale-d fixed at 1 (callers zero D first).
template <bool F16, bool TRANS_B>
__device__ __forceinline__ void wgmma_n32(float (&d)[16], uint64_t da, uint64_t db) {
    if constexpr (F16) {
        MLA_WGMMA_N32("f16");
    } else {
        MLA_WGMMA_N32("bf16");
    }
}
// D(64 x 256) += A B.
template <bool F16, bool TRANS_B>
__device__ __forceinline__ void wgmma_n256(float (&d)[128], uint64_t da, uint64_t db) {
    if constexpr (F16) {
        MLA_WGMMA_N256("f16");
    } else {
        MLA_WGMMA_N256("bf16");
    }
}
#undef MLA_WGMMA_N32
#undef MLA_WGMMA_N256
#undef MLA_F8
#else
// Architectures without wgmma: its kernels report MLA_ERR_LAUNCH instead.
__device__ __forceinline__ void fence_async_smem() {}
#endif

}  // namespace mla
