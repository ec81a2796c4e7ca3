/* bench_sgemm.c - GFLOP/s of the scalar reference, the AVX2 path on one
 * thread, and sg_gemm over a pool of every core, side by side, on square
 * sizes and on the shapes of one token (1x768x768) and a short batch
 * (32x768x3072) through a Linear layer (trans_b 1, weight [out, in]).
 *
 * Usage: bench_sgemm [seconds per cell, default 0.3] */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../daemon/base/cpu.h"
#include "../daemon/base/mem.h"
#include "../daemon/base/pool.h"
#include "../daemon/kernels/sgemm.h"

typedef void (*gemm_fn)(int, int64_t, int64_t, int64_t, const float *, int64_t,
                        const float *, int64_t, float, float *, int64_t);

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
static double gflops(gemm_fn fn, pool_t *pool, const shape *s, const float *A,
                     const float *B, float *C, double secs) {
  int64_t ldb = s->trans_b ? s->K : s->N;
  double flop = 2.0 * (double)s->M * (double)s->N * (double)s->K, best = 1e30;
  double t_end = now() + secs;
  int runs = 0;
  do {
    double t0 = now();
    if (fn) fn(s->trans_b, s->M, s->N, s->K, A, s->K, B, ldb, 0.0f, C, s->N);
    else sg_gemm(pool, s->trans_b, s->M, s->N, s->K, A, s->K, B, ldb, 0.0f, C, s->N);
    double t = now() - t0;
    if (t < best) best = t;
    runs++;
  } while (now() < t_end || runs < 2);
  return flop / best * 1e-9;
}

int main(int argc, char **argv) {
  double secs = argc > 1 ? atof(argv[1]) : 0.3;
  if (secs <= 0) secs = 0.3;
  const shape shapes[] = {
      {64, 64, 64, 0},     {64, 64, 64, 1},       {256, 256, 256, 0}, {256, 256, 256, 1},
      {1024, 1024, 1024, 0}, {1024, 1024, 1024, 1}, {1, 768, 768, 1},   {1, 768, 768, 0},
      {32, 768, 3072, 1},  {32, 768, 3072, 0},
  };
  pool_t *pool = NULL;
  if (pool_create(&pool, 0, 64) != 0) {
    fprintf(stderr, "bench_sgemm: cannot create the worker pool\n");
    return 1;
  }
  int avx2 = cpu_has_avx2_fma();
  printf("sgemm GFLOP/s (best of runs); path %s, pool of %d threads\n",
         cpu_path_name(cpu_best_path()), pool_threads(pool));
  printf("%-18s %-7s %10s %12s %12s\n", "M x N x K", "trans_b", "scalar", "avx2 1T",
         "sg_gemm pool");
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
    snprintf(sz, sizeof sz, "%lldx%lldx%lld", (long long)s->M, (long long)s->N,
             (long long)s->K);
    if (avx2)
      printf("%-18s %-7d %10.2f %12.2f %12.2f\n", sz, s->trans_b, ref,
             gflops(sg_ops_for(CPU_AVX2)->gemm, NULL, s, A, B, C, secs), gflops(NULL, pool, s, A, B, C, secs));
    else
      printf("%-18s %-7d %10.2f %12s %12.2f\n", sz, s->trans_b, ref, "n/a",
             gflops(NULL, pool, s, A, B, C, secs));
    tl_free(A);
    tl_free(B);
    tl_free(C);
  }
  pool_destroy(pool);
  return 0;
}
