/* quantile_live.c - the quantile_ensemble kind's live state: the rolling
 * coverage / pinball / WIS of the rows it served whose outcomes came back
 * (observe), and adaptive conformal inference (methods/qlive.h) for a
 * version calibrated with "adaptive". The rest of the state is immutable
 * after load; this part changes with every observed row, behind its mutex.
 *
 * Persistence: an adaptive version's working levels a_t, misses, rows and
 * score window are written after every observe call to "<version
 * dir>/.adaptive.safetensors" (a temporary file, fsynced, renamed over the
 * old one), and read back at load, so that they survive a restart. The
 * name is hidden so that the repository watch (which skips names starting
 * with a dot) does not rescan after every feedback call. The rolling window
 * of scores is not kept: it starts empty.
 *
 * Metrics: every live state is on one list (registry below) that
 * md_live_metrics renders for /metrics. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../base/fsutil.h"
#include "../base/jtext.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../methods/qlive.h"
#include "live.h"
#include "quantile_int.h"

/* What readers see (infer's corrections, evaluate's live block, /metrics on
 * the loop thread): a copy published under pub_mu after every observed row,
 * so that no reader waits behind a long observe call holding mu. Lock order:
 * mu, then pub_mu. */
typedef struct qk_pub {
  double *corr;            /* [2K] lower, upper (adaptive) */
  double *cov;             /* [track n_int] rolling coverage */
  double pin, wis;         /* rolling means */
  int64_t filled, total;   /* rows in the window, rows ever */
  double *alpha_t, *width; /* [aci n_int] */
  int64_t *misses;         /* [aci n_int] */
  int64_t aci_rows, pushed;
} qk_pub;

struct qk_live {
  pthread_mutex_t mu; /* the tracker and the adaptive state */
  pthread_mutex_t pub_mu;
  qk_pub pub;
  /* the state file is written outside mu: each snapshot has a number, and
   * the file is only ever replaced by a newer one (save_mu) */
  pthread_mutex_t save_mu;
  uint64_t seq, saved_seq;
  char *model;
  int64_t version;
  char *path; /* .adaptive.safetensors, NULL when the version has no directory */
  int K;
  const double *levels; /* the state's, borrowed */
  ql_track track;
  int adaptive;
  ql_aci aci;
  int64_t rows; /* observed since load */
  qk_live *prev, *next;
};

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static qk_live *reg_head;

/* ---- the adaptive state and its file ------------------------------------------ */

/* Copies the state readers see into l->pub; mu held. */
static void publish(qk_live *l) {
  qk_pub *p = &l->pub;
  double cov[QA_MAX_K / 2 + 1], pin, wis;
  ql_track_get(&l->track, cov, &pin, &wis);
  pthread_mutex_lock(&l->pub_mu);
  memcpy(p->cov, cov, sizeof(double) * (size_t)l->track.n_int);
  p->pin = pin;
  p->wis = wis;
  p->filled = l->track.filled;
  p->total = l->track.total;
  if (l->adaptive) {
    const ql_aci *a = &l->aci;
    ql_aci_corrections(a, p->corr, p->corr + l->K);
    for (int i = 0; i < a->n_int; i++) {
      p->alpha_t[i] = a->alpha_t[i];
      p->width[i] = ql_aci_width(a, i);
      p->misses[i] = a->misses[i];
    }
    p->aci_rows = a->t;
    p->pushed = a->pushed;
  }
  pthread_mutex_unlock(&l->pub_mu);
}

/* evaluate's live.adaptive; pub_mu held. */
static json_t *aci_json(const qk_live *l) {
  json_t *at = json_array(), *mi = json_array(), *iv = json_array(), *wd = json_array();
  const ql_aci *a = &l->aci; /* its fixed parts only: gamma, alpha, n */
  const qk_pub *p = &l->pub;
  for (int i = 0; at && mi && iv && wd && i < a->n_int; i++) {
    json_array_append_new(at, json_real(p->alpha_t[i]));
    json_array_append_new(mi, json_integer(p->misses[i]));
    char b[32];
    snprintf(b, sizeof b, "%.6g", 1.0 - a->alpha[i]);
    json_array_append_new(iv, json_string(b));
    json_array_append_new(wd, qk_jnum(p->width[i]));
  }
  return json_pack("{s:f, s:o, s:o, s:o, s:o, s:I, s:I, s:I}", "gamma", a->gamma, "intervals", iv,
                   "alpha_t", at, "misses", mi, "width", wd, "rows", (json_int_t)p->aci_rows,
                   "window", (json_int_t)a->n, "scores_taken", (json_int_t)p->pushed);
}

/* A snapshot of the adaptive state as a safetensors writer (taken under
 * mu): tensor "scores" [intervals, W] oldest first, and the metadata
 * "adaptive_state", {"alpha_t", "misses", "rows", "scores_taken"}. NULL
 * when out of memory. */
static st_writer *aci_snapshot(const qk_live *l) {
  const ql_aci *a = &l->aci;
  st_writer *w = st_writer_new();
  float *sc = tl_malloc(sizeof(float) * (size_t)a->n * (size_t)a->n_int);
  json_t *j = json_pack("{s:[], s:[], s:I, s:I}", "alpha_t", "misses", "rows", (json_int_t)a->t,
                        "scores_taken", (json_int_t)a->pushed);
  char *txt = NULL;
  int ok = w && sc && j;
  for (int i = 0; ok && i < a->n_int; i++) {
    ql_aci_scores_in_order(a, i, sc + (int64_t)i * a->n);
    json_array_append_new(json_object_get(j, "alpha_t"), json_real(a->alpha_t[i]));
    json_array_append_new(json_object_get(j, "misses"), json_integer(a->misses[i]));
  }
  ts_err err = {0};
  int64_t shape[2] = {a->n_int, a->n};
  ok = ok && (txt = jtext_dumps(j, JT_COMPACT, NULL)) != NULL &&
       st_writer_add(w, "scores", TS_FP32, 2, shape, sc, &err) == 0 &&
       st_writer_meta(w, "adaptive_state", txt, &err) == 0;
  free(txt); /* jansson's allocator: free(3) */
  json_decref(j);
  tl_free(sc);
  if (!ok && w) {
    st_writer_free(w);
    w = NULL;
  }
  return w;
}

/* Writes a snapshot (aci_snapshot, taken under mu with its number seq)
 * unless a newer one was written already: to "<path>.tmp", fsynced, then
 * renamed over path. Without mu held. Failures are logged, never an error
 * for the rows already applied in memory. Frees w. */
static void save_state(qk_live *l, st_writer *w, uint64_t seq) {
  if (!l->path || !w) {
    if (w) st_writer_free(w);
    return;
  }
  pthread_mutex_lock(&l->save_mu);
  if (seq > l->saved_seq) {
    size_t n = strlen(l->path) + 32;
    char *tmp = tl_malloc(n);
    ts_err err = {0};
    if (!tmp)
      ts_errf(&err, TS_ENOMEM, "out of memory");
    else {
      /* per process: replicas on one repository never write one temporary file */
      snprintf(tmp, n, "%s.%ld.tmp", l->path, (long)getpid());
      if (st_writer_save(w, tmp, &err) == 0 && fs_rename_atomic(tmp, l->path, &err) == 0)
        l->saved_seq = seq;
    }
    if (err.status)
      log_warn("model '%s' version %lld: the adaptive state was not saved: %s", l->model,
               (long long)l->version, err.msg);
    tl_free(tmp);
  }
  pthread_mutex_unlock(&l->save_mu);
  st_writer_free(w);
}

/* Restores a_t, the misses, the rows and the scores from the state file
 * when it matches this version (else logs why and keeps the calibration's). */
static void load_state(qk_live *l) {
  if (!l->path || access(l->path, F_OK) != 0) return; /* none yet */
  ql_aci *a = &l->aci;
  ts_err err = {0};
  st_file *f = NULL;
  json_t *j = NULL;
  ts_tensor t;
  memset(&t, 0, sizeof t);
  int ok = st_open(&f, l->path, &err) == 0;
  const char *meta = ok ? st_meta_get(f, "adaptive_state") : NULL;
  json_error_t je;
  if (ok) ok = meta && (j = json_loads(meta, 0, &je)) != NULL;
  int64_t shape[2] = {a->n_int, a->n};
  if (ok) ok = st_get_f32(f, "scores", 2, shape, &t, &err) == 0;
  json_t *at = json_object_get(j, "alpha_t"), *mi = json_object_get(j, "misses");
  json_t *rows = json_object_get(j, "rows"), *pu = json_object_get(j, "scores_taken");
  ok = ok && json_is_array(at) && json_is_array(mi) && json_is_integer(rows) &&
       json_is_integer(pu) && (int)json_array_size(at) == a->n_int &&
       (int)json_array_size(mi) == a->n_int && json_integer_value(rows) >= 0 &&
       json_integer_value(pu) >= 0;
  for (int i = 0; ok && i < a->n_int; i++) {
    json_t *v = json_array_get(at, (size_t)i), *m = json_array_get(mi, (size_t)i);
    ok = json_is_number(v) && isfinite(json_number_value(v)) && json_number_value(v) >= -1 &&
         json_number_value(v) <= 2 && json_is_integer(m) && json_integer_value(m) >= 0;
  }
  ql_aci b;
  if (ok)
    ok = ql_aci_init_scores(&b, a->K, l->levels, a->n_int, a->n, t.data, a->gamma, a->allow_inf,
                            &err) == 0;
  if (ok) { /* the restored scores replace the calibration's */
    float *r1 = a->ring, *s1 = a->sorted;
    a->ring = b.ring;
    a->sorted = b.sorted;
    a->pos = 0;
    b.ring = r1;
    b.sorted = s1;
    ql_aci_free(&b);
    for (int i = 0; i < a->n_int; i++) {
      a->alpha_t[i] = json_number_value(json_array_get(at, (size_t)i));
      a->misses[i] = json_integer_value(json_array_get(mi, (size_t)i));
    }
    a->t = json_integer_value(rows);
    a->pushed = json_integer_value(pu);
  } else {
    log_warn(
        "model '%s' version %lld: %s does not hold this version's adaptive state%s%s; "
        "starting from the calibration's",
        l->model, (long long)l->version, l->path, err.status ? ": " : "",
        err.status ? err.msg : "");
  }
  ts_free(&t);
  json_decref(j);
  if (f) st_close(f);
}

/* ---- open / close ---------------------------------------------------------- */

int qk_live_open(qk_state *s, const md_load_ctx *ctx, st_file *w, ts_err *err) {
  qk_live *l = tl_calloc(1, sizeof *l);
  if (!l) return ts_errf(err, TS_ENOMEM, "out of memory");
  pthread_mutex_init(&l->mu, NULL);
  pthread_mutex_init(&l->pub_mu, NULL);
  pthread_mutex_init(&l->save_mu, NULL);
  l->K = s->K;
  l->levels = s->levels;
  l->version = ctx->version;
  int rc = 0;
  if (!(l->model = tl_strdup(ctx->model_name ? ctx->model_name : ""))) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  if ((rc = ql_track_init(&l->track, s->K, s->levels, s->window, err))) goto fail;
  if (w && st_find(w, "conformal.scores") >= 0) {
    const char *meta = st_meta_get(w, "adaptive");
    json_error_t je;
    json_t *mj = meta ? json_loads(meta, 0, &je) : NULL;
    double gamma = json_number_value(json_object_get(mj, "gamma"));
    int allow_inf = json_is_true(json_object_get(mj, "allow_infinite"));
    json_decref(mj);
    if (!s->has_conf || !(gamma > 0 && gamma <= 1)) {
      rc = ts_errf(err, TS_EINVAL,
                   "weights: 'conformal.scores' needs the conformal corrections and __metadata__ "
                   "'adaptive' {\"gamma\": g} with g in (0, 1]");
      goto fail;
    }
    ts_tensor t;
    if ((rc = st_get_f32(w, "conformal.scores", 2, NULL, &t, err))) goto fail;
    int64_t shape[2] = {t.shape[0], t.shape[1]};
    if (shape[1] < 1 || shape[1] > QK_ACI_MAX_ROWS) {
      ts_free(&t);
      rc = ts_errf(err, TS_EINVAL,
                   "weights: 'conformal.scores' must be [intervals, rows] with 1 to %d rows",
                   QK_ACI_MAX_ROWS);
      goto fail;
    }
    rc = ql_aci_init_scores(&l->aci, s->K, s->levels, shape[0], shape[1], t.data, gamma, allow_inf,
                            err);
    ts_free(&t);
    if (rc) {
      ts_err_prefix(err, "weights: 'conformal.scores'");
      goto fail;
    }
    l->adaptive = 1;
    if (ctx->version_dir) {
      size_t n = strlen(ctx->version_dir) + 32;
      if (!(l->path = tl_malloc(n))) {
        rc = ts_errf(err, TS_ENOMEM, "out of memory");
        goto fail;
      }
      snprintf(l->path, n, "%s/.adaptive.safetensors", ctx->version_dir);
      load_state(l);
    }
  }
  size_t na = (size_t)(l->aci.n_int ? l->aci.n_int : 1);
  l->pub.corr = tl_calloc((size_t)s->K * 2, sizeof(double));
  l->pub.cov = tl_calloc((size_t)(l->track.n_int ? l->track.n_int : 1), sizeof(double));
  l->pub.alpha_t = tl_calloc(na * 2, sizeof(double));
  l->pub.misses = tl_calloc(na, sizeof(int64_t));
  if (!l->pub.corr || !l->pub.cov || !l->pub.alpha_t || !l->pub.misses) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  l->pub.width = l->pub.alpha_t + na;
  publish(l);
  pthread_mutex_lock(&reg_mu);
  l->next = reg_head;
  if (reg_head) reg_head->prev = l;
  reg_head = l;
  pthread_mutex_unlock(&reg_mu);
  s->live = l;
  return 0;
fail:
  qk_live_close(l);
  return rc;
}

/* Also frees a half-opened state (not on the list: prev, next NULL and
 * reg_head elsewhere). */
void qk_live_close(qk_live *l) {
  if (!l) return;
  pthread_mutex_lock(&reg_mu);
  if (l->prev)
    l->prev->next = l->next;
  else if (reg_head == l)
    reg_head = l->next;
  if (l->next) l->next->prev = l->prev;
  pthread_mutex_unlock(&reg_mu);
  ql_track_free(&l->track);
  ql_aci_free(&l->aci);
  tl_free(l->model);
  tl_free(l->path);
  tl_free(l->pub.corr);
  tl_free(l->pub.cov);
  tl_free(l->pub.alpha_t);
  tl_free(l->pub.misses);
  pthread_mutex_destroy(&l->mu);
  pthread_mutex_destroy(&l->pub_mu);
  pthread_mutex_destroy(&l->save_mu);
  tl_free(l);
}

int qk_live_corrections(const qk_state *s, double *lower, double *upper) {
  qk_live *l = s->live;
  if (!l || !l->adaptive) return 0;
  pthread_mutex_lock(&l->pub_mu);
  memcpy(lower, l->pub.corr, sizeof(double) * (size_t)l->K);
  memcpy(upper, l->pub.corr + l->K, sizeof(double) * (size_t)l->K);
  pthread_mutex_unlock(&l->pub_mu);
  return 1;
}

/* ---- observe ------------------------------------------------------------------ */

/* The served answers as FP32 [B, K] (a copy), checked against the rows. */
static int served_rows(const qk_state *s, const ts_list *served, int64_t B, float **out,
                       ts_err *err) {
  const ts_tensor *t = ts_list_find(served, "quantiles");
  if (!t && served->n > 0) t = &served->items[0];
  if (!t) return ts_errf(err, TS_EINVAL, "observe: the served answer has no output");
  if (t->ndim != 2 || t->shape[0] != B || t->shape[1] != s->K) {
    char got[128];
    return ts_errf(err, TS_EINVAL,
                   "observe: the served answer has shape %s; expected [%lld, %d] (one row of "
                   "quantiles for each observed row)",
                   ts_shape_str(t->shape, t->ndim, got, sizeof got), (long long)B, s->K);
  }
  int rc = ts_to_f32(t, 1, out, err);
  for (int64_t i = 0; !rc && i < B * s->K; i++)
    if (isnan((*out)[i])) {
      tl_free(*out);
      *out = NULL;
      rc = ts_errf(err, TS_EINVAL, "observe: served row %lld holds NaN", (long long)(i / s->K));
    }
  return rc;
}

int qk_observe(void *state, md_call *c, const ts_list *served, ts_err *err) {
  qk_state *s = state;
  qk_live *l = s->live;
  if (!l) return ts_errf(err, TS_EINTERNAL, "observe: the version has no live state");
  int K = s->K;
  qk_rows r;
  memset(&r, 0, sizeof r);
  float *Q = NULL, *raw = NULL;
  double *corr = NULL;
  int rc;
  int have_inputs = c->inputs && (ts_list_find(c->inputs, "features") ||
                                  ts_list_find(c->inputs, "base_quantiles"));
  if (served && !have_inputs) {
    /* the answers given and the targets: scored, and a_t moved; the
     * adaptive scores need the raw aggregate, which needs the inputs */
    const ts_tensor *y;
    if ((rc = md_input(c, "targets", &y, err))) return rc;
    if (!((y->ndim == 1) || (y->ndim == 2 && y->shape[1] == 1)))
      return ts_errf(err, TS_EINVAL, "input 'targets': expected shape [B] or [B, 1]");
    r.B = y->shape[0];
    if ((rc = ts_to_f32(y, 1, &r.y, err))) return rc;
    for (int64_t b = 0; b < r.B; b++)
      if (!isfinite(r.y[b])) {
        rc = ts_errf(err, TS_EINVAL, "input 'targets': row %lld is not finite", (long long)b);
        goto out;
      }
    if ((rc = served_rows(s, served, r.B, &Q, err))) goto out;
  } else {
    /* the raw aggregate of the rows; without the served answers, the
     * version's answer now stands for them, row by row, each with the
     * corrections of the moment (an adaptive version moves them after
     * every row) */
    if ((rc = qk_gather(s, c, 1, s->agg.scope == QA_LOCAL ? s->D : 0, &r, err))) return rc;
    raw = tl_malloc(sizeof(float) * (size_t)(r.B ? r.B : 1) * (size_t)K);
    if (served && (rc = served_rows(s, served, r.B, &Q, err))) goto out;
    if (!served) Q = tl_malloc(sizeof(float) * (size_t)K);
    corr = tl_malloc(sizeof(double) * 2 * (size_t)K);
    if (!raw || !Q || !corr) {
      rc = ts_errf(err, TS_ENOMEM, "out of memory for %lld rows", (long long)r.B);
      goto out;
    }
    if ((rc = qa_infer_run(c->pool, &s->inf, r.B, r.Z, r.X, raw, err))) goto out;
    for (int64_t i = 0; i < r.B * K; i++)
      if (!isfinite(raw[i])) {
        rc = ts_errf(err, TS_EINVAL,
                     "row %lld: the aggregated quantile is not finite (values too large in "
                     "magnitude)",
                     (long long)(i / K));
        goto out;
      }
  }
  if ((rc = md_claim(c, err))) goto out;
  pthread_mutex_lock(&l->mu);
  for (int64_t b = 0; b < r.B; b++) {
    const float *q = served ? Q + b * K : Q;
    if (!served) {
      memcpy(Q, raw + b * K, sizeof(float) * (size_t)K);
      if (l->adaptive) {
        ql_aci_corrections(&l->aci, corr, corr + K);
        qa_cqr_apply(K, corr, corr + K, 1, Q);
      } else if (s->has_conf) {
        qa_cqr_apply(K, s->conf_lo, s->conf_hi, 1, Q);
      }
      ts_err e2 = {0};
      qa_monotone_rows(NULL, s->mono, 1, K, s->median, Q, &e2);
    }
    ql_track_add(&l->track, q, r.y[b]);
    if (l->adaptive) ql_aci_observe(&l->aci, q, r.y[b]);
    if (l->adaptive && raw) ql_aci_push(&l->aci, raw + b * K, r.y[b]);
    l->rows++;
    publish(l); /* infer sees the new corrections from the next row on */
  }
  st_writer *snap = NULL;
  uint64_t seq = 0;
  if (l->adaptive && l->path) {
    snap = aci_snapshot(l);
    seq = ++l->seq;
  }
  pthread_mutex_unlock(&l->mu);
  if (snap) save_state(l, snap, seq);
  c->result = qk_live_json(s);
  if (c->result)
    json_object_set_new(c->result, "observed", json_integer(r.B));
  else
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
out:
  tl_free(Q);
  tl_free(raw);
  tl_free(corr);
  rows_free(&r);
  return rc;
}

/* ---- reading it -------------------------------------------------------------- */

json_t *qk_live_json(const qk_state *s) {
  qk_live *l = s->live;
  if (!l) return json_object();
  /* the published copy: the tracker's sizes and levels are fixed at load */
  pthread_mutex_lock(&l->pub_mu);
  const qk_pub *p = &l->pub;
  int ni = l->track.n_int;
  json_t *c = json_object();
  for (int i = 0; c && i < ni; i++) {
    char b[32];
    snprintf(b, sizeof b, "%.6g", 1.0 - l->track.alpha[i]);
    json_object_set_new(c, b, qk_jnum(p->cov[i]));
  }
  json_t *o = json_pack("{s:I, s:I, s:I}", "window", (json_int_t)l->track.window, "rows_in_window",
                        (json_int_t)p->filled, "rows", (json_int_t)p->total);
  /* the rolling scores once a row is in the window (WIS with a median level) */
  if (o && p->filled) {
    json_object_set_new(o, "coverage", c);
    json_object_set_new(o, "pinball", qk_jnum(p->pin));
    if (l->track.median >= 0) json_object_set_new(o, "wis", qk_jnum(p->wis));
    c = NULL;
  }
  json_decref(c);
  if (o && l->adaptive) json_object_set_new(o, "adaptive", aci_json(l));
  pthread_mutex_unlock(&l->pub_mu);
  return o;
}

/* ---- metrics ------------------------------------------------------------------ */

static void label_value(sbuf *b, const char *v) {
  for (; *v; v++) {
    if (*v == '\\' || *v == '"')
      sbuf_printf(b, "\\%c", *v);
    else if (*v == '\n')
      sbuf_adds(b, "\\n");
    else
      sbuf_printf(b, "%c", *v);
  }
}

static void series(sbuf *b, const char *name, const qk_live *l, const char *interval, double v) {
  sbuf_printf(b, "%s{model=\"", name);
  label_value(b, l->model);
  sbuf_printf(b, "\",version=\"%lld\"", (long long)l->version);
  if (interval) sbuf_printf(b, ",interval=\"%s\"", interval);
  if (isnan(v))
    sbuf_adds(b, "} NaN\n");
  else if (isinf(v))
    sbuf_adds(b, v > 0 ? "} +Inf\n" : "} -Inf\n");
  else
    sbuf_printf(b, "} %.9g\n", v);
}

enum { F_COV, F_PIN, F_WIS, F_ROWS, F_ALPHA, F_WIDTH, F_N };
static const char *const fam[F_N][3] = {
    {"tallyd_quantile_rolling_coverage", "gauge",
     "fraction of the last observed rows (window) inside each central interval as served"},
    {"tallyd_quantile_rolling_pinball", "gauge",
     "mean pinball loss over the levels, over the last observed rows (window)"},
    {"tallyd_quantile_rolling_wis", "gauge",
     "mean weighted interval score over the last observed rows (window)"},
    {"tallyd_quantile_observed_rows_total", "counter",
     "rows whose outcome the version observed since it was loaded"},
    {"tallyd_quantile_adaptive_alpha", "gauge",
     "adaptive conformal inference: the working miscoverage level of each central interval"},
    {"tallyd_quantile_adaptive_width", "gauge",
     "adaptive conformal inference: the correction each end of the interval gets now"},
};

void md_live_metrics(sbuf *b) {
  pthread_mutex_lock(&reg_mu);
  for (int f = 0; f < F_N; f++) {
    int any = 0;
    for (qk_live *l = reg_head; l; l = l->next) {
      if (f >= F_ALPHA && !l->adaptive) continue;
      pthread_mutex_lock(&l->pub_mu); /* the published copy: no wait behind observe */
      const qk_pub *p = &l->pub;
      if (f != F_ROWS && f < F_ALPHA && p->filled == 0) {
        pthread_mutex_unlock(&l->pub_mu);
        continue;
      }
      if (!any)
        sbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", fam[f][0], fam[f][2], fam[f][0], fam[f][1]);
      any = 1;
      int ni = f >= F_ALPHA ? l->aci.n_int : l->track.n_int;
      if (f == F_COV || f >= F_ALPHA) {
        for (int i = 0; i < ni; i++) {
          char iv[32];
          double a = f >= F_ALPHA ? l->aci.alpha[i] : l->track.alpha[i];
          snprintf(iv, sizeof iv, "%.6g", 1.0 - a);
          double v = f == F_COV ? p->cov[i] : f == F_ALPHA ? p->alpha_t[i] : p->width[i];
          series(b, fam[f][0], l, iv, v);
        }
      } else if (f == F_PIN) {
        series(b, fam[f][0], l, NULL, p->pin);
      } else if (f == F_WIS) {
        if (l->track.median >= 0) series(b, fam[f][0], l, NULL, p->wis);
      } else {
        series(b, fam[f][0], l, NULL, (double)p->total);
      }
      pthread_mutex_unlock(&l->pub_mu);
    }
  }
  pthread_mutex_unlock(&reg_mu);
}

int qk_adaptive_parse(const json_t *v, const char *where, double *gamma, int64_t *window,
                      ts_err *err) {
  const char *k;
  json_t *x;
  if (!json_is_object(v))
    return ts_errf(err, TS_EINVAL,
                   "%s must be {\"gamma\": g, \"window\": W} (g in (0, 1], W rows), or false",
                   where);
  json_object_foreach((json_t *)v, k, x) {
    if (strcmp(k, "gamma") != 0 && strcmp(k, "window") != 0)
      return ts_errf(err, TS_EINVAL, "%s: unknown key '%s' (it takes \"gamma\" and \"window\")",
                     where, k);
  }
  json_t *g = json_object_get(v, "gamma"), *w = json_object_get(v, "window");
  double gv = g ? json_number_value(g) : 0.005;
  if ((g && !json_is_number(g)) || !(gv > 0 && gv <= 1))
    return ts_errf(err, TS_EINVAL, "%s: gamma must be a number in (0, 1]", where);
  int64_t wv = w ? json_integer_value(w) : QK_ACI_WINDOW;
  if ((w && !json_is_integer(w)) || wv < 1 || wv > QK_ACI_MAX_ROWS)
    return ts_errf(err, TS_EINVAL, "%s: window must be an integer from 1 to %d rows", where,
                   QK_ACI_MAX_ROWS);
  *gamma = gv;
  *window = wv;
  return 0;
}
