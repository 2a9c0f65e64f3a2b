// mla_wgmma_probe: the two wgmma GEMMs of the `_wg` decode kernels on known
// inputs, with nothing else around them, so a GPU run tells whether the
// kernels' assumptions about wgmma (descriptor LBO/SBO roles, the N-major
// transpose bit, the accumulator layout, descriptor advance) hold, apart
// from the decode logic the emulator checks. The GPU suite compares its
// output with host products.
//
// One warpgroup (128 threads). Inputs, row-major bf16 in global memory:
//   q [64][64], k [32][256], p [64][32]
// Outputs, row-major f32:
//   s [64][32] = q · k[:, 0:64]ᵀ     (wgmma_n32, K-major B, 4 steps of 16)
//   o [64][256] = p · k               (wgmma_n256, N-major B, 2 steps of 16)
// Shared memory holds the tiles in the decode kernels' layout (tile_at).
#pragma once
#include "mla_decode.cuh"

#define MLA_PROBE_THREADS 128
#define MLA_PROBE_SMEM ((64 * 64 + 32 * 256 + 64 * 32) * 2)

struct MlaProbeParams {
    const uint16_t* q;
    const uint16_t* k;
    const uint16_t* p;
    float* s;
    float* o;
};

namespace mla {

__device__ __forceinline__ void wgmma_probe(const MlaProbeParams& a) {
    MLA_DYNAMIC_SMEM(smem);
    using T = uint16_t;
    T* qs = reinterpret_cast<T*>(smem);
    T* ks = qs + 64 * 64;
    T* ps = ks + 32 * 256;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, q4 = lane % 4;
    for (int i = tid; i < 64 * 64; i += MLA_PROBE_THREADS)
        qs[tile_at<true, 64>(i / 64, i % 64)] = a.q[i];
    for (int i = tid; i < 32 * 256; i += MLA_PROBE_THREADS)
        ks[tile_at<true, 256>(i / 256, i % 256)] = a.k[i];
    for (int i = tid; i < 64 * 32; i += MLA_PROBE_THREADS)
        ps[tile_at<true, 32>(i / 32, i % 32)] = a.p[i];
    fence_async_smem();
    __syncthreads();
    float s[16] = {};
    float o[128] = {};
#ifdef MLA_HAS_WGMMA
    {
        const uint64_t da = wg_desc(qs, 128, (64 / 8) * 128);
        const uint64_t db = wg_desc(ks, 128, (256 / 8) * 128);
        wg_fence();
#pragma unroll
        for (int k = 0; k < 64; k += 16) wgmma_n32<false, false>(s, da + k, db + k);
        wg_commit();
        wg_wait_all();
    }
    {
        const uint64_t da = wg_desc(ps, 128, (32 / 8) * 128);
        const uint64_t db = wg_desc(ks, (256 / 8) * 128, 128);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 32; kk += 16) wgmma_n256<false, true>(o, da + kk, db + kk * (256 / 8));
        wg_commit();
        wg_wait_all();
    }
#endif
    // Accumulator d[4j + i] holds row 16 warp + gq (+8 for i >= 2), column
    // 8j + 2 q4 (+1 for odd i).
    for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 4; ++i)
            a.s[(16 * warp + gq + 8 * (i / 2)) * 32 + 8 * j + 2 * q4 + i % 2] = s[4 * j + i];
    for (int j = 0; j < 32; ++j)
        for (int i = 0; i < 4; ++i)
            a.o[(16 * warp + gq + 8 * (i / 2)) * 256 + 8 * j + 2 * q4 + i % 2] = o[4 * j + i];
}

}  // namespace mla
