/* sgemm.c - the scalar reference product, bias add, and the dispatcher that
 * picks a SIMD path once and splits large products over the pool.
 *
 * The split hands each participant one contiguous slab (rows of C when
 * M > N, columns otherwise) and calls a single-threaded path on it. Each
 * slab packs its own panels, so we make exactly as many slabs as there are
 * threads: more, smaller slabs would repack the shared operand more often
 * than they gain in balance. */
#include "sgemm.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "../base/mem.h"

/* Products smaller than this many multiply-adds run on the caller alone:
 * handing work to another thread costs more than it saves. */
#define SG_PARALLEL_MIN ((int64_t)1 << 18)
/* A product of at most SG_FEW_ROWS rows streams B once (the few-row kernels
 * read each chunk of B for all rows): its cost is reading B, so it goes to
 * the pool once B is SG_PARALLEL_MIN_FEW_BYTES or more, split by columns.
 * A decode step's weights come from memory, not cache, and one thread does
 * not reach the memory's bandwidth (measured on 2 cores: 1 x 2304 x 768
 * from memory, 9.8 GB/s on one thread; two threads read 19.5 GB/s). */
#define SG_FEW_ROWS 8
#define SG_PARALLEL_MIN_FEW_BYTES ((int64_t)1 << 20)

void sg_gemm_ref(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  for (int64_t i = 0; i < M; i++) {
    for (int64_t j = 0; j < N; j++) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; k++) {
        float b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += A[i * lda + k] * b;
      }
      float *c = &C[i * ldc + j];
      *c = beta == 0.0f ? acc : acc + beta * *c;
    }
  }
}

void sg_add_bias(int64_t M, int64_t N, float *C, int64_t ldc, const float *bias) {
  for (int64_t i = 0; i < M; i++) {
    float *c = C + i * ldc;
    for (int64_t j = 0; j < N; j++) c[j] += bias[j];
  }
}

/* ---- the per-thread packing buffer -----------------------------------------
 * A product's panels (a few hundred KiB to 3 MiB) used to be malloc'ed and
 * freed per call: above glibc's mmap threshold that is an mmap, and the
 * kernel zeroing fresh pages cost as much as a small product and made its
 * time vary several-fold between calls. Each thread now keeps one buffer,
 * grown as needed and freed when the thread ends (pthread key destructor). */

typedef struct sg_packbuf {
  size_t cap; /* floats usable after alignment */
  void *raw;
} sg_packbuf;

static pthread_key_t g_pack_key;
static int g_pack_key_ok;
static pthread_once_t g_pack_once = PTHREAD_ONCE_INIT;

static void pack_free(void *v) {
  sg_packbuf *b = v;
  tl_free(b->raw);
  tl_free(b);
}

static void pack_key_init(void) {
  g_pack_key_ok = pthread_key_create(&g_pack_key, pack_free) == 0;
}

float *sg__pack_buffer(size_t floats) {
  pthread_once(&g_pack_once, pack_key_init);
  if (!g_pack_key_ok) return NULL;
  sg_packbuf *b = pthread_getspecific(g_pack_key);
  if (!b) {
    b = tl_calloc(1, sizeof *b);
    if (!b) return NULL;
    if (pthread_setspecific(g_pack_key, b) != 0) {
      tl_free(b);
      return NULL;
    }
  }
  if (b->cap < floats) {
    void *raw = tl_malloc((floats + 16) * sizeof(float));
    if (!raw) return NULL;
    tl_free(b->raw);
    b->raw = raw;
    b->cap = floats;
  }
  return (float *)(((uintptr_t)b->raw + 63) & ~(uintptr_t)63);
}

static const sg_ops g_scalar = {"scalar", sg_gemm_ref, sg_gemm_ref, 6, 16};

static _Thread_local int tl_row_invariant;

int sg_row_invariant(int on) {
  int was = tl_row_invariant;
  tl_row_invariant = on != 0;
  return was;
}

#if defined(__x86_64__)
extern const sg_ops sg__ops_avx2;   /* sgemm_avx2.c */
extern const sg_ops sg__ops_avx512; /* sgemm_avx512.c */
#endif
#if defined(__aarch64__)
extern const sg_ops sg__ops_neon; /* sgemm_neon.c */
#endif

const sg_ops *sg_ops_for(cpu_path p) {
  switch (p) {
    case CPU_SCALAR: return &g_scalar;
#if defined(__x86_64__)
    case CPU_AVX2: return &sg__ops_avx2;
    case CPU_AVX512: return &sg__ops_avx512;
#endif
#if defined(__aarch64__)
    case CPU_NEON: return &sg__ops_neon;
#endif
    default: return NULL;
  }
}

static const sg_ops *g_ops; /* chosen on first use; every thread computes the same */

const sg_ops *sg_ops_active(void) {
  const sg_ops *o = __atomic_load_n(&g_ops, __ATOMIC_ACQUIRE);
  if (o) return o;
  for (cpu_path p = cpu_best_path(); !(o = sg_ops_for(p)); p = cpu_path_fallback(p)) {
  }
  __atomic_store_n(&g_ops, o, __ATOMIC_RELEASE);
  return o;
}

typedef struct sg_split {
  sg_fn fn;
  int trans_b, by_cols;
  int64_t M, N, K, lda, ldb, ldc, unit;
  const float *A, *B;
  float beta;
  float *C;
} sg_split;

static void sg_split_run(void *arg, int64_t b, int64_t e) {
  const sg_split *s = arg;
  if (s->by_cols) {
    int64_t j0 = b * s->unit, j1 = e * s->unit < s->N ? e * s->unit : s->N;
    const float *B = s->trans_b ? s->B + j0 * s->ldb : s->B + j0;
    s->fn(s->trans_b, s->M, j1 - j0, s->K, s->A, s->lda, B, s->ldb, s->beta, s->C + j0, s->ldc);
  } else {
    int64_t i0 = b * s->unit, i1 = e * s->unit < s->M ? e * s->unit : s->M;
    s->fn(s->trans_b, i1 - i0, s->N, s->K, s->A + i0 * s->lda, s->lda, s->B, s->ldb, s->beta,
          s->C + i0 * s->ldc, s->ldc);
  }
}

void sg_gemm(pool_t *pool, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
             int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  const sg_ops *ops = sg_ops_active();
  sg_fn fn = tl_row_invariant ? ops->gemm_inv : ops->gemm;
  int nt = pool_threads(pool);
  if (M <= 0 || N <= 0) return;
  double macs = (double)M * (double)N * (double)K;
  if (!pool || nt <= 1 ||
      (M <= SG_FEW_ROWS ? (double)N * (double)K * 4.0 < (double)SG_PARALLEL_MIN_FEW_BYTES
                        : macs <= (double)SG_PARALLEL_MIN)) {
    fn(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  sg_split s = {fn, trans_b, N >= M, M, N, K, lda, ldb, ldc, 0, A, B, beta, C};
  /* Units match the path's register block so slab edges do not create
   * extra partial tiles. */
  s.unit = s.by_cols ? ops->nr : ops->mr;
  int64_t units = ((s.by_cols ? N : M) + s.unit - 1) / s.unit;
  int64_t grain = (units + nt - 1) / nt;
  pool_parallel_for(pool, units, grain, sg_split_run, &s);
}
