/* test_jtext.c - JSON text with shortest round-trip doubles (daemon/base/jtext.h).
 *
 * Hand-checked texts (0.845 and 0.1 in their short form, 1/3 needing all 17
 * digits, integral reals keeping ".0"), a sweep of random doubles each of
 * which must read back bit-exactly in at most 17 digits and in no more digits
 * than the shortest precision that round-trips, and the structure (escapes,
 * sorted keys, indentation, nesting) read back by jansson as the same value. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../daemon/base/jtext.h"
#include "../../daemon/base/mem.h"

static char *dbl_text(double v) {
  sbuf b;
  sbuf_init(&b);
  jtext_double(&b, v);
  return sbuf_take(&b, NULL);
}

static void expect_text(double v, const char *want) {
  char *t = dbl_text(v);
  assert_string_equal(t, want);
  tl_free(t);
}

static void test_hand_checked(void **state) {
  (void)state;
  expect_text(0.845, "0.845");
  expect_text(0.1, "0.1");
  expect_text(0.3680, "0.368");
  expect_text(1.0 / 3.0, "0.3333333333333333");
  expect_text(0.1 + 0.2, "0.30000000000000004");
  expect_text(3.0, "3.0");
  expect_text(-2.0, "-2.0");
  expect_text(0.0, "0.0");
  expect_text(1e20, "1e+20");
  expect_text(1e-7, "1e-07");
  expect_text(0.84499999999999997, "0.845");
  expect_text(NAN, "null");
  expect_text(INFINITY, "null");
}

static int digits_of(const char *t) {
  int n = 0, started = 0;
  for (; *t && *t != 'e'; t++) {
    started |= *t >= '1' && *t <= '9';
    n += started && *t >= '0' && *t <= '9';
  }
  return n;
}

static void test_round_trip_sweep(void **state) {
  (void)state;
  uint64_t s = 0x9e3779b97f4a7c15u;
  for (int i = 0; i < 20000; i++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    double v;
    uint64_t bits = s;
    memcpy(&v, &bits, sizeof v);
    if (!isfinite(v)) continue;
    if (i % 2) v = (double)(s >> 11) / 9007199254740992.0 * pow(10, (int)(s % 21) - 10);
    char *t = dbl_text(v);
    assert_true(strtod(t, NULL) == v);
    /* no precision below the one used reads back: it is the shortest of %.15g..%.17g */
    size_t len = strlen(t);
    int p = digits_of(t) - (len > 2 && strcmp(t + len - 2, ".0") == 0); /* the ".0" we add */
    if (p > 15) {
      char shorter[400];
      snprintf(shorter, sizeof shorter, "%.*g", p - 1, v);
      assert_false(strtod(shorter, NULL) == v && digits_of(shorter) < p);
    }
    assert_true(p <= 17);
    tl_free(t);
  }
}

static void test_structure(void **state) {
  (void)state;
  json_t *j = json_pack("{s:f, s:[f, i, b, n], s:s, s:{}}", "zeta", 0.845, "alpha", 2.5, 7, 1,
                        "q\"uote\n", "tab\t\\", "empty");
  char *t = jtext_dumps(j, JT_COMPACT | JT_SORT_KEYS, NULL);
  assert_string_equal(t,
                      "{\"alpha\":[2.5,7,true,null],\"empty\":{},"
                      "\"q\\\"uote\\n\":\"tab\\u0009\\\\\",\"zeta\":0.845}");
  json_error_t e;
  json_t *back = json_loads(t, 0, &e);
  assert_non_null(back);
  assert_true(json_equal(back, j));
  tl_free(t);
  json_decref(back);
  t = jtext_dumps(j, JT_INDENT | JT_SORT_KEYS, NULL);
  assert_non_null(strstr(t, "{\n  \"alpha\": [2.5, 7, true, null],\n"));
  assert_true(t[strlen(t) - 1] == '\n');
  back = json_loads(t, 0, &e);
  assert_true(json_equal(back, j));
  tl_free(t);
  json_decref(back);
  /* insertion order is kept without JT_SORT_KEYS */
  t = jtext_dumps(j, JT_COMPACT, NULL);
  assert_true(strncmp(t, "{\"zeta\":0.845,", 14) == 0);
  tl_free(t);
  json_decref(j);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_hand_checked),
      cmocka_unit_test(test_round_trip_sweep),
      cmocka_unit_test(test_structure),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
