/* config.c - flags and config file (see config.h). */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../base/mem.h"

enum { T_STR, T_INT, T_LIST, T_FLAG };

typedef struct opt {
  const char *name; /* flag without the leading dashes */
  int type;
  size_t off;
  int64_t min, max;
  const char *arg, *help;
} opt;

#define O(f) offsetof(srv_config, f)
static const opt opts[] = {
    {"config", T_STR, O(config_file), 0, 0, "FILE",
     "JSON config file with the same keys as the flags"},
    {"model-repository", T_STR, O(model_repository), 0, 0, "DIR",
     "model repository root (required)"},
    {"model", T_LIST, O(models), 0, 0, "NAME", "serve only this model (repeatable; default: all)"},
    {"listen", T_STR, O(listen), 0, 0, "HOST:PORT", "address to serve (default 127.0.0.1:8000)"},
    {"threads", T_INT, O(threads), 0, 1024, "N", "worker threads (default: number of cores)"},
    {"queue-depth", T_INT, O(queue_depth), 1, 1 << 20, "N",
     "waiting requests before 429 (default 256)"},
    {"fit-workers", T_INT, O(fit_workers), 0, 1024, "N",
     "most worker threads that fits, evaluations and calibrations use at once, helpers of their "
     "parallel loops included, so that inference keeps the rest (default: half the workers, at "
     "least 1; 0 = no cap)"},
    {"max-body-bytes", T_INT, O(max_body_bytes), 1, INT64_MAX, "N",
     "request body cap, 413 above (default 67108864)"},
    {"drain-timeout", T_INT, O(drain_timeout_ms), 0, INT64_MAX, "MS",
     "how long in-flight requests may finish at shutdown (default 30000)"},
    {"request-timeout-ms", T_INT, O(request_timeout_ms), 0, INT64_MAX, "MS",
     "default deadline of infer requests, 504 after; 0 = none (default 60000); a request's "
     "\"timeout_ms\" parameter overrides it"},
    {"max-request-elements", T_INT, O(max_request_elements), 0, INT64_MAX, "N",
     "largest element count of one input tensor (default 268435456)"},
    {"max-request-memory", T_INT, O(max_request_memory), 0, INT64_MAX, "BYTES",
     "largest decoded size of a request's input tensors together, 413 above; 0 = none (default "
     "1073741824)"},
    {"max-json-memory", T_INT, O(max_json_memory), 0, INT64_MAX, "BYTES",
     "largest parse tree of a request's JSON (about 50 bytes a number), 413 above; 0 = none "
     "(default 268435456)"},
    {"max-inputs", T_INT, O(max_inputs), 0, INT64_MAX, "N",
     "most entries in a request's \"inputs\", 413 above; 0 = none (default 64)"},
    {"max-outputs", T_INT, O(max_outputs), 0, INT64_MAX, "N",
     "most entries in a request's \"outputs\", 413 above; 0 = none (default 64)"},
    {"max-response-bytes", T_INT, O(max_response_bytes), 0, INT64_MAX, "BYTES",
     "largest answer to one request, checked before it is built, 413 above; 0 = none (default "
     "268435456)"},
    {"log-level", T_STR, O(log_level), 0, 0, "LEVEL", "debug, info, warn or error (default info)"},
    {"log-format", T_STR, O(log_format), 0, 0, "FORMAT", "text or json (default text)"},
    {"session-ttl-secs", T_INT, O(session_ttl_secs), 1, INT64_C(1) << 40, "S",
     "KV-cache sessions idle this long expire (default 600)"},
    {"kv-cache-bytes", T_INT, O(kv_cache_bytes), 1, INT64_MAX, "N",
     "cap on all sessions' memory (caches and bookkeeping); least recently used idle sessions are "
     "evicted above it, a new session that cannot fit is refused 503 (default 4294967296)"},
    {"max-sessions", T_INT, O(max_sessions), 1, INT64_C(1) << 30, "N",
     "open KV-cache sessions at most; least recently used idle sessions are evicted above it, a "
     "new one is refused 503 when all are busy (default 10000)"},
    {"device", T_STR, O(device), 0, 0, "DEV",
     "attention on auto, cpu or cuda (default auto: the GPU when the build has CUDA and one is "
     "present)"},
    {"api-key-file", T_STR, O(api_key_file), 0, 0, "FILE",
     "credentials: lines '<sha256 hex of a key> <infer|admin>'; reread at SIGHUP (default: none, "
     "every endpoint open)"},
    {"tls-cert", T_STR, O(tls_cert), 0, 0, "FILE",
     "serve HTTPS with this PEM certificate (chain) (needs --tls-key); TLS 1.2 and 1.3 only"},
    {"tls-key", T_STR, O(tls_key), 0, 0, "FILE", "PEM private key of --tls-cert"},
    {"cors-origin", T_STR, O(cors_origin), 0, 0, "ORIGINS",
     "allow browsers from these origins (comma list, or *); answers OPTIONS preflights (default: "
     "none)"},
    {"max-connections", T_INT, O(max_connections), 0, 1 << 20, "N",
     "open connections at most (default 0: libmicrohttpd's limit, about the descriptor limit)"},
    {"per-ip-connections", T_INT, O(per_ip_connections), 0, 1 << 20, "N",
     "open connections per client address at most (default 0: no limit)"},
    {"connection-timeout", T_INT, O(connection_timeout), 0, 86400, "SECONDS",
     "close a connection idle or stalled this long; a request being computed is exempt; 0 = never "
     "(default 60)"},
    {"max-batch", T_INT, O(max_batch), 0, INT64_MAX, "N",
     "largest leading dimension of any input tensor, 400 above (default 0: no limit)"},
    {"max-sequence-length", T_INT, O(max_sequence_length), 0, INT64_MAX, "N",
     "largest sequence length (input_ids' last, query/key/value's second-to-last dimension), 400 "
     "above (default 0: no limit)"},
    {"weights-load", T_STR, O(weights_load), 0, 0, "HOW",
     "mmap: map model.safetensors, no copy, the file must never change in place; read: copy it "
     "into memory, immune to later writes to the file (default mmap)"},
    {"repository-poll-secs", T_INT, O(repository_poll_secs), 0, 86400, "N",
     "rescan the model repository every N seconds, as at SIGHUP (default 0: only at SIGHUP)"},
    {"repository-watch", T_STR, O(repository_watch), 0, 0, "MODE",
     "how new versions, models and removals in the repository are noticed: inotify (within "
     "about 0.1 s; on NFS, CephFS, SMB or FUSE it polls as well, every --repository-poll-secs "
     "or 2 s), poll (every --repository-poll-secs, or 2 s) or off (SIGHUP, the load endpoint and "
     "--repository-poll-secs only) (default inotify)"},
    {"otlp-endpoint", T_STR, O(otlp_endpoint), 0, 0, "URL",
     "export traces as OTLP/HTTP JSON to this URL (e.g. http://collector:4318/v1/traces); "
     "default: none, tracing off"},
    {"otlp-sample-ratio", T_STR, O(otlp_sample_ratio), 0, 0, "R",
     "share of new traces sampled, 0 to 1; a request's traceparent sampled flag wins "
     "(default 1)"},
    {"otlp-queue-size", T_INT, O(otlp_queue_size), 1, 1 << 20, "N",
     "traced requests waiting for export at most; more are dropped and counted (default 2048)"},
    {"otlp-timeout-ms", T_INT, O(otlp_timeout_ms), 1, 60000, "MS",
     "bound on one export (connect and transfer) and on the flush at shutdown (default 2000)"},
    {"replica-id", T_STR, O(replica_id), 0, 0, "ID",
     "this replica's name, in fit locks and session ids: 1-48 letters, digits, '_' or '-' "
     "(default: the host name's first label, other characters as '-')"},
    {"fit-lock-lease-seconds", T_INT, O(fit_lock_lease_seconds), 0, 86400, "S",
     "a fit or calibration holds <model>/.fit-lock in the repository, renewed every third of "
     "this lease; a replica killed mid-fit blocks the model this long at most; 0 = no lock file, "
     "one fit per model per process only (default 30)"},
    {"keygen", T_FLAG, O(keygen), 0, 0, NULL,
     "print a new random API key and its key-file line, then exit"},
    {"scope", T_STR, O(scope), 0, 0, "SCOPE",
     "scope of the key --keygen makes: infer or admin (default infer)"},
    {"help", T_FLAG, O(help), 0, 0, NULL, "print this help"},
    {"version", T_FLAG, O(version), 0, 0, NULL, "print the version"},
};
#undef O

void cfg_defaults(srv_config *c) {
  memset(c, 0, sizeof *c);
  c->threads = 0;
  c->queue_depth = 256;
  c->fit_workers = -1; /* half the workers */
  c->max_body_bytes = 64ll << 20;
  c->drain_timeout_ms = 30000;
  c->request_timeout_ms = 60000;
  c->max_request_elements = 1ll << 28;
  c->session_ttl_secs = 600;
  c->kv_cache_bytes = 4ll << 30;
  c->max_sessions = 10000;
  c->max_request_memory = 1ll << 30;
  c->connection_timeout = 60; /* nginx's client_header/body_timeout */
  c->max_json_memory = 256ll << 20;
  c->max_inputs = 64;
  c->max_outputs = 64;
  c->max_response_bytes = 256ll << 20;
  c->otlp_queue_size = 2048;
  c->otlp_timeout_ms = 2000;
  c->fit_lock_lease_seconds = 30;
}

int cfg_replica_id_valid(const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n < 1 || n > CFG_REPLICA_ID_MAX) return 0;
  for (size_t i = 0; i < n; i++)
    if (!isalnum((unsigned char)s[i]) && s[i] != '_' && s[i] != '-') return 0;
  return 1;
}

/* The default replica id: the host name's first label (a pod's name in
 * Kubernetes), other characters as '-', at most CFG_REPLICA_ID_MAX. */
static int default_replica_id(char **slot) {
  char host[256] = "", id[CFG_REPLICA_ID_MAX + 1];
  if (gethostname(host, sizeof host) != 0) host[0] = 0;
  host[sizeof host - 1] = 0;
  size_t n = 0;
  for (const char *p = host; *p && *p != '.' && n < CFG_REPLICA_ID_MAX; p++)
    id[n++] = isalnum((unsigned char)*p) || *p == '_' ? *p : '-';
  id[n] = 0;
  char *d = tl_strdup(n ? id : "tallyd");
  if (!d) return -1;
  *slot = d;
  return 0;
}

static const opt *find_opt(const char *name) {
  char norm[64];
  size_t n = strlen(name);
  if (n >= sizeof norm) return NULL;
  for (size_t i = 0; i <= n; i++) norm[i] = name[i] == '_' ? '-' : name[i];
  for (size_t i = 0; i < sizeof opts / sizeof *opts; i++)
    if (strcmp(opts[i].name, norm) == 0) return &opts[i];
  return NULL;
}

static int set_str(char **slot, const char *v, ts_err *err) {
  char *d = tl_strdup(v);
  if (!d) return ts_errf(err, TS_ENOMEM, "out of memory");
  tl_free(*slot);
  *slot = d;
  return 0;
}

static int set_value(srv_config *c, const opt *o, const char *v, int from_file, ts_err *err) {
  void *slot = (char *)c + o->off;
  switch (o->type) {
    case T_STR: return set_str(slot, v, err);
    case T_INT: {
      char *end;
      errno = 0;
      long long x = strtoll(v, &end, 10);
      if (errno || end == v || *end || x < o->min || x > o->max)
        return ts_errf(err, TS_EINVAL, "--%s: '%s' is not an integer in [%lld, %lld]", o->name, v,
                       (long long)o->min, (long long)o->max);
      *(int64_t *)slot = x;
      return 0;
    }
    case T_LIST: {
      char **list = slot;
      int n = 0;
      while (list[n]) n++;
      if (from_file) { /* a file's list replaces; flags append */
        for (int i = 0; i < n; i++) tl_free(list[i]), list[i] = NULL;
        n = 0;
      }
      if (n >= CFG_MAX_LIST)
        return ts_errf(err, TS_EINVAL, "--%s: more than %d values", o->name, CFG_MAX_LIST);
      return set_str(&list[n], v, err);
    }
    default: *(int *)slot = 1; return 0;
  }
}

static int load_file(srv_config *c, const char *path, ts_err *err) {
  json_error_t je;
  json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!j) return ts_errf(err, TS_EINVAL, "config file %s: line %d: %s", path, je.line, je.text);
  int rc = 0;
  if (!json_is_object(j)) {
    rc = ts_errf(err, TS_EINVAL, "config file %s: not a JSON object", path);
    goto out;
  }
  const char *key;
  json_t *v;
  json_object_foreach(j, key, v) {
    const opt *o = find_opt(key);
    if (!o || o->type == T_FLAG || strcmp(o->name, "config") == 0) {
      rc = ts_errf(err, TS_EINVAL, "config file %s: unknown key '%s'", path, key);
      goto out;
    }
    char buf[64];
    if (o->type == T_LIST && json_is_array(v)) {
      size_t i;
      json_t *x;
      int first = 1;
      json_array_foreach(v, i, x) {
        if (!json_is_string(x)) {
          rc = ts_errf(err, TS_EINVAL, "config file %s: '%s' must hold strings", path, key);
          goto out;
        }
        if ((rc = set_value(c, o, json_string_value(x), first, err))) goto out;
        first = 0;
      }
      continue;
    }
    const char *s;
    if (json_is_string(v))
      s = json_string_value(v);
    else if (json_is_integer(v))
      snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(v)), s = buf;
    else if (json_is_real(v)) /* an integer key still refuses it */
      snprintf(buf, sizeof buf, "%.17g", json_real_value(v)), s = buf;
    else {
      rc = ts_errf(err, TS_EINVAL, "config file %s: '%s' must be a string or a number", path, key);
      goto out;
    }
    if ((rc = set_value(c, o, s, 1, err))) goto out;
  }
out:
  json_decref(j);
  return rc;
}

static int next_value(int argc, char **argv, int *i, const char *inline_v, const opt *o,
                      const char **out, ts_err *err) {
  if (inline_v) {
    *out = inline_v;
    return 0;
  }
  if (*i + 1 >= argc) return ts_errf(err, TS_EINVAL, "--%s needs a value (%s)", o->name, o->arg);
  *out = argv[++*i];
  return 0;
}

int cfg_parse(srv_config *c, int argc, char **argv, ts_err *err) {
  /* the file first, so that flags win */
  for (int i = 1; i < argc; i++) {
    const char *path = NULL;
    if (strncmp(argv[i], "--config=", 9) == 0)
      path = argv[i] + 9;
    else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
      path = argv[i + 1];
    if (path) {
      int rc = load_file(c, path, err);
      if (rc) return rc;
    }
  }
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strncmp(a, "--", 2) != 0)
      return ts_errf(err, TS_EINVAL, "unexpected argument '%s' (see --help)", a);
    char name[64];
    const char *eq = strchr(a + 2, '=');
    size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
    if (n >= sizeof name) return ts_errf(err, TS_EINVAL, "unknown flag '%.64s' (see --help)", a);
    memcpy(name, a + 2, n);
    name[n] = 0;
    const opt *o = find_opt(name);
    if (!o || strchr(name, '_'))
      return ts_errf(err, TS_EINVAL, "unknown flag '%s' (see --help)", a);
    if (o->type == T_FLAG) {
      if (eq) return ts_errf(err, TS_EINVAL, "--%s takes no value", o->name);
      *(int *)((char *)c + o->off) = 1;
      continue;
    }
    const char *v = NULL;
    int rc = next_value(argc, argv, &i, eq ? eq + 1 : NULL, o, &v, err);
    if (!rc && strcmp(o->name, "config") == 0) continue; /* already read */
    if (!rc) rc = set_value(c, o, v, 0, err);
    if (rc) return rc;
  }
  if (!c->listen && set_str(&c->listen, "127.0.0.1:8000", err)) return -TS_ENOMEM;
  if (!c->log_level && set_str(&c->log_level, "info", err)) return -TS_ENOMEM;
  if (!c->log_format && set_str(&c->log_format, "text", err)) return -TS_ENOMEM;
  if (!c->tls_cert != !c->tls_key)
    return ts_errf(err, TS_EINVAL, "--tls-cert and --tls-key go together (one of them is missing)");
  if (c->scope && strcmp(c->scope, "infer") != 0 && strcmp(c->scope, "admin") != 0)
    return ts_errf(err, TS_EINVAL, "--scope must be infer or admin, not '%s'", c->scope);
  if (!c->repository_watch && set_str(&c->repository_watch, "inotify", err)) return -TS_ENOMEM;
  if (strcmp(c->repository_watch, "inotify") != 0 && strcmp(c->repository_watch, "poll") != 0 &&
      strcmp(c->repository_watch, "off") != 0)
    return ts_errf(err, TS_EINVAL, "--repository-watch must be inotify, poll or off, not '%.80s'",
                   c->repository_watch);
  if (!c->replica_id && default_replica_id(&c->replica_id)) return -TS_ENOMEM;
  if (!cfg_replica_id_valid(c->replica_id))
    return ts_errf(err, TS_EINVAL,
                   "--replica-id '%.80s': 1-%d letters, digits, '_' or '-' (it names the replica "
                   "in session ids and fit locks)",
                   c->replica_id, CFG_REPLICA_ID_MAX);
  if (!c->weights_load && set_str(&c->weights_load, "mmap", err)) return -TS_ENOMEM;
  if (strcmp(c->weights_load, "read") != 0 && strcmp(c->weights_load, "mmap") != 0)
    return ts_errf(err, TS_EINVAL, "--weights-load must be read or mmap, not '%s'",
                   c->weights_load);
  if (strcmp(c->log_format, "text") != 0 && strcmp(c->log_format, "json") != 0)
    return ts_errf(err, TS_EINVAL, "--log-format must be text or json, not '%s'", c->log_format);
  return 0;
}

void cfg_free(srv_config *c) {
  for (size_t i = 0; i < sizeof opts / sizeof *opts; i++) {
    void *slot = (char *)c + opts[i].off;
    if (opts[i].type == T_STR) tl_free(*(char **)slot);
    if (opts[i].type == T_LIST)
      for (char **l = slot; *l; l++) tl_free(*l);
  }
  memset(c, 0, sizeof *c);
}

void cfg_usage(FILE *out) {
  fprintf(
      out,
      "usage: tallyd --model-repository DIR [options]\n\n"
      "Serves the Open Inference Protocol v2 (KServe/Triton REST) from a model repository.\n\n");
  for (size_t i = 0; i < sizeof opts / sizeof *opts; i++) {
    char left[64];
    snprintf(left, sizeof left, "--%s%s%s", opts[i].name, opts[i].arg ? " " : "",
             opts[i].arg ? opts[i].arg : "");
    fprintf(out, "  %-30s %s\n", left, opts[i].help);
  }
  fprintf(out, "\nEvery flag is also a key of the --config JSON file (flags win).\n");
}

int cfg_listen(const srv_config *c, char *host, size_t hostlen, int *port, ts_err *err) {
  const char *l = c->listen;
  const char *colon = strrchr(l, ':');
  if (!colon) return ts_errf(err, TS_EINVAL, "--listen '%s' must be HOST:PORT", l);
  size_t hn = (size_t)(colon - l);
  if (l[0] == '[' && hn >= 2 && l[hn - 1] == ']') {
    l++;
    hn -= 2;
  }
  if (hn == 0 || hn >= hostlen)
    return ts_errf(err, TS_EINVAL, "--listen '%s': bad host", c->listen);
  memcpy(host, l, hn);
  host[hn] = 0;
  char *end;
  long p = strtol(colon + 1, &end, 10);
  if (*end || p < 0 || p > 65535)
    return ts_errf(err, TS_EINVAL, "--listen '%s': bad port", c->listen);
  *port = (int)p;
  return 0;
}
