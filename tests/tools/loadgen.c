/* loadgen.c - a small HTTP/1.1 load generator for soak tests.
 *
 *   loadgen --port P [--host 127.0.0.1] --mix FILE --requests N --connections C
 *
 * Sends N requests over C keep-alive connections (one thread, poll), each the
 * next entry of the mix file taken round-robin, and counts answers by status.
 * Mix file: entries of "<expect> <length>\n<length raw request bytes>\n", where
 * <expect> is the status class the request should get (2 or 4). A connection
 * that the server closes ("Connection: close" or EOF between requests) is
 * reopened; one closed or reset in the middle of an answer counts as a
 * transport error. Prints one line of counts, throughput and the p50/p99 of
 * the answered requests' latencies (from the request's first byte sent to
 * its answer's last byte read), and exits 1 on any 5xx or transport error,
 * so that a soak script only has to check the exit code. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct entry {
  int expect;
  char *data;
  size_t len;
} entry;

typedef struct conn {
  int fd;
  int busy; /* a request is out */
  int entry;
  double t_start;
  size_t sent;
  char *buf;
  size_t len, cap;
} conn;

static entry *mix;
static int n_mix;
static struct sockaddr_in addr;
static long long by_class[6], mismatched, transport_errors, reconnects;

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *m) {
  perror(m);
  exit(2);
}

static void load_mix(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) die(path);
  int cap = 0;
  for (;;) {
    int expect;
    size_t len;
    if (fscanf(f, "%d %zu", &expect, &len) != 2) break;
    if (fgetc(f) != '\n') break;
    if (n_mix == cap) {
      cap = cap ? cap * 2 : 64;
      mix = realloc(mix, sizeof *mix * (size_t)cap);
      if (!mix) die("realloc");
    }
    entry *e = &mix[n_mix++];
    e->expect = expect;
    e->len = len;
    e->data = malloc(len);
    if (!e->data || fread(e->data, 1, len, f) != len) die("mix entry");
    fgetc(f); /* the newline after the bytes */
  }
  fclose(f);
  if (!n_mix) {
    fprintf(stderr, "loadgen: %s holds no entries\n", path);
    exit(2);
  }
}

static void conn_open(conn *c) {
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) die("socket");
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0 && errno != EINPROGRESS)
    die("connect");
  c->busy = 0;
  c->len = 0;
}

static void conn_reopen(conn *c) {
  close(c->fd);
  reconnects++;
  conn_open(c);
}

/* A whole answer in c->buf: returns its length, 0 if incomplete; sets
 * *status and *close_after. */
static size_t answer_len(conn *c, int *status, int *close_after) {
  char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
  if (!end) return 0;
  size_t head = (size_t)(end - c->buf) + 4;
  if (c->len < 12 || sscanf(c->buf, "HTTP/1.%*d %d", status) != 1) return (size_t)-1;
  size_t cl = 0;
  *close_after = 0;
  for (char *p = c->buf; p < end; p = strstr(p, "\r\n") + 2) {
    if (strncasecmp(p, "Content-Length:", 15) == 0) cl = strtoull(p + 15, NULL, 10);
    if (strncasecmp(p, "Connection: close", 17) == 0) *close_after = 1;
  }
  return c->len >= head + cl ? head + cl : 0;
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1", *mix_path = NULL;
  int port = 0, nconn = 16;
  long long total = 1000;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--host"))
      host = argv[i + 1];
    else if (!strcmp(argv[i], "--port"))
      port = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--mix"))
      mix_path = argv[i + 1];
    else if (!strcmp(argv[i], "--requests"))
      total = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--connections"))
      nconn = atoi(argv[i + 1]);
    else {
      fprintf(stderr, "loadgen: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (!port || !mix_path || nconn < 1) {
    fprintf(stderr,
            "usage: loadgen --port P --mix FILE [--requests N] [--connections C] [--host H]\n");
    return 2;
  }
  load_mix(mix_path);
  addr.sin_family = AF_INET;
  addr.sin_port = htons((uint16_t)port);
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("host");
  conn *cs = calloc((size_t)nconn, sizeof *cs);
  struct pollfd *pf = calloc((size_t)nconn, sizeof *pf);
  if (!cs || !pf) die("calloc");
  for (int i = 0; i < nconn; i++) conn_open(&cs[i]);
  double *lat = calloc((size_t)(total > 0 ? total : 1), sizeof *lat);
  if (!lat) die("calloc");
  long long issued = 0, done = 0, nlat = 0;
  double t0 = now();
  while (done < total) {
    for (int i = 0; i < nconn; i++) {
      conn *c = &cs[i];
      if (!c->busy && issued < total) {
        c->busy = 1;
        c->entry = (int)(issued++ % n_mix);
        c->t_start = now();
        c->sent = 0;
        c->len = 0;
      }
      pf[i].fd = c->fd;
      pf[i].events = c->busy ? (c->sent < mix[c->entry].len ? POLLOUT : POLLIN) : 0;
      pf[i].revents = 0;
    }
    if (poll(pf, (nfds_t)nconn, 10000) <= 0) {
      fprintf(stderr, "loadgen: no progress in 10 s\n");
      transport_errors++;
      break;
    }
    for (int i = 0; i < nconn; i++) {
      conn *c = &cs[i];
      if (!pf[i].revents || !c->busy) continue;
      entry *e = &mix[c->entry];
      if (c->sent < e->len) {
        ssize_t k = send(c->fd, e->data + c->sent, e->len - c->sent, MSG_NOSIGNAL);
        if (k > 0)
          c->sent += (size_t)k;
        else if (k < 0 && errno != EAGAIN) {
          /* closed before this request was taken: send it again */
          conn_reopen(c);
          issued--;
        }
        continue;
      }
      if (c->len + 65536 > c->cap) {
        c->cap = c->cap ? c->cap * 2 : 131072;
        c->buf = realloc(c->buf, c->cap);
        if (!c->buf) die("realloc");
      }
      ssize_t k = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
      if (k < 0 && errno == EAGAIN) continue;
      if (k <= 0) {
        if (c->len == 0) { /* keep-alive closed as we sent: not accepted */
          conn_reopen(c);
          issued--;
          continue;
        }
        transport_errors++;
        done++;
        conn_reopen(c);
        continue;
      }
      c->len += (size_t)k;
      int status = 0, close_after = 0;
      size_t n = answer_len(c, &status, &close_after);
      if (n == 0) continue;
      if (n == (size_t)-1) {
        transport_errors++;
        done++;
        conn_reopen(c);
        continue;
      }
      done++;
      if (nlat < total) lat[nlat++] = now() - c->t_start;
      int cls = status / 100;
      by_class[cls >= 1 && cls <= 5 ? cls : 0]++;
      if (cls != e->expect) mismatched++;
      c->busy = 0;
      if (close_after) conn_reopen(c);
    }
  }
  double dt = now() - t0;
  qsort(lat, (size_t)nlat, sizeof *lat, cmp_double);
  printf(
      "requests %lld  2xx %lld  4xx %lld  5xx %lld  other %lld  unexpected-class %lld  "
      "transport-errors %lld  reconnects %lld  %.1f s  %.0f req/s  p50 %.3f ms  p99 %.3f ms\n",
      done, by_class[2], by_class[4], by_class[5], by_class[0] + by_class[1] + by_class[3],
      mismatched, transport_errors, reconnects, dt, (double)done / dt,
      nlat ? 1e3 * lat[nlat / 2] : 0.0, nlat ? 1e3 * lat[(nlat * 99) / 100] : 0.0);
  for (int i = 0; i < nconn; i++) close(cs[i].fd), free(cs[i].buf);
  free(lat);
  for (int i = 0; i < n_mix; i++) free(mix[i].data);
  free(mix);
  free(cs);
  free(pf);
  return by_class[5] || transport_errors ? 1 : 0;
}
