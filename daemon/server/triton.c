/* triton.c - the calls NVIDIA Triton's clients make beyond the OIP core:
 * the model configuration, the statistics extension, the repository's load
 * (with a config override) and unload, and a clear refusal of the rest.
 *
 * Configs cross in Triton's shape (docs/api.md, "Triton's calls"): a
 * config.json becomes {"name", "platform", "backend", "max_batch_size",
 * "version_policy", "input", "output", "parameters", "dynamic_batching"},
 * every key of config.json that Triton has no field for travelling in
 * "parameters" as {"string_value": <text>}. A load's override in that shape
 * is turned back into a config.json by the inverse rules, so what
 * GET .../config answered loads unchanged. */
#include <stdio.h>
#include <string.h>

#include "../base/jtext.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "server.h"

static void answer_json(job *j, int status, json_t *json) {
  if (!json) {
    resp_errorf(&j->out, TS_ENOMEM, "out of memory");
    return;
  }
  resp_json(&j->out, status, json);
  json_decref(json);
}

/* ---- model configuration ------------------------------------------------ */

/* Triton's data_type for an OIP datatype: TYPE_<name>, BYTES as TYPE_STRING. */
static void triton_type(ts_dtype t, char *out, size_t n) {
  const char *name = ts_dtype_name(t);
  snprintf(out, n, "TYPE_%s", strcmp(name, "BYTES") == 0 ? "STRING" : name);
}

/* Keys of config.json that have a field of their own in Triton's shape. */
static int has_own_field(const char *key) {
  return strcmp(key, "max_batch") == 0 || strcmp(key, "version_policy") == 0 ||
         strcmp(key, "dynamic_batching") == 0;
}

/* With max_batch_size > 0, Triton's dims leave out the batch dimension. */
static json_t *io_config(const md_io *io, int n, int batched) {
  json_t *a = json_array();
  for (int i = 0; a && i < n; i++) {
    json_t *dims = json_array();
    for (int k = batched && io[i].ndim > 0 ? 1 : 0; k < io[i].ndim; k++)
      json_array_append_new(dims, json_integer(io[i].shape[k]));
    char type[32];
    triton_type(io[i].dtype, type, sizeof type);
    json_array_append_new(
        a, json_pack("{s:s, s:s, s:o}", "name", io[i].name, "data_type", type, "dims", dims));
  }
  return a;
}

static json_t *config_json(const char *model, const repo_ver *v) {
  const json_t *cfg = repo_ver_config(v);
  const md_sig *sig = repo_ver_sig(v);
  int64_t mb = repo_ver_max_batch(v);
  json_t *pol = json_object_get(cfg, "version_policy");
  json_t *params = json_object();
  const char *key;
  json_t *val;
  json_object_foreach((json_t *)cfg, key, val) {
    if (has_own_field(key)) continue;
    char *text = json_is_string(val) ? tl_strdup(json_string_value(val))
                                     : jtext_dumps(val, JT_COMPACT | JT_SORT_KEYS, NULL);
    if (text) json_object_set_new(params, key, json_pack("{s:s}", "string_value", text));
    if (json_is_string(val))
      tl_free(text);
    else
      free(text);
  }
  json_t *c = json_pack(
      "{s:s, s:s, s:s, s:o, s:I, s:o, s:o, s:o}", "name", model, "platform", "tallyd", "backend",
      "tallyd", "version_policy",
      pol && !json_is_null(pol) ? json_deep_copy(pol)
                                : json_pack("{s:{s:i}}", "latest", "num_versions", 1),
      "max_batch_size", (json_int_t)mb, "input", io_config(sig->inputs, sig->n_inputs, mb > 0),
      "output", io_config(sig->outputs, sig->n_outputs, mb > 0), "parameters", params);
  json_t *db = json_object_get(cfg, "dynamic_batching");
  if (c && db) json_object_set(c, "dynamic_batching", db);
  return c;
}

void ep_model_config(job *j) {
  repo_ver *v;
  ts_err err = {0};
  if (repo_acquire(j->srv->repo, j->rt.model, j->rt.version, &v, &err)) {
    resp_error(&j->out, &err);
    return;
  }
  json_t *c = config_json(j->rt.model, v);
  repo_release(v);
  answer_json(j, 200, c);
}

/* ---- statistics --------------------------------------------------------- */

static json_t *dur(const repo_dur *d) {
  return json_pack("{s:I, s:I}", "count", (json_int_t)d->count, "ns", (json_int_t)d->ns);
}

static void stats_row(void *data, const char *model, int64_t version, const repo_stats *s) {
  json_t *rows = data;
  char vb[32];
  snprintf(vb, sizeof vb, "%lld", (long long)version);
  static const repo_dur zero = {0, 0};
  json_t *inf =
      json_pack("{s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "success", dur(&s->success), "fail",
                dur(&s->fail), "queue", dur(&s->queue), "compute_input", dur(&s->compute_input),
                "compute_infer", dur(&s->compute_infer), "compute_output", dur(&s->compute_output),
                "cache_hit", dur(&zero), "cache_miss", dur(&zero));
  json_t *batches = json_array();
  for (int i = 0; batches && i < s->n_batch; i++) {
    const repo_batch_stat *b = &s->batch[i];
    json_array_append_new(
        batches, json_pack("{s:I, s:o, s:o, s:o}", "batch_size", (json_int_t)b->batch_size,
                           "compute_input", dur(&b->compute_input), "compute_infer",
                           dur(&b->compute_infer), "compute_output", dur(&b->compute_output)));
  }
  json_array_append_new(
      rows,
      json_pack("{s:s, s:s, s:I, s:I, s:I, s:o, s:o, s:[]}", "name", model, "version", vb,
                "last_inference", (json_int_t)s->last_inference_ms, "inference_count",
                (json_int_t)s->inference_count, "execution_count", (json_int_t)s->execution_count,
                "inference_stats", inf, "batch_stats", batches, "memory_usage"));
}

void ep_stats(job *j) {
  json_t *rows = json_array();
  if (!rows) {
    resp_errorf(&j->out, TS_ENOMEM, "out of memory");
    return;
  }
  ts_err err = {0};
  int all = j->rt.id == R_STATS_ALL;
  if (repo_stats_foreach(j->srv->repo, all ? NULL : j->rt.model, all ? 0 : j->rt.version, stats_row,
                         rows, &err)) {
    json_decref(rows);
    resp_error(&j->out, &err);
    return;
  }
  answer_json(j, 200, json_pack("{s:o}", "model_stats", rows));
}

/* ---- load and unload ---------------------------------------------------- */

/* The body of a load or unload: {} or {"parameters": {...}}; an empty body
 * is {}. *params is borrowed from *doc (NULL when absent). */
static int read_repo_body(job *j, json_t **doc, json_t **params, ts_err *err) {
  *doc = *params = NULL;
  size_t n = j->len;
  while (n && (j->body[n - 1] == ' ' || j->body[n - 1] == '\n' || j->body[n - 1] == '\r' ||
               j->body[n - 1] == '\t'))
    n--;
  if (!n) return 0;
  json_error_t je;
  *doc = json_loadb(j->body, j->len, JSON_REJECT_DUPLICATES, &je);
  if (!*doc) return ts_errf(err, TS_EINVAL, "the body is not valid JSON: %s", je.text);
  if (!json_is_object(*doc)) return ts_errf(err, TS_EINVAL, "the body must be a JSON object");
  const char *key;
  json_t *v;
  json_object_foreach(*doc, key, v) {
    if (strcmp(key, "parameters") != 0)
      return ts_errf(err, TS_EINVAL, "unknown field '%.60s' (the body takes only \"parameters\")",
                     key);
    if (!json_is_object(v)) return ts_errf(err, TS_EINVAL, "\"parameters\" must be a JSON object");
    *params = v;
  }
  return 0;
}

static const char *const triton_keys[] = {"name",           "platform",
                                          "backend",        "max_batch_size",
                                          "version_policy", "dynamic_batching",
                                          "input",          "output",
                                          "parameters",     NULL};

/* The config.json a load's override in Triton's shape stands for; its
 * "input" and "output", when given, must be the model's own (checked by the
 * caller against the served version). */
static int from_triton(const char *model, const json_t *t, json_t **out, ts_err *err) {
  json_t *c = json_object();
  if (!c) return ts_errf(err, TS_ENOMEM, "out of memory");
  const char *key;
  json_t *v;
  int rc = 0;
  json_object_foreach((json_t *)t, key, v) {
    int known = 0;
    for (const char *const *k = triton_keys; *k && !known; k++) known = strcmp(*k, key) == 0;
    if (!known) {
      rc = ts_errf(err, TS_EINVAL,
                   "config: key '%.60s' is not one tallyd takes (name, platform, "
                   "backend, max_batch_size, version_policy, dynamic_batching, input, output, "
                   "parameters; or a config.json of its own with \"kind\")",
                   key);
      goto fail;
    }
    if (strcmp(key, "name") == 0) {
      if (!json_is_string(v) || strcmp(json_string_value(v), model) != 0) {
        rc =
            ts_errf(err, TS_EINVAL, "config: 'name' must be \"%s\", the model being loaded", model);
        goto fail;
      }
    } else if (strcmp(key, "platform") == 0 || strcmp(key, "backend") == 0) {
      const char *s = json_string_value(v);
      if (!s || (*s && strcmp(s, "tallyd") != 0)) {
        rc = ts_errf(err, TS_EINVAL,
                     "config: '%s' must be \"tallyd\" (the model's kind goes in "
                     "parameters.kind)",
                     key);
        goto fail;
      }
    } else if (strcmp(key, "max_batch_size") == 0) {
      if (!json_is_integer(v) || json_integer_value(v) < 0 ||
          json_integer_value(v) > MD_MAX_BATCH) {
        rc = ts_errf(err, TS_EINVAL,
                     "config: 'max_batch_size' must be an integer in [0, %lld] "
                     "(0: no limit)",
                     (long long)MD_MAX_BATCH);
        goto fail;
      }
      json_object_set(c, "max_batch", v);
    } else if (strcmp(key, "version_policy") == 0 || strcmp(key, "dynamic_batching") == 0) {
      json_object_set(c, key, v);
    } else if (strcmp(key, "parameters") == 0) {
      if (!json_is_object(v)) {
        rc = ts_errf(err, TS_EINVAL, "config: 'parameters' must be an object");
        goto fail;
      }
      const char *pk;
      json_t *pv;
      json_object_foreach(v, pk, pv) {
        const char *text = json_string_value(json_object_get(pv, "string_value"));
        if (!json_is_object(pv) || json_object_size(pv) != 1 || !text) {
          rc = ts_errf(err, TS_EINVAL,
                       "config: parameters.%.60s must be {\"string_value\": "
                       "\"...\"}",
                       pk);
          goto fail;
        }
        if (has_own_field(pk) || json_object_get(c, pk)) {
          rc = ts_errf(err, TS_EINVAL,
                       "config: parameters.%.60s: '%s' has a field of its own "
                       "(max_batch_size, version_policy, dynamic_batching)",
                       pk, pk);
          goto fail;
        }
        /* JSON text (an array, an object, a number) where it reads as JSON,
         * else the text itself: "mlp" is the string mlp */
        json_t *val = json_loads(text, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, NULL);
        json_object_set_new(c, pk, val ? val : json_string(text));
      }
    }
  }
  if (!json_object_get(c, "kind")) {
    rc = ts_errf(err, TS_EINVAL,
                 "config: no 'kind' in parameters (for example \"parameters\": "
                 "{\"kind\": {\"string_value\": \"mlp\"}}; GET /v2/models/%s/config shows the "
                 "model's own)",
                 model);
    goto fail;
  }
  *out = c;
  return 0;
fail:
  json_decref(c);
  return rc;
}

/* A Triton-shaped override's "input"/"output" against the served version's
 * signature: tensors come from the kind and the weights, not the config. */
static int check_io(repo_t *r, const char *model, const json_t *t, const json_t *native,
                    ts_err *err) {
  if (!json_object_get(t, "input") && !json_object_get(t, "output")) return 0;
  repo_ver *v;
  ts_err ignore;
  if (repo_acquire(r, model, 0, &v, &ignore)) return 0; /* nothing served to compare with */
  json_t *mb = json_object_get(native, "max_batch");
  int batched = json_is_integer(mb) && json_integer_value(mb) > 0;
  const md_sig *sig = repo_ver_sig(v);
  int rc = 0;
  for (int k = 0; k < 2 && !rc; k++) {
    const char *key = k ? "output" : "input";
    json_t *given = json_object_get(t, key);
    if (!given) continue;
    json_t *own = k ? io_config(sig->outputs, sig->n_outputs, batched)
                    : io_config(sig->inputs, sig->n_inputs, batched);
    if (!json_equal(given, own)) {
      char *want = jtext_dumps(own, JT_COMPACT, NULL);
      rc = ts_errf(err, TS_EINVAL,
                   "config: '%s' differs from the model's %ss, which come from "
                   "its kind and weights and cannot be changed by a load (leave '%s' out, or "
                   "give %.300s)",
                   key, key, key, want ? want : "its own");
      free(want);
    }
    json_decref(own);
  }
  repo_release(v);
  return rc;
}

void ep_repo_load(job *j) {
  ts_err err = {0};
  json_t *doc, *params, *given = NULL, *config = NULL;
  int rc = read_repo_body(j, &doc, &params, &err);
  const char *key;
  json_t *v;
  if (!rc && params) {
    json_object_foreach(params, key, v) {
      if (strncmp(key, "file:", 5) == 0) {
        rc = ts_errf(&err, TS_EINVAL,
                     "parameter '%.100s': loading files sent with the request is "
                     "not supported; tallyd loads weights only from the repository (copy them "
                     "to <repository>/%s/<version>/ and load without files)",
                     key, j->rt.model);
        break;
      }
      if (strcmp(key, "config") != 0) {
        rc = ts_errf(&err, TS_EINVAL, "unknown parameter '%.60s' for load; accepted: config", key);
        break;
      }
      given = v;
    }
  }
  json_t *parsed = NULL;
  if (!rc && given) {
    if (json_is_string(given)) { /* Triton's: the config as JSON text */
      json_error_t je;
      parsed = json_loads(json_string_value(given), JSON_REJECT_DUPLICATES, &je);
      if (!parsed)
        rc = ts_errf(&err, TS_EINVAL, "parameter 'config' is not valid JSON: %s", je.text);
      else
        given = parsed;
    }
    if (!rc && !json_is_object(given))
      rc = ts_errf(&err, TS_EINVAL, "parameter 'config' must be a JSON object (or its text)");
    if (!rc) {
      /* tallyd's own config.json names its kind; Triton's shape does not */
      if (json_object_get(given, "kind") || json_object_get(given, "model_type"))
        config = json_incref(given);
      else if (!(rc = from_triton(j->rt.model, given, &config, &err)))
        rc = check_io(j->srv->repo, j->rt.model, given, config, &err);
    }
  }
  if (!rc) rc = repo_load_model_config(j->srv->repo, j->rt.model, config, &err);
  if (parsed) json_decref(parsed);
  if (config) json_decref(config);
  if (doc) json_decref(doc);
  if (rc) {
    resp_error(&j->out, &err);
    return;
  }
  answer_json(j, 200, json_object());
}

void ep_repo_unload(job *j) {
  ts_err err = {0};
  json_t *doc, *params;
  int rc = read_repo_body(j, &doc, &params, &err);
  const char *key;
  json_t *v;
  if (!rc && params) {
    json_object_foreach(params, key, v) {
      if (strcmp(key, "unload_dependents") != 0) {
        rc = ts_errf(&err, TS_EINVAL,
                     "unknown parameter '%.60s' for unload; accepted: "
                     "unload_dependents",
                     key);
        break;
      }
      if (!json_is_boolean(v)) {
        rc = ts_errf(&err, TS_EINVAL, "parameter 'unload_dependents' must be true or false");
        break;
      }
      if (json_is_true(v)) {
        rc = ts_errf(&err, TS_EINVAL,
                     "unload_dependents: true is not supported: tallyd unloads "
                     "the one model named; an ensemble's members are models of their own "
                     "(unload each)");
        break;
      }
    }
  }
  if (doc) json_decref(doc);
  if (!rc) rc = repo_unload_model(j->srv->repo, j->rt.model, &err);
  if (rc) {
    resp_error(&j->out, &err);
    return;
  }
  answer_json(j, 200, json_object());
}

/* ---- what is refused ---------------------------------------------------- */

void ep_unsupported(job *j) {
  const char *why = "this call is not supported by tallyd";
  switch (j->rt.id) {
    case R_SHM_SYSTEM:
      why =
          "system shared memory (register, unregister, status) is not supported by tallyd: "
          "send tensors in the request body (the binary tensor extension, "
          "\"binary_data_size\") and ask for binary outputs with \"binary_data\": true";
      break;
    case R_SHM_CUDA:
      why =
          "CUDA shared memory (register, unregister, status) is not supported by tallyd: "
          "send tensors in the request body (the binary tensor extension, "
          "\"binary_data_size\") and ask for binary outputs with \"binary_data\": true";
      break;
    case R_TRACE:
      why =
          "trace settings are not supported by tallyd: it exports OpenTelemetry traces "
          "(--otlp-endpoint, W3C traceparent), logs every request on one line with its "
          "X-Request-Id (--log-level), and times them in /metrics and /v2/models/stats";
      break;
    case R_LOGGING:
      why =
          "log settings cannot be read or changed over HTTP: tallyd's log level is "
          "--log-level, set when it starts";
      break;
    default: break;
  }
  resp_errorf(&j->out, TS_EINVAL, "%s", why);
}
