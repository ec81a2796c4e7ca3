/* metrics.c - counters, histograms and gauges behind GET /metrics (see
 * metrics.h), rendered in the Prometheus text exposition format 0.0.4.
 *
 * Invariant (under mu): every series is in exactly one hash chain and in
 * its family's list; series are never freed except by metrics_reset, so a
 * render can walk the lists while holding mu without copying them. */
#include "metrics.h"

#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "../base/cpu.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../models/live.h"
#include "trace.h"

enum {
  F_REQUESTS,
  F_DURATION,
  F_QWAIT,
  F_COMPUTE,
  F_FITS,
  F_FITS_FAILED,
  F_GEN_TOKENS,
  F_GEN_ACTIVE,
  F_GEN_TTFT,
  F_GEN_ITL,
  F_BATCHES,
  F_BATCH_REQUESTS,
  F_BATCH_ROWS,
  F_COUNT
};

/* Seconds, fit for sub-millisecond answers up to multi-second fits. */
static const double bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30};
#define NB (sizeof bounds / sizeof *bounds)

typedef struct series {
  struct series *hnext, *lnext;
  int family;
  int code;
  int64_t version;
  char model[128];
  char endpoint[32];
  uint64_t count;
  double sum;
  uint64_t buckets[NB]; /* not cumulative: buckets[i] counts bounds[i-1] < v <= bounds[i] */
} series;

#define NHASH 1024
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static series *table[NHASH];
static series *lists[F_COUNT];
static int nseries;
static int overflow_warned;

static atomic_llong sessions_open, sessions_bytes, generate_kv_bytes;
static atomic_int requests_inflight;

static const struct {
  const char *name, *type, *help;
} families[F_COUNT] = {
    [F_REQUESTS] = {"tallyd_requests_total", "counter",
                    "HTTP requests answered, by model, served version, endpoint and status code"},
    [F_DURATION] = {"tallyd_request_duration_seconds", "histogram",
                    "time from a request's first byte to its answer"},
    [F_QWAIT] = {"tallyd_queue_wait_seconds", "histogram",
                 "time a request waited in the work queue before a worker took it"},
    [F_COMPUTE] = {"tallyd_compute_seconds", "histogram",
                   "time a worker spent on a request (decode, compute, encode)"},
    [F_FITS] = {"tallyd_fits_total", "counter", "fits and calibrations finished, by model"},
    [F_FITS_FAILED] = {"tallyd_fits_failed_total", "counter",
                       "fits and calibrations that failed (no new version), by model"},
    [F_GEN_TOKENS] = {"tallyd_generate_tokens_total", "counter",
                      "tokens of generations, by model and type (prompt or completion)"},
    [F_GEN_ACTIVE] = {"tallyd_generate_sequences_active", "gauge",
                      "generations submitted and not yet finished, by model"},
    [F_GEN_TTFT] = {"tallyd_generate_time_to_first_token_seconds", "histogram",
                    "time from a generation's submission to its first token"},
    [F_GEN_ITL] = {"tallyd_generate_inter_token_seconds", "histogram",
                   "time between consecutive tokens of a generation"},
    [F_BATCHES] = {"tallyd_batches_total", "counter",
                   "joint calls the dynamic batcher ran, by model (one request alone counts too)"},
    [F_BATCH_REQUESTS] = {"tallyd_batched_requests_total", "counter",
                          "requests the dynamic batcher ran, by model (over tallyd_batches_total: "
                          "the mean batch)"},
    [F_BATCH_ROWS] = {"tallyd_batched_rows_total", "counter",
                      "rows of the requests the dynamic batcher ran, by model"},
};

static uint32_t hash_key(int family, const char *model, int64_t version, const char *endpoint,
                         int code) {
  uint32_t h = 2166136261u;
#define MIX(b) (h = (h ^ (uint8_t)(b)) * 16777619u)
  MIX(family);
  for (const char *p = model; *p; p++) MIX(*p);
  MIX(0);
  for (int i = 0; i < 8; i++) MIX(version >> (8 * i));
  for (const char *p = endpoint; *p; p++) MIX(*p);
  MIX(code);
  MIX(code >> 8);
#undef MIX
  return h % NHASH;
}

/* Finds or creates a series; NULL when out of memory. Called with mu held. */
static series *get(int family, const char *model, int64_t version, const char *endpoint, int code) {
  if (!model) model = "";
  if (!endpoint) endpoint = "";
  if (strlen(model) >= sizeof((series *)0)->model) model = "";
  for (int pass = 0; pass < 2; pass++) {
    uint32_t h = hash_key(family, model, version, endpoint, code);
    for (series *s = table[h]; s; s = s->hnext)
      if (s->family == family && s->code == code && s->version == version &&
          strcmp(s->model, model) == 0 && strcmp(s->endpoint, endpoint) == 0)
        return s;
    if (nseries < METRICS_MAX_SERIES) {
      series *s = tl_calloc(1, sizeof *s);
      if (!s) return NULL;
      s->family = family;
      s->code = code;
      s->version = version;
      snprintf(s->model, sizeof s->model, "%s", model);
      snprintf(s->endpoint, sizeof s->endpoint, "%s", endpoint);
      s->hnext = table[h];
      table[h] = s;
      s->lnext = lists[family];
      lists[family] = s;
      nseries++;
      return s;
    }
    /* full: fold into the series without model and version */
    if (!overflow_warned) {
      overflow_warned = 1;
      log_warn("metrics: %d label sets; further models are counted with model=\"\"", nseries);
    }
    model = "";
    version = 0;
  }
  return NULL;
}

static void observe(series *s, double v) {
  if (!s) return;
  s->count++;
  s->sum += v;
  size_t i = 0;
  while (i < NB && v > bounds[i]) i++;
  if (i < NB) s->buckets[i]++;
}

void metrics_request(const char *model, int64_t version, const char *endpoint, int code,
                     double seconds) {
  pthread_mutex_lock(&mu);
  series *c = get(F_REQUESTS, model, version, endpoint, code);
  if (c) c->count++;
  observe(get(F_DURATION, model, 0, endpoint, 0), seconds);
  pthread_mutex_unlock(&mu);
}

void metrics_job(const char *model, const char *endpoint, double queue_wait, double compute) {
  if (queue_wait < 0) queue_wait = 0;
  if (compute < 0) compute = 0;
  pthread_mutex_lock(&mu);
  observe(get(F_QWAIT, model, 0, endpoint, 0), queue_wait);
  observe(get(F_COMPUTE, model, 0, endpoint, 0), compute);
  pthread_mutex_unlock(&mu);
}

void metrics_fit(const char *model, int ok) {
  pthread_mutex_lock(&mu);
  series *s = get(F_FITS, model, 0, NULL, 0);
  if (s) s->count++;
  if (!ok && (s = get(F_FITS_FAILED, model, 0, NULL, 0))) s->count++;
  pthread_mutex_unlock(&mu);
}

void metrics_batch(const char *model, int requests, int64_t rows) {
  pthread_mutex_lock(&mu);
  series *s = get(F_BATCHES, model, 0, NULL, 0);
  if (s) s->count++;
  if ((s = get(F_BATCH_REQUESTS, model, 0, NULL, 0))) s->count += (uint64_t)requests;
  if ((s = get(F_BATCH_ROWS, model, 0, NULL, 0))) s->count += (uint64_t)rows;
  pthread_mutex_unlock(&mu);
}

void metrics_inflight_add(int delta) {
  atomic_fetch_add(&requests_inflight, delta);
}

void metrics_set_sessions(int64_t n, int64_t bytes) {
  atomic_store(&sessions_open, n);
  atomic_store(&sessions_bytes, bytes);
}

uint64_t metrics_session_bytes(void) {
  return (uint64_t)atomic_load(&sessions_bytes);
}
void metrics_set_generate_kv(int64_t bytes) {
  atomic_store(&generate_kv_bytes, bytes);
}

void metrics_generate_tokens(const char *model, int64_t prompt, int64_t completion) {
  pthread_mutex_lock(&mu);
  series *p = prompt ? get(F_GEN_TOKENS, model, 0, "prompt", 0) : NULL;
  if (p) p->count += (uint64_t)prompt;
  series *c = completion ? get(F_GEN_TOKENS, model, 0, "completion", 0) : NULL;
  if (c) c->count += (uint64_t)completion;
  pthread_mutex_unlock(&mu);
}

void metrics_generate_active(const char *model, int delta) {
  pthread_mutex_lock(&mu);
  series *s = get(F_GEN_ACTIVE, model, 0, "", 0);
  if (s) s->sum += delta;
  pthread_mutex_unlock(&mu);
}

void metrics_generate_first_token(const char *model, double seconds) {
  pthread_mutex_lock(&mu);
  observe(get(F_GEN_TTFT, model, 0, "", 0), seconds);
  pthread_mutex_unlock(&mu);
}

void metrics_generate_inter_token(const char *model, double seconds) {
  pthread_mutex_lock(&mu);
  observe(get(F_GEN_ITL, model, 0, "", 0), seconds);
  pthread_mutex_unlock(&mu);
}

void metrics_reset(void) {
  pthread_mutex_lock(&mu);
  for (int f = 0; f < F_COUNT; f++) {
    for (series *s = lists[f]; s;) {
      series *n = s->lnext;
      tl_free(s);
      s = n;
    }
    lists[f] = NULL;
  }
  memset(table, 0, sizeof table);
  nseries = 0;
  overflow_warned = 0;
  pthread_mutex_unlock(&mu);
}

/* ---- rendering ----------------------------------------------------------- */

/* Label values need \\, \" and \n escaped (exposition format). */
static void add_label(sbuf *b, const char *name, const char *v, int first) {
  sbuf_printf(b, "%s%s=\"", first ? "" : ",", name);
  for (const char *p = v; *p; p++) {
    if (*p == '\\')
      sbuf_adds(b, "\\\\");
    else if (*p == '"')
      sbuf_adds(b, "\\\"");
    else if (*p == '\n')
      sbuf_adds(b, "\\n");
    else
      sbuf_add(b, p, 1);
  }
  sbuf_adds(b, "\"");
}

static void add_version_label(sbuf *b, int64_t version) {
  char v[24] = "";
  if (version > 0) snprintf(v, sizeof v, "%lld", (long long)version);
  add_label(b, "version", v, 0);
}

static void header(sbuf *b, const char *name, const char *type, const char *help) {
  sbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void render_family(sbuf *b, int f) {
  header(b, families[f].name, families[f].type, families[f].help);
  for (series *s = lists[f]; s; s = s->lnext) {
    if (f == F_REQUESTS) {
      sbuf_printf(b, "%s{", families[f].name);
      add_label(b, "model", s->model, 1);
      add_version_label(b, s->version);
      add_label(b, "endpoint", s->endpoint, 0);
      sbuf_printf(b, ",code=\"%d\"} %llu\n", s->code, (unsigned long long)s->count);
    } else if (f == F_GEN_TOKENS) {
      sbuf_printf(b, "%s{", families[f].name);
      add_label(b, "model", s->model, 1);
      add_label(b, "type", s->endpoint, 0);
      sbuf_printf(b, "} %llu\n", (unsigned long long)s->count);
    } else if (f == F_GEN_ACTIVE) {
      sbuf_printf(b, "%s{", families[f].name);
      add_label(b, "model", s->model, 1);
      sbuf_printf(b, "} %lld\n", (long long)s->sum);
    } else if (f == F_FITS || f == F_FITS_FAILED || f == F_BATCHES || f == F_BATCH_REQUESTS ||
               f == F_BATCH_ROWS) {
      sbuf_printf(b, "%s{", families[f].name);
      add_label(b, "model", s->model, 1);
      sbuf_printf(b, "} %llu\n", (unsigned long long)s->count);
    } else {
      const char *base = families[f].name;
      uint64_t cum = 0;
      for (size_t i = 0; i <= NB; i++) {
        cum += i < NB ? s->buckets[i] : 0;
        sbuf_printf(b, "%s_bucket{", base);
        add_label(b, "model", s->model, 1);
        if (s->endpoint[0]) add_label(b, "endpoint", s->endpoint, 0);
        if (i < NB)
          sbuf_printf(b, ",le=\"%g\"} %llu\n", bounds[i], (unsigned long long)cum);
        else
          sbuf_printf(b, ",le=\"+Inf\"} %llu\n", (unsigned long long)s->count);
      }
      sbuf_printf(b, "%s_sum{", base);
      add_label(b, "model", s->model, 1);
      if (s->endpoint[0]) add_label(b, "endpoint", s->endpoint, 0);
      sbuf_printf(b, "} %.9g\n", s->sum);
      sbuf_printf(b, "%s_count{", base);
      add_label(b, "model", s->model, 1);
      if (s->endpoint[0]) add_label(b, "endpoint", s->endpoint, 0);
      sbuf_printf(b, "} %llu\n", (unsigned long long)s->count);
    }
  }
}

static void ready_line(void *data, const char *model, int64_t version, int ready) {
  sbuf *b = data;
  sbuf_adds(b, "tallyd_model_ready{");
  add_label(b, "model", model, 1);
  add_version_label(b, version);
  sbuf_printf(b, "} %d\n", ready ? 1 : 0);
}

/* Seconds since the epoch at which this process started (from /proc). */
static double start_time(void) {
  static double cached = -1;
  if (cached >= 0) return cached;
  cached = 0;
  FILE *f = fopen("/proc/self/stat", "r");
  char buf[1024];
  unsigned long long ticks = 0, btime = 0;
  if (f) {
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    /* field 22 (starttime) counts from the ')' that ends field 2 */
    char *p = strrchr(buf, ')');
    for (int field = 2; p && field < 22; field++) p = strchr(p + 1, ' ');
    if (p) ticks = strtoull(p + 1, NULL, 10);
  }
  f = fopen("/proc/stat", "r");
  if (f) {
    char line[256];
    while (fgets(line, sizeof line, f))
      if (strncmp(line, "btime ", 6) == 0) btime = strtoull(line + 6, NULL, 10);
    fclose(f);
  }
  long hz = sysconf(_SC_CLK_TCK);
  if (btime && hz > 0) cached = (double)btime + (double)ticks / (double)hz;
  return cached;
}

static void render_process(sbuf *b) {
  long page = sysconf(_SC_PAGESIZE);
  unsigned long long vsz = 0, rss = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    if (fscanf(f, "%llu %llu", &vsz, &rss) != 2) vsz = rss = 0;
    fclose(f);
  }
  header(b, "process_resident_memory_bytes", "gauge", "resident memory size in bytes");
  sbuf_printf(b, "process_resident_memory_bytes %llu\n", rss * (unsigned long long)page);
  header(b, "process_virtual_memory_bytes", "gauge", "virtual memory size in bytes");
  sbuf_printf(b, "process_virtual_memory_bytes %llu\n", vsz * (unsigned long long)page);
  struct rusage ru;
  double cpu = 0;
  if (getrusage(RUSAGE_SELF, &ru) == 0)
    cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
          (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
  header(b, "process_cpu_seconds_total", "counter", "user and system CPU time spent in seconds");
  sbuf_printf(b, "process_cpu_seconds_total %.6f\n", cpu);
  int fds = 0;
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    struct dirent *e;
    while ((e = readdir(d)))
      if (e->d_name[0] != '.') fds++;
    closedir(d);
    fds--; /* the descriptor of the listing itself */
  }
  header(b, "process_open_fds", "gauge", "number of open file descriptors");
  sbuf_printf(b, "process_open_fds %d\n", fds < 0 ? 0 : fds);
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    header(b, "process_max_fds", "gauge", "maximum number of open file descriptors");
    sbuf_printf(b, "process_max_fds %llu\n", (unsigned long long)rl.rlim_cur);
  }
  double st = start_time();
  if (st > 0) {
    header(b, "process_start_time_seconds", "gauge",
           "start time of the process since unix epoch in seconds");
    sbuf_printf(b, "process_start_time_seconds %.2f\n", st);
  }
}

void metrics_render(sbuf *b, repo_t *repo, int queued, int jobs_inflight) {
  header(b, "tallyd_build_info", "gauge", "1, labelled with the version, SIMD path and CUDA build");
  sbuf_printf(b, "tallyd_build_info{version=\"%s\",simd=\"%s\",cuda=\"%s\"} 1\n", TALLYD_VERSION,
              cpu_path_name(cpu_best_path()),
#ifdef TALLYD_CUDA
              "yes"
#else
              "no"
#endif
  );
  header(b, "tallyd_queue_depth", "gauge", "requests waiting in the work queue for a worker");
  sbuf_printf(b, "tallyd_queue_depth %d\n", queued);
  header(b, "tallyd_requests_in_flight", "gauge", "HTTP requests being read, computed or answered");
  sbuf_printf(b, "tallyd_requests_in_flight %d\n", atomic_load(&requests_inflight));
  header(b, "tallyd_jobs_in_flight", "gauge", "requests handed to workers and not yet answered");
  sbuf_printf(b, "tallyd_jobs_in_flight %d\n", jobs_inflight);
  header(b, "tallyd_sessions_open", "gauge", "open KV-cache sessions");
  sbuf_printf(b, "tallyd_sessions_open %lld\n", (long long)atomic_load(&sessions_open));
  header(b, "tallyd_kv_cache_bytes", "gauge",
         "memory held by KV caches: open sessions and running generations");
  sbuf_printf(b, "tallyd_kv_cache_bytes %lld\n",
              (long long)(atomic_load(&sessions_bytes) + atomic_load(&generate_kv_bytes)));
  header(b, "tallyd_model_ready", "gauge",
         "1 when the version is loaded and served, 0 when it failed to load");
  if (repo) repo_foreach_version(repo, ready_line, b);
  pthread_mutex_lock(&mu);
  for (int f = 0; f < F_COUNT; f++) render_family(b, f);
  pthread_mutex_unlock(&mu);
  md_live_metrics(b); /* quantile models' rolling scores (models/live.h) */
  render_process(b);
  trace_render_metrics(b);
}
