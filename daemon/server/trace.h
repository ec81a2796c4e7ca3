/* trace.h - distributed tracing: W3C Trace Context in, OTLP/HTTP JSON out.
 *
 * A request's trace context comes from its `traceparent` (and `tracestate`)
 * header (W3C Trace Context, level 1); an invalid header is ignored and the
 * request starts a new trace. The answer carries a `traceparent` naming the
 * server span. A request is sampled when its parent says so (bit 0 of
 * trace-flags) or, with no parent, when its trace id falls under
 * --otlp-sample-ratio (parent-based sampling).
 *
 * A sampled request is recorded in a trace_req: the server span plus one
 * child span per phase (receive, queue, decode, compute, encode, send) and
 * one per hosted model the compute phase ran (ensemble members, quantile
 * bases; model.h md_span_sink). The loop thread hands finished records to a
 * bounded ring (--otlp-queue-size records); one exporter thread takes them
 * in batches, encodes them as an OTLP ExportTraceServiceRequest in JSON and
 * POSTs it to --otlp-endpoint through libcurl, with every transfer bounded
 * by --otlp-timeout-ms. When the ring is full a record is dropped and its
 * spans counted (tallyd_trace_spans_dropped_total): a slow or dead
 * collector never slows a request. With no --otlp-endpoint nothing is
 * parsed, allocated or sent (trace_begin returns at its first test).
 *
 * Threads: trace_begin, trace_set_phase, trace_job_done, trace_end run on
 * the loop thread; the record's md_span_sink is called from workers (an
 * atomic slot counter); trace_start and trace_stop from the main thread.
 * A trace_req is reference counted: the request holds one reference, a job
 * that may outlive its request (a 504) another; the ring holds the
 * request's once pushed. */
#ifndef TALLYD_TRACE_H
#define TALLYD_TRACE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "../base/err.h"
#include "../base/sbuf.h"
#include "../models/model.h"
#include "config.h"

#define TRACE_HEADER_LEN 56    /* "00-" 32 "-" 16 "-" 2, and the NUL */
#define TRACE_STATE_MAX 512    /* longest tracestate kept (W3C: propagate at least 512) */
#define TRACE_MAX_HOSTED 32    /* hosted-model spans recorded per request; more are counted */
#define TRACE_EXPORT_BATCH 256 /* records per POST */

_Static_assert(TRACE_MAX_HOSTED <= 32, "hosted_ready is a 32-bit mask");

typedef struct trace_ctx {
  uint8_t trace_id[16];
  uint8_t parent_id[8]; /* the caller's span id */
  uint8_t flags;        /* trace-flags as received; bit 0: sampled */
} trace_ctx;

/* Parses a traceparent value by the W3C rules: version 00 is exactly
 * "00-<32 hex>-<16 hex>-<2 hex>", lowercase; a later version (not ff) is
 * read for the same fields and may carry more after a '-' at offset 55;
 * an all-zero trace id or parent id is invalid. 0, or -1 when invalid. */
int trace_parse_parent(const char *v, trace_ctx *out);
/* 1 when v is a valid tracestate (list-members "key=value" separated by
 * commas and optional spaces, at most 32, keys and values by the W3C
 * grammar) no longer than TRACE_STATE_MAX characters; else 0. */
int trace_state_valid(const char *v);
/* "00-<trace id>-<span id>-<01 or 00>" into out (TRACE_HEADER_LEN bytes). */
void trace_format_parent(const uint8_t trace_id[16], const uint8_t span_id[8], int sampled,
                         char out[TRACE_HEADER_LEN]);
/* Lowercase hex of n bytes into out (2n + 1 bytes). */
void trace_hex(const uint8_t *p, size_t n, char *out);

typedef enum trace_phase {
  TRP_RECEIVE, /* first byte seen -> body complete */
  TRP_QUEUE,   /* handed to the pool -> a worker took it */
  TRP_DECODE,  /* the worker started -> tensors decoded */
  TRP_COMPUTE, /* the model's call (the whole handler when nothing was decoded) */
  TRP_ENCODE,  /* the answer built and compressed */
  TRP_SEND,    /* the answer queued -> the last byte handed to the socket */
  TRP_COUNT
} trace_phase;

typedef struct trace_hosted {
  char role[16];
  char name[64];
  int depth, status;
  double t0, t1;
} trace_hosted;

/* Only the part before `state` is cleared when a record is made (a request
 * touches a few hundred bytes, not the whole record); state and hosted[]
 * are read only as far as they were written. */
typedef struct trace_req {
  md_span_sink sink; /* first: the worker's view */
  atomic_int refs;
  trace_ctx ctx;
  int has_parent;
  uint8_t span_id[8]; /* the server span */
  int64_t wall0_ns;   /* CLOCK_REALTIME at t0 */
  double t0, t1;      /* md_now() at the first byte and when the request completed */
  double ph[TRP_COUNT][2];
  int64_t version;          /* 0 none */
  int status;               /* HTTP status answered */
  atomic_int n_hosted;      /* slots claimed (may exceed TRACE_MAX_HOSTED) */
  atomic_uint hosted_ready; /* bit i: hosted[i] is written */
  char method[8];           /* the next four: set by trace_end */
  char route[96];           /* the route's pattern; "" when none matched */
  char model[128];          /* "" none */
  char request_id[80];
  char state[TRACE_STATE_MAX + 1]; /* "" none */
  trace_hosted hosted[TRACE_MAX_HOSTED];
} trace_req;

/* Starts tracing when cfg has an endpoint (validates the --otlp-* flags,
 * starts the exporter thread). 0, or -TS_EINVAL with a message. */
int trace_start(const srv_config *cfg, ts_err *err);
/* Stops the exporter after sending what the ring holds, bounded by about
 * twice --otlp-timeout-ms; what is left is counted as dropped. Safe to call
 * when not started, and twice. */
void trace_stop(void);
/* 1 when an endpoint is configured. */
int trace_on(void);

/* The first sight of a request. When tracing is off: answer[0] = 0, NULL.
 * Else answer holds the traceparent to answer with, and the result is the
 * request's record when it is sampled (NULL when not, or out of memory). */
trace_req *trace_begin(const char *traceparent, const char *tracestate, double now,
                       char answer[TRACE_HEADER_LEN]);
/* Sets up a zeroed record: its sink and the one reference (trace_begin
 * calls it; tests build records with it). */
void trace_req_init(trace_req *r);
/* trace_begin on a connection's headers: one traceparent (two or more are
 * ignored, a new trace), every tracestate line joined as one list. */
struct MHD_Connection;
trace_req *trace_begin_conn(struct MHD_Connection *conn, double now, char answer[TRACE_HEADER_LEN]);
void trace_set_phase(trace_req *r, trace_phase p, double t0, double t1);
/* A worker job's times (t_submit, t_start, t_decoded, t_computed, t_end;
 * 0: did not happen) become the queue, decode, compute and encode phases. */
void trace_job_times(trace_req *r, double t_submit, double t_start, double t_decoded,
                     double t_computed, double t_end);
/* Another owner (a job); released with trace_release. */
void trace_hold(trace_req *r);
void trace_release(trace_req *r);
/* The request completed: fills the attributes, pushes the record to the
 * exporter (or drops it, counted) and lets go of the request's reference.
 * route and model may be NULL. */
void trace_end(trace_req *r, const char *route, const char *method, const char *model,
               int64_t version, int status, const char *request_id, double now);

/* Encodes records as one ExportTraceServiceRequest (OTLP/HTTP JSON) into
 * out; instance is service.instance.id. Returns the number of spans. */
size_t trace_encode(trace_req *const *recs, size_t n, const char *instance, sbuf *out);
/* Spans a record makes when encoded. */
size_t trace_span_count(const trace_req *r);

/* tallyd_trace_spans_{exported,failed,dropped}_total into b. */
void trace_render_metrics(sbuf *b);

#endif
