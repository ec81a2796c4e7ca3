/* qagg.c - the six quantile aggregators: parameters, float inference
 * (through sg_gemm) and the double-precision loss and gradient that the fit
 * and the gradient checks use.
 *
 * Invariants kept here:
 * - the parameter tensors of a qa_params tile params->data in the order of
 *   p->t[], and a training theta vector has exactly that order;
 * - a row's logits always have the layout [M], [M, K] or [M*K, K] (row-major)
 *   whether they come from the global parameters or the local head;
 * - qa_loss_grad splits rows into a number of blocks that depends only on n
 *   and the parameter count, and sums the blocks in order, so its result does
 *   not depend on the pool or on scheduling. */
#include "qagg.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../base/mem.h"
#include "../kernels/sgemm.h"

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
  if (s->M < 1) return ts_errf(err, TS_EINVAL, "aggregator: M (base models) must be >= 1, got %d", s->M);
  if (s->K < 1 || s->K > QA_MAX_K)
    return ts_errf(err, TS_EINVAL, "aggregator: K (levels) must be in [1, %d], got %d", QA_MAX_K, s->K);
  if ((unsigned)s->gran > QA_FINE) return ts_errf(err, TS_EINVAL, "aggregator: unknown granularity %d", (int)s->gran);
  if ((unsigned)s->scope > QA_LOCAL) return ts_errf(err, TS_EINVAL, "aggregator: unknown scope %d", (int)s->scope);
  if (!s->levels) return ts_errf(err, TS_EINVAL, "aggregator: levels missing");
  for (int k = 0; k < s->K; k++) {
    double t = s->levels[k];
    if (!(t > 0.0 && t < 1.0))
      return ts_errf(err, TS_EINVAL, "aggregator: level %d is %g, must be in (0, 1)", k, t);
    if (k > 0 && !(t > s->levels[k - 1]))
      return ts_errf(err, TS_EINVAL, "aggregator: levels must increase strictly (level %d: %g after %g)", k,
                     t, s->levels[k - 1]);
  }
  if ((int64_t)s->M * s->K * s->K > ((int64_t)1 << 31))
    return ts_errf(err, TS_EINVAL, "aggregator: M*K*K = %lld is too large",
                   (long long)s->M * s->K * s->K);
  if (s->scope == QA_LOCAL) {
    if (s->D < 1) return ts_errf(err, TS_EINVAL, "local aggregator: D (features) must be >= 1, got %d", s->D);
    if (s->hidden < 1) return ts_errf(err, TS_EINVAL, "local aggregator: hidden must be >= 1, got %d", s->hidden);
    if (s->depth < 1 || s->depth > QA_MAX_DEPTH)
      return ts_errf(err, TS_EINVAL, "local aggregator: depth must be in [1, %d], got %d", QA_MAX_DEPTH,
                     s->depth);
    if (qa_logit_count(s) * s->hidden > ((int64_t)1 << 31))
      return ts_errf(err, TS_EINVAL, "local aggregator: head of %lld x %d weights is too large",
                     (long long)qa_logit_count(s), s->hidden);
  }
  return 0;
}

/* --------------------------------------------------------------- params */

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double unif01(uint64_t *x) { return (double)(splitmix64(x) >> 11) * 0x1.0p-53; }

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
static void layer_dims(const qa_spec *s, int i, int64_t *in, int64_t *out) {
  *in = i == 0 ? s->D : s->hidden;
  *out = i == s->depth ? qa_logit_count(s) : s->hidden;
}

int qa_params_init(qa_params *p, const qa_spec *s, uint64_t seed, ts_err *err) {
  memset(p, 0, sizeof *p);
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  int64_t M = s->M, K = s->K, L = qa_logit_count(s);
  if (s->scope == QA_GLOBAL) {
    if (s->gran == QA_COARSE) add_tensor(p, "aggregator.logits", 1, M, 0);
    else if (s->gran == QA_MEDIUM) add_tensor(p, "aggregator.logits", 2, M, K);
    else add_tensor(p, "aggregator.logits", 2, M * K, K);
  } else {
    char name[48];
    for (int i = 0; i <= s->depth; i++) {
      int64_t in, out;
      layer_dims(s, i, &in, &out);
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
      for (int64_t e = 0; e < w->numel; e++) w->data[e] = (float)((2.0 * unif01(&st) - 1.0) * bound);
      for (int64_t e = 0; e < b->numel; e++) b->data[e] = (float)((2.0 * unif01(&st) - 1.0) * bound);
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

static void group_shape(const qa_spec *s, int64_t *ngroups, int64_t *len, int64_t *stride) {
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

static void softmax_f64(const qa_spec *s, const double *logit, double *w) {
  int64_t G, len, st;
  group_shape(s, &G, &len, &st);
  for (int64_t g = 0; g < G; g++) {
    const double *a = logit + g;
    double *o = w + g;
    double mx = a[0];
    for (int64_t i = 1; i < len; i++) mx = a[i * st] > mx ? a[i * st] : mx;
    double sum = 0.0;
    for (int64_t i = 0; i < len; i++) sum += (o[i * st] = exp(a[i * st] - mx));
    double inv = 1.0 / sum;
    for (int64_t i = 0; i < len; i++) o[i * st] *= inv;
  }
}

static void softmax_f32(const qa_spec *s, float *v) {
  int64_t G, len, st;
  group_shape(s, &G, &len, &st);
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

/* ds = d loss / d logits from dw = d loss / d weights, through the softmax:
 * ds_i = w_i (dw_i - sum_i' w_i' dw_i') within each group. */
static void softmax_backward(const qa_spec *s, const double *w, const double *dw, double *ds) {
  int64_t G, len, st;
  group_shape(s, &G, &len, &st);
  for (int64_t g = 0; g < G; g++) {
    double dot = 0.0;
    for (int64_t i = 0; i < len; i++) dot += w[g + i * st] * dw[g + i * st];
    for (int64_t i = 0; i < len; i++) ds[g + i * st] = w[g + i * st] * (dw[g + i * st] - dot);
  }
}

/* ------------------------------------------------- aggregation of one row */

static void agg_row_f64(const qa_spec *s, const double *w, const float *z, double *q) {
  int M = s->M, K = s->K;
  for (int k = 0; k < K; k++) q[k] = 0.0;
  if (s->gran == QA_COARSE) {
    for (int j = 0; j < M; j++)
      for (int k = 0; k < K; k++) q[k] += w[j] * z[j * K + k];
  } else if (s->gran == QA_MEDIUM) {
    for (int j = 0; j < M; j++)
      for (int k = 0; k < K; k++) q[k] += w[j * K + k] * z[j * K + k];
  } else {
    for (int64_t r = 0; r < (int64_t)M * K; r++) {
      double zr = z[r];
      const double *wr = w + r * K;
      for (int k = 0; k < K; k++) q[k] += wr[k] * zr;
    }
  }
}

/* dw += d loss / d w for one row, given g = d loss / d q. */
static void agg_dw_accum(const qa_spec *s, const float *z, const double *g, double *dw) {
  int M = s->M, K = s->K;
  if (s->gran == QA_COARSE) {
    for (int j = 0; j < M; j++) {
      double a = 0.0;
      for (int k = 0; k < K; k++) a += g[k] * z[j * K + k];
      dw[j] += a;
    }
  } else if (s->gran == QA_MEDIUM) {
    for (int64_t i = 0; i < (int64_t)M * K; i++) dw[i] += g[i % K] * z[i];
  } else {
    for (int64_t r = 0; r < (int64_t)M * K; r++) {
      double zr = z[r];
      double *d = dw + r * K;
      for (int k = 0; k < K; k++) d[k] += zr * g[k];
    }
  }
}

/* Loss of one row and g = d(row's share of the loss)/dq, where the pinball
 * part is scaled by cp = 1/(n K) and the penalty by cn = lambda/(n pairs). */
static void row_loss(int K, const double *tau, double y, const double *q, double cp, double cn,
                     double margin, double *pin, double *pen, double *g) {
  double ps = 0.0;
  for (int k = 0; k < K; k++) {
    double d = y - q[k];
    ps += d >= 0 ? tau[k] * d : (tau[k] - 1.0) * d;
    g[k] = cp * (y < q[k] ? 1.0 - tau[k] : -tau[k]);
  }
  *pin = ps;
  double pe = 0.0;
  if (cn != 0.0) {
    for (int k = 0; k < K; k++) {
      double qk = q[k] + margin;
      for (int k2 = k + 1; k2 < K; k2++) {
        double v = qk - q[k2];
        if (v > 0) {
          pe += v;
          g[k] += cn;
          g[k2] -= cn;
        }
      }
    }
  }
  *pen = pe;
}

/* ------------------------------------------------- local network (double) */

typedef struct net_ws {
  double *pre[QA_MAX_DEPTH], *act[QA_MAX_DEPTH];
  double *inp[QA_MAX_DEPTH + 1]; /* input of Linear i; inp[0] = x */
  double *scale[QA_MAX_DEPTH + 1]; /* dropout factor applied to inp[i], NULL = none */
  double *sv, *w, *dw, *ds, *da, *db, *q, *g;
  double *mem;
} net_ws;

static int net_ws_alloc(net_ws *ws, const qa_spec *s, int dropout) {
  int64_t H = s->hidden, D = s->D, L = qa_logit_count(s), K = s->K, depth = s->depth;
  int64_t need = D + 3 * depth * H + (dropout ? depth * H : 0) + 4 * L + 2 * (H > D ? H : D) + 2 * K;
  memset(ws, 0, sizeof *ws);
  ws->mem = tl_malloc((size_t)need * sizeof(double));
  if (!ws->mem) return -1;
  double *m = ws->mem;
  ws->inp[0] = m, m += D;
  for (int i = 0; i < depth; i++) {
    ws->pre[i] = m, m += H;
    ws->act[i] = m, m += H;
    ws->inp[i + 1] = m, m += H;
    if (dropout && i + 1 < depth) ws->scale[i + 1] = m, m += H;
  }
  if (dropout) m += H; /* the unused last mask slot keeps `need` simple */
  ws->sv = m, m += L;
  ws->w = m, m += L;
  ws->dw = m, m += L;
  ws->ds = m, m += L;
  ws->da = m, m += (H > D ? H : D);
  ws->db = m, m += (H > D ? H : D);
  ws->q = m, m += K;
  ws->g = m, m += K;
  return 0;
}

static double elu(double x) { return x > 0 ? x : expm1(x); }

/* Pointers to layer i's weight and bias inside theta. */
static const double *lw(const qa_spec *s, const double *theta, int i, int bias) {
  int64_t off = 0;
  for (int l = 0; l < i; l++) {
    int64_t in, out;
    layer_dims(s, l, &in, &out);
    off += out * in + out;
  }
  int64_t in, out;
  layer_dims(s, i, &in, &out);
  return theta + off + (bias ? out * in : 0);
}

/* Forward of one row through the network into ws->sv (logits) and ws->w
 * (weights). row_id and seed fix the dropout mask. */
static void net_forward_row(const qa_spec *s, const double *const *W, const double *const *Bv,
                            const float *x, double dropout, uint64_t seed, int64_t row_id,
                            net_ws *ws) {
  int64_t H = s->hidden, L = qa_logit_count(s);
  for (int d = 0; d < s->D; d++) ws->inp[0][d] = x[d];
  uint64_t st = seed ^ ((uint64_t)row_id * 0xD1B54A32D192ED03ull);
  for (int i = 0; i <= s->depth; i++) {
    int64_t in, out;
    layer_dims(s, i, &in, &out);
    const double *a = ws->inp[i];
    double *o = i == s->depth ? ws->sv : ws->pre[i];
    for (int64_t r = 0; r < out; r++) {
      const double *wr = W[i] + r * in;
      double acc = Bv[i][r];
      for (int64_t c = 0; c < in; c++) acc += wr[c] * a[c];
      o[r] = acc;
    }
    if (i == s->depth) break;
    for (int64_t r = 0; r < H; r++) ws->act[i][r] = elu(ws->pre[i][r]);
    double *nx = ws->inp[i + 1];
    if (ws->scale[i + 1]) {
      double keep = 1.0 / (1.0 - dropout);
      for (int64_t r = 0; r < H; r++) {
        ws->scale[i + 1][r] = unif01(&st) < dropout ? 0.0 : keep;
        nx[r] = ws->act[i][r] * ws->scale[i + 1][r];
      }
    } else {
      memcpy(nx, ws->act[i], (size_t)H * sizeof(double));
    }
  }
  if (s->simplex) softmax_f64(s, ws->sv, ws->w);
  else memcpy(ws->w, ws->sv, (size_t)L * sizeof(double));
}

/* Backward of one row from ws->ds (d loss / d logits) into grad. */
static void net_backward_row(const qa_spec *s, const double *const *W, double *const *GW,
                             double *const *GB, net_ws *ws) {
  int64_t H = s->hidden;
  const double *up = ws->ds; /* gradient w.r.t. the output of layer i */
  for (int i = s->depth; i >= 0; i--) {
    int64_t in, out;
    layer_dims(s, i, &in, &out);
    const double *a = ws->inp[i];
    for (int64_t r = 0; r < out; r++) {
      double gr = up[r];
      if (gr == 0.0) continue;
      double *gw = GW[i] + r * in;
      for (int64_t c = 0; c < in; c++) gw[c] += gr * a[c];
      GB[i][r] += gr;
    }
    if (i == 0) break;
    /* d loss / d inp[i] = W_i^T up, then in place through the dropout of
     * inp[i] and the ELU of layer i-1; da and db alternate as `up`. */
    double *da = up == ws->da ? ws->db : ws->da;
    for (int64_t c = 0; c < in; c++) da[c] = 0.0;
    for (int64_t r = 0; r < out; r++) {
      double gr = up[r];
      if (gr == 0.0) continue;
      const double *wr = W[i] + r * in;
      for (int64_t c = 0; c < in; c++) da[c] += gr * wr[c];
    }
    for (int64_t c = 0; c < H; c++) {
      double v = da[c];
      if (ws->scale[i]) v *= ws->scale[i][c];
      double p = ws->pre[i - 1][c];
      da[c] = v * (p > 0 ? 1.0 : exp(p));
    }
    up = da;
  }
}

/* ------------------------------------------------------- loss and grad */

typedef struct lg_ctx {
  const qa_spec *s;
  const double *theta;
  const int64_t *rows;
  int64_t n, nblocks;
  const float *Z, *X, *y;
  const qa_loss_opts *o;
  const double *gw; /* global: the weights */
  double cp, cn;
  int want_grad;
  double *acc;   /* [nblocks, P] gradient accumulators */
  int64_t P;
  double *pin, *pen; /* [nblocks] */
  int failed;
} lg_ctx;

static void lg_block(void *arg, int64_t b0, int64_t b1) {
  lg_ctx *c = arg;
  const qa_spec *s = c->s;
  int M = s->M, K = s->K;
  for (int64_t b = b0; b < b1; b++) {
    int64_t r0 = c->n * b / c->nblocks, r1 = c->n * (b + 1) / c->nblocks;
    double *acc = c->want_grad ? c->acc + b * c->P : NULL;
    double pin = 0.0, pen = 0.0, rp, re;
    net_ws ws;
    int drop = s->scope == QA_LOCAL && c->o->dropout > 0.0;
    if (net_ws_alloc(&ws, s, drop)) {
      __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
      return;
    }
    const double *W[QA_MAX_DEPTH + 1], *Bv[QA_MAX_DEPTH + 1];
    double *GW[QA_MAX_DEPTH + 1], *GB[QA_MAX_DEPTH + 1];
    if (s->scope == QA_LOCAL)
      for (int i = 0; i <= s->depth; i++) {
        W[i] = lw(s, c->theta, i, 0);
        Bv[i] = lw(s, c->theta, i, 1);
        if (acc) {
          GW[i] = acc + (W[i] - c->theta);
          GB[i] = acc + (Bv[i] - c->theta);
        }
      }
    int64_t L = qa_logit_count(s);
    for (int64_t i = r0; i < r1; i++) {
      int64_t r = c->rows ? c->rows[i] : i;
      const float *z = c->Z + r * (int64_t)M * K;
      const double *w = c->gw;
      if (s->scope == QA_LOCAL) {
        net_forward_row(s, W, Bv, c->X + r * (int64_t)s->D, drop ? c->o->dropout : 0.0,
                        c->o->dropout_seed, r, &ws);
        w = ws.w;
      }
      agg_row_f64(s, w, z, ws.q);
      row_loss(K, s->levels, c->y[r], ws.q, c->cp, c->cn, c->o->margin, &rp, &re, ws.g);
      pin += rp;
      pen += re;
      if (!acc) continue;
      if (s->scope == QA_GLOBAL) {
        agg_dw_accum(s, z, ws.g, acc);
      } else {
        memset(ws.dw, 0, (size_t)L * sizeof(double));
        agg_dw_accum(s, z, ws.g, ws.dw);
        if (s->simplex) softmax_backward(s, ws.w, ws.dw, ws.ds);
        else memcpy(ws.ds, ws.dw, (size_t)L * sizeof(double));
        net_backward_row(s, W, GW, GB, &ws);
      }
    }
    c->pin[b] = pin;
    c->pen[b] = pen;
    tl_free(ws.mem);
  }
}

static int global_weights_f64(const qa_spec *s, const double *theta, double *w) {
  int64_t L = qa_logit_count(s);
  if (s->simplex) softmax_f64(s, theta, w);
  else memcpy(w, theta, (size_t)L * sizeof(double));
  return 0;
}

int qa_loss_grad(pool_t *pool, const qa_spec *s, const double *theta, int64_t n,
                 const int64_t *rows, const float *Z, const float *X, const float *y,
                 const qa_loss_opts *o, double *loss, double *pinball, double *grad,
                 ts_err *err) {
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (n < 1) return ts_errf(err, TS_EINVAL, "aggregator loss: needs at least one row, got %lld", (long long)n);
  if (!Z || !y || (s->scope == QA_LOCAL && !X))
    return ts_errf(err, TS_EINVAL, "aggregator loss: missing %s", !Z ? "Z" : !y ? "y" : "X (features)");
  qa_loss_opts zero = {0};
  if (!o) o = &zero;
  if (s->scope == QA_LOCAL && (o->dropout < 0.0 || o->dropout >= 1.0))
    return ts_errf(err, TS_EINVAL, "aggregator loss: dropout must be in [0, 1), got %g", o->dropout);

  int64_t L = qa_logit_count(s), P = L;
  if (s->scope == QA_LOCAL) {
    P = 0;
    for (int i = 0; i <= s->depth; i++) {
      int64_t in, out;
      layer_dims(s, i, &in, &out);
      P += out * in + out;
    }
  }
  /* Blocks: enough to keep two threads busy with room to balance, few
   * enough that their gradient buffers stay under ~64 MiB. */
  int64_t nb = (n + 31) / 32;
  if (nb > 16) nb = 16;
  if (grad) {
    int64_t cap = ((int64_t)64 << 20) / (P * 8);
    if (cap < 1) cap = 1;
    if (nb > cap) nb = cap;
  }
  lg_ctx c = {.s = s, .theta = theta, .rows = rows, .n = n, .nblocks = nb, .Z = Z, .X = X, .y = y,
              .o = o, .want_grad = grad != NULL, .P = P};
  c.cp = 1.0 / ((double)n * s->K);
  int64_t npairs = (int64_t)s->K * (s->K - 1) / 2;
  c.cn = (o->lambda != 0.0 && npairs > 0) ? o->lambda / ((double)n * npairs) : 0.0;
  double *gw = NULL;
  if (s->scope == QA_GLOBAL) {
    gw = tl_malloc((size_t)L * sizeof(double));
    if (!gw) return ts_errf(err, TS_ENOMEM, "aggregator loss: out of memory");
    global_weights_f64(s, theta, gw);
    c.gw = gw;
  }
  c.pin = tl_calloc((size_t)nb * 2, sizeof(double));
  c.acc = grad ? tl_calloc((size_t)(nb * P), sizeof(double)) : NULL;
  if (!c.pin || (grad && !c.acc)) {
    rc = ts_errf(err, TS_ENOMEM, "aggregator loss: out of memory for %lld gradient blocks of %lld",
                 (long long)nb, (long long)P);
    goto out;
  }
  c.pen = c.pin + nb;
  pool_parallel_for(pool, nb, 1, lg_block, &c);
  if (c.failed) {
    rc = ts_errf(err, TS_ENOMEM, "aggregator loss: out of memory for row workspaces");
    goto out;
  }
  double ps = 0.0, es = 0.0;
  for (int64_t b = 0; b < nb; b++) ps += c.pin[b], es += c.pen[b];
  if (pinball) *pinball = ps * c.cp;
  if (loss) *loss = ps * c.cp + (c.cn != 0.0 ? es * c.cn : 0.0);
  if (grad) {
    for (int64_t b = 1; b < nb; b++) {
      const double *a = c.acc + b * P;
      for (int64_t i = 0; i < P; i++) c.acc[i] += a[i];
    }
    if (s->scope == QA_GLOBAL && s->simplex) softmax_backward(s, gw, c.acc, grad);
    else memcpy(grad, c.acc, (size_t)P * sizeof(double));
  }
out:
  tl_free(gw);
  tl_free(c.pin);
  tl_free(c.acc);
  return rc;
}

int qa_predict_f64(const qa_spec *s, const double *theta, int64_t n, const float *Z,
                   const float *X, double *Q, ts_err *err) {
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (s->scope == QA_LOCAL && !X) return ts_errf(err, TS_EINVAL, "local aggregator: features X missing");
  int64_t L = qa_logit_count(s);
  net_ws ws;
  if (net_ws_alloc(&ws, s, 0)) return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
  double *gw = NULL;
  const double *W[QA_MAX_DEPTH + 1], *Bv[QA_MAX_DEPTH + 1];
  if (s->scope == QA_GLOBAL) {
    gw = tl_malloc((size_t)L * sizeof(double));
    if (!gw) {
      tl_free(ws.mem);
      return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
    }
    global_weights_f64(s, theta, gw);
  } else {
    for (int i = 0; i <= s->depth; i++) W[i] = lw(s, theta, i, 0), Bv[i] = lw(s, theta, i, 1);
  }
  for (int64_t r = 0; r < n; r++) {
    const double *w = gw;
    if (s->scope == QA_LOCAL) {
      net_forward_row(s, W, Bv, X + r * (int64_t)s->D, 0.0, 0, r, &ws);
      w = ws.w;
    }
    agg_row_f64(s, w, Z + r * (int64_t)s->M * s->K, Q + r * s->K);
  }
  tl_free(gw);
  tl_free(ws.mem);
  return 0;
}

int qa_global_weights(const qa_spec *s, const qa_params *p, double *W, ts_err *err) {
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (s->scope != QA_GLOBAL)
    return ts_errf(err, TS_EINVAL, "aggregator: a local aggregator's weights depend on the features");
  int64_t L = qa_logit_count(s);
  if (p->n != L) return ts_errf(err, TS_EINVAL, "aggregator: parameters do not match the spec");
  for (int64_t i = 0; i < L; i++) W[i] = p->data[i];
  if (s->simplex) {
    double *t = tl_malloc((size_t)L * sizeof(double));
    if (!t) return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
    memcpy(t, W, (size_t)L * sizeof(double));
    softmax_f64(s, t, W);
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

int qa_forward(pool_t *pool, const qa_spec *s, const qa_params *p, int64_t B, const float *Z,
               const float *X, float *Q, ts_err *err) {
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (B < 0) return ts_errf(err, TS_EINVAL, "aggregator: negative batch %lld", (long long)B);
  if (B == 0) return 0;
  if (!Z || !Q) return ts_errf(err, TS_EINVAL, "aggregator: base predictions or output missing");
  if (s->scope == QA_LOCAL && !X) return ts_errf(err, TS_EINVAL, "local aggregator: features X missing");
  int64_t L = qa_logit_count(s), MK = (int64_t)s->M * s->K;
  fw_ctx c = {.s = s, .p = p, .B = B, .Z = Z, .X = X, .Q = Q};
  if (s->scope == QA_GLOBAL) {
    if (p->n != L || p->ntensors != 1)
      return ts_errf(err, TS_EINVAL, "aggregator: parameters (%lld values) do not match the spec (%lld)",
                     (long long)p->n, (long long)L);
    float *wf = tl_malloc((size_t)L * sizeof(float));
    if (!wf) return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
    memcpy(wf, p->data, (size_t)L * sizeof(float));
    if (s->simplex) softmax_f32(s, wf);
    if (s->gran == QA_FINE) {
      /* one [B, M*K] x [M*K, K] product */
      sg_gemm(pool, 0, B, s->K, MK, Z, MK, wf, s->K, 0.0f, Q, s->K);
    } else {
      c.Wg = wf;
      pool_parallel_for(pool, B, 256, fw_global_rows, &c);
    }
    tl_free(wf);
    return 0;
  }
  if (p->ntensors != 2 * (s->depth + 1))
    return ts_errf(err, TS_EINVAL, "local aggregator: %d parameter tensors, spec needs %d", p->ntensors,
                   2 * (s->depth + 1));
  for (int i = 0; i <= s->depth; i++) {
    int64_t in, out;
    layer_dims(s, i, &in, &out);
    const qa_tensor *w = &p->t[2 * i];
    if (w->shape[0] != out || w->shape[1] != in)
      return ts_errf(err, TS_EINVAL, "local aggregator: '%s' is [%lld, %lld], spec needs [%lld, %lld]",
                     w->name, (long long)w->shape[0], (long long)w->shape[1], (long long)out,
                     (long long)in);
  }
  /* Rows per chunk: the head output of a chunk stays near 4 MiB. */
  int64_t C = ((int64_t)1 << 20) / (L > s->hidden ? L : s->hidden);
  if (C > 128) C = 128;
  if (C < 1) C = 1;
  c.chunk = C;
  pool_parallel_for(pool, (B + C - 1) / C, 1, fw_local_chunks, &c);
  if (c.failed) return ts_errf(err, TS_ENOMEM, "local aggregator: out of memory for a chunk of %lld rows",
                               (long long)C);
  return 0;
}
