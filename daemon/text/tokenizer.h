/* tokenizer.h - text to token ids and back, for transformer models.
 *
 * Two kinds (docs/tokenizers.md):
 *  - bytes: token id = byte value (0..255);
 *  - GPT-2 byte-level BPE, loaded from Hugging Face's tokenizer.json, or
 *    vocab.json + merges.txt, or OpenAI's encoder.json + vocab.bpe (the same
 *    data under other names). Text is first split with GPT-2's
 *    pre-tokenization pattern (through PCRE2 with UTF and UCP, so the letter
 *    and number classes are Unicode's), each piece's bytes are merged by
 *    rank, lowest first, until no merge applies, and the symbols are looked
 *    up in the vocabulary. Special tokens (tokenizer.json's added_tokens;
 *    <|endoftext|> in the GPT-2 files) written literally in the text are that
 *    token when the caller allows it.
 *
 * Internally every token is its raw bytes: GPT-2's byte-to-unicode mapping
 * is undone at load, so decoding is a lookup and encoding works on bytes.
 * Text that is not valid UTF-8 is encoded as if each maximal invalid
 * subsequence were U+FFFD (what a UTF-8 decoder with replacement gives).
 *
 * Decoding gives bytes; tk_utf8 turns a stream of token bytes into valid
 * UTF-8 text: it holds an incomplete character until it completes or
 * cannot, so a streamed delta never ends inside a character, and bytes that
 * cannot form a character become U+FFFD.
 *
 * Threads: a loaded tokenizer is read-only and shared by every worker. */
#ifndef TALLYD_TOKENIZER_H
#define TALLYD_TOKENIZER_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "../base/err.h"
#include "../base/sbuf.h"

typedef struct tk_tokenizer tk_tokenizer;

/* Tokenizer files larger than this are refused at load. */
#define TK_MAX_FILE_BYTES (64u << 20)
/* Longest token, in bytes. */
#define TK_MAX_TOKEN_BYTES 4096

/* The tokenizer a model's config.json names, or finds in its files: config
 * "tokenizer": "bytes" gives the byte tokenizer; "bpe" (or absent) looks for
 * tokenizer.json, vocab.json + merges.txt, encoder.json + vocab.bpe in
 * version_dir, then model_dir (either may be NULL). "eos_token_id" in config
 * overrides the end-of-sequence id. *out is NULL (and 0 returned) when
 * "tokenizer" is absent and no file is found: the model has no text
 * endpoints. Any other value, a malformed file or an unsupported
 * tokenizer.json feature is a 400 naming it. */
int tk_load(const json_t *config, const char *version_dir, const char *model_dir,
            tk_tokenizer **out, ts_err *err);
/* The byte tokenizer; eos: -1 or 0..255. NULL when out of memory. */
tk_tokenizer *tk_bytes(int64_t eos);
/* GPT-2 BPE from files given by path (merges_path NULL: tokenizer.json). */
int tk_load_bpe(const char *vocab_or_json_path, const char *merges_path, tk_tokenizer **out,
                ts_err *err);
void tk_free(tk_tokenizer *t);

/* "bytes" or "bpe". */
const char *tk_kind(const tk_tokenizer *t);
/* 1 + the largest id. */
int64_t tk_vocab_size(const tk_tokenizer *t);
/* The end-of-sequence id, or -1. */
int64_t tk_eos(const tk_tokenizer *t);
/* Sets the end-of-sequence id; 400 when out of range. */
int tk_set_eos(tk_tokenizer *t, int64_t id, ts_err *err);

/* Encodes text[0..len) into *ids (tl_malloc'd, caller frees; *n may be 0).
 * allow_special: literal special-token text becomes that token; otherwise
 * it is ordinary text. */
int tk_encode(const tk_tokenizer *t, const char *text, size_t len, int allow_special, int64_t **ids,
              size_t *n, ts_err *err);
/* The raw bytes of token id (not NUL-terminated), or NULL when id is out of
 * range or unused. */
const char *tk_token_bytes(const tk_tokenizer *t, int64_t id, size_t *len);
/* 1 when id is a special token. */
int tk_special(const tk_tokenizer *t, int64_t id);
/* The id of a token given by its raw bytes, or -1. */
int64_t tk_lookup(const tk_tokenizer *t, const char *bytes, size_t len);

/* Appends the text of ids[0..n) to out as valid UTF-8 (U+FFFD for bytes
 * that form no character); 400 naming the first id out of range. */
int tk_decode(const tk_tokenizer *t, const int64_t *ids, size_t n, sbuf *out, ts_err *err);

/* Streaming UTF-8 repair. Zero-initialise, push bytes as they come, flush
 * at the end. Only complete, valid characters are appended to out. */
typedef struct tk_utf8 {
  unsigned char pend[4];
  int npend;
} tk_utf8;
void tk_utf8_push(tk_utf8 *u, const void *bytes, size_t len, sbuf *out);
void tk_utf8_flush(tk_utf8 *u, sbuf *out);
/* Appends s[0..len) to out with every maximal invalid subsequence replaced
 * by U+FFFD (tk_utf8_push then tk_utf8_flush). */
void tk_utf8_sanitize(const void *s, size_t len, sbuf *out);

#endif
