/* tallyctl.c - the command-line client of tallyd, on libtally (tally.h).
 *
 *   tallyctl [--url URL] [--api-key KEY] [--timeout S] [--format json|table] COMMAND ...
 *
 * Tensors come from JSON files (the OIP request form, or {name: nested list})
 * or CSV files (a header names each column; with --input NAME the whole file
 * is one matrix). Exit codes are meant for scripts: 0 ok, 1 usage or a bad
 * local file, 2 no connection, 3 HTTP 4xx, 4 HTTP 5xx or an unusable answer. */
#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"

enum { EXIT_OK = 0, EXIT_USAGE = 1, EXIT_CONNECT = 2, EXIT_4XX = 3, EXIT_5XX = 4 };

static const char usage_text[] =
    "usage: tallyctl [options] COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  health [live|ready]              is the server live / ready (default ready)\n"
    "  models                           the repository index\n"
    "  metadata [MODEL]                 server metadata, or one model's\n"
    "  infer MODEL FILE...              run inference on the tensors in FILE(s)\n"
    "  fit MODEL FILE...                learn weights from labelled rows (a new version)\n"
    "  evaluate MODEL FILE...           metrics on labelled rows\n"
    "  calibrate MODEL FILE...          conformal calibration (a new version)\n"
    "  load MODEL | unload MODEL        load or unload one model\n"
    "  session create MODEL             start a KV-cache session\n"
    "  session infer MODEL ID FILE...   feed the next tokens\n"
    "  session get MODEL ID | session delete MODEL ID\n"
    "  complete MODEL PROMPT            generate text (/v1/completions); fields as --param\n"
    "                                   (max_tokens=64, temperature=0, stop=...); --stream\n"
    "                                   prints the text as it arrives\n"
    "  metrics [NAME...]                the Prometheus metrics (only the families NAME)\n"
    "  keygen [--scope infer|admin]     a random API key and its key-file line\n"
    "\n"
    "options:\n"
    "  --url URL            server (default $TALLY_URL, else " TALLY_DEFAULT_URL
    ")\n"
    "  --api-key KEY        sent as Authorization: Bearer (default $TALLY_API_KEY)\n"
    "  --timeout S          seconds for the whole request (default 60; 0 = none)\n"
    "  --format json|table  how answers are printed (default json)\n"
    "  --model-version V    a specific model version (metadata, infer, evaluate)\n"
    "  --input NAME         the next CSV file is one matrix named NAME\n"
    "  --output NAME        infer: answer only this output (repeatable; default all)\n"
    "  --datatype [NAME=]DT datatype of tensors read without one (FP32, INT64, ...)\n"
    "  --param KEY=VALUE    a request parameter (VALUE is JSON if it parses, else a string)\n"
    "  --params JSON|@FILE  request parameters as one JSON object\n"
    "  --scope infer|admin  keygen: the key's scope (default infer)\n"
    "  --binary             send every input tensor as a binary tensor (raw bytes after\n"
    "                       the JSON); inputs of 4096 elements or more always are\n"
    "\n"
    "files: FILE.json holds {\"inputs\": [OIP tensors], \"parameters\"?: {...},\n"
    "\"outputs\"?: [{\"name\"}...]} (a curl body as it is) or {\"NAME\": nested list, ...};\n"
    "FILE.csv has a header row naming each column (each column a tensor [rows])\n"
    "unless --input NAME makes it one [rows, cols].\n"
    "\n"
    "exit codes: 0 ok, 1 usage or bad local input, 2 no connection,\n"
    "3 HTTP 4xx (bad request, unknown model, ...), 4 HTTP 5xx or an unusable answer.\n";

/* `tallyctl COMMAND --help` */
static const struct {
  const char *cmd, *text;
} command_help[] = {
    {"health",
     "usage: tallyctl health [live|ready]\n\nIs the server live (the process answers) or ready\n"
     "(every model loaded, not draining)? Prints the answer; exit 0 when it is, 4 on 503.\n"},
    {"models",
     "usage: tallyctl models [--format table]\n\nThe repository index: every model and "
     "version with its state (READY, UNAVAILABLE, ...) and the reason.\n"},
    {"metadata",
     "usage: tallyctl metadata [MODEL] [--model-version V]\n\nWithout MODEL: the "
     "server's name, version and extensions. With MODEL: its versions,\ninputs and "
     "outputs (name, datatype, shape; -1 for any size) and weights' sha256.\n"},
    {"infer",
     "usage: tallyctl infer MODEL FILE... [--model-version V] [--output NAME]...\n"
     "       [--input NAME] [--datatype [NAME=]DT] [--param K=V] [--params JSON|@FILE] "
     "[--binary]\n\n"
     "Runs MODEL on the tensors of the files (JSON: an OIP request or {NAME: nested list};\n"
     "CSV: columns, or one matrix with --input NAME before it). Datatypes come from the\n"
     "file, --datatype, or the model's metadata. Inputs of 4096 elements or more (all with\n"
     "--binary) travel as binary tensors.\n"},
    {"fit",
     "usage: tallyctl fit MODEL FILE... [--param epochs=N] [--params JSON|@FILE] [--binary]\n\n"
     "Learns MODEL's weights from labelled rows (inputs plus labels or targets) and\n"
     "serves the result as a new version (needs an admin key when keys are on).\n"},
    {"evaluate",
     "usage: tallyctl evaluate MODEL FILE... [--model-version V] [--param K=V] [--binary]\n\n"
     "Metrics of a version on labelled rows; changes nothing.\n"},
    {"calibrate",
     "usage: tallyctl calibrate MODEL FILE... [--param method=cqr] [--binary]\n\n"
     "Conformal calibration of a quantile_ensemble on held-out rows (features and\n"
     "targets); a new version.\n"},
    {"load", "usage: tallyctl load MODEL\n\n(Re)loads MODEL from the repository (admin scope).\n"},
    {"unload", "usage: tallyctl unload MODEL\n\nStops serving MODEL (admin scope).\n"},
    {"session",
     "usage: tallyctl session create MODEL [--param attention=lssar]\n"
     "       tallyctl session infer MODEL ID FILE... [--output NAME]... [--binary]\n"
     "       tallyctl session get MODEL ID\n"
     "       tallyctl session delete MODEL ID\n\n"
     "KV-cache sessions of a transformer: each infer feeds the next tokens (input_ids\n"
     "[1, n]) and scores them from everything fed before.\n"},
    {"complete",
     "usage: tallyctl complete MODEL PROMPT [--param max_tokens=N] [--param temperature=T] "
     "[--stream]\n\nText generation through POST /v1/completions. --param sets any completion "
     "field\n(max_tokens, temperature, top_p, top_k, seed, stop, ...). Without --stream the\n"
     "answer is printed as JSON (--format table: only the text); with --stream the text is\n"
     "written to stdout piece by piece as the server sends it.\n"},
    {"metrics",
     "usage: tallyctl metrics [FAMILY...]\n\nThe Prometheus metrics as text, or only "
     "the families named\n(tallyd_requests_total, ...; a histogram brings _bucket, _sum, "
     "_count).\n"},
    {"keygen",
     "usage: tallyctl keygen [--scope infer|admin] [--format json]\n\nA new API key "
     "(32 random bytes, 43 base64url characters: tallyd --keygen's format)\non the first "
     "line, its key-file line (SHA-256 hex, scope) on the second.\n"},
};

typedef struct file_arg {
  const char *path;
  const char *input; /* --input NAME given before a CSV file */
} file_arg;

typedef struct opts {
  const char *url, *api_key, *format, *model_version, *scope, *params_arg;
  double timeout_s;
  int format_given;
  int binary; /* --binary: every input as a binary tensor */
  int stream; /* --stream: complete prints text as it arrives */
  const char *pos[8];
  int npos;
  file_arg files[64];
  int nfiles;
  const char *dtypes[32]; /* "NAME=DT" or "DT" */
  int ndtypes;
  const char *outputs[64]; /* --output NAME, then the names in an OIP file's "outputs" */
  size_t noutputs;
  json_t *file_outputs; /* owns the strings taken from files */
  json_t *params;       /* from --param and --params */
} opts;

static int usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("tallyctl: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputs(" (see tallyctl --help)\n", stderr);
  va_end(ap);
  return EXIT_USAGE;
}

static int exit_of(const tally_error *e) {
  switch (e->code) {
    case TALLY_ECONNECT: return EXIT_CONNECT;
    case TALLY_EHTTP: return e->http_status >= 500 ? EXIT_5XX : EXIT_4XX;
    case TALLY_EPROTO: return EXIT_5XX;
    default: return EXIT_USAGE;
  }
}

static int report(const tally_error *e) {
  if (e->http_status)
    fprintf(stderr, "tallyctl: HTTP %d: %s\n", e->http_status, e->message);
  else
    fprintf(stderr, "tallyctl: %s\n", e->message);
  return exit_of(e);
}

/* ---- parameters ---- */

static int add_param(opts *o, const char *kv) {
  const char *eq = strchr(kv, '=');
  if (!eq || eq == kv) return usage_error("--param wants KEY=VALUE, got '%s'", kv);
  char key[256];
  if ((size_t)(eq - kv) >= sizeof key) return usage_error("--param: key too long");
  memcpy(key, kv, (size_t)(eq - kv));
  key[eq - kv] = 0;
  json_error_t je;
  json_t *v = json_loads(eq + 1, JSON_DECODE_ANY, &je);
  if (!v) v = json_string(eq + 1);
  json_object_set_new(o->params, key, v);
  return 0;
}

static json_t *load_json_arg(const char *arg, const char *what, int *rc) {
  json_error_t je;
  json_t *j = arg[0] == '@' ? json_load_file(arg + 1, 0, &je) : json_loads(arg, 0, &je);
  if (!j)
    *rc = usage_error("%s: %s: line %d: %s", what, arg[0] == '@' ? arg + 1 : "JSON", je.line,
                      je.text);
  return j;
}

/* ---- reading tensors: each is staged as an OIP object whose datatype may be
 * missing, then typed once the model's metadata is known ---- */

/* Shape of nested lists (every row the same length, every number at the same
 * depth) and their values flattened in row-major order. */
static int nested_shape(const json_t *v, json_t *shape, json_t *flat, int depth, int *leaf,
                        const char *name) {
  if (!json_is_array(v)) {
    if (!json_is_number(v) && !json_is_boolean(v))
      return usage_error("tensor '%s': a value that is not a number", name);
    if (*leaf < 0) *leaf = depth;
    if (*leaf != depth) return usage_error("tensor '%s': ragged nesting", name);
    return json_array_append(flat, (json_t *)v) ? EXIT_USAGE : 0;
  }
  if (depth >= TALLY_MAX_DIMS || (*leaf >= 0 && depth >= *leaf))
    return usage_error("tensor '%s': ragged nesting or more than %d dimensions", name,
                       TALLY_MAX_DIMS);
  size_t n = json_array_size(v);
  if ((size_t)depth == json_array_size(shape))
    json_array_append_new(shape, json_integer((json_int_t)n));
  else if (json_integer_value(json_array_get(shape, (size_t)depth)) != (json_int_t)n)
    return usage_error("tensor '%s': rows of different lengths", name);
  for (size_t i = 0; i < n; i++) {
    int rc = nested_shape(json_array_get(v, i), shape, flat, depth + 1, leaf, name);
    if (rc) return rc;
  }
  return 0;
}

static int stage_nested(json_t *staged, const char *name, const json_t *v) {
  json_t *shape = json_array(), *flat = json_array();
  int leaf = -1;
  int rc = nested_shape(v, shape, flat, 0, &leaf, name);
  if (rc) {
    json_decref(shape), json_decref(flat);
    return rc;
  }
  json_array_append_new(staged,
                        json_pack("{s:s, s:o, s:o}", "name", name, "shape", shape, "data", flat));
  return 0;
}

static int read_json_file(const char *path, json_t *staged, opts *o) {
  json_error_t je;
  json_t *j = json_load_file(path, 0, &je);
  if (!j) return usage_error("%s: line %d: %s", path, je.line, je.text);
  int rc = 0;
  if (!json_is_object(j)) {
    rc = usage_error("%s: expected a JSON object", path);
    goto out;
  }
  json_t *inputs = json_object_get(j, "inputs");
  if (json_is_array(inputs)) { /* the OIP request form */
    size_t i;
    json_t *t;
    json_array_foreach(inputs, i, t) {
      const char *name = json_string_value(json_object_get(t, "name"));
      if (!name || !json_object_get(t, "data")) {
        rc = usage_error("%s: inputs[%zu] needs a name and data", path, i);
        goto out;
      }
      json_t *shape = json_object_get(t, "shape");
      if (!shape) { /* no shape: take it from the nesting */
        if ((rc = stage_nested(staged, name, json_object_get(t, "data")))) goto out;
        json_t *dt = json_object_get(t, "datatype");
        if (dt)
          json_object_set(json_array_get(staged, json_array_size(staged) - 1), "datatype", dt);
      } else {
        json_array_append(staged, t);
      }
    }
    const char *key;
    json_t *v;
    json_object_foreach(json_object_get(j, "parameters"), key, v) {
      if (!json_object_get(o->params, key)) json_object_set(o->params, key, v); /* flags win */
    }
    /* the outputs a curl body asks for: a file sent as it is must get the
     * same answer from tallyctl */
    json_t *outs = json_object_get(j, "outputs");
    if (outs && !json_is_array(outs)) {
      rc = usage_error("%s: \"outputs\" must be an array", path);
      goto out;
    }
    json_array_foreach(outs, i, v) {
      json_t *name = json_object_get(v, "name");
      if (!json_is_string(name)) {
        rc = usage_error("%s: outputs[%zu] needs a name", path, i);
        goto out;
      }
      if (o->noutputs == sizeof o->outputs / sizeof *o->outputs) {
        rc = usage_error("%s: too many outputs", path);
        goto out;
      }
      json_array_append(o->file_outputs, name);
      o->outputs[o->noutputs++] = json_string_value(name);
    }
  } else {
    const char *key;
    json_t *v;
    json_object_foreach(j, key, v) {
      if ((rc = stage_nested(staged, key, v))) goto out;
    }
  }
out:
  json_decref(j);
  return rc;
}

static json_t *csv_number(const char *s, int *ok) {
  char *end;
  errno = 0;
  long long k = strtoll(s, &end, 10);
  if (*s && !*end && !errno) return *ok = 1, json_integer(k);
  errno = 0;
  double d = strtod(s, &end);
  if (*s && !*end && !errno) return *ok = 1, json_real(d);
  *ok = 0;
  return NULL;
}

static char *trim(char *s) {
  while (isspace((unsigned char)*s)) s++;
  char *e = s + strlen(s);
  while (e > s && isspace((unsigned char)e[-1])) *--e = 0;
  if (e - s >= 2 && *s == '"' && e[-1] == '"') s++, e[-1] = 0;
  return s;
}

static int read_csv_file(const char *path, const char *input, json_t *staged) {
  FILE *f = fopen(path, "r");
  if (!f) return usage_error("%s: %s", path, strerror(errno));
  json_t *header = NULL, *rows = json_array();
  char *line = NULL;
  size_t cap = 0;
  int rc = 0, lineno = 0;
  size_t ncol = 0;
  while (getline(&line, &cap, f) >= 0) {
    lineno++;
    char *l = trim(line);
    if (!*l || *l == '#') continue;
    json_t *row = json_array(), *names = json_array();
    int numeric = 1;
    for (char *p = l, *field; (field = strsep(&p, ","));) {
      char *t = trim(field);
      int ok;
      json_t *x = csv_number(t, &ok);
      if (!ok) numeric = 0;
      json_array_append_new(row, x ? x : json_null());
      json_array_append_new(names, json_string(t));
    }
    if (!numeric && !header && json_array_size(rows) == 0) {
      header = names;
      ncol = json_array_size(header);
      json_decref(row);
      continue;
    }
    json_decref(names);
    if (!numeric) {
      json_decref(row);
      rc = usage_error("%s:%d: a value that is not a number", path, lineno);
      goto out;
    }
    if (!ncol) ncol = json_array_size(row);
    if (json_array_size(row) != ncol) {
      json_decref(row);
      rc = usage_error("%s:%d: %zu fields, expected %zu", path, lineno, json_array_size(row), ncol);
      goto out;
    }
    json_array_append_new(rows, row);
  }
  size_t nrow = json_array_size(rows);
  if (!nrow) {
    rc = usage_error("%s: no rows", path);
    goto out;
  }
  if (input) { /* one matrix */
    json_t *flat = json_array();
    size_t i, k;
    json_t *r, *x;
    json_array_foreach(rows, i, r) json_array_foreach(r, k, x) json_array_append(flat, x);
    json_array_append_new(staged, json_pack("{s:s, s:[I,I], s:o}", "name", input, "shape",
                                            (json_int_t)nrow, (json_int_t)ncol, "data", flat));
  } else {
    if (!header) {
      rc = usage_error("%s: no header row naming the columns (or use --input NAME)", path);
      goto out;
    }
    for (size_t c = 0; c < ncol; c++) {
      json_t *col = json_array();
      for (size_t i = 0; i < nrow; i++)
        json_array_append(col, json_array_get(json_array_get(rows, i), c));
      json_array_append_new(
          staged, json_pack("{s:O, s:[I], s:o}", "name", json_array_get(header, c), "shape",
                            (json_int_t)nrow, "data", col));
    }
  }
out:
  free(line);
  fclose(f);
  json_decref(header);
  json_decref(rows);
  return rc;
}

static int ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), k = strlen(suffix);
  return n >= k && strcasecmp(s + n - k, suffix) == 0;
}

static int read_files(opts *o, json_t *staged) {
  if (o->nfiles == 0) return usage_error("no input files");
  for (int i = 0; i < o->nfiles; i++) {
    const file_arg *f = &o->files[i];
    int rc = ends_with(f->path, ".csv") ? read_csv_file(f->path, f->input, staged)
                                        : read_json_file(f->path, staged, o);
    if (rc) return rc;
  }
  return 0;
}

/* The datatype a staged tensor without one gets: --datatype NAME=DT, then
 * --datatype DT, then the model's metadata, then INT64 for all-integer data
 * and FP32 otherwise (labels, token ids and targets come out right). */
static const char *pick_dtype(const opts *o, const char *name, const json_t *meta,
                              const json_t *data) {
  size_t n = strlen(name);
  for (int i = 0; i < o->ndtypes; i++)
    if (strncmp(o->dtypes[i], name, n) == 0 && o->dtypes[i][n] == '=') return o->dtypes[i] + n + 1;
  for (int i = 0; i < o->ndtypes; i++)
    if (!strchr(o->dtypes[i], '=')) return o->dtypes[i];
  size_t k;
  const json_t *in;
  json_array_foreach(json_object_get(meta, "inputs"), k, in) {
    const char *nm = json_string_value(json_object_get(in, "name"));
    const char *dt = json_string_value(json_object_get(in, "datatype"));
    if (nm && dt && strcmp(nm, name) == 0) return dt;
  }
  const json_t *x;
  json_array_foreach(data, k, x) if (!json_is_integer(x)) return "FP32";
  return "INT64";
}

typedef struct tensors {
  tally_tensor *t;
  size_t n;
} tensors;

static void tensors_free(tensors *ts) {
  for (size_t i = 0; i < ts->n; i++) tally_tensor_free(&ts->t[i]);
  free(ts->t);
}

static int load_tensors(tally_client *c, opts *o, const char *model, tensors *ts) {
  ts->t = NULL, ts->n = 0;
  json_t *staged = json_array(), *meta = NULL;
  int rc = read_files(o, staged);
  if (rc) goto out;
  size_t i;
  json_t *s;
  int untyped = 0;
  json_array_foreach(staged, i, s) untyped |= !json_object_get(s, "datatype");
  if (untyped && o->ndtypes == 0) {
    tally_error e = {0};
    if (tally_model_metadata(c, model, o->model_version, &meta, &e)) {
      rc = report(&e);
      goto out;
    }
  }
  ts->t = calloc(json_array_size(staged) + 1, sizeof *ts->t);
  json_array_foreach(staged, i, s) {
    if (!json_object_get(s, "datatype"))
      json_object_set_new(s, "datatype",
                          json_string(pick_dtype(o, json_string_value(json_object_get(s, "name")),
                                                 meta, json_object_get(s, "data"))));
    tally_error e = {0};
    if (tally_tensor_from_json(s, &ts->t[ts->n], &e)) {
      rc = usage_error("%s", e.message);
      goto out;
    }
    ts->n++;
  }
out:
  json_decref(staged);
  json_decref(meta);
  return rc;
}

/* ---- printing ---- */

static void print_scalar(const json_t *v) {
  if (json_is_string(v))
    fputs(json_string_value(v), stdout);
  else {
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(9));
    if (s) fputs(s, stdout);
    free(s);
  }
}

/* Nested objects as "a.b.c<TAB>value" lines; arrays of scalars joined by commas. */
static void print_flat(const json_t *v, char *prefix, size_t len, size_t cap) {
  if (json_is_object(v)) {
    const char *k;
    json_t *x;
    json_object_foreach((json_t *)v, k, x) {
      int n = snprintf(prefix + len, cap - len, "%s%s", len ? "." : "", k);
      print_flat(x, prefix, len + (n > 0 ? (size_t)n : 0) < cap ? len + (size_t)n : cap - 1, cap);
      prefix[len] = 0;
    }
    return;
  }
  if (json_is_array(v)) {
    size_t i;
    json_t *x;
    int scalars = 1;
    json_array_foreach(v, i, x) scalars &= !json_is_object(x) && !json_is_array(x);
    if (!scalars) {
      json_array_foreach(v, i, x) {
        int n = snprintf(prefix + len, cap - len, "[%zu]", i);
        print_flat(x, prefix, len + (size_t)n < cap ? len + (size_t)n : cap - 1, cap);
        prefix[len] = 0;
      }
      return;
    }
    printf("%s\t", prefix);
    json_array_foreach(v, i, x) {
      if (i) putchar(',');
      print_scalar(x);
    }
    putchar('\n');
    return;
  }
  printf("%s\t", prefix);
  print_scalar(v);
  putchar('\n');
}

static void print_outputs(const json_t *answer) {
  size_t i;
  const json_t *o;
  json_array_foreach(json_object_get(answer, "outputs"), i, o) {
    const json_t *shape = json_object_get(o, "shape"), *data = json_object_get(o, "data");
    printf("# %s %s [", json_string_value(json_object_get(o, "name")),
           json_string_value(json_object_get(o, "datatype")));
    size_t k;
    const json_t *d;
    json_int_t last = 1;
    json_array_foreach(shape, k, d) {
      printf("%s%lld", k ? ", " : "", (long long)json_integer_value(d));
      last = json_integer_value(d);
    }
    printf("]\n");
    if (json_array_size(shape) < 2) last = 1; /* a vector prints one value a line */
    /* data may arrive nested: flatten it first */
    json_t *flat = json_array(), *stack[TALLY_MAX_DIMS + 2];
    size_t idx[TALLY_MAX_DIMS + 2];
    int sp = 0;
    stack[0] = (json_t *)data, idx[0] = 0;
    if (!json_is_array(data)) json_array_append(flat, (json_t *)data), sp = -1;
    while (sp >= 0) {
      if (idx[sp] >= json_array_size(stack[sp])) {
        sp--;
        continue;
      }
      json_t *x = json_array_get(stack[sp], idx[sp]++);
      if (json_is_array(x) && sp + 1 < TALLY_MAX_DIMS + 2)
        stack[++sp] = x, idx[sp] = 0;
      else
        json_array_append(flat, x);
    }
    size_t n = json_array_size(flat);
    for (size_t e = 0; e < n; e++) {
      print_scalar(json_array_get(flat, e));
      putchar(last > 0 && (e + 1) % (size_t)last == 0 ? '\n' : '\t');
    }
    if (last > 0 && n % (size_t)last) putchar('\n');
    json_decref(flat);
  }
  const json_t *p = json_object_get(answer, "parameters");
  if (json_is_object(p) && json_object_size(p)) {
    char prefix[512] = "parameters";
    print_flat(p, prefix, strlen(prefix), sizeof prefix);
  }
}

static void print_index(const json_t *index) {
  int w[4] = {4, 7, 5, 6};
  static const char *keys[4] = {"name", "version", "state", "reason"};
  size_t i;
  const json_t *r;
  json_array_foreach(index, i, r) for (int k = 0; k < 4; k++) {
    const char *s = json_string_value(json_object_get(r, keys[k]));
    if (s && (int)strlen(s) > w[k]) w[k] = (int)strlen(s);
  }
  printf("%-*s  %-*s  %-*s  %s\n", w[0], "NAME", w[1], "VERSION", w[2], "STATE", "REASON");
  json_array_foreach(index, i, r) {
    const char *v[4];
    for (int k = 0; k < 4; k++) {
      v[k] = json_string_value(json_object_get(r, keys[k]));
      if (!v[k]) v[k] = "";
    }
    printf("%-*s  %-*s  %-*s  %s\n", w[0], v[0], w[1], v[1], w[2], v[2], v[3]);
  }
}

/* A double as the shortest text that reads back to it (%.15g, %.16g or
 * %.17g), as tallyd writes it: printing 0.845 as 0.84499999999999997, or
 * cutting 0.9963888230698308 to 9 digits, would misreport the answer. */
static void print_real(double v) {
  char t[40];
  if (!isfinite(v)) {
    fputs("null", stdout);
    return;
  }
  for (int p = 15; p <= 17; p++) {
    snprintf(t, sizeof t, "%.*g", p, v);
    if (strtod(t, NULL) == v) break;
  }
  fputs(t, stdout);
  if (!strpbrk(t, ".eEn")) fputs(".0", stdout);
}

/* JSON with two-space indentation; arrays of scalars stay on one line. */
static void print_json(const json_t *v, int depth) {
  if (json_is_real(v)) {
    print_real(json_real_value(v));
  } else if (json_is_object(v)) {
    const char *k;
    json_t *x;
    int first = 1;
    if (!json_object_size(v)) {
      fputs("{}", stdout);
      return;
    }
    fputs("{", stdout);
    json_object_foreach((json_t *)v, k, x) {
      json_t *kj = json_string(k);
      char *ks = kj ? json_dumps(kj, JSON_ENCODE_ANY) : NULL;
      json_decref(kj);
      printf("%s\n%*s%s: ", first ? "" : ",", 2 * (depth + 1), "", ks ? ks : "\"\"");
      free(ks);
      print_json(x, depth + 1);
      first = 0;
    }
    printf("\n%*s}", 2 * depth, "");
  } else if (json_is_array(v)) {
    size_t i;
    json_t *x;
    int flat = 1;
    json_array_foreach(v, i, x) flat &= !json_is_object(x) && !json_is_array(x);
    fputs("[", stdout);
    json_array_foreach(v, i, x) {
      if (flat)
        fputs(i ? ", " : "", stdout);
      else
        printf("%s\n%*s", i ? "," : "", 2 * (depth + 1), "");
      print_json(x, depth + 1);
    }
    if (!flat && json_array_size(v)) printf("\n%*s", 2 * depth, "");
    fputs("]", stdout);
  } else {
    char *s = json_dumps(v, JSON_ENCODE_ANY);
    if (s) fputs(s, stdout);
    free(s);
  }
}

static void print_answer(const opts *o, const json_t *answer) {
  if (strcmp(o->format, "json") == 0) {
    print_json(answer, 0);
    fputs("\n", stdout);
    return;
  }
  if (json_is_array(answer) &&
      (json_array_size(answer) == 0 || json_object_get(json_array_get(answer, 0), "state")))
    print_index(answer);
  else if (json_is_array(json_object_get(answer, "outputs")) &&
           json_object_get(answer, "model_name")) {
    printf("model_name\t%s\nmodel_version\t%s\n",
           json_string_value(json_object_get(answer, "model_name")),
           json_string_value(json_object_get(answer, "model_version")));
    print_outputs(answer);
  } else {
    char prefix[512] = "";
    print_flat(answer, prefix, 0, sizeof prefix);
  }
}

/* ---- commands ---- */

static int finish(const opts *o, int rc, json_t *answer, const tally_error *e) {
  if (rc) return json_decref(answer), report(e);
  print_answer(o, answer);
  json_decref(answer);
  return EXIT_OK;
}

static int cmd_health(tally_client *c, opts *o) {
  const char *what = o->npos > 1 ? o->pos[1] : "ready";
  if (o->npos > 2 || (strcmp(what, "live") != 0 && strcmp(what, "ready") != 0))
    return usage_error("health [live|ready]");
  json_t *answer = NULL;
  tally_error e = {0};
  char path[32];
  snprintf(path, sizeof path, "/v2/health/%s", what);
  int rc = tally_request(c, "GET", path, NULL, &answer, &e);
  return finish(o, rc, answer, &e);
}

typedef int (*tensor_fn)(tally_client *, const opts *, const char *model, const tally_tensor *,
                         size_t, json_t *, json_t **, tally_error *);

static int infer_fn(tally_client *c, const opts *o, const char *m, const tally_tensor *t, size_t n,
                    json_t *p, json_t **a, tally_error *e) {
  return tally_infer_outputs(c, m, o->model_version, t, n, p, o->outputs, o->noutputs, a, e);
}

static int fit_fn(tally_client *c, const opts *o, const char *m, const tally_tensor *t, size_t n,
                  json_t *p, json_t **a, tally_error *e) {
  (void)o; /* a fit always builds on the newest version */
  return tally_fit(c, m, t, n, p, a, e);
}

static int evaluate_fn(tally_client *c, const opts *o, const char *m, const tally_tensor *t,
                       size_t n, json_t *p, json_t **a, tally_error *e) {
  return tally_evaluate(c, m, o->model_version, t, n, p, a, e);
}

static int calibrate_fn(tally_client *c, const opts *o, const char *m, const tally_tensor *t,
                        size_t n, json_t *p, json_t **a, tally_error *e) {
  (void)o;
  return tally_calibrate(c, m, t, n, p, a, e);
}

static int cmd_tensors(tally_client *c, opts *o, tensor_fn fn) {
  if (o->npos != 2) return usage_error("%s MODEL FILE...", o->pos[0]);
  tensors ts;
  int rc = load_tensors(c, o, o->pos[1], &ts);
  if (rc) return tensors_free(&ts), rc;
  json_t *answer = NULL;
  tally_error e = {0};
  rc = fn(c, o, o->pos[1], ts.t, ts.n, json_object_size(o->params) ? o->params : NULL, &answer, &e);
  tensors_free(&ts);
  return finish(o, rc, answer, &e);
}

static int cmd_metadata(tally_client *c, opts *o) {
  json_t *answer = NULL;
  tally_error e = {0};
  int rc;
  if (o->npos == 1)
    rc = tally_server_metadata(c, &answer, &e);
  else if (o->npos == 2)
    rc = tally_model_metadata(c, o->pos[1], o->model_version, &answer, &e);
  else
    return usage_error("metadata [MODEL]");
  return finish(o, rc, answer, &e);
}

static int cmd_models(tally_client *c, opts *o) {
  if (o->npos != 1) return usage_error("models takes no arguments");
  json_t *answer = NULL;
  tally_error e = {0};
  int rc = tally_repository_index(c, &answer, &e);
  return finish(o, rc, answer, &e);
}

static int cmd_load(tally_client *c, opts *o, int load) {
  if (o->npos != 2) return usage_error("%s MODEL", o->pos[0]);
  tally_error e = {0};
  int rc = load ? tally_load(c, o->pos[1], &e) : tally_unload(c, o->pos[1], &e);
  json_t *answer =
      json_pack("{s:s, s:s}", "model_name", o->pos[1], "state", load ? "READY" : "UNAVAILABLE");
  return finish(o, rc, answer, &e);
}

static int cmd_session(tally_client *c, opts *o) {
  const char *sub = o->npos > 1 ? o->pos[1] : "";
  json_t *answer = NULL;
  tally_error e = {0};
  int rc;
  if (strcmp(sub, "create") == 0 && o->npos == 3) {
    rc = tally_session_create(c, o->pos[2], json_object_size(o->params) ? o->params : NULL, &answer,
                              &e);
  } else if (strcmp(sub, "infer") == 0 && o->npos == 4) {
    tensors ts;
    if ((rc = load_tensors(c, o, o->pos[2], &ts))) return tensors_free(&ts), rc;
    rc = tally_session_infer_outputs(c, o->pos[2], o->pos[3], ts.t, ts.n,
                                     json_object_size(o->params) ? o->params : NULL, o->outputs,
                                     o->noutputs, &answer, &e);
    tensors_free(&ts);
  } else if (strcmp(sub, "get") == 0 && o->npos == 4) {
    rc = tally_session_get(c, o->pos[2], o->pos[3], &answer, &e);
  } else if (strcmp(sub, "delete") == 0 && o->npos == 4) {
    rc = tally_session_delete(c, o->pos[2], o->pos[3], &e);
    if (!rc) answer = json_pack("{s:s, s:b}", "session_id", o->pos[3], "deleted", 1);
  } else {
    return usage_error(
        "session create MODEL | infer MODEL ID FILE... | get MODEL ID | delete MODEL ID");
  }
  return finish(o, rc, answer, &e);
}

/* The metric name of an exposition line: a sample's name up to its labels
 * or value, a "# HELP NAME ..." or "# TYPE NAME ..." comment's NAME. */
static size_t metric_name(const char *line, const char **name) {
  if (line[0] == '#') {
    if (strncmp(line, "# HELP ", 7) != 0 && strncmp(line, "# TYPE ", 7) != 0)
      return *name = line, 0;
    line += 7;
  }
  *name = line;
  return strcspn(line, "{ \t");
}

/* Whether a line belongs to the family `family`: its name, or a histogram's
 * or summary's NAME_bucket / NAME_sum / NAME_count. */
static int in_family(const char *name, size_t n, const char *family) {
  size_t k = strlen(family);
  if (n < k || strncmp(name, family, k) != 0) return 0;
  if (n == k) return 1;
  const char *rest = name + k;
  size_t r = n - k;
  return (r == 7 && !strncmp(rest, "_bucket", 7)) || (r == 4 && !strncmp(rest, "_sum", 4)) ||
         (r == 6 && !strncmp(rest, "_count", 6));
}

static int cmd_metrics(tally_client *c, opts *o) {
  char *text;
  tally_error e = {0};
  if (tally_metrics(c, &text, NULL, &e)) return report(&e);
  if (o->npos == 1) {
    fputs(text, stdout);
  } else {
    for (char *p = text, *line; (line = strsep(&p, "\n"));) {
      const char *name;
      size_t n = metric_name(line, &name);
      int keep = 0;
      for (int i = 1; i < o->npos && n && !keep; i++) keep = in_family(name, n, o->pos[i]);
      if (keep) puts(line);
    }
  }
  free(text);
  return EXIT_OK;
}

static void print_text(const char *text, size_t len, void *user) {
  (void)user;
  fwrite(text, 1, len, stdout);
  fflush(stdout);
}

static int cmd_complete(tally_client *c, opts *o) {
  if (o->npos != 3) return usage_error("complete MODEL PROMPT");
  json_t *body = o->params ? json_deep_copy(o->params) : json_object();
  if (!body) return usage_error("out of memory");
  json_object_set_new(body, "model", json_string(o->pos[1]));
  json_object_set_new(body, "prompt", json_string(o->pos[2]));
  if (!json_object_get(body, "max_tokens"))
    json_object_set_new(body, "max_tokens", json_integer(64));
  tally_error e = {0};
  json_t *ans = NULL;
  int rc = tally_complete(c, body, o->stream ? print_text : NULL, NULL, &ans, &e);
  json_decref(body);
  if (rc) {
    if (o->stream) fputc('\n', stdout);
    return report(&e);
  }
  if (o->stream) {
    fputc('\n', stdout);
    return EXIT_OK;
  }
  if (o->format_given && strcmp(o->format, "table") == 0) {
    const char *t = json_string_value(
        json_object_get(json_array_get(json_object_get(ans, "choices"), 0), "text"));
    printf("%s\n", t ? t : "");
  } else {
    print_answer(o, ans);
  }
  json_decref(ans);
  return EXIT_OK;
}

/* A key in tallyd --keygen's one format: 32 random bytes as 43 base64url
 * digits (no padding). The key file stores only its SHA-256, so a leaked key
 * file grants nothing. */
static int cmd_keygen(opts *o) {
  if (o->npos != 1) return usage_error("keygen takes no arguments");
  if (strcmp(o->scope, "infer") != 0 && strcmp(o->scope, "admin") != 0)
    return usage_error("--scope must be infer or admin");
  unsigned char raw[32], md[EVP_MAX_MD_SIZE];
  unsigned mdlen = 0;
  if (RAND_bytes(raw, sizeof raw) != 1) {
    fprintf(stderr, "tallyctl: RAND_bytes failed\n");
    return EXIT_USAGE;
  }
  static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  char key[45], hex[2 * EVP_MAX_MD_SIZE + 1];
  size_t k = 0;
  for (size_t i = 0; i < sizeof raw; i += 3) {
    uint32_t v = (uint32_t)raw[i] << 16;
    if (i + 1 < sizeof raw) v |= (uint32_t)raw[i + 1] << 8;
    if (i + 2 < sizeof raw) v |= raw[i + 2];
    key[k++] = b64[v >> 18 & 63];
    key[k++] = b64[v >> 12 & 63];
    key[k++] = b64[v >> 6 & 63];
    key[k++] = b64[v & 63];
  }
  key[43] = 0; /* 256 bits = 43 base64 digits; the 44th would be padding */
  OPENSSL_cleanse(raw, sizeof raw);
  if (EVP_Digest(key, strlen(key), md, &mdlen, EVP_sha256(), NULL) != 1) {
    fprintf(stderr, "tallyctl: SHA-256 failed\n");
    return EXIT_USAGE;
  }
  for (unsigned i = 0; i < mdlen; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
  if (o->format_given && strcmp(o->format, "json") == 0) {
    char line[sizeof hex + 16];
    snprintf(line, sizeof line, "%s %s", hex, o->scope);
    json_t *j = json_pack("{s:s, s:s, s:s, s:s}", "key", key, "scope", o->scope, "sha256", hex,
                          "key_file_line", line);
    print_answer(o, j);
    json_decref(j);
  } else {
    printf("%s\n%s %s\n", key, hex, o->scope);
  }
  return EXIT_OK;
}

/* ---- arguments ---- */

static int parse_args(int argc, char **argv, opts *o) {
  const char *pending_input = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      for (size_t k = 0; o->npos > 0 && k < sizeof command_help / sizeof *command_help; k++)
        if (strcmp(o->pos[0], command_help[k].cmd) == 0) {
          fputs(command_help[k].text, stdout);
          fputs("\n(tallyctl --help lists the options every command takes.)\n", stdout);
          exit(EXIT_OK);
        }
      fputs(usage_text, stdout);
      exit(EXIT_OK);
    }
    if (strcmp(a, "--binary") == 0) {
      o->binary = 1;
      continue;
    }
    if (strcmp(a, "--stream") == 0) {
      o->stream = 1;
      continue;
    }
    if (strncmp(a, "--", 2) == 0) {
      static const char *with_value[] = {"url",           "api-key", "timeout",  "format",
                                         "model-version", "input",   "datatype", "param",
                                         "params",        "scope",   "output"};
      const char *name = a + 2, *val = NULL;
      char nbuf[32];
      const char *eq = strchr(name, '=');
      if (eq) {
        snprintf(nbuf, sizeof nbuf, "%.*s", (int)(eq - name), name);
        name = nbuf, val = eq + 1;
      }
      int known = 0;
      for (size_t k = 0; k < sizeof with_value / sizeof *with_value; k++)
        known |= strcmp(name, with_value[k]) == 0;
      if (!known) return usage_error("unknown option '%s'", a);
      if (!val) {
        if (i + 1 >= argc) return usage_error("--%s needs a value", name);
        val = argv[++i];
      }
      if (strcmp(name, "url") == 0)
        o->url = val;
      else if (strcmp(name, "api-key") == 0)
        o->api_key = val;
      else if (strcmp(name, "timeout") == 0) {
        char *end;
        o->timeout_s = strtod(val, &end);
        if (*end || end == val || o->timeout_s < 0 || o->timeout_s > 86400)
          return usage_error("--timeout wants seconds in [0, 86400], got '%s'", val);
      } else if (strcmp(name, "format") == 0) {
        if (strcmp(val, "json") != 0 && strcmp(val, "table") != 0)
          return usage_error("--format json|table");
        o->format = val, o->format_given = 1;
      } else if (strcmp(name, "model-version") == 0)
        o->model_version = val;
      else if (strcmp(name, "input") == 0)
        pending_input = val;
      else if (strcmp(name, "output") == 0) {
        if (o->noutputs == sizeof o->outputs / sizeof *o->outputs)
          return usage_error("too many --output");
        o->outputs[o->noutputs++] = val;
      } else if (strcmp(name, "datatype") == 0) {
        tally_dtype dt;
        const char *e = strchr(val, '=');
        if (tally_dtype_from_name(e ? e + 1 : val, &dt))
          return usage_error("unknown datatype in '%s'", val);
        if (o->ndtypes == (int)(sizeof o->dtypes / sizeof *o->dtypes))
          return usage_error("too many --datatype");
        o->dtypes[o->ndtypes++] = val;
      } else if (strcmp(name, "param") == 0) {
        int rc = add_param(o, val);
        if (rc) return rc;
      } else if (strcmp(name, "params") == 0) {
        int rc = 0;
        json_t *p = load_json_arg(val, "--params", &rc);
        if (!p) return rc;
        if (!json_is_object(p))
          return json_decref(p), usage_error("--params must be a JSON object");
        json_object_update_missing(o->params, p); /* --param KEY=VALUE wins */
        json_decref(p);
      } else
        o->scope = val;
      continue;
    }
    /* positional: the command and its words, then files */
    int words = 1;
    if (o->npos > 0) {
      const char *cmd = o->pos[0];
      if (!strcmp(cmd, "infer") || !strcmp(cmd, "fit") || !strcmp(cmd, "evaluate") ||
          !strcmp(cmd, "calibrate"))
        words = 2;
      else if (!strcmp(cmd, "session"))
        words = (o->npos > 1 && strcmp(o->pos[1], "infer") == 0) ? 4 : 8;
      else
        words = 8;
    }
    if (o->npos < words) {
      if (o->npos == (int)(sizeof o->pos / sizeof *o->pos))
        return usage_error("too many arguments");
      o->pos[o->npos++] = a;
    } else {
      if (o->nfiles == (int)(sizeof o->files / sizeof *o->files))
        return usage_error("too many files");
      o->files[o->nfiles].path = a;
      o->files[o->nfiles++].input = pending_input;
      pending_input = NULL;
    }
  }
  if (pending_input) return usage_error("--input %s is not followed by a CSV file", pending_input);
  return 0;
}

int main(int argc, char **argv) {
  opts o = {.format = "json", .scope = "infer", .timeout_s = 60};
  o.params = json_object();
  o.file_outputs = json_array();
  int rc = parse_args(argc, argv, &o);
  if (rc) goto out;
  if (o.npos == 0) {
    fputs(usage_text, stderr);
    rc = EXIT_USAGE;
    goto out;
  }
  const char *cmd = o.pos[0];
  if (strcmp(cmd, "keygen") == 0) {
    rc = cmd_keygen(&o);
    goto out;
  }
  int takes_files = !strcmp(cmd, "infer") || !strcmp(cmd, "fit") || !strcmp(cmd, "evaluate") ||
                    !strcmp(cmd, "calibrate") ||
                    (!strcmp(cmd, "session") && o.npos > 1 && !strcmp(o.pos[1], "infer"));
  if (o.nfiles && !takes_files) {
    rc = usage_error("%s takes no files", cmd);
    goto out;
  }
  int infers = !strcmp(cmd, "infer") ||
               (!strcmp(cmd, "session") && o.npos > 1 && !strcmp(o.pos[1], "infer"));
  if (o.noutputs && !infers) {
    rc = usage_error("--output is for infer and session infer");
    goto out;
  }
  tally_client *c = NULL;
  tally_error e = {0};
  if (tally_client_new(&c, o.url, o.api_key, (long)(o.timeout_s * 1000), &e)) {
    rc = report(&e);
    goto out;
  }
  if (o.binary) tally_client_set_binary_min(c, 0);
  if (!strcmp(cmd, "health"))
    rc = cmd_health(c, &o);
  else if (!strcmp(cmd, "models"))
    rc = cmd_models(c, &o);
  else if (!strcmp(cmd, "metadata"))
    rc = cmd_metadata(c, &o);
  else if (!strcmp(cmd, "infer"))
    rc = cmd_tensors(c, &o, infer_fn);
  else if (!strcmp(cmd, "fit"))
    rc = cmd_tensors(c, &o, fit_fn);
  else if (!strcmp(cmd, "evaluate"))
    rc = cmd_tensors(c, &o, evaluate_fn);
  else if (!strcmp(cmd, "calibrate"))
    rc = cmd_tensors(c, &o, calibrate_fn);
  else if (!strcmp(cmd, "load"))
    rc = cmd_load(c, &o, 1);
  else if (!strcmp(cmd, "unload"))
    rc = cmd_load(c, &o, 0);
  else if (!strcmp(cmd, "session"))
    rc = cmd_session(c, &o);
  else if (!strcmp(cmd, "metrics"))
    rc = cmd_metrics(c, &o);
  else if (!strcmp(cmd, "complete"))
    rc = cmd_complete(c, &o);
  else
    rc = usage_error("unknown command '%s'", cmd);
  tally_client_free(c);
out:
  json_decref(o.params);
  json_decref(o.file_outputs);
  return rc;
}
