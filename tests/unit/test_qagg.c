/* test_qagg.c - the six quantile aggregators against hand-worked values,
 * the float inference path against the double training path, gradient
 * checks by central differences, the fit's float32 gradient against the
 * double one, and the monotone steps (PAV against a
 * brute-force isotonic formula, WIS never increased, median anchoring). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/rng.h"

#include "../../daemon/base/mem.h"
#include "../../daemon/base/pool.h"
#include "../../daemon/methods/qagg.h"

static const double LV3[3] = {0.25, 0.5, 0.75};
/* one row, model 0 predicts (1, 2, 3), model 1 predicts (3, 5, 7) */
static const float Z1[6] = {1, 2, 3, 3, 5, 7};

static uint64_t rs = 12345;
static double urand(void) {
  return rng_unif01(&rs);
}
static double nrand(void) {
  return rng_normal(&rs);
}

static qa_spec mkspec(qa_granularity g, qa_scope sc, int simplex, int M, int K, const double *lv,
                      int D, int H, int depth) {
  qa_spec s = {.M = M,
               .K = K,
               .D = D,
               .levels = lv,
               .gran = g,
               .scope = sc,
               .simplex = simplex,
               .hidden = H,
               .depth = depth};
  return s;
}

static void check_row(const float *q, const double *want, int K, double tol) {
  for (int k = 0; k < K; k++) {
    if (fabs(q[k] - want[k]) > tol) fail_msg("level %d: got %.9g want %.9g", k, q[k], want[k]);
  }
}

/* Hand-worked logits for the global cases (index 0: simplex, 1: free). */
static const float COARSE_L[2][2] = {{0.0f, 1.0986123f /* ln 3 */}, {0.5f, 0.25f}};
static const double COARSE_Q[2][3] = {{2.5, 4.25, 6.0}, {1.25, 2.25, 3.25}};
static const float MEDIUM_L[2][6] = {{0, 1.0986123f, 0, 1.0986123f, 0, 0}, {1, 0, 2, 0, 1, -1}};
static const double MEDIUM_Q[2][3] = {{2.5, 2.75, 5.0}, {1.0, 5.0, -1.0}};
static void fine_logits(int simplex, float *L /* [6, 3] */) {
  memset(L, 0, 18 * sizeof(float));
  if (simplex) {
    L[(1 * 3 + 2) * 3 + 0] = (float)log(6.0);
    L[(0 * 3 + 0) * 3 + 1] = (float)log(2.0);
    L[(1 * 3 + 1) * 3 + 1] = (float)log(3.0);
  } else {
    L[(0 * 3 + 0) * 3 + 0] = 1.0f;
    L[(0 * 3 + 1) * 3 + 1] = 0.5f;
    L[(1 * 3 + 2) * 3 + 1] = 0.5f;
    L[(1 * 3 + 0) * 3 + 2] = 2.0f;
    L[(0 * 3 + 2) * 3 + 2] = -1.0f;
  }
}
static const double FINE_Q[2][3] = {{56.0 / 11.0, 32.0 / 9.0, 3.5}, {1.0, 4.5, 3.0}};

static void hand_logits(qa_granularity g, int simplex, float *L) {
  if (g == QA_COARSE)
    memcpy(L, COARSE_L[!simplex], 2 * sizeof(float));
  else if (g == QA_MEDIUM)
    memcpy(L, MEDIUM_L[!simplex], 6 * sizeof(float));
  else
    fine_logits(simplex, L);
}
static const double *hand_q(qa_granularity g, int simplex) {
  return g == QA_COARSE   ? COARSE_Q[!simplex]
         : g == QA_MEDIUM ? MEDIUM_Q[!simplex]
                          : FINE_Q[!simplex];
}

static void test_forward_global_hand(void **st) {
  (void)st;
  for (int g = 0; g < 3; g++)
    for (int simplex = 0; simplex < 2; simplex++) {
      qa_spec s = mkspec((qa_granularity)g, QA_GLOBAL, simplex, 2, 3, LV3, 0, 0, 0);
      qa_params p;
      ts_err err;
      assert_int_equal(qa_params_init(&p, &s, 1, &err), 0);
      assert_non_null(qa_params_find(&p, "aggregator.logits"));
      hand_logits((qa_granularity)g, simplex, p.data);
      float q[3];
      assert_int_equal(qa_forward(NULL, &s, &p, 1, Z1, NULL, q, &err), 0);
      check_row(q, hand_q((qa_granularity)g, simplex), 3, 2e-6);
      qa_params_free(&p);
    }
}

/* Free global weights start as the plain average of the bases. */
static void test_free_init_is_average(void **st) {
  (void)st;
  for (int g = 0; g < 3; g++) {
    qa_spec s = mkspec((qa_granularity)g, QA_GLOBAL, 0, 2, 3, LV3, 0, 0, 0);
    qa_params p;
    assert_int_equal(qa_params_init(&p, &s, 1, NULL), 0);
    float q[3];
    assert_int_equal(qa_forward(NULL, &s, &p, 1, Z1, NULL, q, NULL), 0);
    double want[3] = {2.0, 3.5, 5.0};
    check_row(q, want, 3, 1e-6);
    qa_params_free(&p);
  }
}

/* An independent plain reference: the logits of one row to q. */
static void ref_agg(qa_granularity g, int simplex, int M, int K, const double *lg, const float *z,
                    double *q) {
  int L = g == QA_COARSE ? M : g == QA_MEDIUM ? M * K : M * K * K;
  double w[512];
  memcpy(w, lg, (size_t)L * sizeof(double));
  if (simplex) {
    if (g == QA_COARSE) {
      double s = 0;
      for (int j = 0; j < M; j++) s += exp(lg[j]);
      for (int j = 0; j < M; j++) w[j] = exp(lg[j]) / s;
    } else {
      int rows = g == QA_MEDIUM ? M : M * K;
      for (int k = 0; k < K; k++) {
        double s = 0;
        for (int r = 0; r < rows; r++) s += exp(lg[r * K + k]);
        for (int r = 0; r < rows; r++) w[r * K + k] = exp(lg[r * K + k]) / s;
      }
    }
  }
  for (int k = 0; k < K; k++) {
    double a = 0;
    if (g == QA_COARSE)
      for (int j = 0; j < M; j++) a += w[j] * z[j * K + k];
    else if (g == QA_MEDIUM)
      for (int j = 0; j < M; j++) a += w[j * K + k] * z[j * K + k];
    else
      for (int r = 0; r < M * K; r++) a += w[r * K + k] * z[r];
    q[k] = a;
  }
}

/* Local, D = H = depth = 1, layer 0 = identity then ELU: the head sees
 * h = ELU(x). Head bias = hand logits A, head weight = (0 - A)/2, so x = 0
 * gives the hand case, x = 2 gives all-zero logits, x = -1 mixes. */
static void test_forward_local_hand(void **st) {
  (void)st;
  float X[3] = {0.0f, 2.0f, -1.0f};
  float Z[18];
  for (int r = 0; r < 3; r++) memcpy(Z + 6 * r, Z1, sizeof Z1);
  for (int g = 0; g < 3; g++)
    for (int simplex = 0; simplex < 2; simplex++) {
      qa_spec s = mkspec((qa_granularity)g, QA_LOCAL, simplex, 2, 3, LV3, 1, 1, 1);
      qa_params p;
      ts_err err;
      assert_int_equal(qa_params_init(&p, &s, 7, &err), 0);
      assert_int_equal(p.ntensors, 4);
      qa_tensor *w0 = qa_params_find(&p, "aggregator.layers.0.weight");
      qa_tensor *b0 = qa_params_find(&p, "aggregator.layers.0.bias");
      qa_tensor *wh = qa_params_find(&p, "aggregator.layers.1.weight");
      qa_tensor *bh = qa_params_find(&p, "aggregator.layers.1.bias");
      assert_non_null(w0);
      assert_non_null(wh);
      int L = (int)qa_logit_count(&s);
      assert_int_equal(wh->shape[0], L);
      assert_int_equal(wh->shape[1], 1);
      w0->data[0] = 1.0f;
      b0->data[0] = 0.0f;
      float A[18];
      hand_logits((qa_granularity)g, simplex, A);
      for (int i = 0; i < L; i++) {
        bh->data[i] = A[i];
        wh->data[i] = -A[i] / 2.0f;
      }
      float q[9];
      assert_int_equal(qa_forward(NULL, &s, &p, 3, Z, X, q, &err), 0);
      check_row(q, hand_q((qa_granularity)g, simplex), 3, 2e-6);
      double zero_q[3];
      if (simplex) zero_q[0] = 2.0, zero_q[1] = 3.5, zero_q[2] = 5.0;
      if (simplex && g == QA_FINE) zero_q[0] = zero_q[1] = zero_q[2] = 3.5;
      if (!simplex) zero_q[0] = zero_q[1] = zero_q[2] = 0.0;
      check_row(q + 3, zero_q, 3, 2e-6);
      double lg[18], want[3], h = expm1(-1.0);
      for (int i = 0; i < L; i++) lg[i] = (double)A[i] + (double)(-A[i] / 2.0f) * h;
      ref_agg((qa_granularity)g, simplex, 2, 3, lg, Z1, want);
      check_row(q + 6, want, 3, 2e-6);
      qa_params_free(&p);
    }
}

static void random_theta(const qa_spec *s, qa_params *p, double *theta) {
  qa_params_to_f64(p, theta);
  for (int64_t i = 0; i < p->n; i++)
    theta[i] = s->scope == QA_GLOBAL ? 0.6 * nrand() : theta[i] + 0.2 * nrand();
}

/* The float inference path (sg_gemm, chunks, pool) agrees with the double
 * training path for every aggregator, with and without a pool. */
static void test_forward_float_matches_double(void **st) {
  (void)st;
  static const double lv[5] = {0.1, 0.3, 0.5, 0.7, 0.9};
  int M = 3, K = 5, D = 4, B = 300;
  float *Z = tl_malloc(sizeof(float) * B * M * K), *X = tl_malloc(sizeof(float) * B * D);
  float *Q = tl_malloc(sizeof(float) * B * K), *Q2 = tl_malloc(sizeof(float) * B * K);
  double *Qd = tl_malloc(sizeof(double) * B * K);
  for (int i = 0; i < B * M * K; i++) Z[i] = (float)nrand();
  for (int i = 0; i < B * D; i++) X[i] = (float)nrand();
  pool_t *pool;
  assert_int_equal(pool_create(&pool, 2, 0), 0);
  for (int sc = 0; sc < 2; sc++)
    for (int g = 0; g < 3; g++)
      for (int simplex = 0; simplex < 2; simplex++) {
        qa_spec s = mkspec((qa_granularity)g, (qa_scope)sc, simplex, M, K, lv, D, 6, 2);
        qa_params p;
        assert_int_equal(qa_params_init(&p, &s, 3, NULL), 0);
        double *theta = tl_malloc(sizeof(double) * p.n);
        random_theta(&s, &p, theta);
        qa_params_from_f64(&p, theta);
        qa_params_to_f64(&p, theta); /* the float values exactly */
        assert_int_equal(qa_forward(NULL, &s, &p, B, Z, X, Q, NULL), 0);
        assert_int_equal(qa_forward(pool, &s, &p, B, Z, X, Q2, NULL), 0);
        assert_int_equal(qa_predict_f64(&s, theta, B, Z, X, Qd, NULL), 0);
        qa_infer f;
        float *Q3 = tl_malloc(sizeof(float) * B * K);
        assert_int_equal(qa_infer_init(&f, &s, &p, NULL), 0);
        assert_int_equal(qa_infer_run(pool, &f, B, Z, X, Q3, NULL), 0);
        assert_memory_equal(Q2, Q3, sizeof(float) * B * K);
        qa_infer_free(&f);
        tl_free(Q3);
        for (int i = 0; i < B * K; i++) {
          if (fabs(Q[i] - Qd[i]) > 1e-4 * (1.0 + fabs(Qd[i])))
            fail_msg("%s %s simplex=%d elem %d: float %.7g double %.7g", sc ? "local" : "global",
                     qa_granularity_name((qa_granularity)g), simplex, i, Q[i], Qd[i]);
          assert_true(fabs(Q[i] - Q2[i]) <= 1e-5 * (1.0 + fabs(Q[i])));
        }
        tl_free(theta);
        qa_params_free(&p);
      }
  pool_destroy(pool);
  tl_free(Z), tl_free(X), tl_free(Q), tl_free(Q2), tl_free(Qd);
}

/* Central differences in double on the whole loss, for all six
 * aggregators, simplex and free, with and without the non-crossing penalty
 * (and with dropout active for the local ones: the mask is a function of the
 * seed and the row, so it is the same at theta +- h). */
static void gradcheck_one(qa_scope sc, qa_granularity g, int simplex, double lambda) {
  static const double lv[4] = {0.1, 0.4, 0.6, 0.9};
  enum { M = 3, K = 4, D = 3, N = 7 };
  float Z[N * M * K], X[N * D], y[N];
  for (int i = 0; i < N * M * K; i++) Z[i] = (float)nrand();
  for (int i = 0; i < N * D; i++) X[i] = (float)nrand();
  for (int i = 0; i < N; i++) y[i] = (float)nrand();
  qa_spec s = mkspec(g, sc, simplex, M, K, lv, D, 5, 2);
  qa_params p;
  assert_int_equal(qa_params_init(&p, &s, 11, NULL), 0);
  int64_t P = p.n;
  double *th = tl_malloc(sizeof(double) * P), *gr = tl_malloc(sizeof(double) * P);
  random_theta(&s, &p, th);
  qa_loss_opts o = {
      .lambda = lambda, .margin = 0.05, .dropout = sc == QA_LOCAL ? 0.3 : 0.0, .dropout_seed = 99};
  int64_t rows[N] = {6, 0, 3, 1, 5, 2, 4};
  double l0;
  ts_err err;
  assert_int_equal(qa_loss_grad(NULL, &s, th, N, rows, Z, X, y, &o, &l0, NULL, gr, &err), 0);
  double worst = 0;
  for (int64_t i = 0; i < P; i++) {
    double h = 1e-6, keep = th[i], lp, lm;
    th[i] = keep + h;
    qa_loss_grad(NULL, &s, th, N, rows, Z, X, y, &o, &lp, NULL, NULL, NULL);
    th[i] = keep - h;
    qa_loss_grad(NULL, &s, th, N, rows, Z, X, y, &o, &lm, NULL, NULL, NULL);
    th[i] = keep;
    double fd = (lp - lm) / (2 * h), an = gr[i];
    double e = fabs(fd - an) / (fmax(fabs(fd), fabs(an)) + 1e-6);
    if (e > worst) worst = e;
    if (fabs(fd - an) > 1e-4 * fmax(fabs(fd), fabs(an)) + 1e-8)
      fail_msg("%s %s simplex=%d lambda=%g param %lld (%lld total): fd %.10g analytic %.10g",
               sc ? "local" : "global", qa_granularity_name(g), simplex, lambda, (long long)i,
               (long long)P, fd, an);
  }
  (void)worst;
  tl_free(th), tl_free(gr);
  qa_params_free(&p);
}

static void test_gradcheck_global(void **st) {
  (void)st;
  for (int g = 0; g < 3; g++)
    for (int simplex = 0; simplex < 2; simplex++)
      for (int pen = 0; pen < 2; pen++)
        gradcheck_one(QA_GLOBAL, (qa_granularity)g, simplex, pen ? 0.7 : 0.0);
}

static void test_gradcheck_local(void **st) {
  (void)st;
  for (int g = 0; g < 3; g++)
    for (int simplex = 0; simplex < 2; simplex++)
      for (int pen = 0; pen < 2; pen++)
        gradcheck_one(QA_LOCAL, (qa_granularity)g, simplex, pen ? 0.7 : 0.0);
}

/* The penalty term alone, by hand: K = 3, q = (2.5, 4.25, 6) for y = 4.25
 * has no crossing; with margin 2 the pairs (0,1) and (1,2) are active. */
static void test_penalty_hand(void **st) {
  (void)st;
  qa_spec s = mkspec(QA_COARSE, QA_GLOBAL, 1, 2, 3, LV3, 0, 0, 0);
  double th[2] = {0.0, log(3.0)};
  float y = 4.25f;
  double l, pin;
  qa_loss_opts o = {.lambda = 3.0, .margin = 0.0};
  assert_int_equal(qa_loss_grad(NULL, &s, th, 1, NULL, Z1, NULL, &y, &o, &l, &pin, NULL, NULL), 0);
  /* pinball: tau .25 (y - 2.5) = .4375; 0; .25 (6 - 4.25) = .4375; mean / 3 */
  assert_true(fabs(pin - 0.875 / 3) < 1e-12);
  assert_true(fabs(l - pin) < 1e-12);
  o.margin = 2.0;
  assert_int_equal(qa_loss_grad(NULL, &s, th, 1, NULL, Z1, NULL, &y, &o, &l, &pin, NULL, NULL), 0);
  /* relu(2.5-4.25+2)=.25, relu(4.25-6+2)=.25, relu(2.5-6+2)=0 -> mean over 3 pairs */
  assert_true(fabs(l - (pin + 3.0 * 0.5 / 3)) < 1e-12);
}

/* The gradient does not depend on the pool (blocks are summed in order). */
static void test_grad_pool_deterministic(void **st) {
  (void)st;
  static const double lv[3] = {0.2, 0.5, 0.8};
  enum { M = 2, K = 3, D = 2, N = 500 };
  float *Z = tl_malloc(sizeof(float) * N * M * K), X[N * D], y[N];
  for (int i = 0; i < N * M * K; i++) Z[i] = (float)nrand();
  for (int i = 0; i < N * D; i++) X[i] = (float)nrand();
  for (int i = 0; i < N; i++) y[i] = (float)nrand();
  qa_spec s = mkspec(QA_MEDIUM, QA_LOCAL, 1, M, K, lv, D, 8, 2);
  qa_params p;
  assert_int_equal(qa_params_init(&p, &s, 5, NULL), 0);
  double *th = tl_malloc(sizeof(double) * p.n), *g1 = tl_malloc(sizeof(double) * p.n),
         *g2 = tl_malloc(sizeof(double) * p.n);
  qa_params_to_f64(&p, th);
  qa_loss_opts o = {.lambda = 0.1, .dropout = 0.2, .dropout_seed = 4};
  pool_t *pool;
  assert_int_equal(pool_create(&pool, 2, 0), 0);
  double l1, l2;
  assert_int_equal(qa_loss_grad(NULL, &s, th, N, NULL, Z, X, y, &o, &l1, NULL, g1, NULL), 0);
  assert_int_equal(qa_loss_grad(pool, &s, th, N, NULL, Z, X, y, &o, &l2, NULL, g2, NULL), 0);
  assert_true(l1 == l2);
  assert_memory_equal(g1, g2, sizeof(double) * p.n);
  pool_destroy(pool);
  tl_free(Z), tl_free(th), tl_free(g1), tl_free(g2);
  qa_params_free(&p);
}

/* The fit's float32 batched gradient (qa_grad32) against the double one the
 * gradient checks trust, for all six aggregators, simplex and free, with the
 * penalty and (local) dropout; and bit-identical with and without a pool.
 * Sizes make the float products large enough to be cut into chunks. */
static void grad32_one(qa_scope sc, qa_granularity g, int simplex, double lambda, pool_t *pool) {
  static const double lv[11] = {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95};
  enum { M = 4, K = 11, D = 5, N = 300 };
  float *Z = tl_malloc(sizeof(float) * N * M * K), X[N * D], y[N];
  for (int i = 0; i < N * M * K; i++) Z[i] = (float)nrand();
  for (int i = 0; i < N * D; i++) X[i] = (float)nrand();
  for (int i = 0; i < N; i++) y[i] = (float)nrand();
  qa_spec s = mkspec(g, sc, simplex, M, K, lv, D, 16, 3);
  qa_params p;
  assert_int_equal(qa_params_init(&p, &s, 3, NULL), 0);
  int64_t P = p.n, rows[N];
  for (int i = 0; i < N; i++) rows[i] = (i * 7) % N;
  double *th = tl_malloc(sizeof(double) * P), *gd = tl_malloc(sizeof(double) * P),
         *gf = tl_malloc(sizeof(double) * P), *gp = tl_malloc(sizeof(double) * P);
  random_theta(&s, &p, th);
  qa_loss_opts o = {
      .lambda = lambda, .margin = 0.05, .dropout = sc == QA_LOCAL ? 0.25 : 0.0, .dropout_seed = 17};
  double ld, pd, lf, pf, lp, pp;
  ts_err err;
  assert_int_equal(qa_loss_grad(NULL, &s, th, N, rows, Z, X, y, &o, &ld, &pd, gd, &err), 0);
  qa_grad32 *g32;
  assert_int_equal(qa_grad32_new(&g32, &s, N, &err), 0);
  assert_int_equal(qa_grad32_run(g32, NULL, th, N, rows, Z, X, y, &o, &lf, &pf, gf, &err), 0);
  assert_int_equal(qa_grad32_run(g32, pool, th, N, rows, Z, X, y, &o, &lp, &pp, gp, &err), 0);
  assert_true(lf == lp && pf == pp);
  assert_memory_equal(gf, gp, sizeof(double) * P);
  assert_true(fabs(lf - ld) <= 1e-5 * fabs(ld));
  assert_true(fabs(pf - pd) <= 1e-5 * fabs(pd));
  double big = 0;
  for (int64_t i = 0; i < P; i++) big = fmax(big, fabs(gd[i]));
  assert_true(big > 0);
  for (int64_t i = 0; i < P; i++)
    if (!(fabs(gf[i] - gd[i]) <= 2e-4 * big + 1e-7))
      fail_msg("%s %s simplex=%d lambda=%g: grad[%lld] float32 %.9g double %.9g (max %g)",
               sc ? "local" : "global", qa_granularity_name(g), simplex, lambda, (long long)i,
               gf[i], gd[i], big);
  /* a batch larger than the handle's room is refused */
  assert_int_equal(qa_grad32_run(g32, NULL, th, N + 1, NULL, Z, X, y, &o, &lf, NULL, NULL, &err),
                   -TS_EINVAL);
  qa_grad32_free(g32);
  tl_free(Z), tl_free(th), tl_free(gd), tl_free(gf), tl_free(gp);
  qa_params_free(&p);
}

static void test_grad32_matches_double(void **st) {
  (void)st;
  pool_t *pool;
  assert_int_equal(pool_create(&pool, 2, 0), 0);
  for (int sc = 0; sc < 2; sc++)
    for (int g = 0; g < 3; g++)
      for (int simplex = 0; simplex < 2; simplex++)
        for (int pen = 0; pen < 2; pen++)
          grad32_one((qa_scope)sc, (qa_granularity)g, simplex, pen ? 0.7 : 0.0, pool);
  pool_destroy(pool);
}

static void test_spec_errors(void **st) {
  (void)st;
  ts_err err;
  double bad[3] = {0.5, 0.25, 0.75};
  qa_spec s = mkspec(QA_COARSE, QA_GLOBAL, 1, 2, 3, bad, 0, 0, 0);
  assert_int_equal(qa_spec_check(&s, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "increase"));
  s = mkspec(QA_COARSE, QA_LOCAL, 1, 2, 3, LV3, 0, 4, 2);
  assert_int_equal(qa_spec_check(&s, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "features"));
  s = mkspec(QA_COARSE, QA_LOCAL, 1, 2, 3, LV3, 2, 4, 2);
  qa_params p;
  assert_int_equal(qa_params_init(&p, &s, 1, NULL), 0);
  float q[3];
  assert_int_equal(qa_forward(NULL, &s, &p, 1, Z1, NULL, q, &err), -TS_EINVAL);
  /* parameters of another spec are refused by name */
  qa_spec other = s;
  other.hidden = 5;
  qa_infer f;
  assert_int_equal(qa_infer_init(&f, &other, &p, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "aggregator.layers.0.weight"));
  qa_params_free(&p);
  /* Allocation failure is an error value, not a crash. */
  tl_mem_fail_after(0);
  assert_int_equal(qa_params_init(&p, &s, 1, &err), -TS_ENOMEM);
  tl_mem_fail_reset();
}

/* ------------------------------------------------------------ monotone */

static double brute_isotonic_at(const double *y, int n, int i) {
  double best = -INFINITY;
  for (int j = 0; j <= i; j++) {
    double mn = INFINITY;
    for (int k = i; k < n; k++) {
      double s = 0;
      for (int t = j; t <= k; t++) s += y[t];
      s /= (k - j + 1);
      if (s < mn) mn = s;
    }
    if (mn > best) best = mn;
  }
  return best;
}

static void test_pav_brute_force(void **st) {
  (void)st;
  for (int trial = 0; trial < 2000; trial++) {
    int n = 1 + (int)(urand() * 12);
    double y[12], v[12];
    for (int i = 0; i < n; i++) y[i] = v[i] = urand() < 0.2 ? floor(nrand() * 2) : nrand();
    qa_isotonic(n, v);
    for (int i = 0; i < n; i++) {
      double want = brute_isotonic_at(y, n, i);
      if (fabs(v[i] - want) > 1e-12)
        fail_msg("trial %d n %d i %d: %.15g vs %.15g", trial, n, i, v[i], want);
      if (i) assert_true(v[i] >= v[i - 1]);
    }
  }
}

static void test_sort_isotonic_never_raise_wis(void **st) {
  (void)st;
  double lv[11];
  for (int trial = 0; trial < 5000; trial++) {
    int h = 1 + (int)(urand() * 5), K = 2 * h + 1;
    for (int i = 0; i < h; i++) {
      lv[i] = 0.05 + 0.45 * i / h;
      lv[K - 1 - i] = 1.0 - lv[i];
    }
    lv[h] = 0.5;
    float q[11], qs[11], qi[11];
    for (int k = 0; k < K; k++) q[k] = qs[k] = qi[k] = (float)(nrand() + 0.3 * k);
    double y = 1.5 * nrand() + 0.5 * h;
    assert_int_equal(qa_monotone_apply(QA_MONO_SORT, K, h, qs, NULL), 0);
    assert_int_equal(qa_monotone_apply(QA_MONO_ISOTONIC, K, h, qi, NULL), 0);
    double w = qa_wis_pinball(K, lv, q, y);
    double ws = qa_wis_pinball(K, lv, qs, y), wi = qa_wis_pinball(K, lv, qi, y);
    if (ws > w + 1e-6 * (1 + w) || wi > w + 1e-6 * (1 + w))
      fail_msg("trial %d: WIS %g, after sort %g, after isotonic %g", trial, w, ws, wi);
    for (int k = 1; k < K; k++) assert_true(qs[k] >= qs[k - 1] && qi[k] >= qi[k - 1]);
  }
}

static void test_median_anchored_hand(void **st) {
  (void)st;
  float a[7] = {3, 1, 2, 0, 5, 4, 6};
  double wa[7] = {0, 0, 0, 0, 5, 5, 6};
  assert_int_equal(qa_monotone_apply(QA_MONO_MEDIAN, 7, 3, a, NULL), 0);
  check_row(a, wa, 7, 0);
  float b[5] = {1, 3, 2, 4, 3.5f};
  double wb[5] = {1, 2, 2, 4, 4};
  assert_int_equal(qa_monotone_apply(QA_MONO_MEDIAN, 5, 2, b, NULL), 0);
  check_row(b, wb, 5, 0);
  ts_err err;
  assert_int_equal(qa_monotone_apply(QA_MONO_MEDIAN, 5, -1, b, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "median"));
  float Q[10] = {1, 3, 2, 4, 3.5f, 3, 1, 2, 0, 5};
  assert_int_equal(qa_monotone_rows(NULL, QA_MONO_ISOTONIC, 2, 5, 2, Q, NULL), 0);
  double w0[5] = {1, 2.5, 2.5, 3.75, 3.75}, w1[5] = {1.5, 1.5, 1.5, 1.5, 5};
  check_row(Q, w0, 5, 1e-6);
  check_row(Q + 5, w1, 5, 1e-6);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_forward_global_hand),
      cmocka_unit_test(test_free_init_is_average),
      cmocka_unit_test(test_forward_local_hand),
      cmocka_unit_test(test_forward_float_matches_double),
      cmocka_unit_test(test_gradcheck_global),
      cmocka_unit_test(test_gradcheck_local),
      cmocka_unit_test(test_penalty_hand),
      cmocka_unit_test(test_grad_pool_deterministic),
      cmocka_unit_test(test_grad32_matches_double),
      cmocka_unit_test(test_spec_errors),
      cmocka_unit_test(test_pav_brute_force),
      cmocka_unit_test(test_sort_isotonic_never_raise_wis),
      cmocka_unit_test(test_median_anchored_hand),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
