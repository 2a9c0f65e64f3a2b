// The one argument of every decode-path kernel. Mirrored field for field by
// `MlaParams` in src/backend/cuda/params.rs; both sides assert the size and
// a few offsets, so a change on one side alone fails to build.
//
// All 4-byte fields come first, then all 8-byte fields, so neither side has
// padding to disagree on.
#pragma once
#ifdef MLA_EMULATE
#include "emu/mla_emu.h"  // CPU emulation for tests (kernels/emu/)
#endif
#include <stddef.h>
#include <stdint.h>

// Element types, numbered like the C ABI's mlart_dtype.
#define MLA_DT_F32 0
#define MLA_DT_BF16 1
#define MLA_DT_F16 2

// Cache formats, numbered like the C ABI's mlart_kv_format.
#define MLA_KV_BF16 0
#define MLA_KV_F16 1
#define MLA_KV_F32 2
#define MLA_KV_FP8_V32 3
#define MLA_KV_FP8_MODEL1 4

// Bits of the error word the kernels set on bad device-resident input; the
// host reads it after a synchronous call.
#define MLA_ERR_SEQLEN 1       // seqlens[b] outside [0, stride * block_size]
#define MLA_ERR_BLOCK_ID 2     // a block id outside [0, num_blocks)
#define MLA_ERR_INDEX 4        // a sparse index outside [-1, num_blocks * block_size)

// Split-KV scheduling, the same numbers as src/decode/plan.rs.
#define MLA_CHUNK_TOKENS 64
#define MLA_SPLIT_OVERHEAD_CHUNKS 2

struct MlaParams {
    // ---- 4-byte fields
    int32_t batch, s_q, h_q, d_qk, d_v;
    int32_t sparse;            // 0: block table + seqlens; 1: indices
    int32_t causal;            // dense only
    int32_t rows_per_group;    // dense: s_q * h_q; sparse: h_q
    int32_t num_groups;        // dense: batch; sparse: batch * s_q
    float scale_log2;          // softmax_scale * log2(e)
    int32_t q_dtype, out_dtype, kv_format;
    int32_t num_blocks, block_size, bt_stride;
    int32_t topk;
    int32_t extra_num_blocks, extra_block_size, extra_topk;
    int32_t parts;             // workers the plan balances over: the decode grid's x
    int32_t max_items;         // num_groups + parts: the most items a plan makes
    int32_t pad0, pad1;
    // ---- 8-byte fields
    int64_t block_bytes, extra_block_bytes;
    const void* q;
    const uint8_t* kv;
    const int32_t* block_table;
    const int32_t* seqlens;
    const int32_t* indices;
    const int32_t* topk_length;
    const uint8_t* extra_kv;
    const int32_t* extra_indices;
    const int32_t* extra_topk_length;
    const float* sink;
    void* out;
    float* lse;
    // Workspace (engine-owned device memory).
    int4* items;               // [max_items] {group, key start, key end, splits of group}
    int2* group_meta;          // [num_groups] {first item, splits}
    int32_t* num_items;        // [1]
    float* part_o;             // [max_items, rows_per_group, d_v]
    float* part_lse;           // [max_items, rows_per_group]
    int32_t* error_flags;      // [1]
    int32_t* part_first;       // [parts + 1]: part q runs items [part_first[q], part_first[q + 1])
};

#define MLA_PARAMS_SIZE 264
static_assert(sizeof(MlaParams) == MLA_PARAMS_SIZE, "MlaParams size changed: update params.rs");
static_assert(offsetof(MlaParams, block_bytes) == 96, "MlaParams layout changed: update params.rs");
static_assert(offsetof(MlaParams, error_flags) == 248, "MlaParams layout changed: update params.rs");
