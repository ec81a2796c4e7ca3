/* sample.h - from one decoding step's logits to the next token: the
 * penalties, temperature, top-k, top-p and min-p of text generation, the
 * log-probabilities a completion reports, seeded draws and stop strings.
 *
 * Order of a step (the contract of docs/generate.md): repetition penalty,
 * presence and frequency penalties, temperature, top-k, top-p, min-p, then a
 * draw from the renormalised distribution. Temperature 0 is greedy: the
 * argmax of the penalised logits, the lowest id on ties, no draw at all.
 * Log-probabilities are always log_softmax of the model's raw logits, so
 * they score the text whatever the sampling settings.
 *
 * Determinism: candidates are ordered by logit, then by id, and the draw
 * walks that order with one uniform number from a splitmix64 stream owned by
 * the sequence, so the same seed gives the same tokens whatever else the
 * server runs. Tokens whose probability is below e^-SMP_CUTOFF of the most
 * likely one (about 4e-18 of it) are never candidates of a filtered draw;
 * their total mass is below 1e-12 even for a 100k vocabulary.
 *
 * Ownership: an smp_state is caller-owned; smp_init allocates its buffers
 * (O(V)), smp_free releases them. Logits are borrowed and never modified. */
#ifndef TALLYD_SAMPLE_H
#define TALLYD_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

#include "../base/err.h"

#define SMP_CUTOFF 40.0f
#define SMP_MAX_STOPS 4

typedef struct smp_params {
  double temperature;        /* >= 0; 0: greedy */
  double top_p;              /* (0, 1]; 1: off */
  int64_t top_k;             /* >= 0; 0: off */
  double min_p;              /* [0, 1]; 0: off */
  double repetition_penalty; /* > 0; 1: off (CTRL rule over prompt and output) */
  double presence_penalty;   /* OpenAI rule over the generated tokens */
  double frequency_penalty;
} smp_params;

/* OpenAI's defaults: temperature 1, top_p 1, everything else off. */
smp_params smp_defaults(void);
/* -TS_EINVAL naming the first parameter out of range (and its range). */
int smp_check(const smp_params *p, ts_err *err);

typedef struct smp_state {
  int64_t V;
  uint64_t rng;        /* splitmix64 state */
  uint32_t *gen_count; /* [V] how often each id was generated */
  uint8_t *seen;       /* [V] 1: in the prompt or the output */
  int32_t *seen_ids;   /* the ids with seen == 1, in first-seen order */
  int64_t n_seen;
  int32_t *gen_ids; /* the ids with gen_count > 0, in first-generated order */
  int64_t n_gen;
  float *work;   /* [V] the step's processed logits */
  int32_t *cand; /* [V] candidate ids of a filtered draw */
} smp_state;

/* Buffers for a vocabulary of V ids and the generator seeded with seed.
 * 0 or -TS_ENOMEM / -TS_EINVAL (V < 1). */
int smp_init(smp_state *s, int64_t V, uint64_t seed, ts_err *err);
void smp_free(smp_state *s);
/* Ids outside [0, V) are ignored (the caller validated them). */
void smp_observe_prompt(smp_state *s, const int32_t *ids, int64_t n);
void smp_observe(smp_state *s, int32_t id);

/* The next token from raw logits[V] under p. */
int32_t smp_next(smp_state *s, const smp_params *p, const float *logits);

/* lp[0..V) = log_softmax(logits) with a double-precision sum; returns the
 * log of the normaliser. lp may be NULL (then only the normaliser). */
double smp_log_softmax(const float *logits, int64_t V, float *lp);
/* The k largest values of x[0..V) (ties: lower id first), written to ids in
 * descending order; returns how many (min(k, V)). */
int64_t smp_top_ids(const float *x, int64_t V, int64_t k, int32_t *ids);

/* Stop strings. Given the text generated so far, where the earliest stop
 * string starts (or -1), and how many leading bytes are safe to show a
 * streaming client now: none of them can become part of a stop string
 * whatever comes next (a suffix that is a prefix of a stop string is held
 * back). */
typedef struct smp_stops {
  int n;
  const char *s[SMP_MAX_STOPS];
  size_t len[SMP_MAX_STOPS];
} smp_stops;

int64_t smp_stop_find(const smp_stops *st, const char *text, size_t len);
size_t smp_stop_safe(const smp_stops *st, const char *text, size_t len);

#endif
