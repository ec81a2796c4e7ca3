/* completions.c - text endpoints of transformer models with a tokenizer:
 * OpenAI's /v1/completions and /v1/models, Triton's generate and
 * generate_stream, tokenize and detokenize (docs/generation.md).
 *
 * A generation is a request to the model version's engine (models/
 * generate.h: continuous batching). The handler runs on a worker, checks
 * the body, submits the prompt and returns at once; the engine's thread
 * then delivers token events to this file's callback, which turns bytes
 * into valid UTF-8 text (text/tokenizer.h), finds stop strings across
 * token boundaries and either builds the whole answer (finishing the job
 * later: job_defer/job_finish) or writes server-sent events to a stream
 * (stream.h). A generation holds its own reference to the model version, so
 * an unload waits for it. A client that goes away cancels it within one
 * step (the stream's on_gone, or the job's cancelled flag). */
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/jtext.h"
#include "../base/mem.h"
#include "../base/randid.h"
#include "../models/generate.h"
#include "../models/transformer.h"
#include "../text/tokenizer.h"
#include "metrics.h"
#include "repo_json.h"
#include "server.h"
#include "sched.h"
#include "stream.h"

enum { API_OPENAI = 0, API_TRITON = 1 };

#define MAX_STOPS 4

/* ---- errors -------------------------------------------------------------- */

/* OpenAI's error shape on the /v1 routes: {"error": {"message", "type", "param", "code"}}. */
static void openai_error(resp *r, const ts_err *e, const char *param) {
  int code = http_status_of(e->status);
  const char *type = code == 429   ? "rate_limit_error"
                     : code >= 500 ? "server_error"
                                   : "invalid_request_error";
  json_t *o =
      json_pack("{s:{s:s, s:s, s:o, s:s}}", "error", "message", e->msg, "type", type, "param",
                param ? json_string(param) : json_null(), "code", ts_status_name(e->status));
  resp_json(r, code, o);
  json_decref(o);
  if (code == 429) r->retry_after = 1;
}

static void answer_error(job *j, int api, const ts_err *e, const char *param) {
  if (api == API_OPENAI)
    openai_error(&j->out, e, param);
  else {
    resp_error(&j->out, e);
    if (http_status_of(e->status) == 429) j->out.retry_after = 1;
  }
}

/* ---- the model ----------------------------------------------------------- */

/* The version's transformer and tokenizer: 400 for another kind or a model
 * without a tokenizer. */
static int text_model(repo_ver *v, tf_model **m, const tk_tokenizer **tok, ts_err *err) {
  const md_kind *k = repo_ver_kind(v);
  if (strcmp(k->name, "transformer") != 0)
    return ts_errf(
        err, TS_EINVAL,
        "model '%s' is of kind %s and has no tokenizer: text endpoints need a transformer with one",
        repo_ver_model(v), k->name);
  *m = repo_ver_state(v);
  *tok = tf_tokenizer(*m);
  if (!*tok && tf_tokenizer_error(*m))
    return ts_errf(err, TS_EINVAL, "model '%s' has no usable tokenizer: %s", repo_ver_model(v),
                   tf_tokenizer_error(*m));
  if (!*tok)
    return ts_errf(err, TS_EINVAL,
                   "model '%s' has no tokenizer: set \"tokenizer\" in its config.json or add "
                   "tokenizer.json (or vocab.json + merges.txt) to it; it scores token ids at "
                   "/v2/models/%s/infer",
                   repo_ver_model(v), repo_ver_model(v));
  return 0;
}

static json_t *parse_body(job *j, ts_err *err) {
  json_error_t je;
  json_t *b = json_loadb(j->body ? j->body : "", j->len, JSON_REJECT_DUPLICATES, &je);
  if (!b) {
    ts_errf(err, TS_EINVAL, "the body is not valid JSON (line %d, column %d: %s)", je.line,
            je.column, je.text);
    return NULL;
  }
  if (!json_is_object(b)) {
    json_decref(b);
    ts_errf(err, TS_EINVAL, "the body must be a JSON object");
    return NULL;
  }
  return b;
}

/* ---- the KV-cache budget, shared with sessions --------------------------- */

static atomic_llong gen_kv_bytes;
static int64_t gen_kv_cap;

/* ctx: the model's counter (sched_kv_slot), or NULL */
static int kv_reserve(void *ctx, size_t bytes) {
  int64_t cap = gen_kv_cap - (int64_t)metrics_session_bytes();
  long long cur = atomic_load(&gen_kv_bytes);
  for (;;) {
    if (cur + (long long)bytes > cap) return -1;
    if (atomic_compare_exchange_weak(&gen_kv_bytes, &cur, cur + (long long)bytes)) break;
  }
  metrics_set_generate_kv((int64_t)(cur + (long long)bytes));
  if (ctx) atomic_fetch_add((atomic_llong *)ctx, (long long)bytes);
  return 0;
}

static void kv_release(void *ctx, size_t bytes) {
  if (ctx) atomic_fetch_sub((atomic_llong *)ctx, (long long)bytes);
  long long now = atomic_fetch_sub(&gen_kv_bytes, (long long)bytes) - (long long)bytes;
  metrics_set_generate_kv((int64_t)now);
}

static int get_engine(job *j, tf_model *m, gen_engine **e, ts_err *err) {
  gen_config cfg = {0};
  cfg.max_active = 64;
  cfg.prefill_chunk = 256;
  cfg.queue_cap = (int)(j->srv->cfg->queue_depth > 0 ? j->srv->cfg->queue_depth : 256);
  gen_kv_cap = j->srv->cfg->kv_cache_bytes;
  cfg.kv_reserve = kv_reserve;
  cfg.kv_release = kv_release;
  cfg.kv_ctx = sched_kv_slot(j->rt.model);
  return tf_engine(m, j->srv->pool, &cfg, e, err);
}

/* ---- parameters ---------------------------------------------------------- */

typedef struct gen_opts {
  gen_params p;
  int stream;
  int n_stops;
  char *stops[MAX_STOPS];
  const char *bad_param; /* the parameter an error is about */
} gen_opts;

static void opts_free(gen_opts *o) {
  for (int i = 0; i < o->n_stops; i++) tl_free(o->stops[i]);
  o->n_stops = 0;
}

static int want_number(const json_t *v, const char *key, double lo, double hi, double *out,
                       ts_err *err) {
  if (!json_is_number(v)) return ts_errf(err, TS_EINVAL, "'%s' must be a number", key);
  double x = json_number_value(v);
  if (!(x >= lo && x <= hi))
    return ts_errf(err, TS_EINVAL, "'%s' is %g; allowed %g..%g", key, x, lo, hi);
  *out = x;
  return 0;
}

static int want_int(const json_t *v, const char *key, int64_t lo, int64_t hi, int64_t *out,
                    ts_err *err) {
  if (!json_is_integer(v)) return ts_errf(err, TS_EINVAL, "'%s' must be an integer", key);
  int64_t x = json_integer_value(v);
  if (x < lo || x > hi)
    return ts_errf(err, TS_EINVAL, "'%s' is %" PRId64 "; allowed %" PRId64 "..%" PRId64, key, x, lo,
                   hi);
  *out = x;
  return 0;
}

static int want_bool(const json_t *v, const char *key, int *out, ts_err *err) {
  if (!json_is_boolean(v)) return ts_errf(err, TS_EINVAL, "'%s' must be true or false", key);
  *out = json_is_true(v);
  return 0;
}

static const char *const SAMPLING_KEYS =
    "max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, "
    "frequency_penalty, stop, seed, ignore_eos";

/* One sampling or length parameter (shared by /v1/completions and
 * generate's "parameters"); 1 when key is not one of them. */
static int parse_common(gen_opts *o, const char *key, const json_t *v, ts_err *err) {
  double d;
  int64_t i;
  int rc;
  if (!strcmp(key, "max_tokens")) {
    if (json_is_null(v)) return 0;
    if ((rc = want_int(v, key, 0, INT32_MAX, &i, err))) return rc;
    o->p.max_tokens = i;
  } else if (!strcmp(key, "temperature")) {
    if ((rc = want_number(v, key, 0, 1e6, &d, err))) return rc;
    o->p.smp.temperature = d;
  } else if (!strcmp(key, "top_p")) {
    if (!json_is_number(v)) return ts_errf(err, TS_EINVAL, "'top_p' must be a number");
    d = json_number_value(v);
    if (!(d > 0 && d <= 1)) return ts_errf(err, TS_EINVAL, "'top_p' is %g; allowed (0, 1]", d);
    o->p.smp.top_p = d;
  } else if (!strcmp(key, "top_k")) {
    if ((rc = want_int(v, key, 0, INT32_MAX, &i, err))) return rc;
    o->p.smp.top_k = i;
  } else if (!strcmp(key, "min_p")) {
    if ((rc = want_number(v, key, 0, 1, &d, err))) return rc;
    o->p.smp.min_p = d;
  } else if (!strcmp(key, "repetition_penalty")) {
    if (!json_is_number(v) || !(json_number_value(v) > 0) || json_number_value(v) > 1e6)
      return ts_errf(err, TS_EINVAL, "'repetition_penalty' must be a number > 0");
    o->p.smp.repetition_penalty = json_number_value(v);
  } else if (!strcmp(key, "presence_penalty")) {
    if ((rc = want_number(v, key, -2, 2, &d, err))) return rc;
    o->p.smp.presence_penalty = d;
  } else if (!strcmp(key, "frequency_penalty")) {
    if ((rc = want_number(v, key, -2, 2, &d, err))) return rc;
    o->p.smp.frequency_penalty = d;
  } else if (!strcmp(key, "seed")) {
    if (json_is_null(v)) return 0;
    if (!json_is_integer(v)) return ts_errf(err, TS_EINVAL, "'seed' must be an integer");
    o->p.has_seed = 1;
    o->p.seed = (uint64_t)json_integer_value(v);
  } else if (!strcmp(key, "ignore_eos")) {
    return want_bool(v, key, &o->p.ignore_eos, err);
  } else if (!strcmp(key, "stop")) {
    if (json_is_null(v)) return 0;
    const json_t *one[1] = {v};
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    if (!json_is_string(v) && !json_is_array(v))
      return ts_errf(err, TS_EINVAL, "'stop' must be a string or a list of up to %d strings",
                     MAX_STOPS);
    if (n > MAX_STOPS)
      return ts_errf(err, TS_EINVAL, "'stop' has %zu strings; at most %d", n, MAX_STOPS);
    for (size_t k = 0; k < n; k++) {
      const json_t *s = json_is_array(v) ? json_array_get(v, k) : one[0];
      if (!json_is_string(s) || json_string_length(s) == 0 || json_string_length(s) > 1024)
        return ts_errf(err, TS_EINVAL,
                       "'stop' strings must be non-empty strings of at most 1024 bytes");
      char *c = tl_strdup(json_string_value(s));
      if (!c) return ts_errf(err, TS_ENOMEM, "out of memory");
      o->stops[o->n_stops++] = c;
    }
  } else {
    return 1;
  }
  return 0;
}

static void opts_init(gen_opts *o) {
  memset(o, 0, sizeof *o);
  o->p.max_tokens = 16;
  o->p.smp = smp_defaults();
  o->p.n = 1;
  o->p.logprobs = -1;
  o->p.eos_id = -1;
}

/* ---- a running generation ------------------------------------------------ */

typedef struct choice {
  sbuf text; /* valid UTF-8: the generated text so far (echo: after the prompt's) */
  tk_utf8 u;
  size_t shown; /* bytes of text already streamed */
  size_t cut;   /* text ends here when a stop string was found; SIZE_MAX: none */
  const char *finish;
  json_t *lp_tokens, *lp_values, *lp_top, *lp_offset; /* logprobs (OpenAI's lists) */
  size_t raw_len;                                     /* bytes of token text so far (text_offset) */
  int64_t tokens;
} choice;

typedef struct gen_call {
  int api;
  job *j;        /* non-streamed: finished at GEN_FINAL */
  gstream *st;   /* streamed */
  repo_ver *ver; /* the call's own reference */
  const tk_tokenizer *tok;
  gen_req *req;
  pthread_mutex_t mu; /* req vs on_gone */
  int cancel_asked;
  gen_opts o;
  char id[48];
  int64_t created;
  char model[64];
  int64_t version;
  int echo;
  char *prompt_text; /* echo: the prompt as text */
  size_t prompt_len;
  smp_stops stops;
  choice ch[GEN_MAX_N];
  double t_submit, t_last;
  int first_seen;
} gen_call;

static void call_free(gen_call *c) {
  for (int i = 0; i < GEN_MAX_N; i++) {
    sbuf_free(&c->ch[i].text);
    json_decref(c->ch[i].lp_tokens);
    json_decref(c->ch[i].lp_values);
    json_decref(c->ch[i].lp_top);
    json_decref(c->ch[i].lp_offset);
  }
  opts_free(&c->o);
  tl_free(c->prompt_text);
  if (c->ver) repo_release(c->ver);
  pthread_mutex_destroy(&c->mu);
  tl_free(c);
}

/* The stream's client left (loop thread). */
static void call_gone(void *ctx) {
  gen_call *c = ctx;
  pthread_mutex_lock(&c->mu);
  c->cancel_asked = 1;
  if (c->req) gen_cancel(c->req);
  pthread_mutex_unlock(&c->mu);
}

static json_t *token_text_json(const tk_tokenizer *tok, int64_t id) {
  size_t len;
  const char *p = tk_token_bytes(tok, id, &len);
  sbuf b;
  sbuf_init(&b);
  if (p) tk_utf8_sanitize(p, len, &b);
  json_t *s = json_stringn(b.data ? b.data : "", b.len);
  sbuf_free(&b);
  return s;
}

static json_t *lp_json(float v) {
  return isfinite(v) ? json_real(v) : json_null();
}

static void record_logprob(gen_call *c, choice *ch, const gen_event *ev) {
  if (c->o.p.logprobs < 0) return;
  if (!ch->lp_tokens) {
    ch->lp_tokens = json_array();
    ch->lp_values = json_array();
    ch->lp_top = json_array();
    ch->lp_offset = json_array();
  }
  json_array_append_new(ch->lp_tokens, token_text_json(c->tok, ev->token));
  json_array_append_new(ch->lp_values, lp_json(ev->logprob));
  if (c->o.p.logprobs > 0 && ev->n_top > 0) {
    json_t *top = json_object();
    for (int k = 0; k < ev->n_top; k++) {
      json_t *t = token_text_json(c->tok, ev->top_id[k]);
      /* two ids with the same text: the likelier one stays */
      if (!json_object_get(top, json_string_value(t)))
        json_object_set_new(top, json_string_value(t), lp_json(ev->top_lp[k]));
      json_decref(t);
    }
    json_array_append_new(ch->lp_top, top);
  } else {
    json_array_append_new(ch->lp_top, json_null());
  }
  json_array_append_new(ch->lp_offset, json_integer((json_int_t)ch->raw_len));
}

static json_t *logprobs_json(const choice *ch) {
  if (!ch->lp_tokens) return json_null();
  return json_pack("{s:O, s:O, s:O, s:O}", "tokens", ch->lp_tokens, "token_logprobs", ch->lp_values,
                   "top_logprobs", ch->lp_top, "text_offset", ch->lp_offset);
}

/* The visible end of a choice's text. */
static size_t text_end(const choice *ch) {
  return ch->cut != SIZE_MAX ? ch->cut : ch->text.len;
}

/* An SSE event for choice i with new text [from, to) (finish may be NULL). */
static void send_event(gen_call *c, int i, size_t from, size_t to, const char *finish,
                       const gen_event *final) {
  choice *ch = &c->ch[i];
  json_t *o;
  if (c->api == API_OPENAI) {
    json_t *chj = json_pack("{s:i, s:s%, s:o, s:o}", "index", i, "text", ch->text.data + from,
                            to - from, "logprobs", json_null(), "finish_reason",
                            finish ? json_string(finish) : json_null());
    o = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", c->id, "object", "text_completion",
                  "created", (json_int_t)c->created, "model", c->model, "choices", chj);
  } else {
    char v[24];
    snprintf(v, sizeof v, "%" PRId64, c->version);
    o = json_pack("{s:s, s:s, s:s%}", "model_name", c->model, "model_version", v, "text_output",
                  ch->text.data ? ch->text.data + from : "", to - from);
    if (finish) json_object_set_new(o, "finish_reason", json_string(finish));
  }
  if (final)
    json_object_set_new(
        o, "usage",
        json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t) final->prompt_tokens,
                  "completion_tokens", (json_int_t) final->completion_tokens, "total_tokens",
                  (json_int_t)(final->prompt_tokens + final->completion_tokens)));
  char *s = o ? jtext_dumps(o, JT_COMPACT, NULL) : NULL;
  json_decref(o);
  if (!s) return;
  sbuf b;
  sbuf_init(&b);
  sbuf_adds(&b, "data: ");
  sbuf_adds(&b, s);
  sbuf_adds(&b, "\n\n");
  tl_free(s);
  if (!sbuf_failed(&b)) stream_write(c->st, b.data, b.len);
  sbuf_free(&b);
}

/* Streams what of choice i can no longer become part of a stop string. */
static void stream_safe(gen_call *c, int i) {
  choice *ch = &c->ch[i];
  size_t start = c->echo ? 0 : 0;
  (void)start;
  size_t gen_from = c->echo ? c->prompt_len : 0;
  size_t safe =
      gen_from + smp_stop_safe(&c->stops, ch->text.data + gen_from, ch->text.len - gen_from);
  if (safe > ch->shown) {
    send_event(c, i, ch->shown, safe, NULL, NULL);
    ch->shown = safe;
  }
}

static json_t *final_answer(gen_call *c, const gen_event *ev) {
  if (c->api == API_TRITON) {
    choice *ch = &c->ch[0];
    char v[24];
    snprintf(v, sizeof v, "%" PRId64, c->version);
    return json_pack("{s:s, s:s, s:s%, s:s, s:{s:I, s:I, s:I}}", "model_name", c->model,
                     "model_version", v, "text_output", ch->text.data ? ch->text.data : "",
                     text_end(ch), "finish_reason", ch->finish ? ch->finish : "stop", "usage",
                     "prompt_tokens", (json_int_t)ev->prompt_tokens, "completion_tokens",
                     (json_int_t)ev->completion_tokens, "total_tokens",
                     (json_int_t)(ev->prompt_tokens + ev->completion_tokens));
  }
  json_t *choices = json_array();
  for (int i = 0; i < c->o.p.n; i++) {
    choice *ch = &c->ch[i];
    json_array_append_new(
        choices, json_pack("{s:i, s:s%, s:o, s:s}", "index", i, "text",
                           ch->text.data ? ch->text.data : "", text_end(ch), "logprobs",
                           logprobs_json(ch), "finish_reason", ch->finish ? ch->finish : "stop"));
  }
  return json_pack("{s:s, s:s, s:I, s:s, s:o, s:{s:I, s:I, s:I}}", "id", c->id, "object",
                   "text_completion", "created", (json_int_t)c->created, "model", c->model,
                   "choices", choices, "usage", "prompt_tokens", (json_int_t)ev->prompt_tokens,
                   "completion_tokens", (json_int_t)ev->completion_tokens, "total_tokens",
                   (json_int_t)(ev->prompt_tokens + ev->completion_tokens));
}

/* The engine's events, on its scheduler thread. */
static int on_event(void *user, const gen_event *ev) {
  gen_call *c = user;
  if (ev->kind == GEN_PROMPT) {
    /* echo with logprobs: the prompt's tokens, into every choice */
    for (int i = 0; i < c->o.p.n; i++) {
      record_logprob(c, &c->ch[i], ev);
      size_t len;
      if (tk_token_bytes(c->tok, ev->token, &len)) c->ch[i].raw_len += len;
    }
    return 0;
  }
  if (ev->kind == GEN_TOKEN) {
    choice *ch = &c->ch[ev->choice];
    if (!c->first_seen) {
      c->first_seen = 1;
      metrics_generate_first_token(c->model, ev->t - c->t_submit);
    } else {
      metrics_generate_inter_token(c->model, ev->t - c->t_last);
    }
    c->t_last = ev->t;
    metrics_generate_tokens(c->model, 0, 1);
    ch->tokens++;
    int eos = ev->token == c->o.p.eos_id && !c->o.p.ignore_eos;
    if (!eos) {
      record_logprob(c, ch, ev);
      size_t len;
      const char *p = tk_token_bytes(c->tok, ev->token, &len);
      if (p) {
        tk_utf8_push(&ch->u, p, len, &ch->text);
        ch->raw_len += len;
      }
    }
    size_t gen_from = c->echo ? c->prompt_len : 0;
    int64_t at = c->stops.n
                     ? smp_stop_find(&c->stops, ch->text.data + gen_from, ch->text.len - gen_from)
                     : -1;
    if (at >= 0) {
      ch->cut = gen_from + (size_t)at;
      return 1; /* ends this choice: finish "stop" */
    }
    if (c->st) {
      if (stream_gone(c->st)) {
        pthread_mutex_lock(&c->mu);
        if (c->req) gen_cancel(c->req);
        pthread_mutex_unlock(&c->mu);
      }
      stream_safe(c, ev->choice);
    } else if (c->j && c->j->cancelled) {
      pthread_mutex_lock(&c->mu);
      if (c->req) gen_cancel(c->req);
      pthread_mutex_unlock(&c->mu);
    }
    return 0;
  }
  if (ev->kind == GEN_END) {
    choice *ch = &c->ch[ev->choice];
    tk_utf8_flush(&ch->u, &ch->text);
    ch->finish = ev->finish;
    if (c->st) {
      size_t end = text_end(ch);
      if (end < ch->shown) end = ch->shown;
      /* the last event of a choice carries its finish_reason (Triton's: and
       * the usage, sent with GEN_FINAL below) */
      if (c->api == API_OPENAI) {
        send_event(c, ev->choice, ch->shown, end, ev->finish, NULL);
        ch->shown = end;
      } else if (end > ch->shown) {
        send_event(c, ev->choice, ch->shown, end, NULL, NULL);
        ch->shown = end;
      }
    }
    return 0;
  }
  /* GEN_FINAL */
  metrics_generate_tokens(c->model, ev->prompt_tokens, 0);
  metrics_generate_active(c->model, -1);
  pthread_mutex_lock(&c->mu);
  gen_req *r = c->req;
  c->req = NULL;
  pthread_mutex_unlock(&c->mu);
  if (c->st) {
    if (c->api == API_TRITON) {
      choice *ch = &c->ch[0];
      send_event(c, 0, ch->shown, ch->shown, ch->finish ? ch->finish : "stop", ev);
    }
    if (!stream_gone(c->st)) stream_write(c->st, "data: [DONE]\n\n", 14);
    stream_close(c->st);
    c->st = NULL;
  } else {
    job *j = c->j;
    const char *fin = c->ch[0].finish;
    if (fin && !strcmp(fin, "timeout")) {
      ts_err e;
      ts_errf(&e, TS_ETIMEOUT, "the generation passed its deadline after %" PRId64 " tokens",
              ev->completion_tokens);
      answer_error(j, c->api, &e, NULL);
    } else if (fin && !strcmp(fin, "error")) {
      ts_err e;
      ts_errf(&e, TS_EINTERNAL, "generation failed: %s",
              c->ch[0].u.npend >= 0 && ev->error ? ev->error : "error");
      answer_error(j, c->api, &e, NULL);
    } else {
      json_t *a = final_answer(c, ev);
      resp_json(&j->out, 200, a);
      json_decref(a);
    }
    c->j = NULL;
    job_finish(j);
  }
  if (r) gen_release(r);
  call_free(c);
  return 0;
}

/* ---- the prompt ---------------------------------------------------------- */

/* A string (tokenized) or a list of token ids; also [string] and [[ids]]. */
static int read_prompt(const json_t *v, const tk_tokenizer *tok, int64_t **ids, size_t *n,
                       char **text, size_t *text_len, ts_err *err) {
  *ids = NULL;
  *n = 0;
  *text = NULL;
  *text_len = 0;
  if (json_is_array(v) && json_array_size(v) == 1 &&
      (json_is_string(json_array_get(v, 0)) || json_is_array(json_array_get(v, 0))))
    v = json_array_get(v, 0);
  if (json_is_string(v)) {
    int rc = tk_encode(tok, json_string_value(v), json_string_length(v), 1, ids, n, err);
    if (rc) return rc;
    *text = tl_malloc(json_string_length(v) + 1);
    if (!*text) return ts_errf(err, TS_ENOMEM, "out of memory");
    memcpy(*text, json_string_value(v), json_string_length(v) + 1);
    *text_len = json_string_length(v);
    return 0;
  }
  if (!json_is_array(v))
    return ts_errf(err, TS_EINVAL,
                   "'prompt' must be a string or a list of token ids (one prompt per request)");
  size_t k = json_array_size(v);
  *ids = tl_malloc((k ? k : 1) * sizeof **ids);
  if (!*ids) return ts_errf(err, TS_ENOMEM, "out of memory");
  for (size_t i = 0; i < k; i++) {
    json_t *x = json_array_get(v, i);
    if (!json_is_integer(x)) {
      tl_free(*ids);
      *ids = NULL;
      return ts_errf(err, TS_EINVAL, "'prompt' item %zu is not a token id (one prompt per request)",
                     i);
    }
    int64_t id = json_integer_value(x);
    size_t bl;
    if (!tk_token_bytes(tok, id, &bl)) {
      tl_free(*ids);
      *ids = NULL;
      return ts_errf(err, TS_EINVAL,
                     "'prompt' token %zu: id %" PRId64 " is not in the vocabulary (0..%" PRId64 ")",
                     i, id, tk_vocab_size(tok) - 1);
    }
    (*ids)[i] = id;
  }
  *n = k;
  /* echo needs the prompt's text */
  sbuf b;
  sbuf_init(&b);
  int rc = tk_decode(tok, *ids, k, &b, err);
  if (rc || sbuf_failed(&b)) {
    sbuf_free(&b);
    tl_free(*ids);
    *ids = NULL;
    return rc ? rc : ts_errf(err, TS_ENOMEM, "out of memory");
  }
  *text_len = b.len;
  *text = sbuf_take(&b, NULL);
  return 0;
}

/* ---- starting a generation ----------------------------------------------- */

static void start(job *j, int api, repo_ver *v, tf_model *m, const tk_tokenizer *tok, gen_opts *o,
                  int64_t *ids, size_t n_ids, char *ptext, size_t ptext_len) {
  ts_err err = {0};
  gen_call *c = tl_calloc(1, sizeof *c);
  if (!c) {
    tl_free(ids);
    tl_free(ptext);
    opts_free(o);
    repo_release(v);
    ts_errf(&err, TS_ENOMEM, "out of memory");
    answer_error(j, api, &err, NULL);
    return;
  }
  pthread_mutex_init(&c->mu, NULL);
  c->api = api;
  c->ver = v;
  c->tok = tok;
  c->o = *o;
  memset(o, 0, sizeof *o);
  c->created = (int64_t)time(NULL);
  snprintf(c->model, sizeof c->model, "%s", repo_ver_model(v));
  c->version = repo_ver_version(v);
  char rid[33];
  ts_err ie;
  rid_make(rid, sizeof rid, 12, RID_HEX, RID_POOLED, &ie);
  snprintf(c->id, sizeof c->id, "cmpl-%s", rid);
  for (int i = 0; i < GEN_MAX_N; i++) {
    sbuf_init(&c->ch[i].text);
    c->ch[i].cut = SIZE_MAX;
  }
  c->stops.n = c->o.n_stops;
  for (int i = 0; i < c->o.n_stops; i++) {
    c->stops.s[i] = c->o.stops[i];
    c->stops.len[i] = strlen(c->o.stops[i]);
  }
  c->echo = c->o.p.echo;
  if (c->echo) {
    for (int i = 0; i < c->o.p.n; i++) sbuf_add(&c->ch[i].text, ptext, ptext_len);
    c->prompt_len = ptext_len;
  }
  c->prompt_text = ptext;
  if (c->o.p.eos_id < 0) c->o.p.eos_id = tk_eos(tok);
  double dl = atomic_load(&j->deadline);
  c->o.p.deadline = dl;
  gen_engine *e;
  int rc = get_engine(j, m, &e, &err);
  if (rc) goto fail;
  if (c->o.stream) {
    c->st = stream_new(j->srv, call_gone, c);
    if (!c->st) {
      rc = ts_errf(&err, TS_ENOMEM, "out of memory");
      goto fail;
    }
  } else {
    c->j = j;
    job_defer(j);
  }
  c->t_submit = md_now();
  /* the engine may deliver events (even GEN_FINAL, which frees c) before
   * gen_submit returns: c->req is set under mu, the callback reads it under
   * mu, and c is not touched here once mu is let go */
  int streamed = c->o.stream;
  gstream *st = c->st;
  pthread_mutex_lock(&c->mu);
  gen_req *req = NULL;
  rc = gen_submit(e, ids, (int64_t)n_ids, &c->o.p, on_event, c, &req, &err);
  if (!rc) {
    /* the engine's reference and ours both end at GEN_FINAL */
    c->req = req;
    metrics_generate_active(c->model, +1);
  }
  pthread_mutex_unlock(&c->mu);
  tl_free(ids);
  ids = NULL;
  if (rc) {
    /* no event was or will be delivered: c is ours */
    if (st) {
      c->st = NULL;
      stream_close(st);
      stream_unref(st); /* the transport's: never attached */
    }
    if (c->j) {
      c->j = NULL;
      answer_error(j, api, &err, NULL);
      call_free(c);
      job_finish(j); /* drops the deferred owner */
      return;
    }
    goto fail_freed;
  }
  if (streamed) {
    /* the answer is the stream: headers now, events as they come; the
     * transport's reference goes with it */
    j->out.status = 200;
    j->out.content_type = "text/event-stream";
    j->out.stream = st;
  }
  return;
fail:
  tl_free(ids);
fail_freed:
  answer_error(j, api, &err, NULL);
  call_free(c);
}

/* ---- endpoints ----------------------------------------------------------- */

void ep_v1_completions(job *j) {
  ts_err err = {0};
  gen_opts o;
  opts_init(&o);
  const char *param = NULL;
  json_t *b = parse_body(j, &err);
  repo_ver *v = NULL;
  if (!b) goto fail;
  json_t *model = json_object_get(b, "model"), *prompt = json_object_get(b, "prompt");
  if (!json_is_string(model)) {
    param = "model";
    ts_errf(&err, TS_EINVAL, "'model' (a model name) is required");
    goto fail;
  }
  if (!prompt) {
    param = "prompt";
    ts_errf(&err, TS_EINVAL, "'prompt' (a string or a list of token ids) is required");
    goto fail;
  }
  const char *key;
  json_t *val;
  int stream = 0;
  json_object_foreach(b, key, val) {
    int rc;
    param = key;
    if (!strcmp(key, "model") || !strcmp(key, "prompt") || !strcmp(key, "user")) continue;
    if (!strcmp(key, "n")) {
      int64_t n;
      if ((rc = want_int(val, key, 1, GEN_MAX_N, &n, &err))) goto fail;
      o.p.n = (int)n;
    } else if (!strcmp(key, "logprobs")) {
      if (json_is_null(val)) continue;
      int64_t n;
      if ((rc = want_int(val, key, 0, GEN_MAX_LOGPROBS, &n, &err))) goto fail;
      o.p.logprobs = (int)n;
    } else if (!strcmp(key, "echo")) {
      if ((rc = want_bool(val, key, &o.p.echo, &err))) goto fail;
    } else if (!strcmp(key, "stream")) {
      if ((rc = want_bool(val, key, &stream, &err))) goto fail;
    } else if (!strcmp(key, "best_of")) {
      if (!json_is_null(val) && !(json_is_integer(val) && json_integer_value(val) == 1)) {
        ts_errf(&err, TS_EINVAL, "'best_of' other than 1 is not supported; use n");
        goto fail;
      }
    } else if ((rc = parse_common(&o, key, val, &err)) != 0) {
      if (rc > 0)
        ts_errf(&err, TS_EINVAL,
                "unknown field '%s'; accepted: model, prompt, n, logprobs, echo, stream, user, "
                "best_of, %s",
                key, SAMPLING_KEYS);
      goto fail;
    }
  }
  param = NULL;
  o.stream = stream;
  if (smp_check(&o.p.smp, &err)) goto fail;
  if (repo_acquire(j->srv->repo, json_string_value(model), 0, &v, &err)) {
    param = "model";
    goto fail;
  }
  tf_model *m;
  const tk_tokenizer *tok;
  if (text_model(v, &m, &tok, &err)) {
    param = "model";
    goto fail;
  }
  int64_t *ids;
  size_t n;
  char *ptext;
  size_t plen;
  if (read_prompt(prompt, tok, &ids, &n, &ptext, &plen, &err)) {
    param = "prompt";
    goto fail;
  }
  json_decref(b);
  start(j, API_OPENAI, v, m, tok, &o, ids, n, ptext, plen);
  return;
fail:;
  /* param may be a key of the body: copied before the body goes */
  char pname[128] = "";
  if (param) snprintf(pname, sizeof pname, "%s", param);
  if (v) repo_release(v);
  opts_free(&o);
  json_decref(b);
  openai_error(&j->out, &err, param ? pname : NULL);
}

static void generate(job *j, int stream) {
  ts_err err = {0};
  gen_opts o;
  opts_init(&o);
  json_t *b = parse_body(j, &err);
  repo_ver *v = NULL;
  if (!b) goto fail;
  json_t *text = json_object_get(b, "text_input"), *params = json_object_get(b, "parameters");
  const char *key;
  json_t *val;
  json_object_foreach(b, key, val) {
    if (strcmp(key, "text_input") && strcmp(key, "parameters") && strcmp(key, "id")) {
      ts_errf(&err, TS_EINVAL, "unknown field '%s'; accepted: text_input, parameters, id", key);
      goto fail;
    }
  }
  if (!json_is_string(text)) {
    ts_errf(&err, TS_EINVAL, "'text_input' (a string) is required");
    goto fail;
  }
  if (params && !json_is_object(params)) {
    ts_errf(&err, TS_EINVAL, "'parameters' must be an object");
    goto fail;
  }
  json_object_foreach(params, key, val) {
    int rc;
    if (!strcmp(key, "timeout_ms")) {
      int64_t ms;
      if ((rc = want_int(val, key, 1, INT64_C(86400000), &ms, &err))) goto fail;
      atomic_store(&j->deadline, j->t_submit + (double)ms / 1000.0);
    } else if ((rc = parse_common(&o, key, val, &err)) != 0) {
      if (rc > 0)
        ts_errf(&err, TS_EINVAL, "unknown parameter '%s'; accepted: timeout_ms, %s", key,
                SAMPLING_KEYS);
      goto fail;
    }
  }
  o.stream = stream;
  if (smp_check(&o.p.smp, &err)) goto fail;
  if (repo_acquire(j->srv->repo, j->rt.model, j->rt.version, &v, &err)) goto fail;
  tf_model *m;
  const tk_tokenizer *tok;
  if (text_model(v, &m, &tok, &err)) goto fail;
  int64_t *ids;
  size_t n;
  char *ptext;
  size_t plen;
  if (read_prompt(text, tok, &ids, &n, &ptext, &plen, &err)) goto fail;
  json_decref(b);
  start(j, API_TRITON, v, m, tok, &o, ids, n, ptext, plen);
  return;
fail:
  if (v) repo_release(v);
  opts_free(&o);
  json_decref(b);
  resp_error(&j->out, &err);
}

void ep_generate(job *j) {
  generate(j, 0);
}
void ep_generate_stream(job *j) {
  generate(j, 1);
}

/* GET /v1/models: the served models that have a tokenizer. */
void ep_v1_models(job *j) {
  json_t *idx = repo_index_json(j->srv->repo);
  json_t *data = json_array();
  size_t i;
  json_t *e;
  json_array_foreach(idx, i, e) {
    const char *name = json_string_value(json_object_get(e, "name"));
    const char *state = json_string_value(json_object_get(e, "state"));
    if (!name || !state || strcmp(state, "READY") != 0) continue;
    repo_ver *v;
    ts_err err;
    if (repo_acquire(j->srv->repo, name, 0, &v, &err)) continue;
    tf_model *m;
    const tk_tokenizer *tok;
    int ok = text_model(v, &m, &tok, &err) == 0;
    repo_release(v);
    if (!ok) continue;
    /* one entry per model, whatever versions it serves */
    int dup = 0;
    size_t k;
    json_t *d;
    json_array_foreach(data, k, d) dup |=
        !strcmp(json_string_value(json_object_get(d, "id")), name);
    if (dup) continue;
    json_array_append_new(data, json_pack("{s:s, s:s, s:I, s:s}", "id", name, "object", "model",
                                          "created", (json_int_t)0, "owned_by", "tallyd"));
  }
  json_decref(idx);
  json_t *o = json_pack("{s:s, s:o}", "object", "list", "data", data);
  resp_json(&j->out, 200, o);
  json_decref(o);
}

void ep_tokenize(job *j) {
  ts_err err = {0};
  repo_ver *v = NULL;
  json_t *b = parse_body(j, &err);
  if (!b) goto fail;
  const char *key;
  json_t *val;
  json_object_foreach(b, key, val) if (strcmp(key, "text")) {
    ts_errf(&err, TS_EINVAL, "unknown field '%s'; accepted: text", key);
    goto fail;
  }
  json_t *text = json_object_get(b, "text");
  if (!json_is_string(text)) {
    ts_errf(&err, TS_EINVAL, "'text' (a string) is required");
    goto fail;
  }
  if (repo_acquire(j->srv->repo, j->rt.model, j->rt.version, &v, &err)) goto fail;
  tf_model *m;
  const tk_tokenizer *tok;
  if (text_model(v, &m, &tok, &err)) goto fail;
  int64_t *ids;
  size_t n;
  if (tk_encode(tok, json_string_value(text), json_string_length(text), 1, &ids, &n, &err))
    goto fail;
  json_t *arr = json_array();
  for (size_t i = 0; i < n; i++) json_array_append_new(arr, json_integer(ids[i]));
  tl_free(ids);
  json_t *o = json_pack("{s:o}", "tokens", arr);
  resp_json(&j->out, 200, o);
  json_decref(o);
  repo_release(v);
  json_decref(b);
  return;
fail:
  if (v) repo_release(v);
  json_decref(b);
  resp_error(&j->out, &err);
}

void ep_detokenize(job *j) {
  ts_err err = {0};
  repo_ver *v = NULL;
  int64_t *ids = NULL;
  json_t *b = parse_body(j, &err);
  if (!b) goto fail;
  const char *key;
  json_t *val;
  json_object_foreach(b, key, val) if (strcmp(key, "tokens")) {
    ts_errf(&err, TS_EINVAL, "unknown field '%s'; accepted: tokens", key);
    goto fail;
  }
  json_t *toks = json_object_get(b, "tokens");
  if (!json_is_array(toks)) {
    ts_errf(&err, TS_EINVAL, "'tokens' (a list of token ids) is required");
    goto fail;
  }
  if (repo_acquire(j->srv->repo, j->rt.model, j->rt.version, &v, &err)) goto fail;
  tf_model *m;
  const tk_tokenizer *tok;
  if (text_model(v, &m, &tok, &err)) goto fail;
  size_t n = json_array_size(toks);
  ids = tl_malloc((n ? n : 1) * sizeof *ids);
  if (!ids) {
    ts_errf(&err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  for (size_t i = 0; i < n; i++) {
    json_t *x = json_array_get(toks, i);
    if (!json_is_integer(x)) {
      ts_errf(&err, TS_EINVAL, "'tokens' item %zu is not an integer", i);
      goto fail;
    }
    ids[i] = json_integer_value(x);
  }
  sbuf s;
  sbuf_init(&s);
  if (tk_decode(tok, ids, n, &s, &err)) {
    sbuf_free(&s);
    goto fail;
  }
  json_t *o = json_pack("{s:s%}", "text", s.data ? s.data : "", s.len);
  sbuf_free(&s);
  resp_json(&j->out, 200, o);
  json_decref(o);
  tl_free(ids);
  repo_release(v);
  json_decref(b);
  return;
fail:
  tl_free(ids);
  if (v) repo_release(v);
  json_decref(b);
  resp_error(&j->out, &err);
}
