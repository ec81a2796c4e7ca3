/* qagg_f32.c - the gradient the fit runs: the loss and gradient of
 * qa_loss_grad (qagg_f64.c) computed in float32 over a whole minibatch at
 * once, so that every product is one SIMD sgemm instead of a row at a time:
 *   global fine   Q = Zb W ([n, M*K] x [M*K, K]) and dW = Zb^T G
 *   local         each Linear as [n, in] x [out, in]^T, its weight gradient
 *                 as up^T inp and the gradient of its input as up W
 * The per-row parts (softmax over the groups, the aggregation of coarse and
 * medium, pinball and penalty) stay row loops in float with double sums;
 * loss sums and the bias gradients accumulate in double.
 *
 * Determinism: each product is cut into chunks that depend only on its
 * shape (never on the pool), and each chunk is one serial sgemm, so the
 * result is bit-identical whatever the number of threads.
 *
 * The dropout mask of a row is drawn exactly as qagg_f64.c draws it (one
 * generator per row seeded from (seed, row id), advanced layer by layer),
 * so the two paths see the same mask and the tests can compare them. */
#include <math.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/rng.h"
#include "../kernels/sgemm.h"
#include "../kernels/vmath.h"
#include "qagg.h"
#include "qagg_int.h"

struct qa_grad32 {
  qa_spec s;
  int64_t cap, P, L, MK, wide;
  int64_t off_w[QA_MAX_DEPTH + 1], off_b[QA_MAX_DEPTH + 1];
  float *th, *gw;                 /* [P] theta and gradient in float */
  float *Wg;                      /* global: effective weights [L] */
  float *zb, *zt;                 /* global fine: [n, MK] rows and [MK, n] transposed */
  float *q, *g;                   /* [cap, K] */
  double *qd, *gd;                /* [K] one row for qa__row_loss */
  double *dsum;                   /* [K] softmax group sums */
  float *gmx;                     /* [K] softmax group maxima */
  float *inp[QA_MAX_DEPTH + 1];   /* local: [cap, in_i] input of Linear i */
  float *pre[QA_MAX_DEPTH];       /* [cap, H] before ELU */
  float *scale[QA_MAX_DEPTH + 1]; /* [cap, H] dropout factors or NULL */
  float *S, *DS;                  /* [cap, L] weights and d loss / d logits */
  float *T;                       /* [max(L, H), cap] a transposed operand */
  float *da, *db;                 /* [cap, wide] */
  void *mem;
};

/* ---- products in shape-fixed chunks ---------------------------------------- */

typedef struct chunk_job {
  int trans_b, by_cols;
  int64_t M, N, K, lda, ldb, ldc, unit;
  const float *A, *B;
  float *C;
} chunk_job;

static void chunk_run(void *arg, int64_t b, int64_t e) {
  const chunk_job *j = arg;
  for (int64_t c = b; c < e; c++) {
    int64_t x0 = c * j->unit, x1 = x0 + j->unit;
    if (j->by_cols) {
      if (x1 > j->N) x1 = j->N;
      const float *B = j->trans_b ? j->B + x0 * j->ldb : j->B + x0;
      sg_gemm(NULL, j->trans_b, j->M, x1 - x0, j->K, j->A, j->lda, B, j->ldb, 0.0f, j->C + x0,
              j->ldc);
    } else {
      if (x1 > j->M) x1 = j->M;
      sg_gemm(NULL, j->trans_b, x1 - x0, j->N, j->K, j->A + x0 * j->lda, j->lda, j->B, j->ldb, 0.0f,
              j->C + x0 * j->ldc, j->ldc);
    }
  }
}

/* C = A op(B) (beta 0), in chunks of 64 rows or 128 columns. */
static void gemm(pool_t *pool, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                 int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc) {
  chunk_job j = {trans_b, N >= M, M, N, K, lda, ldb, ldc, 0, A, B, C};
  j.unit = j.by_cols ? 128 : 64;
  int64_t n = ((j.by_cols ? N : M) + j.unit - 1) / j.unit;
  if (n <= 1 || (double)M * N * K < 1e5)
    chunk_run(&j, 0, n);
  else
    pool_parallel_for(pool, n, 1, chunk_run, &j);
}

/* T[c, r] = A[r, c] for A [rows, cols]. */
static void transpose(int64_t rows, int64_t cols, const float *A, float *T) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16)
      for (int64_t r = r0; r < r0 + 16 && r < rows; r++)
        for (int64_t c = c0; c < c0 + 16 && c < cols; c++) T[c * rows + r] = A[r * cols + c];
}

/* ---- softmax over the groups (float, double sums) ------------------------
 * The groups are the columns of a [len, G] block (stride G) for medium and
 * fine, one run of M for coarse; both are walked row by row so that every
 * pass is contiguous, and the exponentials go through vm_exp. mx[G] and
 * sum[G] are scratch. */

static void softmax_rows(const qa_spec *s, float *v, float *mx, double *sum) {
  int64_t G, len, st;
  qa__group_shape(s, &G, &len, &st);
  for (int64_t g = 0; g < G; g++) mx[g] = v[g], sum[g] = 0.0;
  for (int64_t i = 1; i < len; i++)
    for (int64_t g = 0; g < G; g++) mx[g] = v[i * st + g] > mx[g] ? v[i * st + g] : mx[g];
  for (int64_t i = 0; i < len; i++)
    for (int64_t g = 0; g < G; g++) v[i * st + g] -= mx[g];
  vm_exp(v, len * G);
  for (int64_t i = 0; i < len; i++)
    for (int64_t g = 0; g < G; g++) sum[g] += v[i * st + g];
  for (int64_t g = 0; g < G; g++) mx[g] = (float)(1.0 / sum[g]);
  for (int64_t i = 0; i < len; i++)
    for (int64_t g = 0; g < G; g++) v[i * st + g] *= mx[g];
}

/* ds = w (dw - <w, dw>) within each group; ds may be dw. dot[G] is scratch. */
static void softmax_back(const qa_spec *s, const float *w, const float *dw, float *ds,
                         double *dot) {
  int64_t G, len, st;
  qa__group_shape(s, &G, &len, &st);
  for (int64_t g = 0; g < G; g++) dot[g] = 0.0;
  for (int64_t i = 0; i < len; i++)
    for (int64_t g = 0; g < G; g++) dot[g] += (double)w[i * st + g] * dw[i * st + g];
  for (int64_t i = 0; i < len; i++)
    for (int64_t g = 0; g < G; g++) {
      int64_t e = i * st + g;
      ds[e] = w[e] * (dw[e] - (float)dot[g]);
    }
}

/* ---- one row's aggregation and its weight gradient ------------------------ */

static void agg_row(const qa_spec *s, const float *w, const float *z, float *q) {
  int64_t M = s->M, K = s->K;
  for (int64_t k = 0; k < K; k++) q[k] = 0.0f;
  if (s->gran == QA_COARSE) {
    for (int64_t j = 0; j < M; j++)
      for (int64_t k = 0; k < K; k++) q[k] += w[j] * z[j * K + k];
  } else if (s->gran == QA_MEDIUM) {
    for (int64_t j = 0; j < M; j++)
      for (int64_t k = 0; k < K; k++) q[k] += w[j * K + k] * z[j * K + k];
  } else {
    for (int64_t r = 0; r < M * K; r++) {
      float zr = z[r];
      const float *wr = w + r * K;
      for (int64_t k = 0; k < K; k++) q[k] += zr * wr[k];
    }
  }
}

/* dw = d(row loss) / d w (written, not added) from g = d loss / d q. */
static void agg_row_dw(const qa_spec *s, const float *z, const float *g, float *dw) {
  int64_t M = s->M, K = s->K;
  if (s->gran == QA_COARSE) {
    for (int64_t j = 0; j < M; j++) {
      double a = 0.0;
      for (int64_t k = 0; k < K; k++) a += (double)g[k] * z[j * K + k];
      dw[j] = (float)a;
    }
  } else if (s->gran == QA_MEDIUM) {
    for (int64_t j = 0; j < M; j++)
      for (int64_t k = 0; k < K; k++) dw[j * K + k] = g[k] * z[j * K + k];
  } else {
    for (int64_t r = 0; r < M * K; r++)
      for (int64_t k = 0; k < K; k++) dw[r * K + k] = z[r] * g[k];
  }
}

/* ---- life cycle ----------------------------------------------------------- */

void qa_grad32_free(qa_grad32 *g) {
  if (!g) return;
  tl_free(g->mem);
  tl_free(g);
}

int qa_grad32_new(qa_grad32 **out, const qa_spec *s, int64_t max_rows, ts_err *err) {
  *out = NULL;
  int rc = qa_spec_check(s, err);
  if (rc) return rc;
  if (max_rows < 1 || max_rows > ((int64_t)1 << 24))
    return ts_errf(err, TS_EINVAL, "aggregator: a float32 batch of %lld rows is out of range",
                   (long long)max_rows);
  qa_grad32 *g = tl_calloc(1, sizeof *g);
  if (!g) return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
  g->s = *s;
  int64_t n = max_rows, K = s->K, H = s->hidden, D = s->D;
  g->cap = n;
  g->L = qa_logit_count(s);
  g->MK = (int64_t)s->M * K;
  int local = s->scope == QA_LOCAL;
  g->P = g->L;
  if (local) {
    g->P = 0;
    for (int i = 0; i <= s->depth; i++) {
      int64_t in, o;
      qa__layer_dims(s, i, &in, &o);
      g->off_w[i] = g->P;
      g->off_b[i] = g->P + o * in;
      g->P += o * in + o;
    }
  }
  g->wide = local ? (H > D ? H : D) : 0;
  int64_t tw = local ? (g->L > H ? g->L : H) : 0;
  /* floats, then the two double rows */
  int64_t nf = 2 * g->P + 2 * n * K;
  if (!local)
    nf += g->L + (s->gran == QA_FINE ? 2 * n * g->MK : 0);
  else
    nf += n * D + 3 * s->depth * n * H + 2 * n * g->L + tw * n + 2 * n * g->wide;
  if ((double)nf * 4 > (double)((int64_t)1 << 40)) {
    tl_free(g);
    return ts_errf(err, TS_EINVAL, "aggregator: a float32 batch of %lld rows is too large",
                   (long long)n);
  }
  nf += K;
  g->mem = tl_malloc((size_t)nf * sizeof(float) + 3 * (size_t)K * sizeof(double));
  if (!g->mem) {
    tl_free(g);
    return ts_errf(err, TS_ENOMEM, "aggregator: out of memory for a float32 batch of %lld rows",
                   (long long)n);
  }
  double *dm = g->mem;
  g->qd = dm, g->gd = dm + K, g->dsum = dm + 2 * K;
  float *m = (float *)(dm + 3 * K);
  g->gmx = m, m += K;
  g->th = m, m += g->P;
  g->gw = m, m += g->P;
  g->q = m, m += n * K;
  g->g = m, m += n * K;
  if (!local) {
    g->Wg = m, m += g->L;
    if (s->gran == QA_FINE) g->zb = m, m += n * g->MK, g->zt = m;
  } else {
    g->inp[0] = m, m += n * D;
    for (int i = 0; i < s->depth; i++) {
      g->pre[i] = m, m += n * H;
      g->inp[i + 1] = m, m += n * H;
      g->scale[i + 1] = m, m += n * H; /* used only with dropout, between hidden layers */
    }
    g->S = m, m += n * g->L;
    g->DS = m, m += n * g->L;
    g->T = m, m += tw * n;
    g->da = m, m += n * g->wide;
    g->db = m;
  }
  *out = g;
  return 0;
}

/* ---- the local network ------------------------------------------------------ */

static void net_forward(qa_grad32 *g, pool_t *pool, int64_t n, const int64_t *ids, const float *X,
                        double dropout, uint64_t seed) {
  const qa_spec *s = &g->s;
  int64_t H = s->hidden, D = s->D;
  for (int64_t t = 0; t < n; t++) memcpy(g->inp[0] + t * D, X + ids[t] * D, sizeof(float) * D);
  float keep = (float)(1.0 / (1.0 - dropout));
  for (int i = 0; i <= s->depth; i++) {
    int64_t in, out;
    qa__layer_dims(s, i, &in, &out);
    float *dst = i == s->depth ? g->S : g->pre[i];
    gemm(pool, 1, n, out, in, g->inp[i], in, g->th + g->off_w[i], in, dst, out);
    sg_add_bias(n, out, dst, out, g->th + g->off_b[i]);
    if (i == s->depth) break;
    float *nx = g->inp[i + 1], *sc = dropout > 0.0 && i + 1 < s->depth ? g->scale[i + 1] : NULL;
    for (int64_t e = 0; e < n * H; e++) nx[e] = dst[e] > 0 ? dst[e] : expm1f(dst[e]);
    if (!sc) continue;
    for (int64_t t = 0; t < n; t++) {
      /* the generator state of row t after the layers before this one */
      uint64_t st = seed ^ ((uint64_t)ids[t] * 0xD1B54A32D192ED03ull);
      for (int l = 1; l <= i; l++)
        for (int64_t r = 0; r < H; r++) (void)rng_unif01(&st);
      for (int64_t r = 0; r < H; r++) {
        int64_t e = t * H + r;
        sc[e] = rng_unif01(&st) < dropout ? 0.0f : keep;
        nx[e] *= sc[e];
      }
    }
  }
}

static void net_backward(qa_grad32 *g, pool_t *pool, int64_t n, int dropout) {
  const qa_spec *s = &g->s;
  int64_t H = s->hidden;
  float *up = g->DS;
  for (int i = s->depth; i >= 0; i--) {
    int64_t in, out;
    qa__layer_dims(s, i, &in, &out);
    transpose(n, out, up, g->T); /* [out, n] */
    gemm(pool, 0, out, in, n, g->T, n, g->inp[i], in, g->gw + g->off_w[i], in);
    float *gb = g->gw + g->off_b[i];
    for (int64_t r = 0; r < out; r++) {
      double a = 0.0;
      for (int64_t t = 0; t < n; t++) a += up[t * out + r];
      gb[r] = (float)a;
    }
    if (i == 0) break;
    float *da = up == g->da ? g->db : g->da;
    gemm(pool, 0, n, in, out, up, out, g->th + g->off_w[i], in, da, in);
    const float *sc = dropout && i < s->depth ? g->scale[i] : NULL, *pre = g->pre[i - 1];
    for (int64_t e = 0; e < n * H; e++) {
      float v = sc ? da[e] * sc[e] : da[e];
      da[e] = pre[e] > 0 ? v : v * expf(pre[e]);
    }
    up = da;
  }
}

/* ---- the batch ------------------------------------------------------------- */

int qa_grad32_run(qa_grad32 *g, pool_t *pool, const double *theta, int64_t n, const int64_t *rows,
                  const float *Z, const float *X, const float *y, const qa_loss_opts *o,
                  double *loss, double *pinball, double *grad, ts_err *err) {
  const qa_spec *s = &g->s;
  if (n < 1 || n > g->cap)
    return ts_errf(err, TS_EINVAL, "aggregator: batch of %lld rows, room for 1..%lld", (long long)n,
                   (long long)g->cap);
  if (!Z || !y || (s->scope == QA_LOCAL && !X))
    return ts_errf(err, TS_EINVAL, "aggregator loss: missing %s", !Z ? "Z" : !y ? "y" : "X");
  qa_loss_opts zero = {0};
  if (!o) o = &zero;
  int local = s->scope == QA_LOCAL, drop = local && o->dropout > 0.0;
  if (local && !(o->dropout >= 0.0 && o->dropout < 1.0))
    return ts_errf(err, TS_EINVAL, "aggregator loss: dropout must be in [0, 1), got %g",
                   o->dropout);
  int64_t K = s->K, MK = g->MK, L = g->L, ids_buf[256];
  for (int64_t i = 0; i < g->P; i++) g->th[i] = (float)theta[i];

  /* forward into g->q */
  const float *Wrow = NULL;
  if (!local) {
    memcpy(g->Wg, g->th, sizeof(float) * L);
    if (s->simplex) softmax_rows(s, g->Wg, g->gmx, g->dsum);
    Wrow = g->Wg;
  }
  int64_t *ids = n <= 256 ? ids_buf : NULL;
  int64_t *ids_heap = NULL;
  if (!ids) {
    ids = ids_heap = tl_malloc(sizeof(int64_t) * n);
    if (!ids) return ts_errf(err, TS_ENOMEM, "aggregator: out of memory");
  }
  for (int64_t t = 0; t < n; t++) ids[t] = rows ? rows[t] : t;
  if (!local && s->gran == QA_FINE) {
    for (int64_t t = 0; t < n; t++) memcpy(g->zb + t * MK, Z + ids[t] * MK, sizeof(float) * MK);
    gemm(pool, 0, n, K, MK, g->zb, MK, Wrow, K, g->q, K);
  } else if (!local) {
    for (int64_t t = 0; t < n; t++) agg_row(s, Wrow, Z + ids[t] * MK, g->q + t * K);
  } else {
    net_forward(g, pool, n, ids, X, drop ? o->dropout : 0.0, o->dropout_seed);
    for (int64_t t = 0; t < n; t++) {
      float *w = g->S + t * L;
      if (s->simplex) softmax_rows(s, w, g->gmx, g->dsum);
      agg_row(s, w, Z + ids[t] * MK, g->q + t * K);
    }
  }

  /* loss and d loss / d q */
  double cp = 1.0 / ((double)n * K), cn = 0.0, ps = 0.0, es = 0.0;
  int64_t npairs = (int64_t)K * (K - 1) / 2;
  if (o->lambda != 0.0 && npairs > 0) cn = o->lambda / ((double)n * npairs);
  for (int64_t t = 0; t < n; t++) {
    double rp, re;
    for (int64_t k = 0; k < K; k++) g->qd[k] = g->q[t * K + k];
    qa__row_loss((int)K, s->levels, y[ids[t]], g->qd, cp, cn, o->margin, &rp, &re, g->gd);
    for (int64_t k = 0; k < K; k++) g->g[t * K + k] = (float)g->gd[k];
    ps += rp;
    es += re;
  }
  if (pinball) *pinball = ps * cp;
  if (loss) *loss = ps * cp + (cn != 0.0 ? es * cn : 0.0);

  if (grad) {
    if (!local && s->gran == QA_FINE) {
      transpose(n, MK, g->zb, g->zt);
      gemm(pool, 0, MK, K, n, g->zt, n, g->g, K, g->gw, K);
    } else if (!local) {
      memset(g->gw, 0, sizeof(float) * L);
      for (int64_t t = 0; t < n; t++) {
        const float *z = Z + ids[t] * MK, *gr = g->g + t * K;
        if (s->gran == QA_COARSE) {
          for (int64_t j = 0; j < s->M; j++) {
            double a = 0.0;
            for (int64_t k = 0; k < K; k++) a += (double)gr[k] * z[j * K + k];
            g->gw[j] += (float)a;
          }
        } else {
          for (int64_t j = 0; j < s->M; j++)
            for (int64_t k = 0; k < K; k++) g->gw[j * K + k] += gr[k] * z[j * K + k];
        }
      }
    } else {
      for (int64_t t = 0; t < n; t++) {
        float *ds = g->DS + t * L;
        agg_row_dw(s, Z + ids[t] * MK, g->g + t * K, ds);
        if (s->simplex) softmax_back(s, g->S + t * L, ds, ds, g->dsum);
      }
      net_backward(g, pool, n, drop);
    }
    if (!local && s->simplex) {
      /* through the global softmax: grad = w (dw - <w, dw>), dots in double */
      int64_t G, len, st;
      qa__group_shape(s, &G, &len, &st);
      double *dot = g->dsum;
      for (int64_t gi = 0; gi < G; gi++) dot[gi] = 0.0;
      for (int64_t i = 0; i < len; i++)
        for (int64_t gi = 0; gi < G; gi++)
          dot[gi] += (double)g->Wg[i * st + gi] * g->gw[i * st + gi];
      for (int64_t i = 0; i < len; i++)
        for (int64_t gi = 0; gi < G; gi++) {
          int64_t e = i * st + gi;
          grad[e] = (double)g->Wg[e] * ((double)g->gw[e] - dot[gi]);
        }
    } else {
      for (int64_t i = 0; i < g->P; i++) grad[i] = g->gw[i];
    }
  }
  tl_free(ids_heap);
  return 0;
}
