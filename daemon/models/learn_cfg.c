/* learn_cfg.c - "log" and "refit" in config.json (learn_cfg.h). */
#include "learn_cfg.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int check_keys(const json_t *o, const char *what, const char *const *allowed, ts_err *err) {
  if (!json_is_object(o))
    return ts_errf(err, TS_EINVAL, "config.json: '%s' must be an object", what);
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)o, key, v) {
    int ok = 0;
    for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(*a, key) == 0;
    if (ok) continue;
    char list[256] = "";
    size_t n = 0;
    for (const char *const *a = allowed; *a && n < sizeof list; a++)
      n += (size_t)snprintf(list + n, sizeof list - n, "%s%s", n ? ", " : "", *a);
    return ts_errf(err, TS_EINVAL, "config.json: %s: unknown key '%.60s' (known: %s)", what, key,
                   list);
  }
  return 0;
}

static int get_int(const json_t *o, const char *what, const char *key, int64_t lo, int64_t hi,
                   int64_t *out, ts_err *err) {
  const json_t *v = json_object_get(o, key);
  if (!v) return 0;
  if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
    return ts_errf(err, TS_EINVAL, "config.json: %s.%s must be an integer from %lld to %lld", what,
                   key, (long long)lo, (long long)hi);
  *out = json_integer_value(v);
  return 0;
}

static int get_num(const json_t *o, const char *what, const char *key, double lo, double hi,
                   int lo_open, double *out, ts_err *err) {
  const json_t *v = json_object_get(o, key);
  if (!v) return 0;
  double x = json_number_value(v);
  if (!json_is_number(v) || !isfinite(x) || x < lo || x > hi || (lo_open && x == lo))
    return ts_errf(err, TS_EINVAL, "config.json: %s.%s must be a number in %s%g, %g]", what, key,
                   lo_open ? "(" : "[", lo, hi);
  *out = x;
  return 0;
}

int lc_parse(const json_t *config, const md_kind *kind, lc_config *c, ts_err *err) {
  static const char *const log_keys[] = {"sample_rate", "max_rows", NULL};
  static const char *const refit_keys[] = {
      "every_rows",   "every_seconds",   "window_rows", "min_rows", "margin",
      "compare_rows", "max_age_seconds", "params",      "metric",   NULL};
  memset(c, 0, sizeof *c);
  c->sample_rate = 1.0;
  c->max_rows = 100000;
  c->window_rows = 1000;
  c->min_rows = 50;
  c->margin = 0.02;
  c->compare_rows = 100;
  c->max_age_seconds = 3600;
  const json_t *lg = json_object_get(config, "log");
  const json_t *rf = json_object_get(config, "refit");
  int rc;
  if (lg) {
    if ((rc = check_keys(lg, "log", log_keys, err))) return rc;
    c->log = 1;
    if ((rc = get_num(lg, "log", "sample_rate", 0, 1, 1, &c->sample_rate, err))) return rc;
    if ((rc = get_int(lg, "log", "max_rows", 1, LC_MAX_ROWS, &c->max_rows, err))) return rc;
  }
  if (!rf) return 0;
  if ((rc = check_keys(rf, "refit", refit_keys, err))) return rc;
  if (!lg)
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'refit' needs 'log' (a refit fits on the logged rows that "
                   "feedback labelled)");
  c->refit = 1;
  if ((rc = get_int(rf, "refit", "every_rows", 0, LC_MAX_ROWS, &c->every_rows, err)) ||
      (rc = get_num(rf, "refit", "every_seconds", 0, 1e9, 0, &c->every_seconds, err)) ||
      (rc = get_int(rf, "refit", "window_rows", 1, LC_MAX_ROWS, &c->window_rows, err)) ||
      (rc = get_int(rf, "refit", "min_rows", 1, LC_MAX_ROWS, &c->min_rows, err)) ||
      (rc = get_num(rf, "refit", "margin", 0, 0.99, 0, &c->margin, err)) ||
      (rc = get_int(rf, "refit", "compare_rows", 1, LC_MAX_ROWS, &c->compare_rows, err)) ||
      (rc = get_num(rf, "refit", "max_age_seconds", 0, 1e9, 0, &c->max_age_seconds, err)))
    return rc;
  const json_t *mt = json_object_get(rf, "metric");
  if (mt) {
    /* ensembles: log loss or the Brier score; quantile models: WIS or the
     * absolute error of the median level */
    static const char *const ens[] = {"log_loss", "brier", NULL}, *const qnt[] = {"wis", "mae",
                                                                                  NULL};
    int is_q = kind && strcmp(kind->name, "quantile_ensemble") == 0;
    int is_e = kind && strcmp(kind->name, "ensemble") == 0;
    const char *v = json_string_value(mt);
    int ok = 0;
    for (const char *const *a = ens; v && *a && !ok; a++) ok = strcmp(*a, v) == 0 && !is_q;
    for (const char *const *a = qnt; v && *a && !ok; a++) ok = strcmp(*a, v) == 0 && !is_e;
    if (!ok)
      return ts_errf(err, TS_EINVAL, "config.json: refit.metric must be %s",
                     is_q   ? "\"wis\" or \"mae\""
                     : is_e ? "\"log_loss\" or \"brier\""
                            : "log_loss, brier, wis or mae");
    if (strcmp(v, "mae") == 0) {
      const json_t *lv = json_object_get(config, "levels");
      int has = 0;
      for (size_t k = 0; json_is_array(lv) && k < json_array_size(lv) && !has; k++)
        has = json_number_value(json_array_get(lv, k)) == 0.5;
      if (!has)
        return ts_errf(err, TS_EINVAL,
                       "config.json: refit.metric \"mae\" needs the level 0.5 in 'levels' (the "
                       "median it scores)");
    }
    snprintf(c->metric, sizeof c->metric, "%s", v);
  }
  const json_t *p = json_object_get(rf, "params");
  if (p && !json_is_object(p))
    return ts_errf(err, TS_EINVAL,
                   "config.json: refit.params must be an object of the fit's parameters");
  c->params = p;
  const char *key;
  json_t *v;
  if (p) json_object_foreach((json_t *)p, key, v) {
      if (!kind || !md_kind_takes_param(kind, MD_OP_FIT, key))
        return ts_errf(err, TS_EINVAL,
                       "config.json: refit.params: '%.60s' is not a parameter of %s's fit", key,
                       kind ? kind->name : "this kind");
    }
  if (c->min_rows > c->window_rows)
    return ts_errf(err, TS_EINVAL,
                   "config.json: refit.min_rows (%lld) is more than refit.window_rows (%lld)",
                   (long long)c->min_rows, (long long)c->window_rows);
  if (c->window_rows > c->max_rows)
    return ts_errf(err, TS_EINVAL,
                   "config.json: refit.window_rows (%lld) is more than log.max_rows (%lld): the "
                   "log cannot hold the window",
                   (long long)c->window_rows, (long long)c->max_rows);
  return 0;
}
