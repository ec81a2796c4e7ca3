/* test_calib.c - methods/calib.h: temperature scaling (derivatives against
 * finite differences, the fit against a closed form and against an
 * independent golden-section search, tests/reference/calib_temperature.py)
 * and reliability bins / ECE on hand-worked values. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/base/rng.h"
#include "../../daemon/methods/calib.h"

#define NEAR(a, b, tol)                                                                \
  do {                                                                                 \
    double a_ = (a), b_ = (b);                                                         \
    if (!(fabs(a_ - b_) <= (tol))) fail_msg("%s = %.12g, expected %.12g", #a, a_, b_); \
  } while (0)

static const double YB[12] = {0.95, 0.9, 0.85, 0.8, 0.7, 0.65, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05};
static const int32_t LB[12] = {1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0};
static const double YM[9 * 3] = {0.7,  0.2, 0.1,  0.6, 0.3, 0.1, 0.2, 0.5,  0.3,
                                 0.1,  0.1, 0.8,  0.3, 0.4, 0.3, 0.5, 0.25, 0.25,
                                 0.05, 0.9, 0.05, 0.4, 0.4, 0.2, 0.2, 0.2,  0.6};
static const int32_t LM[9] = {0, 1, 1, 2, 0, 0, 1, 2, 2};

/* dL/du and d2L/du2 against central differences, binary and 3-class, at
 * several temperatures, on random probabilities and labels. */
static void test_gradient_check(void **st) {
  (void)st;
  uint64_t r = 7;
  enum { N = 50 };
  for (int C = 1; C <= 4; C += 3) {
    int Cc = C < 2 ? 1 : C;
    double y[N * 4], z[N * 4];
    int32_t lab[N];
    for (int i = 0; i < N; i++) {
      double s = 0;
      for (int c = 0; c < Cc; c++) s += (y[i * Cc + c] = 0.02 + rng_unif01(&r));
      if (C > 1)
        for (int c = 0; c < Cc; c++) y[i * Cc + c] /= s;
      else
        y[i] = y[i] / 1.03;
      lab[i] = (int32_t)(rng_unif01(&r) * (C < 2 ? 2 : C));
    }
    cal_logits(N, C, y, z);
    const double us[] = {-2.0, -0.5, 0.0, 0.3, 1.7};
    for (size_t k = 0; k < sizeof us / sizeof *us; k++) {
      double u = us[k], g, h, h_ = 1e-5, gp, gm;
      cal_temp_loss(N, C, z, lab, u, &g, &h);
      double lp = cal_temp_loss(N, C, z, lab, u + h_, &gp, NULL);
      double lm = cal_temp_loss(N, C, z, lab, u - h_, &gm, NULL);
      NEAR(g, (lp - lm) / (2 * h_), 1e-7 * (1 + fabs(g)));
      NEAR(h, (gp - gm) / (2 * h_), 1e-6 * (1 + fabs(h)));
    }
  }
}

/* A constant prediction 0.9 on rows 70% positive: sigmoid(ln 9 / T) = 0.7,
 * so T = ln 9 / ln(7/3) = 2.5932138862. */
static void test_closed_form(void **st) {
  (void)st;
  double y[10];
  int32_t lab[10];
  for (int i = 0; i < 10; i++) {
    y[i] = 0.9;
    lab[i] = i < 7;
  }
  cal_temp_report rep;
  ts_err err = {0};
  assert_int_equal(cal_temp_fit(10, 1, y, lab, 100, 1e-12, &rep, &err), 0);
  NEAR(rep.temperature, log(9.0) / log(7.0 / 3.0), 1e-8);
  assert_false(rep.at_bound);
  double p;
  cal_temp_apply(1, 1, y, rep.temperature, &p);
  NEAR(p, 0.7, 1e-9);
  /* the loss at the optimum: -(0.7 ln 0.7 + 0.3 ln 0.3) */
  NEAR(rep.loss_after, -(0.7 * log(0.7) + 0.3 * log(0.3)), 1e-12);
  assert_true(rep.loss_after < rep.loss_before);
}

/* Against the golden-section figures of tests/reference/calib_temperature.py. */
static void test_reference_fixture(void **st) {
  (void)st;
  cal_temp_report rep;
  ts_err err = {0};
  assert_int_equal(cal_temp_fit(12, 1, YB, LB, 100, 1e-12, &rep, &err), 0);
  NEAR(rep.temperature, 1.721944148320004, 1e-7);
  NEAR(rep.loss_after, 0.5828938872124172, 1e-12);
  NEAR(rep.loss_before, 0.6217963407268511, 1e-12);
  assert_int_equal(cal_temp_fit(9, 3, YM, LM, 100, 1e-12, &rep, &err), 0);
  NEAR(rep.temperature, 0.6105749318611381, 1e-7);
  NEAR(rep.loss_after, 0.6930347328895294, 1e-12);
  NEAR(rep.loss_before, 0.7332980574314025, 1e-12);
  assert_true(rep.iterations < 20);
}

/* Overconfident scores (logits three times the truth's) on many rows: the
 * fit finds T near 3. */
static void test_recovers_scale(void **st) {
  (void)st;
  enum { N = 20000 };
  double *y = tl_malloc(sizeof(double) * N);
  int32_t *lab = tl_malloc(sizeof(int32_t) * N);
  uint64_t r = 11;
  for (int i = 0; i < N; i++) {
    double z = 4 * rng_unif01(&r) - 2;
    lab[i] = rng_unif01(&r) < 1 / (1 + exp(-z));
    y[i] = 1 / (1 + exp(-3 * z));
  }
  cal_temp_report rep;
  ts_err err = {0};
  assert_int_equal(cal_temp_fit(N, 1, y, lab, 100, 1e-10, &rep, &err), 0);
  NEAR(rep.temperature, 3.0, 0.25);
  tl_free(y);
  tl_free(lab);
}

static void test_apply_and_bounds(void **st) {
  (void)st;
  double y = 0.9, p;
  cal_temp_apply(1, 1, &y, 2.0, &p);
  NEAR(p, 0.75, 1e-12); /* sigmoid(ln 9 / 2) = 3 / 4 */
  cal_temp_apply(1, 1, &y, 1.0, &p);
  NEAR(p, 0.9, 1e-12);
  double m[3] = {0.6, 0.3, 0.1}, q[3];
  cal_temp_apply(1, 3, m, 2.0, q);
  double s = sqrt(0.6) + sqrt(0.3) + sqrt(0.1);
  NEAR(q[0], sqrt(0.6) / s, 1e-12);
  NEAR(q[2], sqrt(0.1) / s, 1e-12);
  /* labels against the ranking: the best T is the largest allowed */
  double yb[4] = {0.9, 0.8, 0.2, 0.1};
  int32_t lb[4] = {0, 0, 1, 1};
  cal_temp_report rep;
  ts_err err = {0};
  assert_int_equal(cal_temp_fit(4, 1, yb, lb, 200, 1e-12, &rep, &err), 0);
  NEAR(rep.temperature, CAL_T_MAX, 1e-6);
  assert_true(rep.at_bound);
  /* bad input is refused by name */
  int32_t bad[4] = {0, 2, 1, 1};
  assert_int_equal(cal_temp_fit(4, 1, yb, bad, 10, 1e-9, &rep, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "row 1"));
  yb[2] = NAN;
  assert_int_equal(cal_temp_fit(4, 1, yb, lb, 10, 1e-9, &rep, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "row 2"));
  assert_int_equal(cal_temp_fit(0, 1, yb, lb, 10, 1e-9, &rep, &err), -TS_EINVAL);
}

/* Binary, 5 bins: confidences .9 (right), .8 (wrong), .7 (right: p .3 and
 * label 0), .55 (wrong). Bin 2 (.4, .6]: 1 row, conf .55, acc 0; bin 3
 * (.6, .8]: 2 rows, conf .75, acc .5; bin 4: 1 row, conf .9, acc 1.
 * ECE = (.55 + 2 * .25 + .1) / 4 = .2875, MCE = .55. */
static void test_reliability_hand(void **st) {
  (void)st;
  double y[4] = {0.9, 0.8, 0.3, 0.55};
  int32_t lab[4] = {1, 0, 0, 0};
  cal_bin b[5];
  double ece, mce;
  cal_reliability(4, 1, y, lab, 5, b, &ece, &mce);
  NEAR(ece, 0.2875, 1e-12);
  NEAR(mce, 0.55, 1e-12);
  assert_int_equal(b[0].count, 0);
  assert_true(isnan(b[0].confidence) && isnan(b[0].accuracy));
  assert_int_equal(b[2].count, 1);
  NEAR(b[2].confidence, 0.55, 1e-12);
  NEAR(b[2].accuracy, 0.0, 0);
  assert_int_equal(b[3].count, 2);
  NEAR(b[3].confidence, 0.75, 1e-12);
  NEAR(b[3].accuracy, 0.5, 1e-12);
  assert_int_equal(b[4].count, 1);
  /* 3 classes, 2 bins: rows (.5 .3 .2) label 0 -> conf .5 bin 0 right;
   * (.2 .7 .1) label 2 -> conf .7 bin 1 wrong; (.1 .1 .8) label 2 -> .8
   * bin 1 right. ECE = (1/3)|1 - .5| + (2/3)|.5 - .75| = 1/6 + 1/6 = 1/3. */
  double m[9] = {0.5, 0.3, 0.2, 0.2, 0.7, 0.1, 0.1, 0.1, 0.8};
  int32_t lm[3] = {0, 2, 2};
  cal_bin b2[2];
  cal_reliability(3, 3, m, lm, 2, b2, &ece, &mce);
  NEAR(ece, 1.0 / 3.0, 1e-12);
  NEAR(mce, 0.5, 1e-12);
  assert_int_equal(b2[1].count, 2);
  NEAR(b2[1].confidence, 0.75, 1e-12);
  /* a perfectly calibrated histogram: conf .75 with 3 of 4 right */
  double c[4] = {0.75, 0.75, 0.25, 0.25};
  int32_t lc[4] = {1, 1, 0, 1};
  cal_bin b3[15];
  cal_reliability(4, 1, c, lc, 15, b3, &ece, &mce);
  NEAR(ece, 0.0, 1e-12);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_gradient_check),    cmocka_unit_test(test_closed_form),
      cmocka_unit_test(test_reference_fixture), cmocka_unit_test(test_recovers_scale),
      cmocka_unit_test(test_apply_and_bounds),  cmocka_unit_test(test_reliability_hand),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
