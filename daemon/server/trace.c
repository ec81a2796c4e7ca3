/* trace.c - W3C Trace Context parsing, span records and the OTLP/HTTP JSON
 * exporter (see trace.h).
 *
 * The request path's whole cost when tracing is on: a header parse, a few
 * random bytes (base/randid.h's per-thread block), one calloc for a sampled
 * request, clock reads at the phase boundaries, and a push under a mutex
 * that the exporter holds only to move ring indexes. Encoding and the HTTP
 * transfer happen on the exporter thread. */
#include "trace.h"

#include <curl/curl.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "../base/log.h"
#include "../base/mem.h"
#include "../base/randid.h"

/* ---- W3C Trace Context --------------------------------------------------- */

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1; /* uppercase is not HEXDIGLC */
}

static int parse_hex(const char *s, uint8_t *out, size_t n) {
  for (size_t i = 0; i < n; i++) {
    int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return -1;
    out[i] = (uint8_t)(hi << 4 | lo);
  }
  return 0;
}

static int all_zero(const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

int trace_parse_parent(const char *v, trace_ctx *out) {
  if (!v) return -1;
  size_t len = strlen(v);
  uint8_t ver;
  if (len < 55 || parse_hex(v, &ver, 1) || ver == 0xff) return -1;
  /* version 00 is exactly 55 characters; a later version may append
   * fields, each after a '-' */
  if (ver == 0 && len != 55) return -1;
  if (len > 55 && v[55] != '-') return -1;
  if (v[2] != '-' || v[35] != '-' || v[52] != '-') return -1;
  trace_ctx c;
  if (parse_hex(v + 3, c.trace_id, 16) || parse_hex(v + 36, c.parent_id, 8) ||
      parse_hex(v + 53, &c.flags, 1))
    return -1;
  if (all_zero(c.trace_id, 16) || all_zero(c.parent_id, 8)) return -1;
  *out = c;
  return 0;
}

/* key = simple-key / multi-tenant-key:
 *   simple-key = lcalpha 0*255( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
 *   multi-tenant-key = tenant-id "@" system-id
 *   tenant-id = ( lcalpha / DIGIT ) 0*240( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
 *   system-id = lcalpha 0*13( lcalpha / DIGIT / "_" / "-"/ "*" / "/" ) */
static int key_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '*' ||
         c == '/';
}

static int key_valid(const char *k, size_t n) {
  const char *at = memchr(k, '@', n);
  if (!at) {
    if (n < 1 || n > 256 || !(k[0] >= 'a' && k[0] <= 'z')) return 0;
    for (size_t i = 1; i < n; i++)
      if (!key_char(k[i])) return 0;
    return 1;
  }
  size_t tn = (size_t)(at - k), sn = n - tn - 1;
  if (tn < 1 || tn > 241 || sn < 1 || sn > 14) return 0;
  if (!((k[0] >= 'a' && k[0] <= 'z') || (k[0] >= '0' && k[0] <= '9'))) return 0;
  for (size_t i = 1; i < tn; i++)
    if (!key_char(k[i])) return 0;
  if (!(at[1] >= 'a' && at[1] <= 'z')) return 0;
  for (size_t i = 1; i < sn; i++)
    if (!key_char(at[1 + i])) return 0;
  return 1;
}

/* value = 0*255(chr) nblk-chr; chr = %x20 / nblk-chr;
 * nblk-chr = %x21-2B / %x2D-3C / %x3E-7E */
static int value_valid(const char *v, size_t n) {
  if (n < 1 || n > 256 || v[n - 1] == ' ') return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)v[i];
    if (c < 0x20 || c > 0x7e || c == ',' || c == '=') return 0;
  }
  return 1;
}

int trace_state_valid(const char *v) {
  if (!v) return 0;
  size_t len = strlen(v);
  if (len > TRACE_STATE_MAX) return 0;
  int members = 0;
  const char *keys[32];
  size_t key_len[32];
  for (const char *p = v; *p;) {
    const char *e = strchr(p, ',');
    if (!e) e = p + strlen(p);
    const char *a = p, *b = e;
    while (a < b && (*a == ' ' || *a == '\t')) a++;
    while (b > a && (b[-1] == ' ' || b[-1] == '\t')) b--;
    if (a < b) { /* empty list-members are allowed */
      const char *eq = memchr(a, '=', (size_t)(b - a));
      if (!eq || !key_valid(a, (size_t)(eq - a)) || !value_valid(eq + 1, (size_t)(b - eq - 1)))
        return 0;
      if (members == 32) return 0;
      for (int i = 0; i < members; i++) /* a key twice: invalid */
        if (key_len[i] == (size_t)(eq - a) && memcmp(keys[i], a, key_len[i]) == 0) return 0;
      keys[members] = a;
      key_len[members++] = (size_t)(eq - a);
    }
    p = *e ? e + 1 : e;
  }
  return 1;
}

void trace_hex(const uint8_t *p, size_t n, char *out) {
  static const char d[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = d[p[i] >> 4];
    out[2 * i + 1] = d[p[i] & 15];
  }
  out[2 * n] = 0;
}

void trace_format_parent(const uint8_t trace_id[16], const uint8_t span_id[8], int sampled,
                         char out[TRACE_HEADER_LEN]) {
  memcpy(out, "00-", 3);
  trace_hex(trace_id, 16, out + 3);
  out[35] = '-';
  trace_hex(span_id, 8, out + 36);
  out[52] = '-';
  out[53] = '0';
  out[54] = sampled ? '1' : '0';
  out[55] = 0;
}

/* ---- state ---------------------------------------------------------------- */

static struct {
  int on;
  uint64_t ratio_bound; /* sampled when the trace id's low 8 bytes are below; */
  int ratio_all;        /* ratio 1: every root */
  char *endpoint;
  long timeout_ms;
  size_t cap;
  trace_req **ring;
  size_t head, tail; /* under mu; tail - head records waiting */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t th;
  int stop, started;
  char instance[40];
  char host[128];
} T = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static atomic_ullong spans_exported, spans_failed, spans_dropped, exports_failed;

int trace_on(void) {
  return T.on;
}

/* Random bytes from the pooled generator; a counter should it fail (ids
 * must still differ). */
static void random_bytes(uint8_t *out, size_t n) {
  char hex[2 * 16 + 1];
  if (n <= 16 && rid_make(hex, sizeof hex, n, RID_HEX, RID_POOLED, NULL) == 0 &&
      parse_hex(hex, out, n) == 0)
    return;
  static atomic_ullong seq;
  unsigned long long x = atomic_fetch_add(&seq, 1) + 1;
  for (size_t i = 0; i < n; i++) out[i] = (uint8_t)(x >> (8 * (i % 8)));
  out[0] |= 1;
}

/* s, or its first n - 1 bytes, NUL-terminated, into out[n]; NULL as "" */
static void copy_cut(char *out, size_t n, const char *s) {
  size_t k = s ? strnlen(s, n - 1) : 0;
  memcpy(out, s ? s : "", k);
  out[k] = 0;
}

static void sink_hosted(md_span_sink *s, const char *role, const char *name, int depth, double t0,
                        double t1, int status) {
  trace_req *r = (trace_req *)s;
  int i = atomic_fetch_add(&r->n_hosted, 1);
  if (i >= TRACE_MAX_HOSTED) return;
  trace_hosted *h = &r->hosted[i];
  copy_cut(h->role, sizeof h->role, role);
  copy_cut(h->name, sizeof h->name, name);
  h->depth = depth;
  h->status = status;
  h->t0 = t0;
  h->t1 = t1;
  atomic_fetch_or_explicit(&r->hosted_ready, 1u << i, memory_order_release);
}

void trace_req_init(trace_req *r) {
  memset(r, 0, offsetof(trace_req, method));
  r->method[0] = r->route[0] = r->model[0] = r->request_id[0] = r->state[0] = 0;
  r->sink.hosted = sink_hosted;
  atomic_init(&r->refs, 1);
}

static int64_t wall_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

trace_req *trace_begin(const char *traceparent, const char *tracestate, double now,
                       char answer[TRACE_HEADER_LEN]) {
  answer[0] = 0;
  if (!T.on) return NULL;
  trace_ctx ctx;
  int has_parent = trace_parse_parent(traceparent, &ctx) == 0;
  int sampled;
  if (has_parent) {
    sampled = ctx.flags & 1;
  } else {
    random_bytes(ctx.trace_id, 16);
    ctx.flags = 0;
    uint64_t low = 0;
    for (int i = 8; i < 16; i++) low = low << 8 | ctx.trace_id[i];
    sampled = T.ratio_all || low < T.ratio_bound;
  }
  uint8_t span[8];
  random_bytes(span, 8);
  trace_format_parent(ctx.trace_id, span, sampled, answer);
  if (!sampled) return NULL;
  trace_req *r = tl_malloc(sizeof *r);
  if (!r) return NULL;
  trace_req_init(r);
  r->ctx = ctx;
  r->has_parent = has_parent;
  memcpy(r->span_id, span, 8);
  /* tracestate rides only with a valid traceparent */
  if (has_parent && tracestate && trace_state_valid(tracestate))
    snprintf(r->state, sizeof r->state, "%s", tracestate);
  r->t0 = now;
  r->wall0_ns = wall_ns();
  return r;
}

typedef struct seen_headers {
  const char *parent;
  int n_parent;
  char state[TRACE_STATE_MAX + 1];
  size_t state_len;
  int state_bad; /* the joined lines are over TRACE_STATE_MAX */
} seen_headers;

static enum MHD_Result header_seen(void *cls, enum MHD_ValueKind kind, const char *key,
                                   const char *value) {
  (void)kind;
  seen_headers *s = cls;
  if (strcasecmp(key, "traceparent") == 0) {
    s->parent = value;
    s->n_parent++;
  } else if (strcasecmp(key, "tracestate") == 0 && value) {
    /* several tracestate lines are one list (RFC 9110 5.3) */
    size_t n = strlen(value), sep = s->state_len ? 1 : 0;
    if (s->state_len + sep + n > TRACE_STATE_MAX) {
      s->state_bad = 1;
    } else {
      if (sep) s->state[s->state_len++] = ',';
      memcpy(s->state + s->state_len, value, n + 1);
      s->state_len += n;
    }
  }
  return MHD_YES;
}

trace_req *trace_begin_conn(struct MHD_Connection *conn, double now,
                            char answer[TRACE_HEADER_LEN]) {
  answer[0] = 0;
  if (!T.on) return NULL;
  seen_headers s = {0};
  MHD_get_connection_values(conn, MHD_HEADER_KIND, header_seen, &s);
  /* two traceparent headers cannot be told apart: both are ignored */
  return trace_begin(s.n_parent == 1 ? s.parent : NULL,
                     s.state_len && !s.state_bad ? s.state : NULL, now, answer);
}

void trace_set_phase(trace_req *r, trace_phase p, double t0, double t1) {
  if (!r || p >= TRP_COUNT || t0 <= 0 || t1 < t0) return;
  r->ph[p][0] = t0;
  r->ph[p][1] = t1;
}

void trace_job_times(trace_req *r, double t_submit, double t_start, double t_decoded,
                     double t_computed, double t_end) {
  if (!r || t_submit <= 0) return;
  if (t_start <= 0) return; /* never ran: the queue phase never ended */
  trace_set_phase(r, TRP_QUEUE, t_submit, t_start);
  if (t_decoded > 0) {
    trace_set_phase(r, TRP_DECODE, t_start, t_decoded);
    if (t_computed > 0) {
      trace_set_phase(r, TRP_COMPUTE, t_decoded, t_computed);
      trace_set_phase(r, TRP_ENCODE, t_computed, t_end);
    }
  } else if (t_end > 0) {
    trace_set_phase(r, TRP_COMPUTE, t_start, t_end);
  }
}

void trace_hold(trace_req *r) {
  if (r) atomic_fetch_add(&r->refs, 1);
}

void trace_release(trace_req *r) {
  if (r && atomic_fetch_sub(&r->refs, 1) == 1) tl_free(r);
}

size_t trace_span_count(const trace_req *r) {
  size_t n = 1;
  for (int p = 0; p < TRP_COUNT; p++)
    if (r->ph[p][0] > 0) n++;
  return n + (size_t)__builtin_popcount(atomic_load((atomic_uint *)&r->hosted_ready));
}

void trace_end(trace_req *r, const char *route, const char *method, const char *model,
               int64_t version, int status, const char *request_id, double now) {
  if (!r) return;
  r->t1 = now;
  copy_cut(r->route, sizeof r->route, route);
  copy_cut(r->method, sizeof r->method, method);
  copy_cut(r->model, sizeof r->model, model);
  copy_cut(r->request_id, sizeof r->request_id, request_id);
  r->version = version;
  r->status = status;
  int pushed = 0;
  pthread_mutex_lock(&T.mu);
  if (T.ring && !T.stop && T.tail - T.head < T.cap) {
    T.ring[T.tail++ % T.cap] = r;
    pushed = 1;
    if (T.tail - T.head == TRACE_EXPORT_BATCH) pthread_cond_signal(&T.cv);
  }
  pthread_mutex_unlock(&T.mu);
  if (!pushed) {
    atomic_fetch_add(&spans_dropped, trace_span_count(r));
    trace_release(r);
  }
}

/* ---- OTLP/HTTP JSON ------------------------------------------------------- */

/* The encoder writes through a plain pointer into space reserved once per
 * record (enc_bound): at full sampling it writes every span of every
 * request, and per-piece appends and printf were most of its cost. */
#define W(p, s) (memcpy((p), (s), sizeof(s) - 1), (p) + sizeof(s) - 1)

/* two digits a step: every span has two 19-digit times */
static char *w_int(char *p, long long v) {
  static const char pairs[201] =
      "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
      "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
      "8081828384858687888990919293949596979899";
  char d[24];
  int n = 0;
  unsigned long long u = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
  while (u >= 100) {
    unsigned k = (unsigned)(u % 100) * 2;
    u /= 100;
    d[sizeof d - 1 - n++] = pairs[k + 1];
    d[sizeof d - 1 - n++] = pairs[k];
  }
  if (u >= 10) {
    d[sizeof d - 1 - n++] = pairs[u * 2 + 1];
    d[sizeof d - 1 - n++] = pairs[u * 2];
  } else {
    d[sizeof d - 1 - n++] = (char)('0' + u);
  }
  if (v < 0) d[sizeof d - 1 - n++] = '-';
  memcpy(p, d + sizeof d - n, (size_t)n);
  return p + n;
}

static char *w_hex(char *p, const uint8_t *x, size_t n) {
  static const char d[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    *p++ = d[x[i] >> 4];
    *p++ = d[x[i] & 15];
  }
  return p;
}

/* s's characters, JSON-escaped, without quotes: at most 6 bytes each */
static char *w_esc(char *p, const char *s) {
  static const char d[] = "0123456789abcdef";
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c >= 0x20 && c != '"' && c != '\\') {
      *p++ = (char)c;
    } else if (c == '"' || c == '\\') {
      *p++ = '\\';
      *p++ = (char)c;
    } else {
      p = W(p, "\\u00");
      *p++ = d[c >> 4];
      *p++ = d[c & 15];
    }
  }
  return p;
}

static char *w_str(char *p, const char *s) {
  *p++ = '"';
  p = w_esc(p, s);
  *p++ = '"';
  return p;
}

/* ,"startTimeUnixNano":"<ns>","endTimeUnixNano":"<ns>" for md_now() times */
static char *w_times(char *p, const trace_req *r, double t0, double t1) {
  p = W(p, ",\"startTimeUnixNano\":\"");
  p = w_int(p, (long long)(r->wall0_ns + (int64_t)((t0 - r->t0) * 1e9)));
  p = W(p, "\",\"endTimeUnixNano\":\"");
  p = w_int(p, (long long)(r->wall0_ns + (int64_t)((t1 - r->t0) * 1e9)));
  *p++ = '"';
  return p;
}

static char *w_key(char *p, int *first, const char *k) {
  if (!*first) *p++ = ',';
  *first = 0;
  p = W(p, "{\"key\":\"");
  size_t n = strlen(k); /* keys are this file's literals */
  memcpy(p, k, n);
  return W(p + n, "\",\"value\":{");
}

static char *attr_str(char *p, int *first, const char *k, const char *v) {
  p = w_key(p, first, k);
  p = W(p, "\"stringValue\":");
  p = w_str(p, v);
  return W(p, "}}");
}

static char *attr_int(char *p, int *first, const char *k, long long v) {
  p = w_key(p, first, k);
  p = W(p, "\"intValue\":\"");
  p = w_int(p, v);
  return W(p, "\"}}");
}

static void attr_str_sb(sbuf *b, int *first, const char *k, const char *v) {
  if (sbuf_reserve(b, 128 + strlen(k) + 6 * strlen(v))) return;
  b->len = (size_t)(attr_str(b->data + b->len, first, k, v) - b->data);
}

static void attr_int_sb(sbuf *b, int *first, const char *k, long long v) {
  if (sbuf_reserve(b, 128 + strlen(k))) return;
  b->len = (size_t)(attr_int(b->data + b->len, first, k, v) - b->data);
}

/* A child's span id: a mix of the server span's id and the child's index,
 * distinct within the trace and never zero. */
static void child_id(const trace_req *r, int k, uint8_t out[8]) {
  uint64_t x = 0;
  for (int i = 0; i < 8; i++) x = x << 8 | r->span_id[i];
  x += (uint64_t)(k + 1) * 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  if (!x) x = (uint64_t)k + 1;
  for (int i = 7; i >= 0; i--, x >>= 8) out[i] = (uint8_t)x;
}

static const char *phase_name(int p) {
  switch (p) {
    case TRP_RECEIVE: return "receive";
    case TRP_QUEUE: return "queue";
    case TRP_DECODE: return "decode";
    case TRP_COMPUTE: return "compute";
    case TRP_ENCODE: return "encode";
    default: return "send";
  }
}

/* {"traceId":..,"spanId":..[,"parentSpanId":..],"name":"<name>[ <name2>]","kind":k */
static char *span_open(char *p, int *first_span, const uint8_t tid[16], const uint8_t id[8],
                       const uint8_t *parent, const char *name, const char *name2, int kind) {
  if (!*first_span) *p++ = ',';
  *first_span = 0;
  p = W(p, "{\"traceId\":\"");
  p = w_hex(p, tid, 16);
  p = W(p, "\",\"spanId\":\"");
  p = w_hex(p, id, 8);
  *p++ = '"';
  if (parent) {
    p = W(p, ",\"parentSpanId\":\"");
    p = w_hex(p, parent, 8);
    *p++ = '"';
  }
  p = W(p, ",\"name\":\"");
  p = w_esc(p, name);
  if (name2) {
    *p++ = ' ';
    p = w_esc(p, name2);
  }
  p = W(p, "\",\"kind\":");
  *p++ = (char)('0' + kind);
  return p;
}

/* Bytes encode_one may write for r: fixed parts plus every string at its
 * escaped worst (6 bytes a character). */
static size_t enc_bound(const trace_req *r, int nh) {
  size_t s = strlen(r->method) + strlen(r->route) + strlen(r->model) + strlen(r->request_id) +
             strlen(r->state);
  size_t n = 1024 + 12 * s; /* the name repeats method and route */
  n += (size_t)TRP_COUNT * 320;
  n += (size_t)nh * (640 + 12 * (sizeof r->hosted[0].role + sizeof r->hosted[0].name));
  return n;
}

static size_t encode_one(sbuf *b, int *first_span, const trace_req *r) {
  int nh = atomic_load((atomic_int *)&r->n_hosted);
  if (nh > TRACE_MAX_HOSTED) nh = TRACE_MAX_HOSTED;
  if (sbuf_reserve(b, enc_bound(r, nh))) return trace_span_count(r); /* b failed: counted */
  char *p = b->data + b->len;
  const uint8_t *tid = r->ctx.trace_id;
  size_t spans = 1;
  /* the server span: "<METHOD> <route>" */
  p = span_open(p, first_span, tid, r->span_id, r->has_parent ? r->ctx.parent_id : NULL,
                r->method[0] ? r->method : "HTTP", r->route[0] ? r->route : NULL, 2);
  if (r->state[0]) {
    p = W(p, ",\"traceState\":");
    p = w_str(p, r->state);
  }
  p = w_times(p, r, r->t0, r->t1 > r->t0 ? r->t1 : r->t0);
  p = W(p, ",\"attributes\":[");
  int f = 1;
  p = attr_str(p, &f, "http.request.method", r->method);
  if (r->route[0]) p = attr_str(p, &f, "http.route", r->route);
  p = attr_int(p, &f, "http.response.status_code", r->status);
  if (r->model[0]) p = attr_str(p, &f, "tallyd.model", r->model);
  if (r->version > 0) p = attr_int(p, &f, "tallyd.model.version", (long long)r->version);
  if (r->request_id[0]) p = attr_str(p, &f, "tallyd.request_id", r->request_id);
  *p++ = ']';
  /* OTel's HTTP server rule: 5xx is an error, 4xx is the client's */
  if (r->status >= 500) {
    p = W(p, ",\"status\":{\"code\":2,\"message\":\"HTTP ");
    p = w_int(p, r->status);
    p = W(p, "\"}}");
  } else {
    p = W(p, ",\"status\":{}}");
  }
  /* the phases: no attributes, status unset (both left out) */
  uint8_t compute[8];
  int have_compute = 0;
  for (int ph = 0; ph < TRP_COUNT; ph++) {
    if (r->ph[ph][0] <= 0) continue;
    uint8_t id[8];
    child_id(r, ph, id);
    if (ph == TRP_COMPUTE) memcpy(compute, id, 8), have_compute = 1;
    p = span_open(p, first_span, tid, id, r->span_id, phase_name(ph), NULL, 1);
    p = w_times(p, r, r->ph[ph][0], r->ph[ph][1]);
    *p++ = '}';
    spans++;
  }
  /* the hosted models, children of compute */
  unsigned ready = atomic_load_explicit((atomic_uint *)&r->hosted_ready, memory_order_acquire);
  for (int i = 0; i < nh; i++) {
    const trace_hosted *h = &r->hosted[i];
    if (!(ready & (1u << i))) continue; /* claimed, still being written */
    uint8_t id[8];
    child_id(r, TRP_COUNT + i, id);
    p = span_open(p, first_span, tid, id, have_compute ? compute : r->span_id, "compute", h->role,
                  1);
    p = w_times(p, r, h->t0, h->t1);
    /* the role is in the name; the depth only when nested; an unset
     * status left out: a request's members are most of its bytes */
    p = W(p, ",\"attributes\":[");
    f = 1;
    p = attr_str(p, &f, "tallyd.hosted.model", h->name);
    if (h->depth > 1) p = attr_int(p, &f, "tallyd.hosted.depth", h->depth);
    *p++ = ']';
    if (h->status) {
      p = W(p, ",\"status\":{\"code\":2,\"message\":");
      p = w_str(p, ts_status_name(h->status < 0 ? -h->status : h->status));
      *p++ = '}';
    }
    *p++ = '}';
    spans++;
  }
  b->len = (size_t)(p - b->data);
  b->data[b->len] = 0;
  return spans;
}

size_t trace_encode(trace_req *const *recs, size_t n, const char *instance, sbuf *out) {
  sbuf_adds(out, "{\"resourceSpans\":[{\"resource\":{\"attributes\":[");
  int f = 1;
  attr_str_sb(out, &f, "service.name", "tallyd");
  attr_str_sb(out, &f, "service.version", TALLYD_VERSION);
  attr_str_sb(out, &f, "service.instance.id", instance ? instance : "");
  if (T.host[0]) attr_str_sb(out, &f, "host.name", T.host);
  attr_int_sb(out, &f, "process.pid", (long long)getpid());
  sbuf_adds(out, "]},\"scopeSpans\":[{\"scope\":{\"name\":\"tallyd\",\"version\":\"" TALLYD_VERSION
                 "\"},\"spans\":[");
  size_t spans = 0;
  int first = 1;
  for (size_t i = 0; i < n; i++) spans += encode_one(out, &first, recs[i]);
  sbuf_adds(out, "]}]}]}");
  return spans;
}

/* ---- the exporter thread -------------------------------------------------- */

static size_t discard(char *p, size_t size, size_t n, void *u) {
  (void)p;
  (void)u;
  return size * n;
}

/* One POST; 0 when the collector answered 2xx. */
static int post(CURL *c, const char *body, size_t len, long timeout_ms) {
  curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
  CURLcode rc = curl_easy_perform(c);
  long code = 0;
  if (rc == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
  if (rc != CURLE_OK || code < 200 || code >= 300) {
    /* a log line per failure would flood a log while the collector is down */
    if (atomic_fetch_add(&exports_failed, 1) % 100 == 0)
      log_warn("trace export to %s failed: %s", T.endpoint,
               rc != CURLE_OK ? curl_easy_strerror(rc) : "the collector answered non-2xx");
    return -1;
  }
  return 0;
}

static double mono(void) {
  return md_now();
}

static void *exporter(void *arg) {
  (void)arg;
  CURL *c = curl_easy_init();
  struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
  /* no "Expect: 100-continue": a receiver that never answers 100 would
   * cost every large batch a one-second wait */
  struct curl_slist *more = hdr ? curl_slist_append(hdr, "Expect:") : NULL;
  if (more) hdr = more;
  if (c) {
    curl_easy_setopt(c, CURLOPT_URL, T.endpoint);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
#endif
  }
  trace_req *batch[TRACE_EXPORT_BATCH];
  double stop_by = 0;
  sbuf b;
  sbuf_init(&b);
  for (;;) {
    size_t n = 0;
    int stopping;
    pthread_mutex_lock(&T.mu);
    if (!T.stop && T.tail - T.head < TRACE_EXPORT_BATCH) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 200 * 1000000L; /* batch what arrives within 200 ms */
      if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
      pthread_cond_timedwait(&T.cv, &T.mu, &ts);
    }
    while (n < TRACE_EXPORT_BATCH && T.head != T.tail) batch[n++] = T.ring[T.head++ % T.cap];
    stopping = T.stop;
    pthread_mutex_unlock(&T.mu);
    if (stopping && stop_by == 0) stop_by = mono() + (double)T.timeout_ms / 1000.0;
    if (n) {
      long to = T.timeout_ms;
      if (stopping) {
        double left = stop_by - mono();
        to = left > 0.001 ? (long)(left * 1000.0) : 0;
      }
      if (sbuf_failed(&b)) {
        sbuf_free(&b);
        sbuf_init(&b);
      }
      b.len = 0; /* the buffer is reused: it grows to a batch's size once */
      size_t spans = trace_encode(batch, n, T.instance, &b);
      if (to <= 0)
        atomic_fetch_add(&spans_dropped, spans); /* shutdown's bound is spent */
      else if (!c || sbuf_failed(&b) || post(c, b.data, b.len, to))
        atomic_fetch_add(&spans_failed, spans);
      else
        atomic_fetch_add(&spans_exported, spans);
      for (size_t i = 0; i < n; i++) trace_release(batch[i]);
    }
    if (stopping && n == 0) break;
  }
  sbuf_free(&b);
  if (c) curl_easy_cleanup(c);
  curl_slist_free_all(hdr);
  return NULL;
}

int trace_start(const srv_config *cfg, ts_err *err) {
  double ratio = 1.0;
  if (cfg->otlp_sample_ratio) {
    char *end;
    ratio = strtod(cfg->otlp_sample_ratio, &end);
    if (end == cfg->otlp_sample_ratio || *end || !(ratio >= 0.0 && ratio <= 1.0))
      return ts_errf(err, TS_EINVAL, "--otlp-sample-ratio '%.40s' is not a number in [0, 1]",
                     cfg->otlp_sample_ratio);
  }
  if (!cfg->otlp_endpoint || !*cfg->otlp_endpoint) return 0;
  if (T.started) return ts_errf(err, TS_EINVAL, "tracing is already started");
  const char *e = cfg->otlp_endpoint;
  if (strncmp(e, "http://", 7) != 0 && strncmp(e, "https://", 8) != 0)
    return ts_errf(err, TS_EINVAL, "--otlp-endpoint '%.200s' must be an http:// or https:// URL",
                   e);
  T.ratio_all = ratio >= 1.0;
  T.ratio_bound = ratio <= 0 ? 0 : (uint64_t)(ratio * 18446744073709551616.0);
  T.timeout_ms = cfg->otlp_timeout_ms > 0 ? (long)cfg->otlp_timeout_ms : 2000;
  T.cap = cfg->otlp_queue_size > 0 ? (size_t)cfg->otlp_queue_size : 2048;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    return ts_errf(err, TS_EINTERNAL, "libcurl did not initialise");
  T.endpoint = tl_strdup(e);
  T.ring = tl_calloc(T.cap, sizeof *T.ring);
  if (!T.endpoint || !T.ring) {
    tl_free(T.endpoint);
    tl_free(T.ring);
    T.endpoint = NULL;
    T.ring = NULL;
    curl_global_cleanup();
    return ts_errf(err, TS_ENOMEM, "out of memory for the trace queue");
  }
  if (rid_make(T.instance, sizeof T.instance, 16, RID_HEX, 0, NULL))
    snprintf(T.instance, sizeof T.instance, "pid-%d", (int)getpid());
  if (gethostname(T.host, sizeof T.host - 1)) T.host[0] = 0;
  T.head = T.tail = 0;
  T.stop = 0;
  if (pthread_create(&T.th, NULL, exporter, NULL)) {
    tl_free(T.endpoint);
    tl_free(T.ring);
    T.endpoint = NULL;
    T.ring = NULL;
    curl_global_cleanup();
    return ts_errf(err, TS_EINTERNAL, "cannot start the trace exporter thread");
  }
  T.started = 1;
  T.on = 1;
  log_info("tracing: OTLP/HTTP JSON to %s, sample ratio %g, queue %zu, timeout %ld ms", e, ratio,
           T.cap, T.timeout_ms);
  return 0;
}

void trace_stop(void) {
  if (!T.started) return;
  T.on = 0;
  pthread_mutex_lock(&T.mu);
  T.stop = 1;
  pthread_cond_signal(&T.cv);
  pthread_mutex_unlock(&T.mu);
  pthread_join(T.th, NULL);
  /* the exporter leaves the ring empty; whatever it could not send is counted */
  while (T.head != T.tail) {
    trace_req *r = T.ring[T.head++ % T.cap];
    atomic_fetch_add(&spans_dropped, trace_span_count(r));
    trace_release(r);
  }
  tl_free(T.ring);
  tl_free(T.endpoint);
  T.ring = NULL;
  T.endpoint = NULL;
  T.started = 0;
  curl_global_cleanup();
}

void trace_render_metrics(sbuf *b) {
  sbuf_printf(b,
              "# HELP tallyd_trace_spans_exported_total spans the OTLP collector accepted\n"
              "# TYPE tallyd_trace_spans_exported_total counter\n"
              "tallyd_trace_spans_exported_total %llu\n"
              "# HELP tallyd_trace_spans_failed_total spans whose export failed (collector down, "
              "timeout, non-2xx)\n"
              "# TYPE tallyd_trace_spans_failed_total counter\n"
              "tallyd_trace_spans_failed_total %llu\n"
              "# HELP tallyd_trace_spans_dropped_total spans dropped because the export queue was "
              "full (or at shutdown)\n"
              "# TYPE tallyd_trace_spans_dropped_total counter\n"
              "tallyd_trace_spans_dropped_total %llu\n",
              (unsigned long long)atomic_load(&spans_exported),
              (unsigned long long)atomic_load(&spans_failed),
              (unsigned long long)atomic_load(&spans_dropped));
}
