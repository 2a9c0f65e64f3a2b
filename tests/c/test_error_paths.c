/*
 * Error paths of the mlart C ABI, written to be run under a memory checker
 * (CMakeLists.txt runs it under valgrind too when MLART_VALGRIND is set):
 * every buffer a call reads or writes is a heap block of exactly the size
 * that call needs, so touching one byte past it is reported.
 *
 * Covers NULL handles, *_init(NULL) and *_free(NULL); a bad struct_size
 * (0, 4, sizeof - 4, sizeof + 8, UINT32_MAX) in every argument and props
 * struct, passed as a 4-byte heap block (the library may read that u32 and
 * nothing more, and must refuse); bad enum values; NULL out-pointers; dense
 * and sparse decode with out-of-range block ids, lengths, indices and
 * topk_length, and a misaligned lse; pool limits and every sequence call,
 * exhaustion included; model forward errors; and mlart_model_load on
 * malformed checkpoints derived from the good one in argv[1] (truncated
 * safetensors, a bad header length, garbage or missing files). After every
 * error the caller's outputs must be as they were: they hold a sentinel.
 *
 * Linked twice by CMakeLists.txt (libmlart.so and libmlart.a). Exits non-zero
 * if any check fails, after printing every failed check.
 */
#define _POSIX_C_SOURCE 200809L /* mkdtemp, mkdir, rmdir, unlink */

#include "mlart.h"

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

/* ------------------------------------------------------------ utilities */

enum { SENTINEL = 0xA5, N_BAD_SIZES = 5 };

/* Short names for the statuses expected below. */
#define INVALID MLART_STATUS_INVALID_ARGUMENT
#define NULL_PTR MLART_STATUS_NULL_POINTER
#define NOT_FOUND MLART_STATUS_NOT_FOUND
#define EXHAUSTED MLART_STATUS_POOL_EXHAUSTED

/* A heap block of exactly `bytes`, every byte SENTINEL. */
static void *sentinel_block(size_t bytes) { return memset(xmalloc(bytes), SENTINEL, bytes); }

static int untouched(const void *p, size_t bytes) {
    for (size_t i = 0; i < bytes; ++i) {
        if (((const unsigned char *)p)[i] != SENTINEL) {
            return 0;
        }
    }
    return 1;
}

/* A distinct non-NULL handle: a failed call must leave it in *out. */
static char g_tag;
#define TAG(type) ((type *)(void *)&g_tag)

/* The i-th bad struct_size for a struct of `size` bytes. */
static uint32_t bad_size(size_t size, int i) {
    const uint32_t s = (uint32_t)size;
    const uint32_t v[N_BAD_SIZES] = {0, 4, s - 1, s + 8, UINT32_MAX}; /* s - 4 may be an older layout */
    return v[i];
}

/* Evaluates `call`, which passes `hdr` as its `type` struct, for each bad
 * struct_size of `type`; `hdr` is a 4-byte heap block holding only that
 * size. Each call must fail naming struct_size and leave the block as it was. */
#define EXPECT_BAD_STRUCT_SIZES(type, call)                                                    \
    for (int i_ = 0; i_ < N_BAD_SIZES; ++i_) {                                                 \
        uint32_t size_ = bad_size(sizeof(type), i_);                                           \
        uint32_t *hdr = (uint32_t *)xmalloc(sizeof(uint32_t));                                 \
        *hdr = size_;                                                                          \
        EXPECT_ERROR(call, INVALID, "struct_size");                                            \
        CHECK(*hdr == size_, #type " struct_size %u became %u", (unsigned)size_,               \
              (unsigned)*hdr);                                                                 \
        free(hdr);                                                                             \
    }

/* ------------------------------------------------- handles, NULL, enums */

static void test_null_and_enums(mlart_engine *engine) {
    /* Every _init and _free accepts NULL. */
    mlart_decode_args_init(NULL);
    mlart_device_props_init(NULL);
    mlart_engine_options_init(NULL);
    mlart_engine_props_init(NULL);
    mlart_model_options_init(NULL);
    mlart_model_props_init(NULL);
    mlart_forward_args_init(NULL);
    mlart_kv_pool_options_init(NULL);
    mlart_kv_pool_stats_init(NULL);
    mlart_kv_pool_decode_args_init(NULL);
    mlart_error_free(NULL);
    mlart_engine_free(NULL);
    mlart_model_free(NULL);
    mlart_kv_pool_free(NULL);
    CHECK(mlart_error_code(NULL) == MLART_STATUS_OK && strcmp(mlart_error_message(NULL), "ok") == 0,
          "mlart_error_code/message(NULL)");
    const mlart_status statuses[] = {0, 11, 12, 1000, UINT32_MAX};
    for (size_t i = 0; i < sizeof statuses / sizeof *statuses; ++i) {
        const char *name = mlart_status_name(statuses[i]);
        CHECK(name != NULL && name[0] != '\0', "mlart_status_name(%u)", (unsigned)statuses[i]);
    }

    /* NULL out-pointers and handles. */
    EXPECT_ERROR(mlart_device_count(NULL), NULL_PTR, "out");
    EXPECT_ERROR(mlart_device_info(0, NULL), NULL_PTR, "out");
    EXPECT_ERROR(mlart_engine_create(NULL, NULL), NULL_PTR, "out");
    EXPECT_ERROR(mlart_engine_info(engine, NULL), NULL_PTR, "out");
    EXPECT_ERROR(mlart_engine_mem_alloc(engine, 16, NULL), NULL_PTR, "out");
    EXPECT_ERROR(mlart_kv_row_bytes(0, 64, NULL), NULL_PTR, "out");
    EXPECT_ERROR(mlart_kv_block_bytes(0, 64, 16, NULL), NULL_PTR, "out");
    EXPECT_ERROR(mlart_engine_mem_free(NULL, NULL), NULL_PTR, "engine");
    EXPECT_ERROR(mlart_decode_paged(NULL, NULL), NULL_PTR, "engine");
    EXPECT_ERROR(mlart_decode_paged(engine, NULL), NULL_PTR, "args");
    EXPECT_ERROR(mlart_kv_pool_create(engine, NULL, NULL), NULL_PTR, "options");
    EXPECT_ERROR(mlart_kv_seq_create(NULL, 1), NULL_PTR, "pool");
    EXPECT_ERROR(mlart_kv_seq_free(NULL, 1), NULL_PTR, "pool");
    EXPECT_ERROR(mlart_kv_seq_fork(NULL, 1, 2), NULL_PTR, "pool");
    EXPECT_ERROR(mlart_kv_seq_truncate(NULL, 1, 0), NULL_PTR, "pool");
    EXPECT_ERROR(mlart_kv_pool_decode(NULL, NULL), NULL_PTR, "pool");
    EXPECT_ERROR(mlart_model_info(NULL, NULL), NULL_PTR, "model");

    /* The engine's structs, and the device props (read before the driver
     * is asked, so no GPU is needed). */
    mlart_engine *e_out = TAG(mlart_engine);
    EXPECT_BAD_STRUCT_SIZES(mlart_engine_options,
                            mlart_engine_create((const mlart_engine_options *)hdr, &e_out));
    EXPECT_BAD_STRUCT_SIZES(mlart_engine_props,
                            mlart_engine_info(engine, (mlart_engine_props *)hdr));
    EXPECT_BAD_STRUCT_SIZES(mlart_device_props, mlart_device_info(0, (mlart_device_props *)hdr));

    /* Bad enum values and sizes; outputs untouched. */
    mlart_engine_options eo;
    mlart_engine_options_init(&eo);
    eo.backend = 99;
    EXPECT_ERROR(mlart_engine_create(&eo, &e_out), INVALID, "backend");
    eo.backend = MLART_BACKEND_CPU;
    eo.num_threads = INT_MIN;
    EXPECT_ERROR(mlart_engine_create(&eo, &e_out), INVALID, "num_threads");
    CHECK(e_out == TAG(mlart_engine), "a failed mlart_engine_create wrote *out");
    size_t *bytes = (size_t *)sentinel_block(sizeof *bytes);
    EXPECT_ERROR(mlart_kv_row_bytes(5, 64, bytes), INVALID, "format");
    EXPECT_ERROR(mlart_kv_row_bytes(UINT32_MAX, 64, bytes), INVALID, "format");
    EXPECT_ERROR(mlart_kv_row_bytes(0, 0, bytes), INVALID, "d_qk");
    EXPECT_ERROR(mlart_kv_block_bytes(MLART_KV_FORMAT_FP8_V32, 576, 0, bytes),
                 INVALID, "block_size");
    unsigned char *src = (unsigned char *)sentinel_block(1);
    EXPECT_ERROR(mlart_engine_mem_copy(engine, bytes, 5, src, MLART_MEMORY_HOST, 1),
                 INVALID, "dst_memory");
    CHECK(untouched(bytes, sizeof *bytes), "a failed call wrote its size_t output");
    free(bytes);
    free(src);
}

/* ---------------------------------------------------------- paged decode */

enum { B = 2, S_Q = 1, H_Q = 2, D_QK = 16, D_V = 8, BS = 4, STRIDE = 3, NB = 5, TOPK = 3 };
enum { OUT_BYTES = 4 * B * S_Q * H_Q * D_V, LSE_BYTES = 4 * B * H_Q * S_Q };

/* A decode that must fail with INVALID_ARGUMENT naming `needle`, leaving
 * its out and lse (sentinel blocks) as they were. */
static void decode_fails(mlart_engine *e, const mlart_decode_args *a, const char *needle) {
    EXPECT_ERROR(mlart_decode_paged(e, a), INVALID, needle);
    CHECK(untouched(a->out, OUT_BYTES) && untouched(a->lse, LSE_BYTES),
          "a decode failing on \"%s\" wrote out or lse", needle);
}

/* Sets *field (an input array entry the decode reads) to `low`, `limit`
 * (the first value past the valid range), INT_MAX and INT_MIN in turn; each
 * decode must fail naming "<name> = <value>". Restores the entry. */
static void decode_rejects(mlart_engine *e, const mlart_decode_args *a, int32_t *field,
                           const char *name, int32_t low, int32_t limit) {
    const int32_t saved = *field, values[] = {low, limit, INT_MAX, INT_MIN};
    for (size_t i = 0; i < sizeof values / sizeof *values; ++i) {
        char needle[64];
        *field = values[i];
        snprintf(needle, sizeof needle, "%s = %d", name, (int)values[i]);
        decode_fails(e, a, needle);
    }
    *field = saved;
}

static void test_decode(mlart_engine *engine) {
    /* Sequence 0: 5 tokens in blocks 3, 1 (entry 2 is never read);
     * sequence 1: 9 tokens in blocks 0, 2, 4. Sparse: 3 positions per
     * query; sequence 1 uses only its first (topk_length 1). */
    static const int32_t table[B * STRIDE] = {3, 1, -1, 0, 2, 4}, lens[B] = {5, 9};
    static const int32_t pos[B * S_Q * TOPK] = {0, 5, -1, 7, 19, 2}, tlen[B] = {TOPK, 1};
    float *q = (float *)xmalloc(sizeof(float) * B * S_Q * H_Q * D_QK);
    float *kv = (float *)xmalloc(sizeof(float) * NB * BS * D_QK);
    int32_t *bt = (int32_t *)memcpy(xmalloc(sizeof table), table, sizeof table);
    int32_t *seqlens = (int32_t *)memcpy(xmalloc(sizeof lens), lens, sizeof lens);
    int32_t *indices = (int32_t *)memcpy(xmalloc(sizeof pos), pos, sizeof pos);
    int32_t *topk_length = (int32_t *)memcpy(xmalloc(sizeof tlen), tlen, sizeof tlen);
    for (int i = 0; i < B * S_Q * H_Q * D_QK; ++i) q[i] = (float)(i % 7) * 0.125f;
    for (int i = 0; i < NB * BS * D_QK; ++i) kv[i] = (float)(i % 5) * 0.25f;

    mlart_decode_args a;
    mlart_decode_args_init(&a);
    a.batch = B; a.s_q = S_Q; a.h_q = H_Q; a.d_qk = D_QK; a.d_v = D_V;
    a.q_dtype = MLART_DTYPE_F32; a.q = q;
    a.kv_format = MLART_KV_FORMAT_F32; a.kv = kv; a.num_blocks = NB; a.block_size = BS;
    a.block_table = bt; a.block_table_stride = STRIDE; a.seqlens = seqlens;
    a.out_dtype = MLART_DTYPE_F32; a.out = xmalloc(OUT_BYTES); a.lse = (float *)xmalloc(LSE_BYTES);
    mlart_decode_args sparse = a;
    sparse.block_table = NULL; sparse.seqlens = NULL; sparse.block_table_stride = 0;
    sparse.indices = indices; sparse.topk = TOPK; sparse.topk_length = topk_length;

    /* The unmodified calls succeed: every failure below is the mutation's.
     * An index past topk_length is never read. */
    indices[1 * TOPK + 2] = INT_MIN;
    OK(mlart_decode_paged(engine, &a));
    OK(mlart_decode_paged(engine, &sparse));
    memset(a.out, SENTINEL, OUT_BYTES);
    memset(a.lse, SENTINEL, LSE_BYTES);

    EXPECT_BAD_STRUCT_SIZES(mlart_decode_args,
                            mlart_decode_paged(engine, (const mlart_decode_args *)hdr));
    decode_rejects(engine, &a, &bt[1 * STRIDE + 2], "block_table[1][2]", -1, NB);
    decode_rejects(engine, &a, &seqlens[1], "seqlens[1]", -1, STRIDE * BS + 1);
    decode_rejects(engine, &sparse, &indices[1 * TOPK], "indices[1][0][0]", -2, NB * BS);
    decode_rejects(engine, &sparse, &topk_length[0], "topk_length[0]", -1, TOPK + 1);

    /* Bad scalars and enums, each set in a copy of a valid call. */
    static const struct {
        size_t offset; /* of an int32_t or uint32_t field */
        int32_t value;
        const char *needle;
    } fields[] = {
        {offsetof(mlart_decode_args, kv_format), -1, "kv_format"},
        {offsetof(mlart_decode_args, q_dtype), 99, "q_dtype"},
        {offsetof(mlart_decode_args, out_dtype), 99, "out_dtype"},
        {offsetof(mlart_decode_args, memory), 7, "memory"},
        {offsetof(mlart_decode_args, h_q), 0, "h_q"},
        {offsetof(mlart_decode_args, d_v), D_QK + 1, "d_v"},
        {offsetof(mlart_decode_args, num_blocks), INT_MIN, "num_blocks"},
        {offsetof(mlart_decode_args, block_size), 0, "block_size"},
        {offsetof(mlart_decode_args, block_table_stride), -1, "block_table_stride"},
    };
    mlart_decode_args bad;
    for (size_t i = 0; i < sizeof fields / sizeof *fields; ++i) {
        bad = a;
        memcpy((char *)&bad + fields[i].offset, &fields[i].value, sizeof(int32_t));
        decode_fails(engine, &bad, fields[i].needle);
    }
    bad = sparse;
    bad.topk = 0;
    decode_fails(engine, &bad, "topk = 0");
    bad = sparse;
    bad.causal = true;
    decode_fails(engine, &bad, "causal");
    bad = a;
    bad.topk_length = topk_length; /* a sparse-only field in a dense call */
    decode_fails(engine, &bad, "topk_length");
    bad = a;
    bad.seqlens = NULL;
    EXPECT_ERROR(mlart_decode_paged(engine, &bad), NULL_PTR, "seqlens");

    /* A misaligned lse: one byte into a block one byte larger. */
    unsigned char *lse_block = (unsigned char *)sentinel_block(LSE_BYTES + 1);
    bad = a;
    bad.lse = (float *)(void *)(lse_block + 1);
    EXPECT_ERROR(mlart_decode_paged(engine, &bad), INVALID, "lse");
    CHECK(untouched(a.out, OUT_BYTES) && untouched(lse_block, LSE_BYTES + 1),
          "a decode with a misaligned lse wrote out or lse");
    free(lse_block);
    free(q);
    free(kv);
    free(bt);
    free(seqlens);
    free(indices);
    free(topk_length);
    free(a.out);
    free(a.lse);
}

/* --------------------------------------------------------- pool, sequences */

enum { P_DQK = 16, P_BLOCKS = 3, P_LAYERS = 2 };

static int64_t seq_len(const mlart_kv_pool *pool, uint64_t id) {
    int64_t n = -1;
    OK(mlart_kv_seq_length(pool, id, 0, &n));
    return n;
}

static int64_t blocks_used(const mlart_kv_pool *pool) {
    mlart_kv_pool_stats st;
    mlart_kv_pool_stats_init(&st);
    return OK(mlart_kv_pool_stats_get(pool, &st)) ? st.blocks_used : -1;
}

/* Appends n rows, from an exact heap block, to layer 0 of `id`. */
static mlart_error *append(mlart_kv_pool *pool, uint64_t id, int32_t n) {
    float *rows = (float *)xmalloc(sizeof(float) * (size_t)n * P_DQK);
    for (int i = 0; i < n * P_DQK; ++i) rows[i] = (float)i * 0.01f;
    mlart_error *err = mlart_kv_append(pool, id, 0, n, MLART_DTYPE_F32, rows);
    free(rows);
    return err;
}

static void test_pool(mlart_engine *engine) {
    mlart_kv_pool_options o;
    mlart_kv_pool *p_out = TAG(mlart_kv_pool);
    EXPECT_BAD_STRUCT_SIZES(
        mlart_kv_pool_options,
        mlart_kv_pool_create(engine, (const mlart_kv_pool_options *)hdr, &p_out));
    /* Limits: each count below 1, a row too wide, a format / d_qk mismatch. */
    struct {
        int32_t *field;
        int32_t value;
        const char *needle;
    } limits[] = {
        {&o.num_blocks, 0, "num_blocks"}, {&o.num_blocks, INT_MIN, "num_blocks"},
        {&o.block_size, 0, "block_size"}, {&o.num_layers, -1, "num_layers"},
        {&o.d_qk, 0, "d_qk"},             {&o.d_qk, 1025, "d_qk"},
    };
    for (size_t i = 0; i < sizeof limits / sizeof *limits; ++i) {
        mlart_kv_pool_options_init(&o);
        o.num_blocks = 4;
        *limits[i].field = limits[i].value;
        EXPECT_ERROR(mlart_kv_pool_create(engine, &o, &p_out), INVALID, limits[i].needle);
    }
    o.kv_format = MLART_KV_FORMAT_FP8_V32; /* 576-wide rows only */
    o.d_qk = 512;
    EXPECT_ERROR(mlart_kv_pool_create(engine, &o, &p_out), INVALID, "d_qk");
    o.kv_format = 9;
    EXPECT_ERROR(mlart_kv_pool_create(engine, &o, &p_out), INVALID, "kv_format");
    /* INT_MAX blocks of 576-wide bf16 rows: more memory than any host has. */
    mlart_kv_pool_options_init(&o);
    o.num_blocks = INT_MAX;
    mlart_error *err = mlart_kv_pool_create(engine, &o, &p_out);
    CHECK(mlart_error_code(err) == MLART_STATUS_OUT_OF_MEMORY || mlart_error_code(err) == INVALID,
          "a pool of INT_MAX blocks: [%s] %s", mlart_status_name(mlart_error_code(err)),
          mlart_error_message(err));
    mlart_error_free(err);
    EXPECT_ERROR(mlart_kv_pool_create(engine, &o, NULL), NULL_PTR, "out");
    CHECK(p_out == TAG(mlart_kv_pool), "a failed mlart_kv_pool_create wrote *out");

    /* 3 blocks of 4 tokens, in 2 layers. */
    mlart_kv_pool_options_init(&o);
    o.kv_format = MLART_KV_FORMAT_F32; o.d_qk = P_DQK; o.num_layers = P_LAYERS;
    o.block_size = 4; o.num_blocks = P_BLOCKS;
    mlart_kv_pool *pool = NULL;
    if (!OK(mlart_kv_pool_create(engine, &o, &pool))) {
        return;
    }
    EXPECT_BAD_STRUCT_SIZES(mlart_kv_pool_stats,
                            mlart_kv_pool_stats_get(pool, (mlart_kv_pool_stats *)hdr));
    EXPECT_ERROR(mlart_kv_pool_stats_get(pool, NULL), NULL_PTR, "out");
    OK(mlart_kv_seq_create(pool, 1));
    OK(mlart_kv_seq_create(pool, UINT64_MAX));
    EXPECT_ERROR(mlart_kv_seq_create(pool, 1), INVALID, "1");
    EXPECT_ERROR(mlart_kv_seq_free(pool, 99), NOT_FOUND, "99");
    EXPECT_ERROR(mlart_kv_seq_fork(pool, 99, 5), NOT_FOUND, "99");
    EXPECT_ERROR(mlart_kv_seq_fork(pool, 1, 1), INVALID, "1");
    EXPECT_ERROR(mlart_kv_seq_fork(pool, 1, UINT64_MAX), INVALID, "18446744073709551615");
    EXPECT_ERROR(mlart_kv_seq_truncate(pool, 99, 0), NOT_FOUND, "99");
    EXPECT_ERROR(mlart_kv_seq_truncate(pool, 1, -1), INVALID, "length");
    EXPECT_ERROR(mlart_kv_seq_truncate(pool, 1, INT64_MIN), INVALID, "length");
    int64_t *len = (int64_t *)sentinel_block(sizeof *len);
    EXPECT_ERROR(mlart_kv_seq_length(pool, 99, 0, len), NOT_FOUND, "99");
    EXPECT_ERROR(mlart_kv_seq_length(pool, 1, P_LAYERS, len), INVALID, "layer");
    EXPECT_ERROR(mlart_kv_seq_length(pool, 1, INT_MIN, len), INVALID, "layer");
    EXPECT_ERROR(mlart_kv_seq_length(pool, 1, 0, NULL), NULL_PTR, "out_length");
    CHECK(untouched(len, sizeof *len), "a failed mlart_kv_seq_length wrote *out_length");
    free(len);
    float *row = (float *)memset(xmalloc(sizeof(float) * P_DQK), 0, sizeof(float) * P_DQK);
    EXPECT_ERROR(mlart_kv_append(pool, 1, 0, 1, 0, NULL), NULL_PTR, "rows");
    EXPECT_ERROR(mlart_kv_append(pool, 1, 0, -1, 0, row), INVALID, "n_tokens");
    EXPECT_ERROR(mlart_kv_append(pool, 1, P_LAYERS, 1, 0, row), INVALID, "layer");
    EXPECT_ERROR(mlart_kv_append(pool, 1, -1, 1, 0, row), INVALID, "layer");
    EXPECT_ERROR(mlart_kv_append(pool, 1, 0, 1, 42, row), INVALID, "dtype");
    EXPECT_ERROR(mlart_kv_append(pool, 99, 0, 1, 0, row), NOT_FOUND, "99");
    free(row);
    CHECK(seq_len(pool, 1) == 0 && blocks_used(pool) == 0, "failed appends changed the pool");

    /* Exhaustion (3 blocks hold 12 tokens): a failed append changes nothing. */
    EXPECT_ERROR(append(pool, 1, 13), EXHAUSTED, NULL);
    CHECK(seq_len(pool, 1) == 0 && blocks_used(pool) == 0, "an exhausted append changed the pool");
    OK(append(pool, 1, 12));
    EXPECT_ERROR(append(pool, 1, 1), EXHAUSTED, NULL);
    EXPECT_ERROR(append(pool, UINT64_MAX, 1), EXHAUSTED, NULL);
    /* A fork shares the full blocks: appending to it needs a new block, and
     * so does appending into a shared block after a truncate (copy-on-write). */
    OK(mlart_kv_seq_fork(pool, 1, 3));
    EXPECT_ERROR(append(pool, 3, 1), EXHAUSTED, NULL);
    OK(mlart_kv_seq_truncate(pool, 1, 10));
    EXPECT_ERROR(append(pool, 1, 1), EXHAUSTED, NULL);
    CHECK(seq_len(pool, 1) == 10 && seq_len(pool, 3) == 12 && blocks_used(pool) == P_BLOCKS,
          "exhausted appends changed the pool");
    OK(mlart_kv_seq_free(pool, 3));
    OK(append(pool, 1, 2)); /* nothing is shared any more */
    CHECK(seq_len(pool, 1) == 12, "length after the last append");

    /* Pool decode errors, dense and sparse; out and lse untouched. */
    const size_t out_bytes = sizeof(float) * H_Q * D_V, lse_bytes = sizeof(float) * H_Q;
    uint64_t *ids = (uint64_t *)xmalloc(sizeof(uint64_t));
    float *q = (float *)sentinel_block(sizeof(float) * H_Q * P_DQK); /* any finite values */
    int32_t *pos = (int32_t *)xmalloc(sizeof(int32_t) * TOPK);
    ids[0] = 1;
    pos[0] = 0; pos[1] = 11; pos[2] = -1;
    mlart_kv_pool_decode_args a;
    mlart_kv_pool_decode_args_init(&a);
    a.batch = 1; a.seq_ids = ids; a.h_q = H_Q; a.d_v = D_V;
    a.q_dtype = MLART_DTYPE_F32; a.q = q;
    a.out_dtype = MLART_DTYPE_F32; a.out = xmalloc(out_bytes); a.lse = (float *)xmalloc(lse_bytes);
    mlart_kv_pool_decode_args sp = a;
    sp.indices = pos; sp.topk = TOPK;
    OK(mlart_kv_pool_decode(pool, &a)); /* the unmodified calls succeed */
    OK(mlart_kv_pool_decode(pool, &sp));
    memset(a.out, SENTINEL, out_bytes);
    memset(a.lse, SENTINEL, lse_bytes);
    EXPECT_BAD_STRUCT_SIZES(mlart_kv_pool_decode_args,
                            mlart_kv_pool_decode(pool, (const mlart_kv_pool_decode_args *)hdr));
    mlart_kv_pool_decode_args bad = a;
    bad.layer = P_LAYERS;
    EXPECT_ERROR(mlart_kv_pool_decode(pool, &bad), INVALID, "layer");
    ids[0] = 3; /* freed above */
    EXPECT_ERROR(mlart_kv_pool_decode(pool, &a), NOT_FOUND, "seq_ids[0]");
    ids[0] = 1;
    pos[1] = 12; /* one past the sequence */
    EXPECT_ERROR(mlart_kv_pool_decode(pool, &sp), INVALID, "indices[0][0][1]");
    pos[1] = INT_MIN;
    EXPECT_ERROR(mlart_kv_pool_decode(pool, &sp), INVALID, "indices[0][0][1]");
    CHECK(untouched(a.out, out_bytes) && untouched(a.lse, lse_bytes),
          "a failed pool decode wrote out or lse");
    free(ids);
    free(q);
    free(pos);
    free(a.out);
    free(a.lse);
    mlart_kv_pool_free(pool); /* with live sequences */
}

/* ------------------------------------------------- model load and forward */

/* The whole of dir/name, in an exact heap block of *len bytes. */
static unsigned char *read_file(const char *dir, const char *name, size_t *len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "rb");
    long end = fp != NULL && fseek(fp, 0, SEEK_END) == 0 ? ftell(fp) : -1;
    unsigned char *bytes = (unsigned char *)xmalloc(end > 0 ? (size_t)end : 1);
    *len = end > 0 ? (size_t)end : 0;
    if (end <= 0 || fseek(fp, 0, SEEK_SET) != 0 || fread(bytes, 1, *len, fp) != *len) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(fp);
    return bytes;
}

/* Replaces dir/name with `len` bytes; NULL bytes: just removes it. */
static void put_file(const char *dir, const char *name, const void *bytes, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
    FILE *fp = bytes != NULL ? fopen(path, "wb") : NULL;
    if (bytes != NULL && (fp == NULL || fwrite(bytes, 1, len, fp) != len || fclose(fp) != 0)) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
}

/* Writes a checkpoint into `dir` and loads it: the load must fail with
 * `status` and leave *out alone. */
static void load_fails(mlart_engine *engine, const char *dir, const char *config,
                       size_t config_len, const unsigned char *st, size_t st_len,
                       mlart_status status, const char *what) {
    put_file(dir, "config.json", config, config_len);
    put_file(dir, "model.safetensors", st, st_len);
    mlart_model *m = TAG(mlart_model);
    mlart_error *err = mlart_model_load(engine, dir, NULL, &m);
    CHECK(mlart_error_code(err) == status && m == TAG(mlart_model),
          "load of %s: expected [%s], got [%s] %s%s", what, mlart_status_name(status),
          mlart_status_name(mlart_error_code(err)), mlart_error_message(err),
          m == TAG(mlart_model) ? "" : "; *out written");
    mlart_error_free(err);
}

static void test_forward(mlart_engine *engine, mlart_model *model) {
    EXPECT_BAD_STRUCT_SIZES(mlart_model_props, mlart_model_info(model, (mlart_model_props *)hdr));
    EXPECT_ERROR(mlart_model_info(model, NULL), NULL_PTR, "out");
    mlart_model_props mp;
    mlart_model_props_init(&mp);
    mlart_kv_pool_options o;
    mlart_kv_pool_options_init(&o);
    mlart_kv_pool *pool = NULL;
    if (!OK(mlart_model_info(model, &mp))) {
        return;
    }
    o.kv_format = MLART_KV_FORMAT_F32; o.d_qk = mp.d_qk; o.num_layers = mp.loaded_layers;
    o.block_size = 4; o.num_blocks = 1; /* 4 tokens */
    if (!OK(mlart_kv_pool_create(engine, &o, &pool)) || !OK(mlart_kv_seq_create(pool, 1))) {
        mlart_kv_pool_free(pool);
        return;
    }
    const size_t x_elems = 5 * (size_t)mp.hidden_size, out_bytes = sizeof(float) * x_elems;
    uint64_t *ids = (uint64_t *)xmalloc(sizeof(uint64_t));
    int32_t *n = (int32_t *)xmalloc(sizeof(int32_t));
    float *x = (float *)xmalloc(sizeof(float) * x_elems);
    for (size_t i = 0; i < x_elems; ++i) x[i] = (float)(i % 11) * 0.05f;
    ids[0] = 1; n[0] = 5;
    mlart_forward_args a;
    mlart_forward_args_init(&a);
    a.batch = 1; a.seq_ids = ids; a.n_tokens = n; a.x = x; a.out = sentinel_block(out_bytes);
    EXPECT_BAD_STRUCT_SIZES(mlart_forward_args,
                            mlart_model_forward(model, pool, (const mlart_forward_args *)hdr));
    EXPECT_ERROR(mlart_model_forward(model, pool, &a), EXHAUSTED, NULL);
    n[0] = 0;
    EXPECT_ERROR(mlart_model_forward(model, pool, &a), INVALID, "n_tokens[0]");
    n[0] = 1;
    a.layer = mp.num_layers;
    EXPECT_ERROR(mlart_model_forward(model, pool, &a), INVALID, "layer");
    a.layer = 0;
    a.x_dtype = MLART_DTYPE_FP8_E4M3;
    EXPECT_ERROR(mlart_model_forward(model, pool, &a), MLART_STATUS_UNSUPPORTED, "x_dtype");
    a.x_dtype = MLART_DTYPE_F32;
    ids[0] = 2;
    EXPECT_ERROR(mlart_model_forward(model, pool, &a), NOT_FOUND, "2");
    CHECK(untouched(a.out, out_bytes) && seq_len(pool, 1) == 0,
          "a failed forward wrote out or changed the pool");
    ids[0] = 1;
    OK(mlart_model_forward(model, pool, &a)); /* the unmodified call succeeds */
    free(ids);
    free(n);
    free(x);
    free(a.out);
    mlart_kv_pool_free(pool);
}

static void test_model(mlart_engine *engine, const char *good) {
    mlart_model *m = TAG(mlart_model);
    EXPECT_ERROR(mlart_model_load(NULL, good, NULL, &m), NULL_PTR, "engine");
    EXPECT_ERROR(mlart_model_load(engine, NULL, NULL, &m), NULL_PTR, "path");
    EXPECT_ERROR(mlart_model_load(engine, "\xff\xfe", NULL, &m), INVALID, "UTF-8");
    EXPECT_ERROR(mlart_model_load(engine, good, NULL, NULL), NULL_PTR, "out");
    EXPECT_BAD_STRUCT_SIZES(mlart_model_options,
                            mlart_model_load(engine, good, (const mlart_model_options *)hdr, &m));
    mlart_model_options mo;
    mlart_model_options_init(&mo);
    mo.convert_weights = true;
    mo.weight_dtype = 9;
    EXPECT_ERROR(mlart_model_load(engine, good, &mo, &m), INVALID, "weight_dtype");
    mlart_model_options_init(&mo);
    mo.activations = 7;
    EXPECT_ERROR(mlart_model_load(engine, good, &mo, &m), INVALID, "activations");
    CHECK(m == TAG(mlart_model), "a failed load wrote *out");

    /* Damaged copies of the good checkpoint, in a fresh directory. */
    size_t cfg_len = 0, st_len = 0;
    unsigned char *cfg = read_file(good, "config.json", &cfg_len);
    unsigned char *st = read_file(good, "model.safetensors", &st_len);
    char dir[] = "/tmp/mlart-error-paths-XXXXXX";
    if (mkdtemp(dir) == NULL) {
        fprintf(stderr, "mkdtemp failed\n");
        exit(2);
    }
    /* The undamaged copy loads: every failure below is the damage's. */
    put_file(dir, "config.json", cfg, cfg_len);
    put_file(dir, "model.safetensors", st, st_len);
    mlart_model *model = NULL;
    if (OK(mlart_model_load(engine, dir, NULL, &model))) {
        test_forward(engine, model);
        mlart_model_free(model);
    }
    /* model.safetensors cut short: in the header length, in the JSON header,
     * at its end, in the tensors. */
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; --i) hlen = hlen << 8 | st[i];
    const size_t cuts[] = {0, 7, 8, (size_t)hlen + 7, (size_t)hlen + 8, (size_t)hlen + 9,
                           st_len / 2, st_len - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; ++i) {
        char what[64];
        snprintf(what, sizeof what, "model.safetensors cut to %zu bytes", cuts[i]);
        load_fails(engine, dir, (const char *)cfg, cfg_len, st, cuts[i], MLART_STATUS_FORMAT, what);
    }
    /* A header length of 2^63. */
    unsigned char *big = (unsigned char *)memcpy(xmalloc(st_len), st, st_len);
    memset(big, 0, 8);
    big[7] = 0x80;
    load_fails(engine, dir, (const char *)cfg, cfg_len, big, st_len, MLART_STATUS_FORMAT,
               "a header length of 2^63");
    free(big);
    /* Garbage and missing files. */
    const char *configs[] = {"", "{hidden_size: 3", "[]", "{\"hidden_size\": -1}"};
    for (size_t i = 0; i < sizeof configs / sizeof *configs; ++i) {
        load_fails(engine, dir, configs[i], strlen(configs[i]), st, st_len, MLART_STATUS_FORMAT,
                   configs[i]);
    }
    load_fails(engine, dir, (const char *)cfg, cfg_len, NULL, 0, MLART_STATUS_IO,
               "no model.safetensors");
    load_fails(engine, dir, NULL, 0, st, st_len, MLART_STATUS_IO, "no config.json");
    put_file(dir, "model.safetensors", NULL, 0);
    rmdir(dir);
    free(cfg);
    free(st);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <checkpoint dir>\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    mlart_engine_options eo;
    mlart_engine_options_init(&eo);
    eo.backend = MLART_BACKEND_CPU;
    eo.num_threads = 2;
    mlart_engine *engine = NULL;
    if (!OK(mlart_engine_create(&eo, &engine))) {
        return 1;
    }
    test_null_and_enums(engine);
    test_decode(engine);
    test_pool(engine);
    test_model(engine, argv[1]);
    mlart_engine_free(engine);
    if (g_failures != 0) {
        fprintf(stderr, "test_error_paths: %d of %d checks failed\n", g_failures, g_checks);
        return 1;
    }
    printf("test_error_paths: %d checks passed\n", g_checks);
    return 0;
}
