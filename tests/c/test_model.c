/*
 * C11 consumer of the mlart model API: loads a small random-weight DeepSeek
 * checkpoint (written by tests/ctest.rs with mlart::model::gen, its directory
 * passed as argv[1]), sizes a KV pool from mlart_model_info, runs the MLA
 * attention block for a 3-token prefill and a decode step of one sequence,
 * and checks a few errors.
 *
 * Linked twice by CMakeLists.txt (libmlart.so and libmlart.a). Exits non-zero
 * if any check fails, after printing every failed check.
 */
#include "mlart.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* Load progress: counts calls and keeps the last fraction. */
typedef struct progress_state {
    int calls;
    float last;
    int increasing;
} progress_state;

static bool on_progress(float fraction, const char *stage, void *user_data) {
    progress_state *p = (progress_state *)user_data;
    if (p->calls > 0 && !(fraction > p->last)) {
        p->increasing = 0;
    }
    if (stage == NULL || stage[0] == '\0') {
        p->increasing = 0;
    }
    p->calls++;
    p->last = fraction;
    return true;
}

static int64_t seq_length(mlart_kv_pool *pool, uint64_t seq, int32_t layer) {
    int64_t n = -1;
    OK(mlart_kv_seq_length(pool, seq, layer, &n));
    return n;
}

/* Runs one forward of `n` tokens of sequence `seq`; returns the error. */
static mlart_error *forward(mlart_model *model, mlart_kv_pool *pool, int32_t layer, uint64_t seq,
                            int32_t n, const float *x, float *out) {
    mlart_forward_args a;
    mlart_forward_args_init(&a);
    a.layer = layer;
    a.batch = 1;
    a.seq_ids = &seq;
    a.n_tokens = &n;
    a.x_dtype = MLART_DTYPE_F32;
    a.x = x;
    a.out_dtype = MLART_DTYPE_F32;
    a.out = out;
    return mlart_model_forward(model, pool, &a);
}

static int all_finite_nonzero(const float *v, size_t n) {
    int nonzero = 0;
    for (size_t i = 0; i < n; ++i) {
        if (!isfinite(v[i])) {
            return 0;
        }
        nonzero |= v[i] != 0.0f;
    }
    return nonzero;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <checkpoint dir>\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];

    mlart_engine_options eo;
    mlart_engine_options_init(&eo);
    eo.backend = MLART_BACKEND_CPU;
    eo.num_threads = 2;
    mlart_engine *engine = NULL;
    if (!OK(mlart_engine_create(&eo, &engine))) {
        return 1;
    }

    /* Load with a progress callback. */
    progress_state prog = {0, 0.0f, 1};
    mlart_model_options mo;
    mlart_model_options_init(&mo);
    mo.progress = on_progress;
    mo.progress_user_data = &prog;
    mlart_model *model = NULL;
    if (!OK(mlart_model_load(engine, dir, &mo, &model))) {
        mlart_engine_free(engine);
        return 1;
    }
    CHECK(model != NULL, "model handle");
    CHECK(prog.calls > 0 && prog.increasing && prog.last == 1.0f,
          "progress: %d calls, last %g, increasing %d", prog.calls, (double)prog.last,
          prog.increasing);

    mlart_model_props p;
    mlart_model_props_init(&p);
    OK(mlart_model_info(model, &p));
    CHECK(p.hidden_size > 0 && p.num_heads > 0, "hidden %d heads %d", p.hidden_size,
          p.num_heads);
    CHECK(p.d_qk == p.kv_lora_rank + p.qk_rope_head_dim, "d_qk %d", p.d_qk);
    CHECK(p.loaded_layers == p.num_layers && p.first_layer == 0, "layers %d of %d from %d",
          p.loaded_layers, p.num_layers, p.first_layer);
    CHECK(p.softmax_scale > 0.0 && p.bytes_loaded > 0, "scale %g bytes %llu", p.softmax_scale,
          (unsigned long long)p.bytes_loaded);
    /* options.kept_keys_bytes = 0 (from _init): the 1 GiB default. */
    CHECK(mo.kept_keys_bytes == 0 && p.kept_keys_bytes == (uint64_t)1 << 30,
          "kept_keys_bytes %llu", (unsigned long long)p.kept_keys_bytes);

    /* A pool sized from the model. */
    mlart_kv_pool_options po;
    mlart_kv_pool_options_init(&po);
    po.kv_format = MLART_KV_FORMAT_F32;
    po.d_qk = p.d_qk;
    po.num_layers = p.loaded_layers;
    po.block_size = 16;
    po.num_blocks = 8;
    mlart_kv_pool *pool = NULL;
    OK(mlart_kv_pool_create(engine, &po, &pool));
    const uint64_t seq = 42;
    OK(mlart_kv_seq_create(pool, seq));

    size_t hid = (size_t)p.hidden_size;
    float *x = (float *)malloc(4 * hid * sizeof(float));
    float *out = (float *)malloc(4 * hid * sizeof(float));
    if (x == NULL || out == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < 4 * hid; ++i) {
        x[i] = (float)sin(0.37 * (double)i + 0.1);
        out[i] = NAN;
    }

    /* A 3-token prefill, then a decode step. */
    int32_t layer = p.first_layer;
    OK(forward(model, pool, layer, seq, 3, x, out));
    CHECK(all_finite_nonzero(out, 3 * hid), "prefill output");
    CHECK(seq_length(pool, seq, 0) == 3, "length after prefill");
    OK(forward(model, pool, layer, seq, 1, x + 3 * hid, out + 3 * hid));
    CHECK(all_finite_nonzero(out + 3 * hid, hid), "decode output");
    CHECK(seq_length(pool, seq, 0) == 4, "length after decode");

    /* A caller built against the 0.1 header passes the options struct as it
     * was before `activations` was appended: exactly that many bytes, on the
     * heap so that a sanitizer sees any read past them. It loads, with the
     * default (precise) activations: the same prefill gives the same output. */
    {
        typedef struct options_v01 {
            uint32_t struct_size;
            int32_t first_layer;
            int32_t num_layers;
            bool convert_weights;
            mlart_dtype weight_dtype;
            mlart_progress_fn progress;
            void *progress_user_data;
        } options_v01;
        CHECK(sizeof(options_v01) == offsetof(mlart_model_options, activations),
              "0.1 layout is %zu bytes, activations at %zu", sizeof(options_v01),
              offsetof(mlart_model_options, activations));
        options_v01 *old = (options_v01 *)calloc(1, sizeof(options_v01));
        float *out_old = (float *)malloc(3 * hid * sizeof(float));
        mlart_model *model_old = NULL;
        if (old == NULL || out_old == NULL) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        old->struct_size = (uint32_t)sizeof(options_v01);
        old->weight_dtype = MLART_DTYPE_BF16;
        if (OK(mlart_model_load(engine, dir, (const mlart_model_options *)old, &model_old))) {
            OK(mlart_kv_seq_create(pool, 43));
            OK(forward(model_old, pool, layer, 43, 3, x, out_old));
            double diff = 0.0;
            for (size_t i = 0; i < 3 * hid; ++i) {
                diff = fmax(diff, fabs((double)out_old[i] - (double)out[i]));
            }
            CHECK(diff < 1e-5, "0.1-layout options: output differs by %g", diff);
            OK(mlart_kv_seq_free(pool, 43));
        }
        mlart_model_free(model_old);
        free(out_old);
        free(old);
    }

    /* Errors: a sequence not in the pool, a layer not loaded, a missing
     * checkpoint directory. Nothing changes. */
    EXPECT_ERROR(forward(model, pool, layer, 7, 1, x, out), MLART_STATUS_NOT_FOUND, "7");
    EXPECT_ERROR(forward(model, pool, p.num_layers, seq, 1, x, out),
                 MLART_STATUS_INVALID_ARGUMENT, "layer");
    /* Device memory needs a CUDA engine (and the model's projections on its
     * GPU); this one is a CPU engine. */
    {
        int32_t one = 1;
        mlart_forward_args a;
        mlart_forward_args_init(&a);
        CHECK(a.memory == MLART_MEMORY_HOST && a.stream == NULL, "forward args defaults");
        a.layer = layer;
        a.batch = 1;
        a.seq_ids = &seq;
        a.n_tokens = &one;
        a.x = x;
        a.out = out;
        a.memory = MLART_MEMORY_DEVICE;
        EXPECT_ERROR(mlart_model_forward(model, pool, &a), MLART_STATUS_UNSUPPORTED,
                     "MLART_MEMORY_DEVICE");
        mlart_model_props q;
        mlart_model_props_init(&q);
        OK(mlart_model_info(model, &q));
        CHECK(q.projections_on_gpu == 0, "projections_on_gpu = %d on a CPU engine",
              (int)q.projections_on_gpu);
    }
    CHECK(seq_length(pool, seq, 0) == 4, "length after failed forwards");
    mlart_model *none = NULL;
    EXPECT_ERROR(mlart_model_load(engine, "/nonexistent/mlart-model", NULL, &none),
                 MLART_STATUS_IO, "config.json");
    CHECK(none == NULL, "out untouched by a failed load");
    /* A budget below one block's rows: the model keeps no keys, and says so. */
    {
        mlart_model_options ko;
        mlart_model_options_init(&ko);
        ko.kept_keys_bytes = 1;
        mlart_model *kept = NULL;
        if (OK(mlart_model_load(engine, dir, &ko, &kept))) {
            mlart_model_props kp;
            mlart_model_props_init(&kp);
            OK(mlart_model_info(kept, &kp));
            CHECK(kp.kept_keys_bytes == 1, "kept_keys_bytes %llu",
                  (unsigned long long)kp.kept_keys_bytes);
            mlart_model_free(kept);
        }
    }

    free(x);
    free(out);
    mlart_kv_pool_free(pool);
    mlart_model_free(model);
    mlart_engine_free(engine);

    if (g_failures != 0) {
        fprintf(stderr, "test_model_c: %d of %d checks failed\n", g_failures, g_checks);
        return 1;
    }
    printf("test_model_c: %d checks passed\n", g_checks);
    return 0;
}
