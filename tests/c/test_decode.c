/*
 * C11 consumer of the mlart C ABI: versions, engine, paged decode against a
 * double-precision reference (F32 dense, FP8_V32 sparse with topk_length and
 * an attention sink), FP8 size/quantize helpers, error handling and the
 * managed KV pool.
 *
 * Linked twice by CMakeLists.txt (libmlart.so and libmlart.a). Exits non-zero
 * if any check fails, after printing every failed check.
 */
#include "mlart.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* ------------------------------------------------------------ utilities */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

/* xorshift64*: uniform in [-1, 1). */
static float rnd(void) {
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    uint64_t x = g_rng * 0x2545F4914F6CDD1Dull;
    return (float)((double)(x >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

static int rnd_below(int n) {
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (int)((g_rng * 0x2545F4914F6CDD1Dull >> 33) % (uint64_t)n);
}

static void fill_random(float *p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        p[i] = rnd();
    }
}

static void fill_nan(float *p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        p[i] = NAN;
    }
}

/*
 * Reference attention for one sequence, in double precision.
 * q [s_q, h_q, d_qk], keys [seqlen, d_qk] (V = first d_v of each row);
 * writes out [s_q, h_q, d_v] and lse [h_q, s_q] (natural log; +inf and
 * out = 0 for a query that sees no key).
 */
static void reference(const float *q, const float *keys, int seqlen, int s_q, int h_q, int d_qk,
                      int d_v, double scale, bool causal, double *out, double *lse) {
    double *scores = (double *)xmalloc(sizeof(double) * (size_t)(seqlen > 0 ? seqlen : 1));
    for (int i = 0; i < s_q; ++i) {
        int n = causal ? seqlen - (s_q - 1 - i) : seqlen;
        if (n < 0) {
            n = 0;
        }
        for (int h = 0; h < h_q; ++h) {
            const float *qr = q + ((size_t)i * h_q + h) * d_qk;
            double *o = out + ((size_t)i * h_q + h) * d_v;
            for (int c = 0; c < d_v; ++c) {
                o[c] = 0.0;
            }
            if (n == 0) {
                lse[h * s_q + i] = INFINITY;
                continue;
            }
            double m = -INFINITY;
            for (int t = 0; t < n; ++t) {
                double s = 0.0;
                for (int c = 0; c < d_qk; ++c) {
                    s += (double)qr[c] * (double)keys[(size_t)t * d_qk + c];
                }
                scores[t] = s * scale;
                if (scores[t] > m) {
                    m = scores[t];
                }
            }
            double sum = 0.0;
            for (int t = 0; t < n; ++t) {
                double p = exp(scores[t] - m);
                sum += p;
                for (int c = 0; c < d_v; ++c) {
                    o[c] += p * (double)keys[(size_t)t * d_qk + c];
                }
            }
            for (int c = 0; c < d_v; ++c) {
                o[c] /= sum;
            }
            lse[h * s_q + i] = m + log(sum);
        }
    }
    free(scores);
}

/* Largest |got - want|; NaN or a mismatched infinity counts as +inf. */
static double max_error(const float *got, const double *want, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; ++i) {
        double e;
        if (isinf(want[i])) {
            e = (isinf(got[i]) && (got[i] > 0) == (want[i] > 0)) ? 0.0 : INFINITY;
        } else {
            e = fabs((double)got[i] - want[i]);
            if (isnan(e)) {
                e = INFINITY;
            }
        }
        if (e > worst) {
            worst = e;
        }
    }
    return worst;
}

static int all_nan(const float *p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!isnan(p[i])) {
            return 0;
        }
    }
    return 1;
}

/* ---------------------------------------------------------- the tests */

static void test_versions(void) {
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", MLART_VERSION_MAJOR, MLART_VERSION_MINOR,
             MLART_VERSION_PATCH);
    const char *v = mlart_version();
    CHECK(v != NULL && strcmp(v, want) == 0, "mlart_version() = \"%s\", header says \"%s\"",
          v ? v : "(null)", want);
    CHECK(mlart_abi_version() == MLART_ABI_VERSION, "mlart_abi_version() = %u, header says %d",
          (unsigned)mlart_abi_version(), MLART_ABI_VERSION);
    CHECK(strcmp(mlart_status_name(MLART_STATUS_POOL_EXHAUSTED), "pool exhausted") == 0,
          "mlart_status_name(POOL_EXHAUSTED) = \"%s\"",
          mlart_status_name(MLART_STATUS_POOL_EXHAUSTED));
    CHECK(mlart_error_code(NULL) == MLART_STATUS_OK, "mlart_error_code(NULL) = %u",
          (unsigned)mlart_error_code(NULL));
    CHECK(strcmp(mlart_error_message(NULL), "ok") == 0, "mlart_error_message(NULL) = \"%s\"",
          mlart_error_message(NULL));
    /* NULL is a no-op for every release function and every _init. */
    mlart_error_free(NULL);
    mlart_engine_free(NULL);
    mlart_kv_pool_free(NULL);
    mlart_decode_args_init(NULL);
    mlart_engine_options_init(NULL);
    mlart_engine_props_init(NULL);
    mlart_kv_pool_options_init(NULL);
    mlart_kv_pool_stats_init(NULL);
    mlart_kv_pool_decode_args_init(NULL);
}

static mlart_engine *create_engine(void) {
    mlart_engine_options opts;
    mlart_engine_options_init(&opts);
    CHECK(opts.struct_size == sizeof opts, "options.struct_size = %u", (unsigned)opts.struct_size);
    CHECK(opts.backend == MLART_BACKEND_AUTO && opts.num_threads == 0, "engine option defaults");
    opts.backend = MLART_BACKEND_CPU;
    opts.num_threads = 2;

    mlart_engine *engine = NULL;
    EXPECT_ERROR(mlart_engine_create(&opts, NULL), MLART_STATUS_NULL_POINTER, "out");
    mlart_engine_options bad = opts;
    bad.struct_size = (uint32_t)sizeof bad + 4;
    EXPECT_ERROR(mlart_engine_create(&bad, &engine), MLART_STATUS_INVALID_ARGUMENT, "struct_size");
    CHECK(engine == NULL, "a failed create wrote *out");
    int32_t gpus = -1;
    CHECK(OK(mlart_device_count(&gpus)) && gpus >= 0, "mlart_device_count");
    if (gpus == 0) {
        /* No driver or no GPU: asking for CUDA says why. */
        bad = opts;
        bad.backend = MLART_BACKEND_CUDA;
        EXPECT_ERROR(mlart_engine_create(&bad, &engine), MLART_STATUS_UNSUPPORTED, "CUDA");
        mlart_device_props dp;
        mlart_device_props_init(&dp);
        EXPECT_ERROR(mlart_device_info(0, &dp), MLART_STATUS_UNSUPPORTED, "driver");
    }
    bad = opts;
    bad.num_threads = -1;
    EXPECT_ERROR(mlart_engine_create(&bad, &engine), MLART_STATUS_INVALID_ARGUMENT, "num_threads");

    if (!OK(mlart_engine_create(&opts, &engine)) || engine == NULL) {
        return NULL;
    }

    mlart_engine_props props;
    memset(&props, 0x5a, sizeof props);
    mlart_engine_props_init(&props);
    CHECK(props.struct_size == sizeof props && props.device_name[0] == '\0',
          "mlart_engine_props_init");
    if (OK(mlart_engine_info(engine, &props))) {
        CHECK(props.backend == MLART_BACKEND_CPU, "props.backend = %u", (unsigned)props.backend);
        CHECK(props.num_threads == 2, "props.num_threads = %d", props.num_threads);
        CHECK(props.cpu_isa <= MLART_CPU_ISA_AVX512_BF16, "props.cpu_isa = %u", (unsigned)props.cpu_isa);
        CHECK(memchr(props.device_name, '\0', sizeof props.device_name) != NULL &&
                  memchr(props.cpu_features, '\0', sizeof props.cpu_features) != NULL &&
                  memchr(props.reason, '\0', sizeof props.reason) != NULL,
              "props strings are NUL-terminated");
        CHECK(props.reason[0] != '\0', "props.reason is empty");
        printf("engine: backend %u, isa %u, %d threads, device \"%.128s\"\n",
               (unsigned)props.backend, (unsigned)props.cpu_isa, props.num_threads,
               props.device_name);
        printf("engine: features \"%.128s\"\n", props.cpu_features);
        printf("engine: reason \"%.256s\"\n", props.reason);
    }
    mlart_engine_props unset;
    memset(&unset, 0, sizeof unset);
    EXPECT_ERROR(mlart_engine_info(engine, &unset), MLART_STATUS_INVALID_ARGUMENT, "struct_size");
    EXPECT_ERROR(mlart_engine_info(NULL, &props), MLART_STATUS_NULL_POINTER, "engine");
    EXPECT_ERROR(mlart_engine_info(engine, NULL), MLART_STATUS_NULL_POINTER, NULL);

    /* Engine memory: host memory on a CPU engine, copied with mem_copy. */
    void *buf = NULL;
    if (OK(mlart_engine_mem_alloc(engine, 64, &buf)) && buf != NULL) {
        unsigned char src[64], back[64];
        for (int i = 0; i < 64; ++i) src[i] = (unsigned char)(i * 3);
        CHECK(OK(mlart_engine_mem_copy(engine, buf, MLART_MEMORY_HOST, src, MLART_MEMORY_HOST, 64)),
              "mem_copy in");
        CHECK(OK(mlart_engine_mem_copy(engine, back, MLART_MEMORY_HOST, buf, MLART_MEMORY_HOST, 64)),
              "mem_copy out");
        CHECK(memcmp(src, back, 64) == 0, "engine memory round trip");
        EXPECT_ERROR(mlart_engine_mem_copy(engine, buf, MLART_MEMORY_DEVICE, src, MLART_MEMORY_HOST, 8),
                     MLART_STATUS_UNSUPPORTED, "dst_memory");
        CHECK(OK(mlart_engine_mem_free(engine, buf)), "mem_free");
    }
    EXPECT_ERROR(mlart_engine_mem_alloc(engine, 0, &buf), MLART_STATUS_INVALID_ARGUMENT, "bytes = 0");
    return engine;
}

enum { B = 4, S_Q = 2, H_Q = 4, D_QK = 64, D_V = 48, BS = 16, STRIDE = 4, NUM_BLOCKS = 11 };

/* A caller-owned paged F32 cache with a shuffled block table. */
typedef struct {
    int32_t seqlens[B];
    int32_t table[B * STRIDE];
    float *keys[B];  /* logical rows [seqlen, D_QK] of each sequence */
    float *kv;       /* [NUM_BLOCKS, BS, D_QK], NaN where unused */
} paged_cache;

static void paged_cache_init(paged_cache *c) {
    static const int lens[B] = {0, 5, 37, 1};
    int perm[NUM_BLOCKS];
    for (int i = 0; i < NUM_BLOCKS; ++i) {
        perm[i] = i;
    }
    for (int i = NUM_BLOCKS - 1; i > 0; --i) {
        int j = rnd_below(i + 1);
        int t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    size_t kv_elems = (size_t)NUM_BLOCKS * BS * D_QK;
    c->kv = (float *)xmalloc(sizeof(float) * kv_elems);
    fill_nan(c->kv, kv_elems);
    int next = 0;
    for (int b = 0; b < B; ++b) {
        c->seqlens[b] = lens[b];
        int used = (lens[b] + BS - 1) / BS;
        for (int j = 0; j < STRIDE; ++j) {
            /* Entries past the length are never read: make them invalid. */
            c->table[b * STRIDE + j] = j < used ? perm[next++] : (j % 2 ? -1 : 1000000);
        }
        c->keys[b] = (float *)xmalloc(sizeof(float) * (size_t)(lens[b] > 0 ? lens[b] : 1) * D_QK);
        fill_random(c->keys[b], (size_t)lens[b] * D_QK);
        for (int t = 0; t < lens[b]; ++t) {
            int block = c->table[b * STRIDE + t / BS];
            memcpy(c->kv + ((size_t)block * BS + t % BS) * D_QK, c->keys[b] + (size_t)t * D_QK,
                   sizeof(float) * D_QK);
        }
    }
}

static void paged_cache_free(paged_cache *c) {
    for (int b = 0; b < B; ++b) {
        free(c->keys[b]);
    }
    free(c->kv);
}

static void test_paged_f32(mlart_engine *engine, bool causal, float scale) {
    paged_cache c;
    paged_cache_init(&c);
    enum { Q_N = B * S_Q * H_Q * D_QK, OUT_N = B * S_Q * H_Q * D_V, LSE_N = B * H_Q * S_Q };
    float *q = (float *)xmalloc(sizeof(float) * Q_N);
    float *out = (float *)xmalloc(sizeof(float) * OUT_N);
    float lse[LSE_N];
    double *ref_out = (double *)xmalloc(sizeof(double) * OUT_N);
    double ref_lse[LSE_N];
    fill_random(q, Q_N);
    fill_nan(out, OUT_N);
    fill_nan(lse, LSE_N);
    double s = scale == 0.0f ? 1.0 / sqrt((double)D_QK) : (double)scale;
    for (int b = 0; b < B; ++b) {
        reference(q + (size_t)b * S_Q * H_Q * D_QK, c.keys[b], c.seqlens[b], S_Q, H_Q, D_QK, D_V,
                  s, causal, ref_out + (size_t)b * S_Q * H_Q * D_V, ref_lse + b * H_Q * S_Q);
    }

    mlart_decode_args a;
    mlart_decode_args_init(&a);
    CHECK(a.struct_size == sizeof a && a.s_q == 1 && a.softmax_scale == 0.0f && !a.causal &&
              a.q_dtype == MLART_DTYPE_BF16 && a.kv_format == MLART_KV_FORMAT_BF16 &&
              a.out_dtype == MLART_DTYPE_BF16 && a.memory == MLART_MEMORY_HOST && a.lse == NULL,
          "mlart_decode_args_init defaults");
    a.batch = B;
    a.s_q = S_Q;
    a.h_q = H_Q;
    a.d_qk = D_QK;
    a.d_v = D_V;
    a.softmax_scale = scale;
    a.causal = causal;
    a.q_dtype = MLART_DTYPE_F32;
    a.q = q;
    a.kv_format = MLART_KV_FORMAT_F32;
    a.kv = c.kv;
    a.num_blocks = NUM_BLOCKS;
    a.block_size = BS;
    a.block_table = c.table;
    a.block_table_stride = STRIDE;
    a.seqlens = c.seqlens;
    a.out_dtype = MLART_DTYPE_F32;
    a.out = out;
    a.lse = lse;

    if (OK(mlart_decode_paged(engine, &a))) {
        double e_out = max_error(out, ref_out, OUT_N);
        double e_lse = max_error(lse, ref_lse, LSE_N);
        printf("paged f32 causal=%d scale=%g: max |out err| %.3g, max |lse err| %.3g\n", causal,
               (double)scale, e_out, e_lse);
        CHECK(e_out < 1e-5, "paged f32 causal=%d: max |out - ref| = %g", causal, e_out);
        CHECK(e_lse < 1e-5, "paged f32 causal=%d: max |lse - ref| = %g", causal, e_lse);
        /* Sequence 0 is empty: out = 0, lse = +inf. */
        CHECK(out[0] == 0.0f && isinf(lse[0]) && lse[0] > 0, "empty sequence: out %g lse %g",
              (double)out[0], (double)lse[0]);
    }

    /* lse is optional. */
    fill_nan(out, OUT_N);
    a.lse = NULL;
    if (OK(mlart_decode_paged(engine, &a))) {
        CHECK(max_error(out, ref_out, OUT_N) < 1e-5, "decode without lse");
    }
    a.lse = lse;

    if (!causal) {
        /* Errors: nothing may be written on any of them. */
        fill_nan(out, OUT_N);
        fill_nan(lse, LSE_N);
        EXPECT_ERROR(mlart_decode_paged(NULL, &a), MLART_STATUS_NULL_POINTER, "engine");
        EXPECT_ERROR(mlart_decode_paged(engine, NULL), MLART_STATUS_NULL_POINTER, "args");

        mlart_decode_args bad = a;
        bad.struct_size = (uint32_t)sizeof bad - 8;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT,
                     "struct_size");

        int32_t saved = c.table[2 * STRIDE + 1];
        c.table[2 * STRIDE + 1] = NUM_BLOCKS; /* used: sequence 2 has 37 tokens */
        mlart_error *err = mlart_decode_paged(engine, &a);
        CHECK(mlart_error_code(err) == MLART_STATUS_INVALID_ARGUMENT, "bad block id: status %u",
              (unsigned)mlart_error_code(err));
        CHECK(err != NULL && strstr(mlart_error_message(err), "block_table[") != NULL,
              "bad block id: message \"%s\"", mlart_error_message(err));
        CHECK(err != NULL && strstr(mlart_error_message(err), "block_table[2][1]") != NULL,
              "bad block id: message \"%s\" does not name block_table[2][1]",
              mlart_error_message(err));
        if (err) {
            printf("expected error: [%s] %s\n", mlart_status_name(mlart_error_code(err)),
                   mlart_error_message(err));
        }
        mlart_error_free(err);
        c.table[2 * STRIDE + 1] = -3;
        EXPECT_ERROR(mlart_decode_paged(engine, &a), MLART_STATUS_INVALID_ARGUMENT,
                     "block_table[2][1]");
        c.table[2 * STRIDE + 1] = saved;

        bad = a;
        bad.seqlens = NULL;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_NULL_POINTER, "seqlens");
        bad = a;
        bad.d_v = D_QK + 1;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "d_v");
        bad = a;
        bad.batch = 0;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "batch");
        int32_t long_lens[B] = {0, 5, STRIDE * BS + 1, 1};
        bad = a;
        bad.seqlens = long_lens;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "seqlens[2]");
        /* attn_sink is an input: it may not alias the lse output, nor be NaN. */
        bad = a;
        bad.attn_sink = lse;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT,
                     "lse overlaps attn_sink");
        {
            const float nan_sink[H_Q] = {0.0f, 1.0f, NAN, 0.0f};
            bad = a;
            bad.attn_sink = nan_sink;
            EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT,
                         "attn_sink[2] = NaN");
        }
        /* Dense decode takes no topk_length; sparse decode no causal mask. */
        {
            const int32_t lengths[B] = {1, 1, 1, 1};
            const int32_t idx[B * S_Q] = {0, 0, 0, 0, 0, 0, 0, 0};
            bad = a;
            bad.topk_length = lengths;
            EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT,
                         "topk_length is set but indices is NULL");
            bad = a;
            bad.causal = true;
            bad.indices = idx;
            bad.topk = 1;
            EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT,
                         "causal");
        }
        bad = a;
        bad.out = q; /* aliases the input */
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "overlaps");
        bad = a;
        bad.memory = MLART_MEMORY_DEVICE;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_UNSUPPORTED, "memory");
        bad = a;
        bad.q_dtype = 99;
        EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "q_dtype");
        CHECK(all_nan(out, OUT_N) && all_nan(lse, LSE_N), "a failed decode wrote out or lse");
    }

    free(q);
    free(out);
    free(ref_out);
    paged_cache_free(&c);
}

/* ------------------------------------------------------- FP8 sparse */

/*
 * Reference attention of one query token over a list of cache rows, in
 * double precision: q_tok [h_q, d_qk]; keys [*, d_qk] indexed by the first
 * n entries of `list` (-1 skipped, duplicates counted twice); sink [h_q] or
 * NULL. Writes out [h_q, d_v] and lse[h * lse_stride].
 */
static void reference_list(const float *q_tok, const float *keys, const int32_t *list, int n,
                           int h_q, int d_qk, int d_v, double scale, const float *sink,
                           double *out, double *lse, int lse_stride) {
    double *scores = (double *)xmalloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int h = 0; h < h_q; ++h) {
        const float *qr = q_tok + (size_t)h * d_qk;
        double *o = out + (size_t)h * d_v;
        for (int c = 0; c < d_v; ++c) {
            o[c] = 0.0;
        }
        double m = -INFINITY;
        int seen = 0;
        for (int k = 0; k < n; ++k) {
            if (list[k] < 0) {
                continue;
            }
            const float *row = keys + (size_t)list[k] * d_qk;
            double s = 0.0;
            for (int c = 0; c < d_qk; ++c) {
                s += (double)qr[c] * (double)row[c];
            }
            scores[k] = s * scale;
            if (scores[k] > m) {
                m = scores[k];
            }
            ++seen;
        }
        if (seen == 0) {
            lse[h * lse_stride] = INFINITY;
            continue;
        }
        double sum = 0.0;
        for (int k = 0; k < n; ++k) {
            if (list[k] < 0) {
                continue;
            }
            double p = exp(scores[k] - m);
            sum += p;
            const float *row = keys + (size_t)list[k] * d_qk;
            for (int c = 0; c < d_v; ++c) {
                o[c] += p * (double)row[c];
            }
        }
        double l = m + log(sum);
        /* +inf sink: factor 0; -inf: factor 1. */
        double factor = sink != NULL ? 1.0 / (1.0 + exp((double)sink[h] - l)) : 1.0;
        for (int c = 0; c < d_v; ++c) {
            o[c] *= factor / sum;
        }
        lse[h * lse_stride] = l;
    }
    free(scores);
}

/* Largest |got - want| over max(1, largest |want|); NaN or a mismatched
 * infinity counts as +inf. */
static double max_rel_error(const float *got, const double *want, size_t n) {
    double mag = 1.0;
    for (size_t i = 0; i < n; ++i) {
        if (!isinf(want[i]) && fabs(want[i]) > mag) {
            mag = fabs(want[i]);
        }
    }
    return max_error(got, want, n) / mag;
}

enum {
    F_DQK = 576, /* FP8_V32 rows: 512 latent + 64 rope */
    F_DV = 512,
    F_H = 3,
    F_SQ = 2,
    F_B = 2,
    F_BS = 16,
    F_TOK = 40,                         /* tokens quantized */
    F_USED = (F_TOK + F_BS - 1) / F_BS, /* blocks they fill: 3 */
    F_NB = F_USED + 1,                  /* plus one poisoned block */
    F_TOPK = 12
};

/* An FP8_V32 cache made with mlart_kv_quantize, its blocks scattered among
 * a poisoned one, decoded sparsely against the dequantized rows. */
static void test_fp8_sparse(mlart_engine *engine) {
    size_t row_bytes = 0, block_bytes = 0, m1 = 0;
    OK(mlart_kv_row_bytes(MLART_KV_FORMAT_FP8_V32, F_DQK, &row_bytes));
    CHECK(row_bytes == 656, "FP8_V32 row bytes = %zu", row_bytes);
    OK(mlart_kv_block_bytes(MLART_KV_FORMAT_FP8_V32, F_DQK, F_BS, &block_bytes));
    CHECK(block_bytes == (size_t)656 * F_BS, "FP8_V32 block bytes = %zu", block_bytes);
    OK(mlart_kv_row_bytes(MLART_KV_FORMAT_FP8_MODEL1, 512, &m1));
    CHECK(m1 == 584, "FP8_MODEL1 row bytes = %zu", m1);
    OK(mlart_kv_block_bytes(MLART_KV_FORMAT_FP8_MODEL1, 512, 64, &m1));
    CHECK(m1 == 37440, "FP8_MODEL1 block bytes (64 tokens) = %zu", m1);
    OK(mlart_kv_block_bytes(MLART_KV_FORMAT_FP8_MODEL1, 512, 1, &m1));
    CHECK(m1 == 1152, "FP8_MODEL1 block bytes (1 token) = %zu", m1);
    OK(mlart_kv_row_bytes(MLART_KV_FORMAT_F32, 64, &m1));
    CHECK(m1 == 256, "F32 row bytes = %zu", m1);
    EXPECT_ERROR(mlart_kv_row_bytes(MLART_KV_FORMAT_FP8_V32, 512, &m1),
                 MLART_STATUS_INVALID_ARGUMENT, "d_qk");
    EXPECT_ERROR(mlart_kv_block_bytes(MLART_KV_FORMAT_FP8_MODEL1, 576, 64, &m1),
                 MLART_STATUS_INVALID_ARGUMENT, "d_qk");
    EXPECT_ERROR(mlart_kv_row_bytes(MLART_KV_FORMAT_FP8_V32, F_DQK, NULL),
                 MLART_STATUS_NULL_POINTER, "out");

    /* Rows whose 4 latent tiles have different amplitudes (tile scales). */
    static const float amps[4] = {0.01f, 0.5f, 1.0f, 3.0f};
    float *src = (float *)xmalloc(sizeof(float) * F_TOK * F_DQK);
    fill_random(src, (size_t)F_TOK * F_DQK);
    for (int t = 0; t < F_TOK; ++t) {
        for (int c = 0; c < 512; ++c) {
            src[(size_t)t * F_DQK + c] *= amps[(t + c / 128) % 4];
        }
    }
    uint8_t *blocks = (uint8_t *)xmalloc(block_bytes * F_USED);
    memset(blocks, 0xA5, block_bytes * F_USED); /* slots past F_TOK stay garbage */
    float *deq = (float *)xmalloc(sizeof(float) * F_TOK * F_DQK);
    if (!OK(mlart_kv_quantize(MLART_KV_FORMAT_FP8_V32, F_DQK, F_BS, F_TOK, MLART_DTYPE_F32, src,
                              blocks)) ||
        !OK(mlart_kv_dequantize(MLART_KV_FORMAT_FP8_V32, F_DQK, F_BS, F_TOK, blocks,
                                MLART_DTYPE_F32, deq))) {
        free(src);
        free(blocks);
        free(deq);
        return;
    }
    /* e4m3 keeps 3 mantissa bits: within 2^-4 of each tile's largest value;
     * the rope is bf16. */
    double worst = 0.0;
    for (int t = 0; t < F_TOK; ++t) {
        for (int c = 0; c < F_DQK; ++c) {
            double bound = c < 512 ? (double)amps[(t + c / 128) % 4] / 16.0
                                   : fabs((double)src[(size_t)t * F_DQK + c]) / 256.0;
            double e = fabs((double)deq[(size_t)t * F_DQK + c] - src[(size_t)t * F_DQK + c]);
            if (e / (bound + 1e-30) > worst) {
                worst = e / (bound + 1e-30);
            }
        }
    }
    CHECK(worst <= 1.0, "dequantized rows are off by %g of the e4m3/bf16 quantum", worst);

    /* Scatter the blocks: logical block j lives in slot perm[j]; slot 1 holds
     * 0xFF bytes (NaN codes, NaN scales) and is never referenced. */
    static const int perm[F_USED] = {2, 0, 3};
    uint8_t *kv = (uint8_t *)xmalloc(block_bytes * F_NB);
    memset(kv, 0xFF, block_bytes * F_NB);
    for (int j = 0; j < F_USED; ++j) {
        memcpy(kv + block_bytes * (size_t)perm[j], blocks + block_bytes * (size_t)j, block_bytes);
    }

    /* Logical token lists with -1 entries and duplicates; query (0, 1) sees
     * no key at all. */
    int32_t logical[F_B * F_SQ * F_TOPK], physical[F_B * F_SQ * F_TOPK];
    for (int g = 0; g < F_B * F_SQ; ++g) {
        for (int k = 0; k < F_TOPK; ++k) {
            int32_t *e = &logical[g * F_TOPK + k];
            int r = rnd_below(6);
            if (g == 1 || r == 0) {
                *e = -1;
            } else if (r == 1 && k > 0) {
                *e = logical[g * F_TOPK + rnd_below(k)];
            } else {
                *e = rnd_below(F_TOK);
            }
        }
    }
    logical[2 * F_TOPK + 0] = F_TOK - 1; /* the last token, twice */
    logical[2 * F_TOPK + 1] = F_TOK - 1;
    logical[3 * F_TOPK + 4] = 0;
    for (int i = 0; i < F_B * F_SQ * F_TOPK; ++i) {
        int32_t t = logical[i];
        physical[i] = t < 0 ? -1 : perm[t / F_BS] * F_BS + t % F_BS;
    }

    enum {
        Q_N = F_B * F_SQ * F_H * F_DQK,
        OUT_N = F_B * F_SQ * F_H * F_DV,
        LSE_N = F_B * F_H * F_SQ
    };
    float *q = (float *)xmalloc(sizeof(float) * Q_N);
    float *out = (float *)xmalloc(sizeof(float) * OUT_N);
    double *ref_out = (double *)xmalloc(sizeof(double) * OUT_N);
    float lse[LSE_N];
    double ref_lse[LSE_N];
    fill_random(q, Q_N);

    mlart_decode_args a;
    mlart_decode_args_init(&a);
    a.batch = F_B;
    a.s_q = F_SQ;
    a.h_q = F_H;
    a.d_qk = F_DQK;
    a.d_v = F_DV;
    a.q_dtype = MLART_DTYPE_F32;
    a.q = q;
    a.kv_format = MLART_KV_FORMAT_FP8_V32;
    a.kv = kv;
    a.num_blocks = F_NB;
    a.block_size = F_BS;
    a.indices = physical;
    a.topk = F_TOPK;
    a.out_dtype = MLART_DTYPE_F32;
    a.out = out;
    a.lse = lse;

    /* Case 0: plain. Case 1: topk_length (sequence 1 uses 5 entries, the rest
     * hold out-of-range garbage) and a finite, a +inf and a -inf sink. */
    const int32_t lengths[F_B] = {F_TOPK, 5};
    const float sink[F_H] = {0.5f, INFINITY, -INFINITY};
    for (int variant = 0; variant < 2; ++variant) {
        if (variant == 1) {
            for (int i = 0; i < F_SQ; ++i) {
                for (int k = lengths[1]; k < F_TOPK; ++k) {
                    physical[(F_SQ + i) * F_TOPK + k] = 1 << 30;
                }
            }
            a.topk_length = lengths;
            a.attn_sink = sink;
        }
        double scale = 1.0 / sqrt((double)F_DQK);
        for (int b = 0; b < F_B; ++b) {
            for (int i = 0; i < F_SQ; ++i) {
                int g = b * F_SQ + i;
                reference_list(q + (size_t)g * F_H * F_DQK, deq, logical + g * F_TOPK,
                               variant == 1 ? lengths[b] : F_TOPK, F_H, F_DQK, F_DV, scale,
                               variant == 1 ? sink : NULL, ref_out + (size_t)g * F_H * F_DV,
                               ref_lse + b * F_H * F_SQ + i, F_SQ);
            }
        }
        fill_nan(out, OUT_N);
        fill_nan(lse, LSE_N);
        if (OK(mlart_decode_paged(engine, &a))) {
            double e_out = max_rel_error(out, ref_out, OUT_N);
            double e_lse = max_rel_error(lse, ref_lse, LSE_N);
            printf("fp8_v32 sparse variant %d: max rel out err %.3g, max rel lse err %.3g\n",
                   variant, e_out, e_lse);
            CHECK(e_out <= 1e-5, "fp8 sparse variant %d: out error %g", variant, e_out);
            CHECK(e_lse <= 1e-5, "fp8 sparse variant %d: lse error %g", variant, e_lse);
            /* Query (0, 1) sees no key: out = 0, lse = +inf. */
            int zero = 1;
            for (int h = 0; h < F_H; ++h) {
                for (int c = 0; c < F_DV; ++c) {
                    zero &= out[((size_t)1 * F_H + h) * F_DV + c] == 0.0f;
                }
                CHECK(isinf(lse[h * F_SQ + 1]) && lse[h * F_SQ + 1] > 0,
                      "no key: lse[0][%d][1] = %g", h, (double)lse[h * F_SQ + 1]);
            }
            CHECK(zero, "a query with no key has out != 0");
            if (variant == 1) {
                /* The +inf sink (head 1) zeroes every output of that head. */
                for (int g = 0; g < F_B * F_SQ; ++g) {
                    for (int c = 0; c < F_DV; ++c) {
                        zero &= out[((size_t)g * F_H + 1) * F_DV + c] == 0.0f;
                    }
                }
                CHECK(zero, "a +inf sink left out != 0");
            }
        }
    }

    /* Errors: nothing is written. */
    fill_nan(out, OUT_N);
    fill_nan(lse, LSE_N);
    mlart_decode_args bad = a;
    bad.causal = true;
    EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "causal");
    bad = a;
    bad.topk = 0;
    EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "topk = 0");
    const int32_t long_lengths[F_B] = {F_TOPK + 1, 0};
    bad = a;
    bad.topk_length = long_lengths;
    EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT,
                 "topk_length[0] = 13");
    int32_t saved = physical[3];
    physical[3] = F_NB * F_BS; /* one past the cache */
    EXPECT_ERROR(mlart_decode_paged(engine, &a), MLART_STATUS_INVALID_ARGUMENT,
                 "indices[0][0][3] = 64");
    physical[3] = -2;
    EXPECT_ERROR(mlart_decode_paged(engine, &a), MLART_STATUS_INVALID_ARGUMENT,
                 "indices[0][0][3] = -2");
    physical[3] = saved;
    bad = a;
    bad.d_qk = 512; /* FP8_V32 rows are 576 wide */
    EXPECT_ERROR(mlart_decode_paged(engine, &bad), MLART_STATUS_INVALID_ARGUMENT, "d_qk");
    CHECK(all_nan(out, OUT_N) && all_nan(lse, LSE_N), "a failed fp8 decode wrote out or lse");

    free(src);
    free(blocks);
    free(deq);
    free(kv);
    free(q);
    free(out);
    free(ref_out);
}

/* ------------------------------------------------------------ KV pool */

enum { POOL_BLOCKS = 8, POOL_LAYERS = 2, MAX_TOK = 96 };

/* What the test believes a pool sequence holds. */
typedef struct {
    uint64_t id;
    int len[POOL_LAYERS];
    float rows[POOL_LAYERS][MAX_TOK * D_QK];
} seq_mirror;

/* Appends n fresh random rows to `layer` of `m`; returns the library's answer
 * (the mirror grows only on success). */
static mlart_error *append_rows(mlart_kv_pool *pool, seq_mirror *m, int layer, int n) {
    if (m->len[layer] + n > MAX_TOK) {
        fprintf(stderr, "test bug: mirror of seq %llu full\n", (unsigned long long)m->id);
        exit(2);
    }
    float *dst = m->rows[layer] + (size_t)m->len[layer] * D_QK;
    fill_random(dst, (size_t)n * D_QK);
    mlart_error *err = mlart_kv_append(pool, m->id, layer, n, MLART_DTYPE_F32, dst);
    if (err == NULL) {
        m->len[layer] += n;
    }
    return err;
}

static void check_lengths(const mlart_kv_pool *pool, const seq_mirror *m) {
    for (int l = 0; l < POOL_LAYERS; ++l) {
        int64_t len = -1;
        if (OK(mlart_kv_seq_length(pool, m->id, l, &len))) {
            CHECK(len == m->len[l], "seq %llu layer %d: length %lld, expected %d",
                  (unsigned long long)m->id, l, (long long)len, m->len[l]);
        }
    }
}

static void check_stats(const mlart_kv_pool *pool, int64_t used, int64_t sequences) {
    mlart_kv_pool_stats st;
    mlart_kv_pool_stats_init(&st);
    if (!OK(mlart_kv_pool_stats_get(pool, &st))) {
        return;
    }
    int64_t per_block = (int64_t)BS * D_QK * (int64_t)sizeof(float) * POOL_LAYERS;
    CHECK(st.blocks_total == POOL_BLOCKS && st.blocks_used == used &&
              st.blocks_free == POOL_BLOCKS - used && st.sequences == sequences &&
              st.bytes_per_block == per_block && st.bytes_total == per_block * POOL_BLOCKS,
          "stats: total %lld used %lld free %lld seqs %lld bytes/block %lld total %lld; "
          "expected used %lld seqs %lld",
          (long long)st.blocks_total, (long long)st.blocks_used, (long long)st.blocks_free,
          (long long)st.sequences, (long long)st.bytes_per_block, (long long)st.bytes_total,
          (long long)used, (long long)sequences);
}

/* Decodes `layer` for `batch` sequences from the pool and checks it. */
static void check_pool_decode(mlart_kv_pool *pool, int layer, seq_mirror *const *seqs, int batch,
                              bool causal, const char *what) {
    size_t per_q = (size_t)S_Q * H_Q * D_QK, per_o = (size_t)S_Q * H_Q * D_V,
           per_l = (size_t)H_Q * S_Q;
    uint64_t *ids = (uint64_t *)xmalloc(sizeof(uint64_t) * (size_t)batch);
    float *q = (float *)xmalloc(sizeof(float) * per_q * (size_t)batch);
    float *out = (float *)xmalloc(sizeof(float) * per_o * (size_t)batch);
    float *lse = (float *)xmalloc(sizeof(float) * per_l * (size_t)batch);
    double *ref_out = (double *)xmalloc(sizeof(double) * per_o * (size_t)batch);
    double *ref_lse = (double *)xmalloc(sizeof(double) * per_l * (size_t)batch);
    for (int b = 0; b < batch; ++b) {
        ids[b] = seqs[b]->id;
    }
    fill_random(q, per_q * (size_t)batch);
    fill_nan(out, per_o * (size_t)batch);
    fill_nan(lse, per_l * (size_t)batch);

    mlart_kv_pool_decode_args a;
    mlart_kv_pool_decode_args_init(&a);
    CHECK(a.struct_size == sizeof a && a.s_q == 1 && a.layer == 0, "pool decode args defaults");
    a.layer = layer;
    a.batch = batch;
    a.seq_ids = ids;
    a.s_q = S_Q;
    a.h_q = H_Q;
    a.d_v = D_V;
    a.causal = causal;
    a.q_dtype = MLART_DTYPE_F32;
    a.q = q;
    a.out_dtype = MLART_DTYPE_F32;
    a.out = out;
    a.lse = lse;
    if (OK(mlart_kv_pool_decode(pool, &a))) {
        for (int b = 0; b < batch; ++b) {
            reference(q + per_q * b, seqs[b]->rows[layer], seqs[b]->len[layer], S_Q, H_Q, D_QK,
                      D_V, 1.0 / sqrt((double)D_QK), causal, ref_out + per_o * b,
                      ref_lse + per_l * b);
        }
        double e_out = max_error(out, ref_out, per_o * (size_t)batch);
        double e_lse = max_error(lse, ref_lse, per_l * (size_t)batch);
        printf("pool decode (%s): max |out err| %.3g, max |lse err| %.3g\n", what, e_out, e_lse);
        CHECK(e_out < 1e-5 && e_lse < 1e-5, "pool decode (%s): out err %g, lse err %g", what,
              e_out, e_lse);
    }
    free(ids);
    free(q);
    free(out);
    free(lse);
    free(ref_out);
    free(ref_lse);
}

static void test_pool(mlart_engine *engine) {
    mlart_kv_pool_options opts;
    mlart_kv_pool_options_init(&opts);
    CHECK(opts.struct_size == sizeof opts && opts.kv_format == MLART_KV_FORMAT_BF16 &&
              opts.d_qk == 576 && opts.num_layers == 1 && opts.block_size == 64 &&
              opts.num_blocks == 0,
          "mlart_kv_pool_options_init defaults");
    mlart_kv_pool *pool = NULL;
    EXPECT_ERROR(mlart_kv_pool_create(engine, &opts, &pool), MLART_STATUS_INVALID_ARGUMENT,
                 "num_blocks");
    opts.kv_format = MLART_KV_FORMAT_F32;
    opts.d_qk = D_QK;
    opts.num_layers = POOL_LAYERS;
    opts.block_size = BS;
    opts.num_blocks = POOL_BLOCKS;
    EXPECT_ERROR(mlart_kv_pool_create(NULL, &opts, &pool), MLART_STATUS_NULL_POINTER, "engine");
    mlart_kv_pool_options bad = opts;
    bad.struct_size = 0;
    EXPECT_ERROR(mlart_kv_pool_create(engine, &bad, &pool), MLART_STATUS_INVALID_ARGUMENT,
                 "struct_size");
    CHECK(pool == NULL, "a failed pool create wrote *out");
    if (!OK(mlart_kv_pool_create(engine, &opts, &pool)) || pool == NULL) {
        return;
    }
    /* The pool keeps the engine alive; the caller's engine is freed later. */

    seq_mirror *a = (seq_mirror *)calloc(1, sizeof(seq_mirror));
    seq_mirror *f = (seq_mirror *)calloc(1, sizeof(seq_mirror));
    seq_mirror *x = (seq_mirror *)calloc(1, sizeof(seq_mirror));
    if (a == NULL || f == NULL || x == NULL) {
        fprintf(stderr, "out of host memory\n");
        exit(2);
    }
    a->id = 7;
    x->id = 9;

    OK(mlart_kv_seq_create(pool, a->id));
    EXPECT_ERROR(mlart_kv_seq_create(pool, a->id), MLART_STATUS_INVALID_ARGUMENT, "7");
    OK(append_rows(pool, a, 0, 13));
    OK(append_rows(pool, a, 0, 7)); /* 20 tokens: one full block + 4 */
    OK(append_rows(pool, a, 1, 9));
    OK(append_rows(pool, a, 1, 0));
    check_lengths(pool, a);
    check_stats(pool, 2, 1);

    /* Fork: shares both blocks; appends to either side stay private. */
    EXPECT_ERROR(mlart_kv_seq_fork(pool, 1234, 8), MLART_STATUS_NOT_FOUND, "1234");
    OK(mlart_kv_seq_fork(pool, a->id, 8));
    EXPECT_ERROR(mlart_kv_seq_fork(pool, a->id, 8), MLART_STATUS_INVALID_ARGUMENT, "8");
    *f = *a;
    f->id = 8;
    check_stats(pool, 2, 2);
    OK(append_rows(pool, f, 0, 5)); /* copies the shared partial block */
    OK(append_rows(pool, a, 0, 3));
    check_lengths(pool, a);
    check_lengths(pool, f);
    check_stats(pool, 3, 2);

    seq_mirror *batch1[3] = {a, f, a};
    check_pool_decode(pool, 0, batch1, 3, true, "layer 0, seq/fork/seq, causal");
    seq_mirror *batch2[2] = {f, a};
    check_pool_decode(pool, 1, batch2, 2, false, "layer 1, fork/seq");

    /* Exhaustion: 5 free blocks hold 80 tokens. */
    OK(mlart_kv_seq_create(pool, x->id));
    seq_mirror *batch_empty[2] = {x, a}; /* an empty sequence: out = 0, lse = +inf */
    check_pool_decode(pool, 0, batch_empty, 2, true, "empty sequence + seq");
    EXPECT_ERROR(append_rows(pool, x, 0, 5 * BS + 1), MLART_STATUS_POOL_EXHAUSTED, NULL);
    check_lengths(pool, x);
    check_stats(pool, 3, 3);
    OK(append_rows(pool, x, 0, 5 * BS));
    check_stats(pool, POOL_BLOCKS, 3);
    EXPECT_ERROR(append_rows(pool, x, 0, 1), MLART_STATUS_POOL_EXHAUSTED, NULL);
    /* A block covers its tokens in every layer: layer 1 needs no new block. */
    OK(append_rows(pool, x, 1, 1));
    check_stats(pool, POOL_BLOCKS, 3);
    /* Neither has a shared block left in its tail: these need no new block. */
    OK(append_rows(pool, f, 0, 1));
    OK(append_rows(pool, a, 0, 1));
    check_lengths(pool, a);
    check_lengths(pool, f);
    check_lengths(pool, x);
    seq_mirror *batch3[3] = {x, f, a};
    check_pool_decode(pool, 0, batch3, 3, false, "layer 0 on a full pool");

    OK(mlart_kv_seq_free(pool, x->id));
    EXPECT_ERROR(mlart_kv_seq_free(pool, x->id), MLART_STATUS_NOT_FOUND, "9");
    int64_t len = 0;
    EXPECT_ERROR(mlart_kv_seq_length(pool, x->id, 0, &len), MLART_STATUS_NOT_FOUND, "9");
    EXPECT_ERROR(mlart_kv_seq_length(pool, a->id, POOL_LAYERS, &len),
                 MLART_STATUS_INVALID_ARGUMENT, "layer");
    check_stats(pool, 3, 2);

    /* Truncate (rollback) back into the block still shared with the fork,
     * then append: copy-on-write must keep the fork intact. */
    OK(mlart_kv_seq_truncate(pool, a->id, 10));
    a->len[0] = 10;
    a->len[1] = 9;
    check_lengths(pool, a);
    check_stats(pool, 2, 2);
    OK(append_rows(pool, a, 0, 3));
    check_lengths(pool, a);
    check_stats(pool, 3, 2);
    seq_mirror *batch4[2] = {a, f};
    check_pool_decode(pool, 0, batch4, 2, true, "after truncate + copy-on-write");
    check_pool_decode(pool, 1, batch4, 2, true, "layer 1 after truncate");

    /* Pool decode errors. */
    {
        float q[S_Q * H_Q * D_QK] = {0};
        float out[S_Q * H_Q * D_V];
        uint64_t missing = 4242;
        mlart_kv_pool_decode_args d;
        mlart_kv_pool_decode_args_init(&d);
        d.batch = 1;
        d.seq_ids = &missing;
        d.s_q = S_Q;
        d.h_q = H_Q;
        d.d_v = D_V;
        d.q_dtype = MLART_DTYPE_F32;
        d.q = q;
        d.out_dtype = MLART_DTYPE_F32;
        d.out = out;
        EXPECT_ERROR(mlart_kv_pool_decode(pool, &d), MLART_STATUS_NOT_FOUND, "seq_ids[0]");
        EXPECT_ERROR(mlart_kv_pool_decode(NULL, &d), MLART_STATUS_NULL_POINTER, "pool");
        d.seq_ids = &a->id;
        d.layer = POOL_LAYERS;
        EXPECT_ERROR(mlart_kv_pool_decode(pool, &d), MLART_STATUS_INVALID_ARGUMENT, "layer");
        d.layer = 0;
        d.struct_size = 8;
        EXPECT_ERROR(mlart_kv_pool_decode(pool, &d), MLART_STATUS_INVALID_ARGUMENT,
                     "struct_size");
    }
    EXPECT_ERROR(mlart_kv_append(pool, a->id, 0, 1, MLART_DTYPE_F32, NULL),
                 MLART_STATUS_NULL_POINTER, "rows");
    EXPECT_ERROR(mlart_kv_append(pool, a->id, 0, -1, MLART_DTYPE_F32, a->rows[0]),
                 MLART_STATUS_INVALID_ARGUMENT, "n_tokens");
    check_lengths(pool, a);

    mlart_kv_pool_stats st;
    mlart_kv_pool_stats_init(&st);
    st.struct_size = 1;
    EXPECT_ERROR(mlart_kv_pool_stats_get(pool, &st), MLART_STATUS_INVALID_ARGUMENT, "struct_size");

    mlart_kv_pool_free(pool);
    free(a);
    free(f);
    free(x);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    test_versions();
    mlart_engine *engine = create_engine();
    if (engine != NULL) {
        test_paged_f32(engine, false, 0.0f);
        test_paged_f32(engine, true, 0.0f);
        test_paged_f32(engine, true, 0.3f);
        test_fp8_sparse(engine);
        test_pool(engine);
        mlart_engine_free(engine);
    }
    if (g_failures != 0) {
        fprintf(stderr, "test_decode_c: %d of %d checks FAILED\n", g_failures, g_checks);
        return 1;
    }
    printf("test_decode_c: %d checks passed\n", g_checks);
    return 0;
}
