// Merges the partial results of a group that was split into several items:
// lse = log(sum exp(lse_i)), out = sum exp(lse_i - lse) * o_i, then the
// attention sink. One warp per query row; groups with one item are skipped
// (the decode kernel already wrote them).
#pragma once
#include "mla_decode.cuh"

#define MLA_COMBINE_ROWS 4

extern "C" __global__ void __launch_bounds__(32 * MLA_COMBINE_ROWS)
    mla_combine(const __grid_constant__ MlaParams p) {
    const int g = blockIdx.x;
    const int2 meta = p.group_meta[g];
    const int first = meta.x, splits = meta.y;
    if (splits <= 1) return;
    const int R = p.rows_per_group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = blockIdx.y * MLA_COMBINE_ROWS + warp;
    if (r >= R) return;

    float mx = -INFINITY;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, p.part_lse[(int64_t)(first + s) * R + r]);
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    if (mx != -INFINITY) {
        for (int s = lane; s < splits; s += 32) sum += expf(p.part_lse[(int64_t)(first + s) * R + r] - mx);
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float lse = mx == -INFINITY ? -INFINITY : mx + logf(sum);
    const int h = p.sparse ? r : r % p.h_q;
    float f = lse == -INFINITY ? 0.f : 1.f;
    if (p.sink && lse != -INFINITY) f = 1.f / (1.f + expf(p.sink[h] - lse));

    float acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    if (lse != -INFINITY) {
        for (int s = 0; s < splits; ++s) {
            const int64_t ix = (int64_t)(first + s) * R + r;
            const float w = expf(p.part_lse[ix] - lse);
            if (w == 0.f) continue;
            const float4* src = reinterpret_cast<const float4*>(p.part_o + ix * MLA_DV);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float4 v = src[c * 32 + lane];
                acc[c * 4 + 0] += w * v.x;
                acc[c * 4 + 1] += w * v.y;
                acc[c * 4 + 2] += w * v.z;
                acc[c * 4 + 3] += w * v.w;
            }
        }
    }
    const int64_t orow = (int64_t)g * R + r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int col = (c * 32 + lane) * 4;
        mla::store_pair(p.out, p.out_dtype, orow * MLA_DV + col, acc[c * 4] * f, acc[c * 4 + 1] * f);
        mla::store_pair(p.out, p.out_dtype, orow * MLA_DV + col + 2, acc[c * 4 + 2] * f,
                        acc[c * 4 + 3] * f);
    }
    if (lane == 0 && p.lse) {
        const int b = p.sparse ? g / p.s_q : g;
        const int i = p.sparse ? g % p.s_q : r / p.h_q;
        p.lse[((int64_t)b * p.h_q + h) * p.s_q + i] = lse == -INFINITY ? INFINITY : lse;
    }
}
