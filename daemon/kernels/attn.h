/* attn.h - streaming attention kernels: softmax, LSSA and LSSAR.
 *
 * The exact math is docs/attention.md, "The math" (Gao & Spratling, softplus
 * attention with re-weighting). Three variants over one interface:
 *   ATTN_SOFTMAX  scaled dot-product attention, online max (flash style)
 *   ATTN_LSSA     length-scaled softplus attention, one pass over the keys
 *   ATTN_LSSAR    LSSA re-weighted by ReLU(N*A - O)^p, two passes
 *
 * Shapes: H query heads, Hkv key/value heads (H % Hkv == 0; query head h
 * reads kv head h / (H / Hkv)), Lq queries, Lk keys, head dimension d for q
 * and k, dv for v and out. Every tensor is a [heads, rows, dim] view with
 * explicit strides in floats and a contiguous last dimension, so callers can
 * pass [L, H, d] (a fused qkv projection), [H, L, d], or a KV cache whose
 * capacity exceeds Lk.
 *
 * Masks. Query i sits at absolute 0-based position t = query_offset + i.
 *   causal: key j is visible iff j <= t, and N_i = t + 1. Every visible key
 *           must exist, so query_offset + Lq > Lk is refused (-TS_EINVAL);
 *           query_offset + Lq < Lk is allowed (later keys are just masked).
 *   full:   every key is visible and N_i = Lk; query_offset only sets the
 *           LSSAR offset rows. With Lk == 0 the output is zero.
 * LSSAR: O_i = 0 for t < offset_rows, else 1.
 *
 * Memory. The tiled kernels never hold an Lq x Lk matrix. Per call they pack
 * K (normalised for LSSA/LSSAR, transposed per key tile) and V (rows padded
 * to a multiple of 16 floats) into one buffer of about Hkv * Lk * (d + dv)
 * floats: the size of the K and V inputs themselves. Per worker they use
 * O(48 * (d + dv + 64)) floats of scratch; LSSAR also keeps the first pass's
 * scores of one 48-query tile, 48 * Lk floats (3 MiB at Lk = 16,384), so that
 * its second pass does no second Q.K, up to ATTN_LSSAR_KEEP_MAX keys; past
 * that it recomputes the scores instead.
 *
 * Inputs must be finite for the result to be defined; values of masked keys
 * never enter the sums (even a masked key's huge V leaves the output alone).
 *
 * Ownership: every pointer is borrowed for the duration of the call; out is
 * written, nothing is retained. The functions are reentrant. */
#ifndef TALLYD_ATTN_H
#define TALLYD_ATTN_H

#include <stddef.h>
#include <stdint.h>

#include "../base/cpu.h"
#include "../base/err.h"
#include "../base/pool.h"

typedef enum attn_variant { ATTN_SOFTMAX = 0, ATTN_LSSA = 1, ATTN_LSSAR = 2 } attn_variant;

typedef struct attn_params {
  attn_variant variant;
  int causal;           /* 1: key j visible to query i iff j <= query_offset + i */
  int64_t query_offset; /* absolute 0-based position of query 0 (>= 0) */
  double p;             /* LSSAR power (> 0), default 15 */
  int offset_rows;      /* LSSAR: O_i = 0 for absolute positions t < offset_rows (default 3) */
  float scale;          /* softmax only: 0 means 1/sqrt(d) */
} attn_params;

/* A [heads, rows, dim] view; element (h, r, c) is data[h*head_stride + r*row_stride + c]. */
typedef struct attn_tensor {
  const float *data;
  int64_t head_stride, row_stride;
} attn_tensor;

typedef struct attn_out {
  float *data;
  int64_t head_stride, row_stride;
} attn_out;

#define ATTN_EPS 1e-8             /* the eps of A = a / (Z + eps) and W = b / (sum b + eps) */
#define ATTN_NORM_FLOOR 1e-12     /* QK-norm: x / max(||x||, 1e-12) */
#define ATTN_LSSAR_KEEP_MAX 65536 /* keys up to which LSSAR keeps its scores (12 MiB a worker) */

/* Defaults: softmax, causal, offset 0, p 15, offset_rows 3, scale 1/sqrt(d). */
attn_params attn_params_default(attn_variant v);
const char *attn_variant_name(attn_variant v);

/* The tiled kernel on the best path for this CPU (cpu_best_path), its work
 * split over (head, query tile) on pool (NULL: serial). 0 or a negative
 * ts_status (-TS_EINVAL on bad arguments, -TS_ENOMEM). */
int attn_forward(pool_t *pool, const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk,
                 int d, int dv, attn_tensor q, attn_tensor k, attn_tensor v, attn_out out,
                 ts_err *err);

/* The same on a chosen path (tests compare paths). A path this CPU cannot run
 * (AVX2 without the feature, NEON off AArch64) is refused with -TS_EINVAL; a
 * path without tile kernels of its own runs its fallback's (AVX-512: AVX2). */
int attn_forward_path(cpu_path path, pool_t *pool, const attn_params *prm, int H, int Hkv,
                      int64_t Lq, int64_t Lk, int d, int dv, attn_tensor q, attn_tensor k,
                      attn_tensor v, attn_out out, ts_err *err);

/* The argument checks every entry point applies (attn_cuda_forward too):
 * 0 or -TS_EINVAL with a message naming what is wrong. */
int attn_check_args(const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk, int d, int dv,
                    attn_tensor q, attn_tensor k, attn_tensor v, attn_out out, ts_err *err);

/* The plain scalar reference the tests trust: one query row at a time,
 * streaming over the keys in double precision (online max for softmax, one
 * pass for LSSA, two for LSSAR). Slow; never used for serving. */
int attn_reference(const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk, int d, int dv,
                   attn_tensor q, attn_tensor k, attn_tensor v, attn_out out, ts_err *err);

/* ---- the packed KV cache (decode) ----------------------------------------
 * One layer's keys and values for Hkv heads, kept in the layout the tile
 * kernels read, so that attention over it packs nothing: a decode step costs
 * one pass over the cache, not a copy of it and then a pass. Rows are grouped
 * in tiles of 64 (ATTN_BK), tile-major so that growing the cache is a
 * realloc that moves nothing inside:
 *   k     [cap/64][Hkv][d][64]   raw keys, transposed per tile
 *   kinv  [cap/64][Hkv][64]      1 / max(|k_j|, 1e-12): LSSA and LSSAR read
 *                                q . k_j * kinv_j, the normalised key's score,
 *                                so one cache serves every variant
 *   v     [cap/64][Hkv][64][dvp] values, dvp = dv rounded up to 16, zero-padded
 * The cache does not know its length: the caller writes rows, then says how
 * many keys a call sees (rows written but not yet counted are invisible, which
 * is how a failed step leaves a sequence as it was). Not thread-safe; the
 * forward calls only read it. */
typedef struct attn_kvc {
  int Hkv, d, dv, dvp;
  int f16;     /* 1: k and v hold IEEE float16 (half the bytes to read a step) */
  int64_t cap; /* rows of room: 0, or a power of two >= 64 */
  void *k, *v; /* float, or uint16_t when f16 */
  float *kinv;
} attn_kvc;

#define ATTN_KVC_BLOCK 512                /* keys per work item of the decode split */
#define ATTN_KVC_KEEP_BYTES (64ull << 20) /* LSSAR decode keeps pass 1's scores up to this */

void attn_kvc_init(attn_kvc *c, int Hkv, int d, int dv);
/* The same cache with keys and values stored as float16 (rounded to nearest
 * even when written; kinv is the norm of the stored key). The kernels
 * convert as they read and sum in float, as for a float32 cache. */
void attn_kvc_init_f16(attn_kvc *c, int Hkv, int d, int dv);
void attn_kvc_free(attn_kvc *c); /* frees the arrays; c may be reused after attn_kvc_init */
/* Room for `rows` rows (capacity doubles from 64; new rows zeroed). On
 * failure the cache keeps its rows and capacity. */
int attn_kvc_reserve(attn_kvc *c, int64_t rows, ts_err *err);
int64_t attn_kvc_cap_for(int64_t rows);
/* Rows row0..row0+n-1 from [Hkv, n, d] and [Hkv, n, dv] views (row r of
 * the views becomes row row0 + r); row0 + n <= cap. */
void attn_kvc_write(attn_kvc *c, int64_t row0, int64_t n, attn_tensor k, attn_tensor v);
/* Row `row` of kv head h back out (tests): k[d], v[dv]. */
void attn_kvc_read(const attn_kvc *c, int64_t row, int h, float *k, float *v);
/* dst (same shape and type, initialised) gets src's first `rows` rows. */
int attn_kvc_copy(attn_kvc *dst, const attn_kvc *src, int64_t rows, ts_err *err);
/* Bytes the allocator holds for the arrays (tl_held), now or at `rows` rows. */
size_t attn_kvc_bytes(const attn_kvc *c);
size_t attn_kvc_bytes_for(int Hkv, int d, int dv, int f16, int64_t rows);
/* float <-> IEEE float16, round to nearest even (what a float16 cache holds). */
uint16_t attn_f2h(float f);
float attn_h2f(uint16_t h);

/* Attention of Lq queries (q: [H, Lq, d] view) over the cache's first Lk
 * rows, out [H, Lq, dv]; masks, offsets and variants as attn_forward (the
 * same argument checks, plus Lk <= cap). When all query heads of a kv head
 * times Lq fit one tile (H / Hkv * Lq <= 48: decoding) the work is split
 * over (kv head, 512-key block) and merged (log-sum-exp for softmax, sums
 * for LSSA, a merged row max and Z between LSSAR's two passes); the split
 * depends on Lk only, so results do not depend on the pool. More queries
 * run the tiled driver on the cache in place. Memory per call: partial
 * results, O(Hkv * Lk / 512 * 48 * dv) floats, and for LSSAR decoding its
 * pass-1 scores (Hkv * Lk * H/Hkv * Lq floats) up to ATTN_KVC_KEEP_BYTES. */
int attn_kvc_forward(pool_t *pool, const attn_params *prm, int H, int64_t Lq, int64_t Lk,
                     attn_tensor q, const attn_kvc *kv, attn_out out, ts_err *err);
int attn_kvc_forward_path(cpu_path path, pool_t *pool, const attn_params *prm, int H, int64_t Lq,
                          int64_t Lk, attn_tensor q, const attn_kvc *kv, attn_out out, ts_err *err);

#endif
