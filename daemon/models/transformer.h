/* transformer.h - a GPT-2-layout decoder that scores token sequences: the
 * `transformer` model kind, and the entry points the prefill benchmark uses.
 *
 * The model (attention.md section 4): token embeddings wte [V, E], learned
 * positions wpe [P, E] or RoPE, n_layer pre-LayerNorm blocks
 * x += c_proj(Attn(LN1(x))); x += c_proj(gelu_tanh(c_fc(LN2(x)))), a final
 * LayerNorm and the LM head tied to wte (logits = x wte^T). Weights use the
 * HF GPT-2 safetensors names (an HF "transformer." prefix is accepted);
 * Conv1D weights are stored [in, out].
 *
 * Memory per sequence of L tokens: activations of a few [L, E] and one
 * [L, 3E] (the fused q, k, v projection), MLP hidden rows in chunks of
 * TF_MLP_ROWS, and the attention kernel's packed K and V ([L, 2E]); never an
 * L x L matrix (the attention kernels are tiled) and never [L, V] logits
 * (each chunk of TF_SCORE_ROWS rows is projected, reduced to the next token's
 * log-probability and dropped).
 *
 * Sessions keep each layer's K and V in an attn_kvc (kernels/attn.h: packed
 * the way the kernels read them, appended in place, grown by doubling)
 * and the final hidden state of the last token, so that a later chunk is
 * scored from every token before it at the cost of the new tokens only.
 *
 * Ownership: a tf_model borrows its weights from the st_file given to
 * tf_load (or owns converted copies); it must stay open until tf_free. */
#ifndef TALLYD_TRANSFORMER_H
#define TALLYD_TRANSFORMER_H

#include <jansson.h>
#include <stdint.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../kernels/attn.h"
#include "../text/tokenizer.h"
#include "model.h"

#define TF_MLP_ROWS 2048
#define TF_SCORE_ROWS 512

typedef struct tf_model tf_model;
typedef struct st_file st_file;

/* Reads an HF GPT-2 config.json (plus kind, positions, rope_theta,
 * attention, p, offset_rows) and the weights; 400 naming what is wrong. */
int tf_load(const json_t *config, st_file *weights, tf_model **out, ts_err *err);
void tf_free(tf_model *m);

int64_t tf_vocab(const tf_model *m);
/* The model's tokenizer (config.json "tokenizer", or tokenizer files in
 * the version or model directory; see text/tokenizer.h), or NULL when it
 * has none: then it scores token ids only and has no text endpoints. */
const tk_tokenizer *tf_tokenizer(const tf_model *m);
/* Why tokenizer files found beside the weights were not used, or NULL. */
const char *tf_tokenizer_error(const tf_model *m);
/* The model's generation engine (generate.h), made on first use with cfg
 * and pool (both only read then) and freed with the model. */
struct gen_engine;
struct gen_config;
int tf_engine(tf_model *m, pool_t *pool, const struct gen_config *cfg, struct gen_engine **out,
              ts_err *err);
/* The attention settings from config.json (requests may override them). */
attn_params tf_attn_defaults(const tf_model *m);

/* Where time goes (for the benchmark): seconds inside attention calls and
 * in the LM head's scoring, added to what is there. */
typedef struct tf_prof {
  double attn_s, head_s;
} tf_prof;

/* Scores one sequence ids[0..L) from scratch: lp[0..L-1) receives
 * log p(ids[t+1] | ids[0..t]), *nll their negated mean (0 when L == 1),
 * next_logits[0..V) the logits after the last token. c (may be NULL) gives
 * the deadline; prof may be NULL. */
int tf_score(const tf_model *m, pool_t *pool, const attn_params *prm, const int64_t *ids, int64_t L,
             float *lp, double *nll, float *next_logits, const md_call *c, tf_prof *prof,
             ts_err *err);

/* ---- sequences for generation --------------------------------------------
 * A tf_seq holds one sequence's KV cache (every layer's keys and values in
 * an attn_kvc, grown by doubling) and its position. Generation drives it
 * with tf_prefill (a prompt, in chunks of any size) and tf_decode_batch (one
 * new token for each of many sequences in one batched forward pass: every
 * weight matrix is read once per step, not once per sequence). A call that
 * fails leaves every sequence as it was. A tf_seq is used by one thread at
 * a time; the model is shared read-only. */
typedef struct tf_seq tf_seq;

/* A sequence with attention settings prm (NULL: config.json's). */
tf_seq *tf_seq_new(const tf_model *m, const attn_params *prm);
void tf_seq_free(tf_seq *s);
int64_t tf_seq_pos(const tf_seq *s);
/* Bytes the sequence holds now (its cache capacity counts). */
size_t tf_seq_bytes(const tf_model *m, const tf_seq *s);
/* Bytes a sequence of `tokens` positions would hold (for admission). */
size_t tf_seq_bytes_for(const tf_model *m, int64_t tokens);
/* A copy of s (cache rows up to its position), for n choices that share
 * one prefill; NULL when out of memory. */
tf_seq *tf_seq_fork(const tf_model *m, const tf_seq *s);

/* The k most likely ids (and their log-probabilities) at each scored
 * position, row-major [rows, k], for a completion's top_logprobs. */
typedef struct tf_top {
  int64_t k;
  int32_t *ids;
  float *lp;
} tf_top;

/* Appends ids[0..n) to s. lp (may be NULL) receives the log-probability of
 * each new token that has one before it (n entries when s was not empty,
 * else n - 1), and top (may be NULL) the k most likely ids at each of those
 * positions; next_logits [V] (may be NULL) the logits after the last. */
int tf_prefill(const tf_model *m, pool_t *pool, tf_seq *s, const int64_t *ids, int64_t n, float *lp,
               float *next_logits, const tf_top *top, const md_call *c, ts_err *err);

/* One token per sequence: ids[b] is appended to seqs[b] and logits
 * [B, V] receive the logits after it. All B sequences advance or none. */
int tf_decode_batch(const tf_model *m, pool_t *pool, tf_seq *const *seqs, const int64_t *ids,
                    int64_t B, float *logits, const md_call *c, ts_err *err);
/* Longest sequence the model takes (learned positions), or INT64_MAX (RoPE). */
int64_t tf_max_positions(const tf_model *m);

#endif
