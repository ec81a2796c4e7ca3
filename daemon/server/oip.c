/* oip.c - OIP v2 tensor codec (see oip.h). */
#include "oip.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

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
    if (json_is_boolean(v)) ((uint8_t *)d)[i] = json_is_true(v);
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
      return ts_errf(err, TS_EINVAL, "input '%s': element %lld (%g) is not an integer (datatype %s)",
                     f->name, (long long)i, r, ts_dtype_name(dt));
    x = (long long)r;
  }
  long long lo = 0, hi = 0;
  switch (dt) {
    case TS_UINT8: lo = 0; hi = UINT8_MAX; break;
    case TS_UINT16: lo = 0; hi = UINT16_MAX; break;
    case TS_UINT32: lo = 0; hi = UINT32_MAX; break;
    case TS_UINT64: lo = 0; hi = INT64_MAX; break;
    case TS_INT8: lo = INT8_MIN; hi = INT8_MAX; break;
    case TS_INT16: lo = INT16_MIN; hi = INT16_MAX; break;
    case TS_INT32: lo = INT32_MIN; hi = INT32_MAX; break;
    default: lo = INT64_MIN; hi = INT64_MAX; break;
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
  if (!json_is_array(data)) return ts_errf(err, TS_EINVAL, "input '%s': data must be an array", name);
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
    return ts_errf(err, TS_EINVAL, "input '%s': data has %lld elements, its shape needs %lld",
                   name, (long long)n, (long long)numel);
  }
  if (sbuf_failed(&b)) return ts_errf(err, TS_ENOMEM, "out of memory");
  size_t len;
  t->data = sbuf_take(&b, &len);
  t->nbytes = len;
  t->owns_data = 1;
  return 0;
}

static int decode_input(json_t *in, int idx, const char *bin, size_t bin_len, size_t *bin_off,
                        int64_t max_elements, ts_tensor *t, ts_err *err) {
  if (!json_is_object(in)) return ts_errf(err, TS_EINVAL, "inputs[%d] is not an object", idx);
  json_t *jn = json_object_get(in, "name"), *js = json_object_get(in, "shape"),
         *jd = json_object_get(in, "datatype"), *data = json_object_get(in, "data"),
         *params = json_object_get(in, "parameters");
  if (!json_is_string(jn)) return ts_errf(err, TS_EINVAL, "inputs[%d]: 'name' must be a string", idx);
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
    return ts_errf(err, TS_EINVAL, "input '%s': rank %d is over the limit of %d", name, nd, TS_MAXDIM);
  for (int i = 0; i < nd; i++) {
    json_t *x = json_array_get(js, (size_t)i);
    if (!json_is_integer(x) || json_integer_value(x) < 0)
      return ts_errf(err, TS_EINVAL, "input '%s': shape[%d] must be a non-negative integer", name, i);
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
  json_t *bsz = params ? json_object_get(params, "binary_data_size") : NULL;
  if (bsz) {
    if (!json_is_integer(bsz) || json_integer_value(bsz) < 0)
      return ts_errf(err, TS_EINVAL, "input '%s': binary_data_size must be a non-negative integer", name);
    size_t n = (size_t)json_integer_value(bsz);
    if (n > bin_len - *bin_off)
      return ts_errf(err, TS_EINVAL,
                     "input '%s': binary_data_size %zu is more than the %zu binary bytes left",
                     name, n, bin_len - *bin_off);
    if (dt != TS_BYTES && n != (size_t)numel * ts_dtype_size(dt))
      return ts_errf(err, TS_EINVAL, "input '%s': binary_data_size %zu does not match shape and "
                     "datatype (%lld x %zu bytes)", name, n, (long long)numel, ts_dtype_size(dt));
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
      return ts_errf(err, TS_ETOOBIG, "inputs[%zu]: the request's tensors need more than "
                     "--max-request-memory (%lld bytes)", i, (long long)max_bytes);
    total += numel * esz;
  }
  return 0;
}

int oip_decode(const char *body, size_t len, size_t json_len, int64_t max_elements,
               oip_request *req, ts_err *err) {
  return oip_decode_capped(body, len, json_len, max_elements, 0, req, err);
}

int oip_decode_capped(const char *body, size_t len, size_t json_len, int64_t max_elements,
                      int64_t max_bytes, oip_request *req, ts_err *err) {
  memset(req, 0, sizeof *req);
  ts_list_init(&req->inputs);
  if (json_len == 0 || json_len > len) {
    if (json_len > len)
      return ts_errf(err, TS_EINVAL, "Inference-Header-Content-Length %zu exceeds the body (%zu bytes)",
                     json_len, len);
    json_len = len;
  }
  if (json_len == 0) return ts_errf(err, TS_EINVAL, "the request body is empty");
  json_error_t je;
  req->root = json_loadb(body, json_len, JSON_REJECT_DUPLICATES, &je);
  if (!req->root)
    return ts_errf(err, json_error_code(&je) == json_error_out_of_memory ? TS_ENOMEM : TS_EINVAL,
                   "malformed JSON at line %d column %d: %s", je.line, je.column, je.text);
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
  if (params && !json_is_null(params)) {
    if (!json_is_object(params)) return ts_errf(err, TS_EINVAL, "'parameters' must be an object");
    req->params = params;
    json_t *bo = json_object_get(params, "binary_data_output");
    req->binary_default = bo && json_is_true(bo);
  }
  json_t *inputs = json_object_get(req->root, "inputs");
  if (!json_is_array(inputs)) return ts_errf(err, TS_EINVAL, "'inputs' must be an array");
  int mr = max_bytes > 0 ? check_request_memory(inputs, max_bytes, err) : 0;
  if (mr) return mr;
  size_t bin_off = 0, bin_len = len - json_len;
  const char *bin = body + json_len;
  size_t i;
  json_t *in;
  json_array_foreach(inputs, i, in) {
    ts_tensor *t = ts_list_add(&req->inputs);
    if (!t) return ts_errf(err, TS_ENOMEM, "out of memory");
    int r = decode_input(in, (int)i, bin, bin_len, &bin_off, max_elements, t, err);
    if (r) {
      ts_free(t);
      req->inputs.n--;
      return r;
    }
    for (int k = 0; k < req->inputs.n - 1; k++)
      if (strcmp(req->inputs.items[k].name, t->name) == 0)
        return ts_errf(err, TS_EINVAL, "input '%s' appears twice", t->name);
  }
  if (bin_off != bin_len)
    return ts_errf(err, TS_EINVAL, "%zu binary bytes after the JSON header are not claimed by any input",
                   bin_len - bin_off);
  json_t *outs = json_object_get(req->root, "outputs");
  if (outs && !json_is_null(outs)) {
    if (!json_is_array(outs)) return ts_errf(err, TS_EINVAL, "'outputs' must be an array");
    size_t n = json_array_size(outs);
    req->outputs = tl_calloc(n ? n : 1, sizeof *req->outputs);
    if (!req->outputs) return ts_errf(err, TS_ENOMEM, "out of memory");
    json_t *o;
    json_array_foreach(outs, i, o) {
      json_t *on = json_object_get(o, "name");
      if (!json_is_object(o) || !json_is_string(on))
        return ts_errf(err, TS_EINVAL, "outputs[%zu] must be an object with a string 'name'", i);
      json_t *op = json_object_get(o, "parameters");
      json_t *bd = json_is_object(op) ? json_object_get(op, "binary_data") : NULL;
      req->outputs[req->n_outputs].binary = bd ? json_is_true(bd) : req->binary_default;
      if (!(req->outputs[req->n_outputs].name = tl_strdup(json_string_value(on))))
        return ts_errf(err, TS_ENOMEM, "out of memory");
      req->n_outputs++;
    }
  }
  return 0;
}

void oip_request_free(oip_request *req) {
  ts_list_free(&req->inputs);
  for (int i = 0; i < req->n_outputs; i++) tl_free(req->outputs[i].name);
  tl_free(req->outputs);
  if (req->root) json_decref(req->root);
  memset(req, 0, sizeof *req);
}

void oip_data_json(sbuf *b, const ts_tensor *t) {
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

int oip_encode(const char *model, int64_t version, const oip_request *req,
               const ts_list *outputs, const json_t *extra_params, sbuf *out, size_t *json_len,
               ts_err *err) {
  /* pick outputs: requested ones in request order, or all */
  int n = req && req->n_outputs ? req->n_outputs : outputs->n;
  const ts_tensor **sel = tl_calloc((size_t)(n ? n : 1), sizeof *sel);
  int *bin = tl_calloc((size_t)(n ? n : 1), sizeof *bin);
  int any_bin = 0, rc = 0;
  if (!sel || !bin) {
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
    } else {
      sel[i] = &outputs->items[i];
      bin[i] = req ? req->binary_default : 0;
    }
    any_bin |= bin[i];
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
    jtext_add(out, extra_params, JT_COMPACT);
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
  tl_free(sel);
  tl_free(bin);
  return rc;
}
