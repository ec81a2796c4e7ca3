/* generate.h - text generation for one transformer model version, with
 * continuous batching. Token ids in, token events out: no text, no HTTP
 * (the server layer tokenizes, matches stop strings and streams).
 *
 * One scheduler thread per engine. Each step it (1) ends the requests that
 * were cancelled or passed their deadline, (2) admits waiting requests in
 * arrival order while sequence slots and KV-cache bytes allow, (3) prefills
 * prompts, at most cfg.prefill_chunk tokens per step in all, so that a long
 * prompt does not stall the others, and (4) runs every sequence that has a
 * token to feed through ONE batched decode step (tf_decode_batch: each
 * weight matrix is read once per step). The n choices of a request share
 * one prefill (the cache is forked after it). A choice's tokens depend only
 * on its logits and its own seeded generator, never on what else runs, so
 * greedy and seeded results are the same under any load.
 *
 * Events, all on the scheduler thread, for one request in this order:
 * GEN_PROMPT for each prompt token when echo and logprobs were asked (the
 * first token's logprob is NaN: nothing precedes it), then GEN_TOKEN and
 * GEN_END events of the choices interleaved, then exactly one GEN_FINAL.
 * After GEN_FINAL the engine never calls back for that request again.
 * The callback must be quick (copy and signal); its verdict for GEN_TOKEN
 * is 0 to go on or 1 to end that choice now with finish "stop" (the caller
 * found a stop string).
 *
 * Ownership: gen_submit returns a handle holding two references, the
 * engine's (dropped after GEN_FINAL) and the caller's (dropped by
 * gen_release, after which the caller must not use the handle). The prompt
 * is copied; `user` must stay valid until GEN_FINAL. */
#ifndef TALLYD_GENERATE_H
#define TALLYD_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../methods/sample.h"
#include "transformer.h"

#define GEN_MAX_N 16
#define GEN_MAX_LOGPROBS 20

typedef struct gen_config {
  int max_active;        /* sequences decoded together (default 64) */
  int64_t prefill_chunk; /* prompt tokens per step over all prompts (default 256) */
  int queue_cap;         /* requests waiting for room; beyond it -TS_EBUSY (default 256) */
  /* The KV-cache byte budget shared with sessions: reserve returns 0 when
   * the bytes fit (and takes them). NULL: no budget. */
  int (*kv_reserve)(void *ctx, size_t bytes);
  void (*kv_release)(void *ctx, size_t bytes);
  void *kv_ctx;
} gen_config;

typedef struct gen_params {
  int64_t max_tokens; /* >= 0; 0: prefill only (scoring a prompt with echo) */
  smp_params smp;
  int has_seed;
  uint64_t seed;
  int n;        /* choices, 1..GEN_MAX_N */
  int logprobs; /* -1: none; 0..GEN_MAX_LOGPROBS: the sampled token's plus that many top */
  int echo;     /* report the prompt's tokens (GEN_PROMPT) when logprobs >= 0 */
  int ignore_eos;
  int64_t eos_id;  /* -1: none */
  double deadline; /* md_now() seconds; 0: none */
} gen_params;

enum gen_event_kind { GEN_PROMPT = 0, GEN_TOKEN = 1, GEN_END = 2, GEN_FINAL = 3 };

typedef struct gen_event {
  int kind;
  int choice;    /* GEN_TOKEN/GEN_END: 0..n-1; else -1 */
  int64_t index; /* GEN_PROMPT: position in the prompt; GEN_TOKEN: in the choice's output */
  int64_t token;
  float logprob; /* log_softmax of the raw logits; NaN when not asked or undefined */
  int n_top;
  int32_t top_id[GEN_MAX_LOGPROBS];
  float top_lp[GEN_MAX_LOGPROBS];
  const char *finish; /* GEN_END: "stop", "length", "timeout", "cancelled" or "error" */
  const char *error;  /* finish "error": why */
  int64_t prompt_tokens, completion_tokens; /* GEN_FINAL: usage */
  double t;                                 /* md_now() when the event was made */
} gen_event;

typedef int (*gen_emit_fn)(void *user, const gen_event *ev);

typedef struct gen_engine gen_engine;
typedef struct gen_req gen_req;

/* cfg may be NULL (defaults). The model and pool are borrowed for the
 * engine's life. */
int gen_engine_new(const tf_model *m, pool_t *pool, const gen_config *cfg, gen_engine **out,
                   ts_err *err);
/* Ends every request ("cancelled", with its GEN_FINAL), joins the thread. */
void gen_engine_free(gen_engine *e);

/* -TS_EINVAL (bad parameters, ids outside the vocabulary, prompt plus
 * max_tokens past learned positions, empty prompt), -TS_EBUSY (queue
 * full), -TS_ENOMEM. On success the request runs and *out is its handle. */
int gen_submit(gen_engine *e, const int64_t *prompt, int64_t n_prompt, const gen_params *p,
               gen_emit_fn emit, void *user, gen_req **out, ts_err *err);
/* The request ends within one step with finish "cancelled". */
void gen_cancel(gen_req *r);
void gen_release(gen_req *r);

typedef struct gen_stats {
  int active_sequences, waiting_requests;
  size_t kv_bytes; /* reserved by running requests */
  uint64_t prompt_tokens, completion_tokens, steps, batched_sequences;
} gen_stats;
void gen_engine_stats(gen_engine *e, gen_stats *out);

#endif
