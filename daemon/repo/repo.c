/* repo.c - model repository: scanning, loading, reference counting and
 * atomic new versions (invariants in repo.h). */
#include "repo.h"

#include <dirent.h>
#include <stdarg.h>
#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "../base/check.h"
#include "../base/fitlock.h"
#include "../base/fsutil.h"
#include "../base/hash.h"
#include "../base/jtext.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../base/safetensors.h"

#define MAX_CONFIG_BYTES (4u << 20)
#define MAX_VERSION_JSON_BYTES (16u << 20)

/* There is no "unloading" state: an unload drops the model's served
 * versions at once, and requests already running keep the version they hold
 * (reference counts) until they finish. An unloaded model shows UNAVAILABLE
 * with the reason "unloaded". */
enum { MS_READY, MS_UNAVAILABLE, MS_LOADING, MS_UNLOADED };
static const char *state_names[] = {"READY", "UNAVAILABLE", "LOADING", "UNAVAILABLE"};

struct repo_ver {
  char *model_name;
  int64_t version;
  const md_kind *kind;
  void *state;
  st_file *weights;
  json_t *config, *version_info;
  int64_t max_batch; /* config.json's "max_batch"; 0: none */
  md_sched sched;    /* config.json's "scheduling" and "dynamic_batching" */
  char sha256[65];
  md_sig sig;
  atomic_int refs;
  uv_mutex_t stats_mu; /* guards stats */
  int stats_mu_ready;
  repo_stats stats;
  /* change detection */
  char stamp[256];
};

typedef struct failed_ver {
  int64_t version;
  char stamp[256];
  char reason[TS_ERR_MSG];
} failed_ver;

typedef struct repo_model {
  char *name;
  repo_ver **vers; /* served, ascending by version */
  int nvers;
  failed_ver *failed;
  int nfailed;
  int state;
  char reason[TS_ERR_MSG];
  char config_stamp[128];
  int unloaded; /* explicitly unloaded: sync leaves it alone */
  int fit_running;
  int present; /* seen in the last scan */
  /* The config of the last load that gave one (POST .../load with
   * "parameters": {"config": ...}), used in place of config.json until a
   * load without one; in memory only, never written (repo.h). */
  json_t *override;
  unsigned override_gen;
  struct repo_model *next;
} repo_model;

struct repo {
  char *root;
  char **only;
  pool_t *pool;
  uv_mutex_t mu;      /* the model table */
  uv_mutex_t sync_mu; /* one scan/load/unload/commit at a time */
#ifdef TALLYD_DEBUG
  /* who holds each (TS_ASSERT of "called with ... held") */
  pthread_t mu_owner, sync_owner;
  int mu_held, sync_held;
#endif
  repo_model *models;
  md_host host;
  st_load weights_load; /* how model.safetensors is read */
  repo_event_fn event_fn;
  void *event_data;
  /* The fit lock across replicas (repo.h, base/fitlock.h): who we are, the
   * lease, and the locks held by running fits (under mu). */
  char fit_owner[64];
  int64_t fit_lease_ms;
  struct fit_hold *holds;
};

typedef struct fit_hold {
  char *name;
  fl_lock *lock;
  struct fit_hold *next;
} fit_hold;

/* The two mutexes, through these so that debug builds know the holder. */
static void repo_lock(repo_t *r) {
  uv_mutex_lock(&r->mu);
#ifdef TALLYD_DEBUG
  r->mu_owner = pthread_self();
  r->mu_held = 1;
#endif
}
static void repo_unlock(repo_t *r) {
#ifdef TALLYD_DEBUG
  TS_ASSERT(r->mu_held && pthread_equal(r->mu_owner, pthread_self()));
  r->mu_held = 0;
#endif
  uv_mutex_unlock(&r->mu);
}
static void sync_lock(repo_t *r) {
  uv_mutex_lock(&r->sync_mu);
#ifdef TALLYD_DEBUG
  r->sync_owner = pthread_self();
  r->sync_held = 1;
#endif
}
static void sync_unlock(repo_t *r) {
#ifdef TALLYD_DEBUG
  TS_ASSERT(r->sync_held && pthread_equal(r->sync_owner, pthread_self()));
  r->sync_held = 0;
#endif
  uv_mutex_unlock(&r->sync_mu);
}
#ifdef TALLYD_DEBUG
#define MU_HELD(r) ((r)->mu_held && pthread_equal((r)->mu_owner, pthread_self()))
#define SYNC_HELD(r) ((r)->sync_held && pthread_equal((r)->sync_owner, pthread_self()))
#endif

/* Path formatting: vsnprintf, so a too-long path shows up as a truncated
 * name that fails to open, never as an overflow. */
static int pathf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int pathf(char *buf, size_t n, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int r = vsnprintf(buf, n, fmt, ap);
  va_end(ap);
  return r < 0 || (size_t)r >= n ? -1 : 0;
}

/* ---- versions ---------------------------------------------------------- */

static void ver_free(repo_ver *v) {
  if (!v) return;
  if (v->kind && v->state) v->kind->free(v->state);
  if (v->weights) st_close(v->weights);
  if (v->config) json_decref(v->config);
  if (v->version_info) json_decref(v->version_info);
  if (v->stats_mu_ready) uv_mutex_destroy(&v->stats_mu);
  tl_free(v->model_name);
  tl_free(v);
}

void repo_release(repo_ver *v) {
  if (v && atomic_fetch_sub(&v->refs, 1) == 1) ver_free(v);
}

const md_kind *repo_ver_kind(const repo_ver *v) {
  return v->kind;
}
void *repo_ver_state(const repo_ver *v) {
  return v->state;
}
int64_t repo_ver_version(const repo_ver *v) {
  return v->version;
}
const char *repo_ver_model(const repo_ver *v) {
  return v->model_name;
}
const md_sig *repo_ver_sig(const repo_ver *v) {
  return &v->sig;
}
int64_t repo_ver_max_batch(const repo_ver *v) {
  return v->max_batch;
}

const md_sched *repo_ver_sched(const repo_ver *v) {
  return &v->sched;
}
const json_t *repo_ver_config(const repo_ver *v) {
  return v->config;
}

int repo_reserved_name(const char *name) {
  return strcmp(name, "stats") == 0;
}

/* ---- statistics ---------------------------------------------------------- */

static void dur_add(repo_dur *d, double secs) {
  d->count++;
  d->ns += secs > 0 ? (uint64_t)(secs * 1e9 + 0.5) : 0;
}

void repo_ver_record(repo_ver *v, const repo_infer_times *t) {
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  uv_mutex_lock(&v->stats_mu);
  repo_stats *s = &v->stats;
  s->last_inference_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
  if (!t->ok) {
    dur_add(&s->fail, t->total);
    uv_mutex_unlock(&v->stats_mu);
    return;
  }
  s->execution_count++;
  s->inference_count += (uint64_t)(t->batch > 0 ? t->batch : 1);
  dur_add(&s->success, t->total);
  dur_add(&s->queue, t->queue);
  dur_add(&s->compute_input, t->input);
  dur_add(&s->compute_infer, t->infer);
  dur_add(&s->compute_output, t->output);
  int64_t bs = t->batch > 0 ? t->batch : 1;
  repo_batch_stat *b = NULL;
  for (int i = 0; i < s->n_batch && !b; i++)
    if (s->batch[i].batch_size == bs) b = &s->batch[i];
  if (!b && s->n_batch < REPO_BATCH_SIZES) {
    b = &s->batch[s->n_batch++];
    b->batch_size = bs;
  }
  if (b) {
    dur_add(&b->compute_input, t->input);
    dur_add(&b->compute_infer, t->infer);
    dur_add(&b->compute_output, t->output);
  } else {
    s->batch_untracked++;
  }
  uv_mutex_unlock(&v->stats_mu);
}

int repo_stats_foreach(repo_t *r, const char *name, int64_t version, repo_stats_fn fn, void *data,
                       ts_err *err) {
  if (name) { /* 404 / 503 exactly as every other route of a model */
    repo_ver *v;
    int rc = repo_acquire(r, name, version, &v, err);
    if (rc) return rc;
    repo_release(v);
  }
  repo_lock(r);
  for (repo_model *m = r->models; m; m = m->next) {
    if (name && strcmp(m->name, name) != 0) continue;
    for (int i = 0; i < m->nvers; i++) {
      repo_ver *v = m->vers[i];
      if (version && v->version != version) continue;
      repo_stats copy;
      uv_mutex_lock(&v->stats_mu);
      copy = v->stats;
      uv_mutex_unlock(&v->stats_mu);
      fn(data, m->name, v->version, &copy);
    }
  }
  repo_unlock(r);
  return 0;
}

/* config.json's "max_batch" (Triton's max_batch_size): an integer >= 0,
 * 0 or absent for no limit. Anything else keeps the model from loading. */
static int read_max_batch(const json_t *config, int64_t *out, ts_err *err) {
  json_t *mb = json_object_get(config, "max_batch");
  *out = 0;
  if (!mb) return 0;
  if (!json_is_integer(mb) || json_integer_value(mb) < 0)
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'max_batch' must be an integer >= 0 (0: no "
                   "limit), got %s",
                   json_is_integer(mb) ? "a negative number" : "a non-integer");
  *out = json_integer_value(mb);
  return 0;
}
const char *repo_root(const repo_t *r) {
  return r->root;
}

static void file_stamp(const char *path, char *out, size_t n) {
  struct stat st;
  if (stat(path, &st) != 0) {
    snprintf(out, n, "-");
    return;
  }
  snprintf(out, n, "%llu:%lld:%lld.%09ld", (unsigned long long)st.st_ino, (long long)st.st_size,
           (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
}

static void version_stamp(const char *vdir, char *out, size_t n) {
  char p[PATH_MAX], a[120], b[120];
  pathf(p, sizeof p, "%s/model.safetensors", vdir);
  file_stamp(p, a, sizeof a);
  pathf(p, sizeof p, "%s/version.json", vdir);
  file_stamp(p, b, sizeof b);
  snprintf(out, n, "%s|%s", a, b);
}

static int read_json_file(const char *path, size_t cap, json_t **out, ts_err *err) {
  char *buf;
  size_t len;
  int r = fs_read_file(path, cap, &buf, &len, err);
  if (r) return r;
  json_error_t je;
  json_t *j = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &je);
  tl_free(buf);
  if (!j) return ts_errf(err, TS_EINVAL, "%s: invalid JSON at line %d: %s", path, je.line, je.text);
  *out = j;
  return 0;
}

static int host_acquire(md_host *h, const char *model, void **handle, const md_kind **kind,
                        void **state, ts_err *err) {
  repo_ver *v;
  int r = repo_acquire(h->data, model, 0, &v, err);
  if (r) return r;
  *handle = v;
  *kind = v->kind;
  *state = v->state;
  return 0;
}

static void host_release(md_host *h, void *handle) {
  (void)h;
  repo_release(handle);
}

/* Loads one version completely; nothing is published here. */
static int ver_load(repo_t *r, const char *model, int64_t version, const json_t *config,
                    repo_ver **out, ts_err *err) {
  char vdir[PATH_MAX], path[PATH_MAX];
  pathf(vdir, sizeof vdir, "%s/%s/%lld", r->root, model, (long long)version);
  repo_ver *v = tl_calloc(1, sizeof *v);
  if (!v) return ts_errf(err, TS_ENOMEM, "out of memory");
  atomic_init(&v->refs, 1);
  if (uv_mutex_init(&v->stats_mu) != 0) {
    tl_free(v);
    return ts_errf(err, TS_ENOMEM, "out of memory (mutex)");
  }
  v->stats_mu_ready = 1;
  v->version = version;
  v->model_name = tl_strdup(model);
  v->config = json_deep_copy(config);
  if (!v->model_name || !v->config) {
    ver_free(v);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  version_stamp(vdir, v->stamp, sizeof v->stamp);
  const char *kind = NULL;
  v->kind = md_kind_of_config(config, &kind);
  int rc;
  if ((rc = read_max_batch(config, &v->max_batch, err))) goto fail;
  if ((rc = md_config_sched(config, &v->sched, err))) goto fail;
  if (!v->kind) {
    rc = json_object_get(config, "kind") || !json_object_get(config, "model_type")
             ? ts_errf(err, TS_EINVAL, "config.json: unknown kind '%s' (known: %s)", kind,
                       md_kind_names())
             : ts_errf(err, TS_EINVAL,
                       "config.json: no \"kind\" and model_type '%s' is not one tallyd knows "
                       "(a Hugging Face config loads without \"kind\" for model_type gpt2; "
                       "otherwise set \"kind\": %s)",
                       kind, md_kind_names());
    goto fail;
  }
  pathf(path, sizeof path, "%s/version.json", vdir);
  struct stat vst;
  if (lstat(path, &vst) == 0 &&
      (rc = read_json_file(path, MAX_VERSION_JSON_BYTES, &v->version_info, err)))
    goto fail;
  pathf(path, sizeof path, "%s/model.safetensors", vdir);
  struct stat lst;
  /* lstat, not access: a link that loops or dangles is an entry whose
   * failure to open is the reason to report, not a missing file */
  if (lstat(path, &lst) == 0) {
    /* The digest is of exactly the bytes read (or mapped), so a check
     * against the one recorded at write time covers what is served. */
    rc = st_open_file(&v->weights, path, r->weights_load, v->sha256, err);
    const char *want =
        v->version_info ? json_string_value(json_object_get(v->version_info, "sha256")) : NULL;
    if (want && v->sha256[0] && strcmp(want, v->sha256) != 0) {
      st_close(v->weights);
      v->weights = NULL;
      rc = ts_errf(err, TS_EINVAL,
                   "model.safetensors: SHA-256 %s does not match %s recorded in version.json "
                   "(the file is corrupt)",
                   v->sha256, want);
      goto fail;
    }
    if (rc) goto fail;
  }
  md_load_ctx ctx = {.model_name = model,
                     .version = version,
                     .version_dir = vdir,
                     .config = config,
                     .weights = v->weights,
                     .host = &r->host,
                     .pool = r->pool};
  if ((rc = v->kind->load(&ctx, &v->state, err))) {
    v->state = NULL;
    goto fail;
  }
  v->kind->signature(v->state, &v->sig);
  *out = v;
  return 0;
fail:
  ver_free(v);
  return rc;
}

/* ---- candidates (learn/: a refit's version that is not served) ---------- */

/* 1 when <mdir>/<version>/version.json marks a candidate that was not
 * promoted ("candidate": {"state": "pending" | "dropped"}): such a version
 * is on disk for shadow scoring and the record, never served. */
static int is_unserved_candidate(const char *mdir, int64_t version) {
  char path[PATH_MAX];
  pathf(path, sizeof path, "%s/%lld/version.json", mdir, (long long)version);
  json_t *info = NULL;
  if (read_json_file(path, MAX_VERSION_JSON_BYTES, &info, NULL)) return 0;
  const json_t *c = json_object_get(info, "candidate");
  const char *state = json_string_value(json_object_get(c, "state"));
  int yes = json_is_object(c) && !(state && strcmp(state, "promoted") == 0);
  json_decref(info);
  return yes;
}

/* Removes unserved candidates from a version list (the policy never sees them). */
static void drop_candidates(const char *mdir, int64_t *vs, int *nv) {
  int k = 0;
  for (int i = 0; i < *nv; i++)
    if (!is_unserved_candidate(mdir, vs[i])) vs[k++] = vs[i];
  *nv = k;
}

/* ---- the table --------------------------------------------------------- */

static repo_model *find_model(repo_t *r, const char *name) {
  for (repo_model *m = r->models; m; m = m->next)
    if (strcmp(m->name, name) == 0) return m;
  return NULL;
}

static repo_model *get_model(repo_t *r, const char *name) {
  repo_model *m = find_model(r, name);
  if (m) return m;
  m = tl_calloc(1, sizeof *m);
  if (!m || !(m->name = tl_strdup(name))) {
    tl_free(m);
    return NULL;
  }
  m->state = MS_LOADING;
  m->next = r->models;
  r->models = m;
  return m;
}

static void emit_event(repo_t *r, const char *model, int64_t version, int ready) {
  if (r->event_fn) r->event_fn(r->event_data, model, version, ready);
}

static int wanted(repo_t *r, const char *name) {
  if (!r->only) return 1;
  for (char **o = r->only; *o; o++)
    if (strcmp(*o, name) == 0) return 1;
  return 0;
}

/* Which of the versions on disk the policy serves; fills keep[i]. */
static int apply_policy(const json_t *config, const int64_t *vs, int n, int *keep, ts_err *err) {
  json_t *pol = json_object_get(config, "version_policy");
  for (int i = 0; i < n; i++) keep[i] = 0;
  if (!pol || json_is_null(pol)) {
    if (n) keep[n - 1] = 1;
    return 0;
  }
  if (!json_is_object(pol) || json_object_size(pol) != 1)
    return ts_errf(err, TS_EINVAL,
                   "config.json: version_policy must be {\"latest\": {\"num_versions\": N}}, "
                   "{\"all\": {}} or {\"specific\": {\"versions\": [...]}}");
  json_t *lat = json_object_get(pol, "latest");
  json_t *spec = json_object_get(pol, "specific");
  if (json_object_get(pol, "all")) {
    for (int i = 0; i < n; i++) keep[i] = 1;
  } else if (lat) {
    json_t *nv = json_object_get(lat, "num_versions");
    if (!json_is_integer(nv) || json_integer_value(nv) < 1)
      return ts_errf(err, TS_EINVAL,
                     "config.json: version_policy.latest.num_versions must be an integer >= 1");
    for (int i = n - 1, k = 0; i >= 0 && k < json_integer_value(nv); i--, k++) keep[i] = 1;
  } else if (spec) {
    json_t *arr = json_object_get(spec, "versions");
    if (!json_is_array(arr))
      return ts_errf(err, TS_EINVAL,
                     "config.json: version_policy.specific.versions must be an array");
    size_t j;
    json_t *x;
    json_array_foreach(arr, j, x) {
      if (!json_is_integer(x))
        return ts_errf(err, TS_EINVAL,
                       "config.json: version_policy.specific.versions holds a non-integer");
      for (int i = 0; i < n; i++)
        if (vs[i] == json_integer_value(x)) keep[i] = 1;
    }
  } else {
    return ts_errf(err, TS_EINVAL,
                   "config.json: unknown version_policy (use latest, all or specific)");
  }
  return 0;
}

static void set_failed(repo_model *m, int64_t version, const char *stamp, const char *reason) {
  for (int i = 0; i < m->nfailed; i++)
    if (m->failed[i].version == version) {
      snprintf(m->failed[i].stamp, sizeof m->failed[i].stamp, "%s", stamp);
      snprintf(m->failed[i].reason, sizeof m->failed[i].reason, "%s", reason);
      return;
    }
  failed_ver *f = tl_realloc(m->failed, sizeof *f * (size_t)(m->nfailed + 1));
  if (!f) return;
  m->failed = f;
  f[m->nfailed].version = version;
  snprintf(f[m->nfailed].stamp, sizeof f->stamp, "%s", stamp);
  snprintf(f[m->nfailed].reason, sizeof f->reason, "%s", reason);
  m->nfailed++;
}

static void clear_failed(repo_model *m, int64_t version) {
  for (int i = 0; i < m->nfailed; i++)
    if (m->failed[i].version == version) {
      m->failed[i] = m->failed[--m->nfailed];
      return;
    }
}

static const failed_ver *find_failed(const repo_model *m, int64_t version) {
  for (int i = 0; i < m->nfailed; i++)
    if (m->failed[i].version == version) return &m->failed[i];
  return NULL;
}

static repo_ver *served(repo_model *m, int64_t version) {
  for (int i = 0; i < m->nvers; i++)
    if (m->vers[i]->version == version) return m->vers[i];
  return NULL;
}

/* Replaces the served set of m with `next` (n entries, ascending), which
 * holds its own reference to each entry (callers take one even for versions
 * that stay); the old table's references are all dropped, so a version no
 * longer served goes with its last request. Called with r->mu held. */
static void publish(repo_t *r, repo_model *m, repo_ver **next, int n) {
  TS_ASSERT(MU_HELD(r));
  /* next holds a reference of its own to every version it keeps, so the old
   * table's reference goes in every case (else each rescan leaked one) */
  for (int i = 0; i < m->nvers; i++) {
    int still = 0;
    for (int j = 0; j < n; j++) still |= next[j] == m->vers[i];
    if (!still) emit_event(r, m->name, m->vers[i]->version, 0);
    repo_release(m->vers[i]);
  }
  tl_free(m->vers);
  m->vers = next;
  m->nvers = n;
  for (int j = 0; j < n; j++) emit_event(r, m->name, next[j]->version, 1);
}

static int cmp_ver(const void *a, const void *b) {
  int64_t x = (*(repo_ver *const *)a)->version, y = (*(repo_ver *const *)b)->version;
  return (x > y) - (x < y);
}

/* Publishes `next` (n versions, ascending, one reference each, owned by the
 * call) as m's served set and sets the model's state: READY when it serves
 * a version, else UNAVAILABLE with `why_empty` (may be NULL: reason kept).
 * Shared by a rescan (sync_commit) and a new fitted version
 * (repo_commit_version). Called with r->mu held. */
static void set_served(repo_t *r, repo_model *m, repo_ver **next, int n, const char *why_empty) {
  TS_ASSERT(MU_HELD(r));
  publish(r, m, next, n);
  if (m->nvers > 0) {
    m->state = MS_READY;
    m->reason[0] = 0;
  } else {
    m->state = MS_UNAVAILABLE;
    if (why_empty) snprintf(m->reason, sizeof m->reason, "%s", why_empty);
  }
}

/* A rescan of one model in three phases (sync_model): plan reads the
 * configuration and the version directories and decides which versions
 * the policy keeps; load brings each kept version in line with the disk
 * (slow: r->mu is not held while a version loads); commit publishes the
 * result. Called with sync_mu held. */
typedef struct sync_plan {
  char mdir[PATH_MAX], cpath[PATH_MAX], cstamp[128];
  json_t *config;
  int64_t *vs; /* the version directories, ascending */
  int nv;
  int *keep; /* [nv] kept by the version policy */
  int config_changed;
  repo_ver **next; /* [nv] the versions to serve, one reference each */
  int nnext;
} sync_plan;

static void plan_free(sync_plan *p) {
  if (p->next) {
    for (int i = 0; i < p->nnext; i++) repo_release(p->next[i]);
    tl_free(p->next);
  }
  tl_free(p->keep);
  tl_free(p->vs);
  if (p->config) json_decref(p->config);
  memset(p, 0, sizeof *p);
}

/* 0: go on with *m; 1: nothing to do (unknown, unloaded, or a configuration
 * that cannot be used, recorded as the model's reason). */
static int sync_plan_make(repo_t *r, const char *name, int force, sync_plan *p, repo_model **mp) {
  pathf(p->mdir, sizeof p->mdir, "%s/%s", r->root, name);
  pathf(p->cpath, sizeof p->cpath, "%s/config.json", p->mdir);
  file_stamp(p->cpath, p->cstamp, sizeof p->cstamp);
  ts_err err = {0};
  repo_lock(r);
  repo_model *m = get_model(r, name);
  if (!m) {
    repo_unlock(r);
    return 1;
  }
  m->present = 1;
  json_t *ovr = NULL; /* a load's config override stands in for config.json */
  if (m->override) {
    ovr = json_incref(m->override);
    snprintf(p->cstamp, sizeof p->cstamp, "override:%u", m->override_gen);
  }
  p->config_changed = strcmp(p->cstamp, m->config_stamp) != 0;
  if (m->unloaded && !force) {
    repo_unlock(r);
    if (ovr) json_decref(ovr);
    return 1;
  }
  repo_unlock(r);
  *mp = m;

  fs_clean_tmp(p->mdir, NULL, NULL);
  int rc =
      ovr ? (p->config = ovr, 0) : read_json_file(p->cpath, MAX_CONFIG_BYTES, &p->config, &err);
  if (!rc && !json_is_object(p->config))
    rc = ts_errf(&err, TS_EINVAL, "config.json is not a JSON object");
  if (!rc) rc = fs_list_versions(p->mdir, &p->vs, &p->nv, &err);
  if (!rc) drop_candidates(p->mdir, p->vs, &p->nv);
  if (!rc && !(p->keep = tl_calloc((size_t)(p->nv ? p->nv : 1), sizeof(int))))
    rc = ts_errf(&err, TS_ENOMEM, "out of memory");
  if (!rc) rc = apply_policy(p->config, p->vs, p->nv, p->keep, &err);
  int64_t mb;
  if (!rc) rc = read_max_batch(p->config, &mb, &err);
  if (!rc && !(p->next = tl_calloc((size_t)(p->nv ? p->nv : 1), sizeof *p->next)))
    rc = ts_errf(&err, TS_ENOMEM, "out of memory");
  if (!rc) return 0;
  /* Without a usable config nothing new loads; versions that work stay. */
  repo_lock(r);
  snprintf(m->reason, sizeof m->reason, "%s", err.msg);
  if (m->nvers == 0) m->state = MS_UNAVAILABLE;
  snprintf(m->config_stamp, sizeof m->config_stamp, "%s", p->cstamp);
  repo_unlock(r);
  log_error("model '%s': %s", name, err.msg);
  return 1;
}

/* Each kept version: the served one when nothing changed, else loaded anew
 * (a failure is recorded and never displaces a working version). */
static void sync_load(repo_t *r, repo_model *m, const char *name, int force, sync_plan *p) {
  TS_ASSERT(!MU_HELD(r));
  for (int i = 0; i < p->nv; i++) {
    if (!p->keep[i]) continue;
    char vdir[PATH_MAX], stamp[256];
    pathf(vdir, sizeof vdir, "%s/%lld", p->mdir, (long long)p->vs[i]);
    version_stamp(vdir, stamp, sizeof stamp);
    repo_lock(r);
    repo_ver *cur = served(m, p->vs[i]);
    const failed_ver *fv = find_failed(m, p->vs[i]);
    int same = cur && !p->config_changed && strcmp(cur->stamp, stamp) == 0;
    int same_failure = !cur && fv && !p->config_changed && strcmp(fv->stamp, stamp) == 0;
    /* `next` owns one reference to each version it holds; publish then drops
     * the old table's (every path that adds to next takes one) */
    if (same) atomic_fetch_add(&cur->refs, 1);
    repo_unlock(r);
    if (same) {
      p->next[p->nnext++] = cur;
      continue;
    }
    if (same_failure && !force) continue;
    repo_ver *v;
    ts_err lerr = {0};
    if (ver_load(r, name, p->vs[i], p->config, &v, &lerr) == 0) {
      p->next[p->nnext++] = v;
      repo_lock(r);
      clear_failed(m, p->vs[i]);
      repo_unlock(r);
      log_info("model '%s' version %lld: loaded (%s)", name, (long long)p->vs[i], v->kind->name);
    } else {
      log_error("model '%s' version %lld: failed to load: %s", name, (long long)p->vs[i], lerr.msg);
      repo_lock(r);
      set_failed(m, p->vs[i], stamp, lerr.msg);
      if (cur) { /* a broken replacement never displaces a working version */
        atomic_fetch_add(&cur->refs, 1);
        p->next[p->nnext++] = cur;
      }
      repo_unlock(r);
    }
  }
  /* A version the policy keeps but that failed to load must not shrink what
   * is served (the newest of "latest: 1" failing would leave nothing): the
   * served versions it would have displaced stay, newest first, while their
   * directories are still on disk. */
  int nkeep = 0;
  for (int i = 0; i < p->nv; i++) nkeep += p->keep[i];
  if (p->nnext < nkeep) {
    repo_lock(r);
    for (int i = m->nvers - 1; i >= 0 && p->nnext < nkeep; i--) {
      repo_ver *old = m->vers[i];
      int in_next = 0, on_disk = 0;
      for (int j = 0; j < p->nnext; j++) in_next |= p->next[j] == old;
      for (int j = 0; j < p->nv; j++) on_disk |= p->vs[j] == old->version;
      if (in_next || !on_disk) continue;
      atomic_fetch_add(&old->refs, 1);
      p->next[p->nnext++] = old;
    }
    repo_unlock(r);
  }
  qsort(p->next, (size_t)p->nnext, sizeof *p->next, cmp_ver);
}

/* Forgets failures of versions that left the disk or the policy, and
 * publishes the plan's versions. */
static void sync_commit(repo_t *r, repo_model *m, sync_plan *p) {
  repo_lock(r);
  for (int i = 0; i < m->nfailed;) {
    int on = 0;
    for (int j = 0; j < p->nv; j++) on |= p->keep[j] && p->vs[j] == m->failed[i].version;
    if (!on)
      m->failed[i] = m->failed[--m->nfailed];
    else
      i++;
  }
  const char *why = m->nfailed   ? m->failed[m->nfailed - 1].reason
                    : p->nv == 0 ? "no version directory (1, 2, ...) found"
                                 : "no version matches the version_policy";
  char reason[sizeof m->reason];
  snprintf(reason, sizeof reason, "%s", why);
  set_served(r, m, p->next, p->nnext, reason);
  p->next = NULL;
  p->nnext = 0;
  snprintf(m->config_stamp, sizeof m->config_stamp, "%s", p->cstamp);
  m->unloaded = 0;
  repo_unlock(r);
}

/* Brings one model in line with the disk: plan, load, commit. Called with
 * sync_mu held, r->mu not held (loading is slow). */
static void sync_model(repo_t *r, const char *name, int force) {
  TS_ASSERT(SYNC_HELD(r) && !MU_HELD(r));
  sync_plan p;
  memset(&p, 0, sizeof p);
  repo_model *m = NULL;
  if (sync_plan_make(r, name, force, &p, &m) == 0) {
    sync_load(r, m, name, force, &p);
    sync_commit(r, m, &p);
  }
  plan_free(&p);
}

#define RESERVED_REASON                                                                       \
  "the model name 'stats' is reserved: GET /v2/models/stats answers the statistics of every " \
  "model (Triton's statistics extension); rename the directory"

/* A directory with a reserved name is listed in the index with the reason,
 * never loaded, and does not hold readiness back. */
static void refuse_reserved(repo_t *r, const char *name) {
  repo_lock(r);
  repo_model *m = get_model(r, name);
  if (m) {
    m->present = 1;
    if (strcmp(m->reason, RESERVED_REASON) != 0) log_error("model '%s': " RESERVED_REASON, name);
    publish(r, m, NULL, 0);
    m->state = MS_UNLOADED;
    snprintf(m->reason, sizeof m->reason, "%s", RESERVED_REASON);
  }
  repo_unlock(r);
}

static void drop_model(repo_t *r, repo_model *m, int state) {
  TS_ASSERT(MU_HELD(r));
  publish(r, m, NULL, 0);
  m->state = state;
}

void repo_sync(repo_t *r) {
  sync_lock(r);
  repo_lock(r);
  for (repo_model *m = r->models; m; m = m->next) m->present = 0;
  repo_unlock(r);
  DIR *d = opendir(r->root);
  if (!d) {
    log_error("model repository '%s': %s", r->root, strerror(errno));
  } else {
    struct dirent *e;
    char **names = NULL;
    int n = 0;
    while ((e = readdir(d))) {
      if (!fs_name_valid(e->d_name) || !wanted(r, e->d_name)) continue;
      char cpath[PATH_MAX];
      struct stat st;
      pathf(cpath, sizeof cpath, "%s/%s", r->root, e->d_name);
      if (stat(cpath, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
      char **nn = tl_realloc(names, sizeof *names * (size_t)(n + 1));
      if (!nn) break;
      names = nn;
      if (!(names[n] = tl_strdup(e->d_name))) break;
      n++;
    }
    closedir(d);
    for (int i = 0; i < n; i++) {
      if (repo_reserved_name(names[i]))
        refuse_reserved(r, names[i]);
      else
        sync_model(r, names[i], 0);
      tl_free(names[i]);
    }
    tl_free(names);
  }
  /* Models that left the disk stop being served. */
  repo_lock(r);
  for (repo_model *m = r->models; m; m = m->next)
    if (!m->present && !m->unloaded && (m->nvers || m->state != MS_UNLOADED)) {
      if (m->nvers) log_info("model '%s': removed from the repository", m->name);
      if (m->override) json_decref(m->override);
      m->override = NULL;
      drop_model(r, m, MS_UNLOADED);
      snprintf(m->reason, sizeof m->reason, "not in the repository");
    }
  repo_unlock(r);
  sync_unlock(r);
}

/* Checks that `config` would load: the common keys, the version policy, and
 * the newest version it serves loaded with it (then dropped), so the kind
 * refuses what it refuses at any load, by name. Called with sync_mu held. */
static int check_override(repo_t *r, const char *name, const json_t *config, ts_err *err) {
  char mdir[PATH_MAX];
  pathf(mdir, sizeof mdir, "%s/%s", r->root, name);
  int64_t *vs = NULL, mb;
  int nv = 0, *keep = NULL, rc;
  if (!json_is_object(config)) return ts_errf(err, TS_EINVAL, "config is not a JSON object");
  if ((rc = read_max_batch(config, &mb, err))) return rc;
  if ((rc = fs_list_versions(mdir, &vs, &nv, err))) return rc;
  drop_candidates(mdir, vs, &nv);
  if (!(keep = tl_calloc((size_t)(nv ? nv : 1), sizeof(int)))) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = apply_policy(config, vs, nv, keep, err))) goto out;
  const char *what = NULL;
  if (!md_kind_of_config(config, &what)) {
    rc = ts_errf(err, TS_EINVAL, "config: unknown kind '%s' (known: %s)", what, md_kind_names());
    goto out;
  }
  for (int i = nv - 1; i >= 0; i--) {
    if (!keep[i]) continue;
    repo_ver *v;
    if ((rc = ver_load(r, name, vs[i], config, &v, err))) {
      ts_err_prefix(err, "version %lld does not load with this config", (long long)vs[i]);
      goto out;
    }
    repo_release(v);
    break;
  }
out:
  tl_free(keep);
  tl_free(vs);
  return rc;
}

int repo_load_model(repo_t *r, const char *name, ts_err *err) {
  return repo_load_model_config(r, name, NULL, err);
}

int repo_load_model_config(repo_t *r, const char *name, const json_t *config, ts_err *err) {
  char mdir[PATH_MAX];
  struct stat st;
  if (!fs_name_valid(name)) return ts_errf(err, TS_ENOTFOUND, "unknown model '%.200s'", name);
  if (repo_reserved_name(name)) return ts_errf(err, TS_EINVAL, RESERVED_REASON);
  pathf(mdir, sizeof mdir, config ? "%s/%s" : "%s/%s/config.json", r->root, name);
  if (stat(mdir, &st) != 0)
    return ts_errf(err, TS_ENOTFOUND, "model '%s' is not in the repository", name);
  if (config && !S_ISDIR(st.st_mode))
    return ts_errf(err, TS_ENOTFOUND, "model '%s' is not a directory in the repository", name);
  json_t *copy = config ? json_deep_copy(config) : NULL;
  if (config && !copy) return ts_errf(err, TS_ENOMEM, "out of memory");
  sync_lock(r);
  int rc = copy ? check_override(r, name, copy, err) : 0;
  if (rc) {
    sync_unlock(r);
    json_decref(copy);
    return rc;
  }
  repo_lock(r);
  repo_model *m = get_model(r, name);
  if (m && (m->override || copy)) {
    if (m->override) json_decref(m->override);
    m->override = copy; /* NULL: back to config.json */
    m->override_gen++;
    copy = NULL;
    log_info("model '%s': loading with %s", name,
             m->override ? "the config given with the load request (in memory)" : "config.json");
  }
  repo_unlock(r);
  if (copy) json_decref(copy);
  sync_model(r, name, 1);
  sync_unlock(r);
  repo_lock(r);
  m = find_model(r, name);
  if (!m || m->nvers == 0)
    rc =
        ts_errf(err, TS_EUNAVAIL, "model '%s' failed to load: %s", name, m ? m->reason : "unknown");
  repo_unlock(r);
  return rc;
}

int repo_unload_model(repo_t *r, const char *name, ts_err *err) {
  sync_lock(r);
  repo_lock(r);
  repo_model *m = find_model(r, name);
  int rc = 0;
  if (!m) {
    rc = ts_errf(err, TS_ENOTFOUND, "unknown model '%.200s'", name);
  } else {
    drop_model(r, m, MS_UNLOADED);
    m->unloaded = 1;
    snprintf(m->reason, sizeof m->reason, "unloaded");
    log_info("model '%s': unloaded", name);
  }
  repo_unlock(r);
  sync_unlock(r);
  return rc;
}

int repo_acquire(repo_t *r, const char *name, int64_t version, repo_ver **out, ts_err *err) {
  repo_lock(r);
  repo_model *m = find_model(r, name);
  int rc = 0;
  if (!m || (m->state == MS_UNLOADED && !m->unloaded)) {
    rc = ts_errf(err, TS_ENOTFOUND, "unknown model '%.200s'", name);
  } else if (m->nvers == 0) {
    rc = ts_errf(err, TS_EUNAVAIL, "model '%s' is not available: %s", name,
                 m->reason[0] ? m->reason : "loading");
  } else {
    repo_ver *v = version ? served(m, version) : m->vers[m->nvers - 1];
    if (!v) {
      rc = ts_errf(err, TS_ENOTFOUND, "model '%s' has no version %lld being served", name,
                   (long long)version);
    } else {
      atomic_fetch_add(&v->refs, 1);
      *out = v;
    }
  }
  repo_unlock(r);
  return rc;
}

void repo_index_foreach(repo_t *r, repo_index_fn fn, void *data) {
  repo_lock(r);
  for (repo_model *m = r->models; m; m = m->next) {
    for (int i = 0; i < m->nvers; i++) fn(data, m->name, m->vers[i]->version, "READY", "");
    for (int i = 0; i < m->nfailed; i++)
      fn(data, m->name, m->failed[i].version, "UNAVAILABLE", m->failed[i].reason);
    if (m->nvers == 0 && m->nfailed == 0) fn(data, m->name, 0, state_names[m->state], m->reason);
  }
  repo_unlock(r);
}

int repo_served_versions(repo_t *r, const char *name, int64_t *out, int cap) {
  int n = 0;
  repo_lock(r);
  repo_model *m = find_model(r, name);
  for (int i = 0; m && i < m->nvers; i++) {
    if (n < cap) out[n] = m->vers[i]->version;
    n++;
  }
  repo_unlock(r);
  return n;
}

const char *repo_ver_sha256(const repo_ver *v) {
  return v->sha256;
}

const json_t *repo_ver_info(const repo_ver *v) {
  return v->version_info;
}

int repo_all_ready(repo_t *r) {
  int ok = 1;
  repo_lock(r);
  for (repo_model *m = r->models; m; m = m->next)
    if (!m->unloaded && m->state != MS_UNLOADED && m->nvers == 0) ok = 0;
  repo_unlock(r);
  return ok;
}

int repo_count_models(repo_t *r, int *ready) {
  int n = 0, k = 0;
  repo_lock(r);
  for (repo_model *m = r->models; m; m = m->next) {
    n++;
    k += m->nvers > 0;
  }
  repo_unlock(r);
  if (ready) *ready = k;
  return n;
}

void repo_foreach_version(repo_t *r, void (*fn)(void *, const char *, int64_t, int), void *data) {
  repo_lock(r);
  for (repo_model *m = r->models; m; m = m->next) {
    for (int i = 0; i < m->nvers; i++) fn(data, m->name, m->vers[i]->version, 1);
    for (int i = 0; i < m->nfailed; i++) fn(data, m->name, m->failed[i].version, 0);
  }
  repo_unlock(r);
}

void repo_set_event_hook(repo_t *r, repo_event_fn fn, void *data) {
  r->event_fn = fn;
  r->event_data = data;
}

int repo_fit_begin(repo_t *r, const char *name, ts_err *err) {
  repo_lock(r);
  repo_model *m = find_model(r, name);
  int rc = 0;
  if (!m)
    rc = ts_errf(err, TS_ENOTFOUND, "unknown model '%.200s'", name);
  else if (m->fit_running)
    rc = ts_errf(err, TS_ECONFLICT, "a fit or calibration of model '%s' is already running", name);
  else
    m->fit_running = 1;
  int64_t lease = r->fit_lease_ms;
  repo_unlock(r);
  if (rc || lease <= 0) return rc;
  /* Across replicas: the lock file in the model directory. One O_EXCL
   * create and a write of a few hundred bytes, no fsync (the renewer thread
   * makes it durable): the claim stays cheap enough for the loop thread. */
  char path[PATH_MAX];
  pathf(path, sizeof path, "%s/%s/" REPO_FIT_LOCK, r->root, name);
  fit_hold *h = tl_calloc(1, sizeof *h);
  if (!h || !(h->name = tl_strdup(name))) {
    tl_free(h);
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
  } else if ((rc = fl_acquire(path, r->fit_owner, lease, &h->lock, NULL, err)) != 0) {
    if (rc == -TS_ECONFLICT)
      ts_err_prefix(err,
                    "a fit or calibration of model '%s' is already running on another "
                    "replica",
                    name);
    else
      ts_err_prefix(err, "model '%s': the fit lock", name);
    tl_free(h->name);
    tl_free(h);
  }
  repo_lock(r);
  if (rc) {
    if ((m = find_model(r, name))) m->fit_running = 0;
  } else {
    h->next = r->holds;
    r->holds = h;
  }
  repo_unlock(r);
  return rc;
}

void repo_fit_end(repo_t *r, const char *name) {
  repo_lock(r);
  repo_model *m = find_model(r, name);
  if (m) m->fit_running = 0;
  fit_hold *h = NULL;
  for (fit_hold **pp = &r->holds; *pp; pp = &(*pp)->next)
    if (strcmp((*pp)->name, name) == 0) {
      h = *pp;
      *pp = h->next;
      break;
    }
  repo_unlock(r);
  if (!h) return;
  if (fl_lost(h->lock))
    log_warn(
        "model '%s': the fit lock was taken over by another replica while this fit ran "
        "(it stalled past its lease)",
        name);
  fl_release(h->lock);
  tl_free(h->name);
  tl_free(h);
}

void repo_set_fit_lock(repo_t *r, const char *owner, int64_t lease_ms) {
  snprintf(r->fit_owner, sizeof r->fit_owner, "%s", owner ? owner : "");
  r->fit_lease_ms = lease_ms;
}

/* fs_claim_version's step: version.json for the number being claimed. */
static int write_version_json(const char *tmp, int64_t version, void *ctx, ts_err *err) {
  json_t *info = ctx;
  char path[PATH_MAX];
  json_object_set_new(info, "version", json_integer(version));
  char *text = jtext_dumps(info, JT_INDENT | JT_SORT_KEYS, NULL);
  if (!text) return ts_errf(err, TS_ENOMEM, "out of memory");
  pathf(path, sizeof path, "%s/version.json", tmp);
  int rc = fs_write_file_sync(path, text, strlen(text), err);
  free(text);
  if (!rc) rc = fs_fsync_dir(tmp, err);
  return rc;
}

int repo_commit_version(repo_t *r, const repo_ver *parent, md_call *call, int64_t *new_version,
                        ts_err *err) {
  char mdir[PATH_MAX], path[PATH_MAX], final[PATH_MAX];
  char *tmp = NULL;
  const char *name = parent->model_name;
  if (!call->new_weights) return ts_errf(err, TS_EINTERNAL, "the fit produced no weights");
  pathf(mdir, sizeof mdir, "%s/%s", r->root, name);
  sync_lock(r);
  int64_t *vs = NULL;
  int nv = 0, rc;
  if ((rc = fs_list_versions(mdir, &vs, &nv, err))) goto out;
  int64_t next = nv ? vs[nv - 1] + 1 : 1; /* vs[] <= FS_MAX_VERSION: no overflow */
  tl_free(vs);
  if (next > FS_MAX_VERSION) {
    rc = ts_errf(err, TS_ECONFLICT,
                 "model '%s' has version %lld, the largest there is: no "
                 "new version can follow it",
                 name, (long long)(next - 1));
    goto out;
  }
  if ((rc = fs_mkdtemp_in(mdir, ".tmp-", &tmp, err))) goto out;
  pathf(path, sizeof path, "%s/model.safetensors", tmp);
  if ((rc = st_writer_save(call->new_weights, path, err))) goto fail;
  char sha[65];
  if ((rc = hash_sha256_file(path, sha, err))) goto fail;
  json_t *info = call->new_version_info ? json_deep_copy(call->new_version_info) : json_object();
  int is_candidate = json_is_object(json_object_get(info, "candidate"));
  char ts[64];
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
  json_object_set_new(info, "parent_version", json_integer(parent->version));
  json_object_set_new(info, "created", json_string(ts));
  json_object_set_new(info, "sha256", json_string(sha));
  /* The number is claimed on disk: another replica on the same repository
   * may publish at the same moment (fs_claim_version takes the next free one
   * and rewrites version.json for it) */
  rc = fs_claim_version(mdir, tmp, &next, write_version_json, info, err);
  json_decref(info);
  if (rc) goto fail;
  pathf(final, sizeof final, "%s/%lld", mdir, (long long)next);
  if (is_candidate) { /* saved for the learning loop; not served (learn/candidate.c) */
    *new_version = next;
    log_info("model '%s': version %lld saved as a candidate (not served)", name, (long long)next);
    rc = 0;
    goto out;
  }
  /* Load before publishing; the old version serves until this succeeds. */
  json_t *config = NULL;
  repo_lock(r);
  repo_model *om = find_model(r, name);
  if (om && om->override) config = json_incref(om->override);
  repo_unlock(r);
  pathf(path, sizeof path, "%s/config.json", mdir);
  if (!config && (rc = read_json_file(path, MAX_CONFIG_BYTES, &config, err))) goto out;
  repo_ver *v;
  rc = ver_load(r, name, next, config, &v, err);
  if (rc) {
    ts_err_prefix(err, "version %lld was written but failed to load", (long long)next);
    json_decref(config);
    goto out;
  }
  int64_t *all = NULL;
  int nall = 0, *keep = NULL;
  repo_lock(r);
  repo_model *m = find_model(r, name);
  /* A model unloaded while its fit ran stays unloaded: the version is on
   * disk and serves at the next load, but the fit does not undo the unload. */
  if (m && m->unloaded) {
    log_info("model '%s': version %lld saved; not served because the model was unloaded", name,
             (long long)next);
    m = NULL;
  }
  if (m && fs_list_versions(mdir, &all, &nall, NULL) == 0 &&
      (drop_candidates(mdir, all, &nall), 1) && (keep = tl_calloc((size_t)nall, sizeof(int))) &&
      apply_policy(config, all, nall, keep, NULL) == 0) {
    repo_ver **set = tl_calloc((size_t)nall + 1, sizeof *set);
    int k = 0;
    for (int i = 0; set && i < nall; i++) {
      if (!keep[i]) continue;
      repo_ver *cur = all[i] == next ? v : served(m, all[i]);
      if (!cur) continue;
      if (cur != v) atomic_fetch_add(&cur->refs, 1);
      set[k++] = cur;
    }
    if (set) {
      int has_new = 0;
      for (int i = 0; i < k; i++) has_new |= set[i] == v;
      if (!has_new) repo_release(v);
      set_served(r, m, set, k, NULL);
      v = NULL;
    }
  }
  repo_unlock(r);
  if (v) repo_release(v);
  tl_free(keep);
  tl_free(all);
  json_decref(config);
  *new_version = next;
  log_info("model '%s': version %lld saved and served", name, (long long)next);
  rc = 0;
  goto out;
fail:
  fs_rmtree(tmp, NULL);
out:
  tl_free(tmp);
  sync_unlock(r);
  return rc;
}

int repo_load_unserved(repo_t *r, const char *name, int64_t version, repo_ver **out, ts_err *err) {
  char path[PATH_MAX];
  json_t *config = NULL;
  repo_lock(r);
  repo_model *m = find_model(r, name);
  if (m && m->override) config = json_incref(m->override);
  repo_unlock(r);
  pathf(path, sizeof path, "%s/%s/config.json", r->root, name);
  int rc = config ? 0 : read_json_file(path, MAX_CONFIG_BYTES, &config, err);
  if (rc) return rc;
  rc = ver_load(r, name, version, config, out, err);
  json_decref(config);
  return rc;
}

void repo_ver_retain(repo_ver *v) {
  atomic_fetch_add(&v->refs, 1);
}

int repo_rewrite_version_info(repo_t *r, const char *name, int64_t version, const json_t *info,
                              int rescan, ts_err *err) {
  char vdir[PATH_MAX], path[PATH_MAX], tmp[PATH_MAX];
  pathf(vdir, sizeof vdir, "%s/%s/%lld", r->root, name, (long long)version);
  pathf(path, sizeof path, "%s/version.json", vdir);
  pathf(tmp, sizeof tmp, "%s/.version.json.tmp", vdir);
  char *text = jtext_dumps(info, JT_INDENT | JT_SORT_KEYS, NULL);
  if (!text) return ts_errf(err, TS_ENOMEM, "out of memory");
  sync_lock(r);
  int rc = fs_write_file_sync(tmp, text, strlen(text), err);
  free(text);
  if (!rc) rc = fs_rename_atomic(tmp, path, err);
  if (!rc) rc = fs_fsync_dir(vdir, err);
  if (!rc && rescan) sync_model(r, name, 1);
  sync_unlock(r);
  return rc;
}

md_host *repo_host(repo_t *r) {
  return &r->host;
}

int repo_open(repo_t **out, const char *root, const char *const *only, pool_t *pool, ts_err *err) {
  struct stat st;
  if (stat(root, &st) != 0 || !S_ISDIR(st.st_mode))
    return ts_errf(err, TS_EINVAL, "model repository '%s' is not a directory", root);
  repo_t *r = tl_calloc(1, sizeof *r);
  if (!r || !(r->root = tl_strdup(root))) {
    tl_free(r);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  if (only && only[0]) {
    int n = 0;
    while (only[n]) n++;
    /* a failure here must not widen --model to "every model" */
    r->only = tl_calloc((size_t)n + 1, sizeof(char *));
    int ok = r->only != NULL;
    for (int i = 0; ok && i < n; i++) ok = (r->only[i] = tl_strdup(only[i])) != NULL;
    if (!ok) {
      for (int i = 0; r->only && i < n; i++) tl_free(r->only[i]);
      tl_free(r->only);
      tl_free(r->root);
      tl_free(r);
      return ts_errf(err, TS_ENOMEM, "out of memory");
    }
  }
  r->pool = pool;
  r->weights_load = ST_MMAP;
  uv_mutex_init(&r->mu);
  uv_mutex_init(&r->sync_mu);
  r->host.acquire = host_acquire;
  r->host.release = host_release;
  r->host.data = r;
  *out = r;
  return 0;
}

void repo_set_weights_load(repo_t *r, st_load how) {
  r->weights_load = how;
}

void repo_close(repo_t *r) {
  if (!r) return;
  repo_model *m = r->models;
  while (m) {
    repo_model *n = m->next;
    for (int i = 0; i < m->nvers; i++) repo_release(m->vers[i]);
    tl_free(m->vers);
    tl_free(m->failed);
    if (m->override) json_decref(m->override);
    tl_free(m->name);
    tl_free(m);
    m = n;
  }
  if (r->only)
    for (char **o = r->only; *o; o++) tl_free(*o);
  tl_free(r->only);
  while (r->holds) {
    fit_hold *h = r->holds;
    r->holds = h->next;
    fl_release(h->lock);
    tl_free(h->name);
    tl_free(h);
  }
  uv_mutex_destroy(&r->mu);
  uv_mutex_destroy(&r->sync_mu);
  tl_free(r->root);
  tl_free(r);
}
