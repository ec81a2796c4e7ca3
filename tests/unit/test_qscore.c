/* test_qscore.c - pinball, interval score and WIS against hand values, the
 * two WIS formulas against each other, the central-interval finder, the
 * metrics routine, and conformal calibration (hand ranks, the infinite
 * case, and coverage on exchangeable data over many repetitions). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/rng.h"

#include "../../daemon/methods/qagg.h"

static uint64_t rs = 777;
static double urand(void) {
  return rng_unif01(&rs);
}
static double nrand(void) {
  return rng_normal(&rs);
}

#define NEAR(a, b, tol) assert_true(fabs((double)(a) - (double)(b)) <= (tol))

static void test_pinball_is_hand(void **st) {
  (void)st;
  NEAR(qa_pinball(0.1, 1.0, 3.0), 1.8, 1e-12);
  NEAR(qa_pinball(0.1, 1.0, 0.0), 0.1, 1e-12);
  NEAR(qa_pinball(0.5, 2.0, 2.0), 0.0, 0);
  NEAR(qa_interval_score(0.2, 1, 3, 2.0), 2.0, 1e-12);
  NEAR(qa_interval_score(0.2, 1, 3, 0.0), 12.0, 1e-12);
  NEAR(qa_interval_score(0.2, 1, 3, 4.5), 17.0, 1e-12);
}

static void test_wis_hand(void **st) {
  (void)st;
  double lv[3] = {0.25, 0.5, 0.75};
  float q[3] = {1, 2, 3};
  int lo[2], hi[2], n, med;
  double a[2];
  assert_int_equal(qa_central_intervals(3, lv, lo, hi, a, &n, &med, NULL), 0);
  assert_int_equal(n, 1);
  assert_int_equal(med, 1);
  /* (1/1.5) (0.5 * 2 + 0.25 * (2 + 4 * 1)) = 5/3 */
  NEAR(qa_wis_bracher(n, lo, hi, a, med, q, 4.0), 5.0 / 3.0, 1e-12);
  /* 2/3 (0.25 * 3 + 0.5 * 2 + 0.75 * 1) */
  NEAR(qa_wis_pinball(3, lv, q, 4.0), 5.0 / 3.0, 1e-12);
}

static void test_central_intervals(void **st) {
  (void)st;
  double lv[99];
  for (int i = 0; i < 99; i++) lv[i] = 0.01 * (i + 1); /* not exact in binary */
  int lo[50], hi[50], n, med;
  double a[50];
  assert_int_equal(qa_central_intervals(99, lv, lo, hi, a, &n, &med, NULL), 0);
  assert_int_equal(n, 49);
  assert_int_equal(med, 49);
  assert_int_equal(lo[0], 0);
  assert_int_equal(hi[0], 98);
  NEAR(a[0], 0.02, 1e-12);
  assert_int_equal(lo[48], 48);
  assert_int_equal(hi[48], 50);
  double odd[5] = {0.1, 0.3, 0.5, 0.8, 0.9};
  assert_int_equal(qa_central_intervals(5, odd, lo, hi, a, &n, &med, NULL), 0);
  assert_int_equal(n, 1);
  assert_int_equal(lo[0], 0);
  assert_int_equal(hi[0], 4);
  assert_int_equal(med, 2);
  double nomed[4] = {0.1, 0.2, 0.8, 0.9};
  assert_int_equal(qa_central_intervals(4, nomed, lo, hi, a, &n, &med, NULL), 0);
  assert_int_equal(n, 2);
  assert_int_equal(med, -1);
  assert_int_equal(lo[0], 0);
  assert_int_equal(hi[0], 3);
  NEAR(a[1], 0.4, 1e-12);
}

static void test_wis_formulas_agree(void **st) {
  (void)st;
  for (int trial = 0; trial < 3000; trial++) {
    int h = 1 + (int)(urand() * 10), K = 2 * h + 1;
    double lv[21];
    for (int i = 0; i < h; i++) {
      lv[i] = 0.01 + 0.48 * urand() * (i + 1) / (h + 1);
    }
    /* strictly increasing lower half */
    for (int i = 1; i < h; i++)
      if (lv[i] <= lv[i - 1]) lv[i] = lv[i - 1] + 1e-3;
    for (int i = 0; i < h; i++) lv[K - 1 - i] = 1.0 - lv[i];
    lv[h] = 0.5;
    float q[21];
    for (int k = 0; k < K; k++) q[k] = (float)(2 * nrand());
    double y = 2 * nrand();
    int lo[11], hi[11], n, med;
    double a[11];
    assert_int_equal(qa_central_intervals(K, lv, lo, hi, a, &n, &med, NULL), 0);
    assert_int_equal(n, h);
    double b = qa_wis_bracher(n, lo, hi, a, med, q, y), p = qa_wis_pinball(K, lv, q, y);
    if (fabs(b - p) > 1e-9 * (1 + b))
      fail_msg("trial %d: bracher %.15g pinball %.15g", trial, b, p);
  }
}

static void test_metrics_hand(void **st) {
  (void)st;
  double lv[3] = {0.25, 0.5, 0.75};
  float Q[6] = {1, 2, 3, 0, 1, 2};
  float y[2] = {4, 1.5f};
  qa_metrics m;
  assert_int_equal(qa_metrics_compute(3, lv, 2, Q, y, &m, NULL), 0);
  assert_int_equal(m.n_int, 1);
  NEAR(m.nominal[0], 0.5, 1e-12);
  NEAR(m.coverage[0], 0.5, 1e-12);
  /* row 0: IS = 6; row 1: IS = 2 */
  NEAR(m.interval_score[0], 4.0, 1e-12);
  /* row 0 pinball sum 2.5; row 1: .25*1.5 + .5*.5 + .25*.5 = .75 */
  NEAR(m.mean_pinball, (2.5 + 0.75) / 6.0, 1e-12);
  /* WIS = 2/3 * pinball sum per row */
  NEAR(m.wis, (2.0 / 3.0) * (2.5 + 0.75) / 2.0, 1e-12);
  qa_metrics_free(&m);
  double nomed[2] = {0.1, 0.9};
  assert_int_equal(qa_metrics_compute(2, nomed, 2, Q, y, &m, NULL), 0);
  assert_true(isnan(m.wis));
  qa_metrics_free(&m);
}

static void test_cqr_hand(void **st) {
  (void)st;
  double lv[3] = {0.25, 0.5, 0.75};
  /* intervals [0, 2] for every row; y = 3, -0.5, 1, 2.25 -> E = 1, .5, -1, .25 */
  float Q[12] = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2};
  float y[4] = {3, -0.5f, 1, 2.25f};
  double lo[3], up[3];
  /* alpha 0.5: rank ceil(0.5 * 5) = 3 -> sorted (-1, .25, .5, 1) -> 0.5 */
  assert_int_equal(qa_cqr_fit(QA_CQR_SYMMETRIC, 3, lv, 4, Q, y, 0, lo, up, NULL), 0);
  NEAR(lo[0], 0.5, 1e-12);
  NEAR(up[2], 0.5, 1e-12);
  NEAR(lo[1] + up[1] + lo[2] + up[0], 0.0, 0);
  /* asymmetric: rank ceil(.75 * 5) = 4: lower side q_lo - y = (-3, .5, -1, -2.25) -> .5;
   * upper side y - q_hi = (1, -2.5, -1, .25) -> 1 */
  assert_int_equal(qa_cqr_fit(QA_CQR_ASYMMETRIC, 3, lv, 4, Q, y, 0, lo, up, NULL), 0);
  NEAR(lo[0], 0.5, 1e-12);
  NEAR(up[2], 1.0, 1e-12);
  /* per-quantile: tau .75 -> rank ceil(.75 * 5) = 4 of y - q = 1 -> same 1;
   * tau .25 -> rank 4 of q - y -> .5; the median untouched */
  assert_int_equal(qa_cqr_fit(QA_CQR_PER_QUANTILE, 3, lv, 4, Q, y, 0, lo, up, NULL), 0);
  NEAR(lo[0], 0.5, 1e-12);
  NEAR(up[2], 1.0, 1e-12);
  NEAR(lo[1], 0.0, 0);
  NEAR(up[1], 0.0, 0);
  float R[3] = {0, 1, 2};
  qa_cqr_apply(3, lo, up, 1, R);
  NEAR(R[0], -0.5, 1e-7);
  NEAR(R[1], 1.0, 0);
  NEAR(R[2], 3.0, 1e-7);
}

static void test_cqr_rank_rounding_and_inf(void **st) {
  (void)st;
  double lv[2] = {0.1, 0.9}; /* alpha = 0.2 */
  float Q[18], y[9];
  for (int i = 0; i < 9; i++) {
    Q[2 * i] = 0;
    Q[2 * i + 1] = 0;
    y[i] = (float)(i + 1); /* E = 1..9 */
  }
  double lo[2], up[2];
  /* 0.8 * 10 is 8.000000000000002 in binary: the rank is still 8 */
  assert_int_equal(qa_cqr_fit(QA_CQR_SYMMETRIC, 2, lv, 9, Q, y, 0, lo, up, NULL), 0);
  NEAR(lo[0], 8.0, 0);
  NEAR(up[1], 8.0, 0);
  ts_err err;
  /* n = 3: rank ceil(0.8 * 4) = 4 > 3 */
  assert_int_equal(qa_cqr_fit(QA_CQR_SYMMETRIC, 2, lv, 3, Q, y, 0, lo, up, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "n=3"));
  assert_int_equal(qa_cqr_fit(QA_CQR_SYMMETRIC, 2, lv, 3, Q, y, 1, lo, up, &err), 0);
  assert_true(isinf(lo[0]) && lo[0] > 0);
  assert_true(isinf(up[1]) && up[1] > 0);
  double nopair[2] = {0.1, 0.5};
  assert_int_equal(qa_cqr_fit(QA_CQR_SYMMETRIC, 2, nopair, 9, Q, y, 0, lo, up, &err), -TS_EINVAL);
  qa_cqr_mode m;
  assert_int_equal(qa_cqr_mode_from_name(qa_cqr_mode_name(QA_CQR_ASYMMETRIC), &m), 0);
  assert_int_equal(m, QA_CQR_ASYMMETRIC);
}

/* Exchangeable data, a deliberately wrong predictor: the calibrated
 * coverage averages to >= 1 - alpha within sampling error and at most
 * 1 - alpha + 1/(n+1) plus sampling error. */
static void test_cqr_coverage(void **st) {
  (void)st;
  double lv[3] = {0.1, 0.5, 0.9};
  enum { NC = 49, NT = 20, REPS = 2000 };
  float Q[(NC + NT) * 3], y[NC + NT];
  for (int mode = 0; mode < 3; mode++) {
    double cov = 0, cov_hi = 0, cov_lo = 0;
    for (int r = 0; r < REPS; r++) {
      for (int i = 0; i < NC + NT; i++) {
        double x = urand() * 2 - 1;
        y[i] = (float)(x + (0.5 + fabs(x)) * nrand());
        Q[3 * i] = (float)(0.5 * x - 0.4);
        Q[3 * i + 1] = (float)(0.5 * x);
        Q[3 * i + 2] = (float)(0.5 * x + 0.4);
      }
      double lo[3], up[3];
      assert_int_equal(qa_cqr_fit((qa_cqr_mode)mode, 3, lv, NC, Q, y, 0, lo, up, NULL), 0);
      qa_cqr_apply(3, lo, up, NT, Q + 3 * NC);
      for (int i = NC; i < NC + NT; i++) {
        double l = Q[3 * i], u = Q[3 * i + 2];
        cov += (l <= y[i] && y[i] <= u);
        cov_hi += y[i] <= u;
        cov_lo += y[i] >= l;
      }
    }
    double n = (double)REPS * NT;
    cov /= n, cov_hi /= n, cov_lo /= n;
    print_message("CQR %s: coverage %.4f, P(y <= u) %.4f, P(y >= l) %.4f (nominal 0.8)\n",
                  qa_cqr_mode_name((qa_cqr_mode)mode), cov, cov_hi, cov_lo);
    double se = 0.0035;
    if (cov < 0.8 - 4 * se || cov > 0.8 + 1.0 / (NC + 1) + 4 * se)
      fail_msg("mode %s: coverage %.4f for nominal 0.8", qa_cqr_mode_name((qa_cqr_mode)mode), cov);
    if (mode != QA_CQR_SYMMETRIC) {
      /* each side on its own: P(y <= u) and P(y >= l) near 0.9 */
      assert_true(cov_hi > 0.9 - 4 * se && cov_hi < 0.9 + 1.0 / (NC + 1) + 4 * se);
      assert_true(cov_lo > 0.9 - 4 * se && cov_lo < 0.9 + 1.0 / (NC + 1) + 4 * se);
    }
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_pinball_is_hand),
      cmocka_unit_test(test_wis_hand),
      cmocka_unit_test(test_central_intervals),
      cmocka_unit_test(test_wis_formulas_agree),
      cmocka_unit_test(test_metrics_hand),
      cmocka_unit_test(test_cqr_hand),
      cmocka_unit_test(test_cqr_rank_rounding_and_inf),
      cmocka_unit_test(test_cqr_coverage),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
