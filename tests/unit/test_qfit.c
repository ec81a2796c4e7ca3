/* test_qfit.c - the fitting loop: a heteroscedastic problem on which the
 * medium and the local aggregators beat the best base model's WIS on
 * held-out rows, early stopping returning the best epoch's parameters
 * (checked against a shorter run of the same seed), determinism, weights
 * that find the good base, option errors and allocation failures. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/base/pool.h"
#include "../../daemon/methods/qagg.h"

static uint64_t rs = 4242;
static double urand(void) {
  rs = rs * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rs >> 11) * 0x1.0p-53;
}
static double nrand(void) {
  double u = urand() + 1e-300, v = urand();
  return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}

enum { M = 2, K = 9 };
static const double LV[K] = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9};
/* standard normal quantiles of LV */
static const double ZN[K] = {-1.2815516, -0.8416212, -0.5244005, -0.2533471, 0.0,
                             0.2533471,  0.5244005,  0.8416212,  1.2815516};

/* y = 2x + sigma(x) eps, sigma = 0.1 + 0.9x, x ~ U[0, 1]. Base 0 is exact
 * for x < 0.5 and 0.8 sigma too high beyond; base 1 is exact for x >= 0.5
 * and 0.8 sigma too low below. */
static void make_data(int64_t n, float *Z, float *X, float *y) {
  for (int64_t i = 0; i < n; i++) {
    double x = urand(), sg = 0.1 + 0.9 * x;
    X[i] = (float)x;
    y[i] = (float)(2 * x + sg * nrand());
    for (int k = 0; k < K; k++) {
      double q = 2 * x + sg * ZN[k];
      Z[i * M * K + 0 * K + k] = (float)(q + (x >= 0.5 ? 0.8 * sg : 0.0));
      Z[i * M * K + 1 * K + k] = (float)(q - (x < 0.5 ? 0.8 * sg : 0.0));
    }
  }
}

static double wis_of(int64_t n, const float *Q, const float *y) {
  qa_metrics m;
  assert_int_equal(qa_metrics_compute(K, LV, n, Q, y, &m, NULL), 0);
  double w = m.wis;
  qa_metrics_free(&m);
  return w;
}

static double fit_and_score(pool_t *pool, qa_spec *s, const qa_fit_opts *o, int64_t ntr,
                            const float *Z, const float *X, const float *y, int64_t nte,
                            const float *Zt, const float *Xt, const float *yt, double *wis_init) {
  qa_params p;
  ts_err err;
  float *Q = tl_malloc(sizeof(float) * nte * K);
  assert_int_equal(qa_params_init(&p, s, 1, &err), 0);
  if (wis_init) {
    assert_int_equal(qa_forward(pool, s, &p, nte, Zt, Xt, Q, &err), 0);
    *wis_init = wis_of(nte, Q, yt);
  }
  qa_fit_report rep;
  if (qa_fit(pool, s, &p, ntr, Z, X, y, o, &rep, &err)) fail_msg("fit: %s", err.msg);
  assert_true(rep.best_epoch >= 1 && rep.best_epoch <= rep.epochs_run);
  assert_int_equal(qa_forward(pool, s, &p, nte, Zt, Xt, Q, &err), 0);
  double w = wis_of(nte, Q, yt);
  qa_fit_report_free(&rep);
  qa_params_free(&p);
  tl_free(Q);
  return w;
}

static void test_heteroscedastic_beats_best_base(void **st) {
  (void)st;
  enum { NTR = 3000, NTE = 3000 };
  float *Z = tl_malloc(sizeof(float) * NTR * M * K), *X = tl_malloc(sizeof(float) * NTR),
        *y = tl_malloc(sizeof(float) * NTR);
  float *Zt = tl_malloc(sizeof(float) * NTE * M * K), *Xt = tl_malloc(sizeof(float) * NTE),
        *yt = tl_malloc(sizeof(float) * NTE), *Qb = tl_malloc(sizeof(float) * NTE * K);
  make_data(NTR, Z, X, y);
  make_data(NTE, Zt, Xt, yt);
  double best_base = INFINITY, truth;
  for (int j = 0; j < M; j++) {
    for (int i = 0; i < NTE; i++) memcpy(Qb + i * K, Zt + i * M * K + j * K, sizeof(float) * K);
    double w = wis_of(NTE, Qb, yt);
    if (w < best_base) best_base = w;
  }
  for (int i = 0; i < NTE; i++)
    for (int k = 0; k < K; k++) Qb[i * K + k] = (float)(2 * Xt[i] + (0.1 + 0.9 * Xt[i]) * ZN[k]);
  truth = wis_of(NTE, Qb, yt);

  pool_t *pool;
  assert_int_equal(pool_create(&pool, 2, 0), 0);
  qa_fit_opts o;
  qa_fit_opts_default(&o);
  o.epochs = 40;
  o.learning_rate = 1e-2;
  o.validation_fraction = 0.2;
  o.patience = 8;
  o.seed = 3;
  qa_spec med = {
      .M = M, .K = K, .D = 1, .levels = LV, .gran = QA_MEDIUM, .scope = QA_GLOBAL, .simplex = 1};
  double w_med_init;
  double w_med = fit_and_score(pool, &med, &o, NTR, Z, X, y, NTE, Zt, Xt, yt, &w_med_init);
  qa_spec loc = med;
  loc.scope = QA_LOCAL;
  loc.hidden = 32;
  loc.depth = 2;
  o.learning_rate = 3e-3;
  o.epochs = 60;
  o.patience = 10;
  double w_loc = fit_and_score(pool, &loc, &o, NTR, Z, X, y, NTE, Zt, Xt, yt, NULL);
  print_message(
      "held-out WIS: best base %.4f, medium-global %.4f (uniform start %.4f), "
      "medium-local %.4f, true quantiles %.4f\n",
      best_base, w_med, w_med_init, w_loc, truth);
  assert_true(w_med < best_base);
  assert_true(w_med < w_med_init); /* the fit itself helped */
  assert_true(w_loc < best_base);
  assert_true(w_loc < w_med); /* the local weights use the region */
  assert_true(w_loc < truth * 1.05);
  pool_destroy(pool);
  tl_free(Z), tl_free(X), tl_free(y), tl_free(Zt), tl_free(Xt), tl_free(yt), tl_free(Qb);
}

/* Early stopping returns the best epoch: a run of exactly best_epoch epochs
 * with the same seed follows the same path and ends on the same values. */
static void test_early_stopping_keeps_best(void **st) {
  (void)st;
  enum { N = 600 };
  float *Z = tl_malloc(sizeof(float) * N * M * K), X[N], y[N];
  make_data(N, Z, X, y);
  /* noisy targets and a large rate make the validation curve turn up */
  for (int i = 0; i < N; i++) y[i] += (float)(2.0 * nrand());
  qa_spec s = {
      .M = M, .K = K, .D = 1, .levels = LV, .gran = QA_FINE, .scope = QA_GLOBAL, .simplex = 0};
  qa_fit_opts o;
  qa_fit_opts_default(&o);
  o.epochs = 300;
  o.learning_rate = 0.05;
  o.batch_size = 16;
  o.validation_fraction = 0.5;
  o.patience = 5;
  o.seed = 9;
  qa_params a, b;
  qa_fit_report ra, rb;
  ts_err err;
  assert_int_equal(qa_params_init(&a, &s, 0, NULL), 0);
  assert_int_equal(qa_params_init(&b, &s, 0, NULL), 0);
  assert_int_equal(qa_fit(NULL, &s, &a, N, Z, X, y, &o, &ra, &err), 0);
  assert_true(ra.stopped_early);
  assert_int_equal(ra.epochs_run, ra.best_epoch + o.patience);
  assert_int_equal(ra.n_val, N / 2);
  for (int e = 0; e < ra.epochs_run; e++) assert_true(ra.val_loss[e] >= ra.best_val_loss);
  assert_true(ra.val_loss[ra.best_epoch - 1] == ra.best_val_loss);
  /* the report's split: a permutation of the rows whose validation part is
   * the one early stopping measured (the kept parameters score best_val_loss
   * on it, up to their rounding to float) */
  {
    assert_non_null(ra.rows);
    assert_int_equal(ra.n_train + ra.n_val, N);
    unsigned char seen[N] = {0};
    for (int i = 0; i < N; i++) {
      assert_true(ra.rows[i] >= 0 && ra.rows[i] < N && !seen[ra.rows[i]]);
      seen[ra.rows[i]] = 1;
    }
    double *th = tl_malloc(sizeof(double) * (size_t)a.n), v, t;
    qa_params_to_f64(&a, th);
    qa_loss_opts lo0 = {0};
    assert_int_equal(qa_loss_grad(NULL, &s, th, ra.n_val, ra.rows + ra.n_train, Z, X, y, &lo0, NULL,
                                  &v, NULL, &err),
                     0);
    assert_true(fabs(v - ra.best_val_loss) <= 1e-5 * ra.best_val_loss);
    /* and the training part is not: its loss differs */
    assert_int_equal(
        qa_loss_grad(NULL, &s, th, ra.n_train, ra.rows, Z, X, y, &lo0, NULL, &t, NULL, &err), 0);
    assert_true(fabs(t - ra.best_val_loss) > 1e-3 * ra.best_val_loss);
    tl_free(th);
  }
  o.epochs = ra.best_epoch;
  assert_int_equal(qa_fit(NULL, &s, &b, N, Z, X, y, &o, &rb, &err), 0);
  assert_int_equal(rb.best_epoch, ra.best_epoch);
  assert_memory_equal(a.data, b.data, sizeof(float) * a.n);
  /* and a third run with a pool is the same again (deterministic) */
  pool_t *pool;
  assert_int_equal(pool_create(&pool, 2, 0), 0);
  qa_params_free(&b);
  assert_int_equal(qa_params_init(&b, &s, 0, NULL), 0);
  assert_int_equal(qa_fit(pool, &s, &b, N, Z, X, y, &o, NULL, &err), 0);
  assert_memory_equal(a.data, b.data, sizeof(float) * a.n);
  pool_destroy(pool);
  qa_fit_report_free(&ra);
  qa_fit_report_free(&rb);
  qa_params_free(&a);
  qa_params_free(&b);
  tl_free(Z);
}

/* Coarse global: one exact base and one noisy base; the weight of the exact
 * one grows toward 1. */
static void test_coarse_finds_good_base(void **st) {
  (void)st;
  enum { N = 2000 };
  float *Z = tl_malloc(sizeof(float) * N * M * K), X[N], y[N];
  for (int i = 0; i < N; i++) {
    double mu = nrand();
    y[i] = (float)(mu + 0.3 * nrand());
    X[i] = 0;
    for (int k = 0; k < K; k++) {
      Z[i * M * K + k] = (float)(mu + 0.3 * ZN[k] + 1.5 * nrand());
      Z[i * M * K + K + k] = (float)(mu + 0.3 * ZN[k]);
    }
  }
  qa_spec s = {.M = M, .K = K, .levels = LV, .gran = QA_COARSE, .scope = QA_GLOBAL, .simplex = 1};
  qa_fit_opts o;
  qa_fit_opts_default(&o);
  o.epochs = 30;
  o.learning_rate = 0.05;
  o.validation_fraction = 0;
  qa_params p;
  qa_fit_report r;
  assert_int_equal(qa_params_init(&p, &s, 0, NULL), 0);
  assert_int_equal(qa_fit(NULL, &s, &p, N, Z, X, y, &o, &r, NULL), 0);
  assert_int_equal(r.best_epoch, 30);
  assert_int_equal(r.epochs_run, 30);
  assert_true(isnan(r.val_loss[0]));
  assert_true(r.train_loss[29] < r.train_loss[0]);
  double w[M];
  assert_int_equal(qa_global_weights(&s, &p, w, NULL), 0);
  assert_true(w[1] > 0.9);
  assert_true(fabs(w[0] + w[1] - 1.0) < 1e-6);
  qa_fit_report_free(&r);
  qa_params_free(&p);
  tl_free(Z);
}

static void test_fit_errors_and_alloc_failures(void **st) {
  (void)st;
  enum { N = 50 };
  float Z[N * M * K], X[N], y[N];
  make_data(N, Z, X, y);
  qa_spec s = {.M = M,
               .K = K,
               .D = 1,
               .levels = LV,
               .gran = QA_MEDIUM,
               .scope = QA_LOCAL,
               .simplex = 1,
               .hidden = 4,
               .depth = 2};
  qa_fit_opts o;
  qa_fit_opts_default(&o);
  o.epochs = 2;
  qa_params p;
  ts_err err;
  assert_int_equal(qa_params_init(&p, &s, 0, NULL), 0);
  o.batch_size = 0;
  assert_int_equal(qa_fit(NULL, &s, &p, N, Z, X, y, &o, NULL, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "batch_size"));
  o.batch_size = 8;
  o.dropout = 1.0;
  assert_int_equal(qa_fit(NULL, &s, &p, N, Z, X, y, &o, NULL, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "dropout"));
  o.dropout = 0.1;
  o.margin = -0.5; /* would let levels cross by up to 0.5 unpenalised */
  assert_int_equal(qa_fit(NULL, &s, &p, N, Z, X, y, &o, NULL, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "margin"));
  o.margin = 0.0;
  assert_int_equal(qa_fit(NULL, &s, &p, N, Z, NULL, y, &o, NULL, &err), -TS_EINVAL);
  /* Every allocation in turn fails: an error value, never a crash or leak. */
  int failures = 0;
  for (long n = 0; n < 200; n++) {
    qa_fit_report r;
    tl_mem_fail_after(n);
    int rc = qa_fit(NULL, &s, &p, N, Z, X, y, &o, &r, &err);
    tl_mem_fail_reset();
    if (rc == 0) {
      qa_fit_report_free(&r);
      break;
    }
    assert_int_equal(rc, -TS_ENOMEM);
    failures++;
  }
  assert_true(failures > 3);
  qa_params_free(&p);
}

/* A step size that blows the weights past float32 is refused as diverged,
 * with or without validation rows, and the parameters come back unchanged. */
static void test_diverged_fit_is_refused(void **st) {
  (void)st;
  enum { N = 200 };
  float *Z = tl_malloc(sizeof(float) * N * M * K), X[N], y[N];
  assert_non_null(Z);
  make_data(N, Z, X, y);
  qa_spec s = {.M = M,
               .K = K,
               .D = 1,
               .levels = LV,
               .gran = QA_MEDIUM,
               .scope = QA_LOCAL,
               .simplex = 1,
               .hidden = 8,
               .depth = 2};
  for (int val = 0; val < 2; val++) {
    qa_params p;
    assert_int_equal(qa_params_init(&p, &s, 3, NULL), 0);
    float *before = tl_malloc(sizeof(float) * p.n);
    memcpy(before, p.data, sizeof(float) * p.n);
    qa_fit_opts o;
    qa_fit_opts_default(&o);
    o.epochs = 5;
    o.learning_rate = 1e300;
    o.validation_fraction = val ? 0.2 : 0.0;
    ts_err err;
    assert_int_equal(qa_fit(NULL, &s, &p, N, Z, X, y, &o, NULL, &err), -TS_EINVAL);
    assert_non_null(strstr(err.msg, "diverged"));
    assert_memory_equal(before, p.data, sizeof(float) * p.n);
    tl_free(before);
    qa_params_free(&p);
  }
  tl_free(Z);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_heteroscedastic_beats_best_base),
      cmocka_unit_test(test_early_stopping_keeps_best),
      cmocka_unit_test(test_coarse_finds_good_base),
      cmocka_unit_test(test_fit_errors_and_alloc_failures),
      cmocka_unit_test(test_diverged_fit_is_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
