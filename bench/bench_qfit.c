/* bench_qfit.c - speed of the quantile aggregators: fit time per epoch
 * (rows per second) of the global-fine and local-medium aggregators on
 * 100,000 rows with M = 6 bases and K = 99 levels, and forward throughput
 * at B = 1 and B = 1024 (through a prepared qa_infer), each beside the coarse-global aggregator as
 * the baseline.
 *
 *   build/bench/bench_qfit [rows] [epochs] [threads] [batch] [only]
 *
 * batch is the minibatch (default 64); only, when given, is one aggregator
 * name (coarse-global, fine-global, medium-local) and leaves the forward
 * figures out: bench/qfit_vs_torch.sh runs it that way beside PyTorch.
 *
 * TALLYD_SIMD=scalar|avx2|avx512 forces an sgemm path. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../daemon/base/cpu.h"
#include "../daemon/base/mem.h"
#include "../daemon/base/pool.h"
#include "../daemon/methods/qagg.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t rs = 1;
static double urand(void) {
  rs = rs * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rs >> 11) * 0x1.0p-53;
}
static double nrand(void) {
  double u = urand() + 1e-300, v = urand();
  return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}

enum { M = 6, K = 99, D = 8 };

typedef struct cfg {
  const char *name;
  qa_granularity g;
  qa_scope sc;
} cfg;

int main(int argc, char **argv) {
  int64_t N = argc > 1 ? atoll(argv[1]) : 100000;
  int epochs = argc > 2 ? atoi(argv[2]) : 1;
  int threads = argc > 3 ? atoi(argv[3]) : 0;
  int batch = argc > 4 ? atoi(argv[4]) : 64;
  const char *only = argc > 5 ? argv[5] : NULL;
  if (batch < 1) batch = 64;
  double lv[K];
  for (int k = 0; k < K; k++) lv[k] = 0.01 * (k + 1);
  float *Z = malloc(sizeof(float) * N * M * K), *X = malloc(sizeof(float) * N * D),
        *y = malloc(sizeof(float) * N), *Q = malloc(sizeof(float) * 1024 * K);
  if (!Z || !X || !y || !Q) return 1;
  for (int64_t i = 0; i < N; i++) {
    double mu = 0;
    for (int d = 0; d < D; d++) mu += (X[i * D + d] = (float)nrand()) * 0.3;
    y[i] = (float)(mu + nrand());
    for (int j = 0; j < M; j++) {
      double bias = 0.2 * nrand(), sc = 0.7 + 0.1 * j;
      for (int k = 0; k < K; k++) {
        double zq = -2.326 + 4.652 * k / (K - 1.0); /* rough normal quantiles */
        Z[(i * M + j) * K + k] = (float)(mu + bias + sc * zq);
      }
    }
  }
  pool_t *pool = NULL;
  if (pool_create(&pool, threads, 0)) return 1;
  printf(
      "quantile aggregation bench: %lld rows, M=%d, K=%d, D=%d, %d threads, batch %d, sgemm "
      "path %s\n",
      (long long)N, M, K, D, pool_threads(pool), batch, cpu_path_name(cpu_best_path()));
  printf("%-14s %12s %14s %14s %14s\n", "aggregator", "params", "fit rows/s", "fwd B=1 rows/s",
         "fwd B=1024 rows/s");
  cfg cfgs[] = {{"coarse-global", QA_COARSE, QA_GLOBAL},
                {"fine-global", QA_FINE, QA_GLOBAL},
                {"medium-local", QA_MEDIUM, QA_LOCAL}};
  for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
    if (only && strcmp(only, cfgs[c].name) != 0) continue;
    qa_spec s = {.M = M,
                 .K = K,
                 .D = D,
                 .levels = lv,
                 .gran = cfgs[c].g,
                 .scope = cfgs[c].sc,
                 .simplex = 1,
                 .hidden = 64,
                 .depth = 2};
    qa_params p;
    ts_err err;
    if (qa_params_init(&p, &s, 1, &err)) {
      fprintf(stderr, "%s\n", err.msg);
      return 1;
    }
    qa_fit_opts o;
    qa_fit_opts_default(&o);
    o.epochs = epochs;
    o.validation_fraction = 0;
    o.batch_size = batch;
    qa_fit_report r;
    double t0 = now();
    if (qa_fit(pool, &s, &p, N, Z, X, y, &o, &r, &err)) {
      fprintf(stderr, "%s\n", err.msg);
      return 1;
    }
    double fit_rps = (double)N * r.epochs_run / (now() - t0);
    qa_fit_report_free(&r);
    if (only) {
      printf("%-14s %12lld %14.0f\n", cfgs[c].name, (long long)p.n, fit_rps);
      qa_params_free(&p);
      continue;
    }
    qa_infer f;
    if (qa_infer_init(&f, &s, &p, &err)) {
      fprintf(stderr, "%s\n", err.msg);
      return 1;
    }
    int reps1 = 5000;
    t0 = now();
    for (int i = 0; i < reps1; i++)
      qa_infer_run(pool, &f, 1, Z + (i % N) * M * K, X + (i % N) * D, Q, &err);
    double f1 = reps1 / (now() - t0);
    int reps = 30;
    t0 = now();
    for (int i = 0; i < reps; i++) qa_infer_run(pool, &f, 1024, Z, X, Q, &err);
    double f1024 = 1024.0 * reps / (now() - t0);
    qa_infer_free(&f);
    printf("%-14s %12lld %14.0f %14.0f %14.0f\n", cfgs[c].name, (long long)p.n, fit_rps, f1, f1024);
    qa_params_free(&p);
  }
  pool_destroy(pool);
  free(Z), free(X), free(y), free(Q);
  return 0;
}
