// What bounds the AMX decode kernel on this CPU, on 1..N threads at once
// (argument; each pinned to its CPU, all running the same variant): the tile
// product rate (1) with no loads, (2) with every operand loaded from L1,
// (3) in the scores GEMM of one 256-key tile at h_q = 128 (Sᵀ = K·Qᵀ:
// 256 keys x 576 x 128 rows, 2 x 2 C tiles over all 18 K steps, keys at
// their 1152-byte stride, operands from L2 as in the kernel), and (4) that
// GEMM with softmax-like vector work (exp polynomial, bf16 packing) put
// between its tile products, against the two run one after the other.
// The variants alternate, 40 rounds, the threads meeting at a barrier
// before and after each; best and median reported, GFLOP/s summed over
// the threads.
//
// Build and run: gcc -O2 -march=native -mamx-tile -mamx-bf16 -pthread bench/amx/bounds.c -o target/amx-bounds && target/amx-bounds 2
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
struct tilecfg { uint8_t palette, start_row, rsvd[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed));

enum { NK = 256, D2 = 288, RP = 128, CH = 18, ROUNDS = 40 };  // keys, u32 pairs per key, rows, K steps
// Per thread (each has its own operands, as the kernel's workers do).
static __thread uint32_t *K, *Q, *PA;
static __thread float *S, *X;
static __thread int cur;
static const double FLOP = 2.0 * NK * RP * CH * 32;  // one scores tile

static void noload(void) {  // same op count, operands already in tiles
  for (int b = 0; b < NK / 32 * RP / 32 * CH; b++) {
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
}

// One 16-key x 16-row block of softmax-like work: exp2 by a degree-5
// polynomial and vscalefps, a running sum, packed to bf16 pairs.
static void unit(void) {
  int blk = cur++ & 127;
  float *s = X + (blk >> 3) * 16 * RP + (blk & 7) * 16;
  uint32_t *o = PA + blk * 128;
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < 16; j += 2) {
    __m512 p[2];
    for (int h = 0; h < 2; h++) {
      __m512 t = _mm512_fmsub_ps(_mm512_loadu_ps(s + (j + h) * RP), _mm512_set1_ps(0.1f), _mm512_set1_ps(0.5f));
      __m512 n = _mm512_roundscale_ps(t, 8), f = _mm512_sub_ps(t, n), q = _mm512_set1_ps(1.5e-3f);
      q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(9.6e-3f)); q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(5.5e-2f));
      q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.24f)); q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.69f));
      q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.f));
      p[h] = _mm512_scalef_ps(q, n);
      sum = _mm512_add_ps(sum, p[h]);
    }
    _mm512_storeu_si512(o + j * 8, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
  }
  _mm512_storeu_ps(X + NK * RP + (blk & 7) * 16, sum);
}

// The scores GEMM; l1: every step reads the same two K steps (L1);
// every: a vector unit after every `every` K steps (0: none).
static void scores(int l1, int every) {
  for (int i = 0; i < NK / 16; i += 2)
    for (int j = 0; j < RP / 16; j += 2) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int k = 0; k < CH; k++) {
        int kk = l1 ? (k & 1) : k, ii = l1 ? 0 : i, jj = l1 ? 0 : j;
        const uint32_t *a0 = K + ii * 16 * D2 + kk * 16, *a1 = a0 + 16 * D2;
        const uint32_t *b0 = Q + kk * 16 * RP + jj * 16, *b1 = b0 + 16;
        _tile_loadd(4, a0, D2 * 4); _tile_loadd(6, b0, RP * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b1, RP * 4);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1, D2 * 4);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        if (every && k % every == 0) unit();
      }
      float *c = S + i * 16 * RP + j * 16;
      _tile_stored(0, c, RP * 4); _tile_stored(1, c + 16, RP * 4);
      _tile_stored(2, c + 16 * RP, RP * 4); _tile_stored(3, c + 16 * RP + 16, RP * 4);
    }
}

static int cmpd(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }

enum { V = 6 };
static double t[V][ROUNDS];
static int nthreads = 1;
static pthread_barrier_t bar;

static void *worker(void *arg) {
  int cpu = (int)(intptr_t)arg;
  cpu_set_t set;
  CPU_ZERO(&set); CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  struct tilecfg cfg __attribute__((aligned(64))) = {.palette = 1};
  for (int i = 0; i < 8; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
  _tile_loadconfig(&cfg);
  K = aligned_alloc(64, NK * D2 * 4); Q = aligned_alloc(64, CH * 16 * RP * 4); S = aligned_alloc(64, NK * RP * 4);
  X = aligned_alloc(64, (NK * RP + RP) * 4); PA = aligned_alloc(64, NK * RP * 4);
  for (int i = 0; i < NK * D2; i++) K[i] = 0x3c233c23;
  for (int i = 0; i < CH * 16 * RP; i++) Q[i] = 0x3c233c23;
  for (int i = 0; i < NK * RP + RP; i++) X[i] = 0.3f;
  _tile_loadd(4, K, 64); _tile_loadd(5, K, 64); _tile_loadd(6, Q, 64); _tile_loadd(7, Q, 64);
  for (int r = 0; r < ROUNDS; r++)
    for (int v = 0; v < V; v++) {
      pthread_barrier_wait(&bar);
      double t0 = now();
      switch (v) {
        case 0: noload(); break;
        case 1: scores(1, 0); break;
        case 2: scores(0, 0); break;
        case 3: scores(0, 4); break;
        case 4: for (int u = 0; u < NK / 32 * RP / 32 * CH / 4; u++) unit(); break;
        case 5: scores(0, 0); for (int u = 0; u < NK / 32 * RP / 32 * CH / 4; u++) unit(); break;
      }
      pthread_barrier_wait(&bar);
      if (cpu == 0) t[v][r] = now() - t0;
    }
  _tile_release();
  return NULL;
}

int main(int argc, char **argv) {
  if (argc > 1) nthreads = atoi(argv[1]);
  if (nthreads < 1 || nthreads > 64) { fprintf(stderr, "threads: 1..64, not %s\n", argv[1]); return 1; }
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) { perror("AMX permission"); return 1; }
  const char *name[V] = {"tile products, no loads", "2x2 tiles, operands from L1", "scores tile (256 keys, h_q 128), L2",
                         "  + vector work, 1 unit per 4 K steps", "  vector work alone (144 units)", "  scores then vector work"};
  pthread_barrier_init(&bar, NULL, nthreads);
  pthread_t th[64];
  for (int i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
  for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
  printf("%d thread(s), CPUs 0..%d; a scores tile is %.1f MFLOP per thread; best / median of %d alternating rounds\n",
         nthreads, nthreads - 1, FLOP / 1e6, ROUNDS);
  for (int v = 0; v < V; v++) {
    qsort(t[v], ROUNDS, sizeof(double), cmpd);
    double f = FLOP * nthreads / 1e9;
    if (v == 4)
      printf("%-40s %7.1f / %7.1f us\n", name[v], t[v][0] * 1e6, t[v][ROUNDS / 2] * 1e6);
    else
      printf("%-40s %7.1f / %7.1f us  %6.0f / %6.0f GFLOP/s (scores' FLOPs, all threads)\n", name[v], t[v][0] * 1e6,
             t[v][ROUNDS / 2] * 1e6, f / t[v][0], f / t[v][ROUNDS / 2]);
  }
  return 0;
}
