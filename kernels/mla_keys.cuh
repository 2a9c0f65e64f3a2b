// Which keys a query group sees: a group is one sequence (dense; its rows are
// s_q x h_q) or one query token of one sequence (sparse; its rows are h_q).
// Bad device-resident input is masked and reported in the error word, never
// read out of bounds.
#pragma once
#include "mla_params.cuh"

namespace mla {

__device__ __forceinline__ void report(const MlaParams& p, int bit) {
    atomicOr(p.error_flags, bit);
}

// Keys of group g from the main cache (dense: the sequence length).
__device__ __forceinline__ int main_keys(const MlaParams& p, int g) {
    if (!p.sparse) {
        int n = p.seqlens[g];
        int cap = p.bt_stride * p.block_size;
        if (n < 0 || n > cap) {
            report(p, MLA_ERR_SEQLEN);
            n = n < 0 ? 0 : cap;
        }
        return n;
    }
    if (!p.topk_length) return p.topk;
    int n = p.topk_length[g / p.s_q];
    if (n < 0 || n > p.topk) {
        report(p, MLA_ERR_INDEX);
        n = n < 0 ? 0 : p.topk;
    }
    return n;
}

// Keys of group g from the extra cache (sparse only).
__device__ __forceinline__ int extra_keys(const MlaParams& p, int g) {
    if (!p.sparse || !p.extra_indices) return 0;
    if (!p.extra_topk_length) return p.extra_topk;
    int n = p.extra_topk_length[g / p.s_q];
    if (n < 0 || n > p.extra_topk) {
        report(p, MLA_ERR_INDEX);
        n = n < 0 ? 0 : p.extra_topk;
    }
    return n;
}

// All keys of group g: the main cache's, then the extra cache's.
__device__ __forceinline__ int group_keys(const MlaParams& p, int g) {
    return main_keys(p, g) + extra_keys(p, g);
}

// Where key j of group g lives: its block's first byte and its slot in the
// block, or false when the key is masked (sparse -1 or a bad id).
__device__ __forceinline__ bool locate_key(const MlaParams& p, int g, int n_main, int j,
                                           const uint8_t** block, int* slot, int* block_size) {
    if (!p.sparse) {
        int id = p.block_table[(int64_t)g * p.bt_stride + j / p.block_size];
        if (id < 0 || id >= p.num_blocks) {
            report(p, MLA_ERR_BLOCK_ID);
            return false;
        }
        *block = p.kv + (int64_t)id * p.block_bytes;
        *slot = j % p.block_size;
        *block_size = p.block_size;
        return true;
    }
    const bool extra = j >= n_main;
    const int idx = extra ? p.extra_indices[(int64_t)g * p.extra_topk + (j - n_main)]
                          : p.indices[(int64_t)g * p.topk + j];
    const int bs = extra ? p.extra_block_size : p.block_size;
    const int64_t cap = (int64_t)(extra ? p.extra_num_blocks : p.num_blocks) * bs;
    if (idx < 0 || idx >= cap) {
        if (idx != -1) report(p, MLA_ERR_INDEX);
        return false;
    }
    *block = (extra ? p.extra_kv : p.kv) + (int64_t)(idx / bs) * (extra ? p.extra_block_bytes : p.block_bytes);
    *slot = idx % bs;
    *block_size = bs;
    return true;
}

}  // namespace mla
