/* model.h - the one interface every model kind implements.
 *
 * The server and the repository know models only through md_kind. A kind
 * is a table of functions over an opaque per-version state: load builds the
 * state from config.json and the version's weights; infer, fit, evaluate
 * and calibrate read a md_call and fill its outputs; free releases it.
 *
 * Threads: load, infer, fit, evaluate, calibrate and the session functions
 * run on worker threads, never on the event-loop thread. infer may run
 * concurrently on one state (it must not mutate it); fit/calibrate never
 * mutate the state either: they return new weights that the repository
 * saves and loads as a new version.
 *
 * Ownership: the state borrows `weights` (tensors mmap'ed from it stay valid
 * until the kind's free returns; the repository closes the file after
 * that). Everything placed in md_call's output fields belongs to the call
 * and is freed by md_call_free. */
#ifndef TALLYD_MODEL_H
#define TALLYD_MODEL_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../base/tensor.h"

typedef struct st_file st_file;
typedef struct st_writer st_writer;

#define MD_MAX_IO 8

typedef struct md_io {
  char name[64];
  ts_dtype dtype;
  int ndim;
  int64_t shape[TS_MAXDIM]; /* -1: variable */
} md_io;

typedef struct md_sig {
  md_io inputs[MD_MAX_IO];
  int n_inputs;
  md_io outputs[MD_MAX_IO];
  int n_outputs;
} md_sig;

/* The one way a kind writes its signature: appends an input (MD_IN) or an
 * output (MD_OUT) of ndim dimensions (up to 3 given here; -1: variable). */
enum { MD_IN = 0, MD_OUT = 1 };
void md_sig_add(md_sig *sig, int which, const char *name, ts_dtype dtype, int ndim, int64_t d0,
                int64_t d1, int64_t d2);

/* Services the repository offers to kinds that use other models (ensemble
 * members, quantile bases): the currently served version of a model. */
typedef struct md_kind md_kind;
typedef struct md_host md_host;
struct md_host {
  /* On success *handle must be given back with release. */
  int (*acquire)(md_host *h, const char *model, void **handle, const md_kind **kind, void **state,
                 ts_err *err);
  void (*release)(md_host *h, void *handle);
  void *data;
};

typedef struct md_load_ctx {
  const char *model_name;
  int64_t version;
  const char *version_dir; /* <repo>/<model>/<version> */
  const json_t *config;    /* the parsed config.json */
  st_file *weights;        /* NULL when the version has no model.safetensors */
  md_host *host;
  pool_t *pool;
} md_load_ctx;

/* Where a call reports the hosted models it ran (the server's tracing,
 * server/trace.h): md_run_hosted calls `hosted` once per hosted call, from
 * the thread that ran it (members may run on several threads at once), with
 * the role and name it was given, the nesting depth of the hosted call (1
 * for a request's own members), md_now() times around the hosted model's
 * infer, and its status (0 or a negative TS_ code). NULL: nobody listens. */
typedef struct md_span_sink md_span_sink;
struct md_span_sink {
  void (*hosted)(md_span_sink *sink, const char *role, const char *name, int depth, double t0,
                 double t1, int status);
};

typedef struct md_call {
  /* in */
  const ts_list *inputs; /* decoded request tensors, as sent */
  const json_t *params;  /* the request's "parameters" object, or NULL */
  pool_t *pool;          /* may be NULL: run serially */
  md_host *host;
  double deadline;               /* md_now() seconds after which to give up; 0: none */
  const volatile int *cancelled; /* set when the server abandoned the call */
  /* The server's claim on the answer (NULL: none). A call that changes state
   * outliving it (a session's cache position) commits only after md_claim
   * succeeds: once the server has answered 504 or lost the client, it must
   * not; once claimed, the server waits for this answer. */
  _Atomic int *claim;
  const char *model_name;
  int64_t version;
  int depth; /* hosted calls above this one (md_run_hosted); 0 for a request */

  md_span_sink *spans; /* hosted calls are reported here (NULL: not traced) */
  /* out */
  ts_list outputs;          /* infer: named output tensors */
  json_t *result;           /* fit/evaluate/calibrate: the answer's fields */
  st_writer *new_weights;   /* fit/calibrate: weights of the new version */
  json_t *new_version_info; /* fit/calibrate: extra fields for version.json */
  int infinite_ok;          /* infer: +-inf in the outputs is documented (a quantile
                             * model calibrated with allow_infinite); NaN never is */
} md_call;

/* The operations a request can name parameters for (md_kind.params). */
enum md_op {
  MD_OP_INFER = 0,
  MD_OP_FIT,
  MD_OP_EVALUATE,
  MD_OP_CALIBRATE,
  MD_OP_SESSION_OPEN,
  MD_OP_SESSION_INFER,
  MD_OP_COUNT
};

struct md_kind {
  const char *name;
  /* The request "parameters" each operation reads, NULL-terminated (a NULL
   * list: none). The server refuses any other name before the kind runs,
   * so a misspelt parameter is a 400 naming it, never a silent default.
   * A kind that reads a new parameter adds it here. */
  const char *const *params[MD_OP_COUNT];
  /* Input names infer reads besides its signature's (alternatives such as
   * an ensemble's `features` or `member_outputs`), NULL-terminated; the
   * server refuses an infer input in neither, by name. */
  const char *const *infer_inputs;
  int (*load)(const md_load_ctx *ctx, void **state, ts_err *err);
  void (*signature)(void *state, md_sig *sig);
  int (*infer)(void *state, md_call *call, ts_err *err);
  int (*fit)(void *state, md_call *call, ts_err *err);       /* optional */
  int (*evaluate)(void *state, md_call *call, ts_err *err);  /* optional */
  int (*calibrate)(void *state, md_call *call, ts_err *err); /* optional */
  /* Outcomes of rows this version served (optional; the feedback path calls
   * it, on the version that answered the rows). call->inputs: the rows'
   * infer inputs plus their outcome (`targets` [N] for quantile models);
   * served: the outputs the version answered them with (its first output
   * read, [N, ...]), or NULL: then the version's answer now stands for it.
   * Updates the version's live state (rolling scores, adaptive conformal;
   * the only state a kind may change after load, behind its own lock) and
   * puts a summary in call->result. Safe to call concurrently with infer. */
  int (*observe)(void *state, md_call *call, const ts_list *served, ts_err *err);
  /* KV-cache sessions (optional): open a session, feed it, free it. *bytes
   * reports the session's current memory. */
  int (*session_open)(void *state, const json_t *params, void **sess, size_t *bytes, ts_err *err);
  int (*session_infer)(void *state, void *sess, md_call *call, size_t *bytes, ts_err *err);
  int64_t (*session_position)(void *sess);
  void (*session_free)(void *sess);
  void (*free)(void *state);
};

/* The registry of kinds (models/kinds.c). */
const md_kind *md_kind_find(const char *name);
/* Comma-separated names of every registered kind, for /v2 and metrics. */
const char *md_kind_names(void);
/* The kind a config.json names: its "kind", or, where it has none, the kind
 * its Hugging Face "model_type" maps to ("gpt2" is a transformer), so a
 * checkpoint's own config.json loads unchanged. NULL with *what set to the
 * name that was not understood (or "(missing)"). */
const md_kind *md_kind_of_config(const json_t *config, const char **what);

void md_call_init(md_call *c);
void md_call_free(md_call *c);

/* Hosted models (ensemble members, quantile bases) run through this one
 * function: it acquires `name` from c's host, runs its infer on the single
 * input tensor `in` as a nested call of c (same pool, host, deadline and
 * cancel flag; depth + 1), and hands back the call with its outputs in *sub
 * and the held model in *held. The caller reads sub->outputs, then calls
 * md_hosted_done. Failures, the same for every kind: the model missing or
 * not ready -> 503 "<role> '<name>' is unavailable: ..."; nesting deeper
 * than MD_MAX_HOSTED_DEPTH (a cycle in the configuration) -> 400; the
 * hosted model's own error -> its status, prefixed "<role> '<name>': ".
 * The depth travels in the call, so a cycle is caught even when members
 * run on other threads of the pool. */
#define MD_MAX_HOSTED_DEPTH 4
typedef struct md_hosted {
  md_host *host;
  void *handle;
  const md_kind *kind;
  void *state;
} md_hosted;
int md_run_hosted(const md_call *c, const char *role, const char *name, const ts_tensor *in,
                  md_call *sub, md_hosted *held, ts_err *err);
void md_hosted_done(md_call *sub, md_hosted *held);

/* The name of an operation ("infer", "fit", ..., "session infer"). */
const char *md_op_name(int op);
/* 1 when `key` is in the kind's list for `op`. */
int md_kind_takes_param(const md_kind *k, int op, const char *key);

/* The rule every answer keeps: no NaN or +-inf where a number is expected.
 * Checks every floating-point output of c (FP32, FP64, FP16, BF16); the
 * first non-finite value is a 400 naming the output, the element and the
 * cause (a computation that overflowed: inputs or weights too large for the
 * output's type). +-inf passes when the kind set c->infinite_ok. The server
 * runs it on every infer answer, whatever the kind. */
int md_check_finite_outputs(const md_call *c, ts_err *err);

/* Helpers shared by the kinds. */
double md_now(void); /* monotonic seconds */
/* -TS_ETIMEOUT once the deadline passed or the call was abandoned. */
int md_check_deadline(const md_call *c, ts_err *err);
/* Takes the call's claim (0 -> 1 by compare-and-swap; already 1 is ours).
 * 0, or -TS_ETIMEOUT when the server gave up on the call: change nothing. */
int md_claim(const md_call *c, ts_err *err);
/* Refuses config keys not in `allowed` (NULL-terminated) by name; the keys
 * every kind takes ("kind", "version_policy", "description", "max_batch")
 * are always allowed. */
int md_config_check_keys(const json_t *config, const char *const *allowed, ts_err *err);
/* Checks the values of the common keys only (for kinds that take foreign
 * configs as they are, such as the transformer's HF config.json). */
int md_config_check_common(const json_t *config, ts_err *err);
/* The largest max_batch config.json may state (md_config_check_keys refuses
 * more, a real such as 1e300, a string or a negative value). */
#define MD_MAX_BATCH (INT64_C(1) << 31)
/* How the server schedules a model's requests: config.json's "scheduling"
 * and "dynamic_batching" (docs/scheduling.md), which every kind takes.
 * md_config_check_common refuses wrong values by name; dynamic_batching
 * only for the kinds whose infer is row-wise (mlp, ensemble,
 * quantile_ensemble). */
#define MD_PRIORITY_LEVELS_MAX 9
#define MD_PREFERRED_MAX 8
typedef struct md_sched {
  int max_concurrency;                 /* requests of the model running at once; 0: no limit */
  int max_queue_size;                  /* requests of the model waiting; 0: only --queue-depth */
  int64_t default_timeout_ms;          /* 0: --request-timeout-ms */
  int priority_levels;                 /* request priorities 1..levels (1 first); default 3 */
  int default_priority_level;          /* priority 0 or none; default 2 */
  int batching;                        /* "dynamic_batching" is present */
  int64_t max_queue_delay_us;          /* how long a request may wait for others; default 0 */
  int64_t max_batch_size;              /* rows of one batched call; default: max_batch, else 64 */
  int64_t preferred[MD_PREFERRED_MAX]; /* ascending */
  int n_preferred;
} md_sched;
int md_config_sched(const json_t *config, md_sched *out, ts_err *err);

/* Reads the request parameter `key` as a number / integer / string, with a
 * default when absent; refuses wrong types with 400. */
int md_param_double(const json_t *params, const char *key, double def, double *out, ts_err *err);
int md_param_int(const json_t *params, const char *key, int64_t def, int64_t *out, ts_err *err);
int md_param_string(const json_t *params, const char *key, const char *def, const char **out,
                    ts_err *err);
int md_param_bool(const json_t *params, const char *key, int def, int *out, ts_err *err);

/* Finds a request input by name; missing: 400 "missing input 'features'". */
int md_input(const md_call *c, const char *name, const ts_tensor **out, ts_err *err);
/* Checks rank and dims (-1 = any) and returns a 400 naming the input. */
int md_check_shape(const ts_tensor *t, int ndim, const int64_t *dims, ts_err *err);
/* Adds an owned FP32/FP64/INT64 output of the given shape; returns its data. */
void *md_output(md_call *c, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
                ts_err *err);

#endif
