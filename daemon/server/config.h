/* config.h - daemon settings: command-line flags and a JSON config file.
 *
 * Every flag has a config-file key of the same name without the dashes
 * ("--max-body-bytes" <-> "max_body_bytes" or "max-body-bytes"). The file
 * is read first (--config FILE), then flags override it. The table of
 * options in config.c is the one place a setting is declared. */
#ifndef TALLYD_CONFIG_H
#define TALLYD_CONFIG_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "../base/err.h"

#define CFG_MAX_LIST 64

typedef struct srv_config {
  char *config_file;
  char *model_repository;
  char *models[CFG_MAX_LIST + 1]; /* --model, repeatable; NULL-terminated */
  char *listen;                   /* host:port */
  int64_t threads;
  int64_t queue_depth;
  int64_t fit_workers; /* the fit lane's cap; -1: half the workers; 0: none */
  int64_t max_body_bytes;
  int64_t drain_timeout_ms;
  int64_t request_timeout_ms;
  int64_t max_request_elements;
  int64_t max_request_memory;
  int64_t max_json_memory;         /* the JSON parse tree of one request body */
  int64_t max_inputs, max_outputs; /* entries of a request's "inputs" / "outputs" */
  int64_t max_response_bytes;      /* one answer's encoded size */
  char *log_level;
  char *log_format;
  int64_t session_ttl_secs; /* KV-cache sessions (server/sessions.h) */
  int64_t kv_cache_bytes;
  int64_t max_sessions;
  char *device; /* attention device: auto, cpu, cuda (models/attention.h) */
  /* production operation (docs/operations.md) */
  char *api_key_file;           /* "<sha256 hex> <scope>" lines; NULL: no credentials */
  char *tls_cert, *tls_key;     /* PEM files; both or neither */
  char *cors_origin;            /* comma list of origins or "*"; NULL: no CORS */
  int64_t max_connections;      /* 0: libmicrohttpd's default */
  int64_t per_ip_connections;   /* 0: no per-address limit */
  int64_t connection_timeout;   /* seconds of client silence before a cut; 0: none */
  int64_t max_batch;            /* largest leading dimension of an input; 0: none */
  int64_t max_sequence_length;  /* largest token/query/key length; 0: none */
  int64_t repository_poll_secs; /* rescan period; 0: only at SIGHUP */
  char *repository_watch;       /* inotify (default), poll or off (server/watch.h) */
  /* scale-out (docs/deployment.md, Scaling) */
  char *replica_id;               /* this replica's name in fit locks and session ids */
  int64_t fit_lock_lease_seconds; /* the fit lock's lease across replicas; 0: none */
  char *weights_load;             /* "mmap" (default) or "read" (a private copy) */
  char *scope;                    /* --keygen: the new key's scope */
  int keygen;
  int help, version;

  /* tracing (server/trace.h) */
  char *otlp_endpoint;     /* OTLP/HTTP traces URL; NULL: tracing off */
  char *otlp_sample_ratio; /* a number in [0, 1], checked by trace_start; NULL: 1 */
  int64_t otlp_queue_size; /* finished requests waiting for export at most */
  int64_t otlp_timeout_ms; /* one export's bound */
} srv_config;

void cfg_defaults(srv_config *c);
/* 0, or -TS_EINVAL with a message (unknown flag, bad value, bad file). */
int cfg_parse(srv_config *c, int argc, char **argv, ts_err *err);
void cfg_free(srv_config *c);
void cfg_usage(FILE *out);
/* 1 when s is a valid replica id: 1..CFG_REPLICA_ID_MAX letters, digits,
 * '_' and '-' (no '.': it ends the replica part of a session id). */
#define CFG_REPLICA_ID_MAX 48
int cfg_replica_id_valid(const char *s);
/* Splits c->listen into host and port. */
int cfg_listen(const srv_config *c, char *host, size_t hostlen, int *port, ts_err *err);

#endif
