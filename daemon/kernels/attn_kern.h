/* attn_kern.h - internal to the attention kernels: the tile sizes, the
 * per-path tile kernel table that attn.c's driver calls, and the per-row
 * constants of the LSSAR weight pass. Included by attn.c, attn_avx2.c and
 * attn_neon.c only; attn.h is the public face. */
#ifndef TALLYD_ATTN_KERN_H
#define TALLYD_ATTN_KERN_H

#include <stdint.h>

#include "../base/cpu.h"

/* Tiles: ATTN_BQ query rows by ATTN_BK keys. Q tile [rows][d] (row stride d),
 * packed K tile [d][ATTN_BK], scores/weights S [rows][ATTN_BK], packed V
 * [keys][dvp] with dvp % 16 == 0, accumulator O [rows][dvp]. */
#define ATTN_BQ 48
#define ATTN_BK 64

typedef struct attn_rowc { /* per-row constants of the LSSAR weight pass */
  float c1;                /* N_i / (Z_i + eps) */
  float o;                 /* O_i */
  float inv_xmax;          /* 1 / x_max */
  float ythr;              /* y below this has y^p < 1e-30 relative to the row max: weight 0 */
  float p;                 /* the power */
  int ip;                  /* p as an integer when p is one in [1, 64], else 0 */
} attn_rowc;

typedef struct attn_kern {
  const char *name;
  /* S[r][0..ncols) = Q[r] . Kt[:, 0..ncols) for r < rows; ncols % 16 == 0. */
  void (*qk)(const float *q, int rows, int d, const float *kt, int ncols, float *s);
  /* O[r][0..dvp) += sum_{j < nk} P[r][j] V[j][0..dvp) for r < rows. */
  void (*pv)(const float *p, int rows, int nk, const float *v, int dvp, float *o);
  /* Largest of s[0..nv); -INFINITY when nv == 0. */
  float (*rowmax)(const float *s, int nv);
  /* In place over s[0..nv): exp(s - m), softplus(s), or the LSSAR weight
   * (y = (softplus(s) c1 - o) inv_xmax; y >= ythr ? y^p : 0); then zeros
   * s[nv..ncols). Returns the sum of what it wrote. */
  double (*row_exp)(float *s, int nv, int ncols, float m);
  double (*row_softplus)(float *s, int nv, int ncols);
  double (*row_lssar)(float *s, int nv, int ncols, const attn_rowc *c);
  /* row_lssar on s that already holds softplus(s) (LSSAR's kept pass-1 tiles). */
  double (*row_lssar_sp)(float *s, int nv, int ncols, const attn_rowc *c);
  /* qk and pv over a float16 cache's tiles (attn_kvc with f16): the same
   * sums, each element converted to float as it is read. */
  void (*qk_h)(const float *q, int rows, int d, const uint16_t *kt, int ncols, float *s);
  void (*pv_h)(const float *p, int rows, int nk, const uint16_t *v, int dvp, float *o);
} attn_kern;

/* The scalar float16 tile kernels (NEON's table uses them too). */
void attn__sc_qk_h(const float *q, int rows, int d, const uint16_t *kt, int ncols, float *s);
void attn__sc_pv_h(const float *p, int rows, int nk, const uint16_t *v, int dvp, float *o);
/* Whether this CPU converts float16 in hardware (x86 F16C; the AVX2 table's
 * qk_h and pv_h need it). */
int attn__has_f16c(void);

extern const attn_kern attn__kern_scalar;
#if defined(__x86_64__)
extern const attn_kern attn__kern_avx2;
#endif
#if defined(__aarch64__)
extern const attn_kern attn__kern_neon;
#endif

/* The table for path p, or NULL when this build has none for it (the
 * vm_ops_for / sg_ops_for convention of cpu.h). */
const attn_kern *attn_kern_for(cpu_path p);

#endif
