// The one translation unit nvcc builds into mlart's fatbin. Entry points are
// extern "C" so the host finds them by these exact names
// (src/backend/cuda/launch.rs lists them).
#include "mla_combine.cuh"
#include "mla_decode.cuh"
#include "mla_linear.cuh"
#include "mla_append.cuh"
#include "mla_rows.cuh"
#include "mla_index.cuh"
#include "mla_index_rows.cuh"
#include "mla_plan.cuh"
#include "mla_probe.cuh"

// RG = 1: 16 query rows per block (4 warps); RG = 4: 64 rows (8 warps, one
// block per SM; chosen when a group has >= 64 rows and the GPU allows 162 KiB
// of shared memory per block).
// _wg: the 64-row block with wgmma (sm_90a only; elsewhere it reports
// MLA_ERR_LAUNCH and the host never picks it).
#define MLA_DECODE_ENTRY(NAME, KV, DQK, OP, RG, WG)                                  \
    extern "C" __global__ void __launch_bounds__(mla::Shape<RG>::THREADS)            \
        NAME(const __grid_constant__ MlaParams p) {                                  \
        mla::decode_block<KV, DQK, mla::OP, RG, WG>(p);                              \
    }

#define MLA_DECODE_ENTRIES(NAME, KV, DQK, OP)           \
    MLA_DECODE_ENTRY(NAME, KV, DQK, OP, 1, false)       \
    MLA_DECODE_ENTRY(NAME##_m64, KV, DQK, OP, 4, false) \
    MLA_DECODE_ENTRY(NAME##_wg, KV, DQK, OP, 4, true)

MLA_DECODE_ENTRIES(mla_decode_bf16_d576, MLA_KV_BF16, 576, OpBf16)
MLA_DECODE_ENTRIES(mla_decode_bf16_d512, MLA_KV_BF16, 512, OpBf16)
MLA_DECODE_ENTRIES(mla_decode_f16_d576, MLA_KV_F16, 576, OpF16)
MLA_DECODE_ENTRIES(mla_decode_f16_d512, MLA_KV_F16, 512, OpF16)
MLA_DECODE_ENTRIES(mla_decode_f32_d576, MLA_KV_F32, 576, OpBf16)
MLA_DECODE_ENTRIES(mla_decode_f32_d512, MLA_KV_F32, 512, OpBf16)
MLA_DECODE_ENTRIES(mla_decode_fp8v32_d576, MLA_KV_FP8_V32, 576, OpBf16)
MLA_DECODE_ENTRIES(mla_decode_fp8model1_d512, MLA_KV_FP8_MODEL1, 512, OpBf16)

// The wgmma layout probe (mla_probe.cuh). Without wgmma it writes zeros;
// the host only launches it on compute capability 9.0.
extern "C" __global__ void __launch_bounds__(MLA_PROBE_THREADS)
    mla_wgmma_probe(const __grid_constant__ MlaProbeParams p) {
    mla::wgmma_probe(p);
}

// The model's projections (mla_linear.cuh): bf16 or FP8 weights, 16 (m1) or
// 64 (m4) tokens per pass over the weights. The occupancy hints keep decode
// blocks at <= 64 registers (8 blocks per SM, as the host plans) and are
// what keeps ptxas from spilling a few bytes on some targets.
#define MLA_LINEAR_ENTRY(NAME, MF, FP8)                                          \
    extern "C" __global__ void __launch_bounds__(MLA_LINEAR_THREADS, MF == 1 ? 8 : 4) \
        NAME(const __grid_constant__ MlaLinearParams p) {                        \
        mla::linear_block<MF, FP8>(p);                                           \
    }
MLA_LINEAR_ENTRY(mla_linear_bf16_m1, 1, false)
MLA_LINEAR_ENTRY(mla_linear_bf16_m4, 4, false)
MLA_LINEAR_ENTRY(mla_linear_fp8_m1, 1, true)
MLA_LINEAR_ENTRY(mla_linear_fp8_m4, 4, true)
