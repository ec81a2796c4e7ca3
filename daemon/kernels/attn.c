/* attn.c - attention: argument checks, the scalar reference, and the tiled
 * driver shared by every SIMD path (see attn.h for the contract).
 *
 * The tiled driver is written once; a path supplies only the tile kernels
 * (attn_kern: q.k GEMM, p.v GEMM, and the row transforms exp / softplus /
 * LSSAR weight). Per call it packs K and V once (K transposed per key tile
 * and, for LSSA/LSSAR, QK-normalised), then splits (head, query tile) items
 * over the pool, heaviest causal tiles first. Each item streams over the key
 * tiles its mask leaves visible:
 *   softmax  one pass, running row max m and sum l, O rescaled by exp(m - m')
 *   LSSA     one pass, no max needed (|s| <= ln d ln N): O += a v, Z += a
 *   LSSAR    pass 1: Z and the row's largest score; pass 2: the guarded
 *            weights y^p (y = x / x_max) and O += w v. Pass 1 keeps each
 *            key tile's softplus(scores) in a per-worker buffer (one
 *            [48][64] block per key tile, the layout pass 2's row transform
 *            and p.v kernel read), so pass 2 does no second Q.K and no
 *            second softplus; past
 *            ATTN_LSSAR_KEEP_MAX keys, or when that buffer cannot be had,
 *            pass 2 computes the scores again.
 * Invariant kept by every row transform: S columns [nv, ncols) are written 0,
 * so the p.v kernel may read up to the tile's widest row without a mask. */
#include "attn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/mem.h"
#include "attn_kern.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

attn_params attn_params_default(attn_variant v) {
  attn_params p;
  memset(&p, 0, sizeof p);
  p.variant = v;
  p.causal = 1;
  p.query_offset = 0;
  p.p = 15.0;
  p.offset_rows = 3;
  p.scale = 0.0f;
  return p;
}

const char *attn_variant_name(attn_variant v) {
  switch (v) {
    case ATTN_SOFTMAX: return "softmax";
    case ATTN_LSSA: return "lssa";
    case ATTN_LSSAR: return "lssar";
  }
  return "unknown";
}

/* ---- argument checks ---------------------------------------------------- */

int attn_check_args(const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk, int d, int dv,
                    attn_tensor q, attn_tensor k, attn_tensor v, attn_out out, ts_err *err) {
  if (!prm) return ts_errf(err, TS_EINVAL, "attention: no parameters given");
  if (prm->variant != ATTN_SOFTMAX && prm->variant != ATTN_LSSA && prm->variant != ATTN_LSSAR)
    return ts_errf(err, TS_EINVAL, "attention: unknown variant %d", (int)prm->variant);
  if (H < 1 || Hkv < 1 || H % Hkv != 0)
    return ts_errf(err, TS_EINVAL,
                   "attention: %d query heads cannot share %d key/value heads "
                   "(need both >= 1 and heads %% kv_heads == 0)",
                   H, Hkv);
  if (d < 1 || dv < 1)
    return ts_errf(err, TS_EINVAL, "attention: head dimensions must be >= 1, got d=%d dv=%d", d,
                   dv);
  if (Lq < 0 || Lk < 0)
    return ts_errf(err, TS_EINVAL, "attention: negative length (queries %lld, keys %lld)",
                   (long long)Lq, (long long)Lk);
  if (prm->query_offset < 0)
    return ts_errf(err, TS_EINVAL, "attention: query_offset must be >= 0, got %lld",
                   (long long)prm->query_offset);
  /* positions query_offset .. query_offset + Lq - 1 must all be int64 */
  if (prm->query_offset > INT64_MAX - Lq)
    return ts_errf(err, TS_EINVAL, "attention: query_offset %lld is out of range",
                   (long long)prm->query_offset);
  if (prm->causal && prm->query_offset + Lq > Lk)
    return ts_errf(err, TS_EINVAL,
                   "attention: causal queries at positions %lld..%lld need %lld keys, got %lld",
                   (long long)prm->query_offset, (long long)(prm->query_offset + Lq - 1),
                   (long long)(prm->query_offset + Lq), (long long)Lk);
  if (prm->variant == ATTN_LSSAR) {
    if (!(prm->p > 0.0) || !isfinite(prm->p))
      return ts_errf(err, TS_EINVAL, "attention: LSSAR power p must be finite and > 0, got %g",
                     prm->p);
    if (prm->offset_rows < 0)
      return ts_errf(err, TS_EINVAL, "attention: LSSAR offset_rows must be >= 0, got %d",
                     prm->offset_rows);
  }
  if (prm->variant == ATTN_SOFTMAX && !isfinite(prm->scale))
    return ts_errf(err, TS_EINVAL, "attention: softmax scale must be finite");
  if (Lq > 0 && (!q.data || !out.data))
    return ts_errf(err, TS_EINVAL, "attention: query or output pointer is NULL");
  if (Lq > 0 && Lk > 0 && (!k.data || !v.data))
    return ts_errf(err, TS_EINVAL, "attention: key or value pointer is NULL");
  return 0;
}

/* ---- shared row quantities ---------------------------------------------- */

static double attn_row_n(const attn_params *prm, int64_t Lk, int64_t t) {
  return prm->causal ? (double)(t + 1) : (double)Lk;
}

static double attn_row_o(const attn_params *prm, int64_t t) {
  return t < (int64_t)prm->offset_rows ? 0.0 : 1.0;
}

static double softplus_d(double x) {
  return fmax(x, 0.0) + log1p(exp(-fabs(x)));
}

static double norm_d(const float *x, int n) {
  double s = 0;
  for (int c = 0; c < n; c++) s += (double)x[c] * x[c];
  return sqrt(s);
}

static double dot_d(const float *a, const float *b, int n) {
  double s = 0;
  for (int c = 0; c < n; c++) s += (double)a[c] * b[c];
  return s;
}

/* LSSAR: from Z and the row's largest score, the guarded normalisation.
 * Returns 0 when the row's weights are all zero (x_max = 0, or eps * x_max^-p
 * so large that W underflows); else fills x_max and c_eps = eps x_max^-p. */
static int lssar_row_consts(double n, double o, double z, double smax, double p, double *xmax,
                            double *ceps) {
  double x = n * softplus_d(smax) / (z + ATTN_EPS) - o;
  if (!(x > 0.0)) return 0;
  double c = exp(log(ATTN_EPS) - p * log(x));
  if (!isfinite(c) || c > 1e300) return 0;
  *xmax = x;
  *ceps = c;
  return 1;
}

/* ---- the scalar reference ------------------------------------------------ */

static void ref_row(const attn_params *prm, int64_t Lk, int d, int dv, const float *qi,
                    const float *kh, int64_t ks, const float *vh, int64_t vs, int64_t t,
                    double *acc, float *o) {
  int64_t n = prm->causal ? t + 1 : Lk;
  double N = attn_row_n(prm, Lk, t);
  double norm = 0.0; /* the divisor of acc */
  for (int c = 0; c < dv; c++) acc[c] = 0.0;
  if (prm->variant == ATTN_SOFTMAX) {
    double scale = prm->scale != 0.0f ? (double)prm->scale : 1.0 / sqrt((double)d);
    double m = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
      double s = scale * dot_d(qi, kh + j * ks, d);
      if (s > m) { /* the online max: rescale what was summed so far */
        double a = exp(m - s);
        norm *= a;
        for (int c = 0; c < dv; c++) acc[c] *= a;
        m = s;
      }
      double w = exp(s - m);
      norm += w;
      for (int c = 0; c < dv; c++) acc[c] += w * vh[j * vs + c];
    }
  } else {
    double f = log((double)d) * log(N) / fmax(norm_d(qi, d), ATTN_NORM_FLOOR);
    double z = 0.0, smax = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
      const float *kj = kh + j * ks;
      double s = f * dot_d(qi, kj, d) / fmax(norm_d(kj, d), ATTN_NORM_FLOOR);
      double a = softplus_d(s);
      z += a;
      if (s > smax) smax = s;
      if (prm->variant == ATTN_LSSA)
        for (int c = 0; c < dv; c++) acc[c] += a * vh[j * vs + c];
    }
    if (prm->variant == ATTN_LSSA) {
      norm = z + ATTN_EPS;
    } else {
      double O = attn_row_o(prm, t), xmax, ceps;
      if (n == 0 || !lssar_row_consts(N, O, z, smax, prm->p, &xmax, &ceps)) {
        for (int c = 0; c < dv; c++) o[c] = 0.0f;
        return;
      }
      double sw = 0.0;
      for (int64_t j = 0; j < n; j++) {
        const float *kj = kh + j * ks;
        double s = f * dot_d(qi, kj, d) / fmax(norm_d(kj, d), ATTN_NORM_FLOOR);
        double x = fmax(N * softplus_d(s) / (z + ATTN_EPS) - O, 0.0);
        double w = pow(x / xmax, prm->p);
        sw += w;
        for (int c = 0; c < dv; c++) acc[c] += w * vh[j * vs + c];
      }
      norm = sw + ceps;
    }
  }
  for (int c = 0; c < dv; c++) o[c] = norm > 0.0 ? (float)(acc[c] / norm) : 0.0f;
}

int attn_reference(const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk, int d, int dv,
                   attn_tensor q, attn_tensor k, attn_tensor v, attn_out out, ts_err *err) {
  int rc = attn_check_args(prm, H, Hkv, Lq, Lk, d, dv, q, k, v, out, err);
  if (rc) return rc;
  if (Lq == 0) return 0;
  double *acc = tl_malloc(sizeof(double) * (size_t)dv);
  if (!acc) return ts_errf(err, TS_ENOMEM, "attention: out of memory for %d accumulators", dv);
  int g = H / Hkv;
  for (int h = 0; h < H; h++) {
    const float *kh = k.data ? k.data + (int64_t)(h / g) * k.head_stride : NULL;
    const float *vh = v.data ? v.data + (int64_t)(h / g) * v.head_stride : NULL;
    for (int64_t i = 0; i < Lq; i++)
      ref_row(prm, Lk, d, dv, q.data + h * q.head_stride + i * q.row_stride, kh, k.row_stride, vh,
              v.row_stride, prm->query_offset + i, acc,
              out.data + h * out.head_stride + i * out.row_stride);
  }
  tl_free(acc);
  return 0;
}

/* ---- scalar tile kernels (the CPU_SCALAR path of the tiled driver) ------- */

static void sc_qk(const float *q, int rows, int d, const float *kt, int ncols, float *s) {
  for (int r = 0; r < rows; r++) {
    float *sr = s + (int64_t)r * ATTN_BK;
    for (int j = 0; j < ncols; j++) sr[j] = 0.0f;
    for (int c = 0; c < d; c++) {
      float qv = q[(int64_t)r * d + c];
      const float *kc = kt + (int64_t)c * ATTN_BK;
      for (int j = 0; j < ncols; j++) sr[j] += qv * kc[j];
    }
  }
}

static void sc_pv(const float *p, int rows, int nk, const float *v, int dvp, float *o) {
  for (int r = 0; r < rows; r++) {
    float *orow = o + (int64_t)r * dvp;
    for (int j = 0; j < nk; j++) {
      float pj = p[(int64_t)r * ATTN_BK + j];
      const float *vj = v + (int64_t)j * dvp;
      for (int c = 0; c < dvp; c++) orow[c] += pj * vj[c];
    }
  }
}

static float sc_rowmax(const float *s, int nv) {
  float m = -INFINITY;
  for (int j = 0; j < nv; j++) m = s[j] > m ? s[j] : m;
  return m;
}

static float softplus_f(float x) {
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

static double sc_row_exp(float *s, int nv, int ncols, float m) {
  double sum = 0;
  for (int j = 0; j < nv; j++) sum += s[j] = expf(s[j] - m);
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

static double sc_row_softplus(float *s, int nv, int ncols) {
  double sum = 0;
  for (int j = 0; j < nv; j++) sum += s[j] = softplus_f(s[j]);
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

static double sc_row_lssar(float *s, int nv, int ncols, const attn_rowc *c) {
  double sum = 0;
  for (int j = 0; j < nv; j++) {
    float y = (softplus_f(s[j]) * c->c1 - c->o) * c->inv_xmax;
    sum += s[j] = y >= c->ythr ? powf(y, c->p) : 0.0f;
  }
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

static double sc_row_lssar_sp(float *s, int nv, int ncols, const attn_rowc *c) {
  double sum = 0;
  for (int j = 0; j < nv; j++) {
    float y = (s[j] * c->c1 - c->o) * c->inv_xmax;
    sum += s[j] = y >= c->ythr ? powf(y, c->p) : 0.0f;
  }
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

void attn__sc_qk_h(const float *q, int rows, int d, const uint16_t *kt, int ncols, float *s) {
  for (int r = 0; r < rows; r++) {
    float *sr = s + (int64_t)r * ATTN_BK;
    for (int j = 0; j < ncols; j++) sr[j] = 0.0f;
    for (int c = 0; c < d; c++) {
      float qv = q[(int64_t)r * d + c];
      const uint16_t *kc = kt + (int64_t)c * ATTN_BK;
      for (int j = 0; j < ncols; j++) sr[j] += qv * attn_h2f(kc[j]);
    }
  }
}

void attn__sc_pv_h(const float *p, int rows, int nk, const uint16_t *v, int dvp, float *o) {
  for (int r = 0; r < rows; r++) {
    float *orow = o + (int64_t)r * dvp;
    for (int j = 0; j < nk; j++) {
      float pj = p[(int64_t)r * ATTN_BK + j];
      const uint16_t *vj = v + (int64_t)j * dvp;
      for (int c = 0; c < dvp; c++) orow[c] += pj * attn_h2f(vj[c]);
    }
  }
}

int attn__has_f16c(void) {
#if defined(__x86_64__)
  /* CPUID leaf 1, ECX bit 29 (GCC and clang both have cpuid.h), asked once:
   * CPUID is slow, and in a virtual machine it traps to the hypervisor */
  static int known = -1;
  int v = __atomic_load_n(&known, __ATOMIC_RELAXED);
  if (v < 0) {
    unsigned a, b, c, d;
    v = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
    __atomic_store_n(&known, v, __ATOMIC_RELAXED);
  }
  return v;
#else
  return 0;
#endif
}

const attn_kern attn__kern_scalar = {"scalar",      sc_qk,           sc_pv,        sc_rowmax,
                                     sc_row_exp,    sc_row_softplus, sc_row_lssar, sc_row_lssar_sp,
                                     attn__sc_qk_h, attn__sc_pv_h};

/* ---- the tiled driver ---------------------------------------------------- */

typedef struct attn_job {
  const attn_params *prm;
  const attn_kern *kern;
  int H, Hkv, g, d, dv, dvp;
  int64_t Lq, Lk, ntq, ntk, Lkp;
  attn_tensor q, k, v;
  attn_out out;
  float *kp;                 /* [ntk][Hkv][d][ATTN_BK] (attn_kvc's layout) */
  float *vp;                 /* [ntk][Hkv][ATTN_BK][dvp] */
  const float *kinv;         /* [ntk][Hkv][ATTN_BK] key norms' inverses for raw keys, or NULL */
  const uint16_t *kph, *vph; /* a float16 cache's tiles instead of kp, vp (or NULL) */
  void (*qk_h)(const float *, int, int, const uint16_t *, int, float *);
  void (*pv_h)(const float *, int, int, const uint16_t *, int, float *);
  float qscale;
  double lnd;
  int fail; /* a worker could not get its scratch */
} attn_job;

static void attn_pack_range(void *arg, int64_t b, int64_t e) {
  attn_job *J = arg;
  int d = J->d, dv = J->dv, dvp = J->dvp, norm = J->prm->variant != ATTN_SOFTMAX;
  for (int64_t it = b; it < e; it++) {
    int64_t kvh = it / J->ntk, kt = it % J->ntk, k0 = kt * ATTN_BK;
    float *kd = J->kp + (kt * J->Hkv + kvh) * (int64_t)d * ATTN_BK;
    float *vt = J->vp + (kt * J->Hkv + kvh) * (int64_t)ATTN_BK * dvp;
    for (int jj = 0; jj < ATTN_BK; jj++) {
      int64_t j = k0 + jj;
      float *vd = vt + (int64_t)jj * dvp;
      if (j >= J->Lk) {
        for (int c = 0; c < d; c++) kd[(int64_t)c * ATTN_BK + jj] = 0.0f;
        memset(vd, 0, sizeof(float) * (size_t)dvp);
        continue;
      }
      const float *ks = J->k.data + kvh * J->k.head_stride + j * J->k.row_stride;
      const float *vs = J->v.data + kvh * J->v.head_stride + j * J->v.row_stride;
      float inv = norm ? (float)(1.0 / fmax(norm_d(ks, d), ATTN_NORM_FLOOR)) : 1.0f;
      for (int c = 0; c < d; c++) kd[(int64_t)c * ATTN_BK + jj] = ks[c] * inv;
      memcpy(vd, vs, sizeof(float) * (size_t)dv);
      for (int c = dv; c < dvp; c++) vd[c] = 0.0f;
    }
  }
}

/* S[r][j] *= kinv[j]: raw keys' scores become normalised keys' scores. */
static void scale_cols(float *s, int rows, int ncols, const float *kinv) {
  for (int r = 0; r < rows; r++) {
    float *sr = s + (int64_t)r * ATTN_BK;
    for (int j = 0; j < ncols; j++) sr[j] *= kinv[j];
  }
}

typedef struct attn_scratch {
  float *q, *s, *o;
  float *keep; /* LSSAR: [ntk][ATTN_BQ][ATTN_BK] scores of pass 1, or NULL */
  double m[ATTN_BQ], l[ATTN_BQ], z[ATTN_BQ], ceps[ATTN_BQ];
  float smax[ATTN_BQ];
  int nv[ATTN_BQ], dead[ATTN_BQ];
  attn_rowc rc[ATTN_BQ];
} attn_scratch;

/* One (head, query tile) item. */
static void attn_item(attn_job *J, attn_scratch *W, int h, int64_t qt) {
  const attn_params *prm = J->prm;
  const attn_kern *K = J->kern;
  int d = J->d, dvp = J->dvp, variant = prm->variant;
  int64_t q0 = qt * ATTN_BQ, t0 = prm->query_offset + q0;
  int rows = (int)(J->Lq - q0 < ATTN_BQ ? J->Lq - q0 : ATTN_BQ);
  int64_t kvh = h / J->g;

  for (int r = 0; r < rows; r++) {
    const float *src = J->q.data + h * J->q.head_stride + (q0 + r) * J->q.row_stride;
    float f = J->qscale;
    if (variant != ATTN_SOFTMAX)
      f = (float)(J->lnd * log(attn_row_n(prm, J->Lk, t0 + r)) /
                  fmax(norm_d(src, d), ATTN_NORM_FLOOR));
    for (int c = 0; c < d; c++) W->q[(int64_t)r * d + c] = src[c] * f;
    W->m[r] = -INFINITY;
    W->l[r] = 0.0;
    W->z[r] = 0.0;
    W->smax[r] = -INFINITY;
    W->dead[r] = 0;
  }
  memset(W->o, 0, sizeof(float) * (size_t)rows * dvp);

  int64_t kt_end = J->ntk;
  if (prm->causal) { /* tiles wholly past the last row's position are hidden */
    int64_t last = (t0 + rows - 1) / ATTN_BK + 1;
    if (last < kt_end) kt_end = last;
  }
  int npass = variant == ATTN_LSSAR ? 2 : 1;
  for (int pass = 0; pass < npass; pass++) {
    int values = pass == npass - 1;
    if (variant == ATTN_LSSAR && pass == 1) {
      for (int r = 0; r < rows; r++) {
        int64_t t = t0 + r;
        double N = attn_row_n(prm, J->Lk, t), O = attn_row_o(prm, t), xmax, ceps;
        if (!lssar_row_consts(N, O, W->z[r], W->smax[r], prm->p, &xmax, &ceps)) {
          W->dead[r] = 1;
          continue;
        }
        attn_rowc *c = &W->rc[r];
        c->c1 = (float)(N / (W->z[r] + ATTN_EPS));
        c->o = (float)O;
        c->inv_xmax = (float)(1.0 / xmax);
        c->ythr = (float)exp(log(1e-30) / prm->p);
        c->p = (float)prm->p;
        c->ip = (prm->p == floor(prm->p) && prm->p <= 64) ? (int)prm->p : 0;
        W->ceps[r] = ceps;
      }
    }
    for (int64_t kt = 0; kt < kt_end; kt++) {
      int64_t k0 = kt * ATTN_BK;
      int kvalid = (int)(J->Lk - k0 < ATTN_BK ? J->Lk - k0 : ATTN_BK), maxnv = 0;
      for (int r = 0; r < rows; r++) {
        int64_t nv = kvalid;
        if (prm->causal) {
          nv = t0 + r + 1 - k0;
          nv = nv < 0 ? 0 : nv > kvalid ? kvalid : nv;
        }
        if (W->dead[r]) nv = 0;
        W->nv[r] = (int)nv;
        if (nv > maxnv) maxnv = (int)nv;
      }
      if (maxnv == 0) continue;
      int ncols = (maxnv + 15) & ~15;
      /* With a keep buffer, pass 1 leaves softplus(scores) there and pass
       * 2 reads them back (dead rows only narrow the tile). */
      float *kept = W->keep ? W->keep + kt * (int64_t)ATTN_BQ * ATTN_BK : NULL;
      float *S = kept ? kept : W->s;
      int64_t tile = kt * J->Hkv + kvh;
      if (!kept || pass == 0) {
        if (J->kph)
          J->qk_h(W->q, rows, d, J->kph + tile * d * ATTN_BK, ncols, S);
        else
          K->qk(W->q, rows, d, J->kp + tile * d * ATTN_BK, ncols, S);
        if (J->kinv) scale_cols(S, rows, ncols, J->kinv + tile * ATTN_BK);
      }
      for (int r = 0; r < rows; r++) {
        float *sr = S + (int64_t)r * ATTN_BK;
        int nv = W->nv[r];
        if (variant == ATTN_SOFTMAX) {
          if (nv == 0) {
            K->row_exp(sr, 0, ncols, 0.0f);
            continue;
          }
          float mt = K->rowmax(sr, nv);
          double mnew = W->m[r] > mt ? W->m[r] : mt;
          double alpha = exp(W->m[r] - mnew);
          double sum = K->row_exp(sr, nv, ncols, (float)mnew);
          if (alpha != 1.0) {
            float *orow = W->o + (int64_t)r * dvp;
            for (int c = 0; c < dvp; c++) orow[c] *= (float)alpha;
          }
          W->l[r] = W->l[r] * alpha + sum;
          W->m[r] = mnew;
        } else if (variant == ATTN_LSSA) {
          W->l[r] += K->row_softplus(sr, nv, ncols);
        } else if (pass == 0) {
          if (nv > 0) {
            float mt = K->rowmax(sr, nv);
            if (mt > W->smax[r]) W->smax[r] = mt;
          }
          W->z[r] += K->row_softplus(sr, nv, ncols);
        } else {
          W->l[r] += (kept ? K->row_lssar_sp : K->row_lssar)(sr, nv, ncols, &W->rc[r]);
        }
      }
      if (values && J->vph)
        J->pv_h(S, rows, maxnv, J->vph + tile * ATTN_BK * dvp, dvp, W->o);
      else if (values)
        K->pv(S, rows, maxnv, J->vp + tile * ATTN_BK * dvp, dvp, W->o);
    }
  }

  for (int r = 0; r < rows; r++) {
    double norm;
    if (variant == ATTN_SOFTMAX)
      norm = W->l[r];
    else if (variant == ATTN_LSSA)
      norm = W->l[r] + ATTN_EPS;
    else
      norm = W->dead[r] ? 0.0 : W->l[r] + W->ceps[r];
    float inv = norm > 0.0 ? (float)(1.0 / norm) : 0.0f;
    float *dst = J->out.data + h * J->out.head_stride + (q0 + r) * J->out.row_stride;
    const float *orow = W->o + (int64_t)r * dvp;
    for (int c = 0; c < J->dv; c++) dst[c] = orow[c] * inv;
  }
}

static void attn_tiles_range(void *arg, int64_t b, int64_t e) {
  attn_job *J = arg;
  attn_scratch *W = tl_malloc(sizeof *W);
  float *buf = tl_malloc(sizeof(float) * (size_t)ATTN_BQ * (J->d + ATTN_BK + J->dvp));
  if (!W || !buf) {
    __atomic_store_n(&J->fail, 1, __ATOMIC_RELAXED);
    tl_free(W);
    tl_free(buf);
    return;
  }
  W->q = buf;
  W->s = W->q + (int64_t)ATTN_BQ * J->d;
  W->o = W->s + (int64_t)ATTN_BQ * ATTN_BK;
  W->keep = NULL;
  if (J->prm->variant == ATTN_LSSAR && J->Lk <= ATTN_LSSAR_KEEP_MAX)
    W->keep = tl_malloc(sizeof(float) * (size_t)(J->ntk * ATTN_BQ * ATTN_BK)); /* NULL: recompute */
  for (int64_t it = b; it < e; it++) {
    /* Last query tiles first: under a causal mask they are the heaviest,
     * and handing them out early evens the workers' loads. */
    int64_t qt = J->ntq - 1 - it / J->H;
    attn_item(J, W, (int)(it % J->H), qt);
  }
  tl_free(W->keep);
  tl_free(buf);
  tl_free(W);
}

const attn_kern *attn_kern_for(cpu_path p) {
  switch (p) {
    case CPU_SCALAR: return &attn__kern_scalar;
#if defined(__x86_64__)
    case CPU_AVX2: return &attn__kern_avx2;
#endif
#if defined(__aarch64__)
    case CPU_NEON: return &attn__kern_neon;
#endif
    default: return NULL; /* AVX-512: the AVX2 tiles are what its fallback runs */
  }
}

/* Path p's tile kernels, or its nearest fallback's; refused when this CPU
 * cannot run p at all. */
static int attn_pick(cpu_path path, const attn_kern **out, ts_err *err) {
  if (!cpu_runs(path))
    return ts_errf(err, TS_EINVAL, "attention: this CPU cannot run the %s path",
                   cpu_path_name(path));
  while (!(*out = attn_kern_for(path))) path = cpu_path_fallback(path);
  return 0;
}

int attn_forward_path(cpu_path path, pool_t *pool, const attn_params *prm, int H, int Hkv,
                      int64_t Lq, int64_t Lk, int d, int dv, attn_tensor q, attn_tensor k,
                      attn_tensor v, attn_out out, ts_err *err) {
  int rc = attn_check_args(prm, H, Hkv, Lq, Lk, d, dv, q, k, v, out, err);
  if (rc) return rc;
  attn_job J;
  memset(&J, 0, sizeof J);
  rc = attn_pick(path, &J.kern, err);
  if (rc) return rc;
  if (Lq == 0) return 0;
  J.prm = prm;
  J.H = H;
  J.Hkv = Hkv;
  J.g = H / Hkv;
  J.d = d;
  J.dv = dv;
  J.dvp = (dv + 15) & ~15;
  J.Lq = Lq;
  J.Lk = Lk;
  J.ntq = (Lq + ATTN_BQ - 1) / ATTN_BQ;
  J.ntk = (Lk + ATTN_BK - 1) / ATTN_BK;
  J.Lkp = J.ntk * ATTN_BK;
  J.q = q;
  J.k = k;
  J.v = v;
  J.out = out;
  J.qscale = prm->scale != 0.0f ? prm->scale : (float)(1.0 / sqrt((double)d));
  J.lnd = log((double)d);

  /* The packed K and V: Hkv * Lkp * (d + dvp) floats, refused past 2^60 bytes. */
  int64_t nfl = 0;
  if (J.ntk > 0) {
    int64_t per = (int64_t)d + J.dvp;
    if (J.Lkp > ((int64_t)1 << 58) / per / Hkv)
      return ts_errf(err, TS_EINVAL, "attention: %lld keys of width %d are too many", (long long)Lk,
                     d + dv);
    nfl = (int64_t)Hkv * J.Lkp * per;
    float *buf = tl_malloc(sizeof(float) * (size_t)nfl);
    if (!buf)
      return ts_errf(err, TS_ENOMEM, "attention: out of memory packing %lld keys (%lld MiB)",
                     (long long)Lk, (long long)(nfl * 4 >> 20));
    J.kp = buf;
    J.vp = buf + (int64_t)Hkv * J.Lkp * d;
    pool_parallel_for(pool, (int64_t)Hkv * J.ntk, 1, attn_pack_range, &J);
  }
  pool_parallel_for(pool, (int64_t)H * J.ntq, 1, attn_tiles_range, &J);
  tl_free(J.kp);
  if (J.fail) return ts_errf(err, TS_ENOMEM, "attention: out of memory for worker scratch");
  return 0;
}

int attn_forward(pool_t *pool, const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk,
                 int d, int dv, attn_tensor q, attn_tensor k, attn_tensor v, attn_out out,
                 ts_err *err) {
  return attn_forward_path(cpu_best_path(), pool, prm, H, Hkv, Lq, Lk, d, dv, q, k, v, out, err);
}

/* ---- the packed KV cache ------------------------------------------------- */

/* IEEE binary16 <-> float, round to nearest even; the scalar kernels' and
 * the cache writer's conversions (the AVX2 kernels use F16C, the same
 * rounding). */
uint16_t attn_f2h(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: inf */
  if (ax < 0x38800000u) {                                   /* a subnormal half, or 0 */
    if (ax < 0x33000000u) return (uint16_t)sign;
    uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    int sh = (int)(126 - e); /* 14..24 */
    uint32_t r = m >> sh, rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((ax - 0x38000000u) >> 13), rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) r++;
  return (uint16_t)(sign | r);
}

float attn_h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
  if (e == 0x1f) {
    x = sign | 0x7f800000u | (m << 13);
  } else if (e) {
    x = sign | ((e + 112) << 23) | (m << 13);
  } else if (!m) {
    x = sign;
  } else { /* subnormal: normalise */
    int sh = 0;
    while (!(m & 0x400u)) m <<= 1, sh++;
    x = sign | ((uint32_t)(113 - sh) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}

void attn_kvc_init(attn_kvc *c, int Hkv, int d, int dv) {
  memset(c, 0, sizeof *c);
  c->Hkv = Hkv;
  c->d = d;
  c->dv = dv;
  c->dvp = (dv + 15) & ~15;
}

void attn_kvc_init_f16(attn_kvc *c, int Hkv, int d, int dv) {
  attn_kvc_init(c, Hkv, d, dv);
  c->f16 = 1;
}

void attn_kvc_free(attn_kvc *c) {
  if (!c) return;
  tl_free(c->k);
  tl_free(c->kinv);
  tl_free(c->v);
  c->k = c->v = NULL;
  c->kinv = NULL;
  c->cap = 0;
}

/* Bytes per row of the three arrays: K, kinv, V. */
static void kvc_row_bytes(const attn_kvc *c, size_t f[3]) {
  size_t el = c->f16 ? 2 : 4;
  f[0] = el * (size_t)c->Hkv * (size_t)c->d;
  f[1] = sizeof(float) * (size_t)c->Hkv;
  f[2] = el * (size_t)c->Hkv * (size_t)c->dvp;
}

size_t attn_kvc_bytes(const attn_kvc *c) {
  if (!c->cap) return 0;
  size_t f[3], b = 0;
  kvc_row_bytes(c, f);
  for (int i = 0; i < 3; i++) b += tl_held(f[i] * (size_t)c->cap);
  return b;
}

size_t attn_kvc_bytes_for(int Hkv, int d, int dv, int f16, int64_t rows) {
  attn_kvc c;
  attn_kvc_init(&c, Hkv, d, dv);
  c.f16 = f16;
  c.cap = attn_kvc_cap_for(rows);
  return rows > 0 ? attn_kvc_bytes(&c) : 0;
}

int64_t attn_kvc_cap_for(int64_t rows) {
  int64_t cap = ATTN_BK;
  while (cap < rows) cap *= 2;
  return cap;
}

int attn_kvc_reserve(attn_kvc *c, int64_t rows, ts_err *err) {
  if (rows <= c->cap) return 0;
  int64_t cap = attn_kvc_cap_for(rows);
  size_t f[3];
  kvc_row_bytes(c, f);
  if (cap > ((int64_t)1 << 42) / (int64_t)(f[0] + f[1] + f[2]))
    return ts_errf(err, TS_EINVAL, "attention: a KV cache of %lld rows is too large",
                   (long long)rows);
  void **arr[3] = {&c->k, (void **)&c->kinv, &c->v};
  /* Arrays already grown when a later one fails just hold spare room: the
   * cache stays valid up to c->cap either way. New rows are zeroed so that a
   * tile's unwritten tail is never uninitialised memory. */
  for (int i = 0; i < 3; i++) {
    char *p = tl_realloc(*arr[i], f[i] * (size_t)cap);
    if (!p)
      return ts_errf(err, TS_ENOMEM, "out of memory growing the KV cache to %lld tokens",
                     (long long)cap);
    memset(p + f[i] * (size_t)c->cap, 0, f[i] * (size_t)(cap - c->cap));
    *arr[i] = p;
  }
  c->cap = cap;
  return 0;
}

void attn_kvc_write(attn_kvc *c, int64_t row0, int64_t n, attn_tensor k, attn_tensor v) {
  int d = c->d, dv = c->dv, dvp = c->dvp, Hkv = c->Hkv;
  for (int64_t r = 0; r < n; r++) {
    int64_t j = row0 + r, kt = j / ATTN_BK;
    int jj = (int)(j % ATTN_BK);
    for (int h = 0; h < Hkv; h++) {
      int64_t tile = kt * Hkv + h;
      const float *ks = k.data + h * k.head_stride + r * k.row_stride;
      const float *vs = v.data + h * v.head_stride + r * v.row_stride;
      int64_t ko = tile * d * ATTN_BK + jj, vo = (tile * ATTN_BK + jj) * dvp;
      double nn = 0.0;
      if (c->f16) { /* the norm of the key as stored, so that k / |k| is a unit vector */
        uint16_t *kd = (uint16_t *)c->k + ko, *vd = (uint16_t *)c->v + vo;
        for (int x = 0; x < d; x++) {
          uint16_t hv = attn_f2h(ks[x]);
          double f = attn_h2f(hv);
          kd[(int64_t)x * ATTN_BK] = hv;
          nn += f * f;
        }
        for (int x = 0; x < dvp; x++) vd[x] = x < dv ? attn_f2h(vs[x]) : 0;
      } else {
        float *kd = (float *)c->k + ko, *vd = (float *)c->v + vo;
        for (int x = 0; x < d; x++) kd[(int64_t)x * ATTN_BK] = ks[x];
        nn = norm_d(ks, d);
        nn *= nn;
        memcpy(vd, vs, sizeof(float) * (size_t)dv);
        for (int x = dv; x < dvp; x++) vd[x] = 0.0f;
      }
      c->kinv[tile * ATTN_BK + jj] = (float)(1.0 / fmax(sqrt(nn), ATTN_NORM_FLOOR));
    }
  }
}

int attn_kvc_copy(attn_kvc *dst, const attn_kvc *src, int64_t rows, ts_err *err) {
  if (dst->Hkv != src->Hkv || dst->d != src->d || dst->dv != src->dv || dst->f16 != src->f16 ||
      rows > src->cap)
    return ts_errf(err, TS_EINVAL, "attention: KV caches of different shapes");
  int rc = attn_kvc_reserve(dst, rows, err);
  if (rc || rows <= 0) return rc;
  size_t f[3];
  kvc_row_bytes(src, f);
  /* whole tiles: the rows past `rows` in the last one are copied too */
  size_t tiles_rows = (size_t)((rows + ATTN_BK - 1) / ATTN_BK * ATTN_BK);
  if (tiles_rows > (size_t)dst->cap) tiles_rows = (size_t)dst->cap;
  memcpy(dst->k, src->k, f[0] * tiles_rows);
  memcpy(dst->kinv, src->kinv, f[1] * tiles_rows);
  memcpy(dst->v, src->v, f[2] * tiles_rows);
  return 0;
}

void attn_kvc_read(const attn_kvc *c, int64_t row, int h, float *k, float *v) {
  int64_t tile = row / ATTN_BK * c->Hkv + h;
  int jj = (int)(row % ATTN_BK);
  int64_t vo = (tile * ATTN_BK + jj) * c->dvp;
  for (int x = 0; x < c->d; x++) {
    int64_t at = (tile * c->d + x) * ATTN_BK + jj;
    k[x] = c->f16 ? attn_h2f(((const uint16_t *)c->k)[at]) : ((const float *)c->k)[at];
  }
  for (int x = 0; x < c->dv; x++)
    v[x] = c->f16 ? attn_h2f(((const uint16_t *)c->v)[vo + x]) : ((const float *)c->v)[vo + x];
}

/* ---- attention over the cache: the decode driver -------------------------
 * For few queries (all g query heads of a kv head times Lq <= ATTN_BQ rows)
 * the work is split over (kv head, block of ATTN_KVC_BLOCK keys): each item
 * runs the rows of its kv head's whole query group over its block's tiles
 * (one K and V tile read serves every query head of the group) and leaves
 * partial results, which the caller merges:
 *   softmax  (m, l, O) per block; M = max m, l = sum l e^(m - M), O likewise
 *   LSSA     (Z, O) per block: sums
 *   LSSAR    pass 1 items leave (Z, max s) per block, merged into each row's
 *            constants; pass 2 items leave (sum w, O), summed.
 * The split depends on Lk alone, never on the pool, so a result does not
 * depend on the number of threads. */

typedef struct kvc_job {
  const attn_params *prm;
  const attn_kern *kern;
  const attn_kvc *kv;
  int H, Hkv, g, d, dv, dvp, R, pass;
  int64_t Lq, Lk, ntk, nblk, tpb;
  attn_tensor q;
  double lnd;
  float qscale;
  double *pm, *pl; /* [Hkv][nblk][R] */
  float *po;       /* [Hkv][nblk][R][dvp] */
  float *keep;     /* LSSAR: [Hkv][ntk][R][ATTN_BK] softplus(s) of pass 1, or NULL */
  attn_rowc *rc;   /* [Hkv][R] LSSAR's row constants */
  double *ceps;    /* [Hkv][R] LSSAR's eps x_max^-p */
  void (*qk_h)(const float *, int, int, const uint16_t *, int, float *);
  void (*pv_h)(const float *, int, int, const uint16_t *, int, float *);
  int *dead; /* [Hkv][R] */
  int fail;
} kvc_job;

typedef struct kvc_scratch {
  float *q, *s, *o;
  double m[ATTN_BQ], l[ATTN_BQ];
  int nv[ATTN_BQ];
} kvc_scratch;

static int64_t kvc_row_t(const kvc_job *J, int r) {
  return J->prm->query_offset + r % J->Lq;
}

static void kvc_item(kvc_job *J, kvc_scratch *W, int64_t kvh, int64_t blk) {
  const attn_params *prm = J->prm;
  const attn_kern *K = J->kern;
  int d = J->d, dvp = J->dvp, R = J->R, variant = prm->variant;
  int Hkv = J->Hkv, lssar1 = variant == ATTN_LSSAR && J->pass == 1;
  int values = variant != ATTN_LSSAR || lssar1;
  for (int r = 0; r < R; r++) {
    int h = (int)kvh * J->g + r / (int)J->Lq;
    int64_t i = r % J->Lq, t = prm->query_offset + i;
    const float *src = J->q.data + h * J->q.head_stride + i * J->q.row_stride;
    float f = J->qscale;
    if (variant != ATTN_SOFTMAX)
      f = (float)(J->lnd * log(attn_row_n(prm, J->Lk, t)) / fmax(norm_d(src, d), ATTN_NORM_FLOOR));
    for (int c = 0; c < d; c++) W->q[(int64_t)r * d + c] = src[c] * f;
    W->m[r] = -INFINITY;
    W->l[r] = 0.0;
  }
  if (values) memset(W->o, 0, sizeof(float) * (size_t)R * dvp);
  int64_t kt0 = blk * J->tpb, kt1 = kt0 + J->tpb;
  if (kt1 > J->ntk) kt1 = J->ntk;
  if (prm->causal) { /* tiles wholly past the last row's position are hidden */
    int64_t last = (prm->query_offset + J->Lq - 1) / ATTN_BK + 1;
    if (last < kt1) kt1 = last;
  }
  const int *dead = J->dead ? J->dead + kvh * R : NULL;
  const attn_rowc *rcs = J->rc ? J->rc + kvh * R : NULL;
  for (int64_t kt = kt0; kt < kt1; kt++) {
    int64_t k0 = kt * ATTN_BK, tile = kt * Hkv + kvh;
    int kvalid = (int)(J->Lk - k0 < ATTN_BK ? J->Lk - k0 : ATTN_BK), maxnv = 0;
    for (int r = 0; r < R; r++) {
      int64_t nv = kvalid;
      if (prm->causal) {
        nv = kvc_row_t(J, r) + 1 - k0;
        nv = nv < 0 ? 0 : nv > kvalid ? kvalid : nv;
      }
      if (lssar1 && dead[r]) nv = 0;
      W->nv[r] = (int)nv;
      if (nv > maxnv) maxnv = (int)nv;
    }
    if (maxnv == 0) continue;
    int ncols = (maxnv + 15) & ~15;
    float *kept = J->keep ? J->keep + (kvh * J->ntk + kt) * (int64_t)R * ATTN_BK : NULL;
    float *S = kept ? kept : W->s;
    if (!kept || !lssar1) {
      if (J->kv->f16)
        J->qk_h(W->q, R, d, (const uint16_t *)J->kv->k + tile * d * ATTN_BK, ncols, S);
      else
        K->qk(W->q, R, d, (const float *)J->kv->k + tile * d * ATTN_BK, ncols, S);
      if (variant != ATTN_SOFTMAX) scale_cols(S, R, ncols, J->kv->kinv + tile * ATTN_BK);
    }
    for (int r = 0; r < R; r++) {
      float *sr = S + (int64_t)r * ATTN_BK;
      int nv = W->nv[r];
      if (variant == ATTN_SOFTMAX) {
        if (nv == 0) {
          K->row_exp(sr, 0, ncols, 0.0f);
          continue;
        }
        float mt = K->rowmax(sr, nv);
        double mnew = W->m[r] > mt ? W->m[r] : mt;
        double alpha = exp(W->m[r] - mnew);
        double sum = K->row_exp(sr, nv, ncols, (float)mnew);
        if (alpha != 1.0) {
          float *orow = W->o + (int64_t)r * dvp;
          for (int c = 0; c < dvp; c++) orow[c] *= (float)alpha;
        }
        W->l[r] = W->l[r] * alpha + sum;
        W->m[r] = mnew;
      } else if (variant == ATTN_LSSA) {
        W->l[r] += K->row_softplus(sr, nv, ncols);
      } else if (!lssar1) { /* m: the largest score; l: Z */
        if (nv > 0) {
          float mt = K->rowmax(sr, nv);
          if (mt > W->m[r]) W->m[r] = mt;
        }
        W->l[r] += K->row_softplus(sr, nv, ncols);
      } else {
        W->l[r] += (kept ? K->row_lssar_sp : K->row_lssar)(sr, nv, ncols, &rcs[r]);
      }
    }
    if (values && J->kv->f16)
      J->pv_h(S, R, maxnv, (const uint16_t *)J->kv->v + tile * ATTN_BK * dvp, dvp, W->o);
    else if (values)
      K->pv(S, R, maxnv, (const float *)J->kv->v + tile * ATTN_BK * dvp, dvp, W->o);
  }
  int64_t at = (kvh * J->nblk + blk) * R;
  for (int r = 0; r < R; r++) {
    J->pm[at + r] = W->m[r];
    J->pl[at + r] = W->l[r];
  }
  if (values) memcpy(J->po + at * dvp, W->o, sizeof(float) * (size_t)R * dvp);
}

static void kvc_range(void *arg, int64_t b, int64_t e) {
  kvc_job *J = arg;
  kvc_scratch *W = tl_malloc(sizeof *W);
  float *buf = tl_malloc(sizeof(float) * (size_t)ATTN_BQ * (J->d + ATTN_BK + J->dvp));
  if (!W || !buf) {
    __atomic_store_n(&J->fail, 1, __ATOMIC_RELAXED);
    tl_free(W);
    tl_free(buf);
    return;
  }
  W->q = buf;
  W->s = W->q + (int64_t)ATTN_BQ * J->d;
  W->o = W->s + (int64_t)ATTN_BQ * ATTN_BK;
  for (int64_t it = b; it < e; it++) kvc_item(J, W, it % J->Hkv, it / J->Hkv);
  tl_free(buf);
  tl_free(W);
}

/* Every (kv head, row): merges the blocks' partials into out (and for
 * LSSAR's pass 1, into the row constants). */
static void kvc_merge(kvc_job *J, attn_out out, double *acc) {
  const attn_params *prm = J->prm;
  int R = J->R, dvp = J->dvp, dv = J->dv, variant = prm->variant;
  for (int64_t kvh = 0; kvh < J->Hkv; kvh++)
    for (int r = 0; r < R; r++) {
      int64_t t = kvc_row_t(J, r);
      double M = -INFINITY, L = 0.0;
      for (int64_t b = 0; b < J->nblk; b++) {
        int64_t at = (kvh * J->nblk + b) * R + r;
        if (J->pm[at] > M) M = J->pm[at];
      }
      if (variant == ATTN_LSSAR && J->pass == 0) {
        for (int64_t b = 0; b < J->nblk; b++) L += J->pl[(kvh * J->nblk + b) * R + r];
        double N = attn_row_n(prm, J->Lk, t), O = attn_row_o(prm, t), xmax = 0, ceps = 0;
        attn_rowc *c = &J->rc[kvh * R + r];
        J->dead[kvh * R + r] = !lssar_row_consts(N, O, L, M, prm->p, &xmax, &ceps);
        if (J->dead[kvh * R + r]) continue;
        c->c1 = (float)(N / (L + ATTN_EPS));
        c->o = (float)O;
        c->inv_xmax = (float)(1.0 / xmax);
        c->ythr = (float)exp(log(1e-30) / prm->p);
        c->p = (float)prm->p;
        c->ip = (prm->p == floor(prm->p) && prm->p <= 64) ? (int)prm->p : 0;
        J->ceps[kvh * R + r] = ceps;
        continue;
      }
      for (int c = 0; c < dv; c++) acc[c] = 0.0;
      for (int64_t b = 0; b < J->nblk; b++) {
        int64_t at = (kvh * J->nblk + b) * R + r;
        double w = 1.0;
        if (variant == ATTN_SOFTMAX) {
          if (J->pm[at] == -INFINITY) continue; /* no visible key in the block */
          w = exp(J->pm[at] - M);
        }
        L += J->pl[at] * w;
        const float *o = J->po + at * dvp;
        for (int c = 0; c < dv; c++) acc[c] += w * o[c];
      }
      double norm;
      if (variant == ATTN_SOFTMAX)
        norm = L;
      else if (variant == ATTN_LSSA)
        norm = L + ATTN_EPS;
      else
        norm = J->dead[kvh * R + r] ? 0.0 : L + J->ceps[kvh * R + r];
      int h = (int)kvh * J->g + r / (int)J->Lq;
      int64_t i = r % J->Lq;
      float *dst = out.data + h * out.head_stride + i * out.row_stride;
      for (int c = 0; c < dv; c++) dst[c] = norm > 0.0 ? (float)(acc[c] / norm) : 0.0f;
    }
}

/* The float16 tile kernels of kern's path, or the scalar ones where the
 * CPU lacks F16C. */
static void kvc_half_kernels(const attn_kern *kern,
                             void (**qk)(const float *, int, int, const uint16_t *, int, float *),
                             void (**pv)(const float *, int, int, const uint16_t *, int, float *)) {
  int hw = kern == &attn__kern_scalar;
#if defined(__x86_64__)
  if (kern == &attn__kern_avx2) hw = attn__has_f16c();
#endif
#if defined(__aarch64__)
  hw = 1;
#endif
  *qk = hw ? kern->qk_h : attn__sc_qk_h;
  *pv = hw ? kern->pv_h : attn__sc_pv_h;
}

/* The tiled driver over the cache (many queries: a prefill chunk). */
static int kvc_tiles(pool_t *pool, const attn_kern *kern, const attn_params *prm, int H, int64_t Lq,
                     int64_t Lk, attn_tensor q, const attn_kvc *kv, attn_out out, ts_err *err) {
  attn_job J;
  memset(&J, 0, sizeof J);
  J.kern = kern;
  J.prm = prm;
  J.H = H;
  J.Hkv = kv->Hkv;
  J.g = H / kv->Hkv;
  J.d = kv->d;
  J.dv = kv->dv;
  J.dvp = kv->dvp;
  J.Lq = Lq;
  J.Lk = Lk;
  J.ntq = (Lq + ATTN_BQ - 1) / ATTN_BQ;
  J.ntk = (Lk + ATTN_BK - 1) / ATTN_BK;
  J.Lkp = J.ntk * ATTN_BK;
  J.q = q;
  J.out = out;
  J.qscale = prm->scale != 0.0f ? prm->scale : (float)(1.0 / sqrt((double)kv->d));
  J.lnd = log((double)kv->d);
  if (kv->f16) {
    J.kph = kv->k;
    J.vph = kv->v;
    kvc_half_kernels(kern, &J.qk_h, &J.pv_h);
  } else {
    J.kp = kv->k;
    J.vp = kv->v;
  }
  J.kinv = prm->variant != ATTN_SOFTMAX ? kv->kinv : NULL;
  pool_parallel_for(pool, (int64_t)H * J.ntq, 1, attn_tiles_range, &J);
  if (J.fail) return ts_errf(err, TS_ENOMEM, "attention: out of memory for worker scratch");
  return 0;
}

int attn_kvc_forward_path(cpu_path path, pool_t *pool, const attn_params *prm, int H, int64_t Lq,
                          int64_t Lk, attn_tensor q, const attn_kvc *kv, attn_out out,
                          ts_err *err) {
  if (!kv) return ts_errf(err, TS_EINVAL, "attention: no KV cache given");
  attn_tensor kt = {(const float *)kv->k, 0, 0}, vt = {(const float *)kv->v, 0, 0};
  int rc = attn_check_args(prm, H, kv->Hkv, Lq, Lk, kv->d, kv->dv, q, kt, vt, out, err);
  if (rc) return rc;
  if (Lk > kv->cap)
    return ts_errf(err, TS_EINVAL, "attention: %lld keys asked of a KV cache holding %lld",
                   (long long)Lk, (long long)kv->cap);
  const attn_kern *kern;
  if ((rc = attn_pick(path, &kern, err))) return rc;
  if (Lq == 0) return 0;
  int g = H / kv->Hkv, dv = kv->dv;
  if (Lk == 0) { /* no key at all (a full mask over an empty cache): zero */
    for (int h = 0; h < H; h++)
      for (int64_t i = 0; i < Lq; i++)
        memset(out.data + h * out.head_stride + i * out.row_stride, 0, sizeof(float) * (size_t)dv);
    return 0;
  }
  if ((int64_t)g * Lq > ATTN_BQ) return kvc_tiles(pool, kern, prm, H, Lq, Lk, q, kv, out, err);

  kvc_job J;
  memset(&J, 0, sizeof J);
  J.prm = prm;
  J.kern = kern;
  J.kv = kv;
  J.H = H;
  J.Hkv = kv->Hkv;
  J.g = g;
  J.d = kv->d;
  J.dv = dv;
  J.dvp = kv->dvp;
  J.R = (int)(g * Lq);
  J.Lq = Lq;
  J.Lk = Lk;
  J.ntk = (Lk + ATTN_BK - 1) / ATTN_BK;
  J.tpb = ATTN_KVC_BLOCK / ATTN_BK;
  J.nblk = (J.ntk + J.tpb - 1) / J.tpb;
  J.q = q;
  J.qscale = prm->scale != 0.0f ? prm->scale : (float)(1.0 / sqrt((double)kv->d));
  J.lnd = log((double)kv->d);
  if (kv->f16) kvc_half_kernels(kern, &J.qk_h, &J.pv_h);
  size_t parts = (size_t)J.Hkv * (size_t)J.nblk * (size_t)J.R, rows = (size_t)J.Hkv * J.R;
  J.pm = tl_malloc(sizeof(double) * parts);
  J.pl = tl_malloc(sizeof(double) * parts);
  J.po = tl_malloc(sizeof(float) * parts * (size_t)J.dvp);
  double *acc = tl_malloc(sizeof(double) * (size_t)dv);
  int lssar = prm->variant == ATTN_LSSAR;
  if (lssar) {
    J.rc = tl_malloc(sizeof(attn_rowc) * rows);
    J.ceps = tl_malloc(sizeof(double) * rows);
    J.dead = tl_malloc(sizeof(int) * rows);
  }
  if (!J.pm || !J.pl || !J.po || !acc || (lssar && (!J.rc || !J.ceps || !J.dead))) {
    rc = ts_errf(err, TS_ENOMEM, "attention: out of memory for %lld partial results",
                 (long long)parts);
    goto out;
  }
  if (lssar) {
    /* pass 1's softplus(scores), so that pass 2 does no second Q.K; past
     * ATTN_KVC_KEEP_BYTES (or without the memory) pass 2 computes them again */
    size_t kb = sizeof(float) * (size_t)J.Hkv * (size_t)J.ntk * (size_t)J.R * ATTN_BK;
    if (kb <= ATTN_KVC_KEEP_BYTES) J.keep = tl_malloc(kb);
  }
  for (J.pass = 0; J.pass < (lssar ? 2 : 1); J.pass++) {
    pool_parallel_for(pool, (int64_t)J.Hkv * J.nblk, 1, kvc_range, &J);
    if (J.fail) {
      rc = ts_errf(err, TS_ENOMEM, "attention: out of memory for worker scratch");
      goto out;
    }
    kvc_merge(&J, out, acc);
  }
out:
  tl_free(J.pm);
  tl_free(J.pl);
  tl_free(J.po);
  tl_free(J.keep);
  tl_free(J.rc);
  tl_free(J.ceps);
  tl_free(J.dead);
  tl_free(acc);
  return rc;
}

int attn_kvc_forward(pool_t *pool, const attn_params *prm, int H, int64_t Lq, int64_t Lk,
                     attn_tensor q, const attn_kvc *kv, attn_out out, ts_err *err) {
  return attn_kvc_forward_path(cpu_best_path(), pool, prm, H, Lq, Lk, q, kv, out, err);
}
