/* main.c - tallyd's entry point: flags, logging, the repository, the loop;
 * also `tallyd --keygen`, and the first systemd READY=1 (after the
 * repository is loaded and the server listens). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../base/cpu.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../models/attention.h"
#include "../models/model.h"
#include "auth.h"
#include "notify.h"
#include "oip.h"
#include "server.h"
#include "sessions.h"

/* tallyd --keygen [--scope infer|admin]: the key on the first line, the
 * line for the key file on the second; only the digest is ever stored. */
static int keygen(const srv_config *cfg) {
  auth_scope sc = cfg->scope && strcmp(cfg->scope, "admin") == 0 ? AUTH_ADMIN : AUTH_INFER;
  char key[64], line[128];
  ts_err err = {0};
  if (auth_keygen(sc, key, sizeof key, line, sizeof line, &err)) {
    fprintf(stderr, "tallyd: %s\n", err.msg);
    return 1;
  }
  printf("%s\n%s\n", key, line);
  fprintf(stderr,
          "tallyd: give the first line (the key) to the client; add the second line to "
          "the --api-key-file and send the daemon SIGHUP\n");
  return 0;
}

int main(int argc, char **argv) {
  srv_config cfg;
  ts_err err = {0};
  cfg_defaults(&cfg);
  tl_mem_init_env();
  /* jansson allocates through tl_malloc too, so fault injection covers it,
   * counted per request parse (--max-json-memory) */
  oip_json_alloc_init();
  if (cfg_parse(&cfg, argc, argv, &err)) {
    fprintf(stderr, "tallyd: %s\n", err.msg);
    cfg_free(&cfg);
    return 2;
  }
  if (cfg.help) {
    cfg_usage(stdout);
    cfg_free(&cfg);
    return 0;
  }
  if (cfg.version) {
    printf("tallyd %s (simd: %s; kinds: %s)\n", TALLYD_VERSION, cpu_path_name(cpu_best_path()),
           md_kind_names());
    cfg_free(&cfg);
    return 0;
  }
  if (cfg.keygen) {
    int krc = keygen(&cfg);
    cfg_free(&cfg);
    return krc;
  }
  if (!cfg.model_repository) {
    fprintf(stderr, "tallyd: --model-repository DIR is required (see --help)\n");
    cfg_free(&cfg);
    return 2;
  }
  log_level lvl;
  if (log_level_from_name(cfg.log_level, &lvl)) {
    fprintf(stderr, "tallyd: --log-level must be debug, info, warn or error\n");
    cfg_free(&cfg);
    return 2;
  }
  if (md_attn_set_device(cfg.device, &err) || sessions_set_replica(cfg.replica_id, &err) ||
      sessions_configure(cfg.session_ttl_secs, cfg.kv_cache_bytes, cfg.max_sessions, &err)) {
    fprintf(stderr, "tallyd: %s\n", err.msg);
    cfg_free(&cfg);
    return 2;
  }
  log_set_level(lvl);
  log_set_json(strcmp(cfg.log_format, "json") == 0);
  signal(SIGPIPE, SIG_IGN);
  notify_init();

  server s;
  if (server_init(&s, &cfg, &err)) {
    log_error("%s", err.msg);
    server_free(&s);
    sessions_shutdown();
    cfg_free(&cfg);
    return 1;
  }
  log_info("tallyd %s listening on %s (port %d), %d workers, simd %s, attention on %s",
           TALLYD_VERSION, cfg.listen, s.port, pool_threads(s.pool), cpu_path_name(cpu_best_path()),
           md_attn_device_name());
  repo_sync(s.repo);
  int ready;
  int n = repo_count_models(s.repo, &ready);
  log_info("model repository %s: %d of %d models ready", cfg.model_repository, ready, n);
  notify_sendf("READY=1\nMAINPID=%d\nSTATUS=serving %d of %d models on %s", (int)getpid(), ready, n,
               cfg.listen);
  int rc = server_run(&s);
  server_free(&s);
  sessions_shutdown(); /* after the workers: releases the versions sessions pin */
  notify_close();
  log_info("tallyd stopped");
  cfg_free(&cfg);
  return rc;
}
