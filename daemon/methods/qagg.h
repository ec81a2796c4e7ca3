/* qagg.h - quantile aggregation (Fakoor et al., "Flexible Model Aggregation
 * for Quantile Regression", JMLR 2023): the whole public face of the module.
 *
 * M base models each predict K quantile levels tau_1 < ... < tau_K; the
 * aggregator combines them into one set of K quantiles:
 *
 *   coarse:  q_k = sum_j       w[j]       * z[j, k]
 *   medium:  q_k = sum_j       w[j, k]    * z[j, k]
 *   fine:    q_k = sum_j sum_l w[j*K+l, k] * z[j, l]
 *
 * Global aggregators learn the weight logits directly; local ones (DQA) get
 * them from an MLP of the features x. With `simplex` the weights are a
 * softmax of the logits (over j for coarse/medium, over all M*K pairs for
 * fine, separately for each output level k); without it the raw values are
 * the weights ("free" weights).
 *
 * The module also holds the monotone (non-crossing) steps (qmono.c), the
 * scores - pinball, interval score, WIS, coverage (qscore.c) - and conformal
 * calibration (CQR, qscore.c). It knows nothing of HTTP or JSON.
 *
 * Precision: inference (qa_forward) runs in float through sg_gemm. The
 * training math exists twice: qa_loss_grad in double on a flat double copy
 * of the parameters, which the gradient checks test against finite
 * differences (~1e-7 relative), and qa_grad32, the same loss and gradient in
 * float32 over a whole minibatch through sg_gemm, which qa_fit runs and the
 * tests check against qa_loss_grad.
 *
 * Weight tensors (names and layouts the model kind loads and saves; every
 * tensor is FP32, row-major):
 *   global coarse:  "aggregator.logits" [M]
 *   global medium:  "aggregator.logits" [M, K]          element (j, k)
 *   global fine:    "aggregator.logits" [M*K, K]        row j*K + l, column k
 *   local:          "aggregator.layers.{i}.weight" [out, in] and
 *                   "aggregator.layers.{i}.bias"   [out], i = 0..depth counting
 *                   Linear layers only: layer 0 is [H, D], layers 1..depth-1 are
 *                   [H, H], layer `depth` is the head [M | M*K | M*K*K, H].
 *                   The network is Linear(D,H) -> ELU -> [Dropout -> Linear(H,H)
 *                   -> ELU] x (depth-1) -> head (ELU with alpha 1; dropout only
 *                   in training). The head output of one row is read with the
 *                   same layout as the global logits: [M], [M, K] or [M*K, K].
 *
 * Ownership: a qa_params owns one float buffer (params->data) that every
 * tensor view points into; qa_params_free releases it. Every other pointer
 * argument is borrowed for the duration of the call. Reports and metrics own
 * their arrays until their _free function. */
#ifndef TALLYD_QAGG_H
#define TALLYD_QAGG_H

#include <stdint.h>

#include "../base/err.h"
#include "../base/pool.h"

#define QA_MAX_K 4096  /* levels per row */
#define QA_MAX_DEPTH 8 /* hidden layers of the local network */
#define QA_MAX_TENSORS (2 * (QA_MAX_DEPTH + 1))
#define QA_LEVEL_TOL 1e-9 /* matching tau with 1 - tau' */
/* Parameters of one aggregator (134M floats: 512 MiB, 2 GiB with Adam's
 * state). A fit allocates and touches all of them, so a request asking for
 * a network larger than this is refused instead of exhausting memory. */
#define QA_MAX_PARAMS (INT64_C(1) << 27)

typedef enum { QA_COARSE = 0, QA_MEDIUM = 1, QA_FINE = 2 } qa_granularity;
typedef enum { QA_GLOBAL = 0, QA_LOCAL = 1 } qa_scope;
typedef enum {
  QA_MONO_NONE = 0,
  QA_MONO_SORT = 1,     /* sort each row ascending */
  QA_MONO_ISOTONIC = 2, /* PAV: L2 projection onto non-decreasing rows */
  QA_MONO_MEDIAN = 3    /* below the median min(q_k..q_med), above max(q_med..q_k) */
} qa_monotone;

typedef struct qa_spec {
  int M, K, D;          /* base models, levels, features (D unused by global) */
  const double *levels; /* [K], strictly increasing in (0, 1); borrowed */
  qa_granularity gran;
  qa_scope scope;
  int simplex;       /* 1: softmax weights; 0: free (raw) weights */
  int hidden, depth; /* local only: H and the number of hidden layers */
} qa_spec;

typedef struct qa_tensor {
  char name[48];
  int ndim; /* 1 or 2 */
  int64_t shape[2];
  int64_t offset, numel; /* position inside qa_params.data */
  float *data;           /* = params->data + offset */
} qa_tensor;

typedef struct qa_params {
  int ntensors;
  qa_tensor t[QA_MAX_TENSORS];
  int64_t n;   /* floats in data: the parameter count */
  float *data; /* owned */
} qa_params;

/* 0, or -TS_EINVAL with a message naming the bad field. */
int qa_spec_check(const qa_spec *s, ts_err *err);
/* Logits per row: M, M*K or M*K*K. */
int64_t qa_logit_count(const qa_spec *s);
const char *qa_granularity_name(qa_granularity g);
int qa_granularity_from_name(const char *name, qa_granularity *out);
const char *qa_monotone_name(qa_monotone m);
int qa_monotone_from_name(const char *name, qa_monotone *out);

/* Allocates and initialises. Global simplex: zeros (uniform softmax).
 * Global free: the plain average of the bases (coarse/medium 1/M; fine 1/M
 * where l == k, else 0). Local: each Linear like PyTorch's default,
 * weight and bias uniform(-1/sqrt(in), 1/sqrt(in)), from `seed`. */
int qa_params_init(qa_params *p, const qa_spec *s, uint64_t seed, ts_err *err);
void qa_params_free(qa_params *p);
/* The tensor with that name, or NULL. */
qa_tensor *qa_params_find(const qa_params *p, const char *name);
/* The flat double vector training uses has the same order as p->data. */
void qa_params_to_f64(const qa_params *p, double *theta);
void qa_params_from_f64(qa_params *p, const double *theta);

/* Q[B, K] = aggregate of Z[B, M, K] (row b, model j, level l at
 * b*M*K + j*K + l) with features X[B, D] (local; NULL allowed for global).
 * Float, no dropout. Parallel over pool (NULL: serial). One-shot: prepares
 * a qa_infer, runs it and frees it. */
int qa_forward(pool_t *pool, const qa_spec *s, const qa_params *p, int64_t B, const float *Z,
               const float *X, float *Q, ts_err *err);
/* Prepared inference: checks the parameters against the spec once and,
 * for a global aggregator, computes the effective weights once (the fine
 * softmax has M*K*K entries), so that the model kind pays neither per
 * request. Borrows p and s->levels for its life; owns wg. */
typedef struct qa_infer {
  qa_spec spec;
  const qa_params *params; /* borrowed */
  float *wg;               /* global: effective weights, logit layout (owned) */
} qa_infer;

int qa_infer_init(qa_infer *f, const qa_spec *s, const qa_params *p, ts_err *err);
/* Same contract as qa_forward; safe to call from several threads at once. */
int qa_infer_run(pool_t *pool, const qa_infer *f, int64_t B, const float *Z, const float *X,
                 float *Q, ts_err *err);
void qa_infer_free(qa_infer *f);

/* Global aggregators only: the effective weights W (after softmax when
 * simplex), laid out like the logits ([M], [M, K] or [M*K, K]). */
int qa_global_weights(const qa_spec *s, const qa_params *p, double *W, ts_err *err);

/* ---- training math (double) ---- */

typedef struct qa_loss_opts {
  double lambda, margin; /* non-crossing penalty; lambda 0 turns it off */
  double dropout;        /* local only; 0 = off (inference) */
  uint64_t dropout_seed; /* the mask of row r depends on (seed, r) only */
} qa_loss_opts;

/* Over the n rows rows[0..n) (rows NULL: 0..n-1) of Z, X, y:
 *   loss    = mean pinball + lambda * mean over rows and pairs k < k' of
 *             ReLU(q_k - q_k' + margin)
 *   pinball = the mean pinball part alone
 * and, when grad is not NULL, grad[p->n] = d loss / d theta. Either output
 * pointer may be NULL. Deterministic for given inputs whatever the pool. */
int qa_loss_grad(pool_t *pool, const qa_spec *s, const double *theta, int64_t n,
                 const int64_t *rows, const float *Z, const float *X, const float *y,
                 const qa_loss_opts *o, double *loss, double *pinball, double *grad, ts_err *err);
/* Q[n, K] in double from theta (no dropout): the training-precision forward. */
int qa_predict_f64(const qa_spec *s, const double *theta, int64_t n, const float *Z, const float *X,
                   double *Q, ts_err *err);

/* The fit's gradient (qagg_f32.c): qa_loss_grad's loss, pinball and
 * gradient in float32 (double sums), for up to max_rows rows per call, its
 * buffers allocated once. Deterministic whatever the pool. One handle per
 * thread at a time; s->levels is borrowed for the handle's life. */
typedef struct qa_grad32 qa_grad32;
int qa_grad32_new(qa_grad32 **out, const qa_spec *s, int64_t max_rows, ts_err *err);
int qa_grad32_run(qa_grad32 *g, pool_t *pool, const double *theta, int64_t n, const int64_t *rows,
                  const float *Z, const float *X, const float *y, const qa_loss_opts *o,
                  double *loss, double *pinball, double *grad, ts_err *err);
void qa_grad32_free(qa_grad32 *g);

typedef struct qa_fit_opts {
  int epochs;                 /* > 0 */
  double learning_rate;       /* Adam with AMSGrad */
  double weight_decay;        /* L2, added to the gradient (torch Adam) */
  int batch_size;             /* > 0 */
  double lambda, margin;      /* non-crossing penalty, both >= 0 */
  double dropout;             /* local: in [0, 1) */
  double validation_fraction; /* in [0, 1): rows held out for early stopping */
  int patience;               /* epochs without improvement; <= 0: never stop early */
  uint64_t seed;              /* split, shuffling, dropout */
  /* Called after each epoch (may be NULL): a negative return stops the fit,
   * which then fails with that status and the message the callback set in
   * err (a request's deadline, say). */
  int (*on_epoch)(void *arg, int epoch, ts_err *err);
  void *on_epoch_arg;
} qa_fit_opts;

/* 200 epochs, lr 1e-3, wd 1e-7, batch 64, lambda 0, margin 0, dropout 0,
 * validation 0.1, patience 20, seed 0. */
void qa_fit_opts_default(qa_fit_opts *o);

typedef struct qa_fit_report {
  int epochs_run, best_epoch; /* 1-based; best_epoch's params are returned */
  int stopped_early;
  int64_t n_train, n_val;
  double best_val_loss; /* NaN without validation rows */
  double *train_loss;   /* [epochs_run] mean minibatch objective (owned) */
  double *val_loss;     /* [epochs_run] validation mean pinball, NaN if none */
  /* [n_train + n_val] the split (owned): rows[0..n_train) are the training
   * rows (in the last epoch's order), rows[n_train..) the validation rows
   * early stopping measured, so that a caller can score the same held-out
   * rows without a split of its own that could drift from this one. */
  int64_t *rows;
} qa_fit_report;

/* Fits params (in: the start, out: the best epoch's values) on B rows of
 * Z [B, M, K], X [B, D] (local), y [B]. The rows are split once by a seeded
 * permutation into train and validation; each epoch shuffles the training
 * index list and steps over minibatches. Validation loss is the mean
 * pinball with dropout off, measured after each epoch; without validation
 * rows the last epoch is kept. report may be NULL; on success it holds the
 * split (report->rows) until qa_fit_report_free. */
int qa_fit(pool_t *pool, const qa_spec *s, qa_params *p, int64_t B, const float *Z, const float *X,
           const float *y, const qa_fit_opts *o, qa_fit_report *report, ts_err *err);
void qa_fit_report_free(qa_fit_report *r);

/* ---- monotone steps (qmono.c) ---- */

/* In place on one row of K values. median_index is used by QA_MONO_MEDIAN
 * only (see qa_central_intervals). -TS_EINVAL for K out of [1, QA_MAX_K] or
 * a median index outside the row. */
int qa_monotone_apply(qa_monotone m, int K, int median_index, float *q, ts_err *err);
/* Every row of Q[B, K]. */
int qa_monotone_rows(pool_t *pool, qa_monotone m, int64_t B, int K, int median_index, float *Q,
                     ts_err *err);
/* PAV with equal weights, in place, double; n <= QA_MAX_K. */
void qa_isotonic(int n, double *v);

/* ---- scores (qscore.c) ---- */

double qa_pinball(double tau, double y, double q);
/* IS_alpha(l, u; y) = (u - l) + (2/alpha)(l - y)[y < l] + (2/alpha)(y - u)[y > u] */
double qa_interval_score(double alpha, double l, double u, double y);

/* The central intervals the levels form: pairs (tau, 1 - tau) with tau < 0.5
 * matched within QA_LEVEL_TOL, nominal coverage 1 - 2 tau. lo[i], hi[i] are
 * level indices, alpha[i] = 2 tau, ordered from the widest interval in.
 * Arrays have room for K/2 entries. *median_index is the index of the level
 * 0.5 (within tolerance) or -1. Levels left unpaired are ignored. */
int qa_central_intervals(int K, const double *levels, int *lo, int *hi, double *alpha, int *n_int,
                         int *median_index, ts_err *err);

/* Bracher et al.: 1/(n_int + 1/2) (1/2 |y - m| + sum_i alpha_i/2 IS_i), one row. */
double qa_wis_bracher(int n_int, const int *lo, const int *hi, const double *alpha,
                      int median_index, const float *q, double y);
/* 2/K * sum_k pinball(tau_k, y, q_k): equal to the Bracher WIS when the K
 * levels are the median and n_int symmetric pairs (K = 2 n_int + 1). */
double qa_wis_pinball(int K, const double *levels, const float *q, double y);

typedef struct qa_metrics {
  int64_t n;
  double mean_pinball; /* mean over rows and levels */
  double wis;          /* Bracher, mean over rows; NaN without a median */
  int n_int;
  double *nominal;        /* [n_int] 1 - alpha (owned) */
  double *interval_score; /* [n_int] mean IS_alpha */
  double *coverage;       /* [n_int] fraction with l <= y <= u */
  int *lo, *hi;           /* [n_int] level indices */
} qa_metrics;

/* Q[N, K] against y[N]. */
int qa_metrics_compute(int K, const double *levels, int64_t N, const float *Q, const float *y,
                       qa_metrics *m, ts_err *err);
void qa_metrics_free(qa_metrics *m);

/* ---- conformal calibration (CQR, Romano et al. 2019; qscore.c) ----
 *
 * A correction is two vectors lower[K], upper[K] applied at inference as
 *   q_k <- q_k - lower[k] + upper[k]
 * lower is non-zero only on levels below the median (the lower end of an
 * interval), upper only on levels above it. Symmetric: for each central
 * interval (lo, hi) with alpha, lower[lo] = upper[hi] = Q, the
 * ceil((1 - alpha)(n + 1))-th smallest of E_i = max(q_lo - y, y - q_hi).
 * Asymmetric: lower[lo] = ceil((1 - alpha/2)(n + 1))-th smallest of q_lo - y,
 * upper[hi] the same rank of y - q_hi. Per-quantile: for tau > 0.5
 * upper[k] = ceil(tau (n + 1))-th smallest of y - q_k; for tau < 0.5
 * lower[k] = ceil((1 - tau)(n + 1))-th smallest of q_k - y. Levels outside
 * every interval (and the median) get 0. A correction may be negative (the
 * interval shrinks). Ranks are computed as ceil(x - 1e-9) so that a product
 * that is an integer up to rounding is not pushed one rank up.
 *
 * When the rank exceeds n the correction is +infinity: with allow_inf it is
 * stored as INFINITY; without, the call fails with -TS_EINVAL naming n and
 * the level. No silent fallback. */
typedef enum { QA_CQR_SYMMETRIC = 0, QA_CQR_ASYMMETRIC = 1, QA_CQR_PER_QUANTILE = 2 } qa_cqr_mode;

int qa_cqr_fit(qa_cqr_mode mode, int K, const double *levels, int64_t n, const float *Q,
               const float *y, int allow_inf, double *lower, double *upper, ts_err *err);
/* Applies lower/upper to every row of Q[B, K] in place. */
void qa_cqr_apply(int K, const double *lower, const double *upper, int64_t B, float *Q);
const char *qa_cqr_mode_name(qa_cqr_mode m);
int qa_cqr_mode_from_name(const char *name, qa_cqr_mode *out);

#endif
