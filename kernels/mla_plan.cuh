// The device twin of src/decode/plan.rs (SplitPlan::build with
// workers = parts): cuts every group's keys into balanced 64-token chunks
// with a fixed per-split overhead, so a decode call needs no host sync to
// know its work. At most num_groups + parts items result. Then, like
// FlashMLA's scheduler, it deals the items out to `parts` persistent decode
// blocks: contiguous runs of about equal cost, so no partly empty last wave
// of blocks (src/backend/cuda/launch.rs: host_plan is the host twin).
#pragma once
#include "mla_keys.cuh"

#define MLA_PLAN_THREADS 1024

// Inclusive scan of one value per thread into scan[0 .. blockDim.x)
// (Hillis-Steele); every thread of the block must call it.
__device__ __forceinline__ void block_scan(int* scan, int value) {
    const int tid = threadIdx.x;
    scan[tid] = value;
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {
        const int v = tid >= off ? scan[tid - off] : 0;
        __syncthreads();
        scan[tid] += v;
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(MLA_PLAN_THREADS) mla_plan(const __grid_constant__ MlaParams p) {
    __shared__ unsigned long long s_total;
    __shared__ int s_scan[MLA_PLAN_THREADS];
    const int tid = threadIdx.x;
    const int G = p.num_groups;
    if (tid == 0) s_total = 0;
    __syncthreads();
    unsigned long long local = 0;
    for (int g = tid; g < G; g += blockDim.x) {
        int n = mla::group_keys(p, g);
        local += (n + MLA_CHUNK_TOKENS - 1) / MLA_CHUNK_TOKENS + MLA_SPLIT_OVERHEAD_CHUNKS;
    }
    atomicAdd(&s_total, local);
    __syncthreads();
    const long long parts = p.parts > 0 ? p.parts : 1;
    long long per = ((long long)s_total + parts - 1) / parts;
    if (per < 1) per = 1;
    int carry = 0;
    for (int base = 0; base < G; base += blockDim.x) {
        const int g = base + tid;
        const int n = g < G ? mla::group_keys(p, g) : 0;
        const int chunks = (n + MLA_CHUNK_TOKENS - 1) / MLA_CHUNK_TOKENS;
        int splits = 0;
        if (g < G) {
            long long s = (chunks + MLA_SPLIT_OVERHEAD_CHUNKS + per - 1) / per;
            const int hi = chunks > 1 ? chunks : 1;
            splits = s < 1 ? 1 : (s > hi ? hi : (int)s);
        }
        // Inclusive scan of the split counts.
        block_scan(s_scan, splits);
        if (g < G) {
            const int first = carry + s_scan[tid] - splits;
            p.group_meta[g] = make_int2(first, splits);
            const int each = chunks / splits, extra = chunks % splits;
            int chunk = 0;
            for (int s = 0; s < splits; ++s) {
                const int start = min(chunk * MLA_CHUNK_TOKENS, n);
                chunk += each + (s < extra ? 1 : 0);
                const int end = min(chunk * MLA_CHUNK_TOKENS, n);
                p.items[first + s] = make_int4(g, start, end, splits);
            }
        }
        carry += s_scan[blockDim.x - 1];
        __syncthreads();
    }
    if (tid == 0) *p.num_items = carry;

    // Deal the items out: item i (cost = its chunks + the split overhead,
    // prefix cost C_i) goes to part min(parts - 1, C_i / per2).
    const int N = carry;
    auto cost = [&](int i) {
        const int4 it = p.items[i];
        return (it.z - it.y + MLA_CHUNK_TOKENS - 1) / MLA_CHUNK_TOKENS + MLA_SPLIT_OVERHEAD_CHUNKS;
    };
    __syncthreads();  // the items above are visible to the whole block
    if (tid == 0) s_total = 0;
    __syncthreads();
    unsigned long long local2 = 0;
    for (int i = tid; i < N; i += blockDim.x) local2 += cost(i);
    atomicAdd(&s_total, local2);
    __syncthreads();
    long long per2 = ((long long)s_total + parts - 1) / parts;
    if (per2 < 1) per2 = 1;
    const int last_part = (int)parts - 1;
    long long run = 0;
    for (int base = 0; base < N; base += blockDim.x) {
        const int i = base + tid;
        const int c = i < N ? cost(i) : 0;
        block_scan(s_scan, c);
        if (i < N) {
            const long long ci = run + s_scan[tid] - c;  // exclusive prefix
            const int part = (int)min((long long)last_part, ci / per2);
            const int prev = i == 0 ? -1 : (int)min((long long)last_part, (ci - cost(i - 1)) / per2);
            for (int q = prev + 1; q <= part; ++q) p.part_first[q] = i;
        }
        run += s_scan[blockDim.x - 1];
        __syncthreads();
    }
    if (tid == 0) {
        const long long cl = run - cost(N - 1);
        const int last = (int)min((long long)last_part, cl / per2);
        for (int q = last + 1; q <= last_part + 1; ++q) p.part_first[q] = N;
    }
}
