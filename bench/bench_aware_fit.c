/* bench_aware_fit.c - what an AWARE-NET fit costs per epoch per million rows.
 *
 * 9 members in 3 families of 3 (the paper's layout), binary and C = 3.
 * Prints, per million rows: one forward pass from member logits (tier 1 +
 * tier 2, the baseline: what inference costs; serial, then tier 1 over a
 * pool of one thread per core), tier 2 alone (what one epoch
 * must at least touch), one fit epoch (shuffle + gradient + Adam steps +
 * validation loss), and the fit-answer metrics (five AUC sorts and more).
 *
 *   build/bench/bench_aware_fit [rows=1000000] [epochs=5] [batch=256] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "../daemon/methods/aware.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t st = 42;
static double urand(void) {
  uint64_t z = (st += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}

static int run(int C, int64_t N, int epochs, int64_t batch, pool_t *pool) {
  int sizes[3] = {3, 3, 3};
  aw_spec s = {.F = 3, .family_size = sizes, .n = 9, .C = C, .input_logits = 1};
  int Cc = aw_cc(&s), K = C < 2 ? 2 : C;
  float *z = malloc(sizeof(float) * N * 9 * Cc);
  double *P = malloc(sizeof(double) * N * 3 * Cc), *y = malloc(sizeof(double) * N * Cc);
  int32_t *t = malloc(sizeof(int32_t) * N);
  if (!z || !P || !y || !t) {
    fprintf(stderr, "out of memory for %lld rows\n", (long long)N);
    return 1;
  }
  for (int64_t b = 0; b < N; b++) {
    int lab = (int)(urand() * K);
    t[b] = lab;
    for (int m = 0; m < 9; m++)
      for (int c = 0; c < Cc; c++) {
        double sig = m < 3 ? (Cc == 1 ? (lab ? 1.0 : -1.0) : (c == lab)) : 0.0;
        z[(b * 9 + m) * Cc + c] = (float)(sig + 3.0 * (urand() - 0.5));
      }
  }
  double per = 1e6 / (double)N, theta[3] = {0, 0, 0};
  ts_err e;

  /* best of three, on buffers already touched, so page faults are not timed */
  memset(P, 0, sizeof(double) * N * 3 * Cc);
  memset(y, 0, sizeof(double) * N * Cc);
  double fwd = INFINITY, fwd_pool = INFINITY, tier2 = INFINITY, t0;
  for (int rep = 0; rep < 3; rep++) {
    t0 = now();
    if (aw_family_probs(&s, N, z, P, NULL, &e)) {
      fprintf(stderr, "%s\n", e.msg);
      return 1;
    }
    aw_combine(&s, N, P, theta, y);
    fwd = fmin(fwd, now() - t0);
    t0 = now();
    aw_combine(&s, N, P, theta, y);
    tier2 = fmin(tier2, now() - t0);
    t0 = now();
    if (aw_family_probs(&s, N, z, P, pool, &e)) {
      fprintf(stderr, "%s\n", e.msg);
      return 1;
    }
    aw_combine(&s, N, P, theta, y);
    fwd_pool = fmin(fwd_pool, now() - t0);
  }

  aw_fit_opts o;
  aw_fit_opts_default(&o);
  o.epochs = epochs;
  o.patience = 0;
  o.batch_size = batch;
  aw_fit_report r;
  t0 = now();
  if (aw_fit(&s, N, P, t, &o, theta, &r, &e)) {
    fprintf(stderr, "%s\n", e.msg);
    return 1;
  }
  double fit = now() - t0;

  met_scores fam[3];
  aw_fit_metrics m = {.families = fam};
  t0 = now();
  if (aw_fit_metrics_compute(&s, N, P, t, &o, NULL, theta, 0.5, &m, &e)) {
    fprintf(stderr, "%s\n", e.msg);
    return 1;
  }
  double met = now() - t0;

  double alpha[3];
  aw_alpha(3, theta, alpha);
  printf("C=%d rows=%lld batch=%lld: P %.1f MiB\n", C, (long long)N,
         batch > 0 && batch < r.n_train ? (long long)batch : (long long)r.n_train,
         N * 3.0 * Cc * 8 / 1048576.0);
  printf("  forward pass (logits -> P -> y)   %8.1f ms per 1M rows\n", fwd * per * 1e3);
  printf("  forward pass, tier 1 on %d threads  %8.1f ms per 1M rows\n", pool_threads(pool),
         fwd_pool * per * 1e3);
  printf("  tier 2 only (P -> y)               %8.1f ms per 1M rows\n", tier2 * per * 1e3);
  printf("  fit epoch (%lld train + %lld val)  %8.1f ms per 1M rows  (%.2fx forward)\n",
         (long long)r.n_train, (long long)r.n_val, fit / r.epochs_run * per * 1e3,
         fit / r.epochs_run / fwd);
  printf("  fit-answer metrics                 %8.1f ms per 1M rows\n", met * per * 1e3);
  printf("  epochs %d, alpha %.3f %.3f %.3f, val log loss %.4f (uniform %.4f), auc %.4f\n",
         r.epochs_run, alpha[0], alpha[1], alpha[2], m.validation.log_loss, m.uniform.log_loss,
         m.validation.auc);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("  peak RSS so far %.0f MiB (member logits %.0f MiB, P %.0f MiB, y %.0f MiB)\n",
         ru.ru_maxrss / 1024.0, N * 9.0 * Cc * 4 / 1048576.0, N * 3.0 * Cc * 8 / 1048576.0,
         N * 1.0 * Cc * 8 / 1048576.0);
  free(z);
  free(P);
  free(y);
  free(t);
  return 0;
}

int main(int argc, char **argv) {
  int64_t N = argc > 1 ? atoll(argv[1]) : 1000000;
  int epochs = argc > 2 ? atoi(argv[2]) : 5;
  int64_t batch = argc > 3 ? atoll(argv[3]) : 256;
  if (N < 10 || epochs < 1) {
    fprintf(stderr, "usage: %s [rows >= 10] [epochs >= 1] [batch]\n", argv[0]);
    return 2;
  }
  pool_t *pool;
  if (pool_create(&pool, 0, 0)) {
    fprintf(stderr, "cannot start the worker pool\n");
    return 1;
  }
  int rc = run(1, N, epochs, batch, pool) || run(3, N, epochs, batch, pool);
  pool_destroy(pool);
  return rc;
}
