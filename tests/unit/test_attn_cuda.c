/* test_attn_cuda.c - the CUDA attention kernels against the CPU reference.
 *
 * Built without CUDA (no TALLYD_CUDA) or run where no GPU answers, every test
 * reports SKIPPED. With a GPU: attn_cuda_forward against attn_reference for
 * softmax, LSSA and LSSAR (p = 15 and 3), causal and full masks, GQA, query
 * offsets (a KV-cache chunk), odd lengths, head dims 32/64/80/128 with dv != d,
 * and both memory layouts; plus the refusals the CPU entry points make. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../daemon/kernels/attn.h"
#ifdef TALLYD_CUDA
#include "../../daemon/kernels/attn_cuda.h"
#endif

#ifdef TALLYD_CUDA
static uint64_t rng = 0x243F6A8885A308D3ull;
static float urand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (float)((double)(rng >> 11) / (double)(1ull << 52) - 1.0);
}

typedef struct gshape {
  int H, Hkv;
  int64_t Lq, Lk;
  int d, dv, causal;
  int64_t qoff;
  int interleaved;
} gshape;

static const gshape gshapes[] = {
    {2, 1, 1, 1, 64, 64, 1, 0, 0},       {3, 3, 7, 7, 32, 32, 1, 0, 1},
    {4, 2, 63, 63, 64, 48, 1, 0, 0},     {4, 1, 65, 65, 80, 80, 1, 0, 1},
    {2, 2, 65, 130, 128, 128, 1, 65, 0}, {6, 3, 7, 200, 64, 72, 1, 193, 1},
    {2, 1, 1, 1000, 64, 64, 1, 999, 0},  {1, 1, 600, 600, 64, 64, 1, 0, 0},
    {2, 1, 63, 65, 32, 40, 0, 0, 0},     {4, 4, 65, 7, 80, 64, 0, 5, 1},
    {3, 1, 50, 97, 17, 5, 1, 47, 0},
};

static void view(int inter, int heads, int64_t rows, int dim, int64_t *hs, int64_t *rs) {
  *hs = inter ? dim : rows * dim;
  *rs = inter ? (int64_t)heads * dim : dim;
}

static void test_cuda_vs_reference(void **state) {
  (void)state;
  if (!attn_cuda_available()) {
    print_message("skip: no CUDA device (attn_cuda_available() is false)\n");
    skip();
  }
  for (size_t si = 0; si < sizeof gshapes / sizeof *gshapes; si++) {
    const gshape *S = &gshapes[si];
    size_t nq = (size_t)S->H * S->Lq * S->d, nk = (size_t)S->Hkv * S->Lk * S->d,
           nv = (size_t)S->Hkv * S->Lk * S->dv, no = (size_t)S->H * S->Lq * S->dv;
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nv * 4), *ref = malloc(no * 4),
          *gpu = malloc(no * 4);
    for (size_t i = 0; i < nq; i++) q[i] = 2 * urand();
    for (size_t i = 0; i < nk; i++) k[i] = urand();
    for (size_t i = 0; i < nv; i++) v[i] = urand();
    attn_tensor tq = {q, 0, 0}, tk = {k, 0, 0}, tv = {v, 0, 0};
    attn_out tr = {ref, 0, 0}, tg = {gpu, 0, 0};
    view(S->interleaved, S->H, S->Lq, S->d, &tq.head_stride, &tq.row_stride);
    view(S->interleaved, S->Hkv, S->Lk, S->d, &tk.head_stride, &tk.row_stride);
    view(S->interleaved, S->Hkv, S->Lk, S->dv, &tv.head_stride, &tv.row_stride);
    view(S->interleaved, S->H, S->Lq, S->dv, &tr.head_stride, &tr.row_stride);
    tg.head_stride = tr.head_stride;
    tg.row_stride = tr.row_stride;
    for (int var = 0; var < 4; var++) {
      attn_params prm = attn_params_default(var == 3 ? ATTN_LSSAR : (attn_variant)var);
      if (var == 3) prm.p = 3;
      prm.causal = S->causal;
      prm.query_offset = S->qoff;
      ts_err err;
      assert_int_equal(
          attn_reference(&prm, S->H, S->Hkv, S->Lq, S->Lk, S->d, S->dv, tq, tk, tv, tr, &err), 0);
      int rc =
          attn_cuda_forward(&prm, S->H, S->Hkv, S->Lq, S->Lk, S->d, S->dv, tq, tk, tv, tg, &err);
      if (rc) fail_msg("shape %zu: %s", si, err.msg);
      double worst = 0;
      for (size_t i = 0; i < no; i++) {
        double e = fabs(gpu[i] - ref[i]) / (1e-4 + 1e-4 * fabs(ref[i]));
        if (!(e <= worst)) worst = isnan(e) ? INFINITY : e;
      }
      if (worst > 1)
        fprintf(stderr, "shape %zu %s p=%g: GPU error ratio %g\n", si,
                attn_variant_name(prm.variant), prm.p, worst);
      assert_true(worst <= 1);
    }
    free(q);
    free(k);
    free(v);
    free(ref);
    free(gpu);
  }
}

static void test_cuda_bad_arguments(void **state) {
  (void)state;
  if (!attn_cuda_available()) {
    print_message("skip: no CUDA device (attn_cuda_available() is false)\n");
    skip();
  }
  float buf[64 * 8] = {0};
  attn_tensor t = {buf, 64, 64};
  attn_out o = {buf, 64, 64};
  attn_params prm = attn_params_default(ATTN_LSSAR);
  ts_err err;
  assert_int_equal(attn_cuda_forward(&prm, 3, 2, 1, 1, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  prm.query_offset = 4;
  assert_int_equal(attn_cuda_forward(&prm, 1, 1, 2, 5, 64, 64, t, t, t, o, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "need 6 keys"));
}
#else
static void test_cuda_vs_reference(void **state) {
  (void)state;
  print_message("skip: built without CUDA (make CUDA=1)\n");
  skip();
}
static void test_cuda_bad_arguments(void **state) {
  (void)state;
  print_message("skip: built without CUDA (make CUDA=1)\n");
  skip();
}
#endif

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_cuda_vs_reference),
      cmocka_unit_test(test_cuda_bad_arguments),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
