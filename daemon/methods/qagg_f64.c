/* qagg_f64.c - the quantile aggregators' training math in double: the
 * loss and gradient (qa_loss_grad) that the gradient checks test against
 * finite differences, and the double forward (qa_predict_f64). The fit runs
 * the float32 batch of qagg_f32.c, which the tests check against this one.
 *
 * Invariant: qa_loss_grad splits rows into a number of blocks that depends
 * only on n and the parameter count, and sums the blocks in order, so its
 * result does not depend on the pool or on scheduling. */
#include <math.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/rng.h"
#include "qagg.h"
#include "qagg_int.h"

void qa__softmax_f64(const qa_spec *s, const double *logit, double *w) {
  int64_t G, len, st;
  qa__group_shape(s, &G, &len, &st);
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

/* ds = d loss / d logits from dw = d loss / d weights, through the softmax:
 * ds_i = w_i (dw_i - sum_i' w_i' dw_i') within each group. */
static void softmax_backward(const qa_spec *s, const double *w, const double *dw, double *ds) {
  int64_t G, len, st;
  qa__group_shape(s, &G, &len, &st);
  for (int64_t g = 0; g < G; g++) {
    double dot = 0.0;
    for (int64_t i = 0; i < len; i++) dot += w[g + i * st] * dw[g + i * st];
    for (int64_t i = 0; i < len; i++) ds[g + i * st] = w[g + i * st] * (dw[g + i * st] - dot);
  }
}

/* y[0..n) += a * x[0..n). Four loads of each array before the four stores
 * let GCC's -O2 basic-block vectoriser pack them (the -O2 loop vectoriser
 * declines loops whose trip count is not a multiple of the vector width). */
static inline void axpy(int64_t n, double a, const double *restrict x, double *restrict y) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    double x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
    double y0 = y[i], y1 = y[i + 1], y2 = y[i + 2], y3 = y[i + 3];
    y[i] = y0 + a * x0;
    y[i + 1] = y1 + a * x1;
    y[i + 2] = y2 + a * x2;
    y[i + 3] = y3 + a * x3;
  }
  for (; i < n; i++) y[i] += a * x[i];
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
    for (int64_t r = 0; r < (int64_t)M * K; r++) axpy(K, z[r], w + r * K, q);
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
    for (int j = 0; j < M; j++)
      for (int k = 0; k < K; k++) dw[j * K + k] += g[k] * z[j * K + k];
  } else {
    for (int64_t r = 0; r < (int64_t)M * K; r++) axpy(K, z[r], g, dw + r * K);
  }
}

/* Loss of one row and g = d(row's share of the loss)/dq, where the pinball
 * part is scaled by cp = 1/(n K) and the penalty by cn = lambda/(n pairs). */
void qa__row_loss(int K, const double *tau, double y, const double *q, double cp, double cn,
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

/* ------------------------------------------------------ row tiles (double)
 *
 * Training works on tiles of up to QA_TILE rows so that each weight row is
 * read once per tile rather than once per row: the local network's Linear
 * layers and the global fine product stream their weights through the cache
 * QA_TILE times less often. Products are written in axpy form (vectorisable
 * without reassociation) except the forward dot products, which use four
 * partial sums. */

#define QA_TILE 32

typedef struct tile_ws {
  int64_t R;                       /* rows per tile */
  double *inp[QA_MAX_DEPTH + 1];   /* [R, in_i], input of Linear i; inp[0] = x */
  double *pre[QA_MAX_DEPTH];       /* [R, H] before ELU */
  double *scale[QA_MAX_DEPTH + 1]; /* [R, H] dropout factor on inp[i]; NULL = none */
  double *S, *W, *DS;              /* [R, L] logits, weights, d loss / d logits */
  double *da, *db;                 /* [R, max(H, D)] */
  double *q, *g;                   /* [R, K] */
  double *mem;
} tile_ws;

static int64_t tile_rows(const qa_spec *s) {
  if (s->scope == QA_GLOBAL) return QA_TILE;
  int64_t R = ((int64_t)1 << 17) / qa_logit_count(s);
  return R < 1 ? 1 : R > QA_TILE ? QA_TILE : R;
}

static int tile_ws_alloc(tile_ws *ws, const qa_spec *s, int dropout) {
  memset(ws, 0, sizeof *ws);
  int64_t R = tile_rows(s), K = s->K, need = 2 * R * K;
  int local = s->scope == QA_LOCAL;
  int64_t H = s->hidden, D = s->D, L = qa_logit_count(s), wide = H > D ? H : D;
  if (local)
    need += R * (D + 2 * s->depth * H + (dropout ? (s->depth - 1) * H : 0) + 3 * L + 2 * wide);
  ws->mem = tl_malloc((size_t)need * sizeof(double));
  if (!ws->mem) return -1;
  ws->R = R;
  double *m = ws->mem;
  ws->q = m, m += R * K;
  ws->g = m, m += R * K;
  if (!local) return 0;
  ws->inp[0] = m, m += R * D;
  for (int i = 0; i < s->depth; i++) {
    ws->pre[i] = m, m += R * H;
    ws->inp[i + 1] = m, m += R * H;
    if (dropout && i + 1 < s->depth) ws->scale[i + 1] = m, m += R * H;
  }
  ws->S = m, m += R * L;
  ws->W = m, m += R * L;
  ws->DS = m, m += R * L;
  ws->da = m, m += R * wide;
  ws->db = m;
  return 0;
}

static double elu(double x) {
  return x > 0 ? x : expm1(x);
}

/* O[R, out] = A[R, in] W[out, in]^T + b */
static void d_linear(int64_t R, int64_t out, int64_t in, const double *A, const double *W,
                     const double *b, double *O) {
  for (int64_t r = 0; r < out; r++) {
    const double *wr = W + r * in;
    for (int64_t t = 0; t < R; t++) {
      const double *a = A + t * in;
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t c = 0;
      for (; c + 4 <= in; c += 4) {
        s0 += wr[c] * a[c];
        s1 += wr[c + 1] * a[c + 1];
        s2 += wr[c + 2] * a[c + 2];
        s3 += wr[c + 3] * a[c + 3];
      }
      for (; c < in; c++) s0 += wr[c] * a[c];
      O[t * out + r] = b[r] + ((s0 + s1) + (s2 + s3));
    }
  }
}

/* GW[out, in] += G[R, out]^T A[R, in]; GB[out] += column sums of G */
static void d_linear_grad(int64_t R, int64_t out, int64_t in, const double *G, const double *A,
                          double *GW, double *GB) {
  for (int64_t r = 0; r < out; r++) {
    double *gw = GW + r * in, gb = 0;
    for (int64_t t = 0; t < R; t++) {
      double gr = G[t * out + r];
      if (gr == 0.0) continue;
      axpy(in, gr, A + t * in, gw);
      gb += gr;
    }
    GB[r] += gb;
  }
}

/* DA[R, in] = G[R, out] W[out, in] */
static void d_linear_back(int64_t R, int64_t out, int64_t in, const double *G, const double *W,
                          double *DA) {
  for (int64_t e = 0; e < R * in; e++) DA[e] = 0.0;
  for (int64_t r = 0; r < out; r++) {
    const double *wr = W + r * in;
    for (int64_t t = 0; t < R; t++) {
      double gr = G[t * out + r];
      if (gr == 0.0) continue;
      axpy(in, gr, wr, DA + t * in);
    }
  }
}

/* Pointers to layer i's weight and bias inside theta. */
static const double *lw(const qa_spec *s, const double *theta, int i, int bias) {
  int64_t off = 0, in, out;
  for (int l = 0; l < i; l++) {
    qa__layer_dims(s, l, &in, &out);
    off += out * in + out;
  }
  qa__layer_dims(s, i, &in, &out);
  return theta + off + (bias ? out * in : 0);
}

/* The network on a tile of R rows into ws->S (logits) and ws->W (weights).
 * The dropout mask of a row depends on (seed, ids[t]) only. */
static void tile_net_forward(const qa_spec *s, const double *const *Wl, const double *const *Bl,
                             int64_t R, const float *const *x, double dropout, uint64_t seed,
                             const int64_t *ids, tile_ws *ws) {
  int64_t H = s->hidden, L = qa_logit_count(s), D = s->D;
  uint64_t st[QA_TILE];
  for (int64_t t = 0; t < R; t++) {
    for (int64_t d = 0; d < D; d++) ws->inp[0][t * D + d] = x[t][d];
    st[t] = seed ^ ((uint64_t)ids[t] * 0xD1B54A32D192ED03ull);
  }
  for (int i = 0; i <= s->depth; i++) {
    int64_t in, out;
    qa__layer_dims(s, i, &in, &out);
    d_linear(R, out, in, ws->inp[i], Wl[i], Bl[i], i == s->depth ? ws->S : ws->pre[i]);
    if (i == s->depth) break;
    double *nx = ws->inp[i + 1], *sc = ws->scale[i + 1], keep = 1.0 / (1.0 - dropout);
    for (int64_t t = 0; t < R; t++)
      for (int64_t r = 0; r < H; r++) {
        int64_t e = t * H + r;
        nx[e] = elu(ws->pre[i][e]);
        if (sc) {
          sc[e] = rng_unif01(&st[t]) < dropout ? 0.0 : keep;
          nx[e] *= sc[e];
        }
      }
  }
  for (int64_t t = 0; t < R; t++) {
    if (s->simplex)
      qa__softmax_f64(s, ws->S + t * L, ws->W + t * L);
    else
      memcpy(ws->W + t * L, ws->S + t * L, (size_t)L * sizeof(double));
  }
}

/* Backward of a tile from ws->DS (d loss / d logits) into GW, GB. */
static void tile_net_backward(const qa_spec *s, const double *const *Wl, double *const *GW,
                              double *const *GB, int64_t R, tile_ws *ws) {
  int64_t H = s->hidden;
  const double *up = ws->DS; /* d loss / d output of layer i, [R, out] */
  for (int i = s->depth; i >= 0; i--) {
    int64_t in, out;
    qa__layer_dims(s, i, &in, &out);
    d_linear_grad(R, out, in, up, ws->inp[i], GW[i], GB[i]);
    if (i == 0) break;
    /* through the dropout of inp[i] and the ELU of layer i-1, in place;
     * da and db alternate as `up` */
    double *da = up == ws->da ? ws->db : ws->da;
    d_linear_back(R, out, in, up, Wl[i], da);
    for (int64_t e = 0; e < R * H; e++) {
      double v = da[e], p = ws->pre[i - 1][e];
      if (ws->scale[i]) v *= ws->scale[i][e];
      da[e] = v * (p > 0 ? 1.0 : exp(p));
    }
    up = da;
  }
}

/* Global fine on a tile: q[t, :] = sum_r z[t][r] W[r, :]. */
static void tile_agg_fine(const qa_spec *s, int64_t R, const double *W, const float *const *z,
                          double *q) {
  int64_t K = s->K, MK = (int64_t)s->M * K;
  for (int64_t e = 0; e < R * K; e++) q[e] = 0.0;
  for (int64_t r = 0; r < MK; r++) {
    const double *wr = W + r * K;
    for (int64_t t = 0; t < R; t++) axpy(K, z[t][r], wr, q + t * K);
  }
}

/* Global fine on a tile: dW[r, :] += sum_t z[t][r] g[t, :]. */
static void tile_dw_fine(const qa_spec *s, int64_t R, const float *const *z, const double *g,
                         double *dW) {
  int64_t K = s->K, MK = (int64_t)s->M * K;
  for (int64_t r = 0; r < MK; r++) {
    double *d = dW + r * K;
    for (int64_t t = 0; t < R; t++) axpy(K, z[t][r], g + t * K, d);
  }
}

/* The layer pointers of theta (and of a gradient with the same layout). */
static void layer_ptrs(const qa_spec *s, const double *theta, double *grad, const double **W,
                       const double **Bv, double **GW, double **GB) {
  for (int i = 0; i <= s->depth; i++) {
    W[i] = lw(s, theta, i, 0);
    Bv[i] = lw(s, theta, i, 1);
    if (grad) {
      GW[i] = grad + (W[i] - theta);
      GB[i] = grad + (Bv[i] - theta);
    }
  }
}

/* Forward of a tile of rows ids[0..R) into ws->q; global weights in gw. */
static void tile_forward(const qa_spec *s, const double *gw, const double *const *Wl,
                         const double *const *Bl, int64_t R, const int64_t *ids, const float *Z,
                         const float *X, double dropout, uint64_t seed, const float **z,
                         tile_ws *ws) {
  int64_t MK = (int64_t)s->M * s->K, L = qa_logit_count(s);
  const float *x[QA_TILE];
  for (int64_t t = 0; t < R; t++) {
    z[t] = Z + ids[t] * MK;
    if (s->scope == QA_LOCAL) x[t] = X + ids[t] * (int64_t)s->D;
  }
  if (s->scope == QA_LOCAL) {
    tile_net_forward(s, Wl, Bl, R, x, dropout, seed, ids, ws);
    for (int64_t t = 0; t < R; t++) agg_row_f64(s, ws->W + t * L, z[t], ws->q + t * s->K);
  } else if (s->gran == QA_FINE) {
    tile_agg_fine(s, R, gw, z, ws->q);
  } else {
    for (int64_t t = 0; t < R; t++) agg_row_f64(s, gw, z[t], ws->q + t * s->K);
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
  double *acc; /* [nblocks, P] gradient accumulators */
  int64_t P;
  double *pin, *pen; /* [nblocks] */
  int failed;
} lg_ctx;

static void lg_block(void *arg, int64_t b0, int64_t b1) {
  lg_ctx *c = arg;
  const qa_spec *s = c->s;
  int K = s->K;
  int64_t L = qa_logit_count(s);
  int local = s->scope == QA_LOCAL, drop = local && c->o->dropout > 0.0;
  tile_ws ws;
  if (tile_ws_alloc(&ws, s, drop)) {
    __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  for (int64_t b = b0; b < b1; b++) {
    int64_t r0 = c->n * b / c->nblocks, r1 = c->n * (b + 1) / c->nblocks;
    double *acc = c->want_grad ? c->acc + b * c->P : NULL;
    double pin = 0.0, pen = 0.0, rp, re;
    const double *W[QA_MAX_DEPTH + 1], *Bv[QA_MAX_DEPTH + 1];
    double *GW[QA_MAX_DEPTH + 1], *GB[QA_MAX_DEPTH + 1];
    if (local) layer_ptrs(s, c->theta, acc, W, Bv, GW, GB);
    for (int64_t i0 = r0; i0 < r1; i0 += ws.R) {
      int64_t R = r1 - i0 < ws.R ? r1 - i0 : ws.R, ids[QA_TILE];
      const float *z[QA_TILE];
      for (int64_t t = 0; t < R; t++) ids[t] = c->rows ? c->rows[i0 + t] : i0 + t;
      tile_forward(s, c->gw, W, Bv, R, ids, c->Z, c->X, drop ? c->o->dropout : 0.0,
                   c->o->dropout_seed, z, &ws);
      for (int64_t t = 0; t < R; t++) {
        qa__row_loss(K, s->levels, c->y[ids[t]], ws.q + t * K, c->cp, c->cn, c->o->margin, &rp, &re,
                     ws.g + t * K);
        pin += rp;
        pen += re;
      }
      if (!acc) continue;
      if (!local && s->gran == QA_FINE) {
        tile_dw_fine(s, R, z, ws.g, acc);
      } else if (!local) {
        for (int64_t t = 0; t < R; t++) agg_dw_accum(s, z[t], ws.g + t * K, acc);
      } else {
        for (int64_t t = 0; t < R; t++) {
          double *ds = ws.DS + t * L;
          memset(ds, 0, (size_t)L * sizeof(double));
          agg_dw_accum(s, z[t], ws.g + t * K, ds);
          if (s->simplex) softmax_backward(s, ws.W + t * L, ds, ds); /* in place */
        }
        tile_net_backward(s, W, GW, GB, R, &ws);
      }
    }
    c->pin[b] = pin;
    c->pen[b] = pen;
  }
  tl_free(ws.mem);
}

static int global_weights_f64(const qa_spec *s, const double *theta, double *w) {
  int64_t L = qa_logit_count(s);
  if (s->simplex)
    qa__softmax_f64(s, theta, w);
  else
    memcpy(w, theta, (size_t)L * sizeof(double));
  return 0;
}

int qa_loss_grad(pool_t *pool, const qa_spec *s, const double *theta, int64_t n,
                 const int64_t *rows, const float *Z, const float *X, const float *y,
                 const qa_loss_opts *o, double *loss, double *pinball, double *grad, ts_err *err) {
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (n < 1)
    return ts_errf(err, TS_EINVAL, "aggregator loss: needs at least one row, got %lld",
                   (long long)n);
  if (!Z || !y || (s->scope == QA_LOCAL && !X))
    return ts_errf(err, TS_EINVAL, "aggregator loss: missing %s",
                   !Z   ? "Z"
                   : !y ? "y"
                        : "X (features)");
  qa_loss_opts zero = {0};
  if (!o) o = &zero;
  if (s->scope == QA_LOCAL && (o->dropout < 0.0 || o->dropout >= 1.0))
    return ts_errf(err, TS_EINVAL, "aggregator loss: dropout must be in [0, 1), got %g",
                   o->dropout);

  int64_t L = qa_logit_count(s), P = L;
  if (s->scope == QA_LOCAL) {
    P = 0;
    for (int i = 0; i <= s->depth; i++) {
      int64_t in, out;
      qa__layer_dims(s, i, &in, &out);
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
  lg_ctx c = {.s = s,
              .theta = theta,
              .rows = rows,
              .n = n,
              .nblocks = nb,
              .Z = Z,
              .X = X,
              .y = y,
              .o = o,
              .want_grad = grad != NULL,
              .P = P};
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
    if (s->scope == QA_GLOBAL && s->simplex)
      softmax_backward(s, gw, c.acc, grad);
    else
      memcpy(grad, c.acc, (size_t)P * sizeof(double));
  }
out:
  tl_free(gw);
  tl_free(c.pin);
  tl_free(c.acc);
  return rc;
}

int qa_predict_f64(const qa_spec *s, const double *theta, int64_t n, const float *Z, const float *X,
                   double *Q, ts_err *err) {
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (!Z || (s->scope == QA_LOCAL && !X))
    return ts_errf(err, TS_EINVAL, "aggregator: %s missing",
                   !Z ? "base predictions Z" : "features X");
  int64_t L = qa_logit_count(s);
  tile_ws ws;
  if (tile_ws_alloc(&ws, s, 0)) return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
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
    layer_ptrs(s, theta, NULL, W, Bv, NULL, NULL);
  }
  for (int64_t i0 = 0; i0 < n; i0 += ws.R) {
    int64_t R = n - i0 < ws.R ? n - i0 : ws.R, ids[QA_TILE];
    const float *z[QA_TILE];
    for (int64_t t = 0; t < R; t++) ids[t] = i0 + t;
    tile_forward(s, gw, W, Bv, R, ids, Z, X, 0.0, 0, z, &ws);
    memcpy(Q + i0 * s->K, ws.q, (size_t)(R * s->K) * sizeof(double));
  }
  tl_free(gw);
  tl_free(ws.mem);
  return 0;
}
