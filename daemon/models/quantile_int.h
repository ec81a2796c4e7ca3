/* quantile_int.h - internal to the quantile_ensemble kind's three files:
 * quantile.c (configuration, loading, the kind's table), quantile_serve.c
 * (request rows, prediction, scores, infer and evaluate) and quantile_fit.c
 * (fit, calibrate and the new versions they write). The state is immutable
 * after load. */
#ifndef TALLYD_QUANTILE_INT_H
#define TALLYD_QUANTILE_INT_H

#include <stdint.h>
#include <string.h>

#include "../base/hash.h"
#include "../base/mem.h"
#include "../base/safetensors.h"
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

typedef struct qk_live qk_live; /* quantile_live.c: mutable, behind its own mutex */

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
  double gamma_default; /* config conformal.adaptive.gamma; 0: calibrate is not adaptive */
  int64_t aci_window_default;
  int64_t window; /* config conformal.window: rows of the rolling scores */
  qk_live *live;  /* rolling scores and adaptive conformal state (owned) */
} qk_state;

/* Rows of one request: Z [B, M, K], X [B, D] (NULL when not sent or not
 * needed), y [B] (fit, evaluate, calibrate). All owned. */
typedef struct qk_rows {
  int64_t B;
  float *Z, *X, *y;
  int D; /* width of X */
} qk_rows;

/* The headline scores of a set of predictions (pinball, WIS). */
typedef struct qk_score {
  double pinball, wis;
} qk_score;

/* calibrate's method names, by qa_cqr_mode */
extern const char *const qk_cqr_http_names[];

static inline void rows_free(qk_rows *r) {
  tl_free(r->Z);
  tl_free(r->X);
  tl_free(r->y);
  memset(r, 0, sizeof *r);
}

int qk_agg_equal(const qk_agg *a, const qk_agg *b);

json_t *qk_agg_json(const qk_agg *a, int D);

int qk_agg_parse(const json_t *obj, qk_agg *a, const char *where, int allow_features, int *features,
                 ts_err *err);

int qk_bases_json(const qk_state *s, const qk_rows *r, const int64_t *idx, int64_t n,
                  json_t *metrics, qk_score *best, const char **best_name, ts_err *err);

int qk_calibrate(void *state, md_call *c, ts_err *err);

/* ---- live scores (quantile_live.c) ---- */
/* Most rows of scores an adaptive version keeps (its window). */
#define QK_ACI_MAX_ROWS 100000
#define QK_WINDOW_DEFAULT 1000
#define QK_WINDOW_MAX 1000000
/* Creates s->live: the rolling tracker, and the adaptive state when the
 * weights hold conformal.scores (restored from the version directory's
 * .adaptive.safetensors when present). */
int qk_live_open(qk_state *s, const md_load_ctx *ctx, st_file *w, ts_err *err);
void qk_live_close(qk_live *l);
/* The corrections to serve now: 1 with lower/upper [K] filled when the
 * version is adaptive, 0 otherwise (then the static ones apply). */
int qk_live_corrections(const qk_state *s, double *lower, double *upper);
/* md_kind.observe (model.h). */
int qk_observe(void *state, md_call *c, const ts_list *served, ts_err *err);
/* Reads {"gamma": g, "window": W} (g in (0, 1], default 0.005; W in 1 ..
 * QK_ACI_MAX_ROWS, default QK_ACI_WINDOW) naming `where` in errors. */
#define QK_ACI_WINDOW 1000
int qk_adaptive_parse(const json_t *v, const char *where, double *gamma, int64_t *window,
                      ts_err *err);
/* The live state as JSON (evaluate's "live" block). */
json_t *qk_live_json(const qk_state *s);

int qk_cqr_from_http(const char *s, qa_cqr_mode *out);

int qk_evaluate(void *state, md_call *c, ts_err *err);

int qk_fit(void *state, md_call *c, ts_err *err);

int qk_fit_agg(const qk_state *s, const json_t *params, qk_agg *a, ts_err *err);

int qk_fit_opts(const json_t *p, qa_fit_opts *o, int *warm, ts_err *err);

void qk_gain_json(json_t *metrics, const char *best_name, const qk_score *best,
                  const qk_score *model);

int qk_gather(const qk_state *s, const md_call *c, int want_y, int need_local_D, qk_rows *r,
              ts_err *err);

void qk_hash_inputs(const md_call *c, char hex[HASH_HEX_LEN + 1]);

int qk_infer(void *state, md_call *c, ts_err *err);

json_t *qk_jnum(double x);

int qk_load(const md_load_ctx *ctx, void **state, ts_err *err);

int qk_metrics_json(const qk_state *s, int64_t N, const float *Q, const float *y, json_t **out,
                    qk_score *sc, ts_err *err);

int qk_metrics_rows(const qk_state *s, const int64_t *idx, int64_t n, const float *Q,
                    const float *y, json_t **out, qk_score *sc, ts_err *err);

int qk_predict(const qk_state *s, pool_t *pool, const qk_rows *r, int with_conf, float *Q,
               ts_err *err);

const char *qk_scope_name(qa_scope s);

void qk_spec_of(const qk_state *s, const qk_agg *a, int D, qa_spec *sp);

#endif
