/* mhd_baseline.c - the yardstick servers that tallyd's HTTP speed is measured
 * against, built so bench/run.sh can measure them in the same run as tallyd: plain
 * libmicrohttpd with a pool of internal threads (epoll) answering GET with
 * 16 bytes, and POST by parsing the body with jansson and answering a small
 * JSON. Usage: mhd_baseline PORT [THREADS] */
#include <jansson.h>
#include <microhttpd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct body {
  char *p;
  size_t n;
} body;

static enum MHD_Result on_access(void *cls, struct MHD_Connection *c, const char *url,
                                 const char *method, const char *version, const char *data,
                                 size_t *size, void **con_cls) {
  (void)cls;
  (void)url;
  (void)version;
  body *b = *con_cls;
  if (!b) { /* first call: state only, so keep-alive survives */
    *con_cls = calloc(1, sizeof(body));
    return *con_cls ? MHD_YES : MHD_NO;
  }
  if (*size) {
    b->p = realloc(b->p, b->n + *size + 1);
    memcpy(b->p + b->n, data, *size);
    b->n += *size;
    *size = 0;
    return MHD_YES;
  }
  static char get_answer[] = "{\"live\": true}\n ";
  struct MHD_Response *r;
  if (strcmp(method, "POST") == 0) {
    json_t *j = json_loadb(b->p ? b->p : "", b->n, 0, NULL);
    char *out = json_dumps(j ? j : json_null(), JSON_COMPACT);
    json_decref(j);
    r = MHD_create_response_from_buffer(strlen(out), out, MHD_RESPMEM_MUST_FREE);
  } else {
    r = MHD_create_response_from_buffer(16, get_answer, MHD_RESPMEM_PERSISTENT);
  }
  MHD_add_response_header(r, "Content-Type", "application/json");
  enum MHD_Result ret = MHD_queue_response(c, 200, r);
  MHD_destroy_response(r);
  return ret;
}

static void on_done(void *cls, struct MHD_Connection *c, void **con_cls,
                    enum MHD_RequestTerminationCode toe) {
  (void)cls;
  (void)c;
  (void)toe;
  body *b = *con_cls;
  if (b) free(b->p);
  free(b);
  *con_cls = NULL;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: mhd_baseline PORT [THREADS]\n");
    return 2;
  }
  unsigned threads = argc > 2 ? (unsigned)atoi(argv[2]) : 2;
  struct MHD_Daemon *d =
      MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, (uint16_t)atoi(argv[1]),
                       NULL, NULL, on_access, NULL, MHD_OPTION_THREAD_POOL_SIZE, threads,
                       MHD_OPTION_NOTIFY_COMPLETED, on_done, NULL, MHD_OPTION_END);
  if (!d) {
    perror("MHD_start_daemon");
    return 1;
  }
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGTERM);
  sigaddset(&s, SIGINT);
  sigprocmask(SIG_BLOCK, &s, NULL);
  int sig;
  sigwait(&s, &sig);
  MHD_stop_daemon(d);
  return 0;
}
