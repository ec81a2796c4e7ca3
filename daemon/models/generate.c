/* generate.c - the continuous-batching scheduler of text generation (see
 * generate.h for the step, the events and ownership).
 *
 * Invariants: the waiting queue and the counters are guarded by e->mu; the
 * active list, every sequence and every sampler belong to the scheduler
 * thread alone; a request's KV bytes are reserved from admission until its
 * GEN_FINAL; a request's `cancelled` flag is the only field another thread
 * writes after submission. */
#include "generate.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/random.h>
#include <uv.h>

#include "../base/mem.h"
#include "../base/rng.h"
#include "model.h"

enum { RQ_WAITING = 0, RQ_PREFILL, RQ_DECODE };

typedef struct gen_choice {
  tf_seq *seq;
  smp_state smp;
  int64_t pending;  /* sampled, to be fed at the next decode step; -1: none */
  int64_t produced; /* completion tokens so far */
  int done;
} gen_choice;

struct gen_req {
  gen_engine *e;
  atomic_int refs;
  volatile int cancelled; /* written by gen_cancel (any thread), read with __atomic */
  int64_t *prompt, n_prompt, prefilled;
  gen_params p;
  gen_emit_fn emit;
  void *user;
  size_t kv_bytes;
  int state, n_open, final_sent;
  float *logits; /* [V] after the prompt, until the choices are set up */
  gen_choice ch[GEN_MAX_N];
  gen_req *next;
};

struct gen_engine {
  const tf_model *m;
  pool_t *pool;
  gen_config cfg;
  int64_t V;
  uv_thread_t thread;
  uv_mutex_t mu;
  uv_cond_t cv;
  gen_req *wait_head, *wait_tail;
  int n_waiting, stopping;
  gen_req **active; /* scheduler thread only */
  int n_active, active_seqs;
  float *logits; /* [max_active, V] */
  tf_seq **bseq; /* [max_active] the decode batch */
  int64_t *btok;
  int *breq, *bch;
  gen_stats st; /* under mu */
};

/* ---- requests ------------------------------------------------------------- */

static void req_unref(gen_req *r) {
  if (atomic_fetch_sub(&r->refs, 1) != 1) return;
  for (int c = 0; c < r->p.n; c++) {
    tf_seq_free(r->ch[c].seq);
    smp_free(&r->ch[c].smp);
  }
  tl_free(r->logits);
  tl_free(r->prompt);
  tl_free(r);
}

void gen_cancel(gen_req *r) {
  __atomic_store_n(&r->cancelled, 1, __ATOMIC_RELEASE);
}
static int cancelled(gen_req *r) {
  return __atomic_load_n(&r->cancelled, __ATOMIC_ACQUIRE);
}
void gen_release(gen_req *r) {
  req_unref(r);
}

static gen_event event(int kind, int choice) {
  gen_event ev;
  memset(&ev, 0, sizeof ev);
  ev.kind = kind;
  ev.choice = choice;
  ev.token = -1;
  ev.logprob = NAN;
  ev.t = md_now();
  return ev;
}

/* Ends one choice (once), and the request with its GEN_FINAL when it was
 * the last open one. */
static void end_choice(gen_engine *e, gen_req *r, int c, const char *finish, const char *why) {
  gen_choice *ch = &r->ch[c];
  if (ch->done) return;
  ch->done = 1;
  ch->pending = -1;
  gen_event ev = event(GEN_END, c);
  ev.finish = finish;
  ev.error = why;
  r->emit(r->user, &ev);
  if (--r->n_open > 0) return;
  gen_event fin = event(GEN_FINAL, -1);
  fin.prompt_tokens = r->n_prompt;
  for (int k = 0; k < r->p.n; k++) fin.completion_tokens += r->ch[k].produced;
  uv_mutex_lock(&e->mu);
  e->st.completion_tokens += (uint64_t)fin.completion_tokens;
  e->st.kv_bytes -= r->kv_bytes;
  if (r->state != RQ_WAITING) e->active_seqs -= r->p.n;
  uv_mutex_unlock(&e->mu);
  if (r->kv_bytes && e->cfg.kv_release) e->cfg.kv_release(e->cfg.kv_ctx, r->kv_bytes);
  r->kv_bytes = 0;
  r->final_sent = 1;
  r->emit(r->user, &fin);
}

static void end_request(gen_engine *e, gen_req *r, const char *finish, const char *why) {
  for (int c = 0; c < r->p.n; c++) end_choice(e, r, c, finish, why);
}

/* ---- submission ----------------------------------------------------------- */

int gen_submit(gen_engine *e, const int64_t *prompt, int64_t n_prompt, const gen_params *p,
               gen_emit_fn emit, void *user, gen_req **out, ts_err *err) {
  *out = NULL;
  int rc = smp_check(&p->smp, err);
  if (rc) return rc;
  if (n_prompt < 1) return ts_errf(err, TS_EINVAL, "prompt: at least one token is needed");
  if (p->max_tokens < 0)
    return ts_errf(err, TS_EINVAL, "max_tokens must be >= 0, got %lld", (long long)p->max_tokens);
  if (p->n < 1 || p->n > GEN_MAX_N)
    return ts_errf(err, TS_EINVAL, "n must be in 1..%d, got %d", GEN_MAX_N, p->n);
  if (p->logprobs < -1 || p->logprobs > GEN_MAX_LOGPROBS)
    return ts_errf(err, TS_EINVAL, "logprobs must be in 0..%d, got %d", GEN_MAX_LOGPROBS,
                   p->logprobs);
  if (p->n > e->cfg.max_active)
    return ts_errf(err, TS_EINVAL,
                   "n = %d is more than the %d sequences this model decodes at once", p->n,
                   e->cfg.max_active);
  for (int64_t i = 0; i < n_prompt; i++)
    if (prompt[i] < 0 || prompt[i] >= e->V)
      return ts_errf(err, TS_EINVAL,
                     "prompt: token %lld at position %lld is outside the "
                     "vocabulary [0, %lld)",
                     (long long)prompt[i], (long long)i, (long long)e->V);
  int64_t maxpos = tf_max_positions(e->m);
  if (n_prompt > maxpos || p->max_tokens > maxpos - n_prompt)
    return ts_errf(err, TS_EINVAL,
                   "prompt (%lld tokens) + max_tokens (%lld) is beyond this model's context of "
                   "%lld learned positions",
                   (long long)n_prompt, (long long)p->max_tokens, (long long)maxpos);
  gen_req *r = tl_calloc(1, sizeof *r);
  if (!r) return ts_errf(err, TS_ENOMEM, "out of memory");
  r->prompt = tl_malloc(sizeof(int64_t) * (size_t)n_prompt);
  r->logits = tl_malloc(sizeof(float) * (size_t)e->V);
  if (!r->prompt || !r->logits) {
    tl_free(r->prompt);
    tl_free(r->logits);
    tl_free(r);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  memcpy(r->prompt, prompt, sizeof(int64_t) * (size_t)n_prompt);
  r->e = e;
  r->n_prompt = n_prompt;
  r->p = *p;
  r->emit = emit;
  r->user = user;
  r->n_open = p->n;
  for (int c = 0; c < p->n; c++) r->ch[c].pending = -1;
  atomic_init(&r->refs, 2);
  uv_mutex_lock(&e->mu);
  if (e->stopping || e->n_waiting >= e->cfg.queue_cap) {
    int stopping = e->stopping;
    uv_mutex_unlock(&e->mu);
    tl_free(r->prompt);
    tl_free(r->logits);
    tl_free(r);
    return stopping ? ts_errf(err, TS_EUNAVAIL, "the model is being unloaded")
                    : ts_errf(err, TS_EBUSY, "generation queue is full (%d requests waiting)",
                              e->cfg.queue_cap);
  }
  if (e->wait_tail)
    e->wait_tail->next = r;
  else
    e->wait_head = r;
  e->wait_tail = r;
  e->n_waiting++;
  uv_cond_signal(&e->cv);
  uv_mutex_unlock(&e->mu);
  *out = r;
  return 0;
}

/* ---- the scheduler -------------------------------------------------------- */

static int expired(const gen_req *r, double now) {
  return r->p.deadline > 0 && now > r->p.deadline;
}

/* Moves admissible waiting requests to the active list; requests cancelled
 * or expired while waiting are returned through *gone to be ended outside
 * the lock. Called with e->mu held. */
static void admit(gen_engine *e, gen_req **gone) {
  double now = md_now();
  gen_req **pp = &e->wait_head, *prev = NULL;
  while (*pp) {
    gen_req *r = *pp;
    int drop = cancelled(r) || expired(r, now) || e->stopping;
    if (!drop) {
      if (e->active_seqs + r->p.n > e->cfg.max_active) break; /* first come, first served */
      size_t need = (size_t)r->p.n * tf_seq_bytes_for(e->m, r->n_prompt + r->p.max_tokens + 1);
      if (e->cfg.kv_reserve && e->cfg.kv_reserve(e->cfg.kv_ctx, need)) break;
      r->kv_bytes = need;
      e->st.kv_bytes += need;
    }
    *pp = r->next;
    if (e->wait_tail == r) e->wait_tail = prev;
    e->n_waiting--;
    r->next = NULL;
    if (drop) {
      r->next = *gone;
      *gone = r;
      continue;
    }
    r->state = RQ_PREFILL;
    e->active[e->n_active++] = r;
    e->active_seqs += r->p.n;
    e->st.prompt_tokens += (uint64_t)r->n_prompt;
  }
}

static void seed_choice(gen_req *r, int c, uint64_t *state) {
  if (r->p.has_seed) {
    *state = r->p.seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(c + 1));
    rng_next(state);
  } else if (getrandom(state, sizeof *state, 0) != (ssize_t)sizeof *state) {
    *state = (uint64_t)(md_now() * 1e9) ^ (uint64_t)(uintptr_t)r ^ (uint64_t)c;
  }
}

/* Samples choice c's next token from its logits and emits it; ends the
 * choice on eos, a stop verdict, max_tokens or the context's end. */
static void sample(gen_engine *e, gen_req *r, int c, const float *logits) {
  gen_choice *ch = &r->ch[c];
  if (ch->produced >= r->p.max_tokens) {
    end_choice(e, r, c, "length", NULL);
    return;
  }
  int64_t tok = smp_next(&ch->smp, &r->p.smp, logits);
  ch->produced++;
  if (tok == r->p.eos_id && !r->p.ignore_eos) {
    end_choice(e, r, c, "stop", NULL);
    return;
  }
  gen_event ev = event(GEN_TOKEN, c);
  ev.index = ch->produced - 1;
  ev.token = tok;
  if (r->p.logprobs >= 0) {
    double lz = smp_log_softmax(logits, e->V, NULL);
    ev.logprob = (float)((double)logits[tok] - lz);
    ev.n_top = (int)smp_top_ids(logits, e->V, r->p.logprobs, ev.top_id);
    for (int i = 0; i < ev.n_top; i++) ev.top_lp[i] = (float)((double)logits[ev.top_id[i]] - lz);
  }
  int verdict = r->emit(r->user, &ev);
  smp_observe(&ch->smp, (int32_t)tok);
  if (verdict == 1)
    end_choice(e, r, c, "stop", NULL);
  else if (ch->produced >= r->p.max_tokens)
    end_choice(e, r, c, "length", NULL);
  else if (tf_seq_pos(ch->seq) >= tf_max_positions(e->m))
    end_choice(e, r, c, "length", NULL);
  else
    ch->pending = tok;
}

/* After the prompt: forks the cache for choices 1..n-1 and samples every
 * choice's first token from the prompt's logits. */
static void start_choices(gen_engine *e, gen_req *r) {
  r->state = RQ_DECODE;
  if (r->p.max_tokens == 0) {
    end_request(e, r, "length", NULL);
    return;
  }
  ts_err err;
  for (int c = 0; c < r->p.n; c++) {
    gen_choice *ch = &r->ch[c];
    if (c > 0 && !(ch->seq = tf_seq_fork(e->m, r->ch[0].seq))) {
      end_choice(e, r, c, "error", "out of memory forking the prompt's cache");
      continue;
    }
    uint64_t seed;
    seed_choice(r, c, &seed);
    if (smp_init(&ch->smp, e->V, seed, &err)) {
      end_choice(e, r, c, "error", "out of memory for the sampler");
      continue;
    }
    for (int64_t i = 0; i < r->n_prompt; i++) { /* the repetition penalty covers the prompt */
      int32_t id = (int32_t)r->prompt[i];
      smp_observe_prompt(&ch->smp, &id, 1);
    }
  }
  for (int c = 0; c < r->p.n; c++)
    if (!r->ch[c].done) sample(e, r, c, r->logits);
}

/* One prompt chunk of r; returns the tokens used. */
static int64_t prefill_chunk(gen_engine *e, gen_req *r, int64_t budget) {
  ts_err err;
  int64_t n = r->n_prompt - r->prefilled;
  if (n > budget) n = budget;
  int last = r->prefilled + n == r->n_prompt;
  if (!r->ch[0].seq && !(r->ch[0].seq = tf_seq_new(e->m, NULL))) {
    end_request(e, r, "error", "out of memory for the KV cache");
    return n;
  }
  int want = r->p.echo && r->p.logprobs >= 0;
  int64_t k = r->p.logprobs > 0 ? r->p.logprobs : 0, rows = r->prefilled > 0 ? n : n - 1;
  float *lp = want ? tl_malloc(sizeof(float) * (size_t)(n + 1)) : NULL;
  tf_top top = {k, NULL, NULL};
  if (want && k > 0) {
    top.ids = tl_malloc(sizeof(int32_t) * (size_t)((rows + 1) * k));
    top.lp = tl_malloc(sizeof(float) * (size_t)((rows + 1) * k));
  }
  md_call c;
  memset(&c, 0, sizeof c);
  c.deadline = r->p.deadline;
  c.cancelled = &r->cancelled;
  int rc;
  if ((want && !lp) || (want && k > 0 && (!top.ids || !top.lp)))
    rc = ts_errf(&err, TS_ENOMEM, "out of memory for the prompt's log-probabilities");
  else
    rc = tf_prefill(e->m, e->pool, r->ch[0].seq, r->prompt + r->prefilled, n, lp,
                    last ? r->logits : NULL, want && k > 0 ? &top : NULL, &c, &err);
  if (rc) {
    end_request(e, r, rc == -TS_ETIMEOUT ? (cancelled(r) ? "cancelled" : "timeout") : "error",
                rc == -TS_ETIMEOUT ? NULL : err.msg);
  } else if (want) {
    int64_t first = r->prefilled; /* prompt index of this chunk's first token */
    for (int64_t i = 0; i < n; i++) {
      gen_event ev = event(GEN_PROMPT, -1);
      ev.index = first + i;
      ev.token = r->prompt[first + i];
      int64_t row = first == 0 ? i - 1 : i; /* the row that scores this token */
      if (row >= 0) {
        ev.logprob = lp[row];
        ev.n_top = (int)k;
        for (int64_t j = 0; j < k; j++) {
          ev.top_id[j] = top.ids[row * k + j];
          ev.top_lp[j] = top.lp[row * k + j];
        }
      }
      r->emit(r->user, &ev);
    }
  }
  tl_free(lp);
  tl_free(top.ids);
  tl_free(top.lp);
  if (!rc) {
    r->prefilled += n;
    if (last) start_choices(e, r);
  }
  return n;
}

static void decode_step(gen_engine *e) {
  int B = 0;
  for (int i = 0; i < e->n_active; i++) {
    gen_req *r = e->active[i];
    if (r->state != RQ_DECODE) continue;
    for (int c = 0; c < r->p.n; c++)
      if (!r->ch[c].done && r->ch[c].pending >= 0) {
        e->bseq[B] = r->ch[c].seq;
        e->btok[B] = r->ch[c].pending;
        e->breq[B] = i;
        e->bch[B] = c;
        B++;
      }
  }
  if (B == 0) return;
  ts_err err;
  int rc = tf_decode_batch(e->m, e->pool, e->bseq, e->btok, B, e->logits, NULL, &err);
  uv_mutex_lock(&e->mu);
  e->st.steps++;
  e->st.batched_sequences += (uint64_t)B;
  uv_mutex_unlock(&e->mu);
  for (int b = 0; b < B; b++) {
    gen_req *r = e->active[e->breq[b]];
    if (rc)
      end_choice(e, r, e->bch[b], "error", err.msg);
    else
      sample(e, r, e->bch[b], e->logits + (int64_t)b * e->V);
  }
}

/* Drops finished requests from the active list (their FINAL was sent). */
static void sweep(gen_engine *e) {
  int j = 0;
  for (int i = 0; i < e->n_active; i++) {
    gen_req *r = e->active[i];
    if (r->final_sent) {
      req_unref(r);
    } else {
      e->active[j++] = r;
    }
  }
  e->n_active = j;
}

static void step(gen_engine *e) {
  double now = md_now();
  for (int i = 0; i < e->n_active; i++) { /* cancelled or past the deadline */
    gen_req *r = e->active[i];
    if (cancelled(r))
      end_request(e, r, "cancelled", NULL);
    else if (expired(r, now))
      end_request(e, r, "timeout", NULL);
  }
  sweep(e);
  int64_t budget = e->cfg.prefill_chunk;
  for (int i = 0; i < e->n_active && budget > 0; i++) {
    gen_req *r = e->active[i];
    if (r->state == RQ_PREFILL && !r->final_sent) budget -= prefill_chunk(e, r, budget);
  }
  decode_step(e);
  sweep(e);
}

static void scheduler_main(void *arg) {
  gen_engine *e = arg;
  for (;;) {
    gen_req *gone = NULL;
    uv_mutex_lock(&e->mu);
    while (!e->stopping && e->n_waiting == 0 && e->n_active == 0) uv_cond_wait(&e->cv, &e->mu);
    int stopping = e->stopping;
    admit(e, &gone);
    int idle = e->n_active == 0 && e->n_waiting > 0 && !gone;
    if (idle) /* waiting for KV room held by sessions: look again shortly */
      uv_cond_timedwait(&e->cv, &e->mu, 10 * 1000 * 1000);
    uv_mutex_unlock(&e->mu);
    while (gone) {
      gen_req *r = gone;
      gone = r->next;
      end_request(e, r, cancelled(r) || stopping ? "cancelled" : "timeout", NULL);
      req_unref(r);
    }
    if (stopping) {
      for (int i = 0; i < e->n_active; i++) end_request(e, e->active[i], "cancelled", NULL);
      sweep(e);
      uv_mutex_lock(&e->mu);
      int left = e->n_waiting;
      uv_mutex_unlock(&e->mu);
      if (!left) return;
      continue;
    }
    if (e->n_active) step(e);
  }
}

/* ---- the engine ----------------------------------------------------------- */

int gen_engine_new(const tf_model *m, pool_t *pool, const gen_config *cfg, gen_engine **out,
                   ts_err *err) {
  *out = NULL;
  gen_engine *e = tl_calloc(1, sizeof *e);
  if (!e) return ts_errf(err, TS_ENOMEM, "out of memory");
  if (cfg) e->cfg = *cfg;
  if (e->cfg.max_active <= 0) e->cfg.max_active = 64;
  if (e->cfg.prefill_chunk <= 0) e->cfg.prefill_chunk = 256;
  if (e->cfg.queue_cap <= 0) e->cfg.queue_cap = 256;
  e->m = m;
  e->pool = pool;
  e->V = tf_vocab(m);
  int A = e->cfg.max_active;
  e->active = tl_calloc((size_t)A, sizeof *e->active);
  e->logits = tl_malloc(sizeof(float) * (size_t)A * (size_t)e->V);
  e->bseq = tl_calloc((size_t)A, sizeof *e->bseq);
  e->btok = tl_calloc((size_t)A, sizeof *e->btok);
  e->breq = tl_calloc((size_t)A, sizeof *e->breq);
  e->bch = tl_calloc((size_t)A, sizeof *e->bch);
  if (!e->active || !e->logits || !e->bseq || !e->btok || !e->breq || !e->bch) goto nomem;
  if (uv_mutex_init(&e->mu)) goto nomem;
  if (uv_cond_init(&e->cv)) {
    uv_mutex_destroy(&e->mu);
    goto nomem;
  }
  if (uv_thread_create(&e->thread, scheduler_main, e)) {
    uv_cond_destroy(&e->cv);
    uv_mutex_destroy(&e->mu);
    goto nomem;
  }
  *out = e;
  return 0;
nomem:
  tl_free(e->active);
  tl_free(e->logits);
  tl_free(e->bseq);
  tl_free(e->btok);
  tl_free(e->breq);
  tl_free(e->bch);
  tl_free(e);
  return ts_errf(err, TS_ENOMEM, "out of memory starting the generation scheduler");
}

void gen_engine_free(gen_engine *e) {
  if (!e) return;
  uv_mutex_lock(&e->mu);
  e->stopping = 1;
  uv_cond_broadcast(&e->cv);
  uv_mutex_unlock(&e->mu);
  uv_thread_join(&e->thread);
  uv_cond_destroy(&e->cv);
  uv_mutex_destroy(&e->mu);
  tl_free(e->active);
  tl_free(e->logits);
  tl_free(e->bseq);
  tl_free(e->btok);
  tl_free(e->breq);
  tl_free(e->bch);
  tl_free(e);
}

void gen_engine_stats(gen_engine *e, gen_stats *out) {
  uv_mutex_lock(&e->mu);
  *out = e->st;
  out->active_sequences = e->active_seqs;
  out->waiting_requests = e->n_waiting;
  uv_mutex_unlock(&e->mu);
}
