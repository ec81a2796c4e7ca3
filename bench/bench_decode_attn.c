/* bench_decode_attn.c - decode attention alone: one query per head against a
 * long KV cache, the packed-cache path beside the re-packing path.
 *
 * For each kv length (default 4,096 and 16,384), 12 heads of dimension 64
 * (--heads, --dim) and each variant (softmax, lssa, lssar): the query at
 * position kv - 1 attends to kv keys
 *   packed   attn_kvc_forward over an attn_kvc (the cache tf_seq keeps):
 *            nothing is packed per call
 *   f16      the same over a float16 attn_kvc (kv_cache_dtype "float16"):
 *            half the bytes to read
 *   repack   attn_forward over the same keys held as [kv, H, d] rows (the
 *            layout the cache had before): every call packs all of K and V
 * R rounds (--rounds, default 15) alternate the three so the machine's load
 * falls on all alike; the median of each is printed with GFLOP/s counted as
 * 4 d per (query, key) pair per head (2 d for q.k, 2 d for p.v), the
 * cache's bytes over the time (GB/s), and the ratio repack / packed.
 * ggml's CPU flash attention is not built here; the yardstick for it
 * on this machine class is printed instead: ~20 GFLOP/s at kv = 4,096 (0.6
 * ms, with a float16 cache), so the aim of 1.5x is >= 30.
 *
 *   build/bench/bench_decode_attn [--threads T] [--rounds R] [--heads H]
 *                                 [--dim D] [--kv N[,N...]] [--variants v,..] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../daemon/base/cpu.h"
#include "../daemon/base/pool.h"
#include "../daemon/kernels/attn.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_d);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t rs = 0x243F6A8885A308D3ull;
static float frand(void) {
  rs ^= rs << 13;
  rs ^= rs >> 7;
  rs ^= rs << 17;
  return (float)((double)(rs >> 11) / (double)(1ull << 52) - 1.0);
}

int main(int argc, char **argv) {
  int threads = 0, rounds = 15, H = 12, d = 64;
  int64_t kvs[8] = {4096, 16384};
  int nkv = 2;
  const char *variants = "softmax,lssa,lssar";
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--threads") && v)
      threads = atoi(argv[++i]);
    else if (!strcmp(a, "--rounds") && v)
      rounds = atoi(argv[++i]);
    else if (!strcmp(a, "--heads") && v)
      H = atoi(argv[++i]);
    else if (!strcmp(a, "--dim") && v)
      d = atoi(argv[++i]);
    else if (!strcmp(a, "--variants") && v)
      variants = argv[++i];
    else if (!strcmp(a, "--kv") && v) {
      nkv = 0;
      for (char *p = argv[++i]; *p && nkv < 8;) {
        kvs[nkv++] = strtoll(p, &p, 10);
        if (*p == ',') p++;
      }
    } else {
      fprintf(stderr,
              "usage: %s [--threads T] [--rounds R] [--heads H] [--dim D] [--kv N,N] "
              "[--variants softmax,lssa,lssar]\n",
              argv[0]);
      return 2;
    }
  }
  if (rounds < 1 || H < 1 || d < 1) return 2;
  pool_t *pool = NULL;
  if (pool_create(&pool, threads, 0)) return 1;
  printf(
      "decode attention: 1 query x %d heads, d = %d, %d threads, %s kernels, median of %d "
      "alternating rounds\n",
      H, d, pool_threads(pool), cpu_path_name(cpu_best_path()), rounds);
  printf("%-8s %7s | %9s %8s %7s | %8s %8s %7s | %9s %8s | %6s | ggml yardstick\n", "variant", "kv",
         "packed ms", "GFLOP/s", "GB/s", "f16 ms", "GFLOP/s", "GB/s", "repack ms", "GFLOP/s",
         "ratio");
  for (int ki = 0; ki < nkv; ki++) {
    int64_t L = kvs[ki], E = (int64_t)H * d;
    float *k = malloc(sizeof(float) * (size_t)(L * E)),
          *v = malloc(sizeof(float) * (size_t)(L * E));
    float *q = malloc(sizeof(float) * (size_t)E), *out = malloc(sizeof(float) * (size_t)E);
    if (!k || !v || !q || !out) return 1;
    for (int64_t i = 0; i < L * E; i++) k[i] = frand(), v[i] = frand();
    for (int64_t i = 0; i < E; i++) q[i] = 2 * frand();
    attn_tensor tk = {k, d, E}, tv = {v, d, E}, tq = {q, d, E};
    attn_out to = {out, d, E};
    attn_kvc c, ch;
    ts_err err;
    attn_kvc_init(&c, H, d, d);
    attn_kvc_init_f16(&ch, H, d, d);
    if (attn_kvc_reserve(&c, L, &err) || attn_kvc_reserve(&ch, L, &err)) return 1;
    attn_kvc_write(&c, 0, L, tk, tv);
    attn_kvc_write(&ch, 0, L, tk, tv);
    double flop = 4.0 * H * (double)L * d, bytes = 4.0 * (double)L * H * (2.0 * d + 1),
           hbytes = (double)L * H * (4.0 * d + 4);
    for (const char *vp = variants; *vp;) {
      const char *e = strchr(vp, ',');
      size_t n = e ? (size_t)(e - vp) : strlen(vp);
      attn_variant var = ATTN_SOFTMAX;
      if (n == 4 && !strncmp(vp, "lssa", 4))
        var = ATTN_LSSA;
      else if (n == 5 && !strncmp(vp, "lssar", 5))
        var = ATTN_LSSAR;
      else if (!(n == 7 && !strncmp(vp, "softmax", 7))) {
        fprintf(stderr, "unknown variant %.*s\n", (int)n, vp);
        return 2;
      }
      vp = e ? e + 1 : vp + n;
      attn_params prm = attn_params_default(var);
      prm.query_offset = L - 1;
      double *tp = malloc(sizeof(double) * (size_t)rounds),
             *tr = malloc(sizeof(double) * (size_t)rounds),
             *th = malloc(sizeof(double) * (size_t)rounds);
      /* warm both once */
      if (attn_kvc_forward(pool, &prm, H, 1, L, tq, &c, to, &err) ||
          attn_kvc_forward(pool, &prm, H, 1, L, tq, &ch, to, &err) ||
          attn_forward(pool, &prm, H, H, 1, L, d, d, tq, tk, tv, to, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
      }
      for (int r = 0; r < rounds; r++) {
        double t0 = now();
        attn_kvc_forward(pool, &prm, H, 1, L, tq, &c, to, &err);
        double t1 = now();
        attn_forward(pool, &prm, H, H, 1, L, d, d, tq, tk, tv, to, &err);
        double t2 = now();
        attn_kvc_forward(pool, &prm, H, 1, L, tq, &ch, to, &err);
        double t3 = now();
        tp[r] = t1 - t0;
        tr[r] = t2 - t1;
        th[r] = t3 - t2;
      }
      double mp = median(tp, rounds), mr = median(tr, rounds), mh = median(th, rounds);
      printf("%-8s %7lld | %9.3f %8.1f %7.1f | %8.3f %8.1f %7.1f | %9.3f %8.1f | %5.1fx | %s\n",
             attn_variant_name(var), (long long)L, mp * 1e3, flop / mp * 1e-9, bytes / mp * 1e-9,
             mh * 1e3, flop / mh * 1e-9, hbytes / mh * 1e-9, mr * 1e3, flop / mr * 1e-9, mr / mp,
             var == ATTN_SOFTMAX && L == 4096 ? "~20 GFLOP/s (0.6 ms), aim >= 30" : "");
      free(tp);
      free(tr);
      free(th);
    }
    attn_kvc_free(&c);
    attn_kvc_free(&ch);
    free(k);
    free(v);
    free(q);
    free(out);
  }
  pool_destroy(pool);
  return 0;
}
