// MLA decode through llama.cpp's CPU flash attention (ggml_flash_attn_ext), the
// way llama.cpp runs DeepSeek with the absorbed (MLA) cache: one 576-wide f16 KV
// head whose first 512 columns are V (a view of K), f32 queries, f32
// accumulation, one KV stream per sequence (q [576, 1, h_q, batch], k [576, N,
// 1, batch]), no mask.
//
// One peer for bench/peers/run.sh. Usage:
//   ggml_mla --threads T --seconds S --points h_q:N:batch,...
// Before timing, a small case is checked against a float64 evaluation on the
// same f16-rounded cache; a mismatch exits non-zero. Each point prints one JSON
// line: median time and GFLOP/s counted as mlart counts them,
// 2 * N * h_q * (576 + 512) per sequence.

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

enum { D_QK = 576, D_V = 512 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t rng_state = 0x2026120100000001ull;
static float gauss(void) {  // Box-Muller on xorshift64*
    double u[2];
    for (int i = 0; i < 2; i++) {
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        u[i] = ((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
    }
    return (float)(sqrt(-2.0 * log(u[0] + 1e-300)) * cos(6.283185307179586 * u[1]));
}

struct mla {
    struct ggml_context *ctx;
    struct ggml_cgraph *graph;
    struct ggml_tensor *q, *k, *out;
    struct ggml_cplan plan;  // planned once: its work buffer is reused by every call
};

static int build(struct mla *m, int h, int n, int b, int threads) {
    size_t bytes = (size_t)D_QK * h * b * 4 + (size_t)D_QK * n * b * 2 +
                   (size_t)D_V * h * b * 4 + ggml_graph_overhead() + (1u << 20);
    struct ggml_init_params p = {bytes, NULL, false};
    m->ctx = ggml_init(p);
    if (!m->ctx) return -1;
    m->q = ggml_new_tensor_4d(m->ctx, GGML_TYPE_F32, D_QK, 1, h, b);
    m->k = ggml_new_tensor_4d(m->ctx, GGML_TYPE_F16, D_QK, n, 1, b);
    struct ggml_tensor *v =
        ggml_view_4d(m->ctx, m->k, D_V, n, 1, b, m->k->nb[1], m->k->nb[2], m->k->nb[3], 0);
    m->out = ggml_flash_attn_ext(m->ctx, m->q, m->k, v, NULL, 1.0f / sqrtf(192.0f), 0.0f, 0.0f);
    ggml_prec_set_acc(m->out, GGML_PREC_F32);
    m->graph = ggml_new_graph(m->ctx);
    ggml_build_forward_expand(m->graph, m->out);
    m->plan = ggml_graph_plan(m->graph, threads, NULL);
    m->plan.work_data = malloc(m->plan.work_size ? m->plan.work_size : 1);
    if (!m->plan.work_data) return -1;
    float *q = (float *)m->q->data;
    for (size_t i = 0; i < (size_t)D_QK * h * b; i++) q[i] = gauss();
    ggml_fp16_t *k = (ggml_fp16_t *)m->k->data;
    for (size_t i = 0; i < (size_t)D_QK * n * b; i++) k[i] = ggml_fp32_to_fp16(gauss());
    return 0;
}

static int compute(struct mla *m) {
    return ggml_graph_compute(m->graph, &m->plan) == GGML_STATUS_SUCCESS ? 0 : -1;
}

static void release(struct mla *m) {
    free(m->plan.work_data);
    ggml_free(m->ctx);
}

// out[b][head][512] against a float64 evaluation on the same inputs.
static double check(int threads) {
    const int h = 16, n = 700, b = 2;
    struct mla m;
    if (build(&m, h, n, b, threads) || compute(&m)) return INFINITY;
    const float *q = (const float *)m.q->data, *o = (const float *)m.out->data;
    const ggml_fp16_t *k = (const ggml_fp16_t *)m.k->data;
    double num = 0, den = 0, *s = malloc(sizeof(double) * n), acc[D_V];
    if (!s) return INFINITY;
    for (int bi = 0; bi < b; bi++) {
        for (int hi = 0; hi < h; hi++) {
            const float *qr = q + ((size_t)bi * h + hi) * D_QK;
            double mx = -INFINITY, sum = 0;
            for (int t = 0; t < n; t++) {
                const ggml_fp16_t *kr = k + ((size_t)bi * n + t) * D_QK;
                double d = 0;
                for (int c = 0; c < D_QK; c++) d += (double)qr[c] * ggml_fp16_to_fp32(kr[c]);
                s[t] = d / sqrt(192.0);
                if (s[t] > mx) mx = s[t];
            }
            memset(acc, 0, sizeof acc);
            for (int t = 0; t < n; t++) {
                double p = exp(s[t] - mx);
                sum += p;
                const ggml_fp16_t *kr = k + ((size_t)bi * n + t) * D_QK;
                for (int c = 0; c < D_V; c++) acc[c] += p * ggml_fp16_to_fp32(kr[c]);
            }
            const float *orow = o + ((size_t)bi * h + hi) * D_V;
            for (int c = 0; c < D_V; c++) {
                double want = acc[c] / sum, d = orow[c] - want;
                num += d * d;
                den += want * want;
            }
        }
    }
    free(s);
    release(&m);
    return sqrt(num / den);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int threads = 2;
    double seconds = 2.0;
    const char *points = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--points")) points = argv[i + 1];
        else { fprintf(stderr, "ggml_mla: unknown option %s\n", argv[i]); return 2; }
    }
    if (!points || threads < 1) {
        fprintf(stderr, "usage: ggml_mla --threads T --seconds S --points h_q:N:batch,...\n");
        return 2;
    }
    double err = check(threads);
    // ggml's decode path rounds Q to f16 and accumulates P.V in an f16 vector
    // (ops.cpp, flash_attn_ext_f16_one_chunk): ~3e-3 is that rounding; a wrong
    // computation reads ~1.
    if (!(err < 2e-2)) {
        fprintf(stderr, "ggml_mla: check failed, rel-L2 %.3e\n", err);
        return 1;
    }
    char *list = strdup(points);
    if (!list) { fprintf(stderr, "ggml_mla: out of memory\n"); return 1; }
    for (char *spec = strtok(list, ","); spec; spec = strtok(NULL, ",")) {
        int h, n, b;
        if (sscanf(spec, "%d:%d:%d", &h, &n, &b) != 3 || h < 1 || n < 1 || b < 1) {
            fprintf(stderr, "ggml_mla: bad point %s\n", spec);
            return 2;
        }
        struct mla m;
        if (build(&m, h, n, b, threads)) { fprintf(stderr, "ggml_mla: out of memory at %s\n", spec); return 1; }
        if (compute(&m)) return 1;  // warm-up
        size_t cap = 4096, calls = 0;
        double *t = malloc(sizeof(double) * cap), end = now() + seconds;
        if (!t) { fprintf(stderr, "ggml_mla: out of memory at %s\n", spec); return 1; }
        while (calls < 3 || (now() < end && calls < cap)) {
            double t0 = now();
            if (compute(&m)) return 1;
            t[calls++] = now() - t0;
        }
        qsort(t, calls, sizeof(double), cmp);
        double med = t[calls / 2], flops = 2.0 * b * n * (double)h * (D_QK + D_V);
        printf("{\"peer\": \"llama.cpp\", \"kv\": \"f16\", \"h_q\": %d, \"s_q\": 1, \"n\": %d, "
               "\"batch\": %d, \"calls\": %zu, \"median_ms\": %.4f, \"gflops\": %.3f, "
               "\"threads\": %d, \"check_rel_l2\": %.3e}\n",
               h, n, b, calls, med * 1e3, flops / med / 1e9, threads, err);
        fflush(stdout);
        free(t);
        release(&m);
    }
    free(list);
    return 0;
}
