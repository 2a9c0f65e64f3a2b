// The one translation unit nvcc builds into mlart's fatbin. Entry points are
// extern "C" so the host finds them by these exact names
// (src/backend/cuda/launch.rs lists them).
#include "mla_combine.cuh"
#include "mla_decode.cuh"
#include "mla_plan.cuh"

#define MLA_DECODE_ENTRY(NAME, KV, DQK, OP)                                          \
    extern "C" __global__ void __launch_bounds__(MLA_THREADS)                        \
        NAME(const __grid_constant__ MlaParams p) {                                  \
        mla::decode_block<KV, DQK, mla::OP>(p);                                      \
    }

MLA_DECODE_ENTRY(mla_decode_bf16_d576, MLA_KV_BF16, 576, OpBf16)
MLA_DECODE_ENTRY(mla_decode_bf16_d512, MLA_KV_BF16, 512, OpBf16)
MLA_DECODE_ENTRY(mla_decode_f16_d576, MLA_KV_F16, 576, OpF16)
MLA_DECODE_ENTRY(mla_decode_f16_d512, MLA_KV_F16, 512, OpF16)
MLA_DECODE_ENTRY(mla_decode_f32_d576, MLA_KV_F32, 576, OpBf16)
MLA_DECODE_ENTRY(mla_decode_f32_d512, MLA_KV_F32, 512, OpBf16)
MLA_DECODE_ENTRY(mla_decode_fp8v32_d576, MLA_KV_FP8_V32, 576, OpBf16)
MLA_DECODE_ENTRY(mla_decode_fp8model1_d512, MLA_KV_FP8_MODEL1, 512, OpBf16)
