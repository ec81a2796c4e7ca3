/* qagg.c - the six quantile aggregators: names, the spec, parameters and
 * float inference (through sg_gemm). The training math lives beside it:
 * qagg_f64.c (the double-precision loss and gradient the gradient checks
 * trust) and qagg_f32.c (the batched float32 gradient the fit runs).
 *
 * Invariants kept here:
 * - the parameter tensors of a qa_params tile params->data in the order of
 *   p->t[], and a training theta vector has exactly that order;
 * - a row's logits always have the layout [M], [M, K] or [M*K, K] (row-major)
 *   whether they come from the global parameters or the local head. */
#include "qagg.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/rng.h"
#include "../kernels/sgemm.h"
#include "qagg_int.h"

/* ---------------------------------------------------------------- names */

static const char *const gran_names[] = {"coarse", "medium", "fine"};
static const char *const mono_names[] = {"none", "sort", "isotonic", "median"};

const char *qa_granularity_name(qa_granularity g) {
  return (unsigned)g < 3 ? gran_names[g] : "?";
}

int qa_granularity_from_name(const char *name, qa_granularity *out) {
  for (int i = 0; i < 3; i++)
    if (name && strcmp(name, gran_names[i]) == 0) {
      *out = (qa_granularity)i;
      return 0;
    }
  return -TS_EINVAL;
}

const char *qa_monotone_name(qa_monotone m) {
  return (unsigned)m < 4 ? mono_names[m] : "?";
}

int qa_monotone_from_name(const char *name, qa_monotone *out) {
  for (int i = 0; i < 4; i++)
    if (name && strcmp(name, mono_names[i]) == 0) {
      *out = (qa_monotone)i;
      return 0;
    }
  return -TS_EINVAL;
}

/* ----------------------------------------------------------------- spec */

int64_t qa_logit_count(const qa_spec *s) {
  int64_t M = s->M, K = s->K;
  switch (s->gran) {
    case QA_COARSE: return M;
    case QA_MEDIUM: return M * K;
    default: return M * K * K;
  }
}

int qa_spec_check(const qa_spec *s, ts_err *err) {
  if (s->M < 1)
    return ts_errf(err, TS_EINVAL, "aggregator: M (base models) must be >= 1, got %d", s->M);
  if (s->K < 1 || s->K > QA_MAX_K)
    return ts_errf(err, TS_EINVAL, "aggregator: K (levels) must be in [1, %d], got %d", QA_MAX_K,
                   s->K);
  if ((unsigned)s->gran > QA_FINE)
    return ts_errf(err, TS_EINVAL, "aggregator: unknown granularity %d", (int)s->gran);
  if ((unsigned)s->scope > QA_LOCAL)
    return ts_errf(err, TS_EINVAL, "aggregator: unknown scope %d", (int)s->scope);
  if (!s->levels) return ts_errf(err, TS_EINVAL, "aggregator: levels missing");
  for (int k = 0; k < s->K; k++) {
    double t = s->levels[k];
    if (!(t > 0.0 && t < 1.0))
      return ts_errf(err, TS_EINVAL, "aggregator: level %d is %g, must be in (0, 1)", k, t);
    if (k > 0 && !(t > s->levels[k - 1]))
      return ts_errf(err, TS_EINVAL,
                     "aggregator: levels must increase strictly (level %d: %g after %g)", k, t,
                     s->levels[k - 1]);
  }
  if ((int64_t)s->M * s->K * s->K > ((int64_t)1 << 31))
    return ts_errf(err, TS_EINVAL, "aggregator: M*K*K = %lld is too large",
                   (long long)s->M * s->K * s->K);
  if (s->scope == QA_LOCAL) {
    if (s->D < 1)
      return ts_errf(err, TS_EINVAL, "local aggregator: D (features) must be >= 1, got %d", s->D);
    if (s->hidden < 1)
      return ts_errf(err, TS_EINVAL, "local aggregator: hidden must be >= 1, got %d", s->hidden);
    if (s->depth < 1 || s->depth > QA_MAX_DEPTH)
      return ts_errf(err, TS_EINVAL, "local aggregator: depth must be in [1, %d], got %d",
                     QA_MAX_DEPTH, s->depth);
    if (qa_logit_count(s) * s->hidden > ((int64_t)1 << 31))
      return ts_errf(err, TS_EINVAL, "local aggregator: head of %lld x %d weights is too large",
                     (long long)qa_logit_count(s), s->hidden);
    /* in double: hidden is only bounded by the head check above here */
    double H = s->hidden;
    double n = (double)s->D * H + H + (double)(s->depth - 1) * (H * H + H) +
               (double)qa_logit_count(s) * (H + 1);
    if (n > (double)QA_MAX_PARAMS)
      return ts_errf(err, TS_EINVAL,
                     "local aggregator: %.0f parameters (D=%d, hidden=%d, depth=%d) is more than "
                     "the %lld allowed; use a smaller hidden size or depth",
                     n, s->D, s->hidden, s->depth, (long long)QA_MAX_PARAMS);
  }
  return 0;
}

/* --------------------------------------------------------------- params */

static void add_tensor(qa_params *p, const char *name, int ndim, int64_t d0, int64_t d1) {
  qa_tensor *t = &p->t[p->ntensors++];
  snprintf(t->name, sizeof t->name, "%s", name);
  t->ndim = ndim;
  t->shape[0] = d0;
  t->shape[1] = ndim == 2 ? d1 : 0;
  t->numel = ndim == 2 ? d0 * d1 : d0;
  t->offset = p->n;
  p->n += t->numel;
}

/* Layer i of the local network: in and out widths. */
void qa__layer_dims(const qa_spec *s, int i, int64_t *in, int64_t *out) {
  *in = i == 0 ? s->D : s->hidden;
  *out = i == s->depth ? qa_logit_count(s) : s->hidden;
}

int qa_params_init(qa_params *p, const qa_spec *s, uint64_t seed, ts_err *err) {
  memset(p, 0, sizeof *p);
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  int64_t M = s->M, K = s->K, L = qa_logit_count(s);
  if (s->scope == QA_GLOBAL) {
    if (s->gran == QA_COARSE)
      add_tensor(p, "aggregator.logits", 1, M, 0);
    else if (s->gran == QA_MEDIUM)
      add_tensor(p, "aggregator.logits", 2, M, K);
    else
      add_tensor(p, "aggregator.logits", 2, M * K, K);
  } else {
    char name[48];
    for (int i = 0; i <= s->depth; i++) {
      int64_t in, out;
      qa__layer_dims(s, i, &in, &out);
      snprintf(name, sizeof name, "aggregator.layers.%d.weight", i);
      add_tensor(p, name, 2, out, in);
      snprintf(name, sizeof name, "aggregator.layers.%d.bias", i);
      add_tensor(p, name, 1, out, 0);
    }
  }
  p->data = tl_calloc((size_t)p->n, sizeof(float));
  if (!p->data) {
    int64_t n = p->n;
    memset(p, 0, sizeof *p);
    return ts_errf(err, TS_ENOMEM, "aggregator: out of memory for %lld parameters", (long long)n);
  }
  for (int i = 0; i < p->ntensors; i++) p->t[i].data = p->data + p->t[i].offset;

  if (s->scope == QA_GLOBAL) {
    if (!s->simplex) {
      float *w = p->data;
      if (s->gran == QA_COARSE || s->gran == QA_MEDIUM)
        for (int64_t i = 0; i < L; i++) w[i] = (float)(1.0 / (double)M);
      else
        for (int64_t j = 0; j < M; j++)
          for (int64_t l = 0; l < K; l++) w[(j * K + l) * K + l] = (float)(1.0 / (double)M);
    }
  } else {
    uint64_t st = seed ^ 0x5A17C0DEull;
    for (int i = 0; i < p->ntensors; i += 2) {
      qa_tensor *w = &p->t[i], *b = &p->t[i + 1];
      double bound = 1.0 / sqrt((double)w->shape[1]);
      for (int64_t e = 0; e < w->numel; e++)
        w->data[e] = (float)((2.0 * rng_unif01(&st) - 1.0) * bound);
      for (int64_t e = 0; e < b->numel; e++)
        b->data[e] = (float)((2.0 * rng_unif01(&st) - 1.0) * bound);
    }
  }
  return 0;
}

void qa_params_free(qa_params *p) {
  if (!p) return;
  tl_free(p->data);
  memset(p, 0, sizeof *p);
}

qa_tensor *qa_params_find(const qa_params *p, const char *name) {
  for (int i = 0; i < p->ntensors; i++)
    if (strcmp(p->t[i].name, name) == 0) return (qa_tensor *)&p->t[i];
  return NULL;
}

void qa_params_to_f64(const qa_params *p, double *theta) {
  for (int64_t i = 0; i < p->n; i++) theta[i] = p->data[i];
}

void qa_params_from_f64(qa_params *p, const double *theta) {
  for (int64_t i = 0; i < p->n; i++) p->data[i] = (float)theta[i];
}

/* ------------------------------------------------ softmax over the groups
 *
 * coarse: one group of M; medium: K groups {(j, k) : j} with stride K;
 * fine: K groups {(r, k) : r < M*K} with stride K. */

void qa__group_shape(const qa_spec *s, int64_t *ngroups, int64_t *len, int64_t *stride) {
  if (s->gran == QA_COARSE) {
    *ngroups = 1;
    *len = s->M;
    *stride = 1;
  } else {
    *ngroups = s->K;
    *len = s->gran == QA_MEDIUM ? s->M : (int64_t)s->M * s->K;
    *stride = s->K;
  }
}

static void softmax_f32(const qa_spec *s, float *v) {
  int64_t G, len, st;
  qa__group_shape(s, &G, &len, &st);
  for (int64_t g = 0; g < G; g++) {
    float *a = v + g;
    float mx = a[0];
    for (int64_t i = 1; i < len; i++) mx = a[i * st] > mx ? a[i * st] : mx;
    double sum = 0.0;
    for (int64_t i = 0; i < len; i++) sum += (a[i * st] = expf(a[i * st] - mx));
    float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < len; i++) a[i * st] *= inv;
  }
}

int qa_global_weights(const qa_spec *s, const qa_params *p, double *W, ts_err *err) {
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (s->scope != QA_GLOBAL)
    return ts_errf(err, TS_EINVAL,
                   "aggregator: a local aggregator's weights depend on the features");
  int64_t L = qa_logit_count(s);
  if (p->n != L) return ts_errf(err, TS_EINVAL, "aggregator: parameters do not match the spec");
  for (int64_t i = 0; i < L; i++) W[i] = p->data[i];
  if (s->simplex) {
    double *t = tl_malloc((size_t)L * sizeof(double));
    if (!t) return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
    memcpy(t, W, (size_t)L * sizeof(double));
    qa__softmax_f64(s, t, W);
    tl_free(t);
  }
  return 0;
}

/* ------------------------------------------------------ float inference */

typedef struct fw_ctx {
  const qa_spec *s;
  const qa_params *p;
  int64_t B, chunk;
  const float *Z, *X;
  float *Q;
  const float *Wg; /* global weights (float) */
  int failed;
} fw_ctx;

/* q[K] from a row's weights w (logit layout) and z[M*K]. */
static void agg_row_f32(const qa_spec *s, const float *w, const float *z, float *q) {
  int M = s->M, K = s->K;
  if (s->gran == QA_FINE) {
    sg_gemm(NULL, 0, 1, K, (int64_t)M * K, z, (int64_t)M * K, w, K, 0.0f, q, K);
    return;
  }
  for (int k = 0; k < K; k++) q[k] = 0.0f;
  if (s->gran == QA_COARSE)
    for (int j = 0; j < M; j++)
      for (int k = 0; k < K; k++) q[k] += w[j] * z[j * K + k];
  else
    for (int j = 0; j < M; j++)
      for (int k = 0; k < K; k++) q[k] += w[j * K + k] * z[j * K + k];
}

static void fw_global_rows(void *arg, int64_t b0, int64_t b1) {
  fw_ctx *c = arg;
  int64_t MK = (int64_t)c->s->M * c->s->K;
  for (int64_t b = b0; b < b1; b++) agg_row_f32(c->s, c->Wg, c->Z + b * MK, c->Q + b * c->s->K);
}

static void fw_local_chunks(void *arg, int64_t c0, int64_t c1) {
  fw_ctx *c = arg;
  const qa_spec *s = c->s;
  int64_t H = s->hidden, L = qa_logit_count(s), MK = (int64_t)s->M * s->K, C = c->chunk;
  float *buf = tl_malloc((size_t)(2 * C * H + C * L) * sizeof(float));
  if (!buf) {
    __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  float *h1 = buf, *h2 = buf + C * H, *o = buf + 2 * C * H;
  for (int64_t ci = c0; ci < c1; ci++) {
    int64_t r0 = ci * C, nr = c->B - r0 < C ? c->B - r0 : C;
    const float *in = c->X + r0 * s->D;
    int64_t ld_in = s->D;
    for (int i = 0; i <= s->depth; i++) {
      const qa_tensor *w = &c->p->t[2 * i], *b = &c->p->t[2 * i + 1];
      int64_t out = w->shape[0], din = w->shape[1];
      float *dst = i == s->depth ? o : (in == h1 ? h2 : h1);
      sg_gemm(NULL, 1, nr, out, din, in, ld_in, w->data, din, 0.0f, dst, out);
      sg_add_bias(nr, out, dst, out, b->data);
      if (i < s->depth)
        for (int64_t e = 0; e < nr * out; e++) dst[e] = dst[e] > 0 ? dst[e] : expm1f(dst[e]);
      in = dst;
      ld_in = out;
    }
    for (int64_t r = 0; r < nr; r++) {
      float *w = o + r * L;
      if (s->simplex) softmax_f32(s, w);
      agg_row_f32(s, w, c->Z + (r0 + r) * MK, c->Q + (r0 + r) * s->K);
    }
  }
  tl_free(buf);
}

void qa_infer_free(qa_infer *f) {
  if (!f) return;
  tl_free(f->wg);
  memset(f, 0, sizeof *f);
}

int qa_infer_init(qa_infer *f, const qa_spec *s, const qa_params *p, ts_err *err) {
  memset(f, 0, sizeof *f);
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  int64_t L = qa_logit_count(s);
  if (s->scope == QA_GLOBAL) {
    if (p->n != L || p->ntensors != 1)
      return ts_errf(err, TS_EINVAL,
                     "aggregator: parameters (%lld values) do not match the spec (%lld)",
                     (long long)p->n, (long long)L);
    f->wg = tl_malloc((size_t)L * sizeof(float));
    if (!f->wg)
      return ts_errf(err, TS_ENOMEM, "aggregator: out of memory for %lld weights", (long long)L);
    memcpy(f->wg, p->data, (size_t)L * sizeof(float));
    if (s->simplex) softmax_f32(s, f->wg);
  } else {
    if (p->ntensors != 2 * (s->depth + 1))
      return ts_errf(err, TS_EINVAL, "local aggregator: %d parameter tensors, spec needs %d",
                     p->ntensors, 2 * (s->depth + 1));
    for (int i = 0; i <= s->depth; i++) {
      int64_t in, out;
      qa__layer_dims(s, i, &in, &out);
      const qa_tensor *w = &p->t[2 * i], *b = &p->t[2 * i + 1];
      if (w->shape[0] != out || w->shape[1] != in || b->numel != out)
        return ts_errf(
            err, TS_EINVAL, "local aggregator: '%s' is [%lld, %lld], spec needs [%lld, %lld]",
            w->name, (long long)w->shape[0], (long long)w->shape[1], (long long)out, (long long)in);
    }
  }
  f->spec = *s;
  f->params = p;
  return 0;
}

int qa_infer_run(pool_t *pool, const qa_infer *f, int64_t B, const float *Z, const float *X,
                 float *Q, ts_err *err) {
  const qa_spec *s = &f->spec;
  if (!f->params) return ts_errf(err, TS_EINVAL, "aggregator: inference state not initialised");
  if (B < 0) return ts_errf(err, TS_EINVAL, "aggregator: negative batch %lld", (long long)B);
  if (B == 0) return 0;
  if (!Z || !Q) return ts_errf(err, TS_EINVAL, "aggregator: base predictions or output missing");
  if (s->scope == QA_LOCAL && !X)
    return ts_errf(err, TS_EINVAL, "local aggregator: features X missing");
  int64_t L = qa_logit_count(s), MK = (int64_t)s->M * s->K;
  fw_ctx c = {.s = s, .p = f->params, .B = B, .Z = Z, .X = X, .Q = Q, .Wg = f->wg};
  if (s->scope == QA_GLOBAL) {
    if (s->gran == QA_FINE) /* one [B, M*K] x [M*K, K] product */
      sg_gemm(pool, 0, B, s->K, MK, Z, MK, f->wg, s->K, 0.0f, Q, s->K);
    else
      pool_parallel_for(pool, B, 256, fw_global_rows, &c);
    return 0;
  }
  /* Rows per chunk: the head output of a chunk stays near 4 MiB. */
  int64_t C = ((int64_t)1 << 20) / (L > s->hidden ? L : s->hidden);
  c.chunk = C > 128 ? 128 : C < 1 ? 1 : C;
  pool_parallel_for(pool, (B + c.chunk - 1) / c.chunk, 1, fw_local_chunks, &c);
  if (c.failed)
    return ts_errf(err, TS_ENOMEM, "local aggregator: out of memory for a chunk of %lld rows",
                   (long long)c.chunk);
  return 0;
}

int qa_forward(pool_t *pool, const qa_spec *s, const qa_params *p, int64_t B, const float *Z,
               const float *X, float *Q, ts_err *err) {
  qa_infer f;
  int rc = qa_infer_init(&f, s, p, err);
  if (rc) return rc;
  rc = qa_infer_run(pool, &f, B, Z, X, Q, err);
  qa_infer_free(&f);
  return rc;
}
