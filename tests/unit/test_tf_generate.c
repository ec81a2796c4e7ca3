/* test_tf_generate.c - the transformer's generation entry points against
 * scoring from scratch: a prompt prefilled in chunks and then decoded one
 * token per step in a batch of sequences of different lengths gives the
 * same next-token logits as tf_score over the whole sequence (learned and
 * RoPE positions; softmax, LSSA and LSSAR); a forked sequence continues
 * like its parent; a failing batch moves no sequence. Then the
 * continuous-batching engine: greedy tokens equal a from-scratch argmax
 * loop, concurrent requests get exactly what each gets alone (tokens, and
 * logprobs within 1e-4), seeds reproduce, echo scores the prompt like
 * tf_score, eos / stop verdicts / max_tokens / cancellation / deadlines /
 * the KV budget / a full queue end requests as documented. */
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "../../daemon/base/pool.h"
#include "../../daemon/base/rng.h"
#include "../../daemon/base/safetensors.h"
#include "../../daemon/models/generate.h"
#include "../../daemon/models/transformer.h"

enum { NL = 2, NH = 2, NE = 16, NV = 37, NP = 64 };

static uint64_t rs = 2024;
static float urand(void) {
  return (float)(rng_unif01(&rs) * 2 - 1);
}

typedef struct tmodel {
  char *img;
  st_file *sf;
  tf_model *m;
  json_t *cfg;
} tmodel;

static void add(json_t *h, float **data, size_t *off, const char *name, int64_t a, int64_t b,
                float scale, float mean) {
  size_t cnt = (size_t)a * (size_t)(b ? b : 1);
  json_t *sh = b ? json_pack("[I,I]", a, b) : json_pack("[I]", a);
  json_object_set_new(h, name,
                      json_pack("{s:s, s:o, s:[I,I]}", "dtype", "F32", "shape", sh, "data_offsets",
                                (json_int_t)*off, (json_int_t)(*off + 4 * cnt)));
  *data = realloc(*data, *off + 4 * cnt);
  float *d = (float *)((char *)*data + *off);
  for (size_t i = 0; i < cnt; i++) d[i] = mean + scale * urand();
  *off += 4 * cnt;
}

static const char *g_kv_dtype = "float32"; /* config.json's kv_cache_dtype for build() */

static void build(tmodel *t, const char *positions, const char *attention) {
  json_t *h = json_object();
  float *data = NULL;
  size_t off = 0;
  char nm[64];
  add(h, &data, &off, "wte.weight", NV, NE, 0.5f, 0);
  add(h, &data, &off, "wpe.weight", NP, NE, 0.3f, 0);
  add(h, &data, &off, "ln_f.weight", NE, 0, 0.1f, 1);
  add(h, &data, &off, "ln_f.bias", NE, 0, 0.1f, 0);
  for (int l = 0; l < NL; l++) {
#define P(s) (snprintf(nm, sizeof nm, "h.%d.%s", l, s), nm)
    add(h, &data, &off, P("ln_1.weight"), NE, 0, 0.1f, 1);
    add(h, &data, &off, P("ln_1.bias"), NE, 0, 0.1f, 0);
    add(h, &data, &off, P("attn.c_attn.weight"), NE, 3 * NE, 0.4f, 0);
    add(h, &data, &off, P("attn.c_attn.bias"), 3 * NE, 0, 0.1f, 0);
    add(h, &data, &off, P("attn.c_proj.weight"), NE, NE, 0.3f, 0);
    add(h, &data, &off, P("attn.c_proj.bias"), NE, 0, 0.1f, 0);
    add(h, &data, &off, P("ln_2.weight"), NE, 0, 0.1f, 1);
    add(h, &data, &off, P("ln_2.bias"), NE, 0, 0.1f, 0);
    add(h, &data, &off, P("mlp.c_fc.weight"), NE, 4 * NE, 0.3f, 0);
    add(h, &data, &off, P("mlp.c_fc.bias"), 4 * NE, 0, 0.1f, 0);
    add(h, &data, &off, P("mlp.c_proj.weight"), 4 * NE, NE, 0.3f, 0);
    add(h, &data, &off, P("mlp.c_proj.bias"), NE, 0, 0.1f, 0);
#undef P
  }
  char *hs = json_dumps(h, JSON_COMPACT);
  json_decref(h);
  size_t hl = strlen(hs), hp = (hl + 7) & ~(size_t)7, len = 8 + hp + off;
  t->img = malloc(len);
  uint64_t le = hp;
  memcpy(t->img, &le, 8);
  memset(t->img + 8, ' ', hp);
  memcpy(t->img + 8, hs, hl);
  memcpy(t->img + 8 + hp, data, off);
  free(hs);
  free(data);
  ts_err err;
  assert_int_equal(st_open_mem(&t->sf, t->img, len, "test model", &err), 0);
  t->cfg = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:s, s:s, s:i, s:s}", "kind", "transformer",
                     "n_layer", NL, "n_head", NH, "n_embd", NE, "vocab_size", NV, "n_positions", NP,
                     "positions", positions, "attention", attention, "offset_rows", 1,
                     "kv_cache_dtype", g_kv_dtype);
  if (tf_load(t->cfg, t->sf, &t->m, &err)) fail_msg("tf_load: %s", err.msg);
}

static void drop(tmodel *t) {
  tf_free(t->m);
  st_close(t->sf);
  free(t->img);
  json_decref(t->cfg);
}

static void near_rel(const float *a, const float *b, int64_t n, double tol) {
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)a[i] - b[i]), s = fmax(1.0, fabs((double)b[i]));
    if (d > tol * s) fail_msg("element %lld: %.7g vs %.7g", (long long)i, a[i], b[i]);
  }
}

/* The logits after ids[0..n) by scoring the whole sequence from scratch. */
static void scratch_logits(tmodel *t, pool_t *pool, const int64_t *ids, int64_t n, float *out) {
  float lp[NP];
  double nll;
  ts_err err;
  attn_params prm = tf_attn_defaults(t->m);
  assert_int_equal(tf_score(t->m, pool, &prm, ids, n, lp, &nll, out, NULL, NULL, &err), 0);
}

static void run_case_tol(const char *positions, const char *attention, double tol) {
  tmodel t;
  build(&t, positions, attention);
  pool_t *pool;
  assert_int_equal(pool_create(&pool, 2, 64), 0);
  enum { B = 3, STEPS = 6 };
  int64_t plen[B] = {5, 9, 1};
  int64_t ids[B][NP];
  for (int b = 0; b < B; b++)
    for (int i = 0; i < NP; i++) ids[b][i] = (int64_t)(rng_unif01(&rs) * NV);
  tf_seq *seqs[B];
  float lg[B * NV], ref[NV];
  ts_err err;
  for (int b = 0; b < B; b++) {
    seqs[b] = tf_seq_new(t.m, NULL);
    assert_non_null(seqs[b]);
    /* the longest prompt goes in two chunks */
    int64_t first = plen[b] > 4 ? 3 : plen[b];
    assert_int_equal(tf_prefill(t.m, pool, seqs[b], ids[b], first, NULL, NULL, NULL, NULL, &err),
                     0);
    if (first < plen[b])
      assert_int_equal(tf_prefill(t.m, pool, seqs[b], ids[b] + first, plen[b] - first, NULL, lg,
                                  NULL, NULL, &err),
                       0);
    assert_int_equal(tf_seq_pos(seqs[b]), plen[b]);
  }
  tf_seq *fork = tf_seq_fork(t.m, seqs[1]);
  assert_non_null(fork);
  for (int s = 0; s < STEPS; s++) {
    int64_t next[B];
    for (int b = 0; b < B; b++) next[b] = ids[b][plen[b] + s];
    assert_int_equal(tf_decode_batch(t.m, pool, seqs, next, B, lg, NULL, &err), 0);
    for (int b = 0; b < B; b++) {
      assert_int_equal(tf_seq_pos(seqs[b]), plen[b] + s + 1);
      scratch_logits(&t, pool, ids[b], plen[b] + s + 1, ref);
      near_rel(lg + b * NV, ref, NV, tol);
    }
    /* the fork alone, batch of one, follows the same tokens as seqs[1] */
    float fl[NV];
    assert_int_equal(tf_decode_batch(t.m, pool, &fork, &next[1], 1, fl, NULL, &err), 0);
    near_rel(fl, lg + NV, NV, 2e-5);
  }
  /* a token outside the vocabulary in a batch: an error, and nobody moves */
  int64_t bad[B] = {1, NV + 3, 2};
  assert_int_equal(tf_decode_batch(t.m, pool, seqs, bad, B, lg, NULL, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "vocabulary"));
  for (int b = 0; b < B; b++) assert_int_equal(tf_seq_pos(seqs[b]), plen[b] + STEPS);
  assert_true(tf_seq_bytes(t.m, seqs[1]) >= tf_seq_bytes_for(t.m, plen[1] + STEPS));
  for (int b = 0; b < B; b++) tf_seq_free(seqs[b]);
  tf_seq_free(fork);
  pool_destroy(pool);
  drop(&t);
}

static void run_case(const char *positions, const char *attention) {
  run_case_tol(positions, attention, 2e-5);
}

static void test_learned_softmax(void **st) {
  (void)st;
  run_case("learned", "softmax");
}

/* kv_cache_dtype float16: the same decoding over keys and values rounded to
 * float16 (relative error 2^-11 each): near the float32 scratch logits, in
 * half the cache bytes; a bad dtype is refused at load. */
static void test_f16_cache(void **st) {
  (void)st;
  g_kv_dtype = "float16";
  run_case_tol("learned", "softmax", 1e-2);
  run_case_tol("rope", "lssar", 5e-2);
  tmodel a, b;
  build(&a, "rope", "lssa");
  g_kv_dtype = "float32";
  build(&b, "rope", "lssa");
  size_t h = tf_seq_bytes_for(a.m, 1000), f = tf_seq_bytes_for(b.m, 1000);
  if (!(h < f * 6 / 10)) fail_msg("float16 cache %zu bytes, float32 %zu", h, f);
  json_t *bad = json_deep_copy(b.cfg);
  json_object_set_new(bad, "kv_cache_dtype", json_string("bfloat16"));
  tf_model *m = NULL;
  ts_err err;
  assert_int_equal(tf_load(bad, b.sf, &m, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "kv_cache_dtype"));
  json_decref(bad);
  drop(&a);
  drop(&b);
}
static void test_learned_lssar(void **st) {
  (void)st;
  run_case("learned", "lssar");
}
static void test_rope_lssa(void **st) {
  (void)st;
  run_case("rope", "lssa");
}
static void test_rope_lssar(void **st) {
  (void)st;
  run_case("rope", "lssar");
}

static void test_learned_positions_end(void **st) {
  (void)st;
  tmodel t;
  build(&t, "learned", "softmax");
  assert_int_equal(tf_max_positions(t.m), NP);
  tf_seq *s = tf_seq_new(t.m, NULL);
  int64_t ids[NP + 1] = {0};
  ts_err err;
  assert_int_equal(tf_prefill(t.m, NULL, s, ids, NP, NULL, NULL, NULL, NULL, &err), 0);
  float lg[NV];
  assert_int_equal(tf_decode_batch(t.m, NULL, &s, ids, 1, lg, NULL, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "n_positions"));
  assert_int_equal(tf_seq_pos(s), NP);
  tf_seq_free(s);
  drop(&t);
}

/* ---- the engine ----------------------------------------------------------- */

#define MAXTOK 128
typedef struct collect {
  uv_mutex_t mu;
  uv_cond_t cv;
  int final, stop_after; /* stop_after > 0: verdict 1 at that many tokens */
  int64_t tok[GEN_MAX_N][MAXTOK];
  float lp[GEN_MAX_N][MAXTOK];
  int ntok[GEN_MAX_N];
  const char *finish[GEN_MAX_N];
  int64_t ptok[MAXTOK];
  float plp[MAXTOK], ptop[MAXTOK][4];
  int32_t ptopid[MAXTOK][4];
  int nprompt;
  int64_t usage_prompt, usage_completion;
} collect;

static int on_event(void *user, const gen_event *ev) {
  collect *c = user;
  uv_mutex_lock(&c->mu);
  int verdict = 0;
  if (ev->kind == GEN_PROMPT) {
    c->ptok[ev->index] = ev->token;
    c->plp[ev->index] = ev->logprob;
    for (int i = 0; i < ev->n_top && i < 4; i++) {
      c->ptopid[ev->index][i] = ev->top_id[i];
      c->ptop[ev->index][i] = ev->top_lp[i];
    }
    c->nprompt++;
  } else if (ev->kind == GEN_TOKEN) {
    int k = c->ntok[ev->choice]++;
    assert_true(k == ev->index && k < MAXTOK);
    c->tok[ev->choice][k] = ev->token;
    c->lp[ev->choice][k] = ev->logprob;
    if (c->stop_after && k + 1 == c->stop_after) verdict = 1;
  } else if (ev->kind == GEN_END) {
    assert_null(c->finish[ev->choice]);
    c->finish[ev->choice] = ev->finish;
  } else {
    assert_false(c->final);
    c->final = 1;
    c->usage_prompt = ev->prompt_tokens;
    c->usage_completion = ev->completion_tokens;
    uv_cond_signal(&c->cv);
  }
  uv_mutex_unlock(&c->mu);
  return verdict;
}

static void collect_init(collect *c) {
  memset(c, 0, sizeof *c);
  uv_mutex_init(&c->mu);
  uv_cond_init(&c->cv);
}

static void collect_wait(collect *c) {
  uv_mutex_lock(&c->mu);
  while (!c->final) uv_cond_wait(&c->cv, &c->mu);
  uv_mutex_unlock(&c->mu);
  uv_cond_destroy(&c->cv);
  uv_mutex_destroy(&c->mu);
}

static gen_params greedy(int64_t max_tokens) {
  gen_params p;
  memset(&p, 0, sizeof p);
  p.max_tokens = max_tokens;
  p.smp = smp_defaults();
  p.smp.temperature = 0;
  p.n = 1;
  p.logprobs = 0;
  p.eos_id = -1;
  return p;
}

static void run_alone(gen_engine *e, const int64_t *prompt, int64_t n, const gen_params *p,
                      collect *c) {
  collect_init(c);
  gen_req *r;
  ts_err err;
  assert_int_equal(gen_submit(e, prompt, n, p, on_event, c, &r, &err), 0);
  collect_wait(c);
  gen_release(r);
}

static void test_engine_greedy_matches_scratch(void **st) {
  (void)st;
  tmodel t;
  build(&t, "rope", "lssar");
  pool_t *pool;
  pool_create(&pool, 2, 64);
  gen_engine *e;
  ts_err err;
  assert_int_equal(gen_engine_new(t.m, pool, NULL, &e, &err), 0);
  int64_t seq[32] = {3, 17, 5, 9, 30};
  gen_params p = greedy(10);
  collect c;
  run_alone(e, seq, 5, &p, &c);
  assert_int_equal(c.ntok[0], 10);
  assert_string_equal(c.finish[0], "length");
  assert_int_equal(c.usage_prompt, 5);
  assert_int_equal(c.usage_completion, 10);
  float lg[NV], lz[NV];
  for (int k = 0; k < 10; k++) {
    scratch_logits(&t, pool, seq, 5 + k, lg);
    int64_t best = 0;
    for (int i = 1; i < NV; i++)
      if (lg[i] > lg[best]) best = i;
    assert_int_equal(c.tok[0][k], best);
    smp_log_softmax(lg, NV, lz);
    assert_true(fabs(c.lp[0][k] - lz[best]) < 1e-4);
    seq[5 + k] = best;
  }
  gen_engine_free(e);
  pool_destroy(pool);
  drop(&t);
}

static void test_engine_batched_equals_alone(void **st) {
  (void)st;
  tmodel t;
  build(&t, "learned", "softmax");
  pool_t *pool;
  pool_create(&pool, 2, 64);
  gen_config cfg = {.max_active = 16, .prefill_chunk = 4};
  gen_engine *e;
  ts_err err;
  assert_int_equal(gen_engine_new(t.m, pool, &cfg, &e, &err), 0);
  enum { R = 6 };
  int64_t prompts[R][12];
  int64_t plen[R] = {1, 12, 5, 7, 3, 9};
  gen_params p[R];
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < 12; i++) prompts[r][i] = (int64_t)(rng_unif01(&rs) * NV);
    p[r] = greedy(8 + r);
    if (r % 2) { /* seeded sampling with filters, two choices */
      p[r].smp = smp_defaults();
      p[r].smp.top_p = 0.9;
      p[r].smp.top_k = 10;
      p[r].has_seed = 1;
      p[r].seed = 1000 + r;
      p[r].n = 2;
    }
  }
  collect together[R], alone[R];
  gen_req *h[R];
  for (int r = 0; r < R; r++) {
    collect_init(&together[r]);
    assert_int_equal(gen_submit(e, prompts[r], plen[r], &p[r], on_event, &together[r], &h[r], &err),
                     0);
  }
  for (int r = 0; r < R; r++) {
    collect_wait(&together[r]);
    gen_release(h[r]);
  }
  gen_stats gs;
  gen_engine_stats(e, &gs);
  assert_true(gs.batched_sequences > gs.steps); /* some steps really ran several sequences */
  assert_int_equal(gs.active_sequences, 0);
  assert_int_equal(gs.kv_bytes, 0);
  for (int r = 0; r < R; r++) {
    run_alone(e, prompts[r], plen[r], &p[r], &alone[r]);
    for (int c = 0; c < p[r].n; c++) {
      assert_int_equal(together[r].ntok[c], alone[r].ntok[c]);
      assert_string_equal(together[r].finish[c], alone[r].finish[c]);
      for (int k = 0; k < alone[r].ntok[c]; k++) {
        assert_int_equal(together[r].tok[c][k], alone[r].tok[c][k]);
        assert_true(fabs(together[r].lp[c][k] - alone[r].lp[c][k]) < 1e-4);
      }
    }
    if (p[r].n == 2) { /* two choices from one prefill, different streams */
      int differ = 0;
      for (int k = 0; k < alone[r].ntok[0]; k++) differ |= alone[r].tok[0][k] != alone[r].tok[1][k];
      assert_true(differ);
    }
  }
  gen_engine_free(e);
  pool_destroy(pool);
  drop(&t);
}

static void test_engine_echo_scores_prompt(void **st) {
  (void)st;
  tmodel t;
  build(&t, "learned", "lssa");
  pool_t *pool;
  pool_create(&pool, 2, 64);
  gen_config cfg = {.prefill_chunk = 3};
  gen_engine *e;
  ts_err err;
  assert_int_equal(gen_engine_new(t.m, pool, &cfg, &e, &err), 0);
  int64_t prompt[10];
  for (int i = 0; i < 10; i++) prompt[i] = (int64_t)(rng_unif01(&rs) * NV);
  gen_params p = greedy(0);
  p.echo = 1;
  p.logprobs = 3;
  collect c;
  run_alone(e, prompt, 10, &p, &c);
  assert_int_equal(c.nprompt, 10);
  assert_int_equal(c.ntok[0], 0);
  assert_string_equal(c.finish[0], "length");
  float lp[10], lg[NV];
  double nll;
  attn_params prm = tf_attn_defaults(t.m);
  assert_int_equal(tf_score(t.m, pool, &prm, prompt, 10, lp, &nll, lg, NULL, NULL, &err), 0);
  assert_true(isnan(c.plp[0]));
  for (int i = 1; i < 10; i++) {
    assert_int_equal(c.ptok[i], prompt[i]);
    assert_true(fabs(c.plp[i] - lp[i - 1]) < 1e-5);
    assert_true(c.ptop[i][0] >= c.ptop[i][1] && c.ptop[i][1] >= c.ptop[i][2]);
    assert_true(c.ptop[i][0] >= c.plp[i] - 1e-6);
  }
  gen_engine_free(e);
  pool_destroy(pool);
  drop(&t);
}

static void test_engine_endings(void **st) {
  (void)st;
  tmodel t;
  build(&t, "rope", "softmax");
  pool_t *pool;
  pool_create(&pool, 2, 64);
  gen_engine *e;
  ts_err err;
  assert_int_equal(gen_engine_new(t.m, pool, NULL, &e, &err), 0);
  int64_t prompt[3] = {1, 2, 3};
  collect c;
  gen_params p = greedy(5);
  run_alone(e, prompt, 3, &p, &c);
  int64_t first = c.tok[0][0];
  /* eos: the greedy first token is eos: nothing is emitted, finish stop */
  p.eos_id = first;
  run_alone(e, prompt, 3, &p, &c);
  assert_int_equal(c.ntok[0], 0);
  assert_string_equal(c.finish[0], "stop");
  p.ignore_eos = 1;
  run_alone(e, prompt, 3, &p, &c);
  assert_int_equal(c.ntok[0], 5);
  /* a stop verdict from the caller */
  p = greedy(20);
  collect_init(&c);
  c.stop_after = 3;
  gen_req *r;
  assert_int_equal(gen_submit(e, prompt, 3, &p, on_event, &c, &r, &err), 0);
  collect_wait(&c);
  gen_release(r);
  assert_int_equal(c.ntok[0], 3);
  assert_string_equal(c.finish[0], "stop");
  /* a deadline already passed */
  p = greedy(20);
  p.deadline = md_now() - 1;
  run_alone(e, prompt, 3, &p, &c);
  assert_string_equal(c.finish[0], "timeout");
  /* cancellation ends it within a step */
  p = greedy(60);
  p.n = 2;
  p.smp = smp_defaults();
  collect_init(&c);
  assert_int_equal(gen_submit(e, prompt, 3, &p, on_event, &c, &r, &err), 0);
  gen_cancel(r);
  collect_wait(&c);
  gen_release(r);
  assert_string_equal(c.finish[0], "cancelled");
  assert_string_equal(c.finish[1], "cancelled");
  assert_true(c.ntok[0] < 60);
  /* refusals */
  p = greedy(5);
  p.n = 0;
  assert_int_equal(gen_submit(e, prompt, 3, &p, on_event, &c, &r, &err), -TS_EINVAL);
  p = greedy(5);
  p.smp.top_p = 0;
  assert_int_equal(gen_submit(e, prompt, 3, &p, on_event, &c, &r, &err), -TS_EINVAL);
  int64_t bad[1] = {NV};
  p = greedy(5);
  assert_int_equal(gen_submit(e, bad, 1, &p, on_event, &c, &r, &err), -TS_EINVAL);
  assert_int_equal(gen_submit(e, prompt, 0, &p, on_event, &c, &r, &err), -TS_EINVAL);
  gen_engine_free(e);
  /* learned positions: prompt + max_tokens past n_positions is refused */
  tmodel tl;
  build(&tl, "learned", "softmax");
  assert_int_equal(gen_engine_new(tl.m, pool, NULL, &e, &err), 0);
  p = greedy(NP - 2);
  assert_int_equal(gen_submit(e, prompt, 3, &p, on_event, &c, &r, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "learned positions"));
  p = greedy(NP - 3); /* exactly fits: runs to the end of the context */
  run_alone(e, prompt, 3, &p, &c);
  assert_int_equal(c.ntok[0], NP - 3);
  gen_engine_free(e);
  drop(&tl);
  pool_destroy(pool);
  drop(&t);
}

/* A budget that admits one request at a time. */
typedef struct budget {
  uv_mutex_t mu;
  size_t used, cap;
  int refusals;
} budget;
static int b_reserve(void *ctx, size_t n) {
  budget *b = ctx;
  uv_mutex_lock(&b->mu);
  int ok = b->used + n <= b->cap;
  if (ok)
    b->used += n;
  else
    b->refusals++;
  uv_mutex_unlock(&b->mu);
  return ok ? 0 : -1;
}
static void b_release(void *ctx, size_t n) {
  budget *b = ctx;
  uv_mutex_lock(&b->mu);
  b->used -= n;
  uv_mutex_unlock(&b->mu);
}

static void test_engine_kv_budget_and_queue(void **st) {
  (void)st;
  tmodel t;
  build(&t, "rope", "softmax");
  pool_t *pool;
  pool_create(&pool, 2, 64);
  budget b = {.cap = tf_seq_bytes_for(t.m, 3 + 6 + 1)};
  uv_mutex_init(&b.mu);
  gen_config cfg = {.kv_reserve = b_reserve, .kv_release = b_release, .kv_ctx = &b, .queue_cap = 2};
  gen_engine *e;
  ts_err err;
  assert_int_equal(gen_engine_new(t.m, pool, &cfg, &e, &err), 0);
  int64_t prompt[3] = {4, 5, 6};
  gen_params p = greedy(6);
  collect c1, c2;
  gen_req *r1, *r2, *r3;
  collect_init(&c1);
  collect_init(&c2);
  assert_int_equal(gen_submit(e, prompt, 3, &p, on_event, &c1, &r1, &err), 0);
  assert_int_equal(gen_submit(e, prompt, 3, &p, on_event, &c2, &r2, &err), 0);
  collect_wait(&c1);
  collect_wait(&c2);
  assert_int_equal(c1.ntok[0], 6);
  assert_int_equal(c2.ntok[0], 6); /* the second waited for room, then ran */
  gen_release(r1);
  gen_release(r2);
  assert_int_equal(b.used, 0);
  /* a request that can never fit waits until its deadline */
  gen_params big = greedy(100); /* 104 positions: twice the cache the budget holds */
  big.deadline = md_now() + 0.2;
  collect c3;
  collect_init(&c3);
  assert_int_equal(gen_submit(e, prompt, 3, &big, on_event, &c3, &r3, &err), 0);
  /* the queue holds 2: fill it behind the blocked one and see the refusal */
  gen_params p2 = greedy(100);
  p2.deadline = md_now() + 0.2;
  collect c4, c5;
  gen_req *r4, *r5;
  collect_init(&c4);
  assert_int_equal(gen_submit(e, prompt, 3, &p2, on_event, &c4, &r4, &err), 0);
  assert_int_equal(gen_submit(e, prompt, 3, &p2, on_event, &c5, &r5, &err), -TS_EBUSY);
  collect_wait(&c3);
  collect_wait(&c4);
  assert_string_equal(c3.finish[0], "timeout");
  assert_string_equal(c4.finish[0], "timeout");
  assert_true(b.refusals > 0);
  gen_release(r3);
  gen_release(r4);
  gen_engine_free(e);
  uv_mutex_destroy(&b.mu);
  pool_destroy(pool);
  drop(&t);
}

/* Freeing the engine with requests in flight ends them all. */
static void test_engine_free_cancels(void **st) {
  (void)st;
  tmodel t;
  build(&t, "rope", "softmax");
  gen_engine *e;
  ts_err err;
  assert_int_equal(gen_engine_new(t.m, NULL, NULL, &e, &err), 0);
  int64_t prompt[2] = {1, 2};
  gen_params p = greedy(60);
  collect c[3];
  gen_req *r[3];
  for (int i = 0; i < 3; i++) {
    collect_init(&c[i]);
    assert_int_equal(gen_submit(e, prompt, 2, &p, on_event, &c[i], &r[i], &err), 0);
  }
  gen_engine_free(e);
  for (int i = 0; i < 3; i++) {
    collect_wait(&c[i]);
    assert_non_null(c[i].finish[0]);
    gen_release(r[i]);
  }
  drop(&t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_learned_softmax),
      cmocka_unit_test(test_f16_cache),
      cmocka_unit_test(test_learned_lssar),
      cmocka_unit_test(test_rope_lssa),
      cmocka_unit_test(test_rope_lssar),
      cmocka_unit_test(test_learned_positions_end),
      cmocka_unit_test(test_engine_greedy_matches_scratch),
      cmocka_unit_test(test_engine_batched_equals_alone),
      cmocka_unit_test(test_engine_echo_scores_prompt),
      cmocka_unit_test(test_engine_endings),
      cmocka_unit_test(test_engine_kv_budget_and_queue),
      cmocka_unit_test(test_engine_free_cancels),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
