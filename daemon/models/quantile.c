/* quantile.c - model kind `quantile_ensemble`: M base models each predict K
 * quantile levels; a learned aggregator (methods/qagg.h, one of the six
 * coarse/medium/fine x global/local) combines them into one set of K
 * quantiles, optionally corrected by conformal calibration (CQR) and made
 * non-crossing by a monotone step. This file is the glue between the math
 * in qagg.h and the model interface in model.h: configuration, weights,
 * request tensors, and the fit / calibrate / evaluate answers.
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
#include "model.h"

#define QK_NAME_MAX 128
/* How deep hosted bases may nest (a base that is itself a quantile model of
 * hosted bases); more is a cycle in the configuration. */
/* Answers carry the learned arrays up to this many values, a summary above. */
#define QK_MAX_WEIGHTS_JSON 4096

typedef enum { QB_MODEL = 0, QB_LINEAR = 1, QB_EXTERNAL = 2 } qk_base_kind;

typedef struct qk_base {
  qk_base_kind kind;
  char name[QK_NAME_MAX];
  ts_tensor w, b; /* linear: [K, D] and [K], borrowed from the weights file */
} qk_base;

typedef struct qk_agg {
  qa_granularity gran;
  qa_scope scope;
  int simplex, hidden, depth;
} qk_agg;

typedef struct qk_state {
  int M, K, M_ext, D; /* D = 0: no features known (global aggregator, external bases) */
  int n_hosted;       /* bases of kind model or linear: they need features */
  double *levels;     /* [K] owned */
  qk_base *bases;     /* [M] owned */
  qk_agg agg;
  qa_spec spec;
  qa_params params; /* owned copy of the aggregator weights */
  qa_infer inf;
  qa_monotone mono;
  int median; /* index of level 0.5 or -1 */
  int has_conf;
  double *conf_lo, *conf_hi; /* [K] each (one allocation), when has_conf */
  char conf_method[32];      /* the version's calibration method, "" if none */
  qa_cqr_mode cqr_default;
  int allow_inf_default;
} qk_state;

/* Rows of one request: Z [B, M, K], X [B, D] (NULL when not sent or not
 * needed), y [B] (fit, evaluate, calibrate). All owned. */
typedef struct qk_rows {
  int64_t B;
  float *Z, *X, *y;
  int D; /* width of X */
} qk_rows;

static void rows_free(qk_rows *r) {
  tl_free(r->Z);
  tl_free(r->X);
  tl_free(r->y);
  memset(r, 0, sizeof *r);
}

/* ---- names and settings ------------------------------------------------ */

static const char *const cqr_http_names[] = {"cqr", "cqr_asymmetric", "per_quantile"};

static int cqr_from_http(const char *s, qa_cqr_mode *out) {
  for (int i = 0; i < 3; i++)
    if (s && strcmp(s, cqr_http_names[i]) == 0) {
      *out = (qa_cqr_mode)i;
      return 0;
    }
  return -TS_EINVAL;
}

static const char *scope_name(qa_scope s) {
  return s == QA_LOCAL ? "local" : "global";
}

static int agg_equal(const qk_agg *a, const qk_agg *b) {
  if (a->gran != b->gran || a->scope != b->scope || !a->simplex != !b->simplex) return 0;
  return a->scope == QA_GLOBAL || (a->hidden == b->hidden && a->depth == b->depth);
}

/* Reads the aggregator settings present in obj (an object) over *a. `where`
 * names the source in messages. Keys outside the five (and, when
 * allow_features, "features", returned through *features) are refused. */
static int agg_parse(const json_t *obj, qk_agg *a, const char *where, int allow_features,
                     int *features, ts_err *err) {
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

static json_t *agg_json(const qk_agg *a, int D) {
  json_t *j = json_pack("{s:s, s:s, s:b}", "granularity", qa_granularity_name(a->gran), "scope",
                        scope_name(a->scope), "simplex", a->simplex);
  if (j && a->scope == QA_LOCAL) {
    json_object_set_new(j, "hidden", json_integer(a->hidden));
    json_object_set_new(j, "depth", json_integer(a->depth));
    if (D > 0) json_object_set_new(j, "features", json_integer(D));
  }
  return j;
}

static void spec_of(const qk_state *s, const qk_agg *a, int D, qa_spec *sp) {
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

/* ---- load --------------------------------------------------------------- */

static void state_free(qk_state *s) {
  if (!s) return;
  qa_infer_free(&s->inf);
  qa_params_free(&s->params);
  for (int j = 0; s->bases && j < s->M; j++) {
    ts_free(&s->bases[j].w);
    ts_free(&s->bases[j].b);
  }
  tl_free(s->bases);
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
             strcmp(n, "conformal.upper") == 0;
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
                     n, qa_granularity_name(s->agg.gran), scope_name(s->agg.scope),
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
                     t->name, qa_granularity_name(s->agg.gran), scope_name(s->agg.scope));
    ts_tensor x;
    int rc = st_get_f32(w, t->name, t->ndim, t->shape, &x, err);
    if (rc) {
      ts_err_prefix(err, "%s %s aggregator with M=%d, K=%d", qa_granularity_name(s->agg.gran),
                    scope_name(s->agg.scope), s->M, s->K);
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
  /* +-inf is a valid correction (calibrate with allow_infinite); NaN is not */
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

static int load(const md_load_ctx *ctx, void **state, ts_err *err) {
  static const char *const keys[] = {"levels",   "bases",     "features", "aggregator",
                                     "monotone", "conformal", NULL};
  int rc = md_config_check_keys(ctx->config, keys, err);
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
  if (av && (rc = agg_parse(av, &s->agg, "config.json", 0, NULL, err))) goto fail;
  /* a fit records its aggregator in the version; it wins over config.json */
  const char *meta = w ? st_meta_get(w, "aggregator") : NULL;
  if (meta) {
    json_error_t je;
    json_t *mj = json_loads(meta, 0, &je);
    int mD = 0;
    rc =
        mj ? agg_parse(mj, &s->agg, "weights __metadata__", 1, &mD, err)
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
  if (cv) {
    const char *m = json_string_value(json_object_get(cv, "method"));
    json_t *ai = json_object_get(cv, "allow_infinite");
    const char *k2;
    json_t *v2;
    int bad = !json_is_object(cv) ||
              (json_object_get(cv, "method") && cqr_from_http(m, &s->cqr_default)) ||
              (ai && !json_is_boolean(ai));
    if (json_is_object(cv))
      json_object_foreach((json_t *)cv, k2, v2) bad |=
          strcmp(k2, "method") && strcmp(k2, "allow_infinite");
    if (bad) {
      rc = ts_errf(err, TS_EINVAL,
                   "config.json: 'conformal' must be {\"method\": \"cqr\" | "
                   "\"cqr_asymmetric\" | \"per_quantile\", \"allow_infinite\": false}");
      goto fail;
    }
    s->allow_inf_default = ai && json_is_true(ai);
  }
  spec_of(s, &s->agg, s->D, &s->spec);
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

/* ---- request rows ------------------------------------------------------- */

/* Runs hosted base j on X [B, D] and writes its [B, K] into Z's slot j. */
static int run_hosted(const qk_state *s, int j, const md_call *c, int64_t B, const float *X,
                      float *Z, ts_err *err) {
  const qk_base *b = &s->bases[j];
  ts_tensor t;
  memset(&t, 0, sizeof t);
  int64_t xs[2] = {B, s->D};
  int rc =
      ts_wrap(&t, "features", TS_FP32, 2, xs, (void *)X, (size_t)(B * s->D) * sizeof(float), err);
  if (rc) return rc;
  md_call sub;
  md_hosted held;
  rc = md_run_hosted(c, "base", b->name, &t, &sub, &held, err);
  ts_free(&t);
  if (rc) return rc;
  const ts_tensor *o = ts_list_find(&sub.outputs, "output");
  if (!o && sub.outputs.n == 1) o = &sub.outputs.items[0];
  float *q = NULL;
  char sh[64];
  if (!o)
    rc = ts_errf(err, TS_EINVAL, "base '%s' (kind %s) gave no single output", b->name,
                 held.kind->name);
  else if (o->ndim != 2 || o->shape[0] != B || o->shape[1] != s->K)
    rc = ts_errf(err, TS_EINVAL,
                 "base '%s': output '%s' is %s, expected [%lld, %d] (its K "
                 "quantiles)",
                 b->name, o->name, ts_shape_str(o->shape, o->ndim, sh, sizeof sh), (long long)B,
                 s->K);
  else if ((rc = ts_to_f32(o, 0, &q, err)) == 0) {
    int64_t MK = (int64_t)s->M * s->K;
    for (int64_t r = 0; r < B; r++)
      memcpy(Z + r * MK + (int64_t)j * s->K, q + r * s->K, (size_t)s->K * sizeof(float));
    tl_free(q);
  } else {
    ts_err_prefix(err, "base '%s'", b->name);
  }
  md_hosted_done(&sub, &held);
  return rc;
}

static int input_2d_or_1d_targets(const md_call *c, int64_t B, float **y, ts_err *err) {
  const ts_tensor *t;
  int rc = md_input(c, "targets", &t, err);
  if (rc) return rc;
  int64_t d1[1] = {B};
  if (!(t->ndim == 2 && t->shape[0] == B && t->shape[1] == 1) &&
      (rc = md_check_shape(t, 1, d1, err)))
    return rc;
  if (t->dtype != TS_FP32 && t->dtype != TS_FP64)
    return ts_errf(err, TS_EINVAL, "input 'targets': datatype must be FP32 or FP64, got %s",
                   ts_dtype_name(t->dtype));
  return ts_to_f32(t, 0, y, err);
}

/* Checks the optional request parameter "levels" against the model's. */
static int check_levels_param(const qk_state *s, const json_t *params, ts_err *err) {
  json_t *lv = params ? json_object_get(params, "levels") : NULL;
  if (!lv) return 0;
  int ok = json_is_array(lv) && (int)json_array_size(lv) == s->K;
  for (int k = 0; ok && k < s->K; k++) {
    json_t *v = json_array_get(lv, (size_t)k);
    ok = json_is_number(v) && fabs(json_number_value(v) - s->levels[k]) <= QA_LEVEL_TOL;
  }
  if (ok) return 0;
  char want[160];
  size_t o = 0;
  for (int k = 0; k < s->K && o + 24 < sizeof want; k++)
    o += (size_t)snprintf(want + o, sizeof want - o, "%s%g", k ? ", " : "", s->levels[k]);
  if (o + 24 >= sizeof want) snprintf(want + o, sizeof want - o, ", ...");
  return ts_errf(err, TS_EINVAL,
                 "levels mismatch: parameter 'levels' (%zu values) differs from the model's %d "
                 "levels [%s]",
                 json_is_array(lv) ? json_array_size(lv) : 0, s->K, want);
}

/* Decodes and assembles Z (and X, y) for a call. need_local_D: the D the
 * aggregator of this call needs (0: none; -1: any width, taken from the
 * request). */
static int gather(const qk_state *s, const md_call *c, int want_y, int need_local_D, qk_rows *r,
                  ts_err *err) {
  memset(r, 0, sizeof *r);
  int rc = check_levels_param(s, c->params, err);
  if (rc) return rc;
  const ts_tensor *bq = c->inputs ? ts_list_find(c->inputs, "base_quantiles") : NULL;
  const ts_tensor *ft = c->inputs ? ts_list_find(c->inputs, "features") : NULL;
  int64_t B = -1;
  float *zext = NULL;
  if (s->M_ext) {
    if (!bq)
      return ts_errf(err, TS_EINVAL,
                     "missing input 'base_quantiles' [B, %d, %d] (the external "
                     "bases' quantiles, in config order)",
                     s->M_ext, s->K);
    char sh[64];
    if (bq->ndim != 3 || bq->shape[1] != s->M_ext || bq->shape[2] != s->K)
      return ts_errf(err, TS_EINVAL,
                     "input 'base_quantiles': expected [B, %d, %d] (M=%d external bases, K=%d "
                     "levels), got %s",
                     s->M_ext, s->K, s->M_ext, s->K,
                     ts_shape_str(bq->shape, bq->ndim, sh, sizeof sh));
    B = bq->shape[0];
  } else if (bq) {
    return ts_errf(err, TS_EINVAL,
                   "input 'base_quantiles' is not accepted: every base of this "
                   "model is hosted (send 'features' [B, %d])",
                   s->D);
  }
  int needD = s->n_hosted ? s->D : need_local_D;
  if (needD) {
    if (!ft)
      return ts_errf(err, TS_EINVAL, "missing input 'features' [B, %d] (needed by %s)", s->D,
                     s->n_hosted ? "the hosted bases" : "the local aggregator");
    int64_t dims[2] = {B, needD > 0 ? needD : -1};
    if ((rc = md_check_shape(ft, 2, dims, err))) return rc;
    B = ft->shape[0];
    r->D = (int)ft->shape[1];
  }
  if (B < 1) return ts_errf(err, TS_EINVAL, "the request has no rows");
  r->B = B;
  if (needD && (rc = ts_to_f32(ft, 0, &r->X, err))) goto fail;
  if (want_y && (rc = input_2d_or_1d_targets(c, B, &r->y, err))) goto fail;
  if (bq && (rc = ts_to_f32(bq, 0, &zext, err))) goto fail;
  if (s->M_ext == s->M) { /* the common case: Z is the request's tensor */
    r->Z = zext;
    return 0;
  }
  int64_t MK = (int64_t)s->M * s->K;
  if (!(r->Z = tl_malloc((size_t)(B * MK) * sizeof(float)))) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory for %lld rows of base quantiles", (long long)B);
    goto fail;
  }
  float *tmp = NULL;
  for (int j = 0, e = 0; j < s->M && !rc; j++) {
    const qk_base *b = &s->bases[j];
    if (b->kind == QB_EXTERNAL) {
      for (int64_t i = 0; i < B; i++)
        memcpy(r->Z + i * MK + (int64_t)j * s->K, zext + (i * s->M_ext + e) * s->K,
               (size_t)s->K * sizeof(float));
      e++;
    } else if (b->kind == QB_LINEAR) {
      if (!tmp && !(tmp = tl_malloc((size_t)(B * s->K) * sizeof(float)))) {
        rc = ts_errf(err, TS_ENOMEM, "out of memory for %lld rows", (long long)B);
        break;
      }
      sg_gemm(c->pool, 1, B, s->K, s->D, r->X, s->D, b->w.data, s->D, 0.0f, tmp, s->K);
      sg_add_bias(B, s->K, tmp, s->K, b->b.data);
      for (int64_t i = 0; i < B; i++)
        memcpy(r->Z + i * MK + (int64_t)j * s->K, tmp + i * s->K, (size_t)s->K * sizeof(float));
    } else {
      rc = run_hosted(s, j, c, B, r->X, r->Z, err);
    }
  }
  tl_free(tmp);
  tl_free(zext);
  if (rc) rows_free(r);
  return rc;
fail:
  tl_free(zext);
  rows_free(r);
  return rc;
}

/* ---- prediction and metrics -------------------------------------------- */

/* Q [B, K]: the version's output: aggregate, corrections, monotone step. */
static int predict(const qk_state *s, pool_t *pool, const qk_rows *r, int with_conf, float *Q,
                   ts_err *err) {
  int rc = qa_infer_run(pool, &s->inf, r->B, r->Z, r->X, Q, err);
  if (rc) return rc;
  /* the aggregate of finite inputs is finite unless it overflowed FP32: a
   * 400 for infer, evaluate, fit and calibrate alike (the +-inf that
   * allow_infinite corrections add below is documented, and comes after) */
  for (int64_t i = 0; i < r->B * s->K; i++)
    if (!isfinite(Q[i]))
      return ts_errf(err, TS_EINVAL,
                     "row %lld: the aggregated quantile %d is not finite: the base quantiles or "
                     "features overflow FP32 in the aggregation (values too large in magnitude)",
                     (long long)(i / s->K), (int)(i % s->K));
  if (with_conf && s->has_conf) qa_cqr_apply(s->K, s->conf_lo, s->conf_hi, r->B, Q);
  return qa_monotone_rows(pool, s->mono, r->B, s->K, s->median, Q, err);
}

static json_t *jnum(double x) {
  return isfinite(x) ? json_real(x) : json_null();
}

static void nominal_key(double nominal, char *buf, size_t n) {
  snprintf(buf, n, "%.6g", nominal);
}

typedef struct qk_score {
  double pinball, wis;
} qk_score;

/* The metric object of Q [N, K] against y; *sc receives the headline scores. */
static int metrics_json(const qk_state *s, int64_t N, const float *Q, const float *y, json_t **out,
                        qk_score *sc, ts_err *err) {
  qa_metrics m;
  int rc = qa_metrics_compute(s->K, s->levels, N, Q, y, &m, err);
  if (rc) return rc;
  json_t *is = json_object(), *cov = json_object();
  for (int i = 0; i < m.n_int; i++) {
    char k[32];
    nominal_key(m.nominal[i], k, sizeof k);
    json_object_set_new(is, k, jnum(m.interval_score[i]));
    json_object_set_new(cov, k, jnum(m.coverage[i]));
  }
  *out = json_pack("{s:o, s:o, s:o, s:o, s:I}", "pinball", jnum(m.mean_pinball), "wis", jnum(m.wis),
                   "interval_score", is, "coverage", cov, "rows", (json_int_t)N);
  if (sc) *sc = (qk_score){m.mean_pinball, m.wis};
  qa_metrics_free(&m);
  return *out ? 0 : ts_errf(err, TS_ENOMEM, "out of memory");
}

/* metrics_json over the rows idx[0..n) of Q [*, K] and y (idx NULL: the
 * first n rows), gathered into a scratch copy. */
static int metrics_rows(const qk_state *s, const int64_t *idx, int64_t n, const float *Q,
                        const float *y, json_t **out, qk_score *sc, ts_err *err) {
  if (!idx) return metrics_json(s, n, Q, y, out, sc, err);
  float *q = tl_malloc((size_t)(n * (s->K + 1)) * sizeof(float));
  if (!q)
    return ts_errf(err, TS_ENOMEM, "out of memory for the metrics of %lld rows", (long long)n);
  float *yy = q + n * s->K;
  for (int64_t i = 0; i < n; i++) {
    memcpy(q + i * s->K, Q + idx[i] * s->K, (size_t)s->K * sizeof(float));
    yy[i] = y[idx[i]];
  }
  int rc = metrics_json(s, n, q, yy, out, sc, err);
  tl_free(q);
  return rc;
}

/* "bases": each base's own quantiles scored alone on the rows idx[0..n)
 * (idx NULL: the first n), plus the best of them (by WIS when the levels
 * have a median, else by pinball). */
static int bases_json(const qk_state *s, const qk_rows *r, const int64_t *idx, int64_t n,
                      json_t *metrics, qk_score *best, const char **best_name, ts_err *err) {
  float *q = tl_malloc((size_t)(n * (s->K + 1)) * sizeof(float));
  if (!q) return ts_errf(err, TS_ENOMEM, "out of memory");
  float *yy = q + n * s->K;
  for (int64_t i = 0; i < n; i++) yy[i] = r->y[idx ? idx[i] : i];
  json_t *bj = json_object();
  int rc = 0;
  int64_t MK = (int64_t)s->M * s->K;
  best->pinball = best->wis = INFINITY;
  *best_name = NULL;
  for (int j = 0; j < s->M && !rc; j++) {
    for (int64_t i = 0; i < n; i++)
      memcpy(q + i * s->K, r->Z + (idx ? idx[i] : i) * MK + (int64_t)j * s->K,
             (size_t)s->K * sizeof(float));
    json_t *mj;
    qk_score sc;
    if ((rc = metrics_json(s, n, q, yy, &mj, &sc, err))) break;
    json_object_set_new(bj, s->bases[j].name, mj);
    double key = s->median >= 0 ? sc.wis : sc.pinball,
           bk = s->median >= 0 ? best->wis : best->pinball;
    if (key < bk) {
      *best = sc;
      *best_name = s->bases[j].name;
    }
  }
  tl_free(q);
  json_object_set_new(metrics, "bases", bj);
  return rc;
}

/* best_base and gain_over_best_base (1 - model/best: positive = better). */
static void gain_json(json_t *metrics, const char *best_name, const qk_score *best,
                      const qk_score *model) {
  if (!best_name) return;
  json_object_set_new(metrics, "best_base",
                      json_pack("{s:s, s:o, s:o}", "name", best_name, "pinball",
                                jnum(best->pinball), "wis", jnum(best->wis)));
  json_object_set_new(metrics, "gain_over_best_base",
                      json_pack("{s:o, s:o}", "pinball", jnum(1.0 - model->pinball / best->pinball),
                                "wis", jnum(1.0 - model->wis / best->wis)));
}

/* SHA-256 over the request tensors used (name, dtype, shape, bytes). */
static void hash_inputs(const md_call *c, char hex[HASH_HEX_LEN + 1]) {
  static const char *const names[] = {"base_quantiles", "features", "targets"};
  hash_ctx *h = hash_sha256_new();
  if (!h) {
    snprintf(hex, HASH_HEX_LEN + 1, "unavailable");
    return;
  }
  for (int i = 0; i < 3; i++) {
    const ts_tensor *t = ts_list_find(c->inputs, names[i]);
    if (!t) continue;
    char head[256];
    int n = snprintf(head, sizeof head, "%s %s %d", names[i], ts_dtype_name(t->dtype), t->ndim);
    hash_update(h, head, (size_t)n);
    hash_update(h, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    hash_update(h, t->data, t->nbytes);
  }
  hash_final_hex(h, hex);
  hash_free(h);
}

/* ---- new versions ------------------------------------------------------- */

/* A writer holding the aggregator params p, the linear bases and, when
 * given, conformal corrections; metadata records the aggregator settings. */
static int new_writer(const qk_state *s, const qa_params *p, const qk_agg *a, int D,
                      const double *lo, const double *hi, const char *conf_method, st_writer **out,
                      ts_err *err) {
  st_writer *w = st_writer_new();
  if (!w) return ts_errf(err, TS_ENOMEM, "out of memory");
  int rc = 0;
  for (int i = 0; i < p->ntensors && !rc; i++)
    rc = st_writer_add(w, p->t[i].name, TS_FP32, p->t[i].ndim, p->t[i].shape, p->t[i].data, err);
  for (int j = 0; j < s->M && !rc; j++) {
    const qk_base *b = &s->bases[j];
    if (b->kind != QB_LINEAR) continue;
    char n[QK_NAME_MAX + 32];
    snprintf(n, sizeof n, "bases.%s.weight", b->name);
    rc = st_writer_add(w, n, TS_FP32, 2, b->w.shape, b->w.data, err);
    snprintf(n, sizeof n, "bases.%s.bias", b->name);
    if (!rc) rc = st_writer_add(w, n, TS_FP32, 1, b->b.shape, b->b.data, err);
  }
  if (!rc && lo) {
    float *f = tl_malloc((size_t)s->K * 2 * sizeof(float));
    int64_t sh[1] = {s->K};
    if (!f) rc = ts_errf(err, TS_ENOMEM, "out of memory");
    for (int k = 0; f && k < s->K; k++) {
      f[k] = (float)lo[k];
      f[s->K + k] = (float)hi[k];
    }
    if (!rc) rc = st_writer_add(w, "conformal.lower", TS_FP32, 1, sh, f, err);
    if (!rc) rc = st_writer_add(w, "conformal.upper", TS_FP32, 1, sh, f + s->K, err);
    if (!rc) rc = st_writer_meta(w, "conformal", conf_method, err);
    tl_free(f);
  }
  json_t *aj = agg_json(a, a->scope == QA_LOCAL ? D : 0);
  char *txt = aj ? jtext_dumps(aj, JT_COMPACT | JT_SORT_KEYS, NULL) : NULL;
  json_decref(aj);
  if (!rc)
    rc = txt ? st_writer_meta(w, "aggregator", txt, err) : ts_errf(err, TS_ENOMEM, "out of memory");
  free(txt); /* jansson's allocator is tl_malloc's, whose free is free(3) */
  if (rc) {
    st_writer_free(w);
    return rc;
  }
  *out = w;
  return 0;
}

/* A nested JSON array of float values with the given shape (1 or 2 dims). */
static json_t *array_json(const float *v, int ndim, const int64_t *shape) {
  json_t *a = json_array();
  if (ndim == 1) {
    for (int64_t i = 0; i < shape[0]; i++) json_array_append_new(a, jnum(v[i]));
    return a;
  }
  for (int64_t i = 0; i < shape[0]; i++)
    json_array_append_new(a, array_json(v + i * shape[1], 1, shape + 1));
  return a;
}

/* "weights" of a fit answer: the learned arrays when small, always the
 * share of each base (global) or the tensor shapes (local). */
static json_t *weights_json(const qk_state *s, const qa_spec *sp, const qa_params *p) {
  json_t *o =
      json_pack("{s:s, s:s, s:b, s:I}", "granularity", qa_granularity_name(sp->gran), "scope",
                scope_name(sp->scope), "simplex", sp->simplex, "parameters", (json_int_t)p->n);
  if (sp->scope == QA_LOCAL) {
    json_t *t = json_object();
    for (int i = 0; i < p->ntensors; i++) {
      json_t *sh = json_array();
      for (int d = 0; d < p->t[i].ndim; d++)
        json_array_append_new(sh, json_integer(p->t[i].shape[d]));
      json_object_set_new(t, p->t[i].name, sh);
    }
    json_object_set_new(o, "tensors", t);
    return o;
  }
  int64_t L = p->n, K = s->K;
  double *W = tl_malloc((size_t)L * sizeof(double));
  if (W && qa_global_weights(sp, p, W, NULL) == 0) {
    json_t *share = json_object();
    for (int j = 0; j < s->M; j++) {
      double acc = 0.0;
      if (sp->gran == QA_COARSE)
        acc = W[j];
      else if (sp->gran == QA_MEDIUM)
        for (int64_t k = 0; k < K; k++) acc += W[j * K + k] / (double)K;
      else
        for (int64_t l = 0; l < K; l++)
          for (int64_t k = 0; k < K; k++) acc += W[(j * K + l) * K + k] / (double)K;
      json_object_set_new(share, s->bases[j].name, jnum(acc));
    }
    json_object_set_new(o, "base_share", share);
    if (L <= QK_MAX_WEIGHTS_JSON) {
      const qa_tensor *t = &p->t[0];
      json_object_set_new(o, "logits", array_json(p->data, t->ndim, t->shape));
      float *wf = tl_malloc((size_t)L * sizeof(float));
      if (wf) {
        for (int64_t i = 0; i < L; i++) wf[i] = (float)W[i];
        json_object_set_new(o, "weights", array_json(wf, t->ndim, t->shape));
        tl_free(wf);
      }
    }
  }
  tl_free(W);
  return o;
}

/* ---- infer -------------------------------------------------------------- */

static int infer(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  qk_rows r;
  int rc = gather(s, c, 0, s->agg.scope == QA_LOCAL ? s->D : 0, &r, err);
  if (rc) return rc;
  int64_t shape[2] = {r.B, s->K};
  float *Q = md_output(c, "quantiles", TS_FP32, 2, shape, err);
  rc = Q ? predict(s, c->pool, &r, 1, Q, err) : -TS_ENOMEM;
  /* corrections stored with allow_infinite make unbounded intervals: the
   * documented +-inf of this kind (docs/quantile.md) */
  c->infinite_ok = s->has_conf;
  rows_free(&r);
  return rc;
}

/* ---- evaluate ----------------------------------------------------------- */

static int evaluate(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  qk_rows r;
  int rc = gather(s, c, 1, s->agg.scope == QA_LOCAL ? s->D : 0, &r, err);
  if (rc) return rc;
  float *Q = tl_malloc((size_t)(r.B * s->K) * sizeof(float));
  json_t *metrics = json_object(), *mm = NULL;
  qk_score sc, best;
  const char *bn;
  if (!Q) rc = ts_errf(err, TS_ENOMEM, "out of memory");
  if (!rc) rc = predict(s, c->pool, &r, 1, Q, err);
  if (!rc) rc = metrics_json(s, r.B, Q, r.y, &mm, &sc, err);
  if (!rc) {
    json_object_set_new(metrics, "model", mm);
    rc = bases_json(s, &r, NULL, r.B, metrics, &best, &bn, err);
  }
  if (!rc) {
    gain_json(metrics, bn, &best, &sc);
    c->result = json_pack("{s:O, s:I, s:o}", "metrics", metrics, "rows", (json_int_t)r.B,
                          "aggregator", agg_json(&s->agg, s->D));
    if (s->has_conf) json_object_set_new(c->result, "conformal", json_string(s->conf_method));
  }
  json_decref(metrics);
  tl_free(Q);
  rows_free(&r);
  return rc;
}

/* ---- fit ---------------------------------------------------------------- */

/* The uniform blend Q [B, K]: at each level the plain mean of the bases'
 * values (what zero logits give a global simplex coarse or medium
 * aggregator), then the model's monotone step, as a version with those
 * weights would serve it. The yardstick a learned aggregator must beat. */
static int uniform_predict(const qk_state *s, pool_t *pool, const qk_rows *r, float *Q,
                           ts_err *err) {
  int64_t MK = (int64_t)s->M * s->K;
  for (int64_t i = 0; i < r->B; i++)
    for (int k = 0; k < s->K; k++) {
      double acc = 0.0;
      for (int j = 0; j < s->M; j++) acc += r->Z[i * MK + (int64_t)j * s->K + k];
      Q[i * s->K + k] = (float)(acc / s->M);
    }
  return qa_monotone_rows(pool, s->mono, r->B, s->K, s->median, Q, err);
}

/* Aggregator settings of a fit: the version's, overridden by
 * parameters.aggregator {...} and by the flat keys (one way per key). */
static int fit_agg(const qk_state *s, const json_t *params, qk_agg *a, ts_err *err) {
  static const char *const flat[] = {"granularity", "scope", "simplex", "hidden", "depth"};
  *a = s->agg;
  json_t *nested = params ? json_object_get(params, "aggregator") : NULL;
  int rc;
  if (nested && (rc = agg_parse(nested, a, "parameters", 0, NULL, err))) return rc;
  json_t *f = json_object();
  if (!f) return ts_errf(err, TS_ENOMEM, "out of memory");
  for (int i = 0; i < 5; i++) {
    json_t *v = params ? json_object_get(params, flat[i]) : NULL;
    if (!v) continue;
    if (nested && json_object_get(nested, flat[i])) {
      json_decref(f);
      return ts_errf(err, TS_EINVAL, "parameters: '%s' is given both flat and inside 'aggregator'",
                     flat[i]);
    }
    json_object_set(f, flat[i], v);
  }
  rc = agg_parse(f, a, "parameters", 0, NULL, err);
  json_decref(f);
  return rc;
}

static int fit_opts(const json_t *p, qa_fit_opts *o, int *warm, ts_err *err) {
  qa_fit_opts_default(o);
  int64_t ep, bs, pat, seed;
  int rc;
  if ((rc = md_param_int(p, "epochs", o->epochs, &ep, err)) ||
      (rc = md_param_int(p, "batch_size", o->batch_size, &bs, err)) ||
      (rc = md_param_int(p, "patience", o->patience, &pat, err)) ||
      (rc = md_param_int(p, "seed", 0, &seed, err)) ||
      (rc = md_param_double(p, "learning_rate", o->learning_rate, &o->learning_rate, err)) ||
      (rc = md_param_double(p, "weight_decay", o->weight_decay, &o->weight_decay, err)) ||
      (rc = md_param_double(p, "dropout", o->dropout, &o->dropout, err)) ||
      (rc = md_param_double(p, "lambda", o->lambda, &o->lambda, err)) ||
      (rc = md_param_double(p, "margin", o->margin, &o->margin, err)) ||
      (rc = md_param_double(p, "validation_fraction", o->validation_fraction,
                            &o->validation_fraction, err)) ||
      (rc = md_param_bool(p, "warm_start", 0, warm, err)))
    return rc;
  if (ep < 1 || ep > 1000000)
    return ts_errf(err, TS_EINVAL, "parameter 'epochs' must be in [1, 1000000]");
  if (bs < 1 || bs > (1 << 30))
    return ts_errf(err, TS_EINVAL, "parameter 'batch_size' must be in [1, 2^30]");
  if (seed < 0) return ts_errf(err, TS_EINVAL, "parameter 'seed' must be >= 0");
  /* ReLU(q_k - q_k' + margin) with margin < 0 would let levels cross by up
   * to |margin| unpenalised: the opposite of a non-crossing penalty */
  if (!(o->margin >= 0.0))
    return ts_errf(err, TS_EINVAL,
                   "parameter 'margin' must be >= 0 (the gap the non-crossing "
                   "penalty asks between neighbouring levels), got %g",
                   o->margin);
  if (pat > 1000000) pat = 1000000;
  o->epochs = (int)ep;
  o->batch_size = (int)bs;
  o->patience = (int)(pat < 0 ? 0 : pat);
  o->seed = (uint64_t)seed;
  return 0;
}

static int fit_on_epoch(void *arg, int epoch, ts_err *err) {
  (void)epoch;
  return md_check_deadline(arg, err);
}

static int fit(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  qk_agg a;
  qa_fit_opts o;
  int warm;
  int rc = fit_agg(s, c->params, &a, err);
  if (!rc) rc = fit_opts(c->params, &o, &warm, err);
  if (rc) return rc;
  /* the new aggregator's D: the model's, or the request's width when the
   * model has none yet (an all-external model turning local) */
  int needD = a.scope == QA_LOCAL ? (s->D ? s->D : -1) : 0;
  if (s->agg.scope == QA_LOCAL && !needD) needD = s->D; /* "before" needs them too */
  qk_rows r;
  if ((rc = gather(s, c, 1, needD, &r, err))) return rc;
  int D = s->D ? s->D : r.D;
  qa_spec sp;
  spec_of(s, &a, D, &sp);
  qa_params p;
  memset(&p, 0, sizeof p);
  qa_fit_report rep;
  memset(&rep, 0, sizeof rep);
  qa_infer nf;
  memset(&nf, 0, sizeof nf);
  json_t *metrics = json_object(), *mj = NULL;
  float *Q = tl_malloc((size_t)(r.B * s->K) * sizeof(float));
  qk_score s_after, s_val, best;
  const char *bn;
  if (!Q || !metrics) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = qa_params_init(&p, &sp, o.seed, err))) goto out;
  if (warm && agg_equal(&a, &s->agg)) memcpy(p.data, s->params.data, (size_t)p.n * sizeof(float));
  /* the deadline (or an abandoned request) stops the fit between epochs, so
   * a worker and the model's fit claim are not held long after the 504 */
  if ((rc = md_check_deadline(c, err))) goto out;
  o.on_epoch = fit_on_epoch;
  o.on_epoch_arg = c;
  if ((rc = qa_fit(c->pool, &sp, &p, r.B, r.Z, r.X, r.y, &o, &rep, err))) goto out;
  if ((rc = md_check_deadline(c, err))) goto out;
  /* A fit that diverged (a learning rate far too large) leaves weights or
   * outputs that are not finite: refuse it here, before a version is
   * written that would fail to load or, worse, load and serve NaN. */
  for (int64_t i = 0; i < p.n; i++)
    if (!isfinite(p.data[i])) {
      rc = ts_errf(err, TS_EINVAL,
                   "fit diverged: weight %lld is not finite; lower "
                   "'learning_rate' (%g)",
                   (long long)i, o.learning_rate);
      goto out;
    }
  /* Every block is scored on qa_fit's own split (rep.rows: the training
   * rows, then the validation rows early stopping measured): before and
   * after on the training rows, validation on the held-out ones, and the
   * yardsticks (uniform, each base) on the held-out rows too, or on the
   * training rows when none were held out, so that they compare with
   * `validation` (or with `after`). */
  const int64_t *tr = rep.rows, *va = rep.rows + rep.n_train;
  const int64_t *cmp = rep.n_val ? va : tr;
  int64_t n_cmp = rep.n_val ? rep.n_val : rep.n_train;
  /* before: this version as it serves (corrections included) */
  if ((rc = predict(s, c->pool, &r, 1, Q, err)) ||
      (rc = metrics_rows(s, tr, rep.n_train, Q, r.y, &mj, NULL, err)))
    goto out;
  json_object_set_new(metrics, "before", mj);
  if ((rc = uniform_predict(s, c->pool, &r, Q, err)) ||
      (rc = metrics_rows(s, cmp, n_cmp, Q, r.y, &mj, NULL, err)))
    goto out;
  json_object_set_new(metrics, "uniform", mj);
  if ((rc = bases_json(s, &r, cmp, n_cmp, metrics, &best, &bn, err))) goto out;
  /* after: the new version's output (no conformal: a fit drops it) */
  if ((rc = qa_infer_init(&nf, &sp, &p, err)) ||
      (rc = qa_infer_run(c->pool, &nf, r.B, r.Z, r.X, Q, err)))
    goto out;
  for (int64_t i = 0; i < r.B * s->K; i++)
    if (!isfinite(Q[i])) {
      rc = ts_errf(err, TS_EINVAL,
                   "fit diverged: the fitted aggregator's quantile %lld of row "
                   "%lld is not finite; lower 'learning_rate' (%g)",
                   (long long)(i % s->K), (long long)(i / s->K), o.learning_rate);
      goto out;
    }
  if ((rc = qa_monotone_rows(c->pool, s->mono, r.B, s->K, s->median, Q, err)) ||
      (rc = metrics_rows(s, tr, rep.n_train, Q, r.y, &mj, &s_after, err)))
    goto out;
  json_object_set_new(metrics, "after", mj);
  s_val = s_after;
  if (!rep.n_val)
    json_object_set_new(metrics, "validation", json_null());
  else if ((rc = metrics_rows(s, va, rep.n_val, Q, r.y, &mj, &s_val, err)))
    goto out;
  else
    json_object_set_new(metrics, "validation", mj);
  gain_json(metrics, bn, &best, &s_val);
  if ((rc = new_writer(s, &p, &a, D, NULL, NULL, NULL, &c->new_weights, err))) goto out;
  char hex[HASH_HEX_LEN + 1];
  hash_inputs(c, hex);
  json_t *fp = json_pack("{s:o, s:i, s:f, s:f, s:i, s:f, s:f, s:f, s:f, s:i, s:I, s:b}",
                         "aggregator", agg_json(&a, D), "epochs", o.epochs, "learning_rate",
                         o.learning_rate, "weight_decay", o.weight_decay, "batch_size",
                         o.batch_size, "dropout", o.dropout, "lambda", o.lambda, "margin", o.margin,
                         "validation_fraction", o.validation_fraction, "patience", o.patience,
                         "seed", (json_int_t)o.seed, "warm_start", warm);
  json_t *rows = json_pack("{s:I, s:I}", "train", (json_int_t)rep.n_train, "validation",
                           (json_int_t)rep.n_val);
  c->new_version_info = json_pack("{s:O, s:O, s:I, s:s}", "fit", fp, "metrics", metrics, "rows",
                                  (json_int_t)r.B, "sha256_training_data", hex);
  c->result =
      json_pack("{s:O, s:o, s:o, s:i, s:i, s:b, s:o}", "metrics", metrics, "weights",
                weights_json(s, &sp, &p), "rows", rows, "epochs_run", rep.epochs_run, "best_epoch",
                rep.best_epoch, "stopped_early", rep.stopped_early, "fit", fp);
  if (!c->result || !c->new_version_info) rc = ts_errf(err, TS_ENOMEM, "out of memory");
out:
  json_decref(metrics);
  qa_infer_free(&nf);
  qa_fit_report_free(&rep);
  qa_params_free(&p);
  tl_free(Q);
  rows_free(&r);
  return rc;
}

/* ---- calibrate ---------------------------------------------------------- */

static int calibrate(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  const char *mname;
  int allow_inf;
  qa_cqr_mode mode;
  int rc = md_param_string(c->params, "method", cqr_http_names[s->cqr_default], &mname, err);
  if (!rc) rc = md_param_bool(c->params, "allow_infinite", s->allow_inf_default, &allow_inf, err);
  if (rc) return rc;
  if (cqr_from_http(mname, &mode))
    return ts_errf(err, TS_EINVAL,
                   "parameter 'method' must be cqr, cqr_asymmetric or per_quantile, "
                   "got '%s'",
                   mname);
  qk_rows r;
  if ((rc = gather(s, c, 1, s->agg.scope == QA_LOCAL ? s->D : 0, &r, err))) return rc;
  float *Q = tl_malloc((size_t)(r.B * s->K) * 2 * sizeof(float));
  double *lo = tl_calloc((size_t)s->K * 2, sizeof(double));
  json_t *metrics = json_object(), *mb = NULL, *ma = NULL;
  if (!Q || !lo || !metrics) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  double *hi = lo + s->K;
  float *raw = Q + r.B * s->K;
  qk_score sb, sa;
  if ((rc = predict(s, c->pool, &r, 1, Q, err)) ||
      (rc = metrics_json(s, r.B, Q, r.y, &mb, &sb, err)))
    goto out;
  json_object_set_new(metrics, "before", mb);
  /* corrections are fitted to the raw aggregate, the quantity they are
   * applied to when serving (before the monotone step) */
  if ((rc = qa_infer_run(c->pool, &s->inf, r.B, r.Z, r.X, raw, err))) goto out;
  if ((rc = qa_cqr_fit(mode, s->K, s->levels, r.B, raw, r.y, allow_inf, lo, hi, err))) goto out;
  /* a finite correction must fit the FP32 the weights store, and applied
   * to these rows it must leave them finite; only allow_infinite's +inf
   * (a rank beyond n) is a documented infinity */
  for (int k = 0; k < s->K && !rc; k++) {
    double cv[2] = {lo[k], hi[k]};
    for (int e = 0; e < 2 && !rc; e++)
      if (isfinite(cv[e]) && !isfinite((float)cv[e]))
        rc = ts_errf(err, TS_EINVAL,
                     "conformal: the %s correction at level %g is %g, beyond FP32: targets and "
                     "quantiles too far apart (values too large in magnitude)",
                     e ? "upper" : "lower", s->levels[k], cv[e]);
  }
  if (rc) goto out;
  qa_cqr_apply(s->K, lo, hi, r.B, raw);
  for (int64_t i = 0; i < r.B * s->K && !rc; i++) {
    int k = (int)(i % s->K);
    if (!isfinite(raw[i]) && isfinite(lo[k]) && isfinite(hi[k]))
      rc = ts_errf(err, TS_EINVAL,
                   "conformal: row %lld, level %g: the corrected quantile overflows FP32 "
                   "(values too large in magnitude)",
                   (long long)(i / s->K), s->levels[k]);
  }
  if (rc) goto out;
  if ((rc = qa_monotone_rows(c->pool, s->mono, r.B, s->K, s->median, raw, err)) ||
      (rc = metrics_json(s, r.B, raw, r.y, &ma, &sa, err)))
    goto out;
  json_object_set_new(metrics, "after", ma);
  if ((rc = new_writer(s, &s->params, &s->agg, s->D, lo, hi, mname, &c->new_weights, err)))
    goto out;
  json_t *jl = json_array(), *ju = json_array();
  for (int k = 0; k < s->K; k++) {
    json_array_append_new(jl, jnum(lo[k]));
    json_array_append_new(ju, jnum(hi[k]));
  }
  json_t *corr = json_pack("{s:s, s:b, s:o, s:o}", "method", mname, "allow_infinite", allow_inf,
                           "lower", jl, "upper", ju);
  char hex[HASH_HEX_LEN + 1];
  hash_inputs(c, hex);
  c->new_version_info = json_pack("{s:{s:s, s:b}, s:O, s:I, s:s}", "calibrate", "method", mname,
                                  "allow_infinite", allow_inf, "metrics", metrics, "rows",
                                  (json_int_t)r.B, "sha256_calibration_data", hex);
  c->result = json_pack("{s:O, s:o, s:I}", "metrics", metrics, "corrections", corr, "rows",
                        (json_int_t)r.B);
  if (!c->result || !c->new_version_info) rc = ts_errf(err, TS_ENOMEM, "out of memory");
out:
  json_decref(metrics);
  tl_free(Q);
  tl_free(lo);
  rows_free(&r);
  return rc;
}

static void free_state(void *state) {
  state_free(state);
}

/* Request parameters (model.h): "levels" (checked by gather, every
 * operation), fit_agg's and fit_opts' names, calibrate's. */
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
/* gather's inputs, whichever the configuration needs */
static const char *const infer_inputs[] = {"features", "base_quantiles", NULL};
static const char *const calibrate_params[] = {"levels", "method", "allow_infinite", NULL};

const md_kind md_kind_quantile_ensemble = {.name = "quantile_ensemble",
                                           .params = {[MD_OP_INFER] = levels_params,
                                                      [MD_OP_FIT] = fit_params,
                                                      [MD_OP_EVALUATE] = levels_params,
                                                      [MD_OP_CALIBRATE] = calibrate_params},
                                           .infer_inputs = infer_inputs,
                                           .load = load,
                                           .signature = signature,
                                           .infer = infer,
                                           .fit = fit,
                                           .evaluate = evaluate,
                                           .calibrate = calibrate,
                                           .free = free_state};
