/* main.c - tallyd's entry point: flags, logging, the repository, the loop. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/cpu.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../models/attention.h"
#include "../models/model.h"
#include "server.h"
#include "sessions.h"

int main(int argc, char **argv) {
  srv_config cfg;
  ts_err err = {0};
  cfg_defaults(&cfg);
  tl_mem_init_env();
  /* jansson allocates through tl_malloc too, so fault injection covers it */
  json_set_alloc_funcs(tl_malloc, tl_free);
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
  if (md_attn_set_device(cfg.device, &err) ||
      sessions_configure(cfg.session_ttl_secs, cfg.kv_cache_bytes, &err)) {
    fprintf(stderr, "tallyd: %s\n", err.msg);
    cfg_free(&cfg);
    return 2;
  }
  log_set_level(lvl);
  log_set_json(strcmp(cfg.log_format, "json") == 0);
  signal(SIGPIPE, SIG_IGN);

  server s;
  if (server_init(&s, &cfg, &err)) {
    log_error("%s", err.msg);
    server_free(&s);
    sessions_shutdown();
    cfg_free(&cfg);
    return 1;
  }
  log_info("tallyd %s listening on %s (port %d), %d workers, simd %s, attention on %s",
           TALLYD_VERSION, cfg.listen, s.port, pool_threads(s.pool),
           cpu_path_name(cpu_best_path()), md_attn_device_name());
  repo_sync(s.repo);
  int ready;
  int n = repo_count_models(s.repo, &ready);
  log_info("model repository %s: %d of %d models ready", cfg.model_repository, ready, n);
  int rc = server_run(&s);
  server_free(&s);
  sessions_shutdown(); /* after the workers: releases the versions sessions pin */
  log_info("tallyd stopped");
  cfg_free(&cfg);
  return rc;
}
