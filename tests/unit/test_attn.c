/* test_attn.c - the attention kernels (daemon/kernels/attn.h).
 *
 * Three layers of trust: (1) attn_reference against an independent double
 * implementation in this file that materialises the whole score matrix and
 * applies the spec's formulas naively (plain pow, no guards); (2) every tiled
 * path (scalar, AVX2 where the CPU has it) against attn_reference; (3) cases
 * worked out by hand: one visible key, uniform LSSAR rows, masked keys with
 * huge values, an LSSAR row whose float power would overflow. Shapes cover
 * odd lengths, d in {32, 64, 80, 128}, dv != d, GQA, both masks, query
 * offsets, both memory layouts and KV caches with spare capacity. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../daemon/base/rng.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/kernels/attn.h"

/* ---- problems ------------------------------------------------------------ */

typedef struct prob {
  int H, Hkv, d, dv, interleaved;
  int64_t Lq, Lk, cap; /* cap >= Lk: KV cache capacity */
  float *q, *k, *v, *out;
  attn_tensor tq, tk, tv;
  attn_out to;
} prob;

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double urand(void) {
  return rng_unif01(&rng_state) * 2 - 1;
} /* [-1, 1) */

/* Views over [heads, rows, dim] (interleaved = 0) or [rows, heads, dim]. */
static void view(int interleaved, int heads, int64_t rows, int dim, int64_t *hs, int64_t *rs) {
  if (interleaved) {
    *hs = dim;
    *rs = (int64_t)heads * dim;
  } else {
    *hs = rows * dim;
    *rs = dim;
  }
}

static void prob_init(prob *P, int H, int Hkv, int64_t Lq, int64_t Lk, int d, int dv,
                      int interleaved, int64_t cap, float qscale) {
  memset(P, 0, sizeof *P);
  P->H = H, P->Hkv = Hkv, P->Lq = Lq, P->Lk = Lk, P->d = d, P->dv = dv;
  P->interleaved = interleaved;
  P->cap = cap < Lk ? Lk : cap;
  size_t nq = (size_t)H * Lq * d, nk = (size_t)Hkv * P->cap * d, nv = (size_t)Hkv * P->cap * dv;
  P->q = malloc(sizeof(float) * (nq + 1));
  P->k = malloc(sizeof(float) * (nk + 1));
  P->v = malloc(sizeof(float) * (nv + 1));
  P->out = malloc(sizeof(float) * ((size_t)H * Lq * dv + 1));
  assert_non_null(P->q);
  assert_non_null(P->k);
  assert_non_null(P->v);
  assert_non_null(P->out);
  for (size_t i = 0; i < nq; i++) P->q[i] = (float)(qscale * urand());
  for (size_t i = 0; i < nk; i++) P->k[i] = (float)urand();
  for (size_t i = 0; i < nv; i++) P->v[i] = (float)urand();
  P->tq.data = P->q;
  view(interleaved, H, Lq, d, &P->tq.head_stride, &P->tq.row_stride);
  P->tk.data = P->k;
  view(interleaved, Hkv, P->cap, d, &P->tk.head_stride, &P->tk.row_stride);
  P->tv.data = P->v;
  view(interleaved, Hkv, P->cap, dv, &P->tv.head_stride, &P->tv.row_stride);
  P->to.data = P->out;
  view(interleaved, H, Lq, dv, &P->to.head_stride, &P->to.row_stride);
}

static void prob_free(prob *P) {
  free(P->q);
  free(P->k);
  free(P->v);
  free(P->out);
}

static float *qat(prob *P, int h, int64_t i) {
  return P->q + h * P->tq.head_stride + i * P->tq.row_stride;
}
static float *kat(prob *P, int h, int64_t j) {
  return P->k + h * P->tk.head_stride + j * P->tk.row_stride;
}
static float *vat(prob *P, int h, int64_t j) {
  return P->v + h * P->tv.head_stride + j * P->tv.row_stride;
}
static float *oat(const prob *P, const float *out, int h, int64_t i) {
  return (float *)out + h * P->to.head_stride + i * P->to.row_stride;
}

/* ---- the independent double implementation: the whole matrix -------------- */

static void naive(const attn_params *prm, prob *P, double *res /* [H][Lq][dv] */) {
  int64_t Lq = P->Lq, Lk = P->Lk;
  int d = P->d, dv = P->dv, g = P->H / P->Hkv;
  double *S = malloc(sizeof(double) * (size_t)(Lq * Lk + 1));
  assert_non_null(S);
  for (int h = 0; h < P->H; h++) {
    int kh = h / g;
    for (int64_t i = 0; i < Lq; i++) {
      int64_t t = prm->query_offset + i;
      double N = prm->causal ? (double)(t + 1) : (double)Lk;
      double nq = 0;
      for (int c = 0; c < d; c++) nq += (double)qat(P, h, i)[c] * qat(P, h, i)[c];
      nq = fmax(sqrt(nq), 1e-12);
      for (int64_t j = 0; j < Lk; j++) {
        double dot = 0, nk = 0;
        for (int c = 0; c < d; c++) {
          dot += (double)qat(P, h, i)[c] * kat(P, kh, j)[c];
          nk += (double)kat(P, kh, j)[c] * kat(P, kh, j)[c];
        }
        nk = fmax(sqrt(nk), 1e-12);
        int vis = !prm->causal || j <= t;
        double s;
        if (prm->variant == ATTN_SOFTMAX)
          s = dot * (prm->scale != 0 ? prm->scale : 1.0 / sqrt((double)d));
        else
          s = log((double)d) * log(N) * dot / (nq * nk);
        S[i * Lk + j] = vis ? s : NAN;
      }
      /* weights in place */
      double *row = S + i * Lk;
      if (prm->variant == ATTN_SOFTMAX) {
        double m = -INFINITY, sum = 0;
        for (int64_t j = 0; j < Lk; j++)
          if (!isnan(row[j]) && row[j] > m) m = row[j];
        for (int64_t j = 0; j < Lk; j++) sum += row[j] = isnan(row[j]) ? 0 : exp(row[j] - m);
        for (int64_t j = 0; j < Lk; j++) row[j] = sum > 0 ? row[j] / sum : 0;
      } else {
        double Z = 0;
        for (int64_t j = 0; j < Lk; j++) Z += row[j] = isnan(row[j]) ? 0 : log1p(exp(row[j]));
        for (int64_t j = 0; j < Lk; j++) row[j] /= Z + 1e-8;
        if (prm->variant == ATTN_LSSAR) {
          double O = t < prm->offset_rows ? 0 : 1, sb = 0;
          for (int64_t j = 0; j < Lk; j++) {
            int vis = !prm->causal || j <= t;
            sb += row[j] = vis ? pow(fmax(N * row[j] - O, 0), prm->p) : 0;
          }
          for (int64_t j = 0; j < Lk; j++) row[j] /= sb + 1e-8;
        }
      }
      for (int c = 0; c < dv; c++) {
        double acc = 0;
        for (int64_t j = 0; j < Lk; j++) acc += row[j] * vat(P, kh, j)[c];
        res[((int64_t)h * Lq + i) * dv + c] = acc;
      }
    }
  }
  free(S);
}

/* ---- comparison ---------------------------------------------------------- */

/* max over elements of |a - b| / (atol + rtol |b|); <= 1 passes. */
static double worst_f(const prob *P, const float *a, const float *b, double atol, double rtol) {
  double w = 0;
  for (int h = 0; h < P->H; h++)
    for (int64_t i = 0; i < P->Lq; i++)
      for (int c = 0; c < P->dv; c++) {
        double x = oat(P, a, h, i)[c], y = oat(P, b, h, i)[c];
        double e = fabs(x - y) / (atol + rtol * fabs(y));
        if (!(e <= w)) w = isnan(e) ? INFINITY : e;
      }
  return w;
}

static double worst_d(const prob *P, const float *a, const double *ref, double atol, double rtol) {
  double w = 0;
  for (int h = 0; h < P->H; h++)
    for (int64_t i = 0; i < P->Lq; i++)
      for (int c = 0; c < P->dv; c++) {
        double x = oat(P, a, h, i)[c], y = ref[((int64_t)h * P->Lq + i) * P->dv + c];
        double e = fabs(x - y) / (atol + rtol * fabs(y));
        if (!(e <= w)) w = isnan(e) ? INFINITY : e;
      }
  return w;
}

static int paths(cpu_path *out) {
  int n = 0;
  out[n++] = CPU_SCALAR;
  if (cpu_has_avx2_fma()) out[n++] = CPU_AVX2;
  if (cpu_has_avx512()) out[n++] = CPU_AVX512; /* the AVX2 tiles, through the fallback */
  if (cpu_has_neon()) out[n++] = CPU_NEON;
  return n;
}

/* Paths against the reference: |x - ref| <= 1e-4 + 1e-4 |ref|. Observed worst
 * on these shapes: ~1e-6 for softmax and LSSA, ~6e-6 for LSSAR, whose y^p
 * multiplies float32 score errors by p. */
static double path_tol(const attn_params *prm) {
  (void)prm;
  return 1e-4;
}

typedef struct shape {
  int H, Hkv;
  int64_t Lq, Lk;
  int d, dv, causal;
  int64_t qoff, cap;
  int interleaved;
  float qscale;
} shape;

static const shape shapes[] = {
    /* H Hkv  Lq    Lk    d    dv  causal qoff  cap  inter qscale */
    {2, 1, 1, 1, 64, 64, 1, 0, 0, 0, 1},        {3, 3, 7, 7, 32, 32, 1, 0, 0, 1, 2},
    {4, 2, 63, 63, 64, 48, 1, 0, 70, 0, 3},     {4, 1, 65, 65, 80, 80, 1, 0, 0, 1, 1},
    {2, 2, 65, 130, 128, 128, 1, 65, 0, 0, 2},  {6, 3, 7, 200, 64, 72, 1, 193, 256, 1, 1},
    {2, 1, 1, 1000, 64, 64, 1, 999, 0, 0, 3},   {1, 1, 1000, 1000, 64, 64, 1, 0, 0, 0, 2},
    {2, 1, 63, 65, 32, 40, 0, 0, 0, 0, 2},      {4, 4, 65, 7, 80, 64, 0, 5, 0, 1, 1},
    {2, 1, 1, 1000, 128, 64, 0, 3000, 0, 0, 1}, {1, 1, 200, 1000, 64, 16, 0, 0, 1024, 1, 3},
    {3, 1, 50, 97, 17, 5, 1, 47, 0, 0, 1},
};

static attn_params variant_params(int variant, int causal, int64_t qoff, int which) {
  attn_params prm = attn_params_default((attn_variant)variant);
  prm.causal = causal;
  prm.query_offset = qoff;
  if (variant == ATTN_LSSAR && which % 2) prm.p = 3; /* also the paper's p = 3 */
  if (variant == ATTN_SOFTMAX && which % 3 == 2) prm.scale = 0.3f;
  return prm;
}

/* attn_reference against the naive double matrix implementation. */
static void test_reference_vs_naive(void **state) {
  (void)state;
  for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
    const shape *S = &shapes[si];
    for (int var = 0; var < 3; var++) {
      prob P;
      prob_init(&P, S->H, S->Hkv, S->Lq, S->Lk, S->d, S->dv, S->interleaved, S->cap, S->qscale);
      attn_params prm = variant_params(var, S->causal, S->qoff, (int)si);
      double *res = malloc(sizeof(double) * (size_t)(P.H * P.Lq * P.dv));
      naive(&prm, &P, res);
      ts_err err;
      assert_int_equal(
          attn_reference(&prm, P.H, P.Hkv, P.Lq, P.Lk, P.d, P.dv, P.tq, P.tk, P.tv, P.to, &err), 0);
      double w = worst_d(&P, P.out, res, 1e-6, 1e-5);
      if (w > 1) {
        fprintf(stderr, "shape %zu %s: reference vs naive error ratio %g\n", si,
                attn_variant_name(prm.variant), w);
      }
      assert_true(w <= 1);
      free(res);
      prob_free(&P);
    }
  }
}

/* Every tiled path against attn_reference, serially and on a pool. */
static void test_paths_vs_reference(void **state) {
  (void)state;
  pool_t *pool = NULL;
  assert_int_equal(pool_create(&pool, 2, 0), 0);
  cpu_path ps[4];
  int np = paths(ps);
  for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
    const shape *S = &shapes[si];
    for (int var = 0; var < 3; var++) {
      prob P;
      prob_init(&P, S->H, S->Hkv, S->Lq, S->Lk, S->d, S->dv, S->interleaved, S->cap, S->qscale);
      attn_params prm = variant_params(var, S->causal, S->qoff, (int)si);
      size_t no = (size_t)P.H * P.Lq * P.dv;
      float *ref = malloc(sizeof(float) * no), *ser = malloc(sizeof(float) * no);
      ts_err err;
      attn_out oref = P.to, oser = P.to;
      oref.data = ref;
      oser.data = ser;
      assert_int_equal(
          attn_reference(&prm, P.H, P.Hkv, P.Lq, P.Lk, P.d, P.dv, P.tq, P.tk, P.tv, oref, &err), 0);
      for (int pi = 0; pi < np; pi++) {
        int rc = attn_forward_path(ps[pi], NULL, &prm, P.H, P.Hkv, P.Lq, P.Lk, P.d, P.dv, P.tq,
                                   P.tk, P.tv, oser, &err);
        assert_int_equal(rc, 0);
        double tol = path_tol(&prm), w = worst_f(&P, ser, ref, tol, tol);
        if (w > 1)
          fprintf(stderr, "shape %zu %s path %s: error ratio %g (tol %g)\n", si,
                  attn_variant_name(prm.variant), cpu_path_name(ps[pi]), w, tol);
        assert_true(w <= 1);
        /* the pool splits work, never changes a result */
        rc = attn_forward_path(ps[pi], pool, &prm, P.H, P.Hkv, P.Lq, P.Lk, P.d, P.dv, P.tq, P.tk,
                               P.tv, P.to, &err);
        assert_int_equal(rc, 0);
        for (int h = 0; h < P.H; h++)
          for (int64_t i = 0; i < P.Lq; i++)
            assert_memory_equal(oat(&P, P.out, h, i), oat(&P, ser, h, i),
                                sizeof(float) * (size_t)P.dv);
      }
      free(ref);
      free(ser);
      prob_free(&P);
    }
  }
  pool_destroy(pool);
}

/* The two layouts hold the same numbers: same results, bit for bit. */
static void test_layouts_agree(void **state) {
  (void)state;
  prob A, B;
  uint64_t seed = rng_state;
  prob_init(&A, 4, 2, 37, 37, 64, 64, 0, 0, 1);
  rng_state = seed;
  prob_init(&B, 4, 2, 37, 37, 64, 64, 1, 50, 1);
  /* copy A's logical contents into B's layout */
  for (int h = 0; h < 4; h++)
    for (int64_t i = 0; i < 37; i++) memcpy(qat(&B, h, i), qat(&A, h, i), sizeof(float) * 64);
  for (int h = 0; h < 2; h++)
    for (int64_t j = 0; j < 37; j++) {
      memcpy(kat(&B, h, j), kat(&A, h, j), sizeof(float) * 64);
      memcpy(vat(&B, h, j), vat(&A, h, j), sizeof(float) * 64);
    }
  ts_err err;
  for (int var = 0; var < 3; var++) {
    attn_params prm = variant_params(var, 1, 0, 0);
    assert_int_equal(attn_forward(NULL, &prm, 4, 2, 37, 37, 64, 64, A.tq, A.tk, A.tv, A.to, &err),
                     0);
    assert_int_equal(attn_forward(NULL, &prm, 4, 2, 37, 37, 64, 64, B.tq, B.tk, B.tv, B.to, &err),
                     0);
    for (int h = 0; h < 4; h++)
      for (int64_t i = 0; i < 37; i++)
        assert_memory_equal(oat(&A, A.out, h, i), oat(&B, B.out, h, i), sizeof(float) * 64);
  }
  prob_free(&A);
  prob_free(&B);
}

/* Runs the reference and every path; calls check(out) on each. */
typedef void (*out_check)(const prob *P, const float *out, const char *who, void *ctx);
static void each_impl(const attn_params *prm, prob *P, out_check check, void *ctx) {
  ts_err err;
  assert_int_equal(attn_reference(prm, P->H, P->Hkv, P->Lq, P->Lk, P->d, P->dv, P->tq, P->tk, P->tv,
                                  P->to, &err),
                   0);
  check(P, P->out, "reference", ctx);
  cpu_path ps[4];
  int np = paths(ps);
  for (int pi = 0; pi < np; pi++) {
    memset(P->out, 0xff, sizeof(float) * (size_t)P->H * P->Lq * P->dv); /* NaN poison */
    assert_int_equal(attn_forward_path(ps[pi], NULL, prm, P->H, P->Hkv, P->Lq, P->Lk, P->d, P->dv,
                                       P->tq, P->tk, P->tv, P->to, &err),
                     0);
    check(P, P->out, cpu_path_name(ps[pi]), ctx);
  }
}

/* Query 0 under a causal mask sees key 0 alone: softmax gives v_0 exactly;
 * LSSA gives v_0 a / (a + eps) with a = ln 2; LSSAR (row 0 < offset rows)
 * v_0 / (1 + eps x^-p) with x = a / (a + eps): both v_0 to ~1e-8. */
static void check_first_row(const prob *P, const float *out, const char *who, void *ctx) {
  int variant = *(int *)ctx;
  for (int h = 0; h < P->H; h++) {
    const float *v0 = P->v + (h / (P->H / P->Hkv)) * P->tv.head_stride;
    for (int c = 0; c < P->dv; c++) {
      float o = oat(P, out, h, 0)[c];
      if (variant == ATTN_SOFTMAX) {
        if (o != v0[c]) fail_msg("%s: softmax row 0 col %d: %g != %g", who, c, o, v0[c]);
      } else {
        assert_true(fabs(o - v0[c]) <= 3e-7 * fabs(v0[c]) + 1e-30);
      }
    }
  }
}

static void test_single_visible_key(void **state) {
  (void)state;
  for (int var = 0; var < 3; var++) {
    prob P;
    prob_init(&P, 4, 2, 9, 9, 80, 24, 0, 0, 2);
    attn_params prm = variant_params(var, 1, 0, 0);
    each_impl(&prm, &P, check_first_row, &var);
    prob_free(&P);
  }
}

/* Identical keys make every row uniform: N A_ij = N a / (N a + eps) < 1, so
 * past the offset rows ReLU(N A - 1) = 0 and the output is 0 exactly; the
 * first three rows (O = 0) give the mean of their visible values. */
static void check_uniform(const prob *P, const float *out, const char *who, void *ctx) {
  (void)ctx;
  for (int64_t i = 0; i < P->Lq; i++)
    for (int c = 0; c < P->dv; c++) {
      float o = oat(P, out, 0, i)[c];
      if (i >= 3) {
        if (o != 0.0f)
          fail_msg("%s: uniform LSSAR row %lld col %d = %g, not 0", who, (long long)i, c, o);
      } else {
        double mean = 0;
        for (int64_t j = 0; j <= i; j++) mean += P->v[j * P->tv.row_stride + c];
        mean /= (double)(i + 1);
        assert_true(fabs(o - mean) <= 1e-5);
      }
    }
}

static void test_lssar_uniform_rows_zero(void **state) {
  (void)state;
  prob P;
  prob_init(&P, 1, 1, 150, 150, 64, 32, 0, 0, 1);
  for (int64_t j = 1; j < P.Lk; j++) memcpy(kat(&P, 0, j), kat(&P, 0, 0), sizeof(float) * 64);
  attn_params prm = attn_params_default(ATTN_LSSAR);
  each_impl(&prm, &P, check_uniform, NULL);
  prob_free(&P);
}

/* Keys a causal row cannot see carry enormous K and V: nothing changes. */
static void test_masked_keys_never_contribute(void **state) {
  (void)state;
  for (int var = 0; var < 3; var++) {
    prob P;
    prob_init(&P, 2, 1, 70, 140, 64, 64, 0, 0, 1);
    attn_params prm = variant_params(var, 1, 5, 0);
    size_t no = (size_t)P.H * P.Lq * P.dv;
    float *clean = malloc(sizeof(float) * no), *dirty = malloc(sizeof(float) * no);
    size_t nkv = (size_t)P.Hkv * P.cap * 64;
    float *k0 = malloc(sizeof(float) * nkv), *v0 = malloc(sizeof(float) * nkv);
    memcpy(k0, P.k, sizeof(float) * nkv);
    memcpy(v0, P.v, sizeof(float) * nkv);
    cpu_path ps[4];
    int np = paths(ps);
    ts_err err;
    for (int pi = -1; pi < np; pi++) {
      for (int pass = 0; pass < 2; pass++) {
        if (pass == 0) {
          memcpy(P.k, k0, sizeof(float) * nkv);
          memcpy(P.v, v0, sizeof(float) * nkv);
        } else /* keys past the last query's position 74, and inside tiles */
          for (int64_t j = 75; j < P.Lk; j++)
            for (int c = 0; c < 64; c++) {
              kat(&P, 0, j)[c] = c % 2 ? 1e6f : -1e6f;
              vat(&P, 0, j)[c] = 1e30f;
            }
        attn_out o = P.to;
        o.data = pass ? dirty : clean;
        int rc = pi < 0 ? attn_reference(&prm, 2, 1, 70, 140, 64, 64, P.tq, P.tk, P.tv, o, &err)
                        : attn_forward_path(ps[pi], NULL, &prm, 2, 1, 70, 140, 64, 64, P.tq, P.tk,
                                            P.tv, o, &err);
        assert_int_equal(rc, 0);
      }
      assert_memory_equal(clean, dirty, sizeof(float) * no);
      for (size_t i = 0; i < no; i++) assert_true(isfinite(clean[i]));
    }
    free(clean);
    free(dirty);
    free(k0);
    free(v0);
    prob_free(&P);
  }
}

/* One key aligned with the query, one at cosine 0.9, 998 opposed: N A - 1 is
 * about 999 for the first, whose 15th power (1e45) overflows float32. The
 * guarded kernels stay finite and match the double naive result. */
static void test_lssar_overflow_row(void **state) {
  (void)state;
  prob P;
  prob_init(&P, 1, 1, 1, 1000, 64, 16, 0, 0, 1);
  memset(P.q, 0, sizeof(float) * 64);
  memset(P.k, 0, sizeof(float) * 64 * 1000);
  P.q[0] = 2.0f;
  for (int64_t j = 0; j < 1000; j++) kat(&P, 0, j)[0] = -1.0f;
  int64_t ja = 417, jb = 903;
  kat(&P, 0, ja)[0] = 3.0f;
  kat(&P, 0, jb)[0] = 0.9f;
  kat(&P, 0, jb)[1] = (float)sqrt(1 - 0.81);
  attn_params prm = attn_params_default(ATTN_LSSAR);
  prm.query_offset = 999;
  double res[16];
  naive(&prm, &P, res);
  double xa = 1000.0 * log1p(exp(log(64.0) * log(1000.0))) /
              (log1p(exp(log(64.0) * log(1000.0))) + 998 * log1p(exp(-log(64.0) * log(1000.0))) +
               log1p(exp(0.9 * log(64.0) * log(1000.0))));
  assert_true(pow(xa - 1, 15) > 3.4e38); /* the naive float power would overflow */
  ts_err err;
  assert_int_equal(attn_reference(&prm, 1, 1, 1, 1000, 64, 16, P.tq, P.tk, P.tv, P.to, &err), 0);
  for (int c = 0; c < 16; c++) assert_true(fabs(P.out[c] - res[c]) <= 1e-6 + 1e-6 * fabs(res[c]));
  cpu_path ps[4];
  int np = paths(ps);
  for (int pi = 0; pi < np; pi++) {
    assert_int_equal(
        attn_forward_path(ps[pi], NULL, &prm, 1, 1, 1, 1000, 64, 16, P.tq, P.tk, P.tv, P.to, &err),
        0);
    for (int c = 0; c < 16; c++) {
      assert_true(isfinite(P.out[c]));
      assert_true(fabs(P.out[c] - res[c]) <= 1e-4 + 1e-4 * fabs(res[c]));
    }
  }
  prob_free(&P);
}

/* LSSAR keeps pass 1's scores up to ATTN_LSSAR_KEEP_MAX keys and computes
 * them again past it: both sides of that length against the reference. */
static void test_lssar_keep_and_recompute(void **state) {
  (void)state;
  static const int64_t lens[] = {ATTN_LSSAR_KEEP_MAX, ATTN_LSSAR_KEEP_MAX + 70};
  for (size_t li = 0; li < 2; li++) {
    prob P;
    int64_t Lq = 50, Lk = lens[li];
    prob_init(&P, 1, 1, Lq, Lk, 8, 8, 0, Lk, 1.0f);
    attn_params prm = attn_params_default(ATTN_LSSAR);
    prm.query_offset = Lk - Lq;
    float *ref = malloc(sizeof(float) * (size_t)(Lq * 8));
    assert_non_null(ref);
    attn_out ro = P.to;
    ro.data = ref;
    ts_err err;
    assert_int_equal(attn_reference(&prm, 1, 1, Lq, Lk, 8, 8, P.tq, P.tk, P.tv, ro, &err), 0);
    cpu_path ps[4];
    int np = paths(ps);
    for (int pi = 0; pi < np; pi++) {
      assert_int_equal(
          attn_forward_path(ps[pi], NULL, &prm, 1, 1, Lq, Lk, 8, 8, P.tq, P.tk, P.tv, P.to, &err),
          0);
      double w = worst_f(&P, P.out, ref, path_tol(&prm), path_tol(&prm));
      if (!(w <= 1.0))
        fail_msg("LSSAR at %lld keys, path %s: error ratio %g", (long long)Lk,
                 cpu_path_name(ps[pi]), w);
    }
    free(ref);
    prob_free(&P);
  }
}

/* Full mask with no keys: zeros, never NaN. Lq = 0: nothing to do. */
static void test_empty(void **state) {
  (void)state;
  float q[64], o[64];
  for (int i = 0; i < 64; i++) q[i] = 1.0f, o[i] = NAN;
  attn_tensor tq = {q, 64, 64}, tk = {NULL, 0, 64};
  attn_out to = {o, 64, 64};
  ts_err err;
  for (int var = 0; var < 3; var++) {
    attn_params prm = variant_params(var, 0, 0, 0);
    assert_int_equal(attn_forward(NULL, &prm, 1, 1, 1, 0, 64, 64, tq, tk, tk, to, &err), 0);
    for (int i = 0; i < 64; i++) assert_true(o[i] == 0.0f);
    for (int i = 0; i < 64; i++) o[i] = NAN;
    assert_int_equal(attn_reference(&prm, 1, 1, 1, 0, 64, 64, tq, tk, tk, to, &err), 0);
    for (int i = 0; i < 64; i++) assert_true(o[i] == 0.0f);
    assert_int_equal(attn_forward(NULL, &prm, 1, 1, 0, 0, 64, 64, tq, tk, tk, to, &err), 0);
  }
}

static void test_bad_arguments(void **state) {
  (void)state;
  float buf[64 * 8] = {0};
  attn_tensor t = {buf, 64, 64};
  attn_out o = {buf, 64, 64};
  attn_params prm = attn_params_default(ATTN_SOFTMAX);
  ts_err err;
  assert_int_equal(attn_forward(NULL, &prm, 3, 2, 1, 1, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "3 query heads"));
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 1, 1, 0, 64, t, t, t, o, &err), -TS_EINVAL);
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 1, 1, 64, 0, t, t, t, o, &err), -TS_EINVAL);
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, -1, 1, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  prm.query_offset = 4; /* causal positions 4..5 need 6 keys */
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 2, 5, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "need 6 keys"));
  assert_int_equal(attn_reference(&prm, 1, 1, 2, 5, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  prm.causal = 0; /* the same shape unmasked is fine */
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 2, 5, 64, 64, t, t, t, o, &err), 0);
  prm.query_offset = -1;
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 2, 5, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  prm = attn_params_default(ATTN_LSSAR);
  prm.p = 0;
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 1, 1, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "power"));
  prm.p = 15;
  prm.offset_rows = -1;
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 1, 1, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  prm = attn_params_default((attn_variant)7);
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 1, 1, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  prm = attn_params_default(ATTN_LSSA);
  attn_tensor nul = {NULL, 0, 0};
  assert_int_equal(attn_forward(NULL, &prm, 1, 1, 1, 1, 64, 64, t, nul, t, o, &err), -TS_EINVAL);
  if (!cpu_has_neon())
    assert_int_equal(attn_forward_path(CPU_NEON, NULL, &prm, 1, 1, 1, 1, 64, 64, t, t, t, o, &err),
                     -TS_EINVAL);
}

/* Every allocation failure becomes -TS_ENOMEM, never a crash or a leak. */
static void test_out_of_memory(void **state) {
  (void)state;
  prob P;
  prob_init(&P, 2, 1, 100, 100, 64, 64, 0, 0, 1);
  ts_err err;
  for (int var = 0; var < 3; var++) {
    attn_params prm = variant_params(var, 1, 0, 0);
    for (long n = 0; n < 3; n++) {
      tl_mem_fail_after(n);
      int rc = attn_forward(NULL, &prm, 2, 1, 100, 100, 64, 64, P.tq, P.tk, P.tv, P.to, &err);
      tl_mem_fail_reset();
      /* the packed K/V, then the worker's two scratch blocks */
      assert_int_equal(rc, -TS_ENOMEM);
      assert_non_null(strstr(err.msg, "out of memory"));
    }
    tl_mem_fail_after(0);
    assert_int_equal(attn_reference(&prm, 2, 1, 100, 100, 64, 64, P.tq, P.tk, P.tv, P.to, &err),
                     -TS_ENOMEM);
    tl_mem_fail_reset();
  }
  prob_free(&P);
}

/* ---- the packed KV cache ------------------------------------------------- */

/* A cache holding P's keys and values, written in three appends of uneven
 * sizes (so that it grows between them). */
static void kvc_fill_as(attn_kvc *c, prob *P, int f16) {
  ts_err err;
  if (f16)
    attn_kvc_init_f16(c, P->Hkv, P->d, P->dv);
  else
    attn_kvc_init(c, P->Hkv, P->d, P->dv);
  int64_t cuts[4] = {0, P->Lk / 3, P->Lk / 3 + (P->Lk > 1 ? 1 : 0), P->Lk};
  for (int i = 0; i < 3; i++) {
    int64_t n = cuts[i + 1] - cuts[i];
    assert_int_equal(attn_kvc_reserve(c, cuts[i + 1], &err), 0);
    attn_tensor k = P->tk, v = P->tv;
    k.data += cuts[i] * k.row_stride;
    v.data += cuts[i] * v.row_stride;
    attn_kvc_write(c, cuts[i], n, k, v);
  }
  if (f16) /* P's keys and values become what the cache holds: the reference reads those */
    for (int h = 0; h < P->Hkv; h++)
      for (int64_t j = 0; j < P->Lk; j++) attn_kvc_read(c, j, h, kat(P, h, j), vat(P, h, j));
}

static void kvc_fill(attn_kvc *c, prob *P) {
  kvc_fill_as(c, P, 0);
}

/* Extra shapes for the decode driver: several 512-key blocks, GQA groups
 * sharing a tile, few queries at an offset, a full mask. */
static const shape kvc_shapes[] = {
    /* H Hkv  Lq    Lk    d    dv  causal qoff  cap  inter qscale */
    {12, 12, 1, 4096, 64, 64, 1, 4095, 0, 1, 2}, {8, 2, 3, 1500, 64, 64, 1, 1497, 0, 0, 1},
    {8, 2, 2, 1500, 64, 64, 1, 700, 0, 1, 3},    {4, 1, 12, 1100, 32, 40, 1, 1088, 0, 0, 1},
    {4, 4, 2, 1100, 64, 64, 0, 5, 0, 1, 2},      {6, 2, 1, 513, 80, 72, 1, 512, 0, 0, 1},
    {16, 1, 4, 600, 16, 16, 1, 596, 0, 0, 1}, /* R = 64 > 48: the tiled driver */
};

static void kvc_check_shape(const shape *S, int si, pool_t *pool, int f16) {
  cpu_path ps[4];
  int np = paths(ps);
  for (int var = 0; var < 3; var++) {
    prob P;
    prob_init(&P, S->H, S->Hkv, S->Lq, S->Lk, S->d, S->dv, S->interleaved, S->cap, S->qscale);
    attn_params prm = variant_params(var, S->causal, S->qoff, si);
    attn_kvc c;
    kvc_fill_as(&c, &P, f16);
    size_t no = (size_t)P.H * P.Lq * P.dv;
    float *ref = malloc(sizeof(float) * no), *ser = malloc(sizeof(float) * no);
    assert_non_null(ref);
    assert_non_null(ser);
    ts_err err;
    attn_out oref = P.to, oser = P.to;
    oref.data = ref;
    oser.data = ser;
    assert_int_equal(
        attn_reference(&prm, P.H, P.Hkv, P.Lq, P.Lk, P.d, P.dv, P.tq, P.tk, P.tv, oref, &err), 0);
    for (int pi = 0; pi < np; pi++) {
      memset(ser, 0xff, sizeof(float) * no);
      int rc = attn_kvc_forward_path(ps[pi], NULL, &prm, P.H, P.Lq, P.Lk, P.tq, &c, oser, &err);
      if (rc) fail_msg("kvc shape %d: %s", si, err.msg);
      double tol = path_tol(&prm), w = worst_f(&P, ser, ref, tol, tol);
      if (!(w <= 1))
        fail_msg("kvc%s shape %d %s path %s: error ratio %g (tol %g)", f16 ? " f16" : "", si,
                 attn_variant_name(prm.variant), cpu_path_name(ps[pi]), w, tol);
      /* the split depends on Lk only: the pool never changes a bit */
      rc = attn_kvc_forward_path(ps[pi], pool, &prm, P.H, P.Lq, P.Lk, P.tq, &c, P.to, &err);
      assert_int_equal(rc, 0);
      for (int h = 0; h < P.H; h++)
        for (int64_t i = 0; i < P.Lq; i++)
          assert_memory_equal(oat(&P, P.out, h, i), oat(&P, ser, h, i),
                              sizeof(float) * (size_t)P.dv);
    }
    attn_kvc_free(&c);
    free(ref);
    free(ser);
    prob_free(&P);
  }
}

/* Attention over the cache against attn_reference on the raw K and V, for
 * every shape (both drivers), every variant and path, serially and on a pool. */
static void test_kvc_vs_reference(void **state) {
  (void)state;
  pool_t *pool = NULL;
  assert_int_equal(pool_create(&pool, 3, 0), 0);
  for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
    kvc_check_shape(&shapes[si], (int)si, pool, 0);
  for (size_t si = 0; si < sizeof kvc_shapes / sizeof *kvc_shapes; si++)
    kvc_check_shape(&kvc_shapes[si], (int)si, pool, 0);
  pool_destroy(pool);
}

/* The same over a float16 cache: against attn_reference on the keys and
 * values rounded as the cache holds them (the kernels convert and sum in
 * float, so the error is the float32 cache's). */
static void test_kvc_f16_vs_reference(void **state) {
  (void)state;
  pool_t *pool = NULL;
  assert_int_equal(pool_create(&pool, 3, 0), 0);
  for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
    kvc_check_shape(&shapes[si], (int)si, pool, 1);
  for (size_t si = 0; si < sizeof kvc_shapes / sizeof *kvc_shapes; si++)
    kvc_check_shape(&kvc_shapes[si], (int)si, pool, 1);
  pool_destroy(pool);
}

/* float16 conversions: every half converts to float and back unchanged;
 * floats round to nearest even (against the compiler's _Float16 where it
 * has one, else against hand-worked values); a float16 cache holds half the
 * bytes of a float32 one, plus the same key norms. */
static void test_f16_conversions(void **state) {
  (void)state;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = attn_h2f((uint16_t)h);
    if (isnan(f)) {
      assert_true((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu));
      assert_true(isnan(attn_h2f(attn_f2h(f))));
      continue;
    }
    if (attn_f2h(f) != h) fail_msg("half %04x -> %g -> %04x", h, (double)f, attn_f2h(f));
  }
  static const struct {
    float f;
    uint16_t h;
  } hand[] = {
      {1.0f, 0x3c00},           {-2.0f, 0xc000},
      {65504.0f, 0x7bff},       {65520.0f, 0x7c00},
      {1e-8f, 0x0000},          {5.960464e-8f, 0x0001},
      {1.00048828125f, 0x3c00}, /* tie: even */
      {1.00146484375f, 0x3c02}, /* tie: up to even */ {0.0f, 0x0000},
      {-0.0f, 0x8000},
  };
  for (size_t i = 0; i < sizeof hand / sizeof *hand; i++)
    if (attn_f2h(hand[i].f) != hand[i].h)
      fail_msg("%.9g -> %04x, want %04x", (double)hand[i].f, attn_f2h(hand[i].f), hand[i].h);
#ifdef __FLT16_MAX__
  for (int i = 0; i < 2000000; i++) {
    uint32_t bits = (uint32_t)(urand() * 2147483647.0) * 2654435761u;
    float f;
    memcpy(&f, &bits, 4);
    if (isnan(f)) continue;
    _Float16 want = (_Float16)f;
    uint16_t wb;
    memcpy(&wb, &want, 2);
    if (attn_f2h(f) != wb) fail_msg("%a -> %04x, want %04x", (double)f, attn_f2h(f), wb);
  }
#endif
  size_t f32 = attn_kvc_bytes_for(4, 64, 64, 0, 1000), f16 = attn_kvc_bytes_for(4, 64, 64, 1, 1000);
  assert_true(f16 < f32 * 6 / 10 && f16 > f32 / 2);
}

/* One decoded query against the cache gives what the re-packing path gives
 * on the same keys (softmax: the same tile arithmetic, only the block merge
 * differs). */
static void test_kvc_matches_forward(void **state) {
  (void)state;
  prob P;
  prob_init(&P, 4, 4, 1, 2000, 64, 64, 1, 0, 2);
  attn_kvc c;
  kvc_fill(&c, &P);
  float *a = malloc(sizeof(float) * 4 * 64);
  assert_non_null(a);
  attn_out oa = P.to;
  oa.data = a;
  ts_err err;
  for (int var = 0; var < 3; var++) {
    attn_params prm = variant_params(var, 1, 1999, 0);
    assert_int_equal(attn_forward(NULL, &prm, 4, 4, 1, 2000, 64, 64, P.tq, P.tk, P.tv, P.to, &err),
                     0);
    assert_int_equal(attn_kvc_forward(NULL, &prm, 4, 1, 2000, P.tq, &c, oa, &err), 0);
    double w = worst_f(&P, a, P.out, 2e-5, 2e-5);
    if (!(w <= 1)) fail_msg("%s: cache vs re-packing ratio %g", attn_variant_name(prm.variant), w);
  }
  free(a);
  attn_kvc_free(&c);
  prob_free(&P);
}

/* Rows written come back; growth keeps them; a copy holds the same rows;
 * the byte count follows the capacity. */
static void test_kvc_rows(void **state) {
  (void)state;
  prob P;
  prob_init(&P, 3, 3, 1, 300, 20, 24, 0, 0, 1);
  attn_kvc c, d;
  kvc_fill(&c, &P);
  assert_int_equal(c.cap, 512);
  assert_int_equal(c.dvp, 32);
  ts_err err;
  attn_kvc_init(&d, 3, 20, 24);
  assert_int_equal(attn_kvc_copy(&d, &c, 300, &err), 0);
  assert_int_equal(attn_kvc_reserve(&c, 1000, &err), 0); /* grows: rows stay */
  assert_int_equal(c.cap, 1024);
  float k[20], v[24];
  for (int h = 0; h < 3; h++)
    for (int64_t j = 0; j < 300; j += 7) {
      attn_kvc_read(&c, j, h, k, v);
      assert_memory_equal(k, kat(&P, h, j), sizeof k);
      assert_memory_equal(v, vat(&P, h, j), sizeof v);
      attn_kvc_read(&d, j, h, k, v);
      assert_memory_equal(k, kat(&P, h, j), sizeof k);
      assert_memory_equal(v, vat(&P, h, j), sizeof v);
    }
  assert_true(attn_kvc_bytes(&c) >= sizeof(float) * 1024 * 3 * (20 + 1 + 32));
  assert_int_equal(attn_kvc_bytes_for(3, 20, 24, 0, 1000), attn_kvc_bytes(&c));
  assert_int_equal(attn_kvc_bytes_for(3, 20, 24, 0, 0), 0);
  /* refused: more keys than the cache holds, a copy between shapes */
  attn_params prm = attn_params_default(ATTN_SOFTMAX);
  prm.causal = 0;
  assert_int_equal(attn_kvc_forward(NULL, &prm, 3, 1, 2000, P.tq, &c, P.to, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "KV cache holding 1024"));
  assert_int_equal(attn_kvc_forward(NULL, &prm, 2, 1, 10, P.tq, &c, P.to, &err), -TS_EINVAL);
  assert_int_equal(attn_kvc_forward(NULL, &prm, 3, 1, 10, P.tq, NULL, P.to, &err), -TS_EINVAL);
  attn_kvc e;
  attn_kvc_init(&e, 2, 20, 24);
  assert_int_equal(attn_kvc_copy(&e, &c, 10, &err), -TS_EINVAL);
  /* an empty cache under a full mask: zeros */
  attn_kvc_init(&e, 3, 20, 24);
  memset(P.out, 0xff, sizeof(float) * 3 * 24);
  assert_int_equal(attn_kvc_forward(NULL, &prm, 3, 1, 0, P.tq, &e, P.to, &err), 0);
  for (int i = 0; i < 3 * 24; i++) assert_true(P.out[i] == 0.0f);
  attn_kvc_free(&c);
  attn_kvc_free(&d);
  prob_free(&P);
}

/* Every allocation failure is -TS_ENOMEM, never a crash or a leak, and
 * once enough allocations succeed the result is the same; the cache
 * survives a failed growth with its rows. */
static void test_kvc_out_of_memory(void **state) {
  (void)state;
  prob P;
  prob_init(&P, 2, 1, 1, 1200, 64, 64, 0, 0, 1);
  attn_kvc c;
  kvc_fill(&c, &P);
  float *want = malloc(sizeof(float) * 2 * 64);
  assert_non_null(want);
  attn_out ow = P.to;
  ow.data = want;
  ts_err err;
  for (int var = 0; var < 3; var++) {
    attn_params prm = variant_params(var, 1, 1199, 0);
    assert_int_equal(attn_kvc_forward(NULL, &prm, 2, 1, 1200, P.tq, &c, ow, &err), 0);
    int ok = 0;
    for (long n = 0; n < 16; n++) {
      tl_mem_fail_after(n);
      int rc = attn_kvc_forward(NULL, &prm, 2, 1, 1200, P.tq, &c, P.to, &err);
      tl_mem_fail_reset();
      if (rc == 0) {
        ok++;
        assert_memory_equal(P.out, want, sizeof(float) * 2 * 64);
      } else {
        assert_int_equal(rc, -TS_ENOMEM);
        assert_non_null(strstr(err.msg, "out of memory"));
      }
    }
    assert_true(ok >= 1);
  }
  tl_mem_fail_after(1);
  assert_int_equal(attn_kvc_reserve(&c, 5000, &err), -TS_ENOMEM);
  tl_mem_fail_reset();
  assert_int_equal(c.cap, 2048);
  float k[64], v[64];
  attn_kvc_read(&c, 1100, 0, k, v);
  assert_memory_equal(k, kat(&P, 0, 1100), sizeof k);
  free(want);
  attn_kvc_free(&c);
  prob_free(&P);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_reference_vs_naive),
      cmocka_unit_test(test_paths_vs_reference),
      cmocka_unit_test(test_lssar_keep_and_recompute),
      cmocka_unit_test(test_layouts_agree),
      cmocka_unit_test(test_single_visible_key),
      cmocka_unit_test(test_lssar_uniform_rows_zero),
      cmocka_unit_test(test_masked_keys_never_contribute),
      cmocka_unit_test(test_lssar_overflow_row),
      cmocka_unit_test(test_empty),
      cmocka_unit_test(test_bad_arguments),
      cmocka_unit_test(test_out_of_memory),
      cmocka_unit_test(test_kvc_vs_reference),
      cmocka_unit_test(test_kvc_f16_vs_reference),
      cmocka_unit_test(test_f16_conversions),
      cmocka_unit_test(test_kvc_matches_forward),
      cmocka_unit_test(test_kvc_rows),
      cmocka_unit_test(test_kvc_out_of_memory),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
