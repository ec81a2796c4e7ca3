/* repo.h - the model repository: which versions of which models are served.
 *
 * Layout (api.md): <root>/<model>/config.json, <root>/<model>/<version>/
 * {model.safetensors, version.json}. Each model's config may carry a Triton-
 * style "version_policy": {"latest": {"num_versions": N}} (default N = 1),
 * {"all": {}} or {"specific": {"versions": [..]}}.
 *
 * Invariants (under the repository mutex):
 * - A served version (repo_ver) is fully loaded before it is published in
 *   its model's table; a version that fails to load never replaces one that
 *   works (its reason is kept for the index and logged).
 * - Every repo_acquire is paired with repo_release. The table holds one
 *   reference to each served version; a retired version is freed when its
 *   last reference goes, so in-flight requests keep the version they began
 *   with.
 * - At most one fit/calibrate per model runs at a time (repo_fit_begin).
 * New versions are written atomically: temporary directory in the model
 * directory, fsync of every file and the directory, rename to the next
 * version number, fsync of the model directory. Leftover temporary
 * directories from a crash are removed when the repository is opened. */
#ifndef TALLYD_REPO_H
#define TALLYD_REPO_H

#include <jansson.h>
#include <stdint.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../base/safetensors.h"
#include "../models/model.h"

typedef struct repo repo_t;
typedef struct repo_ver repo_ver;

/* only: NULL-terminated list of model names to serve (--model), or NULL. */
int repo_open(repo_t **out, const char *root, const char *const *only, pool_t *pool, ts_err *err);
void repo_close(repo_t *r);

/* How versions loaded from now on bring in model.safetensors (default
 * ST_MMAP, the file mapped; ST_READ, a private copy: --weights-load). */
void repo_set_weights_load(repo_t *r, st_load how);

/* Scans the root and loads what is new, changed or removed (start, SIGHUP,
 * polling). Never fails as a whole: per-model problems go to the index. */
void repo_sync(repo_t *r);

/* (Re)loads one model from config.json. repo_load_model_config loads it
 * with `config` in place of config.json (NULL: config.json, and any earlier
 * override is forgotten). The override is checked first (common keys,
 * version policy, and the newest version it serves loaded with it): one
 * that does not load is refused with the loader's error (400 naming the
 * key) and changes nothing. An accepted override is kept in memory only,
 * never written: rescans, fits and calibrations of the model use it until
 * the next load without one or a restart, which read config.json again.
 * A reserved name ("stats") is a 400. */
int repo_load_model(repo_t *r, const char *name, ts_err *err);
int repo_load_model_config(repo_t *r, const char *name, const json_t *config, ts_err *err);
/* 1 for a name no model may have: "stats" (GET /v2/models/stats is the
 * statistics route). A directory so named is listed in the index as
 * UNAVAILABLE with the reason, never loaded, and does not hold readiness. */
int repo_reserved_name(const char *name);
int repo_unload_model(repo_t *r, const char *name, ts_err *err);

/* version 0: the newest served. 404 unknown model or version, 503 when the
 * model exists but no version is ready. */
int repo_acquire(repo_t *r, const char *name, int64_t version, repo_ver **out, ts_err *err);
void repo_release(repo_ver *v);

const md_kind *repo_ver_kind(const repo_ver *v);
void *repo_ver_state(const repo_ver *v);
int64_t repo_ver_version(const repo_ver *v);
const char *repo_ver_model(const repo_ver *v);
const md_sig *repo_ver_sig(const repo_ver *v);
/* config.json's "max_batch" (checked at load: an integer >= 0); 0: none. */
int64_t repo_ver_max_batch(const repo_ver *v);
/* config.json's "scheduling" and "dynamic_batching", checked at load. */
const md_sched *repo_ver_sched(const repo_ver *v);
/* The config the version loaded with (config.json or a load's override);
 * borrowed for the life of the reference. */
const json_t *repo_ver_config(const repo_ver *v);

/* Triton's statistics extension, kept per served version: counts and
 * nanoseconds of its infer requests since the version loaded (a reloaded
 * version starts again from zero). Recorded by the server when a request
 * ends, read by GET /v2/models/stats; each version's block has its own
 * mutex, held for a copy or one update. */
typedef struct repo_dur {
  uint64_t count, ns;
} repo_dur;
#define REPO_BATCH_SIZES 64 /* distinct batch sizes with their own batch_stats entry */
typedef struct repo_batch_stat {
  int64_t batch_size;
  repo_dur compute_input, compute_infer, compute_output;
} repo_batch_stat;
typedef struct repo_stats {
  int64_t last_inference_ms; /* wall clock, ms since the epoch; 0: never */
  uint64_t inference_count;  /* rows inferred: the batch sizes of successes summed */
  uint64_t execution_count;  /* successful executions (one per request: no batching) */
  repo_dur success, fail;    /* whole requests: queue + compute */
  repo_dur queue, compute_input, compute_infer, compute_output; /* of successes */
  repo_batch_stat batch[REPO_BATCH_SIZES];
  int n_batch;
  uint64_t batch_untracked; /* successes whose batch size found no free entry */
} repo_stats;
typedef struct repo_infer_times {
  int ok;        /* answered 200 */
  int64_t batch; /* rows (leading dimension of the first input); 0: unknown */
  double total, queue, input, infer, output; /* seconds */
} repo_infer_times;
void repo_ver_record(repo_ver *v, const repo_infer_times *t);
typedef void (*repo_stats_fn)(void *data, const char *model, int64_t version, const repo_stats *s);
/* Calls fn with a copy of the statistics of each served version: of every
 * model (name NULL), or of `name` (404/503 as repo_acquire; version 0: all
 * its served versions). fn runs under the repository lock: keep it short. */
int repo_stats_foreach(repo_t *r, const char *name, int64_t version, repo_stats_fn fn, void *data,
                       ts_err *err);

/* What the protocol's answers are made of (the server writes the JSON:
 * server/repo_json.c). repo_index_foreach calls fn for every served version
 * (state "READY"), every version that failed to load ("UNAVAILABLE" and its
 * reason), and a model with neither (version 0, the model's state and
 * reason); fn runs under the repository lock: keep it short.
 * repo_served_versions writes up to cap of the model's served versions,
 * ascending, and returns how many there are. */
typedef void (*repo_index_fn)(void *data, const char *model, int64_t version, const char *state,
                              const char *reason);
void repo_index_foreach(repo_t *r, repo_index_fn fn, void *data);
int repo_served_versions(repo_t *r, const char *name, int64_t *out, int cap);
/* The version's weights digest ("" when it has no weights file) and its
 * version.json (NULL when none; borrowed for the reference's life). */
const char *repo_ver_sha256(const repo_ver *v);
const json_t *repo_ver_info(const repo_ver *v);
/* 1 when every model meant to be served has a ready version. */
int repo_all_ready(repo_t *r);
int repo_count_models(repo_t *r, int *ready);

/* One fit/calibrate per model: -TS_ECONFLICT when one runs, in this process
 * or (with a fit lock, repo_set_fit_lock) on any replica sharing the
 * repository: the lock file <model>/.fit-lock (base/fitlock.h) is taken
 * here, renewed while the fit runs and removed by repo_fit_end; the 409
 * names the replica that holds it. */
int repo_fit_begin(repo_t *r, const char *name, ts_err *err);
void repo_fit_end(repo_t *r, const char *name);
#define REPO_FIT_LOCK ".fit-lock"
/* owner: this replica's id, written into the lock; lease_ms: the lease
 * (renewed every third of it); 0: no lock file, the claim is per process. */
void repo_set_fit_lock(repo_t *r, const char *owner, int64_t lease_ms);

/* Saves call->new_weights and version.json (parent, call->new_version_info,
 * the sha256 of the weights) atomically as the next version of `parent`'s
 * model, loads it and serves it. *new_version receives its number. */
int repo_commit_version(repo_t *r, const repo_ver *parent, md_call *call, int64_t *new_version,
                        ts_err *err);

/* Candidates (the learning loop, learn/candidate.c). A version whose
 * version.json holds "candidate": {"state": ...} other than "promoted" is
 * never served: scans and commits leave it out of the version policy.
 * repo_commit_version saves a call whose new_version_info has "candidate"
 * without loading or serving it. repo_load_unserved loads any version of
 * `name` with the model's config for the caller alone (one reference, given
 * back with repo_release). repo_rewrite_version_info replaces version.json
 * atomically (temporary file, fsync, rename, fsync of the directory); with
 * rescan, the model is rescanned after, so a promoted candidate serves. */
int repo_load_unserved(repo_t *r, const char *name, int64_t version, repo_ver **out, ts_err *err);
int repo_rewrite_version_info(repo_t *r, const char *name, int64_t version, const json_t *info,
                              int rescan, ts_err *err);
/* One more reference to a version the caller holds (repo_release gives it back). */
void repo_ver_retain(repo_ver *v);

md_host *repo_host(repo_t *r);
const char *repo_root(const repo_t *r);

/* Called for each state change (metrics). */
typedef void (*repo_event_fn)(void *data, const char *model, int64_t version, int ready);
void repo_set_event_hook(repo_t *r, repo_event_fn fn, void *data);
/* Visits each served version (for metrics), under the lock: keep it short. */
void repo_foreach_version(repo_t *r,
                          void (*fn)(void *data, const char *model, int64_t version, int ready),
                          void *data);

#endif
