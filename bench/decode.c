/* decode.c - text generation throughput through the continuous-batching
 * engine (daemon/models/generate.h), in process: tokens/s at 1, 4, 16 and 64
 * concurrent streams, the memory-bandwidth bound beside one stream, and the
 * time to first token of a long prompt while 16 streams decode.
 *
 * The model is a random GPT-2-small-shaped transformer built in memory (12
 * layers, 768 wide, 12 heads, vocabulary 50257, learned positions, 1024 of
 * them, F32, softmax unless --variant says otherwise), loaded through the
 * kind's own loader. Streams are the choices of requests with n <= 16 (n
 * choices share one prefill, which keeps the benchmark's prefill short); each
 * request has its own random prompt of --prompt tokens (default 960) and
 * decodes --steps tokens (default 32) greedily, so every stream decodes at a
 * context of 960..992 tokens ("1024 context").
 *
 * tokens/s counts the tokens of decode steps only: from the moment every
 * stream has its first token (sampled from the prompt's logits) to the last
 * token. The bound for one stream is a measured read bandwidth (the pool's
 * threads summing a 1 GiB buffer, the best of 5 passes) over the weight
 * bytes one decode step reads (every layer's matrices and the tied LM head
 * wte; biases and LayerNorms too). The KV cache adds 2 x 12 x 768 x 4 bytes
 * (+ key norms) a token of context per stream, printed beside it.
 *
 * TTFT: a request with a --ttft-prompt (default 1000) token prompt and
 * max_tokens 1 is submitted while 16 streams decode; the time from submit
 * to its token, beside the same request on an idle engine (the baseline in
 * the same run). The engine prefills it in chunks of 256 tokens between
 * decode steps. --ttft-prompt 0 leaves this part out.
 *
 *   build/bench/decode [--streams 1,4,16,64] [--steps 32] [--prompt 960]
 *       [--ttft-prompt 1000] [--threads N] [--variant softmax|lssa|lssar]
 *       [--kv-dtype float32|float16]
 *       [--layers 12] [--embd 768] [--heads 12] [--vocab 50257] */
#include <jansson.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "../daemon/base/mem.h"
#include "../daemon/base/pool.h"
#include "../daemon/base/safetensors.h"
#include "../daemon/models/attention.h"
#include "../daemon/models/generate.h"
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

/* ---- read bandwidth ------------------------------------------------------ */

typedef struct bw_arg {
  const uint64_t *buf;
  int64_t words;
  _Atomic uint64_t sink;
} bw_arg;

static void bw_range(void *arg, int64_t b, int64_t e) {
  bw_arg *a = arg;
  uint64_t s[8] = {0};
  for (int64_t i = b * 4096; i < e * 4096 && i < a->words; i += 8)
    for (int k = 0; k < 8; k++) s[k] += a->buf[i + k];
  atomic_fetch_add(&a->sink, s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7]);
}

static double read_bandwidth(pool_t *pool) {
  int64_t bytes = (int64_t)1 << 30, words = bytes / 8;
  uint64_t *buf = malloc((size_t)bytes);
  if (!buf) return 0;
  for (int64_t i = 0; i < words; i++) buf[i] = (uint64_t)i;
  bw_arg a = {buf, words, 0};
  double best = 0;
  for (int r = 0; r < 5; r++) {
    double t0 = md_now();
    pool_parallel_for(pool, words / 4096, 64, bw_range, &a);
    double gbs = (double)bytes / (md_now() - t0) * 1e-9;
    if (gbs > best) best = gbs;
  }
  free(buf);
  return best;
}

/* ---- the engine's events ------------------------------------------------- */

typedef struct run {
  uv_mutex_t mu;
  uv_cond_t cv;
  int streams, firsts, finals, requests;
  int64_t tokens;
  double t_all_first, t_last;
} run;

typedef struct ureq {
  run *R;
  double t_submit, t_first;
} ureq;

static int on_event(void *user, const gen_event *ev) {
  ureq *u = user;
  run *R = u->R;
  uv_mutex_lock(&R->mu);
  if (ev->kind == GEN_TOKEN) {
    if (u->t_first == 0) u->t_first = ev->t;
    R->tokens++;
    R->t_last = ev->t;
    if (ev->index == 0 && ++R->firsts == R->streams) R->t_all_first = ev->t;
  } else if (ev->kind == GEN_FINAL) {
    R->finals++;
    uv_cond_broadcast(&R->cv);
  }
  uv_mutex_unlock(&R->mu);
  return 0;
}

static void wait_finals(run *R, int n) {
  uv_mutex_lock(&R->mu);
  while (R->finals < n) uv_cond_wait(&R->cv, &R->mu);
  uv_mutex_unlock(&R->mu);
}

static int64_t *random_prompt(int64_t n, int64_t V) {
  int64_t *p = malloc(sizeof(int64_t) * (size_t)n);
  for (int64_t i = 0; i < n; i++) p[i] = (int64_t)((urand() + 1.0f) * 0.5f * (float)(V - 1));
  return p;
}

static gen_params greedy(int64_t max_tokens, int n) {
  gen_params p;
  memset(&p, 0, sizeof p);
  p.max_tokens = max_tokens;
  p.smp = smp_defaults();
  p.smp.temperature = 0;
  p.n = n;
  p.logprobs = -1;
  p.eos_id = -1;
  p.ignore_eos = 1;
  return p;
}

/* S streams decoding `steps` tokens after a `plen`-token prompt: decode
 * tokens/s. The caller's ureqs[] hold at least S / 16 + 1 entries. */
static double streams_run(gen_engine *e, int64_t V, int S, int64_t plen, int64_t steps,
                          double *step_ms) {
  run R;
  memset(&R, 0, sizeof R);
  uv_mutex_init(&R.mu);
  uv_cond_init(&R.cv);
  R.streams = S;
  int nreq = (S + GEN_MAX_N - 1) / GEN_MAX_N;
  ureq *u = calloc((size_t)nreq, sizeof *u);
  gen_req **h = calloc((size_t)nreq, sizeof *h);
  gen_stats s0, s1;
  gen_engine_stats(e, &s0);
  for (int i = 0, left = S; i < nreq; i++) {
    int n = left < GEN_MAX_N ? left : GEN_MAX_N;
    left -= n;
    int64_t *p = random_prompt(plen, V);
    gen_params gp = greedy(steps + 1, n);
    ts_err err;
    u[i].R = &R;
    u[i].t_submit = md_now();
    if (gen_submit(e, p, plen, &gp, on_event, &u[i], &h[i], &err)) {
      fprintf(stderr, "decode: %s\n", err.msg);
      exit(1);
    }
    free(p);
  }
  wait_finals(&R, nreq);
  gen_engine_stats(e, &s1);
  for (int i = 0; i < nreq; i++) gen_release(h[i]);
  double secs = R.t_last - R.t_all_first;
  int64_t decoded = R.tokens - S; /* the first tokens came from the prefill */
  *step_ms = secs / (double)steps * 1e3;
  (void)s0;
  (void)s1;
  free(u);
  free(h);
  uv_cond_destroy(&R.cv);
  uv_mutex_destroy(&R.mu);
  return decoded / secs;
}

/* Time to first token of a `plen`-token prompt, with `bg` streams decoding
 * (0: an idle engine). */
static double ttft_run(gen_engine *e, int64_t V, int64_t plen, int bg, int64_t bg_prompt) {
  run R;
  memset(&R, 0, sizeof R);
  uv_mutex_init(&R.mu);
  uv_cond_init(&R.cv);
  R.streams = bg + 1;
  ureq ub = {&R, 0, 0}, ut = {&R, 0, 0};
  gen_req *hb = NULL, *ht = NULL;
  ts_err err;
  if (bg > 0) { /* the background: bg streams decoding until cancelled */
    int64_t *p = random_prompt(bg_prompt, V);
    gen_params gp = greedy(1024 - bg_prompt, bg);
    if (gen_submit(e, p, bg_prompt, &gp, on_event, &ub, &hb, &err)) exit(1);
    free(p);
    for (;;) { /* until they decode */
      uv_mutex_lock(&R.mu);
      int64_t t = R.tokens;
      uv_mutex_unlock(&R.mu);
      if (t >= 2 * bg) break;
      uv_sleep(5);
    }
  }
  int64_t *p = random_prompt(plen, V);
  gen_params gp = greedy(1, 1);
  ut.t_submit = md_now();
  if (gen_submit(e, p, plen, &gp, on_event, &ut, &ht, &err)) exit(1);
  free(p);
  for (;;) {
    uv_mutex_lock(&R.mu);
    double f = ut.t_first;
    uv_mutex_unlock(&R.mu);
    if (f > 0) break;
    uv_sleep(1);
  }
  double ttft = ut.t_first - ut.t_submit;
  if (hb) gen_cancel(hb);
  wait_finals(&R, bg > 0 ? 2 : 1);
  if (hb) gen_release(hb);
  gen_release(ht);
  uv_cond_destroy(&R.cv);
  uv_mutex_destroy(&R.mu);
  return ttft;
}

int main(int argc, char **argv) {
  const char *streams = "1,4,16,64", *variant = "softmax", *kvd = "float32";
  int layers = 12, E = 768, H = 12, V = 50257, threads = 0;
  int64_t steps = 32, plen = 960, tplen = 1000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const char *a = argv[i], *v = argv[i + 1];
    if (!strcmp(a, "--streams"))
      streams = v;
    else if (!strcmp(a, "--steps"))
      steps = atoll(v);
    else if (!strcmp(a, "--prompt"))
      plen = atoll(v);
    else if (!strcmp(a, "--ttft-prompt"))
      tplen = atoll(v);
    else if (!strcmp(a, "--threads"))
      threads = atoi(v);
    else if (!strcmp(a, "--variant"))
      variant = v;
    else if (!strcmp(a, "--kv-dtype"))
      kvd = v;
    else if (!strcmp(a, "--layers"))
      layers = atoi(v);
    else if (!strcmp(a, "--embd"))
      E = atoi(v);
    else if (!strcmp(a, "--heads"))
      H = atoi(v);
    else if (!strcmp(a, "--vocab"))
      V = atoi(v);
    else {
      fprintf(stderr, "decode: unknown option %s (see the comment in bench/decode.c)\n", a);
      return 2;
    }
  }
  if (argc % 2 == 0 || plen < 1 || steps < 1 || plen + steps + 1 > 1024 || tplen < 0 ||
      tplen + 1 > 1024) {
    fprintf(stderr, "decode: bad arguments (prompt + steps must stay within 1024 positions)\n");
    return 2;
  }
  ts_err err = {0};
  md_attn_set_device("cpu", &err);
  int n = 0;
  tdesc *d = calloc((size_t)(5 + 12 * layers), sizeof *d);
  float ws = 0.02f, ls = 0.1f;
#define T1(nm, a, sc, mu)                                                                \
  (snprintf(d[n].name, 64, "%s", nm), d[n].ndim = 1, d[n].shape[0] = a, d[n].scale = sc, \
   d[n].mean = mu, n++)
#define T2(nm, a, b, sc)                                                                   \
  (snprintf(d[n].name, 64, "%s", nm), d[n].ndim = 2, d[n].shape[0] = a, d[n].shape[1] = b, \
   d[n].scale = sc, n++)
  T2("wte.weight", V, E, ws);
  T2("wpe.weight", 1024, E, ws);
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
  if (!img || st_open_mem(&sf, img, len, "decode model", &err)) {
    fprintf(stderr, "decode: %s\n", img ? err.msg : "out of memory");
    return 1;
  }
  json_t *cfg =
      json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:s, s:s, s:s}", "kind", "transformer", "n_layer",
                layers, "n_head", H, "n_embd", E, "vocab_size", V, "n_positions", 1024, "positions",
                "learned", "attention", variant, "kv_cache_dtype", kvd);
  tf_model *m;
  if (!cfg || tf_load(cfg, sf, &m, &err)) {
    fprintf(stderr, "decode: %s\n", cfg ? err.msg : "bad variant");
    return 1;
  }
  pool_t *pool;
  pool_create(&pool, threads, 64);
  /* bytes one decode step reads of the weights: all of them but wpe (one row) */
  double wbytes = 0;
  for (int i = 0; i < n; i++)
    if (strcmp(d[i].name, "wpe.weight") != 0)
      wbytes += 4.0 * (double)d[i].shape[0] * (double)(d[i].ndim == 2 ? d[i].shape[1] : 1);
  double kv_tok = tf_seq_bytes_for(m, 1024) / 1024.0;
  double bw = read_bandwidth(pool);
  gen_engine *e;
  if (gen_engine_new(m, pool, NULL, &e, &err)) {
    fprintf(stderr, "decode: %s\n", err.msg);
    return 1;
  }
  printf(
      "decode: %d layers, %d wide, %d heads, vocabulary %d, F32 weights, %s KV cache, %s, %d "
      "threads; prompt %lld + %lld greedy steps a stream\n",
      layers, E, H, V, kvd, variant, pool_threads(pool), (long long)plen, (long long)steps);
  printf(
      "weights read per step %.0f MB; KV cache %.1f KB per token of context per stream; "
      "measured read bandwidth %.1f GB/s (%d threads)\n",
      wbytes * 1e-6, kv_tok * 1e-3, bw, pool_threads(pool));
  printf("%8s %10s %10s %8s   %s\n", "streams", "tokens/s", "step ms", "x 1", "bound");
  double one = 0;
  char sl[128];
  snprintf(sl, sizeof sl, "%s", streams);
  for (char *s = strtok(sl, ","); s; s = strtok(NULL, ",")) {
    int S = atoi(s);
    if (S < 1) continue;
    double ms, tps = streams_run(e, V, S, plen, steps, &ms);
    if (one == 0 && S == 1) one = tps;
    char bound[160] = "";
    if (S == 1) {
      /* weights plus this stream's cache at the mean context, per token */
      double ctx = (double)plen + (double)steps / 2, b1 = bw * 1e9 / wbytes,
             b2 = bw * 1e9 / (wbytes + kv_tok * ctx);
      snprintf(bound, sizeof bound,
               "weights only %.1f tokens/s (%.0f%% of it); weights + KV %.1f tokens/s (%.0f%%)", b1,
               100 * tps / b1, b2, 100 * tps / b2);
    }
    printf("%8d %10.1f %10.2f %7.2fx   %s\n", S, tps, ms, one > 0 ? tps / one : 0, bound);
    fflush(stdout);
  }
  double idle = tplen ? ttft_run(e, V, tplen, 0, plen) : 0;
  double busy = tplen ? ttft_run(e, V, tplen, 16, plen) : 0;
  if (tplen)
    printf(
        "time to first token, %lld-token prompt: %.0f ms while 16 streams decode, %.0f ms on an "
        "idle engine (baseline)\n",
        (long long)tplen, busy * 1e3, idle * 1e3);
  gen_engine_free(e);
  tf_free(m);
  st_close(sf);
  free(img);
  free(d);
  json_decref(cfg);
  pool_destroy(pool);
  return 0;
}
