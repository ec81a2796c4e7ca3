/* prefill.c - transformer prefill throughput: tokens/s of one forward pass
 * that scores a whole sequence (the `transformer` kind's infer), with the
 * time spent inside attention and in the LM head printed beside it as the
 * in-process baseline of where the time goes.
 *
 * The model is a random GPT-2 built in memory (default 12 layers, 768 wide,
 * 12 heads, vocabulary 50257, RoPE so that any length is allowed) and loaded
 * through the kind's own loader from an in-memory safetensors image; no
 * file is written.
 *
 *   build/bench/prefill [--tokens 4096,32768] [--variants softmax,lssar]
 *       [--layers 12] [--embd 768] [--heads 12] [--vocab 50257]
 *       [--threads N] [--device auto|cpu|cuda]
 *
 * Prints one line per (tokens, variant): total seconds, tokens/s, seconds
 * in attention and in the LM head, and peak RSS. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "../daemon/base/mem.h"
#include "../daemon/base/pool.h"
#include "../daemon/base/safetensors.h"
#include "../daemon/models/attention.h"
#include "../daemon/models/model.h"
#include "../daemon/models/transformer.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float urand(void) { /* xorshift64*: uniform in [-1, 1) */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (float)((double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0 * 2.0 -
                 1.0);
}

typedef struct tdesc {
  char name[64];
  int64_t shape[2];
  int ndim;
  float scale, mean;
} tdesc;

/* An in-memory safetensors image of the tensors in d[0..n). */
static char *build_image(const tdesc *d, int n, size_t *len) {
  json_t *h = json_object();
  size_t off = 0;
  for (int i = 0; i < n; i++) {
    size_t cnt = (size_t)d[i].shape[0] * (size_t)(d[i].ndim == 2 ? d[i].shape[1] : 1);
    json_t *sh = d[i].ndim == 2 ? json_pack("[I,I]", d[i].shape[0], d[i].shape[1])
                                : json_pack("[I]", d[i].shape[0]);
    json_object_set_new(h, d[i].name,
                        json_pack("{s:s, s:o, s:[I,I]}", "dtype", "F32", "shape", sh,
                                  "data_offsets", (json_int_t)off, (json_int_t)(off + 4 * cnt)));
    off += 4 * cnt;
  }
  char *hs = json_dumps(h, JSON_COMPACT);
  json_decref(h);
  size_t hl = strlen(hs), hp = (hl + 7) & ~(size_t)7;
  *len = 8 + hp + off;
  char *buf = malloc(*len);
  if (!buf) return NULL;
  uint64_t le = hp;
  memcpy(buf, &le, 8);
  memset(buf + 8, ' ', hp);
  memcpy(buf + 8, hs, hl);
  free(hs);
  float *data = (float *)(buf + 8 + hp);
  for (int i = 0; i < n; i++) {
    size_t cnt = (size_t)d[i].shape[0] * (size_t)(d[i].ndim == 2 ? d[i].shape[1] : 1);
    for (size_t j = 0; j < cnt; j++) data[j] = d[i].mean + d[i].scale * urand();
    data += cnt;
  }
  return buf;
}

static double peak_rss_mib(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_maxrss / 1024.0;
}

int main(int argc, char **argv) {
  const char *tokens = "4096,32768", *variants = "softmax,lssar", *device = "cpu";
  int layers = 12, E = 768, H = 12, V = 50257, threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--tokens"))
      tokens = argv[i + 1];
    else if (!strcmp(argv[i], "--variants"))
      variants = argv[i + 1];
    else if (!strcmp(argv[i], "--layers"))
      layers = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--embd"))
      E = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--heads"))
      H = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--vocab"))
      V = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--threads"))
      threads = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--device"))
      device = argv[i + 1];
    else {
      fprintf(stderr, "prefill: unknown option %s (see the comment in bench/prefill.c)\n", argv[i]);
      return 2;
    }
  }
  ts_err err = {0};
  if (md_attn_set_device(device, &err)) {
    fprintf(stderr, "prefill: %s\n", err.msg);
    return 2;
  }
  int n = 0;
  tdesc *d = calloc((size_t)(4 + 12 * layers), sizeof *d);
  float ws = 0.02f, ls = 0.1f;
#define T1(nm, a, sc, mu)                                                                \
  (snprintf(d[n].name, 64, "%s", nm), d[n].ndim = 1, d[n].shape[0] = a, d[n].scale = sc, \
   d[n].mean = mu, n++)
#define T2(nm, a, b, sc)                                                                   \
  (snprintf(d[n].name, 64, "%s", nm), d[n].ndim = 2, d[n].shape[0] = a, d[n].shape[1] = b, \
   d[n].scale = sc, n++)
  T2("wte.weight", V, E, ws);
  T1("ln_f.weight", E, ls, 1.0f);
  T1("ln_f.bias", E, ls, 0.0f);
  char nm[64];
  for (int l = 0; l < layers; l++) {
#define P(s) (snprintf(nm, sizeof nm, "h.%d.%s", l, s), nm)
    T1(P("ln_1.weight"), E, ls, 1.0f);
    T1(P("ln_1.bias"), E, ls, 0.0f);
    T2(P("attn.c_attn.weight"), E, 3 * E, ws);
    T1(P("attn.c_attn.bias"), 3 * E, ws, 0.0f);
    T2(P("attn.c_proj.weight"), E, E, ws);
    T1(P("attn.c_proj.bias"), E, ws, 0.0f);
    T1(P("ln_2.weight"), E, ls, 1.0f);
    T1(P("ln_2.bias"), E, ls, 0.0f);
    T2(P("mlp.c_fc.weight"), E, 4 * E, ws);
    T1(P("mlp.c_fc.bias"), 4 * E, ws, 0.0f);
    T2(P("mlp.c_proj.weight"), 4 * E, E, ws);
    T1(P("mlp.c_proj.bias"), E, ws, 0.0f);
#undef P
  }
  size_t len;
  char *img = build_image(d, n, &len);
  st_file *sf;
  if (!img || st_open_mem(&sf, img, len, "prefill model", &err)) {
    fprintf(stderr, "prefill: %s\n", img ? err.msg : "out of memory");
    return 1;
  }
  json_t *cfg = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:s}", "kind", "transformer", "n_layer",
                          layers, "n_head", H, "n_embd", E, "vocab_size", V, "n_positions", 1024,
                          "positions", "rope");
  tf_model *m;
  if (tf_load(cfg, sf, &m, &err)) {
    fprintf(stderr, "prefill: %s\n", err.msg);
    return 1;
  }
  pool_t *pool;
  pool_create(&pool, threads, 64);
  printf(
      "prefill: %d layers, %d wide, %d heads, vocabulary %d, %d threads, attention on %s, "
      "model %.0f MiB\n",
      layers, E, H, V, pool_threads(pool), md_attn_device_name(), (double)len / 1048576.0);
  printf("%8s %-8s %10s %10s %10s %10s %10s %9s\n", "tokens", "variant", "total_s", "tok/s",
         "attn_s", "attn_%", "head_s", "rss_MiB");
  char tl[256];
  snprintf(tl, sizeof tl, "%s", tokens);
  for (char *ts = strtok(tl, ","); ts; ts = strtok(NULL, ",")) {
    int64_t L = atoll(ts);
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)L);
    float *lp = malloc(sizeof(float) * (size_t)L);
    float *lg = malloc(sizeof(float) * (size_t)V);
    for (int64_t t = 0; t < L; t++) ids[t] = (int64_t)((urand() + 1.0f) * 0.5f * (float)(V - 1));
    char vl[128];
    snprintf(vl, sizeof vl, "%s", variants);
    char *save = NULL;
    for (char *vs = strtok_r(vl, ",", &save); vs; vs = strtok_r(NULL, ",", &save)) {
      attn_params prm = tf_attn_defaults(m);
      if (md_attn_variant_from_name(vs, &prm.variant)) {
        fprintf(stderr, "prefill: unknown variant %s\n", vs);
        return 2;
      }
      tf_prof prof = {0, 0};
      double nll, t0 = md_now();
      if (tf_score(m, pool, &prm, ids, L, lp, &nll, lg, NULL, &prof, &err)) {
        fprintf(stderr, "prefill: %s\n", err.msg);
        return 1;
      }
      double s = md_now() - t0;
      printf("%8lld %-8s %10.2f %10.0f %10.2f %9.0f%% %10.2f %9.0f\n", (long long)L, vs, s,
             (double)L / s, prof.attn_s, 100.0 * prof.attn_s / s, prof.head_s, peak_rss_mib());
      fflush(stdout);
    }
    free(ids);
    free(lp);
    free(lg);
  }
  tf_free(m);
  st_close(sf);
  free(img);
  free(d);
  json_decref(cfg);
  pool_destroy(pool);
  return 0;
}
