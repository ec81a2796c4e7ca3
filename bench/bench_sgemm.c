/* bench_sgemm.c - sgemm speed, two tables.
 *
 * 1. GFLOP/s (best of runs) of the scalar reference, the AVX2 and AVX-512
 *    paths on one thread, and sg_gemm over a pool of every core, on square
 *    sizes and the shapes of one token (1x768x768) and a short batch
 *    (32x768x3072) through a Linear layer (trans_b 1, weight [out, in]).
 * 2. The shapes of a 12-layer, 768-wide transformer's prefill (4,096 tokens)
 *    and decode (one token): the QKV projection, the LM head in chunks of 512
 *    rows (B transposed: the [50257, 768] embedding), the MLP, and the
 *    one-row products. Each shape runs CALLS times, tallyd and OpenBLAS
 *    alternately (the machine is shared), on one thread and on a pool of
 *    every core (OpenBLAS with as many threads), and prints milliseconds
 *    min / median / max of each and the ratio of the medians (OpenBLAS time
 *    over tallyd's: above 1 means tallyd is faster). Without OpenBLAS
 *    (libopenblas-dev: bash deploy/deps.sh baselines) the table shows
 *    tallyd alone.
 *
 * Usage: bench_sgemm [seconds per cell of table 1, default 0.3] [CALLS, default 20]
 *        bench_sgemm 0 [CALLS] [prefill|decode]   table 2 only (those shapes only) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../daemon/base/cpu.h"
#include "../daemon/base/mem.h"
#include "../daemon/base/pool.h"
#include "../daemon/kernels/sgemm.h"
#ifdef TALLYD_OPENBLAS
#include <cblas.h>
#endif

typedef void (*gemm_fn)(int, int64_t, int64_t, int64_t, const float *, int64_t, const float *,
                        int64_t, float, float *, int64_t);

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct shape {
  int64_t M, N, K;
  int trans_b;
} shape;

/* Best-of-runs GFLOP/s: fn (or sg_gemm over pool when fn is NULL), run
 * repeatedly for about `secs`. */
static double gflops(gemm_fn fn, pool_t *pool, const shape *s, const float *A, const float *B,
                     float *C, double secs) {
  int64_t ldb = s->trans_b ? s->K : s->N;
  double flop = 2.0 * (double)s->M * (double)s->N * (double)s->K, best = 1e30;
  double t_end = now() + secs;
  int runs = 0;
  do {
    double t0 = now();
    if (fn)
      fn(s->trans_b, s->M, s->N, s->K, A, s->K, B, ldb, 0.0f, C, s->N);
    else
      sg_gemm(pool, s->trans_b, s->M, s->N, s->K, A, s->K, B, ldb, 0.0f, C, s->N);
    double t = now() - t0;
    if (t < best) best = t;
    runs++;
  } while (now() < t_end || runs < 2);
  return flop / best * 1e-9;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

typedef struct tshape {
  const char *what;
  int64_t M, N, K;
  int trans_b;
} tshape;

/* One call of tallyd (impl 0: serial path if pool is NULL, else sg_gemm over
 * pool) or OpenBLAS (impl 1), in seconds. */
static double one_call(int impl, pool_t *pool, const tshape *s, const float *A, const float *B,
                       float *C) {
  int64_t ldb = s->trans_b ? s->K : s->N;
  double t0 = now();
  if (impl == 0) {
    sg_gemm(pool, s->trans_b, s->M, s->N, s->K, A, s->K, B, ldb, 0.0f, C, s->N);
  } else {
#ifdef TALLYD_OPENBLAS
    cblas_sgemm(CblasRowMajor, CblasNoTrans, s->trans_b ? CblasTrans : CblasNoTrans, (int)s->M,
                (int)s->N, (int)s->K, 1.0f, A, (int)s->K, B, (int)ldb, 0.0f, C, (int)s->N);
#endif
  }
  return now() - t0;
}

static void model_shapes(pool_t *pool, int calls, const char *only) {
  static const tshape shapes[] = {
      {"prefill QKV", 4096, 2304, 768, 1},    {"prefill LM-head chunk", 512, 50257, 768, 1},
      {"prefill MLP up", 4096, 3072, 768, 1}, {"prefill MLP down", 4096, 768, 3072, 1},
      {"decode attn out", 1, 768, 768, 1},    {"decode QKV", 1, 2304, 768, 1},
      {"decode MLP up", 1, 3072, 768, 1},     {"decode MLP down", 1, 768, 3072, 1},
  };
#ifdef TALLYD_OPENBLAS
  int blas = 1;
#else
  int blas = 0;
#endif
  if (calls < 1) calls = 1;
  if (calls > 200) calls = 200;
  printf(
      "\n# transformer shapes (trans_b 1), %d alternating calls each; ms min/median/max;\n"
      "# ratio = OpenBLAS median / tallyd median (> 1: tallyd faster); path %s\n",
      calls, sg_ops_active()->name);
  if (!blas) printf("# OpenBLAS not linked (install libopenblas-dev and rebuild): tallyd only\n");
  printf("# %-22s %-16s %3s %26s %26s %7s\n", "shape", "M x N x K", "thr", "tallyd ms",
         "openblas ms", "ratio");
  double *t[2];
  t[0] = malloc(sizeof(double) * (size_t)calls);
  t[1] = malloc(sizeof(double) * (size_t)calls);
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const tshape *s = &shapes[i];
    if (only && strncmp(s->what, only, strlen(only)) != 0) continue;
    size_t na = (size_t)(s->M * s->K), nb = (size_t)(s->K * s->N), nc = (size_t)(s->M * s->N);
    float *A = malloc(na * sizeof(float)), *B = malloc(nb * sizeof(float));
    float *C = malloc(nc * sizeof(float));
    if (!A || !B || !C || !t[0] || !t[1]) {
      fprintf(stderr, "bench_sgemm: out of memory\n");
      exit(1);
    }
    for (size_t j = 0; j < na; j++) A[j] = (float)((j * 7919) % 1000) * 1e-3f - 0.5f;
    for (size_t j = 0; j < nb; j++) B[j] = (float)((j * 104729) % 1000) * 1e-3f - 0.5f;
    for (int par = 0; par < 2; par++) {
      pool_t *pl = par ? pool : NULL;
      int nthr = par ? pool_threads(pool) : 1;
      if (par && nthr <= 1) continue;
#ifdef TALLYD_OPENBLAS
      openblas_set_num_threads(nthr);
#endif
      for (int impl = 0; impl <= blas; impl++) one_call(impl, pl, s, A, B, C); /* warm */
      for (int c = 0; c < calls; c++)
        for (int impl = 0; impl <= blas; impl++) t[impl][c] = one_call(impl, pl, s, A, B, C);
      char sz[48], cell[2][64];
      snprintf(sz, sizeof sz, "%lldx%lldx%lld", (long long)s->M, (long long)s->N, (long long)s->K);
      for (int impl = 0; impl < 2; impl++) {
        if (impl > blas) {
          snprintf(cell[impl], sizeof cell[impl], "%s", "-");
          continue;
        }
        qsort(t[impl], (size_t)calls, sizeof(double), cmp_d);
        snprintf(cell[impl], sizeof cell[impl], "%.3f/%.3f/%.3f", t[impl][0] * 1e3,
                 t[impl][calls / 2] * 1e3, t[impl][calls - 1] * 1e3);
      }
      if (blas)
        printf("  %-22s %-16s %3d %26s %26s %7.2f\n", s->what, sz, nthr, cell[0], cell[1],
               t[1][calls / 2] / t[0][calls / 2]);
      else
        printf("  %-22s %-16s %3d %26s %26s %7s\n", s->what, sz, nthr, cell[0], cell[1], "-");
      fflush(stdout);
    }
    free(A), free(B), free(C);
  }
  free(t[0]), free(t[1]);
}

int main(int argc, char **argv) {
  double secs = argc > 1 ? atof(argv[1]) : 0.3;
  int calls = argc > 2 ? atoi(argv[2]) : 20;
  const char *only = argc > 3 ? argv[3] : NULL; /* "prefill" or "decode" */
  const shape shapes[] = {
      {64, 64, 64, 0},       {64, 64, 64, 1},       {256, 256, 256, 0}, {256, 256, 256, 1},
      {1024, 1024, 1024, 0}, {1024, 1024, 1024, 1}, {1, 768, 768, 1},   {1, 768, 768, 0},
      {32, 768, 3072, 1},    {32, 768, 3072, 0},
  };
  pool_t *pool = NULL;
  if (pool_create(&pool, 0, 64) != 0) {
    fprintf(stderr, "bench_sgemm: cannot create the worker pool\n");
    return 1;
  }
  if (secs <= 0) {
    model_shapes(pool, calls, only);
    pool_destroy(pool);
    return 0;
  }
  const sg_ops *p2 = cpu_runs(CPU_AVX2) ? sg_ops_for(CPU_AVX2) : NULL;
  const sg_ops *p5 = cpu_runs(CPU_AVX512) ? sg_ops_for(CPU_AVX512) : NULL;
  printf("sgemm GFLOP/s (best of runs); path %s, pool of %d threads\n",
         cpu_path_name(cpu_best_path()), pool_threads(pool));
  printf("%-18s %-7s %10s %12s %12s %12s\n", "M x N x K", "trans_b", "scalar", "avx2 1T",
         "avx512 1T", "sg_gemm pool");
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const shape *s = &shapes[i];
    size_t na = (size_t)(s->M * s->K), nb = (size_t)(s->K * s->N), nc = (size_t)(s->M * s->N);
    float *A = tl_malloc(na * sizeof(float)), *B = tl_malloc(nb * sizeof(float));
    float *C = tl_malloc(nc * sizeof(float));
    if (!A || !B || !C) {
      fprintf(stderr, "bench_sgemm: out of memory\n");
      return 1;
    }
    for (size_t j = 0; j < na; j++) A[j] = (float)((j * 7919) % 1000) * 1e-3f - 0.5f;
    for (size_t j = 0; j < nb; j++) B[j] = (float)((j * 104729) % 1000) * 1e-3f - 0.5f;
    /* The scalar reference is slow; one timed run is enough for it. */
    double ref = gflops(sg_gemm_ref, NULL, s, A, B, C, s->M * s->N * s->K > (1 << 24) ? 0 : secs);
    char sz[32];
    snprintf(sz, sizeof sz, "%lldx%lldx%lld", (long long)s->M, (long long)s->N, (long long)s->K);
    char c2[16] = "n/a", c5[16] = "n/a";
    if (p2) snprintf(c2, sizeof c2, "%.2f", gflops(p2->gemm, NULL, s, A, B, C, secs));
    if (p5) snprintf(c5, sizeof c5, "%.2f", gflops(p5->gemm, NULL, s, A, B, C, secs));
    printf("%-18s %-7d %10.2f %12s %12s %12.2f\n", sz, s->trans_b, ref, c2, c5,
           gflops(NULL, pool, s, A, B, C, secs));
    tl_free(A);
    tl_free(B);
    tl_free(C);
  }
  model_shapes(pool, calls, only);
  pool_destroy(pool);
  return 0;
}
