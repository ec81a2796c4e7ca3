/* test_sample.c - the token sampler against hand values and a brute-force
 * reference: greedy ties, each penalty, temperature, top-k, top-p and min-p
 * (empirical frequencies of seeded draws against the distribution worked
 * out in double with a full sort), reproducibility of seeds, log-softmax,
 * top ids and stop strings. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/rng.h"
#include "../../daemon/methods/sample.h"

#define NEAR(a, b, tol) assert_true(fabs((double)(a) - (double)(b)) <= (tol))

static void check_fails(smp_params p, const char *name) {
  ts_err e;
  assert_int_equal(smp_check(&p, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, name));
}

static void test_check_ranges(void **st) {
  (void)st;
  ts_err e;
  smp_params d = smp_defaults();
  assert_int_equal(smp_check(&d, &e), 0);
  smp_params p = d;
  p.temperature = -0.1;
  check_fails(p, "temperature");
  p = d;
  p.top_p = 0;
  check_fails(p, "top_p");
  p.top_p = 1.01;
  check_fails(p, "top_p");
  p = d;
  p.top_k = -1;
  check_fails(p, "top_k");
  p = d;
  p.min_p = 1.5;
  check_fails(p, "min_p");
  p = d;
  p.repetition_penalty = 0;
  check_fails(p, "repetition_penalty");
  p = d;
  p.presence_penalty = NAN;
  check_fails(p, "presence_penalty");
  p = d;
  p.frequency_penalty = 3;
  check_fails(p, "frequency_penalty");
}

static void test_greedy_and_ties(void **st) {
  (void)st;
  smp_state s;
  assert_int_equal(smp_init(&s, 5, 1, NULL), 0);
  smp_params p = smp_defaults();
  p.temperature = 0;
  float l[5] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  assert_int_equal(smp_next(&s, &p, l), 1); /* tie 1 and 3: the lower id */
  /* greedy draws nothing from the generator */
  uint64_t before = s.rng;
  smp_next(&s, &p, l);
  assert_true(s.rng == before);
  smp_free(&s);
}

static void test_repetition_penalty_hand(void **st) {
  (void)st;
  smp_state s;
  assert_int_equal(smp_init(&s, 3, 1, NULL), 0);
  smp_params p = smp_defaults();
  p.temperature = 0;
  p.repetition_penalty = 2.0;
  float l[3] = {2.0f, 1.5f, -1.0f};
  int32_t prompt[1] = {0};
  smp_observe_prompt(&s, prompt, 1);
  /* 2.0 / 2 = 1.0 < 1.5: id 1 wins */
  assert_int_equal(smp_next(&s, &p, l), 1);
  NEAR(s.work[0], 1.0, 0);
  NEAR(s.work[1], 1.5, 0);
  /* a negative logit is multiplied */
  smp_observe(&s, 2);
  smp_next(&s, &p, l);
  NEAR(s.work[2], -2.0, 0);
  smp_free(&s);
}

static void test_presence_frequency_hand(void **st) {
  (void)st;
  smp_state s;
  assert_int_equal(smp_init(&s, 3, 1, NULL), 0);
  smp_params p = smp_defaults();
  p.temperature = 0;
  p.presence_penalty = 0.5;
  p.frequency_penalty = 0.25;
  int32_t prompt[2] = {1, 1}; /* the prompt is not penalised by these two */
  smp_observe_prompt(&s, prompt, 2);
  smp_observe(&s, 0);
  smp_observe(&s, 0);
  smp_observe(&s, 2);
  float l[3] = {3.0f, 2.0f, 1.0f};
  int32_t t = smp_next(&s, &p, l);
  NEAR(s.work[0], 3.0 - 0.5 - 0.25 * 2, 1e-6); /* 2.0 */
  NEAR(s.work[1], 2.0, 0);
  NEAR(s.work[2], 1.0 - 0.5 - 0.25, 1e-6);
  assert_int_equal(t, 0); /* 2.0 ties 2.0: lower id */
  smp_free(&s);
}

/* The reference: the full distribution of one step in double, by a full
 * sort, after the same order of operations. */
static void reference_probs(const float *logits, int V, const smp_params *p, double *prob) {
  double *w = malloc(sizeof(double) * V);
  int *ord = malloc(sizeof(int) * V);
  double m = -INFINITY, z = 0;
  for (int i = 0; i < V; i++) {
    w[i] = (double)logits[i] / p->temperature;
    m = fmax(m, w[i]);
    ord[i] = i;
  }
  for (int i = 0; i < V; i++) z += exp(w[i] - m);
  for (int i = 0; i < V; i++) /* insertion sort: value desc, id asc */
    for (int j = i; j > 0 && (w[ord[j]] > w[ord[j - 1]]); j--) {
      int t = ord[j];
      ord[j] = ord[j - 1];
      ord[j - 1] = t;
    }
  int keep = p->top_k > 0 && p->top_k < V ? (int)p->top_k : V;
  if (p->top_p < 1) {
    double acc = 0;
    for (int i = 0; i < keep; i++) {
      acc += exp(w[ord[i]] - m) / z;
      if (acc >= p->top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  if (p->min_p > 0) {
    double thr = p->min_p * exp(w[ord[0]] - m) / z;
    int i = 1;
    while (i < keep && exp(w[ord[i]] - m) / z >= thr) i++;
    keep = i;
  }
  double tot = 0;
  for (int i = 0; i < V; i++) prob[i] = 0;
  for (int i = 0; i < keep; i++) tot += exp(w[ord[i]] - m);
  for (int i = 0; i < keep; i++) prob[ord[i]] = exp(w[ord[i]] - m) / tot;
  free(w);
  free(ord);
}

/* Seeded draws against the reference within 5 standard errors. */
static void check_frequencies(const float *logits, int V, smp_params p, int draws) {
  smp_state s;
  assert_int_equal(smp_init(&s, V, 12345, NULL), 0);
  double *prob = malloc(sizeof(double) * V);
  long *cnt = calloc(V, sizeof(long));
  reference_probs(logits, V, &p, prob);
  for (int i = 0; i < draws; i++) cnt[smp_next(&s, &p, logits)]++;
  for (int i = 0; i < V; i++) {
    double f = (double)cnt[i] / draws, se = sqrt(prob[i] * (1 - prob[i]) / draws);
    if (prob[i] == 0)
      assert_int_equal(cnt[i], 0);
    else
      assert_true(fabs(f - prob[i]) <= 5 * se + 1e-9);
  }
  free(prob);
  free(cnt);
  smp_free(&s);
}

static void test_filters_hand(void **st) {
  (void)st;
  float l[4] = {logf(0.1f), logf(0.2f), logf(0.3f), logf(0.4f)};
  smp_params p = smp_defaults();
  check_frequencies(l, 4, p, 100000); /* plain */
  p.top_p = 0.65;                     /* 0.4 + 0.3 reaches it: {3, 2} */
  double prob[4];
  reference_probs(l, 4, &p, prob);
  NEAR(prob[3], 4.0 / 7, 1e-6);
  NEAR(prob[2], 3.0 / 7, 1e-6);
  NEAR(prob[0] + prob[1], 0, 0);
  check_frequencies(l, 4, p, 100000);
  p = smp_defaults();
  p.top_k = 1;
  check_frequencies(l, 4, p, 1000); /* always 3 */
  p = smp_defaults();
  p.min_p = 0.6; /* thr 0.24: keeps 0.4 and 0.3 */
  reference_probs(l, 4, &p, prob);
  NEAR(prob[3], 4.0 / 7, 1e-6);
  check_frequencies(l, 4, p, 100000);
  p = smp_defaults();
  p.temperature = 2; /* p ~ sqrt(p0) */
  reference_probs(l, 4, &p, prob);
  double zs = sqrt(0.1) + sqrt(0.2) + sqrt(0.3) + sqrt(0.4);
  NEAR(prob[0], sqrt(0.1) / zs, 1e-6);
  check_frequencies(l, 4, p, 100000);
}

static void test_filters_random_against_reference(void **st) {
  (void)st;
  uint64_t r = 99;
  float l[64];
  for (int i = 0; i < 64; i++) l[i] = (float)(rng_unif01(&r) * 6 - 3);
  l[10] = l[20]; /* a tie */
  smp_params p = smp_defaults();
  p.temperature = 0.7;
  p.top_k = 12;
  p.top_p = 0.8;
  p.min_p = 0.05;
  check_frequencies(l, 64, p, 100000);
  p = smp_defaults();
  p.top_p = 0.5;
  check_frequencies(l, 64, p, 100000);
}

static void test_seed_reproducible(void **st) {
  (void)st;
  float l[50];
  uint64_t r = 5;
  for (int i = 0; i < 50; i++) l[i] = (float)rng_unif01(&r);
  smp_params p = smp_defaults();
  p.top_p = 0.9;
  smp_state a, b, c;
  smp_init(&a, 50, 42, NULL);
  smp_init(&b, 50, 42, NULL);
  smp_init(&c, 50, 43, NULL);
  int same = 1, diff = 0;
  for (int i = 0; i < 200; i++) {
    int32_t x = smp_next(&a, &p, l), y = smp_next(&b, &p, l), z = smp_next(&c, &p, l);
    same &= x == y;
    diff |= x != z;
  }
  assert_true(same);
  assert_true(diff);
  smp_free(&a);
  smp_free(&b);
  smp_free(&c);
}

static void test_log_softmax_and_top(void **st) {
  (void)st;
  float l[2] = {0.0f, logf(3.0f)}, lp[2];
  double lz = smp_log_softmax(l, 2, lp);
  NEAR(lz, log(4.0), 1e-6);
  NEAR(lp[0], log(0.25), 1e-6);
  NEAR(lp[1], log(0.75), 1e-6);
  float big[3] = {1000.0f, 999.0f, -1000.0f}, lpb[3];
  smp_log_softmax(big, 3, lpb);
  assert_true(isfinite(lpb[2]));
  NEAR(lpb[0], -log1p(exp(-1.0)), 1e-5);
  float x[6] = {1, 5, 3, 5, 0, 3};
  int32_t ids[6];
  assert_int_equal(smp_top_ids(x, 6, 4, ids), 4);
  assert_int_equal(ids[0], 1);
  assert_int_equal(ids[1], 3);
  assert_int_equal(ids[2], 2);
  assert_int_equal(ids[3], 5);
  assert_int_equal(smp_top_ids(x, 6, 10, ids), 6);
  assert_int_equal(ids[5], 4);
}

static void test_stop_strings(void **st) {
  (void)st;
  smp_stops s = {.n = 2, .s = {"\n\n", "END"}, .len = {2, 3}};
  assert_int_equal(smp_stop_find(&s, "abc", 3), -1);
  assert_int_equal(smp_stop_find(&s, "ab\n\ncEND", 9), 2);
  assert_int_equal(smp_stop_find(&s, "abENDx\n\n", 8), 2);
  /* held back: a trailing "\n" or "EN" may start a stop string */
  assert_int_equal(smp_stop_safe(&s, "hello\n", 6), 5);
  assert_int_equal(smp_stop_safe(&s, "helloEN", 7), 5);
  assert_int_equal(smp_stop_safe(&s, "helloE", 6), 5);
  assert_int_equal(smp_stop_safe(&s, "hello", 5), 5);
  smp_stops none = {.n = 0};
  assert_int_equal(smp_stop_safe(&none, "x\n", 2), 2);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_check_ranges),
      cmocka_unit_test(test_greedy_and_ties),
      cmocka_unit_test(test_repetition_penalty_hand),
      cmocka_unit_test(test_presence_frequency_hand),
      cmocka_unit_test(test_filters_hand),
      cmocka_unit_test(test_filters_random_against_reference),
      cmocka_unit_test(test_seed_reproducible),
      cmocka_unit_test(test_log_softmax_and_top),
      cmocka_unit_test(test_stop_strings),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
