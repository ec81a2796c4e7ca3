/* oip.c - OIP v2 tensor codec (see oip.h).
 *
 * Every cost of a request is linear in its size and bounded before it is
 * paid: the parse tree by a pre-scan estimate and then by jansson's counted
 * allocator (--max-json-memory), the inputs' and outputs' counts, the
 * decoded tensors (--max-request-memory), the answer (--max-response-bytes,
 * computed before it is built). Names are checked for duplicates through a
 * hash set, and the decode loop watches the deadline. */
#include "oip.h"

#include <inttypes.h>
#include <malloc.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/jtext.h"
#include "../base/mem.h"

/* Upper bound on JSON nesting in "data": deeper is a 400, not a stack walk. */
#define MAX_DATA_DEPTH 32

typedef struct filler {
  ts_tensor *t;
  int64_t n, cap;
  const char *name;
  int depth_seen;
} filler;

static int put(filler *f, json_t *v, ts_err *err) {
  if (f->n >= f->cap)
    return ts_errf(err, TS_EINVAL, "input '%s': data has more elements than its shape (%lld)",
                   f->name, (long long)f->cap);
  void *d = f->t->data;
  int64_t i = f->n++;
  ts_dtype dt = f->t->dtype;
  if (dt == TS_BOOL) {
    if (json_is_boolean(v))
      ((uint8_t *)d)[i] = json_is_true(v);
    else if (json_is_integer(v) && (json_integer_value(v) == 0 || json_integer_value(v) == 1))
      ((uint8_t *)d)[i] = (uint8_t)json_integer_value(v);
    else
      return ts_errf(err, TS_EINVAL, "input '%s': element %lld is not a BOOL", f->name,
                     (long long)i);
    return 0;
  }
  if (!json_is_number(v))
    return ts_errf(err, TS_EINVAL, "input '%s': element %lld is not a number (datatype %s)",
                   f->name, (long long)i, ts_dtype_name(dt));
  if (ts_dtype_is_float(dt)) {
    double x = json_number_value(v);
    switch (dt) {
      case TS_FP64: ((double *)d)[i] = x; break;
      case TS_FP32:
        if (fabs(x) > 3.4028234663852886e38)
          return ts_errf(err, TS_EINVAL, "input '%s': element %lld (%g) overflows FP32", f->name,
                         (long long)i, x);
        ((float *)d)[i] = (float)x;
        break;
      case TS_FP16:
        if (fabs(x) > 65504.0)
          return ts_errf(err, TS_EINVAL, "input '%s': element %lld (%g) overflows FP16", f->name,
                         (long long)i, x);
        ((uint16_t *)d)[i] = ts_float_to_half((float)x);
        break;
      default:
        if (fabs(x) > 3.3895313892515355e38)
          return ts_errf(err, TS_EINVAL, "input '%s': element %lld (%g) overflows BF16", f->name,
                         (long long)i, x);
        ((uint16_t *)d)[i] = ts_float_to_bf16((float)x);
        break;
    }
    return 0;
  }
  /* integers: an integral real is accepted, a fraction or out of range is not */
  long long x;
  if (json_is_integer(v)) {
    x = json_integer_value(v);
  } else {
    double r = json_real_value(v);
    if (r != floor(r) || fabs(r) > 9.2e18)
      return ts_errf(err, TS_EINVAL,
                     "input '%s': element %lld (%g) is not an integer (datatype %s)", f->name,
                     (long long)i, r, ts_dtype_name(dt));
    x = (long long)r;
  }
  long long lo = 0, hi = 0;
  switch (dt) {
    case TS_UINT8:
      lo = 0;
      hi = UINT8_MAX;
      break;
    case TS_UINT16:
      lo = 0;
      hi = UINT16_MAX;
      break;
    case TS_UINT32:
      lo = 0;
      hi = UINT32_MAX;
      break;
    case TS_UINT64:
      lo = 0;
      hi = INT64_MAX;
      break;
    case TS_INT8:
      lo = INT8_MIN;
      hi = INT8_MAX;
      break;
    case TS_INT16:
      lo = INT16_MIN;
      hi = INT16_MAX;
      break;
    case TS_INT32:
      lo = INT32_MIN;
      hi = INT32_MAX;
      break;
    default:
      lo = INT64_MIN;
      hi = INT64_MAX;
      break;
  }
  if (x < lo || x > hi)
    return ts_errf(err, TS_EINVAL, "input '%s': element %lld (%lld) is out of range for %s",
                   f->name, (long long)i, x, ts_dtype_name(dt));
  switch (dt) {
    case TS_UINT8: ((uint8_t *)d)[i] = (uint8_t)x; break;
    case TS_UINT16: ((uint16_t *)d)[i] = (uint16_t)x; break;
    case TS_UINT32: ((uint32_t *)d)[i] = (uint32_t)x; break;
    case TS_UINT64: ((uint64_t *)d)[i] = (uint64_t)x; break;
    case TS_INT8: ((int8_t *)d)[i] = (int8_t)x; break;
    case TS_INT16: ((int16_t *)d)[i] = (int16_t)x; break;
    case TS_INT32: ((int32_t *)d)[i] = (int32_t)x; break;
    default: ((int64_t *)d)[i] = (int64_t)x; break;
  }
  return 0;
}

static int fill(filler *f, json_t *v, int depth, ts_err *err) {
  if (!json_is_array(v)) return put(f, v, err);
  if (depth >= MAX_DATA_DEPTH)
    return ts_errf(err, TS_EINVAL, "input '%s': data is nested more than %d levels", f->name,
                   MAX_DATA_DEPTH);
  size_t i;
  json_t *x;
  json_array_foreach(v, i, x) {
    int r = fill(f, x, depth + 1, err);
    if (r) return r;
  }
  return 0;
}

/* BYTES: each element a JSON string, stored length-prefixed (Triton). */
static int fill_bytes(ts_tensor *t, json_t *data, int64_t numel, const char *name, ts_err *err) {
  sbuf b;
  sbuf_init(&b);
  int64_t n = 0;
  json_t *stack[MAX_DATA_DEPTH];
  size_t idx[MAX_DATA_DEPTH];
  int sp = 0;
  if (!json_is_array(data))
    return ts_errf(err, TS_EINVAL, "input '%s': data must be an array", name);
  stack[0] = data;
  idx[0] = 0;
  while (sp >= 0) {
    if (idx[sp] >= json_array_size(stack[sp])) {
      sp--;
      continue;
    }
    json_t *x = json_array_get(stack[sp], idx[sp]++);
    if (json_is_array(x)) {
      if (sp + 1 >= MAX_DATA_DEPTH) {
        sbuf_free(&b);
        return ts_errf(err, TS_EINVAL, "input '%s': data is nested too deeply", name);
      }
      stack[++sp] = x;
      idx[sp] = 0;
      continue;
    }
    if (!json_is_string(x)) {
      sbuf_free(&b);
      return ts_errf(err, TS_EINVAL, "input '%s': element %lld is not a string (datatype BYTES)",
                     name, (long long)n);
    }
    uint32_t len = (uint32_t)json_string_length(x);
    sbuf_add(&b, &len, 4);
    sbuf_add(&b, json_string_value(x), len);
    n++;
  }
  if (n != numel) {
    sbuf_free(&b);
    return ts_errf(err, TS_EINVAL, "input '%s': data has %lld elements, its shape needs %lld", name,
                   (long long)n, (long long)numel);
  }
  if (sbuf_failed(&b)) return ts_errf(err, TS_ENOMEM, "out of memory");
  size_t len;
  t->data = sbuf_take(&b, &len);
  t->nbytes = len;
  t->owns_data = 1;
  return 0;
}

/* ---- the parse tree's budget --------------------------------------------- */

/* jansson allocates through these (oip_json_alloc_init). A block's size is
 * read back with malloc_usable_size, so blocks stay plain malloc blocks
 * (answers from json_dumps are freed with free or tl_free elsewhere). The
 * count is per thread and on only while oip_decode_ex parses, so other
 * threads' JSON (config files, answers) is never refused. MALLOC_OVERHEAD
 * is the chunk header glibc adds to each block. */
#define MALLOC_OVERHEAD 8
static _Thread_local int a_on, a_over;
static _Thread_local int64_t a_used, a_limit;

static void *count_malloc(size_t n) {
  /* Past the limit every allocation fails at once, without calling malloc:
   * jansson's lexer retries its buffer's growth on every further byte. */
  if (a_on && (a_over || (a_limit > 0 && n > (uint64_t)(a_limit - a_used)))) {
    a_over = 1;
    return NULL;
  }
  void *p = tl_malloc(n);
  if (!p || !a_on) return p;
  int64_t cost = (int64_t)(malloc_usable_size(p) + MALLOC_OVERHEAD);
  if (a_limit > 0 && cost > a_limit - a_used) {
    a_over = 1;
    tl_free(p);
    return NULL;
  }
  a_used += cost;
  return p;
}

static void count_free(void *p) {
  if (!p) return;
  if (a_on) {
    a_used -= (int64_t)(malloc_usable_size(p) + MALLOC_OVERHEAD);
    if (a_used < 0) a_used = 0; /* a block from before the parse */
  }
  tl_free(p);
}

static int alloc_counted; /* set once at start, before any thread runs */

void oip_json_alloc_init(void) {
  json_set_alloc_funcs(count_malloc, count_free);
  alloc_counted = 1;
}

/* A lower bound on the parse tree, from one pass over the text: every value
 * but the first follows a ',' or opens an array or object, and each costs
 * at least one node: jansson's smallest (a 24-byte integer or real) in a
 * 32-byte malloc chunk, plus its 8-byte slot in the array holding it
 * (ESTIMATE_PER_VALUE; the counted allocator measures 42.5 bytes a number
 * for an array of zeros). Refusing on this bound costs no memory; the
 * counted allocator is the exact check. */
#define ESTIMATE_PER_VALUE 40
static int64_t parse_estimate(const char *s, size_t n) {
  int64_t values = 1;
  int in_str = 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (in_str) {
      if (c == '\\')
        i++;
      else if (c == '"')
        in_str = 0;
    } else if (c == '"') {
      in_str = 1;
    } else if (c == ',' || c == '[' || c == '{') {
      values++;
    }
  }
  return values * ESTIMATE_PER_VALUE;
}

json_t *oip_parse_json(const char *body, size_t len, int64_t limit, ts_err *err) {
  if (limit > 0 && parse_estimate(body, len) > limit) {
    ts_errf(err, TS_ETOOBIG,
            "the request's JSON needs more than --max-json-memory (%lld bytes) "
            "to parse (about %d bytes a number); send large tensors as binary data "
            "(Inference-Header-Content-Length)",
            (long long)limit, ESTIMATE_PER_VALUE);
    return NULL;
  }
  json_error_t je;
  a_used = 0;
  a_over = 0;
  a_limit = limit;
  a_on = alloc_counted && limit > 0;
  json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
  a_on = 0;
  if (root) return root;
  if (a_over)
    ts_errf(err, TS_ETOOBIG,
            "the request's JSON needs more than --max-json-memory (%lld bytes) "
            "to parse; send large tensors as binary data (Inference-Header-Content-Length)",
            (long long)limit);
  else
    ts_errf(err, json_error_code(&je) == json_error_out_of_memory ? TS_ENOMEM : TS_EINVAL,
            "malformed JSON at line %d column %d: %s", je.line, je.column, je.text);
  return NULL;
}

/* ---- names seen: a hash set (duplicates in linear time) ------------------ */

typedef struct nameset {
  const char **slot;
  size_t mask;
} nameset;

static int nameset_init(nameset *s, size_t n) {
  size_t cap = 16;
  while (cap < 2 * n) cap *= 2;
  s->mask = cap - 1;
  s->slot = tl_calloc(cap, sizeof *s->slot);
  return s->slot ? 0 : -1;
}

/* 1 when `name` was already added (the set holds borrowed pointers). */
static int nameset_add(nameset *s, const char *name) {
  uint64_t h = 1469598103934665603ull;
  for (const unsigned char *p = (const unsigned char *)name; *p; p++)
    h = (h ^ *p) * 1099511628211ull;
  for (size_t i = (size_t)h & s->mask;; i = (i + 1) & s->mask) {
    if (!s->slot[i]) {
      s->slot[i] = name;
      return 0;
    }
    if (strcmp(s->slot[i], name) == 0) return 1;
  }
}

static void nameset_free(nameset *s) {
  tl_free(s->slot);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- request-level parameters -------------------------------------------- */

const char *const oip_request_params[] = {"timeout_ms",  "timeout",        "binary_data_output",
                                          "sequence_id", "sequence_start", "sequence_end",
                                          "priority",    "headers",        NULL};

int oip_is_request_param(const char *key) {
  for (const char *const *a = oip_request_params; *a; a++)
    if (strcmp(*a, key) == 0) return 1;
  return 0;
}

/* Longest timeout a request may ask for: a day (keeps the sum finite). */
#define MAX_TIMEOUT_S 86400.0

/* ---- the scheduling parameters, read ahead of decoding ------------------- */

typedef struct scan {
  const char *p, *end;
} scan;

static void sc_ws(scan *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) c->p++;
}

/* Past a string whose opening quote is at c->p; 0 when unterminated. */
static int sc_string(scan *c) {
  c->p++;
  for (;;) {
    const char *q = memchr(c->p, '"', (size_t)(c->end - c->p));
    if (!q) return 0;
    const char *b = q;
    while (b > c->p && b[-1] == '\\') b--;
    c->p = q + 1;
    if (((q - b) & 1) == 0) return 1; /* an even run of backslashes: the quote ends it */
  }
}

/* Past one value of any kind (nesting counted, strings skipped). */
static int sc_value(scan *c) {
  sc_ws(c);
  if (c->p >= c->end) return 0;
  if (*c->p == '"') return sc_string(c);
  if (*c->p != '{' && *c->p != '[') {
    while (c->p < c->end && !strchr(",}] \n\r\t", *c->p)) c->p++;
    return 1;
  }
  int64_t depth = 0;
  while (c->p < c->end) {
    char ch = *c->p;
    if (ch == '"') {
      if (!sc_string(c)) return 0;
      continue;
    }
    if (ch == '{' || ch == '[') depth++;
    if (ch == '}' || ch == ']') depth--;
    c->p++;
    if (depth == 0) return 1;
  }
  return 0;
}

/* Positions c after the key `want` of the object at c->p and its colon;
 * 1 found, 0 not. */
static int sc_member(scan *c, const char *want) {
  size_t wn = strlen(want);
  sc_ws(c);
  if (c->p >= c->end || *c->p != '{') return 0;
  c->p++;
  for (;;) {
    sc_ws(c);
    if (c->p >= c->end || *c->p != '"') return 0;
    const char *k = c->p + 1;
    if (!sc_string(c)) return 0;
    size_t kn = (size_t)(c->p - 1 - k);
    sc_ws(c);
    if (c->p >= c->end || *c->p != ':') return 0;
    c->p++;
    if (kn == wn && memcmp(k, want, wn) == 0) return 1;
    if (!sc_value(c)) return 0;
    sc_ws(c);
    if (c->p >= c->end || *c->p != ',') return 0;
    c->p++;
  }
}

/* A number at c->p (JSON's grammar, loosely): 1 with *out set, else 0. */
static int sc_number(scan *c, double *out) {
  char buf[64];
  size_t n = 0;
  while (c->p < c->end && n < sizeof buf - 1 && strchr("+-.0123456789eE", *c->p))
    buf[n++] = *c->p++;
  buf[n] = 0;
  if (!n || (c->p < c->end && !strchr(",} \n\r\t", *c->p))) return 0;
  char *end;
  *out = strtod(buf, &end);
  return *end == 0;
}

void oip_scan_params(const char *body, size_t len, oip_scanned *out) {
  memset(out, 0, sizeof *out);
  scan c = {body, body + len};
  if (!sc_member(&c, "parameters")) return;
  sc_ws(&c);
  if (c.p >= c.end || *c.p != '{') return;
  c.p++;
  for (;;) {
    sc_ws(&c);
    if (c.p >= c.end || *c.p != '"') return;
    const char *k = c.p + 1;
    if (!sc_string(&c)) return;
    size_t kn = (size_t)(c.p - 1 - k);
    sc_ws(&c);
    if (c.p >= c.end || *c.p != ':') return;
    c.p++;
    sc_ws(&c);
    double v;
    const char *at = c.p;
    if (kn == 8 && memcmp(k, "priority", 8) == 0 && sc_number(&c, &v)) {
      if (v >= 0 && v == floor(v) && v < 1e15) {
        out->has_priority = 1;
        out->priority = (int64_t)v;
      }
    } else if (kn == 10 && memcmp(k, "timeout_ms", 10) == 0 && sc_number(&c, &v)) {
      if (v > 0 && v <= MAX_TIMEOUT_S * 1e3) out->timeout_s = v / 1e3;
    } else if (kn == 7 && memcmp(k, "timeout", 7) == 0 && sc_number(&c, &v)) {
      if (v > 0 && v <= MAX_TIMEOUT_S * 1e6) out->timeout_s = v / 1e6;
    } else {
      c.p = at;
      if (!sc_value(&c)) return;
    }
    sc_ws(&c);
    if (c.p >= c.end || *c.p != ',') return;
    c.p++;
  }
}

/* Type-checks the names the codec knows (oip_request_params) and sets the
 * deadline and the binary default from them. Other names are the model
 * kind's to accept or refuse (decode.c). */
static int read_request_params(json_t *params, const oip_limits *lim, oip_request *req,
                               ts_err *err) {
  json_t *v;
  if ((v = json_object_get(params, "binary_data_output"))) {
    if (!json_is_boolean(v))
      return ts_errf(err, TS_EINVAL, "parameter 'binary_data_output' must be true or false");
    req->binary_default = json_is_true(v);
  }
  double timeout = -1;
  json_t *tms = json_object_get(params, "timeout_ms"), *tus = json_object_get(params, "timeout");
  if (tms && tus)
    return ts_errf(err, TS_EINVAL,
                   "parameters 'timeout_ms' and 'timeout' (microseconds) both "
                   "given: give one");
  if (tms) {
    if (!json_is_number(tms) || !(json_number_value(tms) > 0) ||
        json_number_value(tms) > MAX_TIMEOUT_S * 1e3)
      return ts_errf(err, TS_EINVAL,
                     "parameter 'timeout_ms' must be a number of milliseconds "
                     "in (0, %.0f]",
                     MAX_TIMEOUT_S * 1e3);
    timeout = json_number_value(tms) / 1e3;
  }
  if (tus) { /* Triton's: an unsigned integer of microseconds, 0 = the server's default */
    if (!json_is_integer(tus) || json_integer_value(tus) < 0 ||
        json_integer_value(tus) > (json_int_t)(MAX_TIMEOUT_S * 1e6))
      return ts_errf(err, TS_EINVAL,
                     "parameter 'timeout' must be an integer number of "
                     "microseconds in [0, %.0f]",
                     MAX_TIMEOUT_S * 1e6);
    if (json_integer_value(tus) > 0) timeout = (double)json_integer_value(tus) / 1e6;
  }
  if (timeout > 0) req->deadline = (lim && lim->t_submit > 0 ? lim->t_submit : now_s()) + timeout;
  if ((v = json_object_get(params, "sequence_id")) && !json_is_string(v) &&
      !(json_is_integer(v) && json_integer_value(v) >= 0))
    return ts_errf(err, TS_EINVAL,
                   "parameter 'sequence_id' must be an unsigned integer or a "
                   "string");
  static const char *const bools[] = {"sequence_start", "sequence_end"};
  for (int i = 0; i < 2; i++)
    if ((v = json_object_get(params, bools[i])) && !json_is_boolean(v))
      return ts_errf(err, TS_EINVAL, "parameter '%s' must be true or false", bools[i]);
  if ((v = json_object_get(params, "priority")) &&
      !(json_is_integer(v) && json_integer_value(v) >= 0))
    return ts_errf(err, TS_EINVAL, "parameter 'priority' must be an unsigned integer");
  if ((v = json_object_get(params, "headers")) && !json_is_object(v))
    return ts_errf(err, TS_EINVAL, "parameter 'headers' must be an object");
  const char *key;
  json_object_foreach(params, key, v) {
    if (strncmp(key, "triton_", 7) == 0)
      return ts_errf(err, TS_EINVAL,
                     "parameter '%.60s': names starting with 'triton_' are "
                     "reserved (as in Triton)",
                     key);
  }
  return 0;
}

/* An input's or output's "parameters": only the names listed, each with
 * its type; Triton's shared memory is refused by name. */
static int check_io_params(json_t *params, const char *what, const char *name,
                           const char *const *allowed, ts_err *err) {
  if (!params || json_is_null(params)) return 0;
  if (!json_is_object(params))
    return ts_errf(err, TS_EINVAL, "%s '%.100s': 'parameters' must be an object", what, name);
  const char *key;
  json_t *v;
  json_object_foreach(params, key, v) {
    int ok = 0;
    for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(*a, key) == 0;
    if (ok) continue;
    if (strncmp(key, "shared_memory_", 14) == 0)
      return ts_errf(err, TS_EINVAL,
                     "%s '%.100s': parameter '%.60s': the shared memory "
                     "extension is not supported by tallyd; send the data in the body",
                     what, name, key);
    char list[160];
    size_t o = 0;
    list[0] = 0;
    for (const char *const *a = allowed; *a && o < sizeof list; a++)
      o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", a == allowed ? "" : ", ", *a);
    return ts_errf(err, TS_EINVAL, "%s '%.100s': unknown parameter '%.60s' (accepted: %s)", what,
                   name, key, list);
  }
  return 0;
}

static int decode_input(json_t *in, int idx, const char *bin, size_t bin_len, size_t *bin_off,
                        int64_t max_elements, ts_tensor *t, ts_err *err) {
  if (!json_is_object(in)) return ts_errf(err, TS_EINVAL, "inputs[%d] is not an object", idx);
  json_t *jn = json_object_get(in, "name"), *js = json_object_get(in, "shape"),
         *jd = json_object_get(in, "datatype"), *data = json_object_get(in, "data"),
         *params = json_object_get(in, "parameters");
  if (!json_is_string(jn))
    return ts_errf(err, TS_EINVAL, "inputs[%d]: 'name' must be a string", idx);
  const char *name = json_string_value(jn);
  if (strlen(name) > 256 || strlen(name) != json_string_length(jn))
    return ts_errf(err, TS_EINVAL, "inputs[%d]: the name is too long or holds a NUL byte", idx);
  if (!json_is_array(js))
    return ts_errf(err, TS_EINVAL, "input '%s': 'shape' must be an array of integers", name);
  if (!json_is_string(jd))
    return ts_errf(err, TS_EINVAL, "input '%s': 'datatype' must be a string", name);
  ts_dtype dt;
  if (ts_dtype_from_name(json_string_value(jd), &dt))
    return ts_errf(err, TS_EINVAL, "input '%s': unknown datatype '%.40s'", name,
                   json_string_value(jd));
  int64_t shape[TS_MAXDIM];
  int nd = (int)json_array_size(js);
  if (nd > TS_MAXDIM)
    return ts_errf(err, TS_EINVAL, "input '%s': rank %d is over the limit of %d", name, nd,
                   TS_MAXDIM);
  for (int i = 0; i < nd; i++) {
    json_t *x = json_array_get(js, (size_t)i);
    if (!json_is_integer(x) || json_integer_value(x) < 0)
      return ts_errf(err, TS_EINVAL, "input '%s': shape[%d] must be a non-negative integer", name,
                     i);
    shape[i] = json_integer_value(x);
  }
  int64_t numel;
  int r = ts_numel(shape, nd, &numel, err);
  if (r) {
    ts_err_prefix(err, "input '%s'", name);
    return r;
  }
  if (max_elements > 0 && numel > max_elements)
    return ts_errf(err, TS_ETOOBIG, "input '%s': %lld elements exceed the limit of %lld", name,
                   (long long)numel, (long long)max_elements);
  static const char *const in_params[] = {"binary_data_size", NULL};
  if ((r = check_io_params(params, "input", name, in_params, err))) return r;
  json_t *bsz = params ? json_object_get(params, "binary_data_size") : NULL;
  if (bsz && data)
    return ts_errf(err, TS_EINVAL,
                   "input '%s': give either 'data' or binary_data_size in "
                   "'parameters', not both",
                   name);
  if (bsz) {
    if (!json_is_integer(bsz) || json_integer_value(bsz) < 0)
      return ts_errf(err, TS_EINVAL, "input '%s': binary_data_size must be a non-negative integer",
                     name);
    size_t n = (size_t)json_integer_value(bsz);
    if (n > bin_len - *bin_off)
      return ts_errf(err, TS_EINVAL,
                     "input '%s': binary_data_size %zu is more than the %zu binary bytes left",
                     name, n, bin_len - *bin_off);
    if (dt != TS_BYTES && n != (size_t)numel * ts_dtype_size(dt))
      return ts_errf(err, TS_EINVAL,
                     "input '%s': binary_data_size %zu does not match shape and "
                     "datatype (%lld x %zu bytes)",
                     name, n, (long long)numel, ts_dtype_size(dt));
    if ((r = ts_alloc(t, name, dt == TS_BYTES ? TS_UINT8 : dt, nd, shape, err))) {
      if (dt != TS_BYTES) return r;
    }
    if (dt == TS_BYTES) {
      int64_t one = (int64_t)n;
      ts_free(t);
      if ((r = ts_alloc(t, name, TS_UINT8, 1, &one, err))) return r;
      t->dtype = TS_BYTES;
      t->ndim = nd;
      memcpy(t->shape, shape, sizeof(int64_t) * (size_t)nd);
    }
    memcpy(t->data, bin + *bin_off, n);
    *bin_off += n;
    return 0;
  }
  if (!data) return ts_errf(err, TS_EINVAL, "input '%s': no 'data' and no binary_data_size", name);
  if (!json_is_array(data))
    return ts_errf(err, TS_EINVAL, "input '%s': 'data' must be an array", name);
  if (dt == TS_BYTES) {
    memset(t, 0, sizeof *t);
    if (!(t->name = tl_strdup(name))) return ts_errf(err, TS_ENOMEM, "out of memory");
    t->dtype = TS_BYTES;
    t->ndim = nd;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)nd);
    return fill_bytes(t, data, numel, name, err);
  }
  if ((r = ts_alloc(t, name, dt, nd, shape, err))) return r;
  filler f = {.t = t, .n = 0, .cap = numel, .name = t->name};
  if ((r = fill(&f, data, 0, err))) return r;
  if (f.n != numel) {
    char sb[128];
    return ts_errf(err, TS_EINVAL, "input '%s': data has %lld elements, shape %s needs %lld", name,
                   (long long)f.n, ts_shape_str(shape, nd, sb, sizeof sb), (long long)numel);
  }
  return 0;
}

/* --max-request-memory: the declared size of every input (element count x
 * dtype size; BYTES at its 4-byte length prefixes), summed over the request
 * before any input is allocated. Malformed entries are left to decode_input. */
static int check_request_memory(json_t *inputs, int64_t max_bytes, ts_err *err) {
  int64_t total = 0;
  size_t i;
  json_t *in;
  json_array_foreach(inputs, i, in) {
    json_t *js = json_object_get(in, "shape");
    ts_dtype dt;
    if (!json_is_array(js) || json_array_size(js) > TS_MAXDIM ||
        ts_dtype_from_name(json_string_value(json_object_get(in, "datatype")), &dt))
      continue;
    int64_t shape[TS_MAXDIM], numel;
    int nd = (int)json_array_size(js), ok = 1;
    for (int k = 0; k < nd; k++) {
      json_t *x = json_array_get(js, (size_t)k);
      ok &= json_is_integer(x) && json_integer_value(x) >= 0;
      shape[k] = ok ? json_integer_value(x) : 0;
    }
    ts_err ignored;
    if (!ok || ts_numel(shape, nd, &numel, &ignored)) continue;
    int64_t esz = (int64_t)(dt == TS_BYTES ? 4 : ts_dtype_size(dt));
    if (numel > (max_bytes - total) / esz) /* divides: numel x esz may overflow */
      return ts_errf(err, TS_ETOOBIG,
                     "inputs[%zu]: the request's tensors need more than "
                     "--max-request-memory (%lld bytes)",
                     i, (long long)max_bytes);
    total += numel * esz;
  }
  return 0;
}

int oip_decode(const char *body, size_t len, size_t json_len, int64_t max_elements,
               oip_request *req, ts_err *err) {
  oip_limits lim = {.max_elements = max_elements};
  return oip_decode_ex(body, len, json_len, &lim, req, err);
}

int oip_decode_capped(const char *body, size_t len, size_t json_len, int64_t max_elements,
                      int64_t max_bytes, oip_request *req, ts_err *err) {
  oip_limits lim = {.max_elements = max_elements, .max_bytes = max_bytes};
  return oip_decode_ex(body, len, json_len, &lim, req, err);
}

static int check_time(const oip_limits *lim, ts_err *err) {
  if (lim->cancelled && *lim->cancelled)
    return ts_errf(err, TS_ETIMEOUT, "the request was abandoned while its body was decoded");
  return 0;
}

static int decode_outputs(json_t *outs, const oip_limits *lim, oip_request *req, ts_err *err) {
  if (!json_is_array(outs)) return ts_errf(err, TS_EINVAL, "'outputs' must be an array");
  size_t n = json_array_size(outs);
  if (lim->max_outputs > 0 && n > (size_t)lim->max_outputs)
    return ts_errf(err, TS_ETOOBIG, "%zu outputs requested; the limit is %lld (--max-outputs)", n,
                   (long long)lim->max_outputs);
  req->outputs = tl_calloc(n ? n : 1, sizeof *req->outputs);
  nameset seen;
  if (!req->outputs || nameset_init(&seen, n)) {
    tl_free(req->outputs);
    req->outputs = NULL;
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  static const char *const out_params[] = {"binary_data", "classification", "class_count", NULL};
  int rc = 0;
  size_t i;
  json_t *o;
  json_array_foreach(outs, i, o) {
    json_t *on = json_object_get(o, "name");
    if (!json_is_object(o) || !json_is_string(on)) {
      rc = ts_errf(err, TS_EINVAL, "outputs[%zu] must be an object with a string 'name'", i);
      break;
    }
    const char *name = json_string_value(on);
    json_t *op = json_object_get(o, "parameters");
    if ((rc = check_io_params(op, "output", name, out_params, err))) break;
    oip_out_req *q = &req->outputs[req->n_outputs];
    q->binary = req->binary_default;
    json_t *bd = op ? json_object_get(op, "binary_data") : NULL;
    if (bd) {
      if (!json_is_boolean(bd)) {
        rc = ts_errf(err, TS_EINVAL,
                     "output '%.100s': parameter 'binary_data' must be true or "
                     "false",
                     name);
        break;
      }
      q->binary = json_is_true(bd);
    }
    /* Triton's wire name is "classification"; tritonclient's argument is
     * class_count, and both are read here (one of them at most) */
    json_t *cc = op ? json_object_get(op, "classification") : NULL,
           *cc2 = op ? json_object_get(op, "class_count") : NULL;
    if (cc && cc2) {
      rc = ts_errf(err, TS_EINVAL,
                   "output '%.100s': give 'classification' or 'class_count', "
                   "not both",
                   name);
      break;
    }
    if (!cc) cc = cc2;
    if (cc) {
      if (!json_is_integer(cc) || json_integer_value(cc) < 0 ||
          json_integer_value(cc) > INT32_MAX) {
        rc = ts_errf(err, TS_EINVAL,
                     "output '%.100s': parameter '%s' must be an integer >= 0 "
                     "(the number of top classes)",
                     name, cc == cc2 ? "class_count" : "classification");
        break;
      }
      q->class_count = json_integer_value(cc);
    }
    if (!(q->name = tl_strdup(name))) {
      rc = ts_errf(err, TS_ENOMEM, "out of memory");
      break;
    }
    req->n_outputs++;
    if (nameset_add(&seen, q->name)) {
      rc = ts_errf(err, TS_EINVAL, "output '%.100s' is requested twice", name);
      break;
    }
    if ((rc = check_time(lim, err))) break;
  }
  nameset_free(&seen);
  return rc;
}

int oip_decode_ex(const char *body, size_t len, size_t json_len, const oip_limits *lim,
                  oip_request *req, ts_err *err) {
  static const oip_limits none;
  if (!lim) lim = &none;
  memset(req, 0, sizeof *req);
  ts_list_init(&req->inputs);
  req->deadline = lim->deadline;
  req->max_response_bytes = lim->max_response_bytes;
  if (json_len == 0 || json_len > len) {
    if (json_len > len)
      return ts_errf(err, TS_EINVAL,
                     "Inference-Header-Content-Length %zu exceeds the body (%zu bytes)", json_len,
                     len);
    json_len = len;
  }
  if (json_len == 0) return ts_errf(err, TS_EINVAL, "the request body is empty");
  if (!(req->root = oip_parse_json(body, json_len, lim->max_json_bytes, err))) {
    return -err->status;
  }
  if (!json_is_object(req->root))
    return ts_errf(err, TS_EINVAL, "the request body must be a JSON object");
  json_t *id = json_object_get(req->root, "id");
  if (id) {
    if (!json_is_string(id)) return ts_errf(err, TS_EINVAL, "'id' must be a string");
    if (json_string_length(id) > 1024 || strlen(json_string_value(id)) != json_string_length(id))
      return ts_errf(err, TS_EINVAL, "'id' is longer than 1024 bytes or holds a NUL byte");
    req->id = json_string_value(id);
  }
  json_t *params = json_object_get(req->root, "parameters");
  int r;
  if (params && !json_is_null(params)) {
    if (!json_is_object(params)) return ts_errf(err, TS_EINVAL, "'parameters' must be an object");
    req->params = params;
    if ((r = read_request_params(params, lim, req, err))) return r;
  }
  json_t *inputs = json_object_get(req->root, "inputs");
  if (!json_is_array(inputs)) return ts_errf(err, TS_EINVAL, "'inputs' must be an array");
  size_t n_in = json_array_size(inputs);
  if (lim->max_inputs > 0 && n_in > (size_t)lim->max_inputs)
    return ts_errf(err, TS_ETOOBIG, "%zu inputs; the limit is %lld (--max-inputs)", n_in,
                   (long long)lim->max_inputs);
  int mr = lim->max_bytes > 0 ? check_request_memory(inputs, lim->max_bytes, err) : 0;
  if (mr) return mr;
  size_t bin_off = 0, bin_len = len - json_len;
  const char *bin = body + json_len;
  nameset seen;
  if (nameset_init(&seen, n_in)) return ts_errf(err, TS_ENOMEM, "out of memory");
  size_t i;
  json_t *in;
  r = 0;
  json_array_foreach(inputs, i, in) {
    /* the request's own deadline: a long body cannot hold a worker past it */
    if ((i & 63) == 0) {
      if ((r = check_time(lim, err))) break;
      if (req->deadline > 0 && now_s() > req->deadline) {
        r = ts_errf(err, TS_ETIMEOUT,
                    "the request's deadline passed while its %zu inputs were "
                    "decoded (at input %zu)",
                    n_in, i);
        break;
      }
    }
    ts_tensor *t = ts_list_add(&req->inputs);
    if (!t) {
      r = ts_errf(err, TS_ENOMEM, "out of memory");
      break;
    }
    r = decode_input(in, (int)i, bin, bin_len, &bin_off, lim->max_elements, t, err);
    if (r) {
      ts_free(t);
      req->inputs.n--;
      break;
    }
    if (nameset_add(&seen, t->name)) {
      r = ts_errf(err, TS_EINVAL, "input '%s' appears twice", t->name);
      break;
    }
  }
  nameset_free(&seen);
  if (r) return r;
  if (bin_off != bin_len)
    return ts_errf(err, TS_EINVAL,
                   "%zu binary bytes after the JSON header are not claimed by any input",
                   bin_len - bin_off);
  json_t *outs = json_object_get(req->root, "outputs");
  if (outs && !json_is_null(outs)) return decode_outputs(outs, lim, req, err);
  return 0;
}

void oip_request_free(oip_request *req) {
  ts_list_free(&req->inputs);
  for (int i = 0; i < req->n_outputs; i++) tl_free(req->outputs[i].name);
  tl_free(req->outputs);
  if (req->root) json_decref(req->root);
  memset(req, 0, sizeof *req);
}

/* BYTES elements are length-prefixed (4 bytes, little-endian as Triton). */
static void bytes_json(sbuf *b, const ts_tensor *t) {
  int64_t n = ts_tensor_numel(t);
  const unsigned char *p = t->data, *end = p + t->nbytes;
  sbuf_add(b, "[", 1);
  for (int64_t i = 0; i < n && p + 4 <= end; i++) {
    uint32_t len;
    memcpy(&len, p, 4);
    p += 4;
    if (len > (size_t)(end - p)) len = (uint32_t)(end - p);
    char *s = tl_malloc((size_t)len + 1);
    if (!s) {
      sbuf_add(b, "", 0);
      b->failed = 1;
      return;
    }
    memcpy(s, p, len);
    s[len] = 0;
    if (i) sbuf_add(b, ",", 1);
    sbuf_json_str(b, s);
    tl_free(s);
    p += len;
  }
  sbuf_add(b, "]", 1);
}

void oip_data_json(sbuf *b, const ts_tensor *t) {
  if (t->dtype == TS_BYTES) {
    bytes_json(b, t);
    return;
  }
  int64_t n = ts_tensor_numel(t);
  sbuf_reserve(b, (size_t)n * 12 + 2);
  sbuf_add(b, "[", 1);
  for (int64_t i = 0; i < n; i++) {
    if (i) sbuf_add(b, ",", 1);
    switch (t->dtype) {
      case TS_FP32: sbuf_f32(b, ((const float *)t->data)[i]); break;
      case TS_FP64: sbuf_f64(b, ((const double *)t->data)[i]); break;
      case TS_FP16:
      case TS_BF16: sbuf_f32(b, (float)ts_get_f64(t, i)); break;
      case TS_BOOL: sbuf_adds(b, ((const uint8_t *)t->data)[i] ? "true" : "false"); break;
      case TS_INT64: sbuf_printf(b, "%lld", (long long)((const int64_t *)t->data)[i]); break;
      case TS_UINT64:
        sbuf_printf(b, "%llu", (unsigned long long)((const uint64_t *)t->data)[i]);
        break;
      default: sbuf_printf(b, "%.0f", ts_get_f64(t, i)); break;
    }
  }
  sbuf_add(b, "]", 1);
}

static void shape_json(sbuf *b, const ts_tensor *t) {
  sbuf_add(b, "[", 1);
  for (int i = 0; i < t->ndim; i++) sbuf_printf(b, "%s%lld", i ? "," : "", (long long)t->shape[i]);
  sbuf_add(b, "]", 1);
}

/* Longest JSON text of one element of a dtype (sbuf_f32/f64, integers). */
static size_t elem_json_max(ts_dtype dt) {
  switch (dt) {
    case TS_FP64: return 26;
    case TS_FP32:
    case TS_FP16:
    case TS_BF16: return 24;
    case TS_BOOL: return 5;
    default: return 21;
  }
}

/* An upper bound on one output's part of the answer, JSON and binary. */
static size_t output_size_bound(const ts_tensor *t, int binary) {
  size_t head = 160 + 6 * strlen(t->name) + 24 * (size_t)t->ndim;
  if (binary) return head + t->nbytes;
  if (t->dtype == TS_BYTES) /* every byte escaped (\u00XX) at worst, plus quotes and commas */
    return head + 6 * t->nbytes + 3 * (size_t)ts_tensor_numel(t);
  return head + (size_t)ts_tensor_numel(t) * (elem_json_max(t->dtype) + 1);
}

/* ---- classification (Triton's extension) -------------------------------- */

static double elem_f64(const ts_tensor *t, int64_t i) {
  return ts_get_f64(t, i);
}

/* "value:index" as Triton writes it (std::to_string: %f for reals). */
static int class_str(const ts_tensor *t, int64_t i, int64_t idx, char *out, size_t cap) {
  switch (t->dtype) {
    case TS_INT64:
      return snprintf(out, cap, "%lld:%lld", (long long)((const int64_t *)t->data)[i],
                      (long long)idx);
    case TS_UINT64:
      return snprintf(out, cap, "%llu:%lld", (unsigned long long)((const uint64_t *)t->data)[i],
                      (long long)idx);
    case TS_FP32:
    case TS_FP64:
    case TS_FP16:
    case TS_BF16: return snprintf(out, cap, "%f:%lld", elem_f64(t, i), (long long)idx);
    default: return snprintf(out, cap, "%.0f:%lld", elem_f64(t, i), (long long)idx);
  }
}

/* Top k of row [base, base + n): a partial selection, highest value first,
 * lower index first among equals (NaN last). O(n k). */
static int classify(const ts_tensor *t, int64_t k, ts_tensor *out, ts_err *err) {
  if (t->dtype == TS_BYTES || t->dtype == TS_BOOL || t->ndim < 1)
    return ts_errf(err, TS_EINVAL,
                   "output '%s' (%s, rank %d) cannot be classified: the "
                   "classification extension needs a numeric output of rank >= 1",
                   t->name, ts_dtype_name(t->dtype), t->ndim);
  /* rank 1: one row of classes; rank >= 2: the first dimension is the batch */
  int64_t rows = t->ndim >= 2 ? t->shape[0] : 1, numel = ts_tensor_numel(t);
  int64_t n = rows ? numel / rows : 0, kk = k < n ? k : n;
  sbuf b;
  sbuf_init(&b);
  int64_t *top = tl_calloc((size_t)(kk ? kk : 1), sizeof *top);
  if (!top) return ts_errf(err, TS_ENOMEM, "out of memory");
  char s[400];
  for (int64_t r = 0; r < rows; r++) {
    int64_t base = r * n, m = 0;
    for (int64_t i = 0; i < n; i++) {
      double v = elem_f64(t, base + i);
      if (isnan(v)) continue;
      /* insert i among the m best so far if it beats the worst */
      int64_t pos = m;
      while (pos > 0 && elem_f64(t, base + top[pos - 1]) < v) pos--;
      if (pos >= kk) continue;
      if (m < kk) m++;
      memmove(top + pos + 1, top + pos, (size_t)(m - 1 - pos) * sizeof *top);
      top[pos] = i;
    }
    for (int64_t i = 0; m < kk && i < n; i++) /* NaN rows fill the rest, in index order */
      if (isnan(elem_f64(t, base + i))) top[m++] = i;
    for (int64_t j = 0; j < kk; j++) {
      int len = class_str(t, base + top[j], top[j], s, sizeof s);
      uint32_t l = (uint32_t)(len < 0 ? 0 : len >= (int)sizeof s ? (int)sizeof s - 1 : len);
      sbuf_add(&b, &l, 4);
      sbuf_add(&b, s, l);
    }
  }
  tl_free(top);
  if (sbuf_failed(&b)) {
    sbuf_free(&b);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  memset(out, 0, sizeof *out);
  if (!(out->name = tl_strdup(t->name))) {
    sbuf_free(&b);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  out->dtype = TS_BYTES;
  out->ndim = t->ndim >= 2 ? 2 : 1;
  out->shape[0] = t->ndim >= 2 ? rows : kk;
  out->shape[1] = kk;
  size_t blen;
  out->data = sbuf_take(&b, &blen);
  out->nbytes = blen;
  out->owns_data = 1;
  if (!out->data) { /* an empty answer (no rows or k = 0): a valid empty buffer */
    out->data = tl_malloc(1);
    if (!out->data) return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  return 0;
}

int oip_encode(const char *model, int64_t version, const oip_request *req, const ts_list *outputs,
               const json_t *extra_params, sbuf *out, size_t *json_len, ts_err *err) {
  /* pick outputs: requested ones in request order, or all */
  int n = req && req->n_outputs ? req->n_outputs : outputs->n;
  const ts_tensor **sel = tl_calloc((size_t)(n ? n : 1), sizeof *sel);
  int *bin = tl_calloc((size_t)(n ? n : 1), sizeof *bin);
  ts_tensor *cls = tl_calloc((size_t)(n ? n : 1), sizeof *cls);
  int any_bin = 0, rc = 0;
  sbuf extra; /* the answer's "parameters", rendered first to be counted */
  sbuf_init(&extra);
  if (!sel || !bin || !cls) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto done;
  }
  for (int i = 0; i < n; i++) {
    if (req && req->n_outputs) {
      sel[i] = ts_list_find(outputs, req->outputs[i].name);
      if (!sel[i]) {
        sbuf names;
        sbuf_init(&names);
        for (int k = 0; k < outputs->n; k++) {
          if (k) sbuf_adds(&names, ", ");
          sbuf_adds(&names, outputs->items[k].name);
        }
        rc = ts_errf(err, TS_EINVAL, "unknown output '%.100s' (this model has: %s)",
                     req->outputs[i].name, names.data ? names.data : "");
        sbuf_free(&names);
        goto done;
      }
      bin[i] = req->outputs[i].binary;
      if (req->outputs[i].class_count > 0) {
        if ((rc = classify(sel[i], req->outputs[i].class_count, &cls[i], err))) goto done;
        sel[i] = &cls[i];
      }
    } else {
      sel[i] = &outputs->items[i];
      bin[i] = req ? req->binary_default : 0;
    }
    any_bin |= bin[i];
  }
  if (extra_params) jtext_add(&extra, extra_params, JT_COMPACT);
  if (sbuf_failed(&extra)) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto done;
  }
  /* the answer's size, bounded before a byte of it is written */
  size_t bound = 128 + 6 * strlen(model) + (req && req->id ? 6 * strlen(req->id) : 0) + extra.len;
  for (int i = 0; i < n; i++) bound += output_size_bound(sel[i], bin[i]);
  if (req && req->max_response_bytes > 0 && bound > (size_t)req->max_response_bytes) {
    rc = ts_errf(err, TS_ETOOBIG,
                 "the answer would take up to %zu bytes, over "
                 "--max-response-bytes (%lld); ask for fewer outputs or rows",
                 bound, (long long)req->max_response_bytes);
    goto done;
  }
  sbuf_adds(out, "{\"model_name\":");
  sbuf_json_str(out, model);
  sbuf_printf(out, ",\"model_version\":\"%lld\"", (long long)version);
  if (req && req->id) {
    sbuf_adds(out, ",\"id\":");
    sbuf_json_str(out, req->id);
  }
  if (extra_params) {
    sbuf_adds(out, ",\"parameters\":");
    sbuf_add(out, extra.data, extra.len);
  }
  sbuf_adds(out, ",\"outputs\":[");
  for (int i = 0; i < n; i++) {
    const ts_tensor *t = sel[i];
    if (i) sbuf_add(out, ",", 1);
    sbuf_adds(out, "{\"name\":");
    sbuf_json_str(out, t->name);
    sbuf_printf(out, ",\"datatype\":\"%s\",\"shape\":", ts_dtype_name(t->dtype));
    shape_json(out, t);
    if (bin[i]) {
      sbuf_printf(out, ",\"parameters\":{\"binary_data_size\":%zu}}", t->nbytes);
    } else {
      sbuf_adds(out, ",\"data\":");
      oip_data_json(out, t);
      sbuf_add(out, "}", 1);
    }
  }
  sbuf_adds(out, "]}");
  *json_len = 0;
  if (any_bin) {
    *json_len = out->len;
    for (int i = 0; i < n; i++)
      if (bin[i]) sbuf_add(out, sel[i]->data, sel[i]->nbytes);
  }
  if (sbuf_failed(out)) rc = ts_errf(err, TS_ENOMEM, "out of memory encoding the response");
done:
  if (cls)
    for (int i = 0; i < n; i++) ts_free(&cls[i]);
  sbuf_free(&extra);
  tl_free(cls);
  tl_free(sel);
  tl_free(bin);
  return rc;
}
