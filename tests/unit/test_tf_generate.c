/* test_tf_generate.c - the transformer's generation entry points against
 * scoring from scratch: a prompt prefilled in chunks and then decoded one
 * token per step in a batch of sequences of different lengths gives the
 * same next-token logits as tf_score over the whole sequence (learned and
 * RoPE positions; softmax, LSSA and LSSAR); a forked sequence continues
 * like its parent; a failing batch moves no sequence. */
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

#include "../../daemon/base/pool.h"
#include "../../daemon/base/rng.h"
#include "../../daemon/base/safetensors.h"
#include "../../daemon/models/transformer.h"

enum { NL = 2, NH = 2, NE = 16, NV = 37, NP = 64 };

static uint64_t rs = 2024;
static float urand(void) { return (float)(rng_unif01(&rs) * 2 - 1); }

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
                      json_pack("{s:s, s:o, s:[I,I]}", "dtype", "F32", "shape", sh,
                                "data_offsets", (json_int_t)*off, (json_int_t)(*off + 4 * cnt)));
  *data = realloc(*data, *off + 4 * cnt);
  float *d = (float *)((char *)*data + *off);
  for (size_t i = 0; i < cnt; i++) d[i] = mean + scale * urand();
  *off += 4 * cnt;
}

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
  t->cfg = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:s, s:s, s:i}", "kind", "transformer",
                     "n_layer", NL, "n_head", NH, "n_embd", NE, "vocab_size", NV, "n_positions",
                     NP, "positions", positions, "attention", attention, "offset_rows", 1);
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

static void run_case(const char *positions, const char *attention) {
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
    assert_int_equal(tf_prefill(t.m, pool, seqs[b], ids[b], first, NULL, NULL, NULL, &err), 0);
    if (first < plen[b])
      assert_int_equal(tf_prefill(t.m, pool, seqs[b], ids[b] + first, plen[b] - first, NULL,
                                  lg, NULL, &err),
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
      near_rel(lg + b * NV, ref, NV, 2e-5);
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

static void test_learned_softmax(void **st) { (void)st; run_case("learned", "softmax"); }
static void test_learned_lssar(void **st) { (void)st; run_case("learned", "lssar"); }
static void test_rope_lssa(void **st) { (void)st; run_case("rope", "lssa"); }
static void test_rope_lssar(void **st) { (void)st; run_case("rope", "lssar"); }

static void test_learned_positions_end(void **st) {
  (void)st;
  tmodel t;
  build(&t, "learned", "softmax");
  assert_int_equal(tf_max_positions(t.m), NP);
  tf_seq *s = tf_seq_new(t.m, NULL);
  int64_t ids[NP + 1] = {0};
  ts_err err;
  assert_int_equal(tf_prefill(t.m, NULL, s, ids, NP, NULL, NULL, NULL, &err), 0);
  float lg[NV];
  assert_int_equal(tf_decode_batch(t.m, NULL, &s, ids, 1, lg, NULL, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "n_positions"));
  assert_int_equal(tf_seq_pos(s), NP);
  tf_seq_free(s);
  drop(&t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_learned_softmax),
      cmocka_unit_test(test_learned_lssar),
      cmocka_unit_test(test_rope_lssa),
      cmocka_unit_test(test_rope_lssar),
      cmocka_unit_test(test_learned_positions_end),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
