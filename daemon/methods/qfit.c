/* qfit.c - the fitting loop of the quantile aggregators: a seeded
 * train/validation split, minibatch Adam (AMSGrad) on the double-precision
 * loss of qagg.c, and early stopping that keeps the best epoch.
 *
 * The data are never copied: the split and every epoch's shuffle permute an
 * index array, and qa_loss_grad reads the rows through it. */
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
  if (o->batch_size < 1) return ts_errf(err, TS_EINVAL, "fit: batch_size must be >= 1, got %d", o->batch_size);
  if (!(o->learning_rate > 0.0) || !isfinite(o->learning_rate))
    return ts_errf(err, TS_EINVAL, "fit: learning_rate must be > 0, got %g", o->learning_rate);
  if (!(o->weight_decay >= 0.0)) return ts_errf(err, TS_EINVAL, "fit: weight_decay must be >= 0, got %g", o->weight_decay);
  if (!(o->lambda >= 0.0)) return ts_errf(err, TS_EINVAL, "fit: lambda must be >= 0, got %g", o->lambda);
  /* with a negative margin the penalty ReLU(q_k - q_k' + margin) would let
   * levels cross by up to |margin| for free: the opposite of its purpose */
  if (!(o->margin >= 0.0) || !isfinite(o->margin))
    return ts_errf(err, TS_EINVAL, "fit: margin must be >= 0, got %g", o->margin);
  if (!(o->dropout >= 0.0 && o->dropout < 1.0))
    return ts_errf(err, TS_EINVAL, "fit: dropout must be in [0, 1), got %g", o->dropout);
  if (!(o->validation_fraction >= 0.0 && o->validation_fraction < 1.0))
    return ts_errf(err, TS_EINVAL, "fit: validation_fraction must be in [0, 1), got %g", o->validation_fraction);
  int64_t nval = (int64_t)floor(o->validation_fraction * (double)B);
  if (B - nval < 1)
    return ts_errf(err, TS_EINVAL, "fit: %lld rows leave none for training after the validation split",
                   (long long)B);
  return 0;
}

int qa_fit(pool_t *pool, const qa_spec *s, qa_params *p, int64_t B, const float *Z,
           const float *X, const float *y, const qa_fit_opts *o, qa_fit_report *report,
           ts_err *err) {
  qa_fit_report local_rep;
  qa_fit_report *rep = report ? report : &local_rep;
  memset(rep, 0, sizeof *rep);
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (!Z || !y || (s->scope == QA_LOCAL && !X))
    return ts_errf(err, TS_EINVAL, "fit: missing %s", !Z ? "base predictions" : !y ? "targets" : "features");
  if (B < 1) return ts_errf(err, TS_EINVAL, "fit: needs rows, got %lld", (long long)B);
  if ((rc = check_opts(o, B, err))) return rc;

  int64_t P = p->n, n_val = (int64_t)floor(o->validation_fraction * (double)B), n_tr = B - n_val;
  int64_t *perm = tl_malloc((size_t)B * sizeof(int64_t));
  double *theta = tl_malloc((size_t)P * 3 * sizeof(double));
  rep->train_loss = tl_malloc((size_t)o->epochs * 2 * sizeof(double));
  opt_adam opt;
  memset(&opt, 0, sizeof opt);
  if (!perm || !theta || !rep->train_loss) {
    rc = ts_errf(err, TS_ENOMEM, "fit: out of memory for %lld rows and %lld parameters", (long long)B,
                 (long long)P);
    goto out;
  }
  if ((rc = opt_adam_init(&opt, P, o->learning_rate, o->weight_decay, 1, 0, err))) goto out;
  rep->val_loss = rep->train_loss + o->epochs;
  double *grad = theta + P, *best = theta + 2 * P;
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
      if ((rc = qa_loss_grad(pool, s, theta, nb, tr + b0, Z, X, y, &lo, &l, NULL, grad, err))) goto out;
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
    if ((rc = qa_loss_grad(pool, s, theta, n_val, va, Z, X, y, &vo, NULL, &v, NULL, err))) goto out;
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
  opt_adam_free(&opt);
  tl_free(perm);
  tl_free(theta);
  if (rc || !report) qa_fit_report_free(rep);
  return rc;
}
