/* aware.h - AWARE-NET two-tier ensemble: forward pass, loss, gradient, fit.
 *
 * Salman et al. 2025 (the math: docs/ensemble.md). Families f = 0..F-1 hold n_f frozen
 * members each; member outputs are logits or probabilities, binary or over
 * C classes.
 *
 *   p_fi = sigmoid(z_fi) | softmax(z_fi)      (as given when probabilities)
 *   tier 1: P_f = mean_i p_fi                 family probability
 *   tier 2: alpha = softmax(theta), y = sum_f alpha_f P_f
 *
 * Only theta [F] is learned. Tier 1 does not depend on theta, so a fit turns
 * member outputs into P [N, F, Cc] once (aw_family_probs) and trains on P:
 * memory is N*F*Cc doubles plus an N-entry index permutation, whatever the
 * number of epochs.
 *
 * Layouts (row-major). Cc = 1 when C = 1 (binary: the positive-class
 * probability), else Cc = C.
 *   member_out  [B, n] (binary) or [B, n, C]; members in family order
 *   P           [B, F, Cc]
 *   y           [B, Cc]
 *   labels      [B] int32: 0/1 (binary) or a class index in [0, C)
 *
 * Loss: L = -(1/B) sum_b log clamp(y_b[t_b]) + (l2/2) |theta|^2, clamp to
 * [MET_EPS, 1 - MET_EPS] (metrics.h). Where the clamp is active the loss is
 * flat in y and the gradient returned is exactly 0 for that row, so loss and
 * gradient always agree.
 *
 * Ownership: every array is borrowed from the caller and never kept; aw_fit
 * allocates its permutation and optimiser state and frees them before it
 * returns. Nothing here keeps global state; all calls are thread-safe on
 * distinct outputs. */
#ifndef TALLYD_AWARE_H
#define TALLYD_AWARE_H

#include <stdint.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "metrics.h"

/* Families are few (three in the paper); the cap lets per-family scratch
 * live on the stack so that the math routines cannot fail. */
#define AW_MAX_FAMILIES 256

typedef struct aw_spec {
  int F;                  /* families, 1..AW_MAX_FAMILIES */
  const int *family_size; /* [F] n_f >= 1, members in family order */
  int n;                  /* members in all, = sum n_f */
  int C;                  /* 1 = binary, >= 2 classes */
  int input_logits;       /* 1: member outputs are logits, 0: probabilities */
  /* Optional (may be NULL): names used in error messages. */
  const char *const *family_names; /* [F] */
  const char *const *member_names; /* [n] */
} aw_spec;

/* Checks the spec itself (F, sizes, n = sum, C): -TS_EINVAL with a reason. */
int aw_spec_check(const aw_spec *s, ts_err *err);

/* Values per row of P / y: 1 (binary) or C. */
int aw_cc(const aw_spec *s);

/* Checks member outputs: finite; probabilities in [0, 1]; class-probability
 * rows summing to 1 within 1e-3 (taken as given, not renormalised).
 * -TS_EINVAL naming the row and the member, e.g.
 * "row 7, member 4 ('xc2', family 'xception'): logit is NaN". */
int aw_validate(const aw_spec *s, int64_t B, const float *member_out, ts_err *err);

/* Tier 1: P [B, F, Cc] from member outputs, rows spread over pool (NULL:
 * serial in the caller; the result is the same). Validates as it goes: the
 * error names the lowest bad row as aw_validate would (P is then partly
 * written). */
int aw_family_probs(const aw_spec *s, int64_t B, const float *member_out, double *P, pool_t *pool,
                    ts_err *err);

/* alpha [F] = softmax(theta). */
void aw_alpha(int F, const double *theta, double *alpha);

/* Tier 2: y [B, Cc] = sum_f softmax(theta)_f P_f. theta NULL = uniform. */
void aw_combine(const aw_spec *s, int64_t B, const double *P, const double *theta, double *y);

/* Mean clamped log loss of aw_combine's y plus (l2/2)|theta|^2; when grad
 * is not NULL writes dL/dtheta [F]. Labels are assumed checked (met_check_labels). */
double aw_loss_grad(const aw_spec *s, int64_t B, const double *P, const int32_t *labels,
                    const double *theta, double l2, double *grad);

typedef struct aw_fit_opts {
  int epochs;                 /* passes over the training rows (default 100) */
  double learning_rate;       /* Adam step (default 1e-2; the paper: 3e-4) */
  double weight_decay;        /* decoupled AdamW decay (default 1e-4, as the paper) */
  double l2;                  /* L2 on theta added to the loss (default 0) */
  int64_t batch_size;         /* rows per step (default 256; <= 0: all training rows) */
  double validation_fraction; /* held-out share in [0, 1) (default 0.2) */
  uint64_t seed;              /* split and shuffles (default 0) */
  int patience;               /* stop after this many epochs without a better
                                 validation loss (default 10; 0: never stop early) */
  double min_delta;           /* improvement that counts (default 1e-6) */
  /* Called after every epoch (may be NULL) with the epoch's mean batch loss
   * and the validation log loss (NaN without validation rows), e.g. to log
   * progress or to cancel a fit when the daemon drains. Return 0 to go on,
   * > 0 to stop and keep the best theta (aw_fit returns 0), < 0 to abandon
   * the fit (aw_fit returns that status, theta is left as the best so far). */
  int (*on_epoch)(void *arg, int epoch, double train_loss, double val_loss);
  void *on_epoch_arg;
} aw_fit_opts;

void aw_fit_opts_default(aw_fit_opts *o);

typedef struct aw_fit_report {
  int64_t n_train, n_val;
  int epochs_run;           /* epochs completed */
  int best_epoch;           /* 0 = the initial theta was never beaten */
  double initial_loss;      /* monitored loss of the initial theta */
  double best_loss;         /* monitored loss of the returned theta */
  double train_loss;        /* mean batch loss of the last epoch */
  int monitored_validation; /* 1: losses above are validation log loss,
                               0: no validation rows, training log loss */
} aw_fit_report;

/* Deterministic split used by aw_fit: perm [N] becomes a permutation of
 * 0..N-1 whose first *n_val entries are the validation rows and the rest the
 * training rows. n_val = floor(fraction * N), at least 1 when fraction > 0
 * and N >= 2, and always leaves a training row. */
void aw_split(int64_t N, double validation_fraction, uint64_t seed, int64_t *perm, int64_t *n_val);

/* Learns theta from P [N, F, Cc] and labels with Adam(W), shuffling the
 * training rows every epoch through an index permutation (P is never
 * copied), monitoring the validation log loss after every epoch and keeping
 * the best epoch's theta. theta [F]: in = the start (zeros = uniform), out =
 * the best. -TS_EINVAL for bad options or labels (naming the row),
 * -TS_ENOMEM. report may be NULL. */
int aw_fit(const aw_spec *s, int64_t N, const double *P, const int32_t *labels,
           const aw_fit_opts *o, double *theta, aw_fit_report *report, ts_err *err);

/* Metrics of the ensemble with theta (NULL = uniform) on the rows idx[0..m)
 * of P (idx NULL: rows 0..m-1), P as aw_family_probs made it; labels are
 * checked (-TS_EINVAL naming the row). Allocates scores [m, Cc], labels [m]
 * and the AUC sort buffer, all freed before return. */
int aw_eval(const aw_spec *s, const double *P, const int32_t *labels, const int64_t *idx, int64_t m,
            const double *theta, double threshold, met_scores *out, ts_err *err);

/* Metrics of family f alone (y = P_f) on the same rows. */
int aw_eval_family(const aw_spec *s, const double *P, const int32_t *labels, const int64_t *idx,
                   int64_t m, int f, double threshold, met_scores *out, ts_err *err);

/* Everything a fit answer shows, on aw_fit's split (same N, fraction, seed):
 *   before     theta_before (NULL: uniform, the spec's "before"; or the
 *              served version's theta when a fit refines it), training rows
 *   after      theta, training rows
 *   validation theta, validation rows (n = 0 and NaN when there are none)
 *   uniform    uniform theta, and families[f] family f alone, on the
 *              validation rows, or on the training rows when there are none
 *              (so they compare with `validation`, or with `after`).
 * families: caller array of F entries. */
typedef struct aw_fit_metrics {
  met_scores before, after, validation, uniform;
  met_scores *families;
} aw_fit_metrics;

int aw_fit_metrics_compute(const aw_spec *s, int64_t N, const double *P, const int32_t *labels,
                           const aw_fit_opts *o, const double *theta_before, const double *theta,
                           double threshold, aw_fit_metrics *out, ts_err *err);

#endif
