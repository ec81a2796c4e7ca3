/* test_learn_cfg.c - config.json's "log" and "refit" (models/learn_cfg.h):
 * the defaults, every refusal naming its key, and the kind's checks (fit
 * parameters, metrics, the median level that "mae" needs). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/models/learn_cfg.h"

extern const md_kind md_kind_ensemble;
extern const md_kind md_kind_quantile_ensemble;

static int parse(const char *text, const md_kind *k, lc_config *c, ts_err *err) {
  json_error_t je;
  json_t *cfg = json_loads(text, 0, &je);
  assert_non_null(cfg);
  int rc = lc_parse(cfg, k, c, err);
  json_decref(cfg);
  return rc;
}

static void refused(const char *text, const md_kind *k, const char *words) {
  lc_config c;
  ts_err err = {0};
  assert_int_equal(parse(text, k, &c, &err), -TS_EINVAL);
  if (!strstr(err.msg, words)) fail_msg("'%s' does not mention '%s'", err.msg, words);
}

static void test_defaults(void **state) {
  (void)state;
  lc_config c;
  ts_err err = {0};
  assert_int_equal(parse("{}", &md_kind_ensemble, &c, &err), 0);
  assert_int_equal(c.log, 0);
  assert_int_equal(c.refit, 0);
  assert_int_equal(parse("{\"log\": {}, \"refit\": {}}", &md_kind_ensemble, &c, &err), 0);
  assert_int_equal(c.log, 1);
  assert_true(c.sample_rate == 1.0);
  assert_int_equal(c.max_rows, 100000);
  assert_int_equal(c.refit, 1);
  assert_int_equal(c.every_rows, 0);
  assert_int_equal(c.window_rows, 1000);
  assert_int_equal(c.min_rows, 50);
  assert_int_equal(c.compare_rows, 100);
  assert_true(c.margin == 0.02);
  assert_true(c.max_age_seconds == 3600);
  assert_string_equal(c.metric, "");
  assert_int_equal(parse("{\"log\": {\"sample_rate\": 0.25, \"max_rows\": 10}, \"refit\": "
                         "{\"every_rows\": 5, \"window_rows\": 10, \"min_rows\": 3, \"margin\": 0, "
                         "\"metric\": \"brier\", \"params\": {\"epochs\": 3}}}",
                         &md_kind_ensemble, &c, &err),
                   0);
  assert_true(c.sample_rate == 0.25);
  assert_int_equal(c.max_rows, 10);
  assert_int_equal(c.every_rows, 5);
  assert_string_equal(c.metric, "brier");
}

static void test_refusals(void **state) {
  (void)state;
  const md_kind *e = &md_kind_ensemble, *q = &md_kind_quantile_ensemble;
  refused("{\"log\": 3}", e, "'log' must be an object");
  refused("{\"log\": {\"rate\": 1}}", e, "unknown key 'rate'");
  refused("{\"log\": {\"sample_rate\": 0}}", e, "log.sample_rate");
  refused("{\"log\": {\"sample_rate\": 1.5}}", e, "log.sample_rate");
  refused("{\"log\": {\"sample_rate\": \"1\"}}", e, "log.sample_rate");
  refused("{\"log\": {\"max_rows\": 0}}", e, "log.max_rows");
  refused("{\"log\": {\"max_rows\": 1000001}}", e, "log.max_rows");
  refused("{\"log\": {\"max_rows\": 2.5}}", e, "log.max_rows");
  refused("{\"refit\": {}}", e, "needs 'log'");
  refused("{\"log\": {}, \"refit\": {\"every\": 1}}", e, "unknown key 'every'");
  refused("{\"log\": {}, \"refit\": {\"every_rows\": -1}}", e, "refit.every_rows");
  refused("{\"log\": {}, \"refit\": {\"every_seconds\": -1}}", e, "refit.every_seconds");
  refused("{\"log\": {}, \"refit\": {\"margin\": 1}}", e, "refit.margin");
  refused("{\"log\": {}, \"refit\": {\"compare_rows\": 0}}", e, "refit.compare_rows");
  refused("{\"log\": {}, \"refit\": {\"min_rows\": 2000}}", e, "min_rows (2000) is more");
  refused("{\"log\": {\"max_rows\": 100}, \"refit\": {}}", e, "cannot hold the window");
  refused("{\"log\": {}, \"refit\": {\"params\": 1}}", e, "refit.params must be an object");
  refused("{\"log\": {}, \"refit\": {\"params\": {\"epoch\": 1}}}", e,
          "'epoch' is not a parameter");
  refused("{\"log\": {}, \"refit\": {\"metric\": \"wis\"}}", e, "\"log_loss\" or \"brier\"");
  refused("{\"log\": {}, \"refit\": {\"metric\": \"brier\"}}", q, "\"wis\" or \"mae\"");
  refused("{\"log\": {}, \"refit\": {\"metric\": 3}}", q, "refit.metric");
  refused("{\"levels\": [0.1, 0.9], \"log\": {}, \"refit\": {\"metric\": \"mae\"}}", q,
          "needs the level 0.5");
  lc_config c;
  ts_err err = {0};
  assert_int_equal(parse("{\"levels\": [0.1, 0.5, 0.9], \"log\": {}, \"refit\": {\"metric\": "
                         "\"mae\", \"params\": {\"epochs\": 2}}}",
                         q, &c, &err),
                   0);
  assert_string_equal(c.metric, "mae");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_defaults),
      cmocka_unit_test(test_refusals),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
