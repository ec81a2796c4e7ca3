/* test_qlive.c - methods/qlive.h: the rolling tracker on hand-worked rows
 * (window roll-over included), adaptive conformal inference's update rule
 * and ranks by hand, its start equal to CQR's corrections, the long-run
 * coverage bound of Gibbs and Candes on a drifting stream (and a static
 * interval missing it), and refused inputs. */
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
#include "../../daemon/methods/qagg.h"
#include "../../daemon/methods/qlive.h"

#define NEAR(a, b, tol)                                                                \
  do {                                                                                 \
    double a_ = (a), b_ = (b);                                                         \
    if (!(fabs(a_ - b_) <= (tol))) fail_msg("%s = %.12g, expected %.12g", #a, a_, b_); \
  } while (0)

static const double LV[3] = {0.1, 0.5, 0.9};

/* Window 2, levels .1 .5 .9, q = (0, 1, 2):
 *   y = 1.5: inside; pinball (.1*1.5 + .5*.5 + .1*.5)/3 = .15;
 *            WIS = (.5|1.5-1| + .2/2 * IS) / 1.5, IS = 2 -> (.25 + .2)/1.5 = .3
 *   y = 3:   outside; pinball (.1*3 + .5*2 + .9*1)/3 = 2.2/3;
 *            IS = 2 + (2/.2)(1) = 12, WIS = (1 + .1*12)/1.5 = 2.2/1.5
 *   y = 0:   inside; pinball (0 + .5*1 + .1*2)/3 = .7/3; IS = 2, WIS = (.5 + .2)/1.5
 * after three rows the window holds the last two. */
static void test_track_hand(void **st) {
  (void)st;
  ql_track t;
  ts_err err = {0};
  assert_int_equal(ql_track_init(&t, 3, LV, 2, &err), 0);
  assert_int_equal(t.n_int, 1);
  double cov, pin, wis;
  ql_track_get(&t, &cov, &pin, &wis);
  assert_true(isnan(cov) && isnan(pin) && isnan(wis));
  float q[3] = {0, 1, 2};
  ql_track_add(&t, q, 1.5);
  ql_track_get(&t, &cov, &pin, &wis);
  NEAR(cov, 1.0, 0);
  NEAR(pin, 0.15, 1e-12);
  NEAR(wis, 0.3, 1e-12);
  ql_track_add(&t, q, 3.0);
  ql_track_get(&t, &cov, &pin, &wis);
  NEAR(cov, 0.5, 0);
  NEAR(pin, (0.15 + 2.2 / 3) / 2, 1e-12);
  NEAR(wis, (0.3 + 2.2 / 1.5) / 2, 1e-12);
  ql_track_add(&t, q, 0.0);
  ql_track_get(&t, &cov, &pin, &wis);
  NEAR(cov, 0.5, 0);
  NEAR(pin, (2.2 / 3 + 0.7 / 3) / 2, 1e-12);
  NEAR(wis, (2.2 / 1.5 + 0.7 / 1.5) / 2, 1e-12);
  assert_int_equal(t.total, 3);
  assert_int_equal(t.filled, 2);
  /* an unbounded interval: infinite loss while in the window, then gone */
  float inf[3] = {-INFINITY, 1, INFINITY};
  ql_track_add(&t, inf, 5.0);
  ql_track_get(&t, &cov, &pin, &wis);
  assert_true(isinf(pin));
  ql_track_add(&t, q, 1.5);
  ql_track_add(&t, q, 1.5);
  ql_track_get(&t, &cov, &pin, &wis);
  NEAR(pin, 0.15, 1e-12);
  NEAR(cov, 1.0, 0);
  ql_track_free(&t);
  assert_int_equal(ql_track_init(&t, 3, LV, 0, &err), -TS_EINVAL);
}

/* Nine calibration rows, q = (0, 1, 2), y = -2, -1, ..., 6: scores
 * max(0 - y, y - 2) = 2, 1, 0, -1, 0, 1, 2, 3, 4 -> sorted -1 0 0 1 1 2 2 3 4.
 * At a = .2: rank ceil(.8 * 10) = 8 -> 3. One miss with gamma .1: a_t =
 * .2 + .1 (.2 - 1) = .12, rank ceil(.88 * 10) = 9 -> 4; one more: .04 ->
 * rank 10 > 9: the largest score (finite) or +inf (allowed). A cover moves
 * a_t up by .1 * .2. */
static void test_aci_hand(void **st) {
  (void)st;
  enum { N = 9 };
  float Q[N * 3], y[N];
  for (int i = 0; i < N; i++) {
    Q[i * 3] = 0;
    Q[i * 3 + 1] = 1;
    Q[i * 3 + 2] = 2;
    y[i] = (float)(i - 2);
  }
  ql_aci a;
  ts_err err = {0};
  assert_int_equal(ql_aci_init(&a, 3, LV, N, Q, y, 100, 0.1, 0, &err), 0);
  assert_int_equal(a.n_int, 1);
  NEAR(ql_aci_width(&a, 0), 3.0, 0);
  /* the start is CQR's symmetric correction */
  double lo[3], hi[3], clo[3], chi[3];
  ql_aci_corrections(&a, lo, hi);
  assert_int_equal(qa_cqr_fit(QA_CQR_SYMMETRIC, 3, LV, N, Q, y, 0, clo, chi, &err), 0);
  for (int k = 0; k < 3; k++) {
    NEAR(lo[k], clo[k], 0);
    NEAR(hi[k], chi[k], 0);
  }
  float served[3] = {-3, 1, 5}; /* the interval served, [0 - 3, 2 + 3] */
  ql_aci_observe(&a, served, 6.0);
  NEAR(a.alpha_t[0], 0.12, 1e-12);
  NEAR(ql_aci_width(&a, 0), 4.0, 0);
  ql_aci_observe(&a, served, -7.0);
  NEAR(a.alpha_t[0], 0.04, 1e-12);
  NEAR(ql_aci_width(&a, 0), 4.0, 0); /* rank 10 > 9: the largest */
  assert_int_equal(a.misses[0], 2);
  ql_aci_observe(&a, served, 0.0);
  NEAR(a.alpha_t[0], 0.06, 1e-12);
  assert_int_equal(a.t, 3);
  /* clamped at 0 without infinite intervals */
  for (int i = 0; i < 10; i++) ql_aci_observe(&a, served, 100.0);
  NEAR(a.alpha_t[0], 0.0, 0);
  ql_aci_free(&a);
  assert_int_equal(ql_aci_init(&a, 3, LV, N, Q, y, 100, 0.1, 1, &err), 0);
  ql_aci_observe(&a, served, 6.0);
  ql_aci_observe(&a, served, 6.0);
  assert_true(isinf(ql_aci_width(&a, 0)));
  ql_aci_observe(&a, served, 6.0);
  NEAR(a.alpha_t[0], 0.2 - 3 * 0.08, 1e-12); /* below 0 when infinite is allowed */
  /* a_t >= 1: the smallest score */
  for (int i = 0; i < 100; i++) ql_aci_observe(&a, served, 0.0);
  assert_true(a.alpha_t[0] > 1);
  NEAR(ql_aci_width(&a, 0), -1.0, 0);
  /* the stored scores round trip, checked */
  ql_aci b;
  assert_int_equal(ql_aci_init_scores(&b, 3, LV, 1, N, a.ring, 0.1, 0, &err), 0);
  NEAR(ql_aci_width(&b, 0), 3.0, 0);
  ql_aci_free(&b);
  assert_int_equal(ql_aci_init_scores(&b, 3, LV, 2, N, a.ring, 0.1, 0, &err), -TS_EINVAL);
  float bad[N];
  memcpy(bad, a.ring, sizeof bad);
  bad[3] = NAN;
  assert_int_equal(ql_aci_init_scores(&b, 3, LV, 1, N, bad, 0.1, 0, &err), -TS_EINVAL);
  assert_int_equal(ql_aci_init(&b, 3, LV, N, Q, y, 100, 0.0, 0, &err), -TS_EINVAL);
  assert_int_equal(ql_aci_init(&b, 3, LV, 0, Q, y, 100, 0.1, 0, &err), -TS_EINVAL);
  double one[1] = {0.5};
  assert_int_equal(ql_aci_init(&b, 1, one, N, Q, y, 100, 0.1, 0, &err), -TS_EINVAL);
  ql_aci_free(&a);
}

/* The score window: the last n scores, kept sorted. Scores 2 1 0 -1 0 1 2
 * 3 4 (window 9); pushing rows with y = 10 (score 8) then y = -1 (score 1)
 * replaces the two oldest (2, 1): sorted -1 0 0 1 1 2 3 4 8, then the next
 * oldest (0) by 1: -1 0 1 1 1 2 3 4 8. A window of 4 keeps the last 4 rows. */
static void test_aci_window(void **st) {
  (void)st;
  enum { N = 9 };
  float Q[N * 3], y[N];
  for (int i = 0; i < N; i++) {
    Q[i * 3] = 0;
    Q[i * 3 + 1] = 1;
    Q[i * 3 + 2] = 2;
    y[i] = (float)(i - 2);
  }
  ql_aci a;
  ts_err err = {0};
  assert_int_equal(ql_aci_init(&a, 3, LV, N, Q, y, 100, 0.1, 0, &err), 0);
  ql_aci_push(&a, Q, 10.0);
  const float want1[N] = {-1, 0, 0, 1, 1, 2, 3, 4, 8};
  for (int i = 0; i < N; i++) NEAR(a.sorted[i], want1[i], 0);
  ql_aci_push(&a, Q, -1.0);
  const float want2[N] = {-1, 0, 0, 1, 1, 2, 3, 4, 8};
  for (int i = 0; i < N; i++) NEAR(a.sorted[i], want2[i], 0);
  ql_aci_push(&a, Q, -1.0);
  const float want3[N] = {-1, 0, 1, 1, 1, 2, 3, 4, 8};
  for (int i = 0; i < N; i++) NEAR(a.sorted[i], want3[i], 0);
  float order[N];
  ql_aci_scores_in_order(&a, 0, order);
  const float want_o[N] = {-1, 0, 1, 2, 3, 4, 8, 1, 1};
  for (int i = 0; i < N; i++) NEAR(order[i], want_o[i], 0);
  assert_int_equal(a.pushed, 3);
  ql_aci_push(&a, Q, 1e300); /* a score beyond FP32: skipped */
  assert_int_equal(a.pushed, 3);
  ql_aci_free(&a);
  /* random pushes: sorted stays the sorted ring */
  uint64_t r = 9;
  assert_int_equal(ql_aci_init(&a, 3, LV, N, Q, y, 4, 0.1, 0, &err), 0);
  assert_int_equal(a.n, 4);
  NEAR(a.ring[0], 1, 0); /* the last 4 rows: y = 3 .. 6, scores 1 .. 4 */
  for (int t = 0; t < 500; t++) {
    ql_aci_push(&a, Q, 6 * rng_unif01(&r) - 2);
    for (int i = 1; i < 4; i++) assert_true(a.sorted[i - 1] <= a.sorted[i]);
    float o[4], srt[4];
    ql_aci_scores_in_order(&a, 0, o);
    memcpy(srt, o, sizeof srt);
    for (int i = 0; i < 4; i++)
      for (int j = i + 1; j < 4; j++)
        if (srt[j] < srt[i]) {
          float x = srt[i];
          srt[i] = srt[j];
          srt[j] = x;
        }
    for (int i = 0; i < 4; i++) NEAR(srt[i], a.sorted[i], 0);
  }
  ql_aci_free(&a);
}

/* A stream whose noise doubles half-way, against quantiles fitted to the
 * first half (+-1.2816 sigma, the 80% interval): ACI, its scores following
 * the stream, brings the coverage of the second half to 0.8 (and holds the
 * Gibbs-Candes bound over the whole stream); the static CQR interval covers
 * about 48%. */
static void test_aci_drift(void **st) {
  (void)st;
  enum { NCAL = 1000, T = 20000 };
  const double z80 = 1.2815515655446004;
  float *Q = tl_malloc(sizeof(float) * NCAL * 3), *y = tl_malloc(sizeof(float) * NCAL);
  uint64_t r = 3;
  for (int i = 0; i < NCAL; i++) {
    Q[i * 3] = (float)-z80;
    Q[i * 3 + 1] = 0;
    Q[i * 3 + 2] = (float)z80;
    y[i] = (float)rng_normal(&r);
  }
  const double gamma = 0.01;
  ql_aci a;
  ts_err err = {0};
  assert_int_equal(ql_aci_init(&a, 3, LV, NCAL, Q, y, NCAL, gamma, 0, &err), 0);
  double w0 = ql_aci_width(&a, 0);
  int64_t miss2 = 0, stat2 = 0, miss_all = 0;
  for (int t = 0; t < T; t++) {
    double sd = t < T / 2 ? 1.0 : 2.0, yt = sd * rng_normal(&r);
    double w = ql_aci_width(&a, 0);
    float served[3] = {(float)(-z80 - w), 0, (float)(z80 + w)};
    int miss = !(served[0] <= yt && yt <= served[2]);
    miss_all += miss;
    if (t >= T / 2 + 2000) {
      miss2 += miss;
      stat2 += !(-z80 - w0 <= yt && yt <= z80 + w0);
    }
    ql_aci_observe(&a, served, yt);
    float raw[3] = {(float)-z80, 0, (float)z80};
    ql_aci_push(&a, raw, yt);
  }
  double n2 = T / 2 - 2000;
  NEAR(1 - miss2 / n2, 0.8, 0.02);
  assert_true(1 - stat2 / n2 < 0.6);
  /* Proposition 4.1: |mean err - a| <= (max(a_1, 1 - a_1) + gamma) / (gamma T) */
  assert_true(fabs((double)miss_all / T - 0.2) <= (0.8 + gamma) / (gamma * T));
  assert_int_equal(a.misses[0], miss_all);
  ql_aci_free(&a);
  tl_free(Q);
  tl_free(y);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_track_hand),
      cmocka_unit_test(test_aci_hand),
      cmocka_unit_test(test_aci_window),
      cmocka_unit_test(test_aci_drift),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
