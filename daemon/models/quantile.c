/* quantile.c - model kind `quantile_ensemble`: M base models each predict K
 * quantile levels; a learned aggregator (methods/qagg.h, one of the six
 * coarse/medium/fine x global/local) combines them into one set of K
 * quantiles, optionally corrected by conformal calibration (CQR) and made
 * non-crossing by a monotone step. This file is the glue between the math
 * in qagg.h and the model interface in model.h: configuration, weights,
 * request tensors, and the fit / calibrate / evaluate answers. This file:
 * configuration, loading and the kind's table; serving is in
 * quantile_serve.c, fitting and calibration in quantile_fit.c.
 *
 * config.json (every key but "levels" and "bases" is optional):
 *   {"kind": "quantile_ensemble",
 *    "levels": [0.1, ..., 0.9]            strictly increasing, inside (0, 1)
 *    "bases": [{"model": "qbase_a"}        a repository model, run on `features`,
 *                                          whose output [B, K] holds its K quantiles
 *              {"linear": "lin1"}          a linear quantile model stored in this
 *                                          model's weights: bases.lin1.weight [K, D],
 *                                          bases.lin1.bias [K]; q = x W^T + b
 *              {"external": "qrf"}]        the caller sends its quantiles
 *    "features": D                        needed with hosted/linear bases or a local
 *                                          aggregator
 *    "aggregator": {"granularity": "medium", "scope": "global", "simplex": true,
 *                   "hidden": 64, "depth": 2}
 *    "monotone": "none" | "sort" | "isotonic" | "median"     (default none)
 *    "conformal": {"method": "cqr", "allow_infinite": false}} calibrate's defaults
 *
 * Request tensors: `base_quantiles` [B, M_ext, K] carries the external bases
 * only, in the order they appear in "bases"; `features` [B, D]. Output
 * `quantiles` [B, K] FP32.
 *
 * Serving order: aggregate (qa_infer_run), subtract/add the conformal
 * corrections when the version has them, then the monotone step, so that
 * with sort/isotonic/median the output never crosses whatever the weights.
 *
 * Versions: the aggregator's settings live in config.json, shared by every
 * version; a fit may choose another of the six aggregators, so it writes its
 * settings into the new version's safetensors __metadata__ ("aggregator": a
 * JSON object as a string) and load prefers them over config.json. A fit
 * drops conformal corrections (they belonged to the old aggregator); a
 * calibration keeps the aggregator weights and adds new corrections.
 *
 * Threads: the state is immutable after load; infer/fit/evaluate/calibrate
 * only read it. Hosted bases are acquired per call through md_host, so each
 * call sees the base's currently served version. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../base/hash.h"
#include "../base/jtext.h"
#include "../base/mem.h"
#include "../base/safetensors.h"
#include "../kernels/sgemm.h"
#include "../methods/qagg.h"
#include "learn_cfg.h"
#include "model.h"
#include "quantile_int.h"

extern const md_kind md_kind_quantile_ensemble;

/* ---- names and settings ------------------------------------------------ */

const char *const qk_cqr_http_names[] = {"cqr", "cqr_asymmetric", "per_quantile"};

int qk_cqr_from_http(const char *s, qa_cqr_mode *out) {
  for (int i = 0; i < 3; i++)
    if (s && strcmp(s, qk_cqr_http_names[i]) == 0) {
      *out = (qa_cqr_mode)i;
      return 0;
    }
  return -TS_EINVAL;
}

const char *qk_scope_name(qa_scope s) {
  return s == QA_LOCAL ? "local" : "global";
}

int qk_agg_equal(const qk_agg *a, const qk_agg *b) {
  if (a->gran != b->gran || a->scope != b->scope || !a->simplex != !b->simplex) return 0;
  return a->scope == QA_GLOBAL || (a->hidden == b->hidden && a->depth == b->depth);
}

/* Reads the aggregator settings present in obj (an object) over *a. `where`
 * names the source in messages. Keys outside the five (and, when
 * allow_features, "features", returned through *features) are refused. */
int qk_agg_parse(const json_t *obj, qk_agg *a, const char *where, int allow_features, int *features,
                 ts_err *err) {
  if (!json_is_object(obj))
    return ts_errf(err, TS_EINVAL, "%s: 'aggregator' must be an object", where);
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    if (strcmp(key, "granularity") == 0) {
      if (qa_granularity_from_name(json_string_value(v), &a->gran))
        return ts_errf(err, TS_EINVAL, "%s: aggregator granularity must be coarse, medium or fine",
                       where);
    } else if (strcmp(key, "scope") == 0) {
      const char *s = json_string_value(v);
      if (s && strcmp(s, "global") == 0)
        a->scope = QA_GLOBAL;
      else if (s && strcmp(s, "local") == 0)
        a->scope = QA_LOCAL;
      else
        return ts_errf(err, TS_EINVAL, "%s: aggregator scope must be global or local", where);
    } else if (strcmp(key, "simplex") == 0) {
      if (!json_is_boolean(v))
        return ts_errf(err, TS_EINVAL, "%s: aggregator simplex must be true or false", where);
      a->simplex = json_is_true(v);
    } else if (strcmp(key, "hidden") == 0 || strcmp(key, "depth") == 0) {
      int is_h = key[0] == 'h';
      json_int_t n = json_is_integer(v) ? json_integer_value(v) : -1;
      if (is_h ? (n < 1 || n > 65536) : (n < 1 || n > QA_MAX_DEPTH))
        return ts_errf(err, TS_EINVAL, "%s: aggregator %s must be an integer in [1, %d]", where,
                       key, is_h ? 65536 : QA_MAX_DEPTH);
      *(is_h ? &a->hidden : &a->depth) = (int)n;
    } else if (allow_features && strcmp(key, "features") == 0) {
      json_int_t n = json_is_integer(v) ? json_integer_value(v) : -1;
      if (n < 1 || n > (1 << 24))
        return ts_errf(err, TS_EINVAL, "%s: aggregator features must be a positive integer", where);
      *features = (int)n;
    } else {
      return ts_errf(err, TS_EINVAL,
                     "%s: unknown aggregator key '%s' (granularity, scope, simplex, hidden, depth)",
                     where, key);
    }
  }
  return 0;
}

json_t *qk_agg_json(const qk_agg *a, int D) {
  json_t *j = json_pack("{s:s, s:s, s:b}", "granularity", qa_granularity_name(a->gran), "scope",
                        qk_scope_name(a->scope), "simplex", a->simplex);
  if (j && a->scope == QA_LOCAL) {
    json_object_set_new(j, "hidden", json_integer(a->hidden));
    json_object_set_new(j, "depth", json_integer(a->depth));
    if (D > 0) json_object_set_new(j, "features", json_integer(D));
  }
  return j;
}

void qk_spec_of(const qk_state *s, const qk_agg *a, int D, qa_spec *sp) {
  memset(sp, 0, sizeof *sp);
  sp->M = s->M;
  sp->K = s->K;
  sp->D = D;
  sp->levels = s->levels;
  sp->gran = a->gran;
  sp->scope = a->scope;
  sp->simplex = a->simplex;
  sp->hidden = a->hidden;
  sp->depth = a->depth;
}

/* ---- qk_load --------------------------------------------------------------- */

static void state_free(qk_state *s) {
  if (!s) return;
  qa_infer_free(&s->inf);
  qa_params_free(&s->params);
  for (int j = 0; s->bases && j < s->M; j++) {
    ts_free(&s->bases[j].w);
    ts_free(&s->bases[j].b);
  }
  tl_free(s->bases);
  qk_live_close(s->live);
  tl_free(s->levels);
  tl_free(s->conf_lo);
  tl_free(s);
}

static int parse_levels(qk_state *s, const json_t *lv, ts_err *err) {
  if (!json_is_array(lv) || json_array_size(lv) < 1 || json_array_size(lv) > QA_MAX_K)
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'levels' must be a list of 1 to %d numbers in (0, 1)", QA_MAX_K);
  s->K = (int)json_array_size(lv);
  if (!(s->levels = tl_calloc((size_t)s->K, sizeof(double))))
    return ts_errf(err, TS_ENOMEM, "out of memory");
  for (int k = 0; k < s->K; k++) {
    json_t *v = json_array_get(lv, (size_t)k);
    double t = json_is_number(v) ? json_number_value(v) : NAN;
    if (!(t > 0.0 && t < 1.0))
      return ts_errf(err, TS_EINVAL, "config.json: levels[%d] must be a number inside (0, 1)", k);
    if (k && !(t > s->levels[k - 1]))
      return ts_errf(err, TS_EINVAL,
                     "config.json: levels must increase strictly (levels[%d] = %g after %g)", k, t,
                     s->levels[k - 1]);
    s->levels[k] = t;
  }
  return 0;
}

static int parse_bases(qk_state *s, const json_t *bs, ts_err *err) {
  if (!json_is_array(bs) || json_array_size(bs) < 1 || json_array_size(bs) > 4096)
    return ts_errf(err, TS_EINVAL, "config.json: 'bases' must be a list of 1 to 4096 bases");
  s->M = (int)json_array_size(bs);
  if (!(s->bases = tl_calloc((size_t)s->M, sizeof *s->bases)))
    return ts_errf(err, TS_ENOMEM, "out of memory");
  static const char *const kinds[] = {"model", "linear", "external"};
  for (int j = 0; j < s->M; j++) {
    json_t *b = json_array_get(bs, (size_t)j);
    if (!json_is_object(b) || json_object_size(b) != 1)
      return ts_errf(err, TS_EINVAL,
                     "config.json: bases[%d] must be one of {\"model\": name}, {\"linear\": name}, "
                     "{\"external\": name}",
                     j);
    const char *key = json_object_iter_key(json_object_iter((json_t *)b));
    json_t *v = json_object_iter_value(json_object_iter((json_t *)b));
    int kind = -1;
    for (int i = 0; i < 3; i++)
      if (strcmp(key, kinds[i]) == 0) kind = i;
    const char *name = json_string_value(v);
    if (kind < 0 || !name || !name[0] || strlen(name) >= QK_NAME_MAX || strchr(name, '"'))
      return ts_errf(err, TS_EINVAL,
                     "config.json: bases[%d] must be one of {\"model\": name}, {\"linear\": name}, "
                     "{\"external\": name} with a non-empty name",
                     j);
    for (int i = 0; i < j; i++)
      if (strcmp(s->bases[i].name, name) == 0)
        return ts_errf(err, TS_EINVAL, "config.json: base name '%s' appears twice", name);
    s->bases[j].kind = (qk_base_kind)kind;
    snprintf(s->bases[j].name, sizeof s->bases[j].name, "%s", name);
    if (kind == QB_EXTERNAL)
      s->M_ext++;
    else
      s->n_hosted++;
  }
  return 0;
}

/* Which tensors of the weights file this version uses: every other name is
 * refused, so that a misspelt tensor is not silently replaced by defaults. */
static int check_known_tensors(const qk_state *s, st_file *w, ts_err *err) {
  for (int i = 0; i < st_count(w); i++) {
    const char *n = st_name(w, i);
    int ok = qa_params_find(&s->params, n) != NULL || strcmp(n, "conformal.lower") == 0 ||
             strcmp(n, "conformal.upper") == 0 || strcmp(n, "conformal.scores") == 0;
    for (int j = 0; !ok && j < s->M; j++) {
      char e[QK_NAME_MAX + 32];
      if (s->bases[j].kind != QB_LINEAR) continue;
      snprintf(e, sizeof e, "bases.%s.weight", s->bases[j].name);
      ok = strcmp(n, e) == 0;
      snprintf(e, sizeof e, "bases.%s.bias", s->bases[j].name);
      ok = ok || strcmp(n, e) == 0;
    }
    if (!ok)
      return ts_errf(err, TS_EINVAL,
                     "weights: tensor '%s' is not used by this model (a %s %s aggregator uses %s)",
                     n, qa_granularity_name(s->agg.gran), qk_scope_name(s->agg.scope),
                     s->agg.scope == QA_GLOBAL ? "'aggregator.logits'"
                                               : "'aggregator.layers.{i}.weight/bias'");
  }
  return 0;
}

/* Aggregator tensors: all present or none (then the qa_params_init defaults). */
static int load_aggregator(qk_state *s, st_file *w, ts_err *err) {
  int present = 0;
  for (int i = 0; w && i < s->params.ntensors; i++) present += st_find(w, s->params.t[i].name) >= 0;
  if (!present) return 0;
  for (int i = 0; i < s->params.ntensors; i++) {
    qa_tensor *t = &s->params.t[i];
    if (st_find(w, t->name) < 0)
      return ts_errf(err, TS_EINVAL,
                     "weights: tensor '%s' is missing (the %s %s aggregator needs every "
                     "aggregator tensor, or none for the defaults)",
                     t->name, qa_granularity_name(s->agg.gran), qk_scope_name(s->agg.scope));
    ts_tensor x;
    int rc = st_get_f32(w, t->name, t->ndim, t->shape, &x, err);
    if (rc) {
      ts_err_prefix(err, "%s %s aggregator with M=%d, K=%d", qa_granularity_name(s->agg.gran),
                    qk_scope_name(s->agg.scope), s->M, s->K);
      return rc;
    }
    memcpy(t->data, x.data, (size_t)t->numel * sizeof(float));
    ts_free(&x);
  }
  return 0;
}

static int load_conf_vec(st_file *w, const char *name, int K, double *out, ts_err *err) {
  ts_tensor t;
  int rc = st_get(w, name, &t, err);
  if (rc) return rc;
  if ((t.dtype != TS_FP32 && t.dtype != TS_FP64) || t.ndim != 1 || t.shape[0] != K) {
    char b[64];
    rc = ts_errf(err, TS_EINVAL, "tensor '%s': expected F32 or F64 of shape [%d], got %s %s", name,
                 K, ts_dtype_st_name(t.dtype), ts_shape_str(t.shape, t.ndim, b, sizeof b));
    ts_free(&t);
    return rc;
  }
  /* +-inf is a valid correction (qk_calibrate with allow_infinite); NaN is not */
  for (int k = 0; k < K && !rc; k++) {
    out[k] = ts_get_f64(&t, k);
    if (isnan(out[k])) rc = ts_errf(err, TS_EINVAL, "tensor '%s': element %d is NaN", name, k);
  }
  ts_free(&t);
  return rc;
}

static int load_bases_linear(qk_state *s, st_file *w, ts_err *err) {
  for (int j = 0; j < s->M; j++) {
    qk_base *b = &s->bases[j];
    if (b->kind != QB_LINEAR) continue;
    if (!w)
      return ts_errf(err, TS_EINVAL,
                     "linear base '%s' needs weights, and the version has no "
                     "model.safetensors",
                     b->name);
    char n[QK_NAME_MAX + 32];
    int64_t ws[2] = {s->K, s->D}, bs[1] = {s->K};
    snprintf(n, sizeof n, "bases.%s.weight", b->name);
    int rc = st_get_f32(w, n, 2, ws, &b->w, err);
    if (rc) return rc;
    snprintf(n, sizeof n, "bases.%s.bias", b->name);
    if ((rc = st_get_f32(w, n, 1, bs, &b->b, err))) return rc;
  }
  return 0;
}

int qk_load(const md_load_ctx *ctx, void **state, ts_err *err) {
  static const char *const keys[] = {"levels",    "bases", "features", "aggregator", "monotone",
                                     "conformal", "log",   "refit",    NULL};
  int rc = md_config_check_keys(ctx->config, keys, err);
  lc_config lcfg; /* the learning loop's keys, checked here (daemon/learn reads them) */
  if (!rc) rc = lc_parse(ctx->config, &md_kind_quantile_ensemble, &lcfg, err);
  if (rc) return rc;
  qk_state *s = tl_calloc(1, sizeof *s);
  if (!s) return ts_errf(err, TS_ENOMEM, "out of memory");
  s->median = -1;
  s->agg = (qk_agg){.gran = QA_MEDIUM, .scope = QA_GLOBAL, .simplex = 1, .hidden = 64, .depth = 2};
  const json_t *cfg = ctx->config;
  st_file *w = ctx->weights;
  if ((rc = parse_levels(s, json_object_get(cfg, "levels"), err))) goto fail;
  if ((rc = parse_bases(s, json_object_get(cfg, "bases"), err))) goto fail;
  json_t *fv = json_object_get(cfg, "features");
  if (fv) {
    if (!json_is_integer(fv) || json_integer_value(fv) < 1 || json_integer_value(fv) > (1 << 24)) {
      rc = ts_errf(err, TS_EINVAL, "config.json: 'features' must be a positive integer");
      goto fail;
    }
    s->D = (int)json_integer_value(fv);
  }
  json_t *av = json_object_get(cfg, "aggregator");
  if (av && (rc = qk_agg_parse(av, &s->agg, "config.json", 0, NULL, err))) goto fail;
  /* a qk_fit records its aggregator in the version; it wins over config.json */
  const char *meta = w ? st_meta_get(w, "aggregator") : NULL;
  if (meta) {
    json_error_t je;
    json_t *mj = json_loads(meta, 0, &je);
    int mD = 0;
    rc =
        mj ? qk_agg_parse(mj, &s->agg, "weights __metadata__", 1, &mD, err)
           : ts_errf(err, TS_EINVAL, "weights __metadata__: 'aggregator' is not JSON: %s", je.text);
    json_decref(mj);
    if (rc) goto fail;
    if (mD && s->D && mD != s->D) {
      rc = ts_errf(err, TS_EINVAL,
                   "weights __metadata__: aggregator features %d differ from "
                   "config.json's features %d",
                   mD, s->D);
      goto fail;
    }
    if (mD) s->D = mD;
  }
  if ((s->n_hosted || s->agg.scope == QA_LOCAL) && s->D < 1) {
    rc = ts_errf(err, TS_EINVAL, "config.json: 'features' (D) is required with %s",
                 s->n_hosted ? "hosted or linear bases" : "a local aggregator");
    goto fail;
  }
  const char *mono = "none";
  json_t *mv = json_object_get(cfg, "monotone");
  if (mv) mono = json_string_value(mv);
  if (qa_monotone_from_name(mono, &s->mono)) {
    rc = ts_errf(err, TS_EINVAL, "config.json: 'monotone' must be none, sort, isotonic or median");
    goto fail;
  }
  {
    int half = s->K / 2 + 1, n_int;
    int *lo = tl_calloc((size_t)half * 2, sizeof(int));
    double *al = tl_calloc((size_t)half, sizeof(double));
    rc = lo && al
             ? qa_central_intervals(s->K, s->levels, lo, lo + half, al, &n_int, &s->median, err)
             : ts_errf(err, TS_ENOMEM, "out of memory");
    tl_free(lo);
    tl_free(al);
    if (rc) goto fail;
  }
  if (s->mono == QA_MONO_MEDIAN && s->median < 0) {
    rc = ts_errf(err, TS_EINVAL,
                 "config.json: monotone 'median' needs the level 0.5 among 'levels'");
    goto fail;
  }
  json_t *cv = json_object_get(cfg, "conformal");
  s->window = QK_WINDOW_DEFAULT;
  s->aci_window_default = QK_ACI_WINDOW;
  if (cv) {
    const char *m = json_string_value(json_object_get(cv, "method"));
    json_t *ai = json_object_get(cv, "allow_infinite");
    json_t *wv = json_object_get(cv, "window"), *ad = json_object_get(cv, "adaptive");
    const char *k2;
    json_t *v2;
    int bad = !json_is_object(cv) ||
              (json_object_get(cv, "method") && qk_cqr_from_http(m, &s->cqr_default)) ||
              (ai && !json_is_boolean(ai)) ||
              (wv && (!json_is_integer(wv) || json_integer_value(wv) < 1 ||
                      json_integer_value(wv) > QK_WINDOW_MAX));
    if (json_is_object(cv))
      json_object_foreach((json_t *)cv, k2, v2) bad |=
          strcmp(k2, "method") && strcmp(k2, "allow_infinite") && strcmp(k2, "window") &&
          strcmp(k2, "adaptive");
    if (bad) {
      rc = ts_errf(err, TS_EINVAL,
                   "config.json: 'conformal' must be {\"method\": \"cqr\" | "
                   "\"cqr_asymmetric\" | \"per_quantile\", \"allow_infinite\": false, "
                   "\"window\": 1 to %d rows, \"adaptive\": {\"gamma\": g, \"window\": W} | "
                   "false}",
                   QK_WINDOW_MAX);
      goto fail;
    }
    s->allow_inf_default = ai && json_is_true(ai);
    if (wv) s->window = json_integer_value(wv);
    if (ad && !json_is_false(ad)) {
      if ((rc = qk_adaptive_parse(ad, "config.json: 'conformal.adaptive'", &s->gamma_default,
                                  &s->aci_window_default, err)))
        goto fail;
    }
  }
  qk_spec_of(s, &s->agg, s->D, &s->spec);
  if ((rc = qa_params_init(&s->params, &s->spec, 0, err))) goto fail;
  if (w) {
    if ((rc = check_known_tensors(s, w, err))) goto fail;
    if ((rc = load_aggregator(s, w, err))) goto fail;
    int hl = st_find(w, "conformal.lower") >= 0, hu = st_find(w, "conformal.upper") >= 0;
    if (hl != hu) {
      rc = ts_errf(
          err, TS_EINVAL, "weights: '%s' without '%s' (conformal corrections come in pairs)",
          hl ? "conformal.lower" : "conformal.upper", hl ? "conformal.upper" : "conformal.lower");
      goto fail;
    }
    if (hl) {
      if (!(s->conf_lo = tl_calloc((size_t)s->K * 2, sizeof(double)))) {
        rc = ts_errf(err, TS_ENOMEM, "out of memory");
        goto fail;
      }
      s->conf_hi = s->conf_lo + s->K;
      if ((rc = load_conf_vec(w, "conformal.lower", s->K, s->conf_lo, err)) ||
          (rc = load_conf_vec(w, "conformal.upper", s->K, s->conf_hi, err)))
        goto fail;
      s->has_conf = 1;
      const char *cm = st_meta_get(w, "conformal");
      snprintf(s->conf_method, sizeof s->conf_method, "%s", cm ? cm : "external");
    }
  }
  if ((rc = load_bases_linear(s, w, err))) goto fail;
  if ((rc = qa_infer_init(&s->inf, &s->spec, &s->params, err))) goto fail;
  if ((rc = qk_live_open(s, ctx, w, err))) goto fail;
  *state = s;
  return 0;
fail:
  state_free(s);
  return rc;
}

static void signature(void *state, md_sig *sig) {
  qk_state *s = state;
  memset(sig, 0, sizeof *sig);
  if (s->M_ext) md_sig_add(sig, MD_IN, "base_quantiles", TS_FP32, 3, -1, s->M_ext, s->K);
  if (s->D > 0) md_sig_add(sig, MD_IN, "features", TS_FP32, 2, -1, s->D, 0);
  md_sig_add(sig, MD_OUT, "quantiles", TS_FP32, 2, -1, s->K, 0);
}

static void free_state(void *state) {
  state_free(state);
}

/* Request parameters (model.h): "levels" (checked by qk_gather, every
 * operation), qk_fit_agg's and qk_fit_opts' names, qk_calibrate's. */
static const char *const levels_params[] = {"levels", NULL};
static const char *const fit_params[] = {"levels",
                                         "aggregator",
                                         "granularity",
                                         "scope",
                                         "simplex",
                                         "hidden",
                                         "depth",
                                         "epochs",
                                         "batch_size",
                                         "patience",
                                         "seed",
                                         "learning_rate",
                                         "weight_decay",
                                         "dropout",
                                         "lambda",
                                         "margin",
                                         "validation_fraction",
                                         "warm_start",
                                         NULL};
/* qk_gather's inputs, whichever the configuration needs */
static const char *const infer_inputs[] = {"features", "base_quantiles", NULL};
static const char *const calibrate_params[] = {"levels", "method", "allow_infinite", "adaptive",
                                               NULL};
static const char *const evaluate_params[] = {"levels", "observe", NULL};

const md_kind md_kind_quantile_ensemble = {.name = "quantile_ensemble",
                                           .params = {[MD_OP_INFER] = levels_params,
                                                      [MD_OP_FIT] = fit_params,
                                                      [MD_OP_EVALUATE] = evaluate_params,
                                                      [MD_OP_CALIBRATE] = calibrate_params},
                                           .infer_inputs = infer_inputs,
                                           .load = qk_load,
                                           .signature = signature,
                                           .infer = qk_infer,
                                           .fit = qk_fit,
                                           .evaluate = qk_evaluate,
                                           .calibrate = qk_calibrate,
                                           .observe = qk_observe,
                                           .free = free_state};
