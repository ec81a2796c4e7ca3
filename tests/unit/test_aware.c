/* test_aware.c - the AWARE-NET ensemble (aware.h): forward pass against
 * hand-worked values, gradient against central finite differences, input
 * validation messages, the fit on a synthetic problem with one informative
 * family, early stopping and allocation failures. */
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
#include "../../daemon/methods/aware.h"

#define NEAR(a, b, tol) assert_true(fabs((a) - (b)) <= (tol))

static uint64_t rng_state = 12345;
static double urand(void) {
  return rng_unif01(&rng_state);
}
static double nrand(void) {
  return rng_normal(&rng_state);
}

/* ---------- forward pass by hand ---------- */

static void test_forward_binary_hand(void **state) {
  (void)state;
  /* F = 3 families of 1, 3 and 2 members, binary logits, one row:
   *   family 0: sigmoid(ln 4) = 4/5 = 0.8                         P_0 = 0.8
   *   family 1: sigmoid(ln 3), sigmoid(0), sigmoid(-ln 3)
   *             = 0.75, 0.5, 0.25                -> mean           P_1 = 0.5
   *   family 2: sigmoid(ln 9) = 0.9, sigmoid(-ln 4) = 0.2 -> mean  P_2 = 0.55
   * theta = (ln 2, 0, 0): alpha = (2, 1, 1)/4 = (0.5, 0.25, 0.25)
   *   y = 0.5*0.8 + 0.25*0.5 + 0.25*0.55 = 0.4 + 0.125 + 0.1375 = 0.6625
   * uniform: y = (0.8 + 0.5 + 0.55)/3 = 0.6166667
   * label 1: L = -ln 0.6625 = 0.4117347
   *   dL/dtheta_f = -(1/y) alpha_f (P_f - y):
   *   f0: -0.5 *(0.8 -0.6625)/0.6625 = -0.1037736
   *   f1: -0.25*(0.5 -0.6625)/0.6625 =  0.0613208
   *   f2: -0.25*(0.55-0.6625)/0.6625 =  0.0424528 */
  int sizes[] = {1, 3, 2};
  aw_spec s = {.F = 3, .family_size = sizes, .n = 6, .C = 1, .input_logits = 1};
  float z[] = {logf(4), logf(3), 0, -logf(3), logf(9), -logf(4)};
  double P[3], y, theta[] = {log(2.0), 0, 0}, g[3];
  ts_err e;
  assert_int_equal(aw_family_probs(&s, 1, z, P, NULL, &e), 0);
  NEAR(P[0], 0.8, 1e-7);
  NEAR(P[1], 0.5, 1e-7);
  NEAR(P[2], 0.55, 1e-7);
  aw_combine(&s, 1, P, theta, &y);
  NEAR(y, 0.6625, 1e-7);
  aw_combine(&s, 1, P, NULL, &y);
  NEAR(y, 1.85 / 3, 1e-7);
  int32_t t = 1;
  NEAR(aw_loss_grad(&s, 1, P, &t, theta, 0.0, g), 0.4117347, 1e-6);
  NEAR(g[0], -0.1037736, 1e-6);
  NEAR(g[1], 0.0613208, 1e-6);
  NEAR(g[2], 0.0424528, 1e-6);

  /* The same members given as probabilities give the same P. */
  s.input_logits = 0;
  float p[] = {0.8f, 0.75f, 0.5f, 0.25f, 0.9f, 0.2f};
  assert_int_equal(aw_family_probs(&s, 1, p, P, NULL, &e), 0);
  NEAR(P[0], 0.8, 1e-7);
  NEAR(P[1], 0.5, 1e-7);
  NEAR(P[2], 0.55, 1e-7);
}

static void test_forward_3class_hand(void **state) {
  (void)state;
  /* F = 2 families of 2 and 1 members, C = 3 logits, two rows.
   * Row 0:
   *   member 0: softmax(0, 0, 0)        = (1/3, 1/3, 1/3)
   *   member 1: softmax(ln 2, 0, 0)     = (2, 1, 1)/4 = (1/2, 1/4, 1/4)
   *   family 0: mean = (5/12, 7/24, 7/24)
   *   member 2: softmax(0, ln 3, ln 6)  = (1, 3, 6)/10 = family 1 = (.1, .3, .6)
   *   theta = (0, ln 3): alpha = (1/4, 3/4)
   *   y = (5/48 + .075, 7/96 + .225, 7/96 + .45)
   *     = (0.1791667, 0.2979167, 0.5229167), summing to 1
   * Row 1: row 0's logits shifted by +50 per member (softmax is shift-free),
   *   so the same probabilities; checks the max-subtraction.
   * Labels (2, 0): L = -(ln 0.5229167 + ln 0.1791667)/2
   *   = (0.6483331 + 1.7194386)/2 = 1.1838859 */
  int sizes[] = {2, 1};
  aw_spec s = {.F = 2, .family_size = sizes, .n = 3, .C = 3, .input_logits = 1};
  float l2 = logf(2), l3 = logf(3), l6 = logf(6);
  float z[18] = {0, 0, 0, l2, 0, 0, 0, l3, l6};
  for (int k = 0; k < 9; k++) z[9 + k] = z[k] + 50.0f;
  double P[12], y[6], theta[] = {0, log(3.0)};
  assert_int_equal(aw_family_probs(&s, 2, z, P, NULL, NULL), 0);
  double want_P[6] = {5.0 / 12, 7.0 / 24, 7.0 / 24, .1, .3, .6};
  double want_y[3] = {0.1791667, 0.2979167, 0.5229167};
  for (int k = 0; k < 6; k++) {
    NEAR(P[k], want_P[k], 1e-7);
    NEAR(P[6 + k], want_P[k], 2e-5); /* float rounding of 50 + ln 6 */
  }
  aw_combine(&s, 2, P, theta, y);
  for (int c = 0; c < 3; c++) {
    NEAR(y[c], want_y[c], 1e-7);
    NEAR(y[3 + c], want_y[c], 2e-5);
  }
  int32_t t[] = {2, 0};
  NEAR(aw_loss_grad(&s, 2, P, t, theta, 0.0, NULL), 1.1838859, 2e-5);
}

/* ---------- gradient vs central finite differences ---------- */

static void gradcheck(int C, const int *sizes, int F, int B, double l2) {
  int n = 0;
  for (int f = 0; f < F; f++) n += sizes[f];
  aw_spec s = {.F = F, .family_size = sizes, .n = n, .C = C, .input_logits = 1};
  int Cc = aw_cc(&s);
  float *z = malloc(sizeof(float) * B * n * Cc);
  double *P = malloc(sizeof(double) * B * F * Cc);
  int32_t *t = malloc(sizeof(int32_t) * B);
  for (int k = 0; k < B * n * Cc; k++) z[k] = (float)(6.0 * urand() - 3.0);
  for (int b = 0; b < B; b++) t[b] = (int32_t)(urand() * (C < 2 ? 2 : C));
  assert_int_equal(aw_family_probs(&s, B, z, P, NULL, NULL), 0);
  double theta[8], g[8], h = 1e-5;
  for (int f = 0; f < F; f++) theta[f] = 2.0 * urand() - 1.0;
  aw_loss_grad(&s, B, P, t, theta, l2, g);
  for (int f = 0; f < F; f++) {
    double keep = theta[f];
    theta[f] = keep + h;
    double lp = aw_loss_grad(&s, B, P, t, theta, l2, NULL);
    theta[f] = keep - h;
    double lm = aw_loss_grad(&s, B, P, t, theta, l2, NULL);
    theta[f] = keep;
    double fd = (lp - lm) / (2 * h);
    double rel = fabs(fd - g[f]) / fmax(fabs(fd) + fabs(g[f]), 1e-8);
    if (rel >= 1e-4) print_error("C=%d f=%d grad %.10g fd %.10g rel %.3g\n", C, f, g[f], fd, rel);
    assert_true(rel < 1e-4);
  }
  free(z);
  free(P);
  free(t);
}

static void test_gradient_binary(void **state) {
  (void)state;
  int sizes[] = {1, 3, 2};
  gradcheck(1, sizes, 3, 64, 0.0);
  gradcheck(1, sizes, 3, 64, 0.3);
}

static void test_gradient_3class(void **state) {
  (void)state;
  int sizes[] = {2, 1, 3, 1};
  gradcheck(3, sizes, 4, 64, 0.0);
  gradcheck(3, sizes, 4, 64, 0.3);
}

static void test_clamp_flat(void **state) {
  (void)state;
  /* Every family certain and right: y = 1, the clamped loss is
   * -ln(1 - 1e-7) for every theta, so the gradient is exactly 0. Every
   * family certain and wrong: loss -ln(1e-7), gradient 0 as well. */
  int sizes[] = {1, 1};
  aw_spec s = {.F = 2, .family_size = sizes, .n = 2, .C = 1, .input_logits = 0};
  double P[] = {1.0, 1.0}, theta[] = {0.3, -0.2}, g[2];
  int32_t t = 1;
  NEAR(aw_loss_grad(&s, 1, P, &t, theta, 0, g), -log(1 - MET_EPS), 1e-15);
  assert_true(g[0] == 0.0 && g[1] == 0.0);
  t = 0;
  NEAR(aw_loss_grad(&s, 1, P, &t, theta, 0, g), -log(MET_EPS), 1e-12);
  assert_true(g[0] == 0.0 && g[1] == 0.0);
}

/* ---------- validation ---------- */

static void test_validation_messages(void **state) {
  (void)state;
  int sizes[] = {2, 3};
  const char *fam[] = {"xception", "effnet"};
  const char *mem[] = {"xc1", "xc2", "ef1", "ef2", "ef3"};
  aw_spec s = {.F = 2, .family_size = sizes, .n = 5, .C = 1, .input_logits = 1};
  float z[15];
  for (int k = 0; k < 15; k++) z[k] = 0.25f;
  double P[6];
  ts_err e;
  assert_int_equal(aw_validate(&s, 3, z, &e), 0);

  z[2 * 5 + 4] = NAN; /* row 2, member 4 */
  assert_int_equal(aw_validate(&s, 3, z, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 2"));
  assert_non_null(strstr(e.msg, "member 4"));
  assert_non_null(strstr(e.msg, "NaN"));
  assert_int_equal(aw_family_probs(&s, 3, z, P, NULL, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 2, member 4 (family 1, its member 2)"));

  z[2 * 5 + 4] = 0.25f;
  z[1 * 5 + 1] = -INFINITY; /* row 1, member 1 */
  s.family_names = fam;
  s.member_names = mem;
  assert_int_equal(aw_validate(&s, 3, z, &e), -TS_EINVAL);
  assert_string_equal(e.msg, "row 1, member 1 ('xc2', family 'xception'): logit is infinite");

  /* probabilities: out of range, then a finite logit that is fine as a logit */
  z[1 * 5 + 1] = 1.5f;
  assert_int_equal(aw_validate(&s, 3, z, &e), 0);
  s.input_logits = 0;
  assert_int_equal(aw_validate(&s, 3, z, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 1, member 1 ('xc2'"));
  assert_non_null(strstr(e.msg, "outside [0, 1]"));
  z[1 * 5 + 1] = -0.01f;
  assert_int_equal(aw_family_probs(&s, 3, z, P, NULL, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "outside [0, 1]"));
}

static void test_validation_class_rows(void **state) {
  (void)state;
  int sizes[] = {1, 1};
  aw_spec s = {.F = 2, .family_size = sizes, .n = 2, .C = 3, .input_logits = 0};
  float p[] = {.2f, .3f, .5f, .1f, .1f, .8f, /* row 0 */
               .2f, .3f, .5f, .3f, .3f, .3f /* row 1, member 1 sums to 0.9 */};
  ts_err e;
  assert_int_equal(aw_validate(&s, 2, p, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 1, member 1"));
  assert_non_null(strstr(e.msg, "sum to 0.9"));
  p[11] = .4f;
  assert_int_equal(aw_validate(&s, 2, p, &e), 0);
  p[3] = NAN; /* row 0, member 1, class 0 */
  assert_int_equal(aw_validate(&s, 2, p, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "row 0, member 1"));
  assert_non_null(strstr(e.msg, "class 0 probability is NaN"));
}

static void test_pool_matches_serial(void **state) {
  (void)state;
  /* 3-class logits, 20000 rows over a 2-thread pool: P bit-identical to the
   * serial pass; with bad values in two chunks the lowest row is named. */
  enum { B = 20000 };
  int sizes[] = {2, 3};
  aw_spec s = {.F = 2, .family_size = sizes, .n = 5, .C = 3, .input_logits = 1};
  float *z = malloc(sizeof(float) * B * 5 * 3);
  double *P1 = malloc(sizeof(double) * B * 2 * 3), *P2 = malloc(sizeof(double) * B * 2 * 3);
  for (int k = 0; k < B * 15; k++) z[k] = (float)(8.0 * urand() - 4.0);
  pool_t *pool;
  assert_int_equal(pool_create(&pool, 2, 0), 0);
  assert_int_equal(aw_family_probs(&s, B, z, P1, NULL, NULL), 0);
  assert_int_equal(aw_family_probs(&s, B, z, P2, pool, NULL), 0);
  assert_memory_equal(P1, P2, sizeof(double) * B * 2 * 3);
  z[(17000 * 5 + 1) * 3 + 2] = NAN;
  z[(5000 * 5 + 3) * 3 + 0] = INFINITY;
  ts_err e;
  assert_int_equal(aw_family_probs(&s, B, z, P2, pool, &e), -TS_EINVAL);
  assert_string_equal(e.msg,
                      "row 5000, member 3 (family 1, its member 1): class 0 logit is infinite");
  pool_destroy(pool);
  free(z);
  free(P1);
  free(P2);
}

static void test_spec_check(void **state) {
  (void)state;
  int sizes[] = {2, 0};
  aw_spec s = {.F = 2, .family_size = sizes, .n = 2, .C = 1, .input_logits = 1};
  ts_err e;
  assert_int_equal(aw_spec_check(&s, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "family 1 has 0 members"));
  sizes[1] = 1;
  assert_int_equal(aw_spec_check(&s, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "3 members in all but n = 2"));
  s.n = 3;
  assert_int_equal(aw_spec_check(&s, &e), 0);
  s.C = 0;
  assert_int_equal(aw_spec_check(&s, &e), -TS_EINVAL);
  s.C = 1;
  s.F = 0;
  assert_int_equal(aw_spec_check(&s, &e), -TS_EINVAL);
}

/* ---------- fit ---------- */

/* One informative family (index `inf`), the others pure noise. Members of
 * the informative family see the label through noise of their own. */
typedef struct synth {
  aw_spec s;
  int sizes[3];
  int64_t N;
  double *P;
  int32_t *t;
} synth;

static void synth_make(synth *d, int C, int64_t N, int inf) {
  d->sizes[0] = d->sizes[1] = d->sizes[2] = 3;
  d->s = (aw_spec){.F = 3, .family_size = d->sizes, .n = 9, .C = C, .input_logits = 1};
  int Cc = aw_cc(&d->s), K = C < 2 ? 2 : C;
  d->N = N;
  float *z = malloc(sizeof(float) * N * 9 * Cc);
  d->P = malloc(sizeof(double) * N * 3 * Cc);
  d->t = malloc(sizeof(int32_t) * N);
  for (int64_t b = 0; b < N; b++) {
    int t = (int)(urand() * K);
    d->t[b] = t;
    for (int m = 0; m < 9; m++)
      for (int c = 0; c < Cc; c++) {
        double signal = 0.0;
        if (m / 3 == inf) signal = Cc == 1 ? (t ? 1.5 : -1.5) : (c == t ? 1.5 : 0.0);
        z[(b * 9 + m) * Cc + c] = (float)(signal + 1.5 * nrand());
      }
  }
  assert_int_equal(aw_family_probs(&d->s, N, z, d->P, NULL, NULL), 0);
  free(z);
}

static void synth_free(synth *d) {
  free(d->P);
  free(d->t);
}

static void fit_informative(int C, int inf) {
  synth d;
  synth_make(&d, C, 12000, inf);
  aw_fit_opts o;
  aw_fit_opts_default(&o);
  o.epochs = 40;
  o.learning_rate = 0.05;
  o.seed = 7;
  double theta[3] = {0, 0, 0}, alpha[3];
  aw_fit_report r;
  ts_err e;
  assert_int_equal(aw_fit(&d.s, d.N, d.P, d.t, &o, theta, &r, &e), 0);
  assert_int_equal(r.n_val, 2400);
  assert_int_equal(r.n_train, 9600);
  assert_true(r.monitored_validation);
  assert_true(r.best_epoch >= 1);
  aw_alpha(3, theta, alpha);
  /* alpha moves clearly toward the informative family */
  assert_true(alpha[inf] > 0.8);

  met_scores fam[3];
  aw_fit_metrics m = {.families = fam};
  assert_int_equal(aw_fit_metrics_compute(&d.s, d.N, d.P, d.t, &o, NULL, theta, 0.5, &m, &e), 0);
  assert_int_equal(m.validation.n, 2400);
  assert_int_equal(m.uniform.n, 2400);
  assert_int_equal(m.after.n, 9600);
  NEAR(m.validation.log_loss, r.best_loss, 1e-9); /* the kept theta is the best epoch's */
  assert_true(m.validation.log_loss < m.uniform.log_loss);
  assert_true(m.after.log_loss < m.before.log_loss);
  double best_auc = fmax(fam[0].auc, fmax(fam[1].auc, fam[2].auc));
  assert_true(best_auc == fam[inf].auc);
  assert_true(m.validation.auc >= best_auc - 0.005);
  assert_true(m.validation.accuracy > m.uniform.accuracy);
  /* "before" may be a served theta instead of the uniform one */
  aw_fit_metrics m2 = {.families = fam};
  assert_int_equal(aw_fit_metrics_compute(&d.s, d.N, d.P, d.t, &o, theta, theta, 0.5, &m2, &e), 0);
  assert_true(m2.before.log_loss == m2.after.log_loss && m2.before.auc == m2.after.auc);
  assert_int_equal(aw_eval_family(&d.s, d.P, d.t, NULL, 10, 3, 0.5, &m2.before, &e), -TS_EINVAL);
  synth_free(&d);
}

static void test_fit_binary_informative(void **state) {
  (void)state;
  fit_informative(1, 0);
}

static void test_fit_3class_informative(void **state) {
  (void)state;
  fit_informative(3, 2);
}

static int stop_at_3(void *arg, int epoch, double train, double val) {
  (void)train;
  (void)val;
  *(int *)arg = epoch;
  return epoch == 3 ? *((int *)arg + 1) : 0;
}

static void test_fit_early_stop_and_callbacks(void **state) {
  (void)state;
  synth d;
  synth_make(&d, 1, 3000, 1);
  aw_fit_opts o;
  aw_fit_opts_default(&o);
  o.epochs = 200;
  o.patience = 4;
  o.learning_rate = 0.3; /* large steps: the validation loss soon stops improving */
  o.seed = 3;
  double theta[3] = {0, 0, 0};
  aw_fit_report r;
  assert_int_equal(aw_fit(&d.s, d.N, d.P, d.t, &o, theta, &r, NULL), 0);
  assert_true(r.epochs_run < o.epochs);
  assert_int_equal(r.epochs_run, r.best_epoch + o.patience);
  assert_true(r.best_loss <= r.initial_loss);
  /* the returned theta is the best epoch's: its validation loss is best_loss */
  int64_t *perm = malloc(sizeof(int64_t) * d.N), nv;
  aw_split(d.N, o.validation_fraction, o.seed, perm, &nv);
  met_scores m;
  assert_int_equal(aw_eval(&d.s, d.P, d.t, perm, nv, theta, 0.5, &m, NULL), 0);
  NEAR(m.log_loss, r.best_loss, 1e-9);

  /* deterministic for a seed */
  double theta2[3] = {0, 0, 0};
  aw_fit_report r2;
  assert_int_equal(aw_fit(&d.s, d.N, d.P, d.t, &o, theta2, &r2, NULL), 0);
  assert_memory_equal(theta, theta2, sizeof theta);

  /* a callback that stops (> 0) keeps the best theta, one that abandons (< 0)
   * returns its status */
  int cb[2] = {0, 1};
  o.patience = 0;
  o.on_epoch = stop_at_3;
  o.on_epoch_arg = cb;
  memset(theta, 0, sizeof theta);
  assert_int_equal(aw_fit(&d.s, d.N, d.P, d.t, &o, theta, &r, NULL), 0);
  assert_int_equal(r.epochs_run, 3);
  cb[1] = -TS_ETIMEOUT;
  ts_err e;
  assert_int_equal(aw_fit(&d.s, d.N, d.P, d.t, &o, theta, &r, &e), -TS_ETIMEOUT);
  assert_non_null(strstr(e.msg, "after epoch 3"));

  /* no validation rows: the training loss is monitored */
  o.on_epoch = NULL;
  o.validation_fraction = 0;
  o.epochs = 5;
  assert_int_equal(aw_fit(&d.s, d.N, d.P, d.t, &o, theta, &r, NULL), 0);
  assert_int_equal(r.n_val, 0);
  assert_false(r.monitored_validation);
  free(perm);
  synth_free(&d);
}

static void test_fit_bad_input(void **state) {
  (void)state;
  int sizes[] = {1, 1};
  aw_spec s = {.F = 2, .family_size = sizes, .n = 2, .C = 1, .input_logits = 0};
  double P[] = {.2, .3, .6, .7, .4, .4};
  int32_t t[] = {0, 1, 2};
  double theta[2] = {0, 0};
  aw_fit_opts o;
  aw_fit_opts_default(&o);
  ts_err e;
  assert_int_equal(aw_fit(&s, 3, P, t, &o, theta, NULL, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "labels row 2"));
  t[2] = 1;
  o.validation_fraction = 1.0;
  assert_int_equal(aw_fit(&s, 3, P, t, &o, theta, NULL, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "validation_fraction"));
  aw_fit_opts_default(&o);
  o.learning_rate = 0;
  assert_int_equal(aw_fit(&s, 3, P, t, &o, theta, NULL, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "learning_rate"));
}

static void test_split(void **state) {
  (void)state;
  int64_t perm[101], nv;
  aw_split(101, 0.2, 9, perm, &nv);
  assert_int_equal(nv, 20);
  char seen[101] = {0};
  for (int i = 0; i < 101; i++) {
    assert_true(perm[i] >= 0 && perm[i] < 101 && !seen[perm[i]]);
    seen[perm[i]] = 1;
  }
  aw_split(2, 0.01, 9, perm, &nv);
  assert_int_equal(nv, 1);
  aw_split(1, 0.5, 9, perm, &nv);
  assert_int_equal(nv, 0);
  aw_split(10, 0.0, 9, perm, &nv);
  assert_int_equal(nv, 0);
}

static void test_alloc_failures(void **state) {
  (void)state;
  synth d;
  synth_make(&d, 3, 200, 0);
  aw_fit_opts o;
  aw_fit_opts_default(&o);
  o.epochs = 3;
  met_scores fam[3];
  aw_fit_metrics m = {.families = fam};
  int saw_fail = 0;
  for (long k = 0;; k++) {
    double theta[3] = {0, 0, 0};
    ts_err e;
    tl_mem_fail_after(k);
    int rc = aw_fit(&d.s, d.N, d.P, d.t, &o, theta, NULL, &e);
    if (!rc) rc = aw_fit_metrics_compute(&d.s, d.N, d.P, d.t, &o, NULL, theta, 0.5, &m, &e);
    tl_mem_fail_reset();
    if (rc == 0) break;
    assert_int_equal(rc, -TS_ENOMEM);
    saw_fail++;
  }
  assert_true(saw_fail >= 4);
  synth_free(&d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_forward_binary_hand),
      cmocka_unit_test(test_forward_3class_hand),
      cmocka_unit_test(test_gradient_binary),
      cmocka_unit_test(test_gradient_3class),
      cmocka_unit_test(test_clamp_flat),
      cmocka_unit_test(test_validation_messages),
      cmocka_unit_test(test_validation_class_rows),
      cmocka_unit_test(test_pool_matches_serial),
      cmocka_unit_test(test_spec_check),
      cmocka_unit_test(test_fit_binary_informative),
      cmocka_unit_test(test_fit_3class_informative),
      cmocka_unit_test(test_fit_early_stop_and_callbacks),
      cmocka_unit_test(test_fit_bad_input),
      cmocka_unit_test(test_split),
      cmocka_unit_test(test_alloc_failures),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
