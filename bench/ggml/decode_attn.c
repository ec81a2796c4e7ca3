/* bench/ggml/decode_attn.c - the baseline of bench_decode_attn: ggml's CPU
 * flash attention (ggml_flash_attn_ext) for one query per head against a
 * float16 KV cache (llama.cpp's default cache type), 12 heads, d = 64, at
 * kv = 4,096 and 16,384. Built by bench/ggml_attn.sh against a ggml source
 * snapshot given by GGML_SRC (never part of this repository); not built by
 * make. Prints the median of R computes, GFLOP/s counted as
 * bench_decode_attn counts them (4 d per key and head).
 *
 *   decode_attn THREADS ROUNDS */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2, rounds = argc > 2 ? atoi(argv[2]) : 15;
  const int H = 12, d = 64;
  const int kvs[2] = {4096, 16384};
  printf(
      "ggml %s flash_attn_ext: 1 query x %d heads, d = %d, float16 K and V, %d threads, "
      "median of %d\n",
      "CPU", H, d, threads, rounds);
  for (int ki = 0; ki < 2; ki++) {
    int L = kvs[ki];
    struct ggml_init_params ip = {(size_t)256 << 20, NULL, false};
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_tensor *q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, 1, H);
    struct ggml_tensor *k = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, L, H);
    struct ggml_tensor *v = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, L, H);
    float *qd = (float *)q->data;
    ggml_fp16_t *kd = (ggml_fp16_t *)k->data, *vd = (ggml_fp16_t *)v->data;
    uint64_t s = 88172645463325252ull;
    for (int i = 0; i < d * H; i++) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      qd[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 4 - 2);
    }
    for (long i = 0; i < (long)d * L * H; i++) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      kd[i] = ggml_fp32_to_fp16((float)((double)(s >> 11) / 9007199254740992.0 * 2 - 1));
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      vd[i] = ggml_fp32_to_fp16((float)((double)(s >> 11) / 9007199254740992.0 * 2 - 1));
    }
    struct ggml_tensor *out = ggml_flash_attn_ext(ctx, q, k, v, NULL, 0.125f, 0.0f, 0.0f);
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_graph_compute_with_ctx(ctx, gf, threads); /* warm */
    double *t = malloc(sizeof(double) * (size_t)rounds);
    for (int r = 0; r < rounds; r++) {
      double t0 = now();
      ggml_graph_compute_with_ctx(ctx, gf, threads);
      t[r] = now() - t0;
    }
    qsort(t, (size_t)rounds, sizeof *t, cmp_d);
    double m = t[rounds / 2], flop = 4.0 * H * (double)L * d, bytes = 2.0 * 2 * d * (double)L * H;
    printf("ggml     softmax %7d | %8.3f ms %8.1f GFLOP/s %7.1f GB/s\n", L, m * 1e3,
           flop / m * 1e-9, bytes / m * 1e-9);
    free(t);
    ggml_free(ctx);
  }
  return 0;
}
