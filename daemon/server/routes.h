/* routes.h - the route table: every endpoint of the server, one row each.
 *
 * A row says everything the server decides per route: the path pattern, the
 * methods, the credentials' scope, where it runs (the loop thread or a
 * worker), what must be claimed before it is queued, whether
 * --request-timeout-ms applies, whether it stays open while draining, which
 * of the kind's operations its parameters belong to, and the handler. Routing (route_parse), the
 * scope check (auth.c), the submit and completion of jobs (http.c) and the dispatch to handlers
 * read this one table, as Redis reads its command table; nothing else decides per route.
 *
 * A new endpoint is one row here plus one handler `void ep_x(job *j)`
 * (declared by the table itself): a loop-thread handler answers into j->out
 * from j->srv and j->rt (j->body is NULL; nothing may block or compute); a
 * worker handler owns j->body and j->ver and fills j->out.
 *
 * Patterns: segments separated by '/'; {model}, {version} and {session}
 * capture one segment, {name} matches any one segment and keeps nothing;
 * "[...]" is an optional group. Rows are tried in order: a fixed path
 * ("/v2/models/stats") sits above the pattern it would also match. Captured names are
 * checked by route_parse (400 for a bad model name or version, 404 for a
 * session id that cannot exist). */
#ifndef TALLYD_ROUTES_H
#define TALLYD_ROUTES_H

#include <stdint.h>

#include "../base/err.h"
#include "../models/model.h"
#include "auth.h"

/* methods */
#define M_GET 1u /* GET and HEAD */
#define M_POST 2u
#define M_DELETE 4u

/* flags */
#define RF_LOOP 1u /* answered on the loop thread: cheap, no body, no compute, no I/O */
#define RF_VERSION \
  2u /* takes a reference to the model version before it is queued (404/503 at once) */
#define RF_FIT                                                                                  \
  4u                   /* claims the model's one running fit before it is queued (409 at once), \
                        * publishes a new version under the job's claim, counts in tallyd_fits_total */
#define RF_DEADLINE 8u /* --request-timeout-ms is its default deadline */
#define RF_DRAIN 16u   /* still answered while the daemon drains (else 503) */
#define RF_LIMITS 32u  /* inputs held to --max-batch and --max-sequence-length */

#define OP_NONE (-1)

#define MV "/v2/models/{model}[/versions/{version}]"
#define MS "/v2/models/{model}/sessions/{session}"

/* X(id, name (metrics label), pattern, methods, scope, flags, kind operation, handler).
 * The kind operation (MD_OP_*, models/model.h) names the parameter list a
 * request's "parameters" are checked against; OP_NONE: the route takes none. */
#define ROUTE_TABLE(X)                                                                             \
  X(R_LIVE, "health_live", "/v2/health/live", M_GET, AUTH_NONE, RF_LOOP | RF_DRAIN, OP_NONE,       \
    ep_live)                                                                                       \
  X(R_READY, "health_ready", "/v2/health/ready", M_GET, AUTH_NONE, RF_LOOP | RF_DRAIN, OP_NONE,    \
    ep_ready)                                                                                      \
  X(R_SERVER, "server_metadata", "/v2", M_GET, AUTH_INFER, RF_LOOP, OP_NONE, ep_server)            \
  X(R_STATS_ALL, "statistics", "/v2/models/stats", M_GET, AUTH_INFER, RF_LOOP, OP_NONE, ep_stats)  \
  X(R_MODEL_META, "model_metadata", MV, M_GET, AUTH_INFER, RF_LOOP, OP_NONE, ep_model_meta)        \
  X(R_MODEL_READY, "model_ready", MV "/ready", M_GET, AUTH_INFER, RF_LOOP, OP_NONE,                \
    ep_model_ready)                                                                                \
  X(R_MODEL_CONFIG, "model_config", MV "/config", M_GET, AUTH_INFER, RF_LOOP, OP_NONE,             \
    ep_model_config)                                                                               \
  X(R_MODEL_STATS, "statistics", MV "/stats", M_GET, AUTH_INFER, RF_LOOP, OP_NONE, ep_stats)       \
  X(R_INFER, "infer", MV "/infer", M_POST, AUTH_INFER, RF_VERSION | RF_DEADLINE | RF_LIMITS,       \
    MD_OP_INFER, ep_infer)                                                                         \
  X(R_FIT, "fit", "/v2/models/{model}/fit", M_POST, AUTH_ADMIN, RF_VERSION | RF_FIT, MD_OP_FIT,    \
    ep_fit)                                                                                        \
  X(R_EVALUATE, "evaluate", MV "/evaluate", M_POST, AUTH_INFER, RF_VERSION, MD_OP_EVALUATE,        \
    ep_evaluate)                                                                                   \
  X(R_CALIBRATE, "calibrate", "/v2/models/{model}/calibrate", M_POST, AUTH_ADMIN,                  \
    RF_VERSION | RF_FIT, MD_OP_CALIBRATE, ep_calibrate)                                            \
  X(R_FEEDBACK, "feedback", "/v2/models/{model}/feedback", M_POST, AUTH_INFER, RF_VERSION,         \
    OP_NONE, ep_feedback)                                                                          \
  X(R_REFIT, "refit", "/v2/models/{model}/refit", M_POST, AUTH_ADMIN, RF_VERSION | RF_FIT,         \
    MD_OP_FIT, ep_refit)                                                                           \
  X(R_CANDIDATES, "candidates", "/v2/models/{model}/candidates", M_GET, AUTH_INFER, RF_VERSION,    \
    OP_NONE, ep_candidates)                                                                        \
  X(R_SESSIONS, "session_create", "/v2/models/{model}/sessions", M_POST, AUTH_INFER, RF_VERSION,   \
    MD_OP_SESSION_OPEN, ep_session_create)                                                         \
  X(R_SESSION, "session", MS, M_GET, AUTH_INFER, RF_LOOP, OP_NONE, ep_session_get)                 \
  X(R_SESSION_DELETE, "session", MS, M_DELETE, AUTH_INFER, 0, OP_NONE, ep_session_delete)          \
  X(R_SESSION_INFER, "session_infer", MS "/infer", M_POST, AUTH_INFER, RF_DEADLINE | RF_LIMITS,    \
    MD_OP_SESSION_INFER, ep_session_infer)                                                         \
  X(R_GENERATE, "generate", MV "/generate", M_POST, AUTH_INFER, RF_DEADLINE, OP_NONE, ep_generate) \
  X(R_GENERATE_STREAM, "generate_stream", MV "/generate_stream", M_POST, AUTH_INFER, RF_DEADLINE,  \
    OP_NONE, ep_generate_stream)                                                                   \
  X(R_TOKENIZE, "tokenize", MV "/tokenize", M_POST, AUTH_INFER, 0, OP_NONE, ep_tokenize)           \
  X(R_DETOKENIZE, "detokenize", MV "/detokenize", M_POST, AUTH_INFER, 0, OP_NONE, ep_detokenize)   \
  X(R_V1_COMPLETIONS, "completions", "/v1/completions", M_POST, AUTH_INFER, RF_DEADLINE, OP_NONE,  \
    ep_v1_completions)                                                                             \
  X(R_V1_MODELS, "v1_models", "/v1/models", M_GET, AUTH_INFER, 0, OP_NONE, ep_v1_models)           \
  X(R_REPO_INDEX, "repository_index", "/v2/repository/index", M_GET | M_POST, AUTH_INFER, RF_LOOP, \
    OP_NONE, ep_repo_index)                                                                        \
  X(R_REPO_LOAD, "repository_load", "/v2/repository/models/{model}/load", M_POST, AUTH_ADMIN, 0,   \
    OP_NONE, ep_repo_load)                                                                         \
  X(R_REPO_UNLOAD, "repository_unload", "/v2/repository/models/{model}/unload", M_POST,            \
    AUTH_ADMIN, 0, OP_NONE, ep_repo_unload)                                                        \
  X(R_METRICS, "metrics", "/metrics", M_GET, AUTH_INFER, RF_LOOP | RF_DRAIN, OP_NONE, ep_metrics)  \
  /* tritonclient calls tallyd does not serve: a 400 that says so (triton.c) */                    \
  X(R_SHM_SYSTEM, "system_shared_memory", "/v2/systemsharedmemory[/region/{name}]/{name}",         \
    M_GET | M_POST, AUTH_INFER, RF_LOOP, OP_NONE, ep_unsupported)                                  \
  X(R_SHM_CUDA, "cuda_shared_memory", "/v2/cudasharedmemory[/region/{name}]/{name}",               \
    M_GET | M_POST, AUTH_INFER, RF_LOOP, OP_NONE, ep_unsupported)                                  \
  X(R_TRACE, "trace_setting", "/v2[/models/{model}]/trace/setting", M_GET | M_POST, AUTH_INFER,    \
    RF_LOOP, OP_NONE, ep_unsupported)                                                              \
  X(R_LOGGING, "log_setting", "/v2/logging", M_GET | M_POST, AUTH_INFER, RF_LOOP, OP_NONE,         \
    ep_unsupported)

enum route_id {
  R_NONE = 0, /* no route: unknown path (scope infer, so anonymous clients cannot map the server) */
#define ROUTE_ENUM(id, name, pattern, methods, scope, flags, op, run) id,
  ROUTE_TABLE(ROUTE_ENUM)
#undef ROUTE_ENUM
      R_COUNT
};

struct job;
#define ROUTE_HANDLER(id, name, pattern, methods, scope, flags, op, run) void run(struct job *j);
ROUTE_TABLE(ROUTE_HANDLER)
#undef ROUTE_HANDLER

typedef struct route_def {
  int id;
  const char *name;
  const char *pattern;
  unsigned methods;
  auth_scope scope;
  unsigned flags;
  int op;                     /* MD_OP_* of the kind's parameter lists; OP_NONE */
  void (*run)(struct job *j); /* NULL only for R_NONE */
} route_def;

/* A parsed request line. */
typedef struct route {
  int id;
  char model[256];
  int64_t version; /* 0: newest */
  char session[96];
} route;

/* The row of a route id; R_NONE's row (scope infer, no handler) for any id
 * outside the table. */
const route_def *route_get(int id);
const char *route_name(int id);
/* The Allow header for a set of M_ bits ("GET, HEAD, DELETE"); static. */
const char *route_allow(unsigned methods);

/* Parses method and path. 0, -TS_ENOTFOUND (unknown route, with message),
 * -TS_EMETHOD (known path, wrong method; *allow lists the methods of every
 * row with that path) or -TS_EINVAL (bad version number, bad model name). */
int route_parse(const char *method, const char *path, route *r, const char **allow, ts_err *err);

#endif
