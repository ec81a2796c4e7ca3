/* ensemble.c - model kind `ensemble`: AWARE-NET two-tier weighted averaging
 * of frozen member models (docs/ensemble.md; the math in methods/aware.h).
 *
 * config.json:
 *   {"kind": "ensemble", "member_output": "logit" | "probability",
 *    "classes": 1 (binary, default) | C, "threshold": 0.5,
 *    "families": [{"name": "xception",
 *                  "members": [{"model": "xc1"}, {"external": "xc2"}, ...]}, ...]}
 * A member is a model of the repository ("model": run by the ensemble on the
 * request's `features`) or external ("external": the caller sends its output).
 * Weights: `tier2.logits` [F] (theta; alpha = softmax(theta)); a version
 * without it (or without a weights file) averages the families uniformly.
 *
 * Inputs: `member_outputs` [B, n] / [B, n, C] in config order, or, when every
 * member is hosted, `features` [B, D], which goes to every member in
 * parallel. Outputs: `probability` [B] / [B, C] and `family_probability`
 * [B, F] / [B, F, C], FP32. fit and evaluate take the same inputs plus
 * `labels` [B].
 *
 * Why members are looked up per request (md_host) and not at load: members
 * are versioned and reloaded on their own, so the ensemble always uses the
 * version each member serves now, and loads whatever order the repository
 * scans models in. Members that are ensembles themselves are refused: that
 * keeps a cycle of ensembles from recursing without end.
 *
 * Memory of a fit on N rows: the request's tensors, P [N, F, Cc] doubles,
 * labels, and aw_fit's permutation; member outputs sent as aligned FP32 are
 * read in place, any other dtype is converted once and freed as soon as P is
 * made. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "../base/hash.h"
#include "../base/mem.h"
#include "../base/safetensors.h"
#include "../methods/aware.h"
#include "../methods/calib.h"
#include "learn_cfg.h"
#include "model.h"

extern const md_kind md_kind_ensemble;

typedef struct ens_state {
  char *model_name;
  aw_spec spec;
  int Cc;
  int *family_size;      /* [F] */
  char **family_names;   /* [F] */
  char **member_names;   /* [n]: the hosted model or the external name */
  unsigned char *hosted; /* [n] */
  int n_hosted;
  double threshold;
  double *theta;      /* [F] */
  double temperature; /* calibration.temperature, 1 when the version has none */
} ens_state;

/* ---- load --------------------------------------------------------------- */

static void free_state(void *p) {
  ens_state *s = p;
  if (!s) return;
  for (int f = 0; s->family_names && f < s->spec.F; f++) tl_free(s->family_names[f]);
  for (int m = 0; s->member_names && m < s->spec.n; m++) tl_free(s->member_names[m]);
  tl_free(s->family_names);
  tl_free(s->member_names);
  tl_free(s->family_size);
  tl_free(s->hosted);
  tl_free(s->theta);
  tl_free(s->model_name);
  tl_free(s);
}

/* Refuses keys of a nested config object other than `allowed`. */
static int check_obj_keys(const json_t *o, const char *const *allowed, const char *where,
                          ts_err *err) {
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)o, key, v) {
    int ok = 0;
    for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(*a, key) == 0;
    if (!ok) return ts_errf(err, TS_EINVAL, "config.json: %s: unknown key '%s'", where, key);
  }
  return 0;
}

static int parse_families(ens_state *s, const json_t *fams, const char *self, ts_err *err) {
  static const char *const fam_keys[] = {"name", "members", NULL};
  static const char *const mem_keys[] = {"model", "external", NULL};
  if (!json_is_array(fams) || json_array_size(fams) == 0 || json_array_size(fams) > AW_MAX_FAMILIES)
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'families' must be a list of 1 to %d families, each "
                   "{\"name\": ..., \"members\": [{\"model\": ...} | {\"external\": ...}, ...]}",
                   AW_MAX_FAMILIES);
  int F = (int)json_array_size(fams), n = 0;
  for (int f = 0; f < F; f++) {
    const json_t *mem = json_object_get(json_array_get(fams, (size_t)f), "members");
    n += json_is_array(mem) ? (int)json_array_size(mem) : 0;
  }
  s->spec.F = F;
  s->family_size = tl_calloc((size_t)F, sizeof(int));
  s->family_names = tl_calloc((size_t)F, sizeof(char *));
  s->member_names = tl_calloc((size_t)(n ? n : 1), sizeof(char *));
  s->hosted = tl_calloc((size_t)(n ? n : 1), 1);
  if (!s->family_size || !s->family_names || !s->member_names || !s->hosted)
    return ts_errf(err, TS_ENOMEM, "out of memory");
  s->spec.n = n; /* free_state frees the names set so far when parsing fails */
  int m = 0, rc;
  for (int f = 0; f < F; f++) {
    const json_t *fo = json_array_get(fams, (size_t)f);
    char where[320];
    snprintf(where, sizeof where, "family %d", f);
    if (!json_is_object(fo))
      return ts_errf(err, TS_EINVAL, "config.json: %s is not an object", where);
    if ((rc = check_obj_keys(fo, fam_keys, where, err))) return rc;
    const char *fname = json_string_value(json_object_get(fo, "name"));
    if (!fname || !*fname)
      return ts_errf(err, TS_EINVAL, "config.json: %s needs a non-empty string 'name'", where);
    for (int g = 0; g < f; g++)
      if (strcmp(s->family_names[g], fname) == 0)
        return ts_errf(err, TS_EINVAL, "config.json: family name '%.100s' is used twice", fname);
    if (!(s->family_names[f] = tl_strdup(fname))) return ts_errf(err, TS_ENOMEM, "out of memory");
    snprintf(where, sizeof where, "family '%.200s'", fname);
    const json_t *mem = json_object_get(fo, "members");
    if (!json_is_array(mem) || json_array_size(mem) == 0)
      return ts_errf(err, TS_EINVAL, "config.json: %s needs a non-empty list 'members'", where);
    s->family_size[f] = (int)json_array_size(mem);
    for (size_t i = 0; i < json_array_size(mem); i++, m++) {
      const json_t *mo = json_array_get(mem, i);
      char mwhere[400];
      snprintf(mwhere, sizeof mwhere, "%s, member %zu", where, i);
      if (!json_is_object(mo))
        return ts_errf(err, TS_EINVAL, "config.json: %s is not an object", mwhere);
      if ((rc = check_obj_keys(mo, mem_keys, mwhere, err))) return rc;
      const char *model = json_string_value(json_object_get(mo, "model"));
      const char *ext = json_string_value(json_object_get(mo, "external"));
      if ((model != NULL) == (ext != NULL) || (model && !*model) || (ext && !*ext))
        return ts_errf(err, TS_EINVAL,
                       "config.json: %s must be {\"model\": \"<hosted model>\"} or "
                       "{\"external\": \"<name>\"}, with a non-empty string",
                       mwhere);
      const char *name = model ? model : ext;
      for (int k = 0; k < m; k++)
        if (strcmp(s->member_names[k], name) == 0)
          return ts_errf(err, TS_EINVAL, "config.json: member '%.100s' is listed twice", name);
      if (model && self && strcmp(model, self) == 0)
        return ts_errf(err, TS_EINVAL, "config.json: %s: an ensemble cannot be its own member",
                       mwhere);
      if (!(s->member_names[m] = tl_strdup(name))) return ts_errf(err, TS_ENOMEM, "out of memory");
      s->hosted[m] = model != NULL;
      s->n_hosted += model != NULL;
    }
  }
  return 0;
}

static int load(const md_load_ctx *ctx, void **state, ts_err *err) {
  static const char *const keys[] = {"member_output", "classes", "families", "threshold",
                                     "log",           "refit",   NULL};
  const json_t *cfg = ctx->config;
  int rc = md_config_check_keys(cfg, keys, err);
  lc_config lcfg; /* the learning loop's keys, checked here (daemon/learn reads them) */
  if (!rc) rc = lc_parse(cfg, &md_kind_ensemble, &lcfg, err);
  if (rc) return rc;
  ens_state *s = tl_calloc(1, sizeof *s);
  if (!s) return ts_errf(err, TS_ENOMEM, "out of memory");
  if (ctx->model_name && !(s->model_name = tl_strdup(ctx->model_name))) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  const char *mo = json_string_value(json_object_get(cfg, "member_output"));
  if (!mo || (strcmp(mo, "logit") != 0 && strcmp(mo, "probability") != 0)) {
    rc = ts_errf(err, TS_EINVAL,
                 "config.json: 'member_output' must be \"logit\" or \"probability\" (what "
                 "every member outputs)");
    goto fail;
  }
  s->spec.input_logits = strcmp(mo, "logit") == 0;
  const json_t *cl = json_object_get(cfg, "classes");
  if (cl &&
      (!json_is_integer(cl) || json_integer_value(cl) < 1 || json_integer_value(cl) > 1000000)) {
    rc = ts_errf(err, TS_EINVAL,
                 "config.json: 'classes' must be 1 (binary: one logit or probability per "
                 "member) or the number of classes C >= 2");
    goto fail;
  }
  s->spec.C = cl ? (int)json_integer_value(cl) : 1;
  const json_t *th = json_object_get(cfg, "threshold");
  s->threshold = 0.5;
  if (th) {
    if (!json_is_number(th) || !(json_number_value(th) >= 0 && json_number_value(th) <= 1)) {
      rc = ts_errf(err, TS_EINVAL, "config.json: 'threshold' must be a number in [0, 1]");
      goto fail;
    }
    s->threshold = json_number_value(th);
  }
  if ((rc = parse_families(s, json_object_get(cfg, "families"), ctx->model_name, err))) goto fail;
  s->spec.family_size = s->family_size;
  s->spec.family_names = (const char *const *)s->family_names;
  s->spec.member_names = (const char *const *)s->member_names;
  if ((rc = aw_spec_check(&s->spec, err))) goto fail;
  s->Cc = aw_cc(&s->spec);
  int F = s->spec.F;
  if (!(s->theta = tl_calloc((size_t)F, sizeof(double)))) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  if (ctx->weights && st_find(ctx->weights, "tier2.logits") >= 0) {
    ts_tensor t;
    int64_t shape[1] = {F};
    if ((rc = st_get_f32(ctx->weights, "tier2.logits", 1, shape, &t, err))) {
      ts_err_prefix(err, "ensemble with %d families", F);
      goto fail;
    }
    for (int f = 0; f < F; f++) s->theta[f] = ((const float *)t.data)[f];
    ts_free(&t);
  }
  s->temperature = 1.0;
  if (ctx->weights && st_find(ctx->weights, "calibration.temperature") >= 0) {
    ts_tensor t;
    int64_t shape[1] = {1};
    if ((rc = st_get_f32(ctx->weights, "calibration.temperature", 1, shape, &t, err))) goto fail;
    double T = ((const float *)t.data)[0];
    ts_free(&t);
    if (!(T >= CAL_T_MIN && T <= CAL_T_MAX)) {
      rc = ts_errf(err, TS_EINVAL, "calibration.temperature is %g; expected in [%g, %g]", T,
                   CAL_T_MIN, CAL_T_MAX);
      goto fail;
    }
    s->temperature = T;
  }
  *state = s;
  return 0;
fail:
  free_state(s);
  return rc;
}

static void signature(void *state, md_sig *sig) {
  ens_state *s = state;
  memset(sig, 0, sizeof *sig);
  int C = s->spec.C, multi = C > 1;
  if (s->n_hosted == s->spec.n) md_sig_add(sig, MD_IN, "features", TS_FP32, 2, -1, -1, 0);
  md_sig_add(sig, MD_IN, "member_outputs", TS_FP32, multi ? 3 : 2, -1, s->spec.n, C);
  md_sig_add(sig, MD_OUT, "probability", TS_FP32, multi ? 2 : 1, -1, C, 0);
  md_sig_add(sig, MD_OUT, "family_probability", TS_FP32, multi ? 3 : 2, -1, s->spec.F, C);
}

/* ---- member outputs ------------------------------------------------------ */

/* The member outputs of a request: Z [B, n, Cc] FP32. *owned says whether Z
 * was allocated here (tl_free it) or borrowed from the request. */
typedef struct ens_z {
  float *Z;
  int64_t B;
  int owned;
  const char *source; /* names the input in error messages */
} ens_z;

static void ens_z_free(ens_z *z) {
  if (z->owned) tl_free(z->Z);
  z->Z = NULL;
  z->owned = 0;
}

typedef struct ens_run {
  const ens_state *s;
  md_call *c;
  const ts_tensor *features;
  int64_t B;
  float *Z;
  int *rc;      /* [n] */
  ts_err *errs; /* [n] */
} ens_run;

/* Runs hosted member m on the whole batch and writes its column of Z. */
static int run_member(ens_run *r, int m, ts_err *err) {
  const ens_state *s = r->s;
  const char *name = s->member_names[m];
  md_call mc;
  md_hosted held;
  int rc = md_run_hosted(r->c, "member", name, r->features, &mc, &held, err);
  if (rc) return rc;
  float *tmp = NULL;
  if (held.kind == &md_kind_ensemble) {
    rc = ts_errf(err, TS_EINVAL, "member '%s' is itself an ensemble; list its members instead",
                 name);
    goto out;
  }
  if (mc.outputs.n < 1) {
    rc = ts_errf(err, TS_EINVAL, "it returned no output");
    goto prefix;
  }
  const ts_tensor *o = &mc.outputs.items[0];
  int Cc = s->Cc;
  int ok = s->spec.C > 1 ? (o->ndim == 2 && o->shape[0] == r->B && o->shape[1] == s->spec.C)
                         : ((o->ndim == 1 && o->shape[0] == r->B) ||
                            (o->ndim == 2 && o->shape[0] == r->B && o->shape[1] == 1));
  if (!ok) {
    char got[128];
    if (s->spec.C > 1)
      rc = ts_errf(err, TS_EINVAL,
                   "output '%s' has shape %s; the ensemble needs [%lld, %d] "
                   "(one %s per class)",
                   o->name ? o->name : "?", ts_shape_str(o->shape, o->ndim, got, sizeof got),
                   (long long)r->B, s->spec.C, s->spec.input_logits ? "logit" : "probability");
    else
      rc =
          ts_errf(err, TS_EINVAL,
                  "output '%s' has shape %s; the ensemble needs [%lld, 1] or "
                  "[%lld] (one %s per row)",
                  o->name ? o->name : "?", ts_shape_str(o->shape, o->ndim, got, sizeof got),
                  (long long)r->B, (long long)r->B, s->spec.input_logits ? "logit" : "probability");
    goto prefix;
  }
  if ((rc = ts_to_f32(o, 1, &tmp, err))) goto prefix;
  int64_t n = s->spec.n;
  for (int64_t b = 0; b < r->B; b++)
    memcpy(r->Z + (b * n + m) * Cc, tmp + b * Cc, sizeof(float) * (size_t)Cc);
  goto out;
prefix:
  ts_err_prefix(err, "member '%s'", name);
out:
  tl_free(tmp);
  md_hosted_done(&mc, &held);
  return rc;
}

static void run_range(void *arg, int64_t m0, int64_t m1) {
  ens_run *r = arg;
  for (int64_t m = m0; m < m1; m++) r->rc[m] = run_member(r, (int)m, &r->errs[m]);
}

static int run_hosted(const ens_state *s, md_call *c, const ts_tensor *features, ens_z *z,
                      ts_err *err) {
  if (features->ndim != 2) {
    char got[128];
    return ts_errf(err, TS_EINVAL, "input 'features': expected shape [B, D], got %s",
                   ts_shape_str(features->shape, features->ndim, got, sizeof got));
  }
  int n = s->spec.n;
  int64_t B = features->shape[0];
  size_t cells = (size_t)B * (size_t)n * (size_t)s->Cc;
  ens_run r = {.s = s, .c = c, .features = features, .B = B};
  r.Z = tl_malloc(sizeof(float) * (cells ? cells : 1));
  r.rc = tl_calloc((size_t)n, sizeof(int));
  r.errs = tl_calloc((size_t)n, sizeof(ts_err));
  int rc = 0;
  if (!r.Z || !r.rc || !r.errs) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory for the outputs of %d members on %lld rows", n,
                 (long long)B);
    goto out;
  }
  /* one member per task: members are few and each runs its own kernels
   * (which may spread over the pool too: nested parallel_for is allowed) */
  pool_parallel_for(c->pool, n, 1, run_range, &r);
  for (int m = 0; m < n; m++)
    if (r.rc[m]) {
      *err = r.errs[m];
      rc = r.rc[m];
      goto out;
    }
  z->Z = r.Z;
  z->B = B;
  z->owned = 1;
  z->source = "hosted member outputs";
  r.Z = NULL;
out:
  tl_free(r.Z);
  tl_free(r.rc);
  tl_free(r.errs);
  return rc;
}

static int member_outputs(const ens_state *s, md_call *c, ens_z *z, ts_err *err) {
  memset(z, 0, sizeof *z);
  const ts_tensor *mo = c->inputs ? ts_list_find(c->inputs, "member_outputs") : NULL;
  const ts_tensor *ft = c->inputs ? ts_list_find(c->inputs, "features") : NULL;
  int n = s->spec.n, C = s->spec.C;
  const char *what = s->spec.input_logits ? "logit" : "probability";
  if (mo && ft)
    return ts_errf(err, TS_EINVAL,
                   "send either input 'features' (the ensemble runs its hosted "
                   "members) or input 'member_outputs', not both");
  if (!mo && !ft) {
    if (s->n_hosted == n)
      return ts_errf(err, TS_EINVAL,
                     "missing input: send 'features' [B, D] (every member is "
                     "hosted) or 'member_outputs' %s",
                     C > 1 ? "[B, n, C]" : "[B, n]");
    return ts_errf(err, TS_EINVAL,
                   "missing input 'member_outputs': expected %s with n = %d "
                   "members in config order%s",
                   C > 1 ? "[B, n, C]" : "[B, n]", n, C > 1 ? " and C classes" : "");
  }
  if (ft) {
    if (s->n_hosted < n) {
      int m = 0;
      while (s->hosted[m]) m++;
      return ts_errf(err, TS_EINVAL,
                     "input 'member_outputs' is required: member '%s' is "
                     "external (the request carries its output), so 'features' alone cannot "
                     "score it",
                     s->member_names[m]);
    }
    return run_hosted(s, c, ft, z, err);
  }
  int ok = C > 1 ? (mo->ndim == 3 && mo->shape[1] == n && mo->shape[2] == C)
                 : (mo->ndim == 2 && mo->shape[1] == n);
  if (!ok) {
    char got[128];
    ts_shape_str(mo->shape, mo->ndim, got, sizeof got);
    if (C > 1)
      return ts_errf(err, TS_EINVAL,
                     "input 'member_outputs': expected shape [B, %d, %d] (a %s "
                     "per class for each of the %d members, in config order), got %s",
                     n, C, what, n, got);
    return ts_errf(err, TS_EINVAL,
                   "input 'member_outputs': expected shape [B, %d] (one %s for "
                   "each of the %d members, in config order), got %s",
                   n, what, n, got);
  }
  z->B = mo->shape[0];
  z->source = "input 'member_outputs'";
  if (mo->dtype == TS_FP32 && ((uintptr_t)mo->data % sizeof(float)) == 0) {
    z->Z = mo->data; /* read in place: it lives as long as the call */
    return 0;
  }
  int rc = ts_to_f32(mo, 1, &z->Z, err); /* NaN passes here so the check below names the row */
  if (!rc) z->owned = 1;
  return rc;
}

/* P [B, F, Cc] from member outputs (which are then no longer needed). */
static int family_probs(const ens_state *s, md_call *c, ens_z *z, double **P, ts_err *err) {
  size_t cells = (size_t)z->B * (size_t)s->spec.F * (size_t)s->Cc;
  *P = tl_malloc(sizeof(double) * (cells ? cells : 1));
  if (!*P) {
    ens_z_free(z);
    return ts_errf(err, TS_ENOMEM, "out of memory for the family probabilities of %lld rows",
                   (long long)z->B);
  }
  int rc = aw_family_probs(&s->spec, z->B, z->Z, *P, c->pool, err);
  if (rc) {
    ts_err_prefix(err, "%s", z->source);
    tl_free(*P);
    *P = NULL;
  }
  ens_z_free(z);
  return rc;
}

/* ---- infer ---------------------------------------------------------------- */

static int infer(void *state, md_call *c, ts_err *err) {
  ens_state *s = state;
  ens_z z;
  int rc = member_outputs(s, c, &z, err);
  if (rc) return rc;
  int64_t B = z.B;
  double *P;
  if ((rc = family_probs(s, c, &z, &P, err))) return rc;
  int F = s->spec.F, Cc = s->Cc, C = s->spec.C;
  double *y = tl_malloc(sizeof(double) * (size_t)(B ? B : 1) * (size_t)Cc);
  if (!y) {
    tl_free(P);
    return ts_errf(err, TS_ENOMEM, "out of memory for %lld rows", (long long)B);
  }
  aw_combine(&s->spec, B, P, s->theta, y);
  if (s->temperature != 1.0) cal_temp_apply(B, C, y, s->temperature, y);
  int64_t ps[2] = {B, C}, fs[3] = {B, F, C};
  float *po = md_output(c, "probability", TS_FP32, C > 1 ? 2 : 1, ps, err);
  float *fo = po ? md_output(c, "family_probability", TS_FP32, C > 1 ? 3 : 2, fs, err) : NULL;
  if (!po || !fo)
    rc = -TS_ENOMEM;
  else {
    for (int64_t i = 0; i < B * Cc; i++) po[i] = (float)y[i];
    for (int64_t i = 0; i < B * F * Cc; i++) fo[i] = (float)P[i];
  }
  tl_free(y);
  tl_free(P);
  return rc;
}

/* ---- labelled requests ----------------------------------------------------- */

/* labels [B] as int32, checked against the classes. */
static int read_labels(const ens_state *s, const md_call *c, int64_t B, int32_t **out,
                       ts_err *err) {
  const ts_tensor *t;
  int rc = md_input(c, "labels", &t, err);
  if (rc) {
    ts_err_prefix(err, "fit, evaluate and calibrate need labels [B] (%s)",
                  s->spec.C > 1 ? "a class index per row" : "0 or 1 per row");
    return rc;
  }
  if (t->ndim != 1 || t->shape[0] != B) {
    char got[128];
    return ts_errf(err, TS_EINVAL,
                   "input 'labels': expected shape [%lld] (one label for each "
                   "of the %lld rows), got %s",
                   (long long)B, (long long)B, ts_shape_str(t->shape, t->ndim, got, sizeof got));
  }
  if (t->dtype == TS_BYTES || t->dtype == TS_BOOL)
    return ts_errf(err, TS_EINVAL,
                   "input 'labels': datatype %s; expected INT32, INT64 or "
                   "FP32/FP64 holding integers",
                   ts_dtype_name(t->dtype));
  int64_t *l64;
  if ((rc = ts_to_i64(t, &l64, err))) return rc;
  int32_t *l = tl_malloc(sizeof(int32_t) * (size_t)(B ? B : 1));
  if (!l) {
    tl_free(l64);
    return ts_errf(err, TS_ENOMEM, "out of memory for %lld labels", (long long)B);
  }
  int C = s->spec.C;
  for (int64_t b = 0; b < B; b++) {
    int64_t v = l64[b];
    if (C > 1 ? (v < 0 || v >= C) : (v != 0 && v != 1)) {
      rc = C > 1 ? ts_errf(err, TS_EINVAL,
                           "input 'labels': row %lld: %lld is not a class index "
                           "in [0, %d)",
                           (long long)b, (long long)v, C)
                 : ts_errf(err, TS_EINVAL, "input 'labels': row %lld: %lld is not 0 or 1",
                           (long long)b, (long long)v);
      tl_free(l64);
      tl_free(l);
      return rc;
    }
    l[b] = (int32_t)v;
  }
  tl_free(l64);
  *out = l;
  return 0;
}

/* Everything a labelled request needs: P, labels, N. */
typedef struct ens_data {
  double *P;
  int32_t *labels;
  int64_t N;
} ens_data;

static void ens_data_free(ens_data *d) {
  tl_free(d->P);
  tl_free(d->labels);
  memset(d, 0, sizeof *d);
}

static int labelled(const ens_state *s, md_call *c, ens_data *d, ts_err *err) {
  memset(d, 0, sizeof *d);
  ens_z z;
  int rc = member_outputs(s, c, &z, err);
  if (rc) return rc;
  d->N = z.B;
  if (d->N < 1) {
    ens_z_free(&z);
    return ts_errf(err, TS_EINVAL, "no labelled rows: the inputs have B = 0");
  }
  if ((rc = read_labels(s, c, d->N, &d->labels, err))) {
    ens_z_free(&z);
    return rc;
  }
  if ((rc = family_probs(s, c, &z, &d->P, err))) ens_data_free(d);
  return rc;
}

static json_t *jnum(double v) {
  return isfinite(v) ? json_real(v) : json_null();
}

static json_t *scores_json(const met_scores *m) {
  return json_pack("{s:o, s:o, s:o, s:o}", "log_loss", jnum(m->log_loss), "auc", jnum(m->auc),
                   "accuracy", jnum(m->accuracy), "f1", jnum(m->f1));
}

static json_t *doubles_json(const double *v, int n) {
  json_t *a = json_array();
  for (int i = 0; a && i < n; i++) json_array_append_new(a, jnum(v[i]));
  return a;
}

static int read_threshold(const ens_state *s, const md_call *c, double *out, ts_err *err) {
  int rc = md_param_double(c->params, "threshold", s->threshold, out, err);
  if (!rc && !(*out >= 0 && *out <= 1))
    rc = ts_errf(err, TS_EINVAL, "parameter 'threshold': %g; expected in [0, 1]", *out);
  return rc;
}

/* Per-family scores under each family's name. */
static json_t *families_json(const ens_state *s, const met_scores *fm) {
  json_t *o = json_object();
  for (int f = 0; o && f < s->spec.F; f++)
    json_object_set_new(o, s->family_names[f], scores_json(&fm[f]));
  return o;
}

/* ---- calibration ------------------------------------------------------------ */

/* y [N, Cc] as served: the mixture under theta, then the temperature T. */
static int served_probs(const ens_state *s, const ens_data *d, const double *theta, double T,
                        double **out, ts_err *err) {
  double *y = tl_malloc(sizeof(double) * (size_t)d->N * (size_t)s->Cc);
  if (!y) return ts_errf(err, TS_ENOMEM, "out of memory for %lld rows", (long long)d->N);
  aw_combine(&s->spec, d->N, d->P, theta, y);
  if (T != 1.0) cal_temp_apply(d->N, s->spec.C, y, T, y);
  *out = y;
  return 0;
}

static int read_bins(const md_call *c, int *out, ts_err *err) {
  int64_t nb;
  int rc = md_param_int(c->params, "ece_bins", 15, &nb, err);
  if (!rc && (nb < 1 || nb > CAL_MAX_BINS))
    rc = ts_errf(err, TS_EINVAL, "parameter 'ece_bins': %lld; expected 1 to %d", (long long)nb,
                 CAL_MAX_BINS);
  *out = (int)nb;
  return rc;
}

/* {"ece", "mce", "bins": n, "reliability": [{lower, upper, count, confidence,
 * accuracy}, ...]} of served probabilities y. */
static json_t *reliability_json(const ens_state *s, const ens_data *d, const double *y, int nb,
                                ts_err *err) {
  cal_bin *bins = tl_malloc(sizeof *bins * (size_t)nb);
  json_t *arr = json_array();
  if (!bins || !arr) {
    tl_free(bins);
    json_decref(arr);
    ts_errf(err, TS_ENOMEM, "out of memory");
    return NULL;
  }
  double ece, mce;
  cal_reliability(d->N, s->spec.C, y, d->labels, nb, bins, &ece, &mce);
  for (int b = 0; b < nb; b++)
    json_array_append_new(
        arr, json_pack("{s:f, s:f, s:I, s:o, s:o}", "lower", (double)b / nb, "upper",
                       (double)(b + 1) / nb, "count", (json_int_t)bins[b].count, "confidence",
                       jnum(bins[b].confidence), "accuracy", jnum(bins[b].accuracy)));
  tl_free(bins);
  json_t *o = json_pack("{s:o, s:o, s:i, s:o}", "ece", jnum(ece), "mce", jnum(mce), "bins", nb,
                        "reliability", arr);
  if (!o) ts_errf(err, TS_ENOMEM, "out of memory");
  return o;
}

/* The served probabilities' metrics and reliability under (theta, T). */
static int served_scores(const ens_state *s, const ens_data *d, const double *theta, double T,
                         double thr, int nb, json_t **metrics, json_t **calib, ts_err *err) {
  double *y = NULL;
  int rc = served_probs(s, d, theta, T, &y, err);
  if (rc) return rc;
  met_scores m;
  if (!(rc = met_all(d->N, s->spec.C, y, d->labels, thr, &m, err))) {
    *metrics = scores_json(&m);
    *calib = reliability_json(s, d, y, nb, err);
    if (*calib) json_object_set_new(*calib, "temperature", json_real(T));
    if (!*metrics || !*calib) {
      json_decref(*metrics);
      json_decref(*calib);
      *metrics = *calib = NULL;
      rc = ts_errf(err, TS_ENOMEM, "out of memory");
    }
  }
  tl_free(y);
  return rc;
}

/* ---- evaluate -------------------------------------------------------------- */

static int evaluate(void *state, md_call *c, ts_err *err) {
  ens_state *s = state;
  double thr;
  int nb;
  int rc = read_threshold(s, c, &thr, err);
  if (!rc) rc = read_bins(c, &nb, err);
  if (rc) return rc;
  ens_data d;
  if ((rc = labelled(s, c, &d, err))) return rc;
  int F = s->spec.F;
  met_scores uni, *fm = tl_calloc((size_t)F, sizeof *fm);
  if (!fm) {
    ens_data_free(&d);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  json_t *ens = NULL, *cal = NULL;
  rc = served_scores(s, &d, s->theta, s->temperature, thr, nb, &ens, &cal, err);
  if (!rc) rc = aw_eval(&s->spec, d.P, d.labels, NULL, d.N, NULL, thr, &uni, err);
  for (int f = 0; f < F && !rc; f++)
    rc = aw_eval_family(&s->spec, d.P, d.labels, NULL, d.N, f, thr, &fm[f], err);
  if (!rc) {
    double alpha[AW_MAX_FAMILIES];
    aw_alpha(F, s->theta, alpha);
    c->result = json_pack("{s:O, s:O, s:o, s:o, s:I, s:{s:o}}", "metrics", ens, "calibration", cal,
                          "families", families_json(s, fm), "uniform", scores_json(&uni), "rows",
                          (json_int_t)d.N, "weights", "alpha", doubles_json(alpha, F));
    if (!c->result) rc = ts_errf(err, TS_ENOMEM, "out of memory");
  }
  json_decref(ens);
  json_decref(cal);
  tl_free(fm);
  ens_data_free(&d);
  return rc;
}

/* ---- fit -------------------------------------------------------------------- */

typedef struct ens_fit_ctx {
  md_call *c;
  ts_err err;
} ens_fit_ctx;

/* Between epochs: stop when the request was abandoned or its deadline passed. */
static int on_epoch(void *arg, int epoch, double train_loss, double val_loss) {
  (void)epoch;
  (void)train_loss;
  (void)val_loss;
  ens_fit_ctx *x = arg;
  return md_check_deadline(x->c, &x->err);
}

/* The sha256 of the request's tensors (name, dtype, shape, bytes each, in
 * request order), so that a version records which data made it. */
static int hash_inputs(const ts_list *in, char hex[HASH_HEX_LEN + 1], ts_err *err) {
  hash_ctx *h = hash_sha256_new();
  if (!h) return ts_errf(err, TS_ENOMEM, "out of memory");
  for (int i = 0; i < in->n; i++) {
    const ts_tensor *t = &in->items[i];
    const char *nm = t->name ? t->name : "";
    const char *dt = ts_dtype_name(t->dtype);
    hash_update(h, nm, strlen(nm) + 1);
    hash_update(h, dt, strlen(dt) + 1);
    int64_t nd = t->ndim;
    hash_update(h, &nd, sizeof nd);
    hash_update(h, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    if (t->nbytes) hash_update(h, t->data, t->nbytes);
  }
  hash_final_hex(h, hex);
  hash_free(h);
  return 0;
}

static int int_param(const json_t *params, const char *key, int64_t def, int64_t lo, int64_t hi,
                     int64_t *out, ts_err *err) {
  int rc = md_param_int(params, key, def, out, err);
  if (!rc && (*out < lo || *out > hi))
    rc = ts_errf(err, TS_EINVAL, "parameter '%s': %lld; expected %lld to %lld", key,
                 (long long)*out, (long long)lo, (long long)hi);
  return rc;
}

static int fit_opts(const md_call *c, aw_fit_opts *o, int *warm, ts_err *err) {
  aw_fit_opts_default(o);
  const json_t *p = c->params;
  int64_t epochs, bs, seed, patience;
  int rc;
  if ((rc = int_param(p, "epochs", o->epochs, 0, 1000000, &epochs, err))) return rc;
  if ((rc = int_param(p, "batch_size", o->batch_size, 0, INT64_MAX, &bs, err))) return rc;
  if ((rc = int_param(p, "seed", (int64_t)o->seed, 0, INT64_MAX, &seed, err))) return rc;
  if ((rc = int_param(p, "patience", o->patience, 0, 1000000, &patience, err))) return rc;
  if ((rc = md_param_double(p, "learning_rate", o->learning_rate, &o->learning_rate, err)) ||
      (rc = md_param_double(p, "weight_decay", o->weight_decay, &o->weight_decay, err)) ||
      (rc = md_param_double(p, "l2", o->l2, &o->l2, err)) ||
      (rc = md_param_double(p, "min_delta", o->min_delta, &o->min_delta, err)) ||
      (rc = md_param_double(p, "validation_fraction", o->validation_fraction,
                            &o->validation_fraction, err)) ||
      (rc = md_param_bool(p, "warm_start", 0, warm, err)))
    return rc;
  o->epochs = (int)epochs;
  o->batch_size = bs;
  o->seed = (uint64_t)seed;
  o->patience = (int)patience;
  return 0;
}

static json_t *fit_params_json(const aw_fit_opts *o, int warm, double thr) {
  return json_pack("{s:i, s:f, s:f, s:f, s:I, s:f, s:I, s:i, s:f, s:b, s:f}", "epochs", o->epochs,
                   "learning_rate", o->learning_rate, "weight_decay", o->weight_decay, "l2", o->l2,
                   "batch_size", (json_int_t)o->batch_size, "validation_fraction",
                   o->validation_fraction, "seed", (json_int_t)o->seed, "patience", o->patience,
                   "min_delta", o->min_delta, "warm_start", warm, "threshold", thr);
}

/* The parent version's theta on the training rows of the fit's split (the
 * same rows as `before` and `after`): what the fit replaces. */
static int eval_served(const ens_state *s, const ens_data *d, const aw_fit_opts *o, double thr,
                       met_scores *out, ts_err *err) {
  int64_t *perm = tl_malloc(sizeof *perm * (size_t)d->N), n_val;
  if (!perm) return ts_errf(err, TS_ENOMEM, "out of memory for %lld row indices", (long long)d->N);
  aw_split(d->N, o->validation_fraction, o->seed, perm, &n_val);
  int rc;
  if (s->temperature == 1.0) {
    rc = aw_eval(&s->spec, d->P, d->labels, perm + n_val, d->N - n_val, s->theta, thr, out, err);
  } else {
    /* a calibrated parent serves its temperature too: score what it serves */
    int64_t m = d->N - n_val, Cc = s->Cc;
    double *y = NULL, *ys = tl_malloc(sizeof(double) * (size_t)(m ? m : 1) * (size_t)Cc);
    int32_t *ls = tl_malloc(sizeof(int32_t) * (size_t)(m ? m : 1));
    rc = ys && ls ? served_probs(s, d, s->theta, s->temperature, &y, err)
                  : ts_errf(err, TS_ENOMEM, "out of memory for %lld rows", (long long)m);
    for (int64_t i = 0; !rc && i < m; i++) {
      int64_t r = perm[n_val + i];
      memcpy(ys + i * Cc, y + r * Cc, sizeof(double) * (size_t)Cc);
      ls[i] = d->labels[r];
    }
    if (!rc) rc = met_all(m, s->spec.C, ys, ls, thr, out, err);
    tl_free(y);
    tl_free(ys);
    tl_free(ls);
  }
  tl_free(perm);
  return rc;
}

static int fit(void *state, md_call *c, ts_err *err) {
  ens_state *s = state;
  aw_fit_opts o;
  int warm;
  double thr;
  int rc = fit_opts(c, &o, &warm, err);
  if (!rc) rc = read_threshold(s, c, &thr, err);
  if (rc) return rc;
  char sha[HASH_HEX_LEN + 1];
  if ((rc = hash_inputs(c->inputs, sha, err))) return rc;
  ens_data d;
  if ((rc = labelled(s, c, &d, err))) return rc;
  if ((rc = md_check_deadline(c, err))) {
    ens_data_free(&d);
    return rc;
  }
  int F = s->spec.F;
  double theta[AW_MAX_FAMILIES], alpha[AW_MAX_FAMILIES];
  for (int f = 0; f < F; f++) theta[f] = warm ? s->theta[f] : 0.0;
  ens_fit_ctx x = {.c = c};
  o.on_epoch = on_epoch;
  o.on_epoch_arg = &x;
  aw_fit_report rep;
  met_scores *fm = NULL;
  st_writer *w = NULL;
  json_t *metrics = NULL;
  if ((rc = aw_fit(&s->spec, d.N, d.P, d.labels, &o, theta, &rep, err))) {
    if (x.err.status) *err = x.err; /* the deadline's message, not "stopped by the caller" */
    goto out;
  }
  /* the version stores theta as FP32: report and score what will be served */
  float th32[AW_MAX_FAMILIES];
  for (int f = 0; f < F; f++) theta[f] = th32[f] = (float)theta[f];
  /* a learning rate far too large can push theta past FP32's range: refuse
   * that by name instead of failing later on "not a finite number" */
  for (int f = 0; f < F; f++)
    if (!isfinite(theta[f])) {
      rc = ts_errf(err, TS_EINVAL,
                   "fit diverged: theta of family '%s' does not fit in FP32; "
                   "lower 'learning_rate' (%g)",
                   s->family_names[f], o.learning_rate);
      goto out;
    }
  aw_alpha(F, theta, alpha);
  if (!(fm = tl_calloc((size_t)F, sizeof *fm))) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  /* before: the uniform theta, as the fit contract defines it, whatever the
   * parent version serves; the parent's own theta is the extra "served" */
  aw_fit_metrics m = {.families = fm};
  met_scores served;
  if ((rc = aw_fit_metrics_compute(&s->spec, d.N, d.P, d.labels, &o, NULL, theta, thr, &m, err)) ||
      (rc = eval_served(s, &d, &o, thr, &served, err)))
    goto out;
  metrics = json_pack("{s:o, s:o, s:o, s:o, s:o, s:o}", "before", scores_json(&m.before), "after",
                      scores_json(&m.after), "validation", scores_json(&m.validation), "served",
                      scores_json(&served), "families", families_json(s, fm), "uniform",
                      scores_json(&m.uniform));
  json_t *names = json_array();
  for (int f = 0; names && f < F; f++)
    json_array_append_new(names, json_string(s->family_names[f]));
  c->result =
      json_pack("{s:O, s:{s:o, s:o, s:o}, s:{s:I, s:I}, s:i, s:i}", "metrics", metrics, "weights",
                "alpha", doubles_json(alpha, F), "theta", doubles_json(theta, F), "families", names,
                "rows", "train", (json_int_t)rep.n_train, "validation", (json_int_t)rep.n_val,
                "epochs_run", rep.epochs_run, "best_epoch", rep.best_epoch);
  c->new_version_info = json_pack(
      "{s:o, s:O, s:{s:o, s:o}, s:I, s:{s:I, s:I}, s:i, s:i, s:s}", "fit",
      fit_params_json(&o, warm, thr), "metrics", metrics, "weights", "alpha",
      doubles_json(alpha, F), "theta", doubles_json(theta, F), "rows", (json_int_t)d.N, "split",
      "train", (json_int_t)rep.n_train, "validation", (json_int_t)rep.n_val, "epochs_run",
      rep.epochs_run, "best_epoch", rep.best_epoch, "sha256_training_data", sha);
  if (!metrics || !c->result || !c->new_version_info) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  int64_t shape[1] = {F};
  if (!(w = st_writer_new())) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = st_writer_add(w, "tier2.logits", TS_FP32, 1, shape, th32, err))) goto out;
  c->new_weights = w;
  w = NULL;
out:
  if (metrics) json_decref(metrics);
  if (w) st_writer_free(w);
  tl_free(fm);
  ens_data_free(&d);
  return rc;
}

/* ---- calibrate ---------------------------------------------------------------- */

/* Temperature scaling: T fitted on the labelled rows to the mixture under the
 * version's theta (from T = 1, whatever T the version has), saved with theta
 * unchanged as a new version. */
static int calibrate(void *state, md_call *c, ts_err *err) {
  ens_state *s = state;
  const char *method;
  double thr;
  int nb;
  int64_t max_iter;
  int rc = md_param_string(c->params, "method", "temperature", &method, err);
  if (!rc) rc = read_threshold(s, c, &thr, err);
  if (!rc) rc = read_bins(c, &nb, err);
  if (!rc) rc = int_param(c->params, "max_iter", 100, 1, 10000, &max_iter, err);
  if (rc) return rc;
  if (strcmp(method, "temperature") != 0)
    return ts_errf(err, TS_EINVAL,
                   "parameter 'method': '%s'; the ensemble kind calibrates by \"temperature\"",
                   method);
  char sha[HASH_HEX_LEN + 1];
  if ((rc = hash_inputs(c->inputs, sha, err))) return rc;
  ens_data d;
  if ((rc = labelled(s, c, &d, err))) return rc;
  int F = s->spec.F;
  double *y = NULL;
  json_t *mb = NULL, *cb = NULL, *ma = NULL, *ca = NULL;
  st_writer *w = NULL;
  cal_temp_report rep;
  if ((rc = md_check_deadline(c, err)) || (rc = served_probs(s, &d, s->theta, 1.0, &y, err)) ||
      (rc = cal_temp_fit(d.N, s->spec.C, y, d.labels, (int)max_iter, 1e-9, &rep, err)))
    goto out;
  /* the version stores T as FP32: score and report what will be served */
  float t32 = (float)rep.temperature, th32[AW_MAX_FAMILIES];
  double T = t32;
  if ((rc = served_scores(s, &d, s->theta, s->temperature, thr, nb, &mb, &cb, err)) ||
      (rc = served_scores(s, &d, s->theta, T, thr, nb, &ma, &ca, err)))
    goto out;
  json_t *metrics = json_pack("{s:O, s:O}", "before", mb, "after", ma);
  json_t *calib = json_pack("{s:O, s:O}", "before", cb, "after", ca);
  json_t *info =
      json_pack("{s:s, s:f, s:f, s:i, s:b, s:f, s:f}", "method", "temperature", "temperature", T,
                "parent_temperature", s->temperature, "iterations", rep.iterations, "at_bound",
                rep.at_bound, "loss_before", rep.loss_before, "loss_after", rep.loss_after);
  if (metrics && calib && info) {
    c->result = json_pack("{s:O, s:O, s:O, s:I}", "calibration", info, "metrics", metrics,
                          "reliability", calib, "rows", (json_int_t)d.N);
    c->new_version_info =
        json_pack("{s:O, s:O, s:O, s:I, s:s}", "calibrate", info, "metrics", metrics, "reliability",
                  calib, "rows", (json_int_t)d.N, "sha256_calibration_data", sha);
  }
  json_decref(metrics);
  json_decref(calib);
  json_decref(info);
  if (!c->result || !c->new_version_info) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  for (int f = 0; f < F; f++) th32[f] = (float)s->theta[f];
  int64_t shape[1] = {F}, one[1] = {1};
  if (!(w = st_writer_new())) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = st_writer_add(w, "tier2.logits", TS_FP32, 1, shape, th32, err)) ||
      (rc = st_writer_add(w, "calibration.temperature", TS_FP32, 1, one, &t32, err)))
    goto out;
  c->new_weights = w;
  w = NULL;
out:
  if (w) st_writer_free(w);
  json_decref(mb);
  json_decref(cb);
  json_decref(ma);
  json_decref(ca);
  tl_free(y);
  ens_data_free(&d);
  return rc;
}

/* Request parameters (model.h): fit_opts' and read_threshold's names. */
static const char *const fit_params[] = {"epochs",     "batch_size",    "seed",
                                         "patience",   "learning_rate", "weight_decay",
                                         "l2",         "min_delta",     "validation_fraction",
                                         "warm_start", "threshold",     NULL};
static const char *const evaluate_params[] = {"threshold", "ece_bins", NULL};
static const char *const calibrate_params[] = {"method", "threshold", "ece_bins", "max_iter", NULL};
/* member_outputs (inputs): either input, whatever the signature shows */
static const char *const infer_inputs[] = {"features", "member_outputs", NULL};

const md_kind md_kind_ensemble = {.name = "ensemble",
                                  .params = {[MD_OP_FIT] = fit_params,
                                             [MD_OP_EVALUATE] = evaluate_params,
                                             [MD_OP_CALIBRATE] = calibrate_params},
                                  .infer_inputs = infer_inputs,
                                  .load = load,
                                  .signature = signature,
                                  .infer = infer,
                                  .fit = fit,
                                  .evaluate = evaluate,
                                  .calibrate = calibrate,
                                  .free = free_state};
