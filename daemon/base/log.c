/* log.c - text or JSON log lines (see log.h). */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static log_level g_level = LOG_INFO;
static int g_json;
static const char *names[] = {"debug", "info", "warn", "error"};

void log_set_level(log_level l) {
  g_level = l;
}
void log_set_json(int json) {
  g_json = json;
}

int log_level_from_name(const char *name, log_level *out) {
  for (int i = 0; i < 4; i++)
    if (strcmp(name, names[i]) == 0) {
      *out = (log_level)i;
      return 0;
    }
  if (strcmp(name, "warning") == 0) {
    *out = LOG_WARN;
    return 0;
  }
  return -1;
}

static void stamp(char *buf, size_t n) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  size_t o = strftime(buf, n, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(buf + o, n - o, ".%03ldZ", ts.tv_nsec / 1000000);
}

/* Escapes s into a JSON string body. */
static size_t json_esc(char *out, size_t n, const char *s) {
  size_t o = 0;
  for (; *s && o + 7 < n; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      out[o++] = '\\';
      out[o++] = (char)c;
    } else if (c < 0x20) {
      o += (size_t)snprintf(out + o, n - o, "\\u%04x", c);
    } else {
      out[o++] = (char)c;
    }
  }
  out[o] = 0;
  return o;
}

static void emit(const char *line, size_t len) {
  ssize_t r = write(2, line, len);
  (void)r;
}

void log_msg(log_level l, const char *fmt, ...) {
  if (l < g_level) return;
  char msg[2048], ts[40], line[4600];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  stamp(ts, sizeof ts);
  int n;
  if (g_json) {
    char esc[4200];
    json_esc(esc, sizeof esc, msg);
    n = snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"%s\"}\n", ts,
                 names[l], esc);
  } else {
    n = snprintf(line, sizeof line, "%s %-5s %s\n", ts, names[l], msg);
  }
  if (n > (int)sizeof line) n = sizeof line;
  emit(line, (size_t)n);
}

void log_request(const char *method, const char *path, int status, unsigned long long bytes,
                 double duration_ms, const char *request_id, const char *model) {
  if (LOG_INFO < g_level) return;
  char ts[40], line[3000], p[1100], rid[300];
  stamp(ts, sizeof ts);
  json_esc(p, sizeof p, path ? path : "");
  json_esc(rid, sizeof rid, request_id ? request_id : "");
  int n;
  if (g_json)
    n = snprintf(line, sizeof line,
                 "{\"ts\":\"%s\",\"level\":\"info\",\"msg\":\"request\",\"method\":\"%s\","
                 "\"path\":\"%s\",\"status\":%d,\"bytes\":%llu,\"duration_ms\":%.3f,"
                 "\"request_id\":\"%s\",\"model\":\"%s\"}\n",
                 ts, method, p, status, bytes, duration_ms, rid, model ? model : "");
  else
    n = snprintf(line, sizeof line, "%s info  %s %s %d %llu %.3fms id=%s\n", ts, method, p, status,
                 bytes, duration_ms, rid);
  if (n > (int)sizeof line) n = sizeof line;
  emit(line, (size_t)n);
}
