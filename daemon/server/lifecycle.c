/* lifecycle.c - what lives around the transport (http.c): server_init with
 * unwinding, the loop's timers and signals, the drain at SIGTERM/SIGINT,
 * rescans (SIGHUP, --repository-poll-secs) and key reloads, the systemd
 * watchdog, the memory trim after connection bursts, server_free.
 *
 * server_init makes its parts in one order and, on a failure, undoes
 * exactly what it made, in reverse (the goto ladder at its end), leaving s
 * as server_free expects a never-started server: server_free is then a
 * no-op, so main may call it either way. */
#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../learn/learn.h"
#include "../base/fsutil.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../models/model.h"
#include "notify.h"
#include "batch.h"
#include "sched.h"
#include "server.h"
#include "trace.h"
#include "transport.h"
#include "watch.h"

static void shutdown_now(server *s) {
  if (s->stopping) return;
  s->stopping = 1;
  transport_stop(s);
  uv_stop(s->loop);
}

/* After a burst of connections closes, the memory of their buffers sits in
 * malloc's free lists; hand it back to the system so resident memory returns
 * to where it was (checked once a second, trimmed only after a real drop). */
static void trim_after_burst(server *s) {
  if (!s->mhd) return;
  unsigned now = transport_connections(s);
  if (now > s->conn_peak) s->conn_peak = now; /* sampled every tick (10 ms) */
  if (++s->trim_ticks < 100) return;
  s->trim_ticks = 0;
  if (s->conn_peak - now >= 256) malloc_trim(0);
  s->conn_peak = now;
}

static void on_sweep(uv_timer_t *t) {
  server *s = t->data;
  double now = md_now();
  trim_after_burst(s);
  transport_sweep(s, now);
  if (atomic_load(&s->draining)) {
    double limit = (double)s->cfg->drain_timeout_ms / 1000.0;
    if (s->inflight == 0 || now - s->drain_started > limit) {
      if (s->inflight) log_warn("drain timeout: %d requests still running", s->inflight);
      shutdown_now(s);
    }
  }
}

/* ---- rescans, key reloads, systemd ------------------------------------- */

static void sync_job(void *arg) {
  server *s = arg;
  for (;;) {
    watch_rearm(s); /* before the scan: what appears after it is seen */
    repo_sync(s->repo);
    uv_mutex_lock(&s->sync_mu);
    int again = s->sync_again;
    s->sync_again = 0;
    if (!again) s->sync_busy = 0;
    uv_mutex_unlock(&s->sync_mu);
    if (!again) break;
  }
  int ready, n = repo_count_models(s->repo, &ready);
  if (atomic_exchange(&s->reloading, 0))
    notify_sendf("READY=1\nSTATUS=serving %d of %d models (reloaded)", ready, n);
  else
    notify_sendf("STATUS=serving %d of %d models", ready, n);
}

void server_schedule_sync(server *s, const char *why) {
  uv_mutex_lock(&s->sync_mu);
  int busy = s->sync_busy;
  if (busy)
    s->sync_again = 1; /* the running rescan goes round once more */
  else
    s->sync_busy = 1;
  uv_mutex_unlock(&s->sync_mu);
  if (busy) return;
  log_debug("%s: rescanning the model repository", why);
  /* loading is slow: it runs on a worker, never on the loop thread */
  if (pool_submit(s->pool, sync_job, s) != 0) {
    uv_mutex_lock(&s->sync_mu);
    s->sync_busy = 0;
    uv_mutex_unlock(&s->sync_mu);
    log_warn("%s: the work queue is full; rescan skipped", why);
    if (atomic_exchange(&s->reloading, 0))
      notify_send("READY=1\nSTATUS=reload skipped (queue full)");
  }
}

static void on_poll_timer(uv_timer_t *t) {
  server_schedule_sync(t->data, "repository poll");
}

static void on_watchdog(uv_timer_t *t) {
  (void)t;
  notify_send("WATCHDOG=1"); /* sent by the loop thread: proves it is not stuck */
}

static void reload_keys(server *s) {
  if (!s->cfg->api_key_file) return;
  auth_keys *k = NULL;
  ts_err err = {0};
  if (auth_load(s->cfg->api_key_file, &k, &err)) {
    log_error("SIGHUP: %s; keeping the %d keys in force", err.msg, auth_count(s->keys));
    return;
  }
  auth_free(s->keys);
  s->keys = k;
  log_info("SIGHUP: %d API keys from %s", auth_count(k), s->cfg->api_key_file);
}

static unsigned long long monotonic_usec(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000u;
}

static void on_signal(uv_signal_t *sig, int signum) {
  server *s = sig->data;
  if (signum == SIGHUP) {
    if (atomic_load(&s->draining)) return;
    log_info("SIGHUP: rescanning the model repository");
    notify_sendf("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading", monotonic_usec());
    atomic_store(&s->reloading, 1);
    reload_keys(s);
    server_schedule_sync(s, "SIGHUP");
    return;
  }
  if (atomic_load(&s->draining)) return;
  notify_sendf("STOPPING=1\nSTATUS=draining %d requests", s->inflight);
  uv_timer_stop(&s->poll_timer);
  watch_stop(s);
  log_info("%s: draining (%d requests in flight, up to %lld ms)",
           signum == SIGTERM ? "SIGTERM" : "SIGINT", s->inflight,
           (long long)s->cfg->drain_timeout_ms);
  atomic_store(&s->draining, 1);
  s->drain_started = md_now();
  transport_quiesce(s);
}

static int is_loopback(const struct sockaddr_storage *sa) {
  if (sa->ss_family == AF_INET)
    return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
  if (sa->ss_family == AF_INET6) {
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (IN6_IS_ADDR_LOOPBACK(a)) return 1;
    if (IN6_IS_ADDR_V4MAPPED(a)) return a->s6_addr[12] == 127;
  }
  return 0;
}

/* The listening address from --listen: a numeric IP ("localhost" is
 * 127.0.0.1) and a port. */
static int listen_addr(const srv_config *cfg, struct sockaddr_storage *sa, int *v6, int *port,
                       ts_err *err) {
  char host[256];
  int rc = cfg_listen(cfg, host, sizeof host, port, err);
  if (rc) return rc;
  struct addrinfo hints = {
      .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_PASSIVE};
  struct addrinfo *ai = NULL;
  if (strcmp(host, "localhost") == 0) snprintf(host, sizeof host, "127.0.0.1");
  if (getaddrinfo(host, NULL, &hints, &ai) != 0 || !ai)
    return ts_errf(err, TS_EINVAL, "--listen: '%s' is not a numeric IP address", host);
  memset(sa, 0, sizeof *sa);
  memcpy(sa, ai->ai_addr, ai->ai_addrlen);
  *v6 = ai->ai_family == AF_INET6;
  freeaddrinfo(ai);
  if (*v6)
    ((struct sockaddr_in6 *)sa)->sin6_port = htons((uint16_t)*port);
  else
    ((struct sockaddr_in *)sa)->sin_port = htons((uint16_t)*port);
  return 0;
}

/* Without --max-connections libmicrohttpd stops near FD_SETSIZE (1020),
 * which epoll does not need: raise the soft descriptor limit to the hard
 * one and allow connections up to it, keeping room for weights, logs and
 * the repository scan. */
static int64_t connection_limit(const srv_config *cfg) {
  int64_t conn_limit = cfg->max_connections;
  if (conn_limit > 0) return conn_limit;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rlim_t want =
        rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (1u << 20) ? (1u << 20) : rl.rlim_max;
    if (rl.rlim_cur < want) {
      rl.rlim_cur = want;
      setrlimit(RLIMIT_NOFILE, &rl);
      getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur > 1024 + 256)
      conn_limit = (int64_t)rl.rlim_cur - 256;
  }
  return conn_limit;
}

static void close_cb(uv_handle_t *h) {
  (void)h;
}

/* Closes the loop's handles that were made (a made handle has its loop
 * set; s was zeroed first) and lets the loop finish closing them. */
static void close_handles(server *s) {
  uv_handle_t *hs[] = {(uv_handle_t *)&s->mhd_poll,       (uv_handle_t *)&s->mhd_timer,
                       (uv_handle_t *)&s->sweep_timer,    (uv_handle_t *)&s->done_async,
                       (uv_handle_t *)&s->sig_term,       (uv_handle_t *)&s->sig_int,
                       (uv_handle_t *)&s->sig_hup,        (uv_handle_t *)&s->poll_timer,
                       (uv_handle_t *)&s->watchdog_timer, (uv_handle_t *)&s->watch_poll,
                       (uv_handle_t *)&s->watch_timer};
  for (size_t i = 0; i < sizeof hs / sizeof *hs; i++)
    if (hs[i]->loop && !uv_is_closing(hs[i])) uv_close(hs[i], close_cb);
  uv_run(s->loop, UV_RUN_NOWAIT);
}

static void free_tls(server *s) {
  if (s->tls_key_pem) OPENSSL_cleanse(s->tls_key_pem, strlen(s->tls_key_pem));
  tl_free(s->tls_key_pem);
  tl_free(s->tls_cert_pem);
  s->tls_key_pem = s->tls_cert_pem = NULL;
}

static void start_timers_and_signals(server *s) {
  uv_timer_init(s->loop, &s->sweep_timer);
  s->sweep_timer.data = s;
  uv_timer_start(&s->sweep_timer, on_sweep, 10, 10);
  uv_signal_init(s->loop, &s->sig_term);
  uv_signal_init(s->loop, &s->sig_int);
  uv_signal_init(s->loop, &s->sig_hup);
  s->sig_term.data = s->sig_int.data = s->sig_hup.data = s;
  uv_signal_start(&s->sig_term, on_signal, SIGTERM);
  uv_signal_start(&s->sig_int, on_signal, SIGINT);
  uv_signal_start(&s->sig_hup, on_signal, SIGHUP);
  uv_timer_init(s->loop, &s->poll_timer);
  s->poll_timer.data = s;
  uint64_t poll_ms = watch_start(s); /* --repository-watch, --repository-poll-secs */
  if (poll_ms) uv_timer_start(&s->poll_timer, on_poll_timer, poll_ms, poll_ms);
  uv_timer_init(s->loop, &s->watchdog_timer);
  s->watchdog_timer.data = s;
  uint64_t wd = notify_watchdog_usec();
  if (wd) {
    uint64_t ms = wd / 2000 ? wd / 2000 : 1;
    uv_timer_start(&s->watchdog_timer, on_watchdog, ms, ms);
    log_info("systemd watchdog: WATCHDOG=1 every %llu ms", (unsigned long long)ms);
  }
}

int server_init(server *s, srv_config *cfg, ts_err *err) {
  memset(s, 0, sizeof *s);
  s->watch_fd = -1;
  s->cfg = cfg;
  s->loop = uv_default_loop();
  struct sockaddr_storage sa;
  int v6 = 0, port = 0;
  int rc = listen_addr(cfg, &sa, &v6, &port, err);
  if (rc) goto fail_addr;
  if ((rc = trace_start(cfg, err))) goto fail_addr;
  uv_mutex_init(&s->sync_mu);
  s->sync_mu_ready = 1;
  if (pool_create(&s->pool, (int)cfg->threads, (int)cfg->queue_depth)) {
    rc = ts_errf(err, TS_EINTERNAL, "cannot start the worker pool");
    goto fail_pool;
  }
  pool_set_default(s->pool);
  sched_init(s);
  if ((rc = batch_start(s, err))) goto fail_batch;
  if ((rc = repo_open(&s->repo, cfg->model_repository, (const char *const *)cfg->models, s->pool,
                      err)))
    goto fail_repo;
  repo_set_weights_load(
      s->repo, cfg->weights_load && strcmp(cfg->weights_load, "read") == 0 ? ST_READ : ST_MMAP);
  repo_set_fit_lock(s->repo, cfg->replica_id, cfg->fit_lock_lease_seconds * 1000);
  log_info("replica '%s'; fit lock lease %lld s", cfg->replica_id,
           (long long)cfg->fit_lock_lease_seconds);
  if ((rc = learn_create(&s->learn, s->repo, s->pool, err))) goto fail_keys;
  if (cfg->api_key_file) {
    if ((rc = auth_load(cfg->api_key_file, &s->keys, err))) goto fail_keys;
    log_info("%d API keys from %s", auth_count(s->keys), cfg->api_key_file);
  } else if (!is_loopback(&sa)) {
    log_warn(
        "*** serving %s WITHOUT credentials: anyone who can reach this address may infer, "
        "fit, load and unload models. Set --api-key-file (keys from tallyd --keygen). ***",
        cfg->listen);
  }
  if (cfg->tls_cert) {
    size_t n;
    if ((rc = fs_read_file(cfg->tls_cert, 1 << 20, &s->tls_cert_pem, &n, err)) ||
        (rc = fs_read_file(cfg->tls_key, 1 << 20, &s->tls_key_pem, &n, err)))
      goto fail_tls;
  }
  s->conn_limit = connection_limit(cfg);
  if ((rc = transport_start(s, &sa, v6, port, err))) goto fail_transport;
  start_timers_and_signals(s);
  s->started = 1;
  return 0;

fail_transport:
  close_handles(s); /* the transport's handles, when it made them */
  if (s->done_mu_ready) uv_mutex_destroy(&s->done_mu);
  s->done_mu_ready = 0;
fail_tls:
  free_tls(s);
  auth_free(s->keys);
  s->keys = NULL;
fail_keys:
  learn_free(s->learn);
  s->learn = NULL;
  repo_close(s->repo);
  s->repo = NULL;
fail_repo:
  batch_stop(s);
fail_batch:
  pool_destroy(s->pool);
  batch_free(s);
  s->pool = NULL;
fail_pool:
  trace_stop();
  uv_mutex_destroy(&s->sync_mu);
  s->sync_mu_ready = 0;
fail_addr:
  uv_loop_close(s->loop);
  return rc;
}

int server_run(server *s) {
  transport_run(s);
  uv_run(s->loop, UV_RUN_DEFAULT);
  return s->exit_code;
}

void server_free(server *s) {
  if (!s->started) return; /* never started, or server_init undid itself */
  s->started = 0;
  shutdown_now(s);
  close_handles(s);
  /* batches still waiting are queued; workers finish what they hold; their
   * results are dropped */
  batch_stop(s);
  pool_destroy(s->pool);
  s->pool = NULL;
  /* after the workers: a rescan adds watches through this descriptor */
  if (s->watch_fd >= 0) close(s->watch_fd);
  s->watch_fd = -1;
  batch_free(s);
  /* after the pool: a rescan still running re-arms its watches */
  if (s->watch_fd >= 0) close(s->watch_fd);
  s->watch_fd = -1;
  transport_drop_done(s);
  learn_free(s->learn); /* after the pool: no shadow answer or refit runs */
  s->learn = NULL;
  repo_close(s->repo);
  s->repo = NULL;
  auth_free(s->keys);
  s->keys = NULL;
  free_tls(s);
  trace_stop(); /* every request has completed: flush their spans */
  uv_mutex_destroy(&s->sync_mu);
  uv_mutex_destroy(&s->done_mu);
  uv_loop_close(s->loop);
}
