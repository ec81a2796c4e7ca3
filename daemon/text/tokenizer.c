/* tokenizer.c - the byte tokenizer and GPT-2 byte-level BPE (tokenizer.h).
 *
 * Layout: every token's raw bytes live in one arena; `tok[id]` points into
 * it. Two open-addressing hash tables: bytes -> id (the vocabulary) and the
 * pair (left id, right id) -> (rank, merged id) (the merges). Encoding a
 * piece starts from its single-byte tokens and merges the lowest-ranked
 * adjacent pair first (ties: leftmost), through a binary heap over a linked
 * list of symbols, so a piece of n bytes costs O(n log n) however long it
 * is (a run of 100,000 spaces is one piece). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"

#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../base/fsutil.h"
#include "../base/mem.h"

/* GPT-2's pre-tokenization pattern. */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

enum { TK_BYTES = 0, TK_BPE = 1 };

typedef struct tk_tok {
  uint32_t off;
  int32_t len; /* -1: unused id */
  int special;
} tk_tok;

typedef struct tk_merge {
  uint64_t key; /* (left << 32) | right, +1 so that 0 means empty */
  int32_t rank, merged;
} tk_merge;

struct tk_tokenizer {
  int kind;
  int64_t eos;
  int64_t n_tok; /* 1 + largest id */
  tk_tok *tok;
  char *arena;
  size_t arena_len, arena_cap;
  /* vocabulary: bytes -> id */
  int32_t *vmap; /* ids, -1 empty */
  size_t vmap_cap;
  /* merges */
  tk_merge *mtab;
  size_t mtab_cap;
  int32_t byte_id[256];
  /* special tokens, longest first */
  int32_t *specials;
  int n_specials;
  unsigned char special_first[256]; /* 1: some special token starts with this byte */
  int add_prefix_space;
  pcre2_code *re;
};

/* ---- hashing ------------------------------------------------------------- */

static uint64_t hash_bytes(const char *p, size_t n) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)p[i];
    h *= 1099511628211ull;
  }
  return h ^ (h >> 29);
}

static uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return x ^ (x >> 33);
}

static size_t pow2_at_least(size_t n) {
  size_t c = 16;
  while (c < n) c <<= 1;
  return c;
}

int64_t tk_lookup(const tk_tokenizer *t, const char *bytes, size_t len) {
  if (t->kind == TK_BYTES) return len == 1 ? (unsigned char)bytes[0] : -1;
  if (!t->vmap) return -1;
  size_t mask = t->vmap_cap - 1, i = hash_bytes(bytes, len) & mask;
  for (;;) {
    int32_t id = t->vmap[i];
    if (id < 0) return -1;
    const tk_tok *k = &t->tok[id];
    if ((size_t)k->len == len && memcmp(t->arena + k->off, bytes, len) == 0) return id;
    i = (i + 1) & mask;
  }
}

static int vmap_put(tk_tokenizer *t, int32_t id) {
  const tk_tok *k = &t->tok[id];
  size_t mask = t->vmap_cap - 1, i = hash_bytes(t->arena + k->off, (size_t)k->len) & mask;
  for (;;) {
    int32_t o = t->vmap[i];
    if (o < 0) {
      t->vmap[i] = id;
      return 0;
    }
    const tk_tok *ko = &t->tok[o];
    if (ko->len == k->len && memcmp(t->arena + ko->off, t->arena + k->off, (size_t)k->len) == 0)
      return 1; /* the same bytes under two ids: the first stays */
    i = (i + 1) & mask;
  }
}

static const tk_merge *merge_get(const tk_tokenizer *t, int32_t a, int32_t b) {
  uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
  size_t mask = t->mtab_cap - 1, i = mix64(key) & mask;
  for (;;) {
    const tk_merge *m = &t->mtab[i];
    if (m->key == 0) return NULL;
    if (m->key == key) return m;
    i = (i + 1) & mask;
  }
}

/* 0: added; 1: the pair was there already (the first rank stays). */
static int merge_put(tk_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t merged) {
  uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
  size_t mask = t->mtab_cap - 1, i = mix64(key) & mask;
  for (;;) {
    tk_merge *m = &t->mtab[i];
    if (m->key == key) return 1;
    if (m->key == 0) {
      m->key = key;
      m->rank = rank;
      m->merged = merged;
      return 0;
    }
    i = (i + 1) & mask;
  }
}

/* ---- UTF-8 --------------------------------------------------------------- */

static const char FFFD[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* Length of the sequence a lead byte starts, 0 for a byte that starts none. */
static int utf8_need(unsigned char b) {
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b >= 0xE0 && b <= 0xEF) return 3;
  if (b >= 0xF0 && b <= 0xF4) return 4;
  return 0;
}

/* Whether b may follow lead at position pos (1..3) of its sequence
 * (Unicode's table of well-formed byte sequences). */
static int utf8_cont_ok(unsigned char lead, int pos, unsigned char b) {
  if (pos == 1) {
    if (lead == 0xE0) return b >= 0xA0 && b <= 0xBF;
    if (lead == 0xED) return b >= 0x80 && b <= 0x9F;
    if (lead == 0xF0) return b >= 0x90 && b <= 0xBF;
    if (lead == 0xF4) return b >= 0x80 && b <= 0x8F;
  }
  return b >= 0x80 && b <= 0xBF;
}

void tk_utf8_push(tk_utf8 *u, const void *bytes, size_t len, sbuf *out) {
  const unsigned char *p = bytes;
  size_t i = 0;
  while (i < len) {
    unsigned char b = p[i];
    if (u->npend == 0) {
      /* ASCII runs go out in one append */
      size_t j = i;
      while (j < len && p[j] < 0x80) j++;
      if (j > i) {
        sbuf_add(out, p + i, j - i);
        i = j;
        continue;
      }
      if (utf8_need(b) == 0) {
        sbuf_add(out, FFFD, 3);
      } else {
        u->pend[0] = b;
        u->npend = 1;
      }
      i++;
      continue;
    }
    if (!utf8_cont_ok(u->pend[0], u->npend, b)) {
      /* the held prefix is a maximal invalid subpart: one U+FFFD, and b
       * starts afresh */
      sbuf_add(out, FFFD, 3);
      u->npend = 0;
      continue;
    }
    u->pend[u->npend++] = b;
    i++;
    if (u->npend == utf8_need(u->pend[0])) {
      sbuf_add(out, u->pend, (size_t)u->npend);
      u->npend = 0;
    }
  }
}

void tk_utf8_flush(tk_utf8 *u, sbuf *out) {
  if (u->npend) sbuf_add(out, FFFD, 3);
  u->npend = 0;
}

void tk_utf8_sanitize(const void *s, size_t len, sbuf *out) {
  tk_utf8 u = {{0}, 0};
  tk_utf8_push(&u, s, len, out);
  tk_utf8_flush(&u, out);
}

static int utf8_valid(const unsigned char *p, size_t len) {
  size_t i = 0;
  while (i < len) {
    unsigned char b = p[i];
    if (b < 0x80) {
      i++;
      continue;
    }
    int n = utf8_need(b);
    if (n == 0 || i + (size_t)n > len) return 0;
    for (int k = 1; k < n; k++)
      if (!utf8_cont_ok(b, k, p[i + k])) return 0;
    i += (size_t)n;
  }
  return 1;
}

/* Decodes one code point of valid UTF-8 at s (len > 0); returns its length,
 * 0 when invalid. */
static int utf8_decode(const unsigned char *s, size_t len, uint32_t *cp) {
  int n = utf8_need(s[0]);
  if (n == 0 || (size_t)n > len) return 0;
  for (int k = 1; k < n; k++)
    if (!utf8_cont_ok(s[0], k, s[k])) return 0;
  if (n == 1)
    *cp = s[0];
  else if (n == 2)
    *cp = ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
  else if (n == 3)
    *cp = ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
  else
    *cp = ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
          ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
  return n;
}

/* ---- GPT-2's byte <-> unicode table ---------------------------------------
 * Printable bytes (! to ~, ¡ to ¬, ® to ÿ) stand for themselves; the other
 * 68 map to U+0100 onwards in byte order. Vocabulary files spell tokens in
 * these characters; unicode_to_byte undoes it. */
static int16_t unicode_to_byte[512];

static void init_byte_table(void) {
  for (int i = 0; i < 512; i++) unicode_to_byte[i] = -1;
  int n = 0;
  for (int b = 0; b < 256; b++) {
    int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    int cp = printable ? b : 256 + n++;
    unicode_to_byte[cp] = (int16_t)b;
  }
}

/* A vocabulary key (GPT-2's characters) to raw bytes in buf; -1 when a
 * character is not one of the 256. */
static long key_to_bytes(const char *key, size_t klen, char *buf, size_t cap) {
  const unsigned char *s = (const unsigned char *)key;
  size_t i = 0, n = 0;
  while (i < klen) {
    uint32_t cp;
    int l = utf8_decode(s + i, klen - i, &cp);
    if (l == 0 || cp >= 512 || unicode_to_byte[cp] < 0 || n >= cap) return -1;
    buf[n++] = (char)unicode_to_byte[cp];
    i += (size_t)l;
  }
  return (long)n;
}

/* ---- building ------------------------------------------------------------ */

static tk_tokenizer *tk_new(int kind) {
  tk_tokenizer *t = tl_calloc(1, sizeof *t);
  if (!t) return NULL;
  t->kind = kind;
  t->eos = -1;
  for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
  return t;
}

void tk_free(tk_tokenizer *t) {
  if (!t) return;
  tl_free(t->tok);
  tl_free(t->arena);
  tl_free(t->vmap);
  tl_free(t->mtab);
  tl_free(t->specials);
  if (t->re) pcre2_code_free(t->re);
  tl_free(t);
}

tk_tokenizer *tk_bytes(int64_t eos) {
  tk_tokenizer *t = tk_new(TK_BYTES);
  if (!t) return NULL;
  t->n_tok = 256;
  t->arena = tl_malloc(256);
  t->tok = tl_calloc(256, sizeof *t->tok);
  if (!t->arena || !t->tok) {
    tk_free(t);
    return NULL;
  }
  for (int i = 0; i < 256; i++) {
    t->arena[i] = (char)i;
    t->tok[i].off = (uint32_t)i;
    t->tok[i].len = 1;
    t->byte_id[i] = i;
  }
  t->eos = eos >= 0 && eos < 256 ? eos : -1;
  return t;
}

static int arena_add(tk_tokenizer *t, const char *p, size_t n, uint32_t *off, ts_err *err) {
  if (t->arena_len + n > UINT32_MAX)
    return ts_errf(err, TS_EINVAL, "tokenizer: the vocabulary is too large");
  if (t->arena_len + n > t->arena_cap) {
    size_t cap = t->arena_cap ? t->arena_cap * 2 : 1 << 16;
    while (cap < t->arena_len + n) cap *= 2;
    char *a = tl_realloc(t->arena, cap);
    if (!a) return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    t->arena = a;
    t->arena_cap = cap;
  }
  memcpy(t->arena + t->arena_len, p, n);
  *off = (uint32_t)t->arena_len;
  t->arena_len += n;
  return 0;
}

/* Sets token id to bytes p[0..n). */
static int set_token(tk_tokenizer *t, int64_t id, const char *p, size_t n, int special,
                     ts_err *err) {
  if (id < 0 || id >= t->n_tok)
    return ts_errf(err, TS_EINVAL, "tokenizer: id %lld out of range", (long long)id);
  if (n == 0 || n > TK_MAX_TOKEN_BYTES)
    return ts_errf(err, TS_EINVAL, "tokenizer: token %lld has %zu bytes (1..%d allowed)",
                   (long long)id, n, TK_MAX_TOKEN_BYTES);
  uint32_t off = 0;
  int rc = arena_add(t, p, n, &off, err);
  if (rc) return rc;
  t->tok[id].off = off;
  t->tok[id].len = (int32_t)n;
  t->tok[id].special = special;
  return 0;
}

/* The vocabulary from a JSON object {"token": id, ...} (GPT-2 characters). */
static int read_vocab(tk_tokenizer *t, const json_t *vocab, const char *what, ts_err *err) {
  if (!json_is_object(vocab) || json_object_size(vocab) == 0)
    return ts_errf(err, TS_EINVAL, "%s: the vocabulary must be a non-empty JSON object", what);
  int64_t maxid = -1;
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)vocab, key, v) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= (1 << 24))
      return ts_errf(err, TS_EINVAL, "%s: token '%.40s' must map to an id in 0..%d", what, key,
                     (1 << 24) - 1);
    if (json_integer_value(v) > maxid) maxid = json_integer_value(v);
  }
  t->n_tok = maxid + 1;
  t->tok = tl_calloc((size_t)t->n_tok, sizeof *t->tok);
  if (!t->tok) return ts_errf(err, TS_ENOMEM, "%s: out of memory", what);
  for (int64_t i = 0; i < t->n_tok; i++) t->tok[i].len = -1;
  char buf[TK_MAX_TOKEN_BYTES];
  json_object_foreach((json_t *)vocab, key, v) {
    int64_t id = json_integer_value(v);
    if (t->tok[id].len >= 0)
      return ts_errf(err, TS_EINVAL, "%s: id %lld is given to two tokens", what, (long long)id);
    size_t klen = strlen(key);
    long n = key_to_bytes(key, klen, buf, sizeof buf);
    int rc;
    if (n <= 0) {
      /* not GPT-2's characters: a literal token (e.g. "<|endoftext|>" is
       * spelled in printable characters anyway); kept as its UTF-8 text */
      if (klen == 0) return ts_errf(err, TS_EINVAL, "%s: an empty token", what);
      rc = set_token(t, id, key, klen, 0, err);
    } else {
      rc = set_token(t, id, buf, (size_t)n, 0, err);
    }
    if (rc) return rc;
  }
  return 0;
}

static int build_vmap(tk_tokenizer *t, ts_err *err) {
  t->vmap_cap = pow2_at_least((size_t)t->n_tok * 2 + 1);
  t->vmap = tl_malloc(t->vmap_cap * sizeof *t->vmap);
  if (!t->vmap) return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
  for (size_t i = 0; i < t->vmap_cap; i++) t->vmap[i] = -1;
  for (int64_t id = 0; id < t->n_tok; id++)
    if (t->tok[id].len > 0) vmap_put(t, (int32_t)id);
  for (int b = 0; b < 256; b++) {
    char c = (char)b;
    int64_t id = tk_lookup(t, &c, 1);
    t->byte_id[b] = (int32_t)id;
  }
  return 0;
}

/* One merge "a b" (GPT-2 characters): rank r. */
static int add_merge(tk_tokenizer *t, const char *a, size_t alen, const char *b, size_t blen,
                     int32_t rank, const char *what, ts_err *err) {
  char ba[TK_MAX_TOKEN_BYTES], bb[TK_MAX_TOKEN_BYTES], ab[2 * TK_MAX_TOKEN_BYTES];
  long na = key_to_bytes(a, alen, ba, sizeof ba), nb = key_to_bytes(b, blen, bb, sizeof bb);
  if (na <= 0 || nb <= 0)
    return ts_errf(err, TS_EINVAL, "%s: merge %d ('%.*s %.*s') is not in GPT-2's byte alphabet",
                   what, rank + 1, (int)(alen > 40 ? 40 : alen), a, (int)(blen > 40 ? 40 : blen),
                   b);
  int64_t ia = tk_lookup(t, ba, (size_t)na), ib = tk_lookup(t, bb, (size_t)nb);
  memcpy(ab, ba, (size_t)na);
  memcpy(ab + na, bb, (size_t)nb);
  int64_t im = tk_lookup(t, ab, (size_t)(na + nb));
  if (ia < 0 || ib < 0 || im < 0)
    return ts_errf(err, TS_EINVAL,
                   "%s: merge %d ('%.*s %.*s') names a token that is not in the vocabulary", what,
                   rank + 1, (int)(alen > 40 ? 40 : alen), a, (int)(blen > 40 ? 40 : blen), b);
  merge_put(t, (int32_t)ia, (int32_t)ib, rank, (int32_t)im);
  return 0;
}

static int alloc_merges(tk_tokenizer *t, size_t n, ts_err *err) {
  t->mtab_cap = pow2_at_least(n * 2 + 1);
  t->mtab = tl_calloc(t->mtab_cap, sizeof *t->mtab);
  if (!t->mtab) return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
  return 0;
}

/* merges.txt / vocab.bpe: an optional "#version" line, then "a b" lines. */
static int read_merges_txt(tk_tokenizer *t, const char *path, ts_err *err) {
  char *data;
  size_t len;
  int rc = fs_read_file(path, TK_MAX_FILE_BYTES, &data, &len, err);
  if (rc) return rc;
  const char *what = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
  size_t lines = 1;
  for (size_t i = 0; i < len; i++) lines += data[i] == '\n';
  if ((rc = alloc_merges(t, lines, err))) goto out;
  int32_t rank = 0;
  size_t i = 0;
  while (i < len) {
    size_t e = i;
    while (e < len && data[e] != '\n') e++;
    size_t le = e;
    if (le > i && data[le - 1] == '\r') le--;
    if (le > i && !(rank == 0 && le - i >= 8 && memcmp(data + i, "#version", 8) == 0)) {
      const char *sp = memchr(data + i, ' ', le - i);
      if (!sp || sp == data + i || sp + 1 == data + le ||
          memchr(sp + 1, ' ', (size_t)(data + le - sp - 1))) {
        rc = ts_errf(err, TS_EINVAL, "%s: line '%.*s' is not two tokens separated by one space",
                     what, (int)((le - i) > 60 ? 60 : (le - i)), data + i);
        goto out;
      }
      rc = add_merge(t, data + i, (size_t)(sp - (data + i)), sp + 1, (size_t)(data + le - sp - 1),
                     rank, what, err);
      if (rc) goto out;
      rank++;
    }
    i = e + 1;
  }
out:
  tl_free(data);
  return rc;
}

static int load_json_file(const char *path, json_t **out, ts_err *err) {
  char *data;
  size_t len;
  int rc = fs_read_file(path, TK_MAX_FILE_BYTES, &data, &len, err);
  if (rc) return rc;
  json_error_t je;
  *out = json_loadb(data, len, JSON_REJECT_DUPLICATES, &je);
  tl_free(data);
  if (!*out)
    return ts_errf(err, TS_EINVAL, "%s: not valid JSON (line %d: %s)", path, je.line, je.text);
  return 0;
}

static int cmp_special_len(const void *a, const void *b, void *ctx) {
  const tk_tokenizer *t = ctx;
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  if (t->tok[x].len != t->tok[y].len) return t->tok[y].len - t->tok[x].len;
  return x - y;
}

static int finish_bpe(tk_tokenizer *t, ts_err *err) {
  for (int b = 0; b < 256; b++)
    if (t->byte_id[b] < 0)
      return ts_errf(err, TS_EINVAL,
                     "tokenizer: the vocabulary has no token for byte 0x%02x (byte-level BPE needs "
                     "all 256)",
                     b);
  int n = 0;
  for (int64_t id = 0; id < t->n_tok; id++) n += t->tok[id].len > 0 && t->tok[id].special;
  if (n) {
    t->specials = tl_malloc((size_t)n * sizeof *t->specials);
    if (!t->specials) return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    for (int64_t id = 0; id < t->n_tok; id++)
      if (t->tok[id].len > 0 && t->tok[id].special) {
        t->specials[t->n_specials++] = (int32_t)id;
        t->special_first[(unsigned char)t->arena[t->tok[id].off]] = 1;
      }
    qsort_r(t->specials, (size_t)t->n_specials, sizeof *t->specials, cmp_special_len, t);
  }
  int ec;
  PCRE2_SIZE eo;
  t->re = pcre2_compile((PCRE2_SPTR)GPT2_PATTERN, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec,
                        &eo, NULL);
  if (!t->re)
    return ts_errf(err, TS_EINTERNAL, "tokenizer: the pre-tokenization pattern failed to compile");
  (void)pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE); /* the interpreter is the fallback */
  if (t->eos < 0) t->eos = tk_lookup(t, "<|endoftext|>", 13);
  return 0;
}

/* vocab.json + merges.txt (or encoder.json + vocab.bpe). */
static int load_gpt2_files(const char *vocab_path, const char *merges_path, tk_tokenizer **out,
                           ts_err *err) {
  json_t *vocab;
  int rc = load_json_file(vocab_path, &vocab, err);
  if (rc) return rc;
  tk_tokenizer *t = tk_new(TK_BPE);
  if (!t) {
    json_decref(vocab);
    return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
  }
  const char *what = strrchr(vocab_path, '/') ? strrchr(vocab_path, '/') + 1 : vocab_path;
  if (!(rc = read_vocab(t, vocab, what, err)) && !(rc = build_vmap(t, err)) &&
      !(rc = read_merges_txt(t, merges_path, err))) {
    int64_t e = tk_lookup(t, "<|endoftext|>", 13);
    if (e >= 0) t->tok[e].special = 1;
    rc = finish_bpe(t, err);
  }
  json_decref(vocab);
  if (rc) {
    tk_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

/* The type of a tokenizer.json section, or NULL. */
static const char *section_type(const json_t *root, const char *name) {
  json_t *s = json_object_get(root, name);
  if (!json_is_object(s)) return NULL;
  return json_string_value(json_object_get(s, "type"));
}

static int load_hf_json(const char *path, tk_tokenizer **out, ts_err *err) {
  json_t *root;
  int rc = load_json_file(path, &root, err);
  if (rc) return rc;
  const char *what = "tokenizer.json";
  tk_tokenizer *t = NULL;
  json_t *model = json_object_get(root, "model");
  const char *mt = json_string_value(json_object_get(model, "type"));
  json_t *pre = json_object_get(root, "pre_tokenizer"), *dec = json_object_get(root, "decoder"),
         *norm = json_object_get(root, "normalizer");
  if (!json_is_object(root) || !json_is_object(model)) {
    rc = ts_errf(err, TS_EINVAL, "%s: no \"model\" object", what);
    goto out;
  }
  if (mt && strcmp(mt, "BPE") != 0) {
    rc = ts_errf(err, TS_EINVAL, "%s: model type '%s' is not supported (only BPE)", what, mt);
    goto out;
  }
  if (norm && !json_is_null(norm)) {
    rc = ts_errf(err, TS_EINVAL, "%s: normalizer '%s' is not supported (only none)", what,
                 section_type(root, "normalizer") ? section_type(root, "normalizer") : "?");
    goto out;
  }
  const char *pt = section_type(root, "pre_tokenizer");
  if (!pt || strcmp(pt, "ByteLevel") != 0) {
    rc = ts_errf(err, TS_EINVAL, "%s: pre_tokenizer '%s' is not supported (only ByteLevel)", what,
                 pt ? pt : (pre ? "?" : "none"));
    goto out;
  }
  json_t *ur = json_object_get(pre, "use_regex");
  if (ur && !json_is_true(ur)) {
    rc = ts_errf(err, TS_EINVAL,
                 "%s: pre_tokenizer ByteLevel with use_regex false is not supported", what);
    goto out;
  }
  const char *dt = section_type(root, "decoder");
  if (dec && !json_is_null(dec) && (!dt || strcmp(dt, "ByteLevel") != 0)) {
    rc = ts_errf(err, TS_EINVAL, "%s: decoder '%s' is not supported (only ByteLevel)", what,
                 dt ? dt : "?");
    goto out;
  }
  static const char *const unsupported[] = {"dropout", "continuing_subword_prefix",
                                            "end_of_word_suffix", "unk_token"};
  for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++) {
    json_t *v = json_object_get(model, unsupported[i]);
    if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0)) {
      rc = ts_errf(err, TS_EINVAL, "%s: model.%s is not supported", what, unsupported[i]);
      goto out;
    }
  }
  if (json_is_true(json_object_get(model, "byte_fallback"))) {
    rc = ts_errf(err, TS_EINVAL, "%s: model.byte_fallback is not supported", what);
    goto out;
  }
  t = tk_new(TK_BPE);
  if (!t) {
    rc = ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    goto out;
  }
  t->add_prefix_space = json_is_true(json_object_get(pre, "add_prefix_space"));
  /* added tokens may extend the id range */
  json_t *added = json_object_get(root, "added_tokens");
  json_t *vocab = json_object_get(model, "vocab");
  if ((rc = read_vocab(t, vocab, what, err))) goto out;
  if (added && !json_is_array(added)) {
    rc = ts_errf(err, TS_EINVAL, "%s: added_tokens must be an array", what);
    goto out;
  }
  size_t i;
  json_t *a;
  int64_t maxid = t->n_tok - 1;
  json_array_foreach(added, i, a) {
    json_t *id = json_object_get(a, "id");
    const char *content = json_string_value(json_object_get(a, "content"));
    if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= (1 << 24) ||
        !content || !*content) {
      rc = ts_errf(err, TS_EINVAL, "%s: added_tokens[%zu] needs an id and a non-empty content",
                   what, i);
      goto out;
    }
    if (json_integer_value(id) > maxid) maxid = json_integer_value(id);
  }
  if (maxid >= t->n_tok) {
    tk_tok *nt = tl_realloc(t->tok, (size_t)(maxid + 1) * sizeof *nt);
    if (!nt) {
      rc = ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
      goto out;
    }
    for (int64_t k = t->n_tok; k <= maxid; k++) nt[k] = (tk_tok){0, -1, 0};
    t->tok = nt;
    t->n_tok = maxid + 1;
  }
  json_array_foreach(added, i, a) {
    int64_t id = json_integer_value(json_object_get(a, "id"));
    const char *content = json_string_value(json_object_get(a, "content"));
    if ((rc = set_token(t, id, content, strlen(content), 1, err))) goto out;
  }
  if ((rc = build_vmap(t, err))) goto out;
  json_t *merges = json_object_get(model, "merges");
  if (!json_is_array(merges)) {
    rc = ts_errf(err, TS_EINVAL, "%s: model.merges must be an array", what);
    goto out;
  }
  if ((rc = alloc_merges(t, json_array_size(merges), err))) goto out;
  json_t *m;
  json_array_foreach(merges, i, m) {
    if (i >= INT32_MAX) break;
    const char *s = json_string_value(m);
    if (s) {
      const char *sp = strchr(s, ' ');
      if (!sp || sp == s || !sp[1] || strchr(sp + 1, ' ')) {
        rc = ts_errf(err, TS_EINVAL, "%s: merges[%zu] is not two tokens separated by one space",
                     what, i);
        goto out;
      }
      rc = add_merge(t, s, (size_t)(sp - s), sp + 1, strlen(sp + 1), (int32_t)i, what, err);
    } else if (json_is_array(m) && json_array_size(m) == 2 &&
               json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
      json_t *x = json_array_get(m, 0), *y = json_array_get(m, 1);
      rc = add_merge(t, json_string_value(x), json_string_length(x), json_string_value(y),
                     json_string_length(y), (int32_t)i, what, err);
    } else {
      rc = ts_errf(err, TS_EINVAL, "%s: merges[%zu] must be \"a b\" or [\"a\", \"b\"]", what, i);
    }
    if (rc) goto out;
  }
  rc = finish_bpe(t, err);
out:
  json_decref(root);
  if (rc) {
    tk_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

static pthread_once_t table_once = PTHREAD_ONCE_INIT;

int tk_load_bpe(const char *vocab_or_json_path, const char *merges_path, tk_tokenizer **out,
                ts_err *err) {
  pthread_once(&table_once, init_byte_table);
  *out = NULL;
  if (!merges_path) return load_hf_json(vocab_or_json_path, out, err);
  return load_gpt2_files(vocab_or_json_path, merges_path, out, err);
}

static int file_exists(const char *dir, const char *name, char *path, size_t cap) {
  if (!dir) return 0;
  int n = snprintf(path, cap, "%s/%s", dir, name);
  if (n < 0 || (size_t)n >= cap) return 0;
  struct stat st;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Looks for the BPE files in dir: 1 found (loaded or failed: *rc), 0 none. */
static int try_dir(const char *dir, tk_tokenizer **out, int *rc, ts_err *err) {
  char a[4096], b[4096];
  if (file_exists(dir, "tokenizer.json", a, sizeof a)) {
    *rc = tk_load_bpe(a, NULL, out, err);
    return 1;
  }
  static const char *const pairs[][2] = {{"vocab.json", "merges.txt"},
                                         {"encoder.json", "vocab.bpe"}};
  for (int i = 0; i < 2; i++) {
    int ha = file_exists(dir, pairs[i][0], a, sizeof a),
        hb = file_exists(dir, pairs[i][1], b, sizeof b);
    if (ha && hb) {
      *rc = tk_load_bpe(a, b, out, err);
      return 1;
    }
    if (ha || hb) {
      *rc = ts_errf(err, TS_EINVAL, "tokenizer: %s/%s is there but %s is missing", dir,
                    ha ? pairs[i][0] : pairs[i][1], ha ? pairs[i][1] : pairs[i][0]);
      return 1;
    }
  }
  return 0;
}

int tk_load(const json_t *config, const char *version_dir, const char *model_dir,
            tk_tokenizer **out, ts_err *err) {
  pthread_once(&table_once, init_byte_table);
  *out = NULL;
  json_t *kind = json_object_get(config, "tokenizer");
  json_t *eos = json_object_get(config, "eos_token_id");
  if (kind && !json_is_string(kind))
    return ts_errf(err, TS_EINVAL, "config.json: 'tokenizer' must be \"bytes\" or \"bpe\"");
  if (eos && !json_is_null(eos) && !json_is_integer(eos))
    return ts_errf(err, TS_EINVAL, "config.json: 'eos_token_id' must be an integer");
  const char *k = kind ? json_string_value(kind) : NULL;
  tk_tokenizer *t = NULL;
  int rc = 0;
  if (k && strcmp(k, "bytes") == 0) {
    t = tk_bytes(-1);
    if (!t) return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
  } else if (k && strcmp(k, "bpe") != 0) {
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'tokenizer' is '%s'; expected \"bytes\" or \"bpe\"", k);
  } else {
    int found = try_dir(version_dir, &t, &rc, err) || try_dir(model_dir, &t, &rc, err);
    if (rc) return rc;
    if (!found) {
      if (k)
        return ts_errf(err, TS_EINVAL,
                       "config.json names tokenizer \"bpe\" but neither the version nor the model "
                       "directory has tokenizer.json, vocab.json + merges.txt or encoder.json + "
                       "vocab.bpe");
      return 0;
    }
  }
  if (eos && json_is_integer(eos) && (rc = tk_set_eos(t, json_integer_value(eos), err))) {
    tk_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

/* ---- queries ------------------------------------------------------------- */

const char *tk_kind(const tk_tokenizer *t) {
  return t->kind == TK_BYTES ? "bytes" : "bpe";
}
int64_t tk_vocab_size(const tk_tokenizer *t) {
  return t->n_tok;
}
int64_t tk_eos(const tk_tokenizer *t) {
  return t->eos;
}
int tk_set_eos(tk_tokenizer *t, int64_t id, ts_err *err) {
  if (id < -1 || id >= t->n_tok || (id >= 0 && t->tok[id].len < 0))
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'eos_token_id' %lld is not a token of the tokenizer",
                   (long long)id);
  t->eos = id;
  return 0;
}

const char *tk_token_bytes(const tk_tokenizer *t, int64_t id, size_t *len) {
  if (id < 0 || id >= t->n_tok || t->tok[id].len < 0) return NULL;
  *len = (size_t)t->tok[id].len;
  return t->arena + t->tok[id].off;
}

int tk_special(const tk_tokenizer *t, int64_t id) {
  return id >= 0 && id < t->n_tok && t->tok[id].len > 0 && t->tok[id].special;
}

int tk_decode(const tk_tokenizer *t, const int64_t *ids, size_t n, sbuf *out, ts_err *err) {
  tk_utf8 u = {{0}, 0};
  for (size_t i = 0; i < n; i++) {
    size_t len;
    const char *p = tk_token_bytes(t, ids[i], &len);
    if (!p)
      return ts_errf(err, TS_EINVAL, "token %zu: id %lld is not in the vocabulary (0..%lld)", i,
                     (long long)ids[i], (long long)t->n_tok - 1);
    tk_utf8_push(&u, p, len, out);
  }
  tk_utf8_flush(&u, out);
  return 0;
}

/* ---- encoding ------------------------------------------------------------ */

typedef struct enc {
  int64_t *ids;
  size_t n, cap;
  /* scratch for one piece */
  int32_t *sym, *prev, *next;
  struct heap_item *heap;
  size_t scap;
} enc;

typedef struct heap_item {
  int32_t rank, pos, left, right;
} heap_item;

static int emit(enc *e, int64_t id) {
  if (e->n == e->cap) {
    size_t cap = e->cap ? e->cap * 2 : 64;
    int64_t *p = tl_realloc(e->ids, cap * sizeof *p);
    if (!p) return -1;
    e->ids = p;
    e->cap = cap;
  }
  e->ids[e->n++] = id;
  return 0;
}

static int heap_less(const heap_item *a, const heap_item *b) {
  return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(heap_item *h, size_t *n, heap_item it) {
  size_t i = (*n)++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!heap_less(&it, &h[p])) break;
    h[i] = h[p];
    i = p;
  }
  h[i] = it;
}

static heap_item heap_pop(heap_item *h, size_t *n) {
  heap_item top = h[0], last = h[--*n];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= *n) break;
    if (c + 1 < *n && heap_less(&h[c + 1], &h[c])) c++;
    if (!heap_less(&h[c], &last)) break;
    h[i] = h[c];
    i = c;
  }
  if (*n) h[i] = last;
  return top;
}

static void push_pair(const tk_tokenizer *t, enc *e, size_t *hn, int32_t i) {
  int32_t j = e->next[i];
  if (j < 0) return;
  const tk_merge *m = merge_get(t, e->sym[i], e->sym[j]);
  if (m) heap_push(e->heap, hn, (heap_item){m->rank, i, e->sym[i], e->sym[j]});
}

static int bpe_piece(const tk_tokenizer *t, enc *e, const unsigned char *p, size_t n) {
  if (n == 0) return 0;
  if (n == 1) return emit(e, t->byte_id[p[0]]);
  if (n > e->scap) {
    /* the heap holds at most 2n items: n - 1 pairs at first, and each merge
     * pops one and pushes at most two, n - 1 merges at most */
    int32_t *a = tl_realloc(e->sym, n * sizeof *a);
    if (!a) return -1;
    e->sym = a;
    if (!(a = tl_realloc(e->prev, n * sizeof *a))) return -1;
    e->prev = a;
    if (!(a = tl_realloc(e->next, n * sizeof *a))) return -1;
    e->next = a;
    heap_item *h = tl_realloc(e->heap, 2 * n * sizeof *h);
    if (!h) return -1;
    e->heap = h;
    e->scap = n;
  }
  for (size_t i = 0; i < n; i++) {
    e->sym[i] = t->byte_id[p[i]];
    e->prev[i] = (int32_t)i - 1;
    e->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
  }
  size_t hn = 0; /* at most n - 1 live pairs plus stale ones: each merge adds <= 2, removes 1 */
  for (size_t i = 0; i + 1 < n; i++) push_pair(t, e, &hn, (int32_t)i);
  while (hn) {
    heap_item it = heap_pop(e->heap, &hn);
    int32_t i = it.pos;
    if (e->sym[i] != it.left || e->sym[i] < 0) continue;
    int32_t j = e->next[i];
    if (j < 0 || e->sym[j] != it.right) continue;
    const tk_merge *m = merge_get(t, it.left, it.right);
    e->sym[i] = m->merged;
    e->sym[j] = -1;
    e->next[i] = e->next[j];
    if (e->next[j] >= 0) e->prev[e->next[j]] = i;
    if (e->prev[i] >= 0) push_pair(t, e, &hn, e->prev[i]);
    push_pair(t, e, &hn, i);
  }
  for (int32_t i = 0; i >= 0; i = e->next[i])
    if (emit(e, e->sym[i])) return -1;
  return 0;
}

/* GPT-2 pre-tokenization of s[0..n) (valid UTF-8), then BPE per piece. */
static int encode_text(const tk_tokenizer *t, enc *e, const char *s, size_t n, pcre2_match_data *md,
                       ts_err *err) {
  size_t pos = 0;
  while (pos < n) {
    int r = pcre2_match(t->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
    if (r == PCRE2_ERROR_JIT_STACKLIMIT)
      r = pcre2_match(t->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
    size_t a, b;
    if (r == PCRE2_ERROR_NOMATCH) {
      a = b = n;
    } else if (r < 0) {
      return ts_errf(err, TS_EINTERNAL, "tokenizer: pattern matching failed (PCRE2 error %d)", r);
    } else {
      PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
      a = ov[0];
      b = ov[1];
    }
    /* text between matches (the pattern covers every character; defensive) */
    if (a > pos && bpe_piece(t, e, (const unsigned char *)s + pos, a - pos))
      return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    if (b == a) {
      if (a >= n) break;
      /* an empty match cannot happen with this pattern; step one character */
      uint32_t cp;
      int l = utf8_decode((const unsigned char *)s + a, n - a, &cp);
      b = a + (size_t)(l > 0 ? l : 1);
    }
    if (bpe_piece(t, e, (const unsigned char *)s + a, b - a))
      return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    pos = b;
  }
  return 0;
}

/* The longest special token at s[0..n), or -1. */
static int32_t special_at(const tk_tokenizer *t, const char *s, size_t n) {
  if (!t->special_first[(unsigned char)s[0]]) return -1;
  for (int k = 0; k < t->n_specials; k++) {
    const tk_tok *tk = &t->tok[t->specials[k]];
    if ((size_t)tk->len <= n && memcmp(s, t->arena + tk->off, (size_t)tk->len) == 0)
      return t->specials[k];
  }
  return -1;
}

int tk_encode(const tk_tokenizer *t, const char *text, size_t len, int allow_special, int64_t **ids,
              size_t *n, ts_err *err) {
  *ids = NULL;
  *n = 0;
  enc e = {0};
  int rc = 0;
  if (t->kind == TK_BYTES) {
    e.ids = tl_malloc((len ? len : 1) * sizeof *e.ids);
    if (!e.ids) return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    for (size_t i = 0; i < len; i++) e.ids[i] = (unsigned char)text[i];
    *ids = e.ids;
    *n = len;
    return 0;
  }
  sbuf clean;
  sbuf_init(&clean);
  const char *s = text;
  size_t sl = len;
  int prefix = t->add_prefix_space && len > 0 && text[0] != ' ';
  if (prefix || !utf8_valid((const unsigned char *)text, len)) {
    if (prefix) sbuf_add(&clean, " ", 1);
    tk_utf8_sanitize(text, len, &clean);
    if (sbuf_failed(&clean)) {
      sbuf_free(&clean);
      return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    }
    s = clean.data;
    sl = clean.len;
  }
  pcre2_match_data *md = pcre2_match_data_create_from_pattern(t->re, NULL);
  if (!md) {
    sbuf_free(&clean);
    return ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
  }
  size_t start = 0, i = 0;
  while (i < sl && !rc) {
    int32_t sp = allow_special && t->n_specials ? special_at(t, s + i, sl - i) : -1;
    if (sp < 0) {
      i++;
      continue;
    }
    if (i > start) rc = encode_text(t, &e, s + start, i - start, md, err);
    if (!rc && emit(&e, sp)) rc = ts_errf(err, TS_ENOMEM, "tokenizer: out of memory");
    i += (size_t)t->tok[sp].len;
    start = i;
  }
  if (!rc && sl > start) rc = encode_text(t, &e, s + start, sl - start, md, err);
  pcre2_match_data_free(md);
  sbuf_free(&clean);
  tl_free(e.sym);
  tl_free(e.prev);
  tl_free(e.next);
  tl_free(e.heap);
  if (rc) {
    tl_free(e.ids);
    return rc;
  }
  *ids = e.ids;
  *n = e.n;
  return 0;
}
