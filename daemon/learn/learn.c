/* learn.c - the learning loop's rows: per model state, the served-row log
 * and its index by id, feedback joined to rows, the candidates answer and
 * the metrics (learn.h; refits, shadow answers and decisions: candidate.c).
 *
 * Log records (payload of a rowlog record, little-endian):
 *   row:   u8 1, u8 1 (format), f64 served time, u16 id length, id,
 *          i64 served version, u32 nout, f32 answer[nout], tensor section
 *   label: u8 2, u8 1, f64 time, u16 id length, id, f64 label
 * The tensor section is described in learn_int.h (struct lrow).
 *
 * Index invariants (m->mu): ring holds the newest `count` rows of at most
 * `cap` (= log.max_rows), oldest at `head`; every ring row is in exactly
 * one hash chain, under its id; `labelled` counts the ring rows with a
 * label. A row replaced by a newer one with the same id leaves both. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/jtext.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../methods/qagg.h"
#include "learn_int.h"

static const lkind lkinds[] = {
    {"ensemble", "labels", "probability", "log_loss", 1},
    {"quantile_ensemble", "targets", "quantiles", "wis", 0},
};

double learn_wall(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

double learn_mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t fnv1a(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

/* ---- the index ------------------------------------------------------------ */

static void row_free(lrow *r) {
  if (!r) return;
  tl_free(r->id);
  tl_free(r->tens);
  tl_free(r->out);
  tl_free(r->cand);
  tl_free(r);
}

lrow *lm_find(lmodel *m, const char *id) {
  if (!m->nb) return NULL;
  for (lrow *r = m->buckets[fnv1a(id) & (m->nb - 1)]; r; r = r->hnext)
    if (strcmp(r->id, id) == 0) return r;
  return NULL;
}

static void hash_remove(lmodel *m, lrow *r) {
  lrow **pp = &m->buckets[fnv1a(r->id) & (m->nb - 1)];
  for (; *pp; pp = &(*pp)->hnext)
    if (*pp == r) {
      *pp = r->hnext;
      return;
    }
}

/* Takes r out of the comparison it was counted in. */
static void unscore(lmodel *m, lrow *r) {
  if (!r->scored) return;
  m->sum_served -= r->loss_served;
  m->sum_cand -= r->loss_cand;
  m->n_cmp--;
  r->scored = 0;
}

/* Adds r as the newest row (taking it); an older row with its id and, when
 * the ring is full, the oldest row leave the index. */
static void index_add(lmodel *m, lrow *r) {
  lrow *old = lm_find(m, r->id);
  if (old) hash_remove(m, old); /* stays in the ring until it is the oldest */
  if (old && old->labelled) {   /* an id served again starts unlabelled */
    old->labelled = 0;
    m->labelled--;
    unscore(m, old);
  }
  if (m->count == m->cap) {
    lrow *gone = m->ring[m->head];
    if (lm_find(m, gone->id) == gone) hash_remove(m, gone);
    if (gone->labelled) m->labelled--;
    unscore(m, gone);
    row_free(gone);
    m->ring[m->head] = r;
    m->head = (m->head + 1) % m->cap;
  } else {
    m->ring[(m->head + m->count) % m->cap] = r;
    m->count++;
  }
  /* (old may be the oldest row, freed above when the ring was full) */
  size_t b = fnv1a(r->id) & (m->nb - 1);
  r->hnext = m->buckets[b];
  m->buckets[b] = r;
}

static void index_clear(lmodel *m) {
  for (int64_t i = 0; i < m->count; i++) row_free(m->ring[(m->head + i) % m->cap]);
  tl_free(m->ring);
  tl_free(m->buckets);
  m->ring = NULL;
  m->buckets = NULL;
  m->nb = 0;
  m->cap = m->count = m->head = m->labelled = 0;
  m->n_cmp = 0;
  m->sum_served = m->sum_cand = 0;
}

static int index_init(lmodel *m, int64_t cap) {
  size_t nb = 16;
  while (nb < (size_t)cap * 2) nb <<= 1;
  m->ring = tl_calloc((size_t)cap, sizeof *m->ring);
  m->buckets = tl_calloc(nb, sizeof *m->buckets);
  if (!m->ring || !m->buckets) {
    tl_free(m->ring);
    tl_free(m->buckets);
    m->ring = NULL;
    m->buckets = NULL;
    return -1;
  }
  m->cap = cap;
  m->nb = nb;
  return 0;
}

/* ---- records -------------------------------------------------------------- */

typedef struct wbuf {
  unsigned char *p;
  size_t len, cap;
  int failed;
} wbuf;

static void wput(wbuf *w, const void *d, size_t n) {
  if (w->failed) return;
  if (w->len + n > w->cap) {
    size_t cap = w->cap ? w->cap * 2 : 256;
    while (cap < w->len + n) cap *= 2;
    unsigned char *q = tl_realloc(w->p, cap);
    if (!q) {
      w->failed = 1;
      return;
    }
    w->p = q;
    w->cap = cap;
  }
  memcpy(w->p + w->len, d, n);
  w->len += n;
}
#define WPUT(w, v) wput((w), &(v), sizeof(v))

typedef struct rbuf {
  const unsigned char *p;
  size_t len, off;
  int bad;
} rbuf;

static const void *rget(rbuf *r, size_t n) {
  if (r->bad || r->len - r->off < n) {
    r->bad = 1;
    return NULL;
  }
  const void *q = r->p + r->off;
  r->off += n;
  return q;
}
#define RGET(r, v)                         \
  do {                                     \
    const void *q_ = rget((r), sizeof(v)); \
    if (q_)                                \
      memcpy(&(v), q_, sizeof(v));         \
    else                                   \
      memset(&(v), 0, sizeof(v));          \
  } while (0)

/* The tensor section of row b of a request; 0, or -1 (a BYTES or scalar
 * input, or a leading dimension other than B: not logged). */
static int encode_tensors(wbuf *w, const ts_list *inputs, int64_t B, int64_t b) {
  for (int i = 0; i < inputs->n; i++) {
    const ts_tensor *t = &inputs->items[i];
    size_t es = ts_dtype_size(t->dtype);
    if (!es || t->ndim < 1 || t->shape[0] != B || !t->name || strlen(t->name) > 255) return -1;
    uint8_t role = 0, nl = (uint8_t)strlen(t->name), dt = (uint8_t)t->dtype,
            nd = (uint8_t)(t->ndim - 1);
    WPUT(w, role);
    WPUT(w, nl);
    wput(w, t->name, nl);
    WPUT(w, dt);
    WPUT(w, nd);
    int64_t per = 1;
    for (int d = 1; d < t->ndim; d++) {
      WPUT(w, t->shape[d]);
      per *= t->shape[d];
    }
    uint32_t nbytes = (uint32_t)((size_t)per * es);
    if ((size_t)per * es > RL_MAX_RECORD / 2) return -1;
    WPUT(w, nbytes);
    wput(w, (const char *)t->data + (size_t)b * nbytes, nbytes);
  }
  return 0;
}

static void encode_head(wbuf *w, uint8_t type, double t, const char *id) {
  uint8_t fmt = 1;
  uint16_t idl = (uint16_t)strlen(id);
  WPUT(w, type);
  WPUT(w, fmt);
  WPUT(w, t);
  WPUT(w, idl);
  wput(w, id, idl);
}

/* A row from its record (replay) or from its parts; NULL when malformed. */
static lrow *decode_row(rbuf *r, double t, const char *id, size_t idl) {
  lrow *row = tl_calloc(1, sizeof *row);
  if (!row) return NULL;
  row->t = t;
  uint32_t nout = 0;
  RGET(r, row->version);
  RGET(r, nout);
  if (r->bad || nout > 1000000 || !(row->id = tl_malloc(idl + 1))) goto bad;
  memcpy(row->id, id, idl);
  row->id[idl] = 0;
  const void *o = rget(r, (size_t)nout * sizeof(float));
  if (!o || !(row->out = tl_malloc(sizeof(float) * (nout ? nout : 1)))) goto bad;
  memcpy(row->out, o, (size_t)nout * sizeof(float));
  row->nout = (int)nout;
  row->tens_len = r->len - r->off;
  if (!(row->tens = tl_malloc(row->tens_len ? row->tens_len : 1))) goto bad;
  memcpy(row->tens, r->p + r->off, row->tens_len);
  return row;
bad:
  row_free(row);
  return NULL;
}

static void replay(void *data, const void *payload, size_t len, int is_row) {
  lmodel *m = data;
  rbuf r = {.p = payload, .len = len};
  uint8_t type = 0, fmt = 0;
  double t = 0;
  uint16_t idl = 0;
  RGET(&r, type);
  RGET(&r, fmt);
  RGET(&r, t);
  RGET(&r, idl);
  const char *id = rget(&r, idl);
  if (r.bad || fmt != 1 || idl == 0 || (type == 1) != is_row) return;
  if (type == 1) {
    lrow *row = decode_row(&r, t, id, idl);
    if (row) index_add(m, row);
  } else if (type == 2) {
    double y = 0;
    RGET(&r, y);
    char buf[300];
    if (r.bad || idl >= sizeof buf) return;
    memcpy(buf, id, idl);
    buf[idl] = 0;
    lrow *row = lm_find(m, buf);
    if (!row) return;
    if (!row->labelled) m->labelled++;
    row->labelled = 1;
    row->label = y;
  }
}

/* ---- scores --------------------------------------------------------------- */

double lm_score(const lmodel *m, const float *out, int nout, double y) {
  if (strcmp(m->metric, "brier") == 0) { /* sum over the classes of (p - [class = y])^2 */
    if (nout == 1) return (out[0] - y) * (out[0] - y);
    double b = 0;
    for (int c = 0; c < nout; c++) b += (out[c] - (c == (int)y)) * (out[c] - (c == (int)y));
    return b;
  }
  if (strcmp(m->metric, "mae") == 0)
    return m->median >= 0 && nout == m->K ? fabs(y - out[m->median]) : NAN;
  if (m->lk->integer_labels) { /* log loss, probabilities clipped to [1e-7, 1 - 1e-7] */
    double p;
    if (nout == 1)
      p = y >= 0.5 ? out[0] : 1.0 - out[0];
    else
      p = (y >= 0 && y < nout) ? out[(int)y] : 0;
    if (!(p >= 1e-7)) p = 1e-7;
    if (p > 1 - 1e-7) p = 1 - 1e-7;
    return -log(p);
  }
  if (nout != m->K) return NAN;
  return qa_wis_pinball(m->K, m->levels, out, y);
}

/* ---- per model state ------------------------------------------------------ */

static const lkind *kind_of(const md_kind *k) {
  for (size_t i = 0; i < sizeof lkinds / sizeof *lkinds; i++)
    if (strcmp(lkinds[i].kind, k->name) == 0) return &lkinds[i];
  return NULL;
}

/* "log" and "refit" of a config as one text (NULL on failure); "" when
 * the config has neither. */
static char *cfg_key_of(const json_t *cfg) {
  json_t *o = json_object();
  if (!o) return NULL;
  const json_t *lg = json_object_get(cfg, "log"), *rf = json_object_get(cfg, "refit");
  if (lg) json_object_set(o, "log", (json_t *)lg);
  if (rf) json_object_set(o, "refit", (json_t *)rf);
  json_object_set(o, "levels", json_object_get(cfg, "levels"));
  char *t = json_dumps(o, JSON_SORT_KEYS | JSON_COMPACT);
  json_decref(o);
  char *c = t ? tl_strdup(t) : NULL;
  free(t);
  return c;
}

static void lm_close(lmodel *m) {
  rl_close(m->store);
  m->store = NULL;
  index_clear(m);
  tl_free(m->levels);
  m->levels = NULL;
  m->K = 0;
  if (m->cfg_json) json_decref(m->cfg_json);
  m->cfg_json = NULL;
  memset(&m->cfg, 0, sizeof m->cfg);
}

/* (Re)builds m for the config: reads the settings, opens the log and
 * replays it into the index. m->mu held (or m not yet shared). */
static void lm_open(learn_t *L, lmodel *m, const json_t *config) {
  lm_close(m);
  m->reason[0] = 0;
  m->metric = m->lk->metric;
  m->median = -1;
  ts_err err = {0};
  m->cfg_json = json_deep_copy(config);
  if (!m->cfg_json || lc_parse(m->cfg_json, NULL, &m->cfg, &err)) {
    /* the kind's load checked it with its fit's names: only params differ */
    if (m->cfg_json && json_object_get(json_object_get(m->cfg_json, "refit"), "params")) {
      json_t *rf = json_object_get(m->cfg_json, "refit");
      json_t *p = json_incref(json_object_get(rf, "params"));
      json_object_del(rf, "params");
      int rc = lc_parse(m->cfg_json, NULL, &m->cfg, &err);
      json_object_set_new(rf, "params", p);
      m->cfg.params = rc ? NULL : p;
      if (!rc) goto parsed;
    }
    snprintf(m->reason, sizeof m->reason, "%s", err.msg[0] ? err.msg : "out of memory");
    memset(&m->cfg, 0, sizeof m->cfg);
    return;
  }
parsed:;
  static const char *const names[] = {"log_loss", "brier", "wis", "mae"};
  m->metric = m->lk->metric;
  for (int i = 0; i < 4; i++)
    if (strcmp(m->cfg.metric, names[i]) == 0) m->metric = names[i];
  m->median = -1;
  const json_t *lv = json_object_get(config, "levels");
  if (!m->lk->integer_labels && json_is_array(lv) && json_array_size(lv) > 0) {
    m->K = (int)json_array_size(lv);
    m->levels = tl_malloc(sizeof(double) * (size_t)m->K);
    if (!m->levels) m->K = 0;
    for (int k = 0; k < m->K; k++) {
      m->levels[k] = json_number_value(json_array_get(lv, (size_t)k));
      if (m->levels[k] == 0.5) m->median = k;
    }
  }
  if (!m->cfg.log) return;
  if (index_init(m, m->cfg.max_rows)) {
    snprintf(m->reason, sizeof m->reason, "out of memory for an index of %lld rows",
             (long long)m->cfg.max_rows);
    m->cfg.log = 0;
    return;
  }
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/%s/.rowlog", repo_root(L->repo), m->name);
  rl_opts o = {.max_rows = m->cfg.max_rows};
  if (rl_open(&m->store, dir, &o, replay, m, &err)) {
    snprintf(m->reason, sizeof m->reason, "%s", err.msg);
    log_error("model '%s': the row log cannot open: %s", m->name, err.msg);
    m->store = NULL;
    return;
  }
  if (m->count)
    log_info("model '%s': row log: %lld rows, %lld labelled", m->name, (long long)m->count,
             (long long)m->labelled);
}

lmodel *learn_model(learn_t *L, repo_ver *ver) {
  const lkind *lk = kind_of(repo_ver_kind(ver));
  if (!lk) return NULL;
  const char *name = repo_ver_model(ver);
  const json_t *cfg = repo_ver_config(ver);
  pthread_mutex_lock(&L->mu);
  lmodel *m = L->models;
  while (m && strcmp(m->name, name) != 0) m = m->next;
  int fresh = 0;
  if (!m) {
    if (!json_object_get(cfg, "log")) { /* nothing to keep yet */
      pthread_mutex_unlock(&L->mu);
      return NULL;
    }
    m = tl_calloc(1, sizeof *m);
    if (!m || !(m->name = tl_strdup(name))) {
      tl_free(m);
      pthread_mutex_unlock(&L->mu);
      return NULL;
    }
    pthread_mutex_init(&m->mu, NULL);
    m->lk = lk;
    m->last_refit = learn_mono();
    m->next = L->models;
    L->models = m;
    fresh = 1;
  }
  pthread_mutex_unlock(&L->mu);
  /* the config text is compared only when the version or its config object
   * changed since the last look (a request must not pay a JSON dump) */
  int64_t vnum = repo_ver_version(ver);
  pthread_mutex_lock(&m->mu);
  int same = m->cfg_seen == (const void *)cfg && m->cfg_seen_version == vnum && m->cfg_key;
  pthread_mutex_unlock(&m->mu);
  char *key = same ? NULL : cfg_key_of(cfg);
  pthread_mutex_lock(&m->mu);
  if (!same) {
    m->cfg_seen = cfg;
    m->cfg_seen_version = vnum;
  }
  if (key && (!m->cfg_key || strcmp(key, m->cfg_key) != 0)) {
    m->lk = lk;
    lm_open(L, m, cfg);
    tl_free(m->cfg_key);
    m->cfg_key = key;
    key = NULL;
  }
  pthread_mutex_unlock(&m->mu);
  tl_free(key);
  if (fresh) cand_resume(L, m);
  return m;
}

/* ---- after an infer ------------------------------------------------------- */

void learn_after_infer(learn_t *L, repo_ver *ver, const char *id, const ts_list *inputs,
                       const ts_list *outputs) {
  if (!L || !id || !*id || strlen(id) > 200) return;
  lmodel *m = learn_model(L, ver);
  if (!m) return;
  pthread_mutex_lock(&m->mu);
  if (!m->cfg.log || !m->store) goto out;
  if (m->cfg.sample_rate < 1.0 &&
      (double)(fnv1a(id) >> 11) * (1.0 / 9007199254740992.0) >= m->cfg.sample_rate)
    goto out;
  const ts_tensor *o = ts_list_find(outputs, m->lk->output);
  if (!o || o->ndim < 1 || o->dtype != TS_FP32) goto skip1;
  int64_t B = o->shape[0];
  if (B < 1) goto out;
  int64_t nout = 1;
  for (int d = 1; d < o->ndim; d++) nout *= o->shape[d];
  if (!m->lk->integer_labels && nout != m->K) goto skip; /* a request for other levels */
  char **ids = tl_calloc((size_t)B, sizeof(char *));
  if (!ids) goto skip;
  double now = learn_wall();
  int64_t version = repo_ver_version(ver);
  int64_t logged = 0;
  for (int64_t b = 0; b < B; b++) {
    char rid[256];
    if (B == 1)
      snprintf(rid, sizeof rid, "%s", id);
    else
      snprintf(rid, sizeof rid, "%s:%lld", id, (long long)b);
    wbuf w = {0};
    encode_head(&w, 1, now, rid);
    WPUT(&w, version);
    uint32_t n32 = (uint32_t)nout;
    WPUT(&w, n32);
    wput(&w, (const float *)o->data + b * nout, sizeof(float) * (size_t)nout);
    size_t tens_at = w.len;
    if (encode_tensors(&w, inputs, B, b) || w.failed) {
      tl_free(w.p);
      break;
    }
    lrow *row = tl_calloc(1, sizeof *row);
    if (row) {
      row->t = now;
      row->version = version;
      row->id = tl_strdup(rid);
      row->nout = (int)nout;
      row->out = tl_malloc(sizeof(float) * (size_t)nout);
      row->tens_len = w.len - tens_at;
      row->tens = tl_malloc(row->tens_len ? row->tens_len : 1);
    }
    if (!row || !row->id || !row->out || !row->tens) {
      row_free(row);
      tl_free(w.p);
      break;
    }
    memcpy(row->out, (const float *)o->data + b * nout, sizeof(float) * (size_t)nout);
    memcpy(row->tens, w.p + tens_at, row->tens_len);
    ts_err err = {0};
    if (rl_append(m->store, w.p, w.len, 1, &err)) {
      tl_free(w.p);
      row_free(row);
      break;
    }
    tl_free(w.p);
    /* a copy: a batch larger than the index evicts its own first rows */
    ids[b] = m->cand ? tl_strdup(rid) : NULL;
    index_add(m, row);
    logged++;
  }
  m->rows_logged += (uint64_t)logged;
  m->rows_skipped += (uint64_t)(B - logged);
  int all_ids = 1;
  for (int64_t b = 0; b < B && m->cand; b++) all_ids &= ids[b] != NULL;
  if (logged == B && m->cand && all_ids) cand_shadow(L, m, inputs, ids, B);
  for (int64_t b = 0; b < B; b++) tl_free(ids[b]);
  tl_free(ids);
  goto out;
skip1:
  m->rows_skipped++;
  goto out;
skip:
  m->rows_skipped += (uint64_t)(o->shape[0] > 0 ? o->shape[0] : 1);
out:
  pthread_mutex_unlock(&m->mu);
  cand_policy(L, m); /* every_seconds is due with traffic, not only with feedback */
}

/* ---- feedback ------------------------------------------------------------- */

/* The ids of a BYTES tensor [N] (Triton layout), as NUL-terminated copies. */
static int read_ids(const ts_tensor *t, char ***out, int64_t *n, ts_err *err) {
  if (t->dtype != TS_BYTES || t->ndim != 1)
    return ts_errf(err, TS_EINVAL, "input 'id': expected BYTES of shape [N], got %s of rank %d",
                   ts_dtype_name(t->dtype), t->ndim);
  int64_t N = t->shape[0];
  /* every element takes at least its 4-byte length: a shape the bytes
   * cannot hold is refused before anything is allocated for it */
  if (N < 0 || (uint64_t)N > t->nbytes / 4)
    return ts_errf(err, TS_EINVAL, "input 'id': its bytes end before its %lld elements do",
                   (long long)N);
  char **ids = tl_calloc((size_t)(N ? N : 1), sizeof(char *));
  if (!ids) return ts_errf(err, TS_ENOMEM, "out of memory for %lld ids", (long long)N);
  const unsigned char *p = t->data;
  size_t off = 0;
  for (int64_t i = 0; i < N; i++) {
    uint32_t len;
    if (t->nbytes - off < 4) goto bad;
    memcpy(&len, p + off, 4);
    off += 4;
    if (t->nbytes - off < len) goto bad;
    if (len == 0 || len > 200) {
      for (int64_t k = 0; k < i; k++) tl_free(ids[k]);
      tl_free(ids);
      return ts_errf(err, TS_EINVAL, "input 'id': element %lld has %u bytes (1 to 200)",
                     (long long)i, len);
    }
    if (!(ids[i] = tl_malloc(len + 1))) {
      for (int64_t k = 0; k < i; k++) tl_free(ids[k]);
      tl_free(ids);
      return ts_errf(err, TS_ENOMEM, "out of memory");
    }
    memcpy(ids[i], p + off, len);
    ids[i][len] = 0;
    off += len;
  }
  *out = ids;
  *n = N;
  return 0;
bad:
  for (int64_t k = 0; k < N; k++) tl_free(ids[k]);
  tl_free(ids);
  return ts_errf(err, TS_EINVAL, "input 'id': its bytes end before its %lld elements do",
                 (long long)N);
}

/* ---- live scores (the kind's observe) ------------------------------------- */

#define OBS_GROUPS 8
/* Rows answered by one version, with one input shape: the kind's observe
 * takes them as one call. */
typedef struct obs_group {
  int64_t version, n;
  ts_list inputs, served;
  int rc;
  ts_err err;
} obs_group;

/* Groups the accepted rows (m->mu held) and copies them out as tensors:
 * rows of a ninth version or shape in one batch wait for the next feedback
 * (they are labelled; only the live scores miss them). */
static int obs_collect(lmodel *m, lrow **acc, int64_t n, obs_group *g) {
  int ng = 0;
  lrow **rows = tl_calloc((size_t)(n ? n : 1), sizeof *rows);
  unsigned char *done = tl_calloc((size_t)(n ? n : 1), 1);
  for (int64_t i = 0; rows && done && i < n && ng < OBS_GROUPS; i++) {
    if (done[i]) continue;
    int64_t k = 0;
    for (int64_t j = i; j < n; j++)
      if (!done[j] && acc[j]->version == acc[i]->version && learn_same_inputs(acc[i], acc[j])) {
        rows[k++] = acc[j];
        done[j] = 1;
      }
    obs_group *o = &g[ng++];
    memset(o, 0, sizeof *o);
    o->version = acc[i]->version;
    o->n = k;
    ts_list_init(&o->inputs);
    ts_list_init(&o->served);
    o->rc = learn_rows_tensors(m, rows, k, &o->inputs, &o->served, &o->err);
  }
  tl_free(rows);
  tl_free(done);
  return ng;
}

/* Runs observe on each group's version (when it is still served) and
 * answers what each said; frees the groups. */
static json_t *obs_run(learn_t *L, const char *model, obs_group *g, int ng) {
  json_t *out = json_array();
  for (int i = 0; i < ng; i++) {
    obs_group *o = &g[i];
    repo_ver *v = NULL;
    json_t *res = NULL;
    if (!o->rc) o->rc = repo_acquire(L->repo, model, o->version, &v, &o->err);
    if (!o->rc) {
      md_call c;
      md_call_init(&c);
      c.inputs = &o->inputs;
      c.pool = L->pool;
      c.host = repo_host(L->repo);
      c.model_name = model;
      c.version = o->version;
      o->rc = repo_ver_kind(v)->observe(repo_ver_state(v), &c, &o->served, &o->err);
      if (!o->rc && c.result) res = json_incref(c.result);
      md_call_free(&c);
      repo_release(v);
    }
    char vs[32];
    snprintf(vs, sizeof vs, "%lld", (long long)o->version);
    json_array_append_new(
        out, o->rc ? json_pack("{s:s, s:I, s:s}", "version", vs, "rows", (json_int_t)o->n, "error",
                               o->err.msg)
                   : json_pack("{s:s, s:I, s:o}", "version", vs, "rows", (json_int_t)o->n, "result",
                               res ? res : json_null()));
    ts_list_free(&o->inputs);
    ts_list_free(&o->served);
  }
  return out ? out : json_null();
}

int learn_feedback(learn_t *L, repo_ver *ver, const ts_list *inputs, json_t **result, ts_err *err) {
  const char *name = repo_ver_model(ver);
  const lkind *lk = kind_of(repo_ver_kind(ver));
  if (!lk)
    return ts_errf(err, TS_EINVAL,
                   "model '%s' (kind %s) does not take feedback: the loop learns the ensemble and "
                   "quantile_ensemble kinds",
                   name, repo_ver_kind(ver)->name);
  lmodel *m = learn_model(L, ver);
  if (!m || !m->cfg.log)
    return ts_errf(err, TS_EINVAL,
                   "model '%s' does not log its served rows, so feedback has nothing to join: add "
                   "\"log\": {\"sample_rate\": 1.0, \"max_rows\": 100000} to its config.json",
                   name);
  if (!m->store) /* configured, but the log did not open (its reason) */
    return ts_errf(err, TS_EUNAVAIL, "model '%s': the row log is not open: %s", name, m->reason);
  for (int i = 0; i < inputs->n; i++) {
    const char *in = inputs->items[i].name;
    if (strcmp(in, "id") != 0 && strcmp(in, lk->label_input) != 0)
      return ts_errf(err, TS_EINVAL,
                     "unexpected input '%.100s' for feedback on model '%s' (its inputs: id, %s)",
                     in, name, lk->label_input);
  }
  const ts_tensor *idt = ts_list_find(inputs, "id"), *yt = ts_list_find(inputs, lk->label_input);
  if (!idt || !yt)
    return ts_errf(err, TS_EINVAL,
                   "feedback needs input 'id' (BYTES [N], the request ids) and input '%s' [N]",
                   lk->label_input);
  char **ids = NULL;
  int64_t N = 0;
  int rc = read_ids(idt, &ids, &N, err);
  if (rc) return rc;
  double *y = NULL;
  if (yt->ndim != 1 || yt->shape[0] != N) {
    char got[64];
    rc = ts_errf(err, TS_EINVAL, "input '%s': expected shape [%lld] (one per id), got %s",
                 lk->label_input, (long long)N, ts_shape_str(yt->shape, yt->ndim, got, sizeof got));
    goto out;
  }
  if (yt->dtype == TS_BYTES || yt->dtype == TS_BOOL) {
    rc = ts_errf(err, TS_EINVAL, "input '%s': datatype %s; expected a number per id",
                 lk->label_input, ts_dtype_name(yt->dtype));
    goto out;
  }
  if ((rc = ts_to_f64(yt, 1, &y, err))) goto out; /* a non-finite one is reported per id */
  json_t *unknown = json_array(), *bad = json_array();
  int64_t accepted = 0, n_unknown = 0, n_bad = 0;
  double now = learn_wall();
  /* the kind's live scores (observe) take the accepted rows, by the version
   * that answered them */
  int observing = repo_ver_kind(ver)->observe != NULL;
  lrow **acc = observing ? tl_calloc((size_t)(N ? N : 1), sizeof *acc) : NULL;
  obs_group groups[OBS_GROUPS];
  int ngroups = 0;
  pthread_mutex_lock(&m->mu);
  for (int64_t i = 0; i < N; i++) {
    lrow *r = m->store ? lm_find(m, ids[i]) : NULL;
    if (!r) {
      n_unknown++;
      if (json_array_size(unknown) < 20) json_array_append_new(unknown, json_string(ids[i]));
      continue;
    }
    double v = y[i];
    int ok = lk->integer_labels ? (v == floor(v) && v >= 0 && v < (r->nout == 1 ? 2 : r->nout))
                                : isfinite(v);
    if (!ok) {
      n_bad++;
      if (json_array_size(bad) < 20)
        json_array_append_new(bad, json_pack("{s:s, s:o}", "id", ids[i], "value",
                                             isfinite(v) ? json_real(v) : json_null()));
      continue;
    }
    wbuf w = {0};
    encode_head(&w, 2, now, ids[i]);
    WPUT(&w, v);
    if (w.failed || rl_append(m->store, w.p, w.len, 0, NULL)) {
      tl_free(w.p);
      n_bad++;
      continue;
    }
    tl_free(w.p);
    if (!r->labelled) m->labelled++;
    r->labelled = 1;
    r->label = v;
    m->labels_since_refit++;
    if (acc) acc[accepted] = r;
    accepted++;
    cand_score_row(m, r);
  }
  m->feedback_accepted += (uint64_t)accepted;
  m->feedback_unknown += (uint64_t)n_unknown;
  int64_t labelled = m->labelled;
  if (acc) ngroups = obs_collect(m, acc, accepted, groups);
  pthread_mutex_unlock(&m->mu);
  tl_free(acc);
  json_t *observed = observing ? obs_run(L, repo_ver_model(ver), groups, ngroups) : json_null();
  json_t *decision = cand_decide(L, m);
  cand_policy(L, m);
  *result = json_pack("{s:I, s:{s:I, s:o}, s:{s:I, s:o}, s:I, s:o, s:o}", "accepted",
                      (json_int_t)accepted, "unknown", "count", (json_int_t)n_unknown, "ids",
                      unknown, "invalid", "count", (json_int_t)n_bad, "labels", bad,
                      "labelled_rows", (json_int_t)labelled, "decision",
                      decision ? decision : json_null(), "observed", observed);
  if (!*result) rc = ts_errf(err, TS_ENOMEM, "out of memory");
out:
  for (int64_t k = 0; k < N; k++) tl_free(ids[k]);
  tl_free(ids);
  tl_free(y);
  return rc;
}

/* ---- state, metrics, life ------------------------------------------------- */

int learn_candidates(learn_t *L, repo_ver *ver, json_t **result, ts_err *err) {
  const char *name = repo_ver_model(ver);
  lmodel *m = learn_model(L, ver);
  if (!m)
    return ts_errf(err, TS_EINVAL,
                   "model '%s' has no learning loop: its kind is not ensemble or "
                   "quantile_ensemble, or its config.json has no \"log\"",
                   name);
  json_t *d = cand_decide(L, m); /* an old candidate is dropped when asked about */
  if (d) json_decref(d);
  pthread_mutex_lock(&m->mu);
  rl_stats st = {0};
  if (m->store) rl_get_stats(m->store, &st);
  json_t *log = json_pack("{s:b, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:s}", "on",
                          m->cfg.log && m->store != NULL, "sample_rate", m->cfg.sample_rate,
                          "max_rows", (json_int_t)m->cfg.max_rows, "rows_indexed",
                          (json_int_t)m->count, "rows_on_disk", (json_int_t)st.rows, "segments",
                          (json_int_t)st.segments, "rows_logged", (json_int_t)m->rows_logged,
                          "rows_skipped", (json_int_t)m->rows_skipped, "reason", m->reason);
  json_t *cand = cand_state_json(m);
  json_t *decs = json_array();
  for (int i = 0; i < m->n_decisions; i++) {
    const ldecision *x = &m->decisions[i];
    char v[32];
    snprintf(v, sizeof v, "%lld", (long long)x->version);
    json_array_append_new(
        decs, json_pack("{s:s, s:s, s:s, s:I, s:o, s:o, s:f}", "version", v, "decision",
                        x->decision, "why", x->why, "rows", (json_int_t)x->rows, "served_score",
                        isfinite(x->served) ? json_real(x->served) : json_null(), "candidate_score",
                        isfinite(x->cand) ? json_real(x->cand) : json_null(), "time", x->t));
  }
  json_t *refit =
      m->cfg.refit
          ? json_pack("{s:I, s:f, s:I, s:I, s:f, s:I, s:f, s:I}", "every_rows",
                      (json_int_t)m->cfg.every_rows, "every_seconds", m->cfg.every_seconds,
                      "window_rows", (json_int_t)m->cfg.window_rows, "min_rows",
                      (json_int_t)m->cfg.min_rows, "margin", m->cfg.margin, "compare_rows",
                      (json_int_t)m->cfg.compare_rows, "max_age_seconds", m->cfg.max_age_seconds,
                      "labels_since_refit", (json_int_t)m->labels_since_refit)
          : json_null();
  *result = json_pack("{s:s, s:s, s:o, s:I, s:o, s:o, s:o, s:I, s:I}", "model_name", name, "metric",
                      m->metric, "log", log, "labelled_rows", (json_int_t)m->labelled, "refit",
                      refit, "candidate", cand, "decisions", decs, "promoted",
                      (json_int_t)m->promoted, "dropped", (json_int_t)m->dropped);
  pthread_mutex_unlock(&m->mu);
  if (!*result) return ts_errf(err, TS_ENOMEM, "out of memory");
  return 0;
}

static void metric_head(sbuf *b, const char *name, const char *type, const char *help) {
  sbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void learn_metrics(learn_t *L, sbuf *b) {
  if (!L) return;
  pthread_mutex_lock(&L->mu);
  lmodel *first = L->models;
  pthread_mutex_unlock(&L->mu);
  if (!first) return;
  /* models are only ever added at the head: the list from `first` is stable */
  static const struct {
    const char *name, *type, *help;
  } fam[] = {
      {"tallyd_learn_rows_logged_total", "counter", "served rows written to the row log"},
      {"tallyd_learn_rows_skipped_total", "counter",
       "served rows not logged (other levels asked, BYTES inputs, a full write queue)"},
      {"tallyd_learn_rows_labelled", "gauge", "rows in the index that feedback labelled"},
      {"tallyd_learn_feedback_total", "counter", "feedback ids, by result (accepted, unknown)"},
      {"tallyd_learn_refits_total", "counter", "refits, by outcome (candidate, failed)"},
      {"tallyd_learn_decisions_total", "counter", "candidate decisions (promoted, dropped)"},
      {"tallyd_learn_candidate_version", "gauge", "the candidate under comparison; 0: none"},
      {"tallyd_learn_candidate_compared_rows", "gauge",
       "fresh labelled rows scored for both the candidate and the served version"},
      {"tallyd_learn_candidate_score", "gauge",
       "mean score on the compared rows (log loss or WIS), by answer (served, candidate)"},
      {"tallyd_learn_shadow_rows_total", "counter",
       "rows the candidate answered in the background, by outcome (answered, skipped, failed)"},
  };
  for (size_t f = 0; f < sizeof fam / sizeof *fam; f++) {
    metric_head(b, fam[f].name, fam[f].type, fam[f].help);
    for (lmodel *m = first; m; m = m->next) {
      pthread_mutex_lock(&m->mu);
      const char *n = m->name;
      switch (f) {
        case 0:
          sbuf_printf(b, "%s{model=\"%s\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->rows_logged);
          break;
        case 1:
          sbuf_printf(b, "%s{model=\"%s\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->rows_skipped);
          break;
        case 2:
          sbuf_printf(b, "%s{model=\"%s\"} %lld\n", fam[f].name, n, (long long)m->labelled);
          break;
        case 3:
          sbuf_printf(b, "%s{model=\"%s\",result=\"accepted\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->feedback_accepted);
          sbuf_printf(b, "%s{model=\"%s\",result=\"unknown\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->feedback_unknown);
          break;
        case 4:
          sbuf_printf(b, "%s{model=\"%s\",outcome=\"candidate\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->refits);
          sbuf_printf(b, "%s{model=\"%s\",outcome=\"failed\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->refit_failures);
          break;
        case 5:
          sbuf_printf(b, "%s{model=\"%s\",decision=\"promoted\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->promoted);
          sbuf_printf(b, "%s{model=\"%s\",decision=\"dropped\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->dropped);
          break;
        case 6:
          sbuf_printf(b, "%s{model=\"%s\"} %lld\n", fam[f].name, n,
                      (long long)(m->cand ? m->cand_version : 0));
          break;
        case 7:
          sbuf_printf(b, "%s{model=\"%s\"} %lld\n", fam[f].name, n, (long long)m->n_cmp);
          break;
        case 8:
          if (m->n_cmp > 0) {
            sbuf_printf(b, "%s{model=\"%s\",answer=\"served\"} %.17g\n", fam[f].name, n,
                        m->sum_served / (double)m->n_cmp);
            sbuf_printf(b, "%s{model=\"%s\",answer=\"candidate\"} %.17g\n", fam[f].name, n,
                        m->sum_cand / (double)m->n_cmp);
          }
          break;
        case 9:
          sbuf_printf(b, "%s{model=\"%s\",outcome=\"answered\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->shadow_rows);
          sbuf_printf(b, "%s{model=\"%s\",outcome=\"skipped\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->shadow_skipped);
          sbuf_printf(b, "%s{model=\"%s\",outcome=\"failed\"} %llu\n", fam[f].name, n,
                      (unsigned long long)m->shadow_failed);
          break;
      }
      pthread_mutex_unlock(&m->mu);
    }
  }
}

int learn_create(learn_t **out, repo_t *repo, pool_t *pool, ts_err *err) {
  learn_t *L = tl_calloc(1, sizeof *L);
  if (!L) return ts_errf(err, TS_ENOMEM, "out of memory");
  L->repo = repo;
  L->pool = pool;
  pthread_mutex_init(&L->mu, NULL);
  atomic_init(&L->jobs, 0);
  *out = L;
  return 0;
}

void learn_flush(learn_t *L) {
  if (!L) return;
  pthread_mutex_lock(&L->mu);
  lmodel *first = L->models;
  pthread_mutex_unlock(&L->mu);
  for (lmodel *m = first; m; m = m->next) {
    pthread_mutex_lock(&m->mu);
    rl_store *s = m->store;
    pthread_mutex_unlock(&m->mu);
    rl_flush(s); /* the store lives until learn_free */
  }
}

void learn_free(learn_t *L) {
  if (!L) return;
  for (lmodel *m = L->models; m;) {
    lmodel *n = m->next;
    cand_release(m);
    lm_close(m);
    tl_free(m->cfg_key);
    tl_free(m->name);
    pthread_mutex_destroy(&m->mu);
    tl_free(m);
    m = n;
  }
  pthread_mutex_destroy(&L->mu);
  tl_free(L);
}
