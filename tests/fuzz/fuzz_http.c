/* fuzz_http.c - libFuzzer target: the whole HTTP request path.
 *
 * A tallyd server (libmicrohttpd under libuv, the worker pool, a repository
 * with one small mlp model "m") runs in this process on a background thread,
 * listening on a loopback port the kernel picks. Each input is sent as raw
 * bytes over a fresh TCP connection, so coverage feedback reaches the
 * parser, the router, the handlers and the codec. Input byte 0 picks how the
 * client ends: odd, it half-closes after sending (the abort path); even, it
 * appends a health request as a sentinel and reads until the sentinel's
 * answer, a close, or 50 ms of silence. Every 64 inputs a fresh connection
 * must get 200 from /v2/health/live within 5 s: a wedged loop is a crash. */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "../../daemon/base/log.h"
#include "../../daemon/server/server.h"
#include "fuzz_common.h"

static server fuzz_srv;
static srv_config fuzz_cfg;
static int fuzz_http_port;

static void *fuzz_http_loop(void *arg) {
  (void)arg;
  server_run(&fuzz_srv);
  return NULL;
}

static void fuzz_http_start(void) {
  static int started;
  if (started) return;
  started = 1;
  signal(SIGPIPE, SIG_IGN);
  json_set_alloc_funcs(tl_malloc, tl_free);
  log_set_level(LOG_ERROR); /* a request line per input would drown the fuzzer's output */
  static char root[] = "/tmp/tallyd-fuzz-repo-XXXXXX";
  if (!mkdtemp(root)) abort();
  char path[512];
  snprintf(path, sizeof path, "%s/m", root);
  mkdir(path, 0755);
  snprintf(path, sizeof path, "%s/m/1", root);
  mkdir(path, 0755);
  snprintf(path, sizeof path, "%s/m/config.json", root);
  FILE *f = fopen(path, "w");
  if (!f) abort();
  fputs(fuzz_models[0].config, f);
  fclose(f);
  ts_err err = {0};
  st_writer *w = st_writer_new();
  snprintf(path, sizeof path, "%s/m/1/model.safetensors", root);
  if (!w || fuzz_weights_mlp(w, &err) || st_writer_save(w, path, &err)) fuzz_die("weights", &err);
  st_writer_free(w);
  char *argv[] = {"tallyd",      "--model-repository",
                  root,          "--listen",
                  "127.0.0.1:0", "--threads",
                  "2",           "--max-body-bytes",
                  "1048576",     "--request-timeout-ms",
                  "2000",        "--log-level",
                  "error",       NULL};
  cfg_defaults(&fuzz_cfg);
  if (cfg_parse(&fuzz_cfg, 13, argv, &err)) fuzz_die("flags", &err);
  if (server_init(&fuzz_srv, &fuzz_cfg, &err)) fuzz_die("server", &err);
  repo_sync(fuzz_srv.repo);
  fuzz_http_port = fuzz_srv.port;
  pthread_t t;
  if (pthread_create(&t, NULL, fuzz_http_loop, NULL)) abort();
  pthread_detach(t);
}

static int fuzz_http_connect(void) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) abort();
  struct sockaddr_in a = {.sin_family = AF_INET,
                          .sin_port = htons((uint16_t)fuzz_http_port),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    fprintf(stderr, "fuzz_http: connect: %s\n", strerror(errno));
    abort();
  }
  return fd;
}

static void fuzz_http_send(int fd, const void *p, size_t n) {
  const char *c = p;
  while (n) {
    ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
    if (k <= 0) return; /* the server may close early (413, bad request) */
    c += k;
    n -= (size_t)k;
  }
}

/* Reads until `until` ends the data, the peer closes, or idle_ms of silence.
 * Returns the bytes read (kept in buf, up to cap). */
static size_t fuzz_http_read(int fd, char *buf, size_t cap, const char *until, int idle_ms) {
  size_t len = 0;
  for (;;) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, idle_ms) <= 0) break;
    char tmp[16384];
    ssize_t k = recv(fd, tmp, sizeof tmp, 0);
    if (k <= 0) break;
    size_t keep = (size_t)k < cap - len ? (size_t)k : cap - len;
    memcpy(buf + len, tmp, keep);
    len += keep;
    if (until && len >= strlen(until) &&
        memcmp(buf + len - strlen(until), until, strlen(until)) == 0)
      break;
    if (len == cap) len = 0; /* only the tail matters */
  }
  return len;
}

static const char fuzz_http_sentinel[] = "GET /v2/health/live HTTP/1.1\r\nHost: fuzz\r\n\r\n";

static void fuzz_http_alive(void) {
  int fd = fuzz_http_connect();
  fuzz_http_send(fd, fuzz_http_sentinel, sizeof fuzz_http_sentinel - 1);
  char buf[4096];
  size_t n = fuzz_http_read(fd, buf, sizeof buf - 1, "{\"live\":true}", 5000);
  buf[n] = 0;
  close(fd);
  if (!strstr(buf, "200 OK")) {
    fprintf(stderr, "fuzz_http: the daemon stopped answering /v2/health/live\n");
    abort();
  }
}

int FUZZ_ENTRY(const uint8_t *data, size_t size);
int FUZZ_ENTRY(const uint8_t *data, size_t size) {
  static unsigned long runs;
  if (size < 1) return 0;
  fuzz_http_start();
  int fd = fuzz_http_connect();
  fuzz_http_send(fd, data + 1, size - 1);
  char buf[65536];
  if (data[0] & 1) {
    shutdown(fd, SHUT_WR);
    fuzz_http_read(fd, buf, sizeof buf, NULL, 50);
  } else {
    fuzz_http_send(fd, fuzz_http_sentinel, sizeof fuzz_http_sentinel - 1);
    fuzz_http_read(fd, buf, sizeof buf, "{\"live\":true}", 50);
  }
  close(fd);
  if (++runs % 64 == 0) fuzz_http_alive();
  return 0;
}
