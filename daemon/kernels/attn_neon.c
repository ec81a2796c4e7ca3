/* attn_neon.c - the AArch64 NEON tile kernels of the tiled attention driver.
 *
 * Kept deliberately plain: the two GEMM tiles (q.k and p.v) are
 * register-blocked 4 rows x 16 columns with vfmaq_n_f32; the row transforms
 * (exp, softplus, LSSAR weight) call libm per element, exactly as the scalar
 * kernels in attn.c do, since per (query, key) pair they cost one or two
 * transcendental calls beside 2 d multiply-adds. Compiles to nothing off
 * AArch64; chosen at run time by cpu_best_path(). */
#include "attn_kern.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>

static void ne_qk(const float *q, int rows, int d, const float *kt, int ncols, float *s) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    int mr = rows - r0 < 4 ? rows - r0 : 4;
    for (int j = 0; j < ncols; j += 16) {
      float32x4_t a[4][4];
      for (int r = 0; r < 4; r++)
        for (int x = 0; x < 4; x++) a[r][x] = vdupq_n_f32(0.0f);
      for (int c = 0; c < d; c++) {
        const float *kc = kt + (int64_t)c * ATTN_BK + j;
        float32x4_t k0 = vld1q_f32(kc), k1 = vld1q_f32(kc + 4), k2 = vld1q_f32(kc + 8),
                    k3 = vld1q_f32(kc + 12);
        for (int r = 0; r < mr; r++) {
          float b = q[(int64_t)(r0 + r) * d + c];
          a[r][0] = vfmaq_n_f32(a[r][0], k0, b);
          a[r][1] = vfmaq_n_f32(a[r][1], k1, b);
          a[r][2] = vfmaq_n_f32(a[r][2], k2, b);
          a[r][3] = vfmaq_n_f32(a[r][3], k3, b);
        }
      }
      for (int r = 0; r < mr; r++)
        for (int x = 0; x < 4; x++) vst1q_f32(s + (int64_t)(r0 + r) * ATTN_BK + j + 4 * x, a[r][x]);
    }
  }
}

static void ne_pv(const float *p, int rows, int nk, const float *v, int dvp, float *o) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    int mr = rows - r0 < 4 ? rows - r0 : 4;
    for (int c = 0; c < dvp; c += 16) {
      float32x4_t a[4][4];
      for (int r = 0; r < mr; r++)
        for (int x = 0; x < 4; x++) a[r][x] = vld1q_f32(o + (int64_t)(r0 + r) * dvp + c + 4 * x);
      for (int j = 0; j < nk; j++) {
        const float *vj = v + (int64_t)j * dvp + c;
        float32x4_t v0 = vld1q_f32(vj), v1 = vld1q_f32(vj + 4), v2 = vld1q_f32(vj + 8),
                    v3 = vld1q_f32(vj + 12);
        for (int r = 0; r < mr; r++) {
          float b = p[(int64_t)(r0 + r) * ATTN_BK + j];
          a[r][0] = vfmaq_n_f32(a[r][0], v0, b);
          a[r][1] = vfmaq_n_f32(a[r][1], v1, b);
          a[r][2] = vfmaq_n_f32(a[r][2], v2, b);
          a[r][3] = vfmaq_n_f32(a[r][3], v3, b);
        }
      }
      for (int r = 0; r < mr; r++)
        for (int x = 0; x < 4; x++) vst1q_f32(o + (int64_t)(r0 + r) * dvp + c + 4 * x, a[r][x]);
    }
  }
}

static float ne_rowmax(const float *s, int nv) {
  float m = -INFINITY;
  for (int j = 0; j < nv; j++) m = s[j] > m ? s[j] : m;
  return m;
}

static float ne_softplus(float x) {
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

static double ne_row_exp(float *s, int nv, int ncols, float m) {
  double sum = 0;
  for (int j = 0; j < nv; j++) sum += s[j] = expf(s[j] - m);
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

static double ne_row_softplus(float *s, int nv, int ncols) {
  double sum = 0;
  for (int j = 0; j < nv; j++) sum += s[j] = ne_softplus(s[j]);
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

static double ne_row_lssar(float *s, int nv, int ncols, const attn_rowc *c) {
  double sum = 0;
  for (int j = 0; j < nv; j++) {
    float y = (ne_softplus(s[j]) * c->c1 - c->o) * c->inv_xmax;
    sum += s[j] = y >= c->ythr ? powf(y, c->p) : 0.0f;
  }
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

static double ne_row_lssar_sp(float *s, int nv, int ncols, const attn_rowc *c) {
  double sum = 0;
  for (int j = 0; j < nv; j++) {
    float y = (s[j] * c->c1 - c->o) * c->inv_xmax;
    sum += s[j] = y >= c->ythr ? powf(y, c->p) : 0.0f;
  }
  for (int j = nv; j < ncols; j++) s[j] = 0.0f;
  return sum;
}

const attn_kern attn__kern_neon = {"neon",        ne_qk,           ne_pv,        ne_rowmax,
                                   ne_row_exp,    ne_row_softplus, ne_row_lssar, ne_row_lssar_sp,
                                   attn__sc_qk_h, attn__sc_pv_h};

#endif
