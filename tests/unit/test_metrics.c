/* test_metrics.c - metrics.h against hand-worked values and a brute-force
 * pairwise AUC (the definition itself, O(N^2)), with many ties. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* cmocka needs the headers above included first */
#include <cmocka.h>

#include "../../daemon/base/rng.h"

#include "../../daemon/base/mem.h"
#include "../../daemon/methods/metrics.h"

#define NEAR(a, b, tol) assert_true(fabs((a) - (b)) <= (tol))

/* Independent AUC: count every positive/negative pair. */
static double brute_auc(int64_t N, const double *s, int stride, int col, const int32_t *lab,
                        int32_t cls) {
  double wins = 0, pairs = 0;
  for (int64_t i = 0; i < N; i++) {
    if (lab[i] != cls) continue;
    for (int64_t j = 0; j < N; j++) {
      if (lab[j] == cls) continue;
      double a = s[i * stride + col], b = s[j * stride + col];
      wins += a > b ? 1.0 : a == b ? 0.5 : 0.0;
      pairs += 1;
    }
  }
  return pairs ? wins / pairs : NAN;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double urand(void) {
  return rng_unif01(&rng_state);
}

static void test_binary_hand(void **state) {
  (void)state;
  /* y = .1 .4 .35 .8, t = 0 0 1 1.
   * log loss = -(ln .9 + ln .6 + ln .35 + ln .8)/4
   *          = (0.1053605 + 0.5108256 + 1.0498221 + 0.2231436)/4 = 0.4722880
   * AUC: positives .35 .8 vs negatives .1 .4: .35>.1, .35<.4, .8>.1, .8>.4 -> 3/4
   * at 0.5: predictions 0 0 0 1 -> accuracy 3/4; tp 1, fp 0, fn 1 -> F1 2/3 */
  double y[] = {0.1, 0.4, 0.35, 0.8};
  int32_t t[] = {0, 0, 1, 1};
  met_scores m;
  ts_err e;
  assert_int_equal(met_all(4, 1, y, t, 0.5, &m, &e), 0);
  assert_int_equal(m.n, 4);
  NEAR(m.log_loss, 0.4722880, 1e-6);
  NEAR(m.auc, 0.75, 1e-15);
  NEAR(m.accuracy, 0.75, 1e-15);
  NEAR(m.f1, 2.0 / 3.0, 1e-15);
}

static void test_binary_ties_threshold_inclusive(void **state) {
  (void)state;
  /* y = .5 .5 .5 .2, t = 1 0 1 0. Positives {.5, .5}, negatives {.5, .2}:
   * each positive ties .5 (half) and beats .2 -> (1.5 + 1.5) / 4 = 0.75.
   * p >= 0.5 is positive: predictions 1 1 1 0 -> accuracy 3/4, tp 2 fp 1 fn 0
   * -> F1 = 4/5. */
  double y[] = {0.5, 0.5, 0.5, 0.2};
  int32_t t[] = {1, 0, 1, 0};
  met_scores m;
  assert_int_equal(met_all(4, 1, y, t, 0.5, &m, NULL), 0);
  NEAR(m.auc, 0.75, 1e-15);
  NEAR(m.accuracy, 0.75, 1e-15);
  NEAR(m.f1, 0.8, 1e-15);
  /* A higher threshold moves the tied rows to negative: predictions all 0
   * -> accuracy 1/2, no true positives -> F1 0. */
  assert_int_equal(met_all(4, 1, y, t, 0.6, &m, NULL), 0);
  NEAR(m.accuracy, 0.5, 1e-15);
  NEAR(m.f1, 0.0, 0);
}

static void test_multiclass_hand(void **state) {
  (void)state;
  /* rows (label): [.7 .2 .1](0) [.2 .5 .3](1) [.3 .4 .3](2) [.1 .3 .6](2)
   * argmax 0 1 1 2 -> accuracy 3/4.
   * class 0: tp 1 fp 0 fn 0 -> F1 1; class 1: tp 1 fp 1 fn 0 -> 2/3;
   * class 2: tp 1 fp 0 fn 1 -> 2/3; macro F1 = 7/9.
   * log loss = -(ln .7 + ln .5 + ln .3 + ln .6)/4 = 2.7646205/4 = 0.6911551.
   * AUC class 0: .7 beats .2 .3 .1 -> 1; class 1: .5 beats .2 .4 .3 -> 1;
   * class 2: positives .3 .6, negatives .1 .3: 1 + .5 + 1 + 1 = 3.5/4 = .875;
   * macro (1 + 1 + .875)/3 = 0.9583333. */
  double y[] = {.7, .2, .1, .2, .5, .3, .3, .4, .3, .1, .3, .6};
  int32_t t[] = {0, 1, 2, 2};
  met_scores m;
  assert_int_equal(met_all(4, 3, y, t, 0.5, &m, NULL), 0);
  NEAR(m.accuracy, 0.75, 1e-15);
  NEAR(m.f1, 7.0 / 9.0, 1e-15);
  NEAR(m.log_loss, 0.6911551, 1e-6);
  NEAR(m.auc, 2.875 / 3.0, 1e-15);
}

static void test_auc_vs_bruteforce_ties(void **state) {
  (void)state;
  enum { N = 1500, C = 3 };
  double *s = malloc(sizeof(double) * N * C);
  int32_t *lab = malloc(sizeof(int32_t) * N);
  for (int round = 0; round < 4; round++) {
    int levels = round == 0 ? 3 : round == 1 ? 10 : round == 2 ? 50 : 100000;
    for (int64_t i = 0; i < N; i++) {
      lab[i] = (int32_t)(urand() * C);
      for (int c = 0; c < C; c++) {
        /* few distinct values -> many ties; slightly informative */
        double v = floor((urand() + 0.3 * (lab[i] == c)) / 1.3 * levels) / levels;
        if (round & 1) v = 4.0 * v - 2.0; /* scores of either sign (logits) */
        s[i * C + c] = v;
      }
    }
    double a;
    /* multi-class: macro over classes of the brute-force one-vs-rest AUC */
    assert_int_equal(met_auc(N, C, s, lab, &a, NULL), 0);
    double ref = 0;
    for (int c = 0; c < C; c++) ref += brute_auc(N, s, C, c, lab, c);
    NEAR(a, ref / C, 1e-12);
    /* binary: column 1 as the score, label 1 vs the rest as 0/1 */
    double *sb = malloc(sizeof(double) * N);
    int32_t *lb = malloc(sizeof(int32_t) * N);
    for (int64_t i = 0; i < N; i++) {
      sb[i] = s[i * C + 1];
      lb[i] = lab[i] == 1;
    }
    assert_int_equal(met_auc(N, 1, sb, lb, &a, NULL), 0);
    NEAR(a, brute_auc(N, sb, 1, 0, lb, 1), 1e-12);
    free(sb);
    free(lb);
  }
  free(s);
  free(lab);
}

static void test_auc_signed_zero_and_negatives(void **state) {
  (void)state;
  /* -0.0 and +0.0 are the same score (a tie); negative scores order below.
   * positives {0.0, -1.5, 2.0}, negatives {-0.0, -1.5, -3.0}:
   *   0.0 : ties -0.0 (.5), beats -1.5, -3.0       -> 2.5
   *   -1.5: ties -1.5 (.5), beats -3.0             -> 1.5
   *   2.0 : beats all three                        -> 3
   *   AUC = 7/9 */
  double y[] = {0.0, -0.0, -1.5, 2.0, -1.5, -3.0};
  int32_t t[] = {1, 0, 1, 1, 0, 0};
  double a;
  assert_int_equal(met_auc(6, 1, y, t, &a, NULL), 0);
  NEAR(a, 7.0 / 9.0, 1e-15);
  NEAR(a, brute_auc(6, y, 1, 0, t, 1), 1e-15);
}

static void test_auc_undefined_is_nan(void **state) {
  (void)state;
  double y[] = {0.2, 0.9, 0.4};
  int32_t t[] = {1, 1, 1};
  met_scores m;
  assert_int_equal(met_all(3, 1, y, t, 0.5, &m, NULL), 0);
  assert_true(isnan(m.auc));
  NEAR(m.accuracy, 1.0 / 3.0, 1e-15);
  /* 3 classes, class 2 never appears: macro over classes 0 and 1 only.
   * rows (label): [.5 .4 .1](1) [.3 .6 .1](1) [.6 .3 .1](0): class 0 positive
   * .6 vs negatives .5 .3 -> 1; class 1 positives .4 .6 vs negative .3 -> 1. */
  double y3[] = {.5, .4, .1, .3, .6, .1, .6, .3, .1};
  int32_t t3[] = {1, 1, 0};
  double a;
  assert_int_equal(met_auc(3, 3, y3, t3, &a, NULL), 0);
  NEAR(a, 1.0, 1e-15);
  assert_int_equal(met_all(0, 1, y, t, 0.5, &m, NULL), 0);
  assert_true(isnan(m.log_loss) && isnan(m.auc) && m.n == 0);
}

static void test_log_loss_clamp(void **state) {
  (void)state;
  /* p(true) = 0 is clamped to 1e-7: -ln(1e-7) = 16.118096 */
  double y[] = {1.0, 0.0};
  int32_t t[] = {0, 1};
  NEAR(met_log_loss(2, 1, y, t), -log(MET_EPS), 1e-9);
}

static void test_bad_inputs(void **state) {
  (void)state;
  double y[] = {0.1, 0.7, NAN};
  int32_t t[] = {0, 2, 1};
  met_scores m;
  ts_err e;
  assert_int_equal(met_all(3, 1, y, t, 0.5, &m, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 1"));
  t[1] = 1;
  assert_int_equal(met_all(3, 1, y, t, 0.5, &m, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 2"));
  int32_t t3[] = {0, 3};
  assert_int_equal(met_check_labels(2, 3, t3, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 1"));
  assert_non_null(strstr(e.msg, "[0, 3)"));
}

static void test_alloc_failure(void **state) {
  (void)state;
  double y[] = {0.1, 0.7, 0.4, 0.2, 0.3, 0.5};
  int32_t t[] = {0, 1, 1};
  double a;
  ts_err e;
  tl_mem_fail_after(0);
  int rc = met_auc(3, 1, y, t, &a, &e);
  tl_mem_fail_reset();
  assert_int_equal(rc, -TS_ENOMEM);
  double acc, f1;
  tl_mem_fail_after(0);
  rc = met_accuracy_f1(3, 2, y, t, 0.5, &acc, &f1, &e);
  tl_mem_fail_reset();
  assert_int_equal(rc, -TS_ENOMEM);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_binary_hand),
      cmocka_unit_test(test_binary_ties_threshold_inclusive),
      cmocka_unit_test(test_multiclass_hand),
      cmocka_unit_test(test_auc_vs_bruteforce_ties),
      cmocka_unit_test(test_auc_signed_zero_and_negatives),
      cmocka_unit_test(test_auc_undefined_is_nan),
      cmocka_unit_test(test_log_loss_clamp),
      cmocka_unit_test(test_bad_inputs),
      cmocka_unit_test(test_alloc_failure),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
