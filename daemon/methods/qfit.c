/* qfit.c - the fitting loop of the quantile aggregators: a seeded
 * train/validation split, minibatch Adam (AMSGrad, on double parameters) on
 * the float32 batched gradient of qagg_f32.c, and early stopping on the
 * validation pinball that keeps the best epoch.
 *
 * The data are never copied: the split and every epoch's shuffle permute an
 * index array, and the gradient reads the rows through it. A minibatch whose
 * float32 buffers would pass QF_CHUNK_FLOATS per [rows, logits] array (a
 * local fine head has M*K*K logits a row) runs in chunks whose gradients
 * are averaged with the chunks' row counts as weights. */
#include <math.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/rng.h"
#include "optim.h"
#include "qagg.h"

void qa_fit_opts_default(qa_fit_opts *o) {
  memset(o, 0, sizeof *o);
  o->epochs = 200;
  o->learning_rate = 1e-3;
  o->weight_decay = 1e-7;
  o->batch_size = 64;
  o->validation_fraction = 0.1;
  o->patience = 20;
}

void qa_fit_report_free(qa_fit_report *r) {
  if (!r) return;
  tl_free(r->train_loss);
  tl_free(r->rows);
  memset(r, 0, sizeof *r);
}

static int check_opts(const qa_fit_opts *o, int64_t B, ts_err *err) {
  if (o->epochs < 1) return ts_errf(err, TS_EINVAL, "fit: epochs must be >= 1, got %d", o->epochs);
  if (o->batch_size < 1)
    return ts_errf(err, TS_EINVAL, "fit: batch_size must be >= 1, got %d", o->batch_size);
  if (!(o->learning_rate > 0.0) || !isfinite(o->learning_rate))
    return ts_errf(err, TS_EINVAL, "fit: learning_rate must be > 0, got %g", o->learning_rate);
  if (!(o->weight_decay >= 0.0))
    return ts_errf(err, TS_EINVAL, "fit: weight_decay must be >= 0, got %g", o->weight_decay);
  if (!(o->lambda >= 0.0))
    return ts_errf(err, TS_EINVAL, "fit: lambda must be >= 0, got %g", o->lambda);
  /* with a negative margin the penalty ReLU(q_k - q_k' + margin) would let
   * levels cross by up to |margin| for free: the opposite of its purpose */
  if (!(o->margin >= 0.0) || !isfinite(o->margin))
    return ts_errf(err, TS_EINVAL, "fit: margin must be >= 0, got %g", o->margin);
  if (!(o->dropout >= 0.0 && o->dropout < 1.0))
    return ts_errf(err, TS_EINVAL, "fit: dropout must be in [0, 1), got %g", o->dropout);
  if (!(o->validation_fraction >= 0.0 && o->validation_fraction < 1.0))
    return ts_errf(err, TS_EINVAL, "fit: validation_fraction must be in [0, 1), got %g",
                   o->validation_fraction);
  int64_t nval = (int64_t)floor(o->validation_fraction * (double)B);
  if (B - nval < 1)
    return ts_errf(err, TS_EINVAL,
                   "fit: %lld rows leave none for training after the validation split",
                   (long long)B);
  return 0;
}

#define QF_CHUNK_FLOATS ((int64_t)1 << 23) /* 32 MiB */

/* Rows per qa_grad32 call. */
static int64_t chunk_rows(const qa_spec *s, int64_t batch) {
  int64_t L = qa_logit_count(s), c = QF_CHUNK_FLOATS / (L > 1 ? L : 1);
  if (s->scope == QA_GLOBAL && s->gran != QA_FINE) c = batch;
  if (c < 1) c = 1;
  return c < batch ? c : batch;
}

/* Loss, pinball and (grad not NULL) gradient over n rows, in chunks of at
 * most the handle's rows; acc is a [P] scratch when there is more than one. */
static int batch_grad(qa_grad32 *g, int64_t cap, pool_t *pool, const double *theta, int64_t P,
                      int64_t n, const int64_t *rows, const float *Z, const float *X,
                      const float *y, const qa_loss_opts *lo, double *loss, double *pin,
                      double *grad, double *acc, ts_err *err) {
  if (n <= cap) return qa_grad32_run(g, pool, theta, n, rows, Z, X, y, lo, loss, pin, grad, err);
  double l = 0.0, p = 0.0;
  if (grad) memset(grad, 0, sizeof(double) * (size_t)P);
  for (int64_t i = 0; i < n; i += cap) {
    int64_t c = n - i < cap ? n - i : cap;
    double lc, pc, w = (double)c / (double)n;
    int rc =
        qa_grad32_run(g, pool, theta, c, rows + i, Z, X, y, lo, &lc, &pc, grad ? acc : NULL, err);
    if (rc) return rc;
    l += w * lc;
    p += w * pc;
    if (grad)
      for (int64_t e = 0; e < P; e++) grad[e] += w * acc[e];
  }
  if (loss) *loss = l;
  if (pin) *pin = p;
  return 0;
}

int qa_fit(pool_t *pool, const qa_spec *s, qa_params *p, int64_t B, const float *Z, const float *X,
           const float *y, const qa_fit_opts *o, qa_fit_report *report, ts_err *err) {
  qa_fit_report local_rep;
  qa_fit_report *rep = report ? report : &local_rep;
  memset(rep, 0, sizeof *rep);
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (!Z || !y || (s->scope == QA_LOCAL && !X))
    return ts_errf(err, TS_EINVAL, "fit: missing %s",
                   !Z   ? "base predictions"
                   : !y ? "targets"
                        : "features");
  if (B < 1) return ts_errf(err, TS_EINVAL, "fit: needs rows, got %lld", (long long)B);
  if ((rc = check_opts(o, B, err))) return rc;

  int64_t P = p->n, n_val = (int64_t)floor(o->validation_fraction * (double)B), n_tr = B - n_val;
  int64_t *perm = tl_malloc((size_t)B * sizeof(int64_t));
  double *theta = tl_malloc((size_t)P * 4 * sizeof(double));
  int64_t cap = chunk_rows(s, o->batch_size);
  qa_grad32 *g32 = NULL;
  rep->train_loss = tl_malloc((size_t)o->epochs * 2 * sizeof(double));
  opt_adam opt;
  memset(&opt, 0, sizeof opt);
  if (!perm || !theta || !rep->train_loss) {
    rc = ts_errf(err, TS_ENOMEM, "fit: out of memory for %lld rows and %lld parameters",
                 (long long)B, (long long)P);
    goto out;
  }
  if ((rc = opt_adam_init(&opt, P, o->learning_rate, o->weight_decay, 1, 0, err))) goto out;
  if ((rc = qa_grad32_new(&g32, s, cap, err))) goto out;
  rep->val_loss = rep->train_loss + o->epochs;
  double *grad = theta + P, *best = theta + 2 * P, *acc = theta + 3 * P;
  qa_params_to_f64(p, theta);
  memcpy(best, theta, (size_t)P * sizeof(double));

  uint64_t st = o->seed ^ 0xF17C0FFEEull;
  for (int64_t i = 0; i < B; i++) perm[i] = i;
  rng_shuffle(perm, B, &st);
  int64_t *tr = perm, *va = perm + n_tr;
  rep->n_train = n_tr;
  rep->n_val = n_val;
  rep->best_val_loss = NAN;
  double best_v = INFINITY;
  int wait = 0;
  uint64_t step = 0;
  qa_loss_opts lo = {.lambda = o->lambda, .margin = o->margin, .dropout = o->dropout};

  for (int e = 0; e < o->epochs; e++) {
    rng_shuffle(tr, n_tr, &st);
    double tl = 0.0;
    for (int64_t b0 = 0; b0 < n_tr; b0 += o->batch_size) {
      int64_t nb = n_tr - b0 < o->batch_size ? n_tr - b0 : o->batch_size;
      double l;
      lo.dropout_seed = o->seed * 0x2545F4914F6CDD1Dull + ++step;
      if ((rc = batch_grad(g32, cap, pool, theta, P, nb, tr + b0, Z, X, y, &lo, &l, NULL, grad, acc,
                           err)))
        goto out;
      /* float32 overflows where double would not: a loss that is no longer
       * finite means the step size blew the weights up. Refuse the fit
       * instead of letting early stopping quietly keep the start. */
      if (!isfinite(l)) {
        rc = ts_errf(err, TS_EINVAL,
                     "fit diverged: the training loss is not finite in epoch %d; lower "
                     "'learning_rate' (%g)",
                     e + 1, o->learning_rate);
        goto out;
      }
      opt_adam_step(&opt, theta, grad);
      tl += l * (double)nb;
    }
    rep->train_loss[e] = tl / (double)n_tr;
    rep->epochs_run = e + 1;
    if (o->on_epoch && (rc = o->on_epoch(o->on_epoch_arg, e + 1, err)) < 0) goto out;
    rc = 0;
    if (n_val == 0) {
      rep->val_loss[e] = NAN;
      rep->best_epoch = e + 1;
      continue;
    }
    qa_loss_opts vo = {0};
    double v;
    if ((rc = batch_grad(g32, cap, pool, theta, P, n_val, va, Z, X, y, &vo, NULL, &v, NULL, NULL,
                         err)))
      goto out;
    if (!isfinite(v)) {
      rc = ts_errf(err, TS_EINVAL,
                   "fit diverged: the validation loss is not finite after epoch %d; lower "
                   "'learning_rate' (%g)",
                   e + 1, o->learning_rate);
      goto out;
    }
    rep->val_loss[e] = v;
    if (v < best_v) {
      best_v = v;
      rep->best_epoch = e + 1;
      rep->best_val_loss = v;
      memcpy(best, theta, (size_t)P * sizeof(double));
      wait = 0;
    } else if (o->patience > 0 && ++wait >= o->patience) {
      rep->stopped_early = 1;
      break;
    }
  }
  qa_params_from_f64(p, n_val == 0 ? theta : best);
  if (report) { /* the split goes to the caller */
    rep->rows = perm;
    perm = NULL;
  }

out:
  qa_grad32_free(g32);
  opt_adam_free(&opt);
  tl_free(perm);
  tl_free(theta);
  if (rc || !report) qa_fit_report_free(rep);
  return rc;
}
