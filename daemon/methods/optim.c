/* optim.c - Adam / AdamW / AMSGrad (Kingma & Ba 2015; Reddi et al. 2018). */
#include "optim.h"

#include <math.h>
#include <string.h>

#include "../base/mem.h"

int opt_adam_init(opt_adam *o, int64_t n, double lr, double weight_decay, int amsgrad,
                  int decoupled, ts_err *err) {
  memset(o, 0, sizeof *o);
  o->lr = lr;
  o->beta1 = 0.9;
  o->beta2 = 0.999;
  o->eps = 1e-8;
  o->weight_decay = weight_decay;
  o->amsgrad = amsgrad;
  o->decoupled = decoupled;
  o->n = n;
  o->m = tl_calloc((size_t)(n ? n : 1), sizeof(double));
  o->v = tl_calloc((size_t)(n ? n : 1), sizeof(double));
  o->vmax = amsgrad ? tl_calloc((size_t)(n ? n : 1), sizeof(double)) : NULL;
  if (!o->m || !o->v || (amsgrad && !o->vmax)) {
    opt_adam_free(o);
    return ts_errf(err, TS_ENOMEM, "out of memory for optimiser state (%lld parameters)",
                   (long long)n);
  }
  return 0;
}

void opt_adam_step(opt_adam *o, double *p, const double *grad) {
  o->t++;
  double bc1 = 1.0 - pow(o->beta1, (double)o->t);
  double bc2 = 1.0 - pow(o->beta2, (double)o->t);
  for (int64_t i = 0; i < o->n; i++) {
    double g = grad[i];
    if (o->weight_decay != 0.0) {
      if (o->decoupled)
        p[i] -= o->lr * o->weight_decay * p[i];
      else
        g += o->weight_decay * p[i];
    }
    o->m[i] = o->beta1 * o->m[i] + (1.0 - o->beta1) * g;
    o->v[i] = o->beta2 * o->v[i] + (1.0 - o->beta2) * g * g;
    double v = o->v[i];
    if (o->amsgrad) {
      if (v > o->vmax[i]) o->vmax[i] = v;
      v = o->vmax[i];
    }
    p[i] -= o->lr * (o->m[i] / bc1) / (sqrt(v / bc2) + o->eps);
  }
}

void opt_adam_free(opt_adam *o) {
  tl_free(o->m);
  tl_free(o->v);
  tl_free(o->vmax);
  o->m = o->v = o->vmax = NULL;
}
