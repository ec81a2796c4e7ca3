/* model.c - helpers shared by every model kind (see model.h). */
#include "model.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "../base/mem.h"

void md_call_init(md_call *c) {
  memset(c, 0, sizeof *c);
  ts_list_init(&c->outputs);
}

void st_writer_free(st_writer *w);

void md_call_free(md_call *c) {
  ts_list_free(&c->outputs);
  if (c->result) json_decref(c->result);
  if (c->new_version_info) json_decref(c->new_version_info);
  if (c->new_weights) st_writer_free(c->new_weights);
  c->result = c->new_version_info = NULL;
  c->new_weights = NULL;
}

void md_sig_add(md_sig *sig, int which, const char *name, ts_dtype dtype, int ndim, int64_t d0,
                int64_t d1, int64_t d2) {
  int *n = which == MD_OUT ? &sig->n_outputs : &sig->n_inputs;
  if (*n >= MD_MAX_IO) return;
  md_io *io = which == MD_OUT ? &sig->outputs[*n] : &sig->inputs[*n];
  (*n)++;
  memset(io, 0, sizeof *io);
  snprintf(io->name, sizeof io->name, "%s", name);
  io->dtype = dtype;
  io->ndim = ndim;
  int64_t d[3] = {d0, d1, d2};
  for (int i = 0; i < ndim && i < 3; i++) io->shape[i] = d[i];
}

int md_run_hosted(const md_call *c, const char *role, const char *name, const ts_tensor *in,
                  md_call *sub, md_hosted *held, ts_err *err) {
  md_call_init(sub);
  memset(held, 0, sizeof *held);
  if (!c->host) return ts_errf(err, TS_EINTERNAL, "%s '%s': no model host to run it", role, name);
  if (c->depth >= MD_MAX_HOSTED_DEPTH)
    return ts_errf(err, TS_EINVAL,
                   "%s '%s': hosted models nest more than %d deep (a cycle in the "
                   "configuration?)",
                   role, name, MD_MAX_HOSTED_DEPTH);
  int rc = c->host->acquire(c->host, name, &held->handle, &held->kind, &held->state, err);
  if (rc) {
    /* missing or not ready: the caller is unavailable, not unknown */
    char msg[TS_ERR_MSG];
    snprintf(msg, sizeof msg, "%s", err->msg);
    ts_errf(err, TS_EUNAVAIL, "%s '%s' is unavailable: %s", role, name, msg);
    memset(held, 0, sizeof *held);
    return -TS_EUNAVAIL;
  }
  held->host = c->host;
  /* the input is borrowed: a list of one wrapped tensor on the stack would
   * not outlive this call, so the sub-call holds a copy of the header */
  ts_list *inputs = tl_calloc(1, sizeof *inputs);
  ts_tensor *t = inputs ? ts_list_add(inputs) : NULL;
  if (!t) {
    tl_free(inputs);
    md_hosted_done(sub, held);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  if ((rc = ts_wrap(t, in->name ? in->name : "features", in->dtype, in->ndim, in->shape, in->data,
                    in->nbytes, err))) {
    ts_list_free(inputs);
    tl_free(inputs);
    md_hosted_done(sub, held);
    return rc;
  }
  sub->inputs = inputs;
  sub->pool = c->pool;
  sub->host = c->host;
  sub->deadline = c->deadline;
  sub->cancelled = c->cancelled;
  sub->model_name = name;
  sub->depth = c->depth + 1;
  sub->spans = c->spans;
  double t0 = c->spans ? md_now() : 0;
  rc = held->kind->infer(held->state, sub, err);
  if (c->spans) c->spans->hosted(c->spans, role, name, sub->depth, t0, md_now(), rc);
  if (rc) {
    /* nested errors already name their own model */
    if (!(strncmp(err->msg, role, strlen(role)) == 0 && err->msg[strlen(role)] == ' '))
      ts_err_prefix(err, "%s '%s'", role, name);
    md_hosted_done(sub, held);
    return rc;
  }
  return 0;
}

void md_hosted_done(md_call *sub, md_hosted *held) {
  if (sub->inputs) {
    ts_list *in = (ts_list *)sub->inputs;
    ts_list_free(in);
    tl_free(in);
    sub->inputs = NULL;
  }
  md_call_free(sub);
  if (held->host && held->handle) held->host->release(held->host, held->handle);
  memset(held, 0, sizeof *held);
}

double md_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int md_check_deadline(const md_call *c, ts_err *err) {
  if (c->cancelled && *c->cancelled)
    return ts_errf(err, TS_ETIMEOUT, "the request was abandoned (deadline passed)");
  if (c->deadline > 0 && md_now() > c->deadline)
    return ts_errf(err, TS_ETIMEOUT, "the request's deadline passed before its result was ready");
  return 0;
}

int md_claim(const md_call *c, ts_err *err) {
  if (!c->claim) return 0;
  int running = 0;
  if (atomic_compare_exchange_strong(c->claim, &running, 1) || running == 1) return 0;
  return ts_errf(err, TS_ETIMEOUT,
                 "the request was abandoned (deadline passed or client gone) "
                 "before its result was committed; nothing changed");
}

const char *md_op_name(int op) {
  static const char *const names[MD_OP_COUNT] = {
      "infer", "fit", "evaluate", "calibrate", "session create", "session infer"};
  return op >= 0 && op < MD_OP_COUNT ? names[op] : "?";
}

int md_kind_takes_param(const md_kind *k, int op, const char *key) {
  if (op < 0 || op >= MD_OP_COUNT) return 0;
  for (const char *const *a = k->params[op]; a && *a; a++)
    if (strcmp(*a, key) == 0) return 1;
  return 0;
}

int md_check_finite_outputs(const md_call *c, ts_err *err) {
  for (int i = 0; i < c->outputs.n; i++) {
    const ts_tensor *t = &c->outputs.items[i];
    if (t->dtype != TS_FP32 && t->dtype != TS_FP64 && t->dtype != TS_FP16 && t->dtype != TS_BF16)
      continue;
    int64_t n = (int64_t)(t->nbytes / ts_dtype_size(t->dtype));
    for (int64_t k = 0; k < n; k++) {
      double v = ts_get_f64(t, k);
      if (isfinite(v) || (c->infinite_ok && isinf(v))) continue;
      return ts_errf(err, TS_EINVAL,
                     "output '%s' element %lld is %s: the computation overflowed %s (inputs "
                     "or weights too large in magnitude for this model)",
                     t->name, (long long)k,
                     isnan(v) ? "NaN"
                     : v > 0  ? "+inf"
                              : "-inf",
                     ts_dtype_name(t->dtype));
    }
  }
  return 0;
}

int md_config_check_keys(const json_t *config, const char *const *allowed, ts_err *err) {
  static const char *const common[] = {"kind",       "version_policy",   "description", "max_batch",
                                       "scheduling", "dynamic_batching", NULL};
  if (!json_is_object(config)) return ts_errf(err, TS_EINVAL, "config.json is not a JSON object");
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)config, key, v) {
    int ok = 0;
    for (const char *const *a = common; *a && !ok; a++) ok = strcmp(*a, key) == 0;
    for (const char *const *a = allowed; a && *a && !ok; a++) ok = strcmp(*a, key) == 0;
    if (!ok) return ts_errf(err, TS_EINVAL, "config.json: unknown key '%s'", key);
  }
  return md_config_check_common(config, err);
}

int md_config_check_common(const json_t *config, ts_err *err) {
  /* max_batch: the largest leading dimension of an input (0: none) */
  json_t *mb = json_object_get(config, "max_batch");
  if (mb &&
      (!json_is_integer(mb) || json_integer_value(mb) < 0 || json_integer_value(mb) > MD_MAX_BATCH))
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'max_batch' must be an integer in [0, %lld] (0: no limit)",
                   (long long)MD_MAX_BATCH);
  md_sched sc;
  return md_config_sched(config, &sc, err);
}

/* An integer member of obj in [lo, hi], or def when absent. */
static int sched_int(const json_t *obj, const char *sect, const char *key, int64_t lo, int64_t hi,
                     int64_t def, int64_t *out, ts_err *err) {
  json_t *v = json_object_get(obj, key);
  if (!v) {
    *out = def;
    return 0;
  }
  if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
    return ts_errf(err, TS_EINVAL, "config.json: '%s.%s' must be an integer in [%lld, %lld]", sect,
                   key, (long long)lo, (long long)hi);
  *out = json_integer_value(v);
  return 0;
}

static int check_keys(const json_t *obj, const char *sect, const char *const *allowed,
                      ts_err *err) {
  if (!json_is_object(obj))
    return ts_errf(err, TS_EINVAL, "config.json: '%s' must be an object", sect);
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    int ok = 0;
    for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(*a, key) == 0;
    if (!ok) return ts_errf(err, TS_EINVAL, "config.json: unknown key '%s.%.60s'", sect, key);
  }
  return 0;
}

int md_config_sched(const json_t *config, md_sched *out, ts_err *err) {
  memset(out, 0, sizeof *out);
  out->priority_levels = 3;
  out->default_priority_level = 2;
  const json_t *s = json_object_get(config, "scheduling");
  int64_t v;
  if (s) {
    static const char *const keys[] = {"max_concurrency",        "max_queue_size",
                                       "default_timeout_ms",     "priority_levels",
                                       "default_priority_level", NULL};
    int rc;
    if ((rc = check_keys(s, "scheduling", keys, err))) return rc;
    if ((rc = sched_int(s, "scheduling", "max_concurrency", 0, 1 << 20, 0, &v, err))) return rc;
    out->max_concurrency = (int)v;
    if ((rc = sched_int(s, "scheduling", "max_queue_size", 0, 1 << 20, 0, &v, err))) return rc;
    out->max_queue_size = (int)v;
    if ((rc = sched_int(s, "scheduling", "default_timeout_ms", 0, 86400000, 0, &v, err))) return rc;
    out->default_timeout_ms = v;
    if ((rc = sched_int(s, "scheduling", "priority_levels", 1, MD_PRIORITY_LEVELS_MAX, 3, &v, err)))
      return rc;
    out->priority_levels = (int)v;
    int64_t def = out->priority_levels < 2 ? out->priority_levels : 2;
    if ((rc = sched_int(s, "scheduling", "default_priority_level", 1, out->priority_levels, def, &v,
                        err)))
      return rc;
    out->default_priority_level = (int)v;
  }
  const json_t *b = json_object_get(config, "dynamic_batching");
  if (!b) return 0;
  /* Triton's own spellings are taken too (a Triton config override) */
  static const char *const bkeys[] = {"max_queue_delay_us",    "max_queue_delay_microseconds",
                                      "preferred_batch_sizes", "preferred_batch_size",
                                      "max_batch_size",        NULL};
  int rc;
  if ((rc = check_keys(b, "dynamic_batching", bkeys, err))) return rc;
  const char *kind = json_string_value(json_object_get(config, "kind"));
  if (!kind ||
      (strcmp(kind, "mlp") && strcmp(kind, "ensemble") && strcmp(kind, "quantile_ensemble")))
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'dynamic_batching' is for the kinds mlp, ensemble and "
                   "quantile_ensemble, not '%.40s'",
                   kind ? kind : "(none)");
  out->batching = 1;
  const char *delay_key = json_object_get(b, "max_queue_delay_microseconds")
                              ? "max_queue_delay_microseconds"
                              : "max_queue_delay_us";
  const char *pref_key =
      json_object_get(b, "preferred_batch_size") ? "preferred_batch_size" : "preferred_batch_sizes";
  if ((json_object_get(b, "max_queue_delay_microseconds") &&
       json_object_get(b, "max_queue_delay_us")) ||
      (json_object_get(b, "preferred_batch_size") && json_object_get(b, "preferred_batch_sizes")))
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'dynamic_batching' names a setting twice (tallyd's and Triton's "
                   "spelling): give one");
  if ((rc = sched_int(b, "dynamic_batching", delay_key, 0, 10000000, 0, &v, err))) return rc;
  out->max_queue_delay_us = v;
  json_t *mbj = json_object_get(config, "max_batch");
  int64_t mb = mbj && json_is_integer(mbj) ? json_integer_value(mbj) : 0;
  int64_t hi = mb > 0 ? mb : 65536;
  if ((rc = sched_int(b, "dynamic_batching", "max_batch_size", 1, hi, mb > 0 && mb < 64 ? mb : 64,
                      &v, err)))
    return rc;
  out->max_batch_size = v;
  json_t *pref = json_object_get(b, pref_key);
  if (pref) {
    if (!json_is_array(pref) || json_array_size(pref) > MD_PREFERRED_MAX)
      return ts_errf(err, TS_EINVAL,
                     "config.json: 'dynamic_batching.%s' must be an array of at most %d sizes",
                     pref_key, MD_PREFERRED_MAX);
    size_t i;
    json_t *e;
    json_array_foreach(pref, i, e) {
      if (!json_is_integer(e) || json_integer_value(e) < 1 ||
          json_integer_value(e) > out->max_batch_size ||
          (i > 0 && json_integer_value(e) <= out->preferred[i - 1]))
        return ts_errf(err, TS_EINVAL,
                       "config.json: 'dynamic_batching.%s' must be ascending integers in [1, "
                       "max_batch_size %lld]",
                       pref_key, (long long)out->max_batch_size);
      out->preferred[out->n_preferred++] = json_integer_value(e);
    }
  }
  return 0;
}

int md_param_double(const json_t *params, const char *key, double def, double *out, ts_err *err) {
  json_t *v = params ? json_object_get(params, key) : NULL;
  if (!v || json_is_null(v)) {
    *out = def;
    return 0;
  }
  if (!json_is_number(v)) return ts_errf(err, TS_EINVAL, "parameter '%s' must be a number", key);
  *out = json_number_value(v);
  if (!isfinite(*out)) return ts_errf(err, TS_EINVAL, "parameter '%s' must be finite", key);
  return 0;
}

int md_param_int(const json_t *params, const char *key, int64_t def, int64_t *out, ts_err *err) {
  json_t *v = params ? json_object_get(params, key) : NULL;
  if (!v || json_is_null(v)) {
    *out = def;
    return 0;
  }
  if (json_is_integer(v)) {
    *out = (int64_t)json_integer_value(v);
    return 0;
  }
  if (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v) &&
      fabs(json_real_value(v)) < 9e15) {
    *out = (int64_t)json_real_value(v);
    return 0;
  }
  return ts_errf(err, TS_EINVAL, "parameter '%s' must be an integer", key);
}

int md_param_string(const json_t *params, const char *key, const char *def, const char **out,
                    ts_err *err) {
  json_t *v = params ? json_object_get(params, key) : NULL;
  if (!v || json_is_null(v)) {
    *out = def;
    return 0;
  }
  if (!json_is_string(v)) return ts_errf(err, TS_EINVAL, "parameter '%s' must be a string", key);
  *out = json_string_value(v);
  return 0;
}

int md_param_bool(const json_t *params, const char *key, int def, int *out, ts_err *err) {
  json_t *v = params ? json_object_get(params, key) : NULL;
  if (!v || json_is_null(v)) {
    *out = def;
    return 0;
  }
  if (!json_is_boolean(v))
    return ts_errf(err, TS_EINVAL, "parameter '%s' must be true or false", key);
  *out = json_is_true(v);
  return 0;
}

int md_input(const md_call *c, const char *name, const ts_tensor **out, ts_err *err) {
  const ts_tensor *t = c->inputs ? ts_list_find(c->inputs, name) : NULL;
  if (!t) return ts_errf(err, TS_EINVAL, "missing input '%s'", name);
  *out = t;
  return 0;
}

int md_check_shape(const ts_tensor *t, int ndim, const int64_t *dims, ts_err *err) {
  int ok = t->ndim == ndim;
  for (int i = 0; ok && i < ndim; i++) ok = dims[i] < 0 || dims[i] == t->shape[i];
  if (ok) return 0;
  char want[128], got[128];
  size_t o = 0;
  o += (size_t)snprintf(want, sizeof want, "[");
  for (int i = 0; i < ndim && o < sizeof want; i++)
    o += dims[i] < 0 ? (size_t)snprintf(want + o, sizeof want - o, "%s-1", i ? ", " : "")
                     : (size_t)snprintf(want + o, sizeof want - o, "%s%lld", i ? ", " : "",
                                        (long long)dims[i]);
  if (o < sizeof want) snprintf(want + o, sizeof want - o, "]");
  return ts_errf(err, TS_EINVAL, "input '%s': expected shape %s, got %s", t->name, want,
                 ts_shape_str(t->shape, t->ndim, got, sizeof got));
}

void *md_output(md_call *c, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
                ts_err *err) {
  ts_tensor *t = ts_list_add(&c->outputs);
  if (!t) {
    ts_errf(err, TS_ENOMEM, "out of memory for output '%s'", name);
    return NULL;
  }
  if (ts_alloc(t, name, dtype, ndim, shape, err)) {
    c->outputs.n--;
    return NULL;
  }
  return t->data;
}
