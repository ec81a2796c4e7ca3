/* tensor.c - tensor bookkeeping and lossless-or-refused conversions. */
#include "tensor.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "mem.h"

static const struct {
  const char *oip, *st;
  size_t size;
} dtypes[TS_DTYPE_COUNT] = {
    [TS_BOOL] = {"BOOL", "BOOL", 1},    [TS_UINT8] = {"UINT8", "U8", 1},
    [TS_UINT16] = {"UINT16", "U16", 2}, [TS_UINT32] = {"UINT32", "U32", 4},
    [TS_UINT64] = {"UINT64", "U64", 8}, [TS_INT8] = {"INT8", "I8", 1},
    [TS_INT16] = {"INT16", "I16", 2},   [TS_INT32] = {"INT32", "I32", 4},
    [TS_INT64] = {"INT64", "I64", 8},   [TS_FP16] = {"FP16", "F16", 2},
    [TS_BF16] = {"BF16", "BF16", 2},    [TS_FP32] = {"FP32", "F32", 4},
    [TS_FP64] = {"FP64", "F64", 8},     [TS_BYTES] = {"BYTES", NULL, 0},
};

const char *ts_dtype_name(ts_dtype t) {
  return (unsigned)t < TS_DTYPE_COUNT ? dtypes[t].oip : "?";
}
const char *ts_dtype_st_name(ts_dtype t) {
  return (unsigned)t < TS_DTYPE_COUNT && dtypes[t].st ? dtypes[t].st : "?";
}
size_t ts_dtype_size(ts_dtype t) {
  return (unsigned)t < TS_DTYPE_COUNT ? dtypes[t].size : 0;
}
int ts_dtype_is_float(ts_dtype t) {
  return t == TS_FP16 || t == TS_BF16 || t == TS_FP32 || t == TS_FP64;
}

int ts_dtype_from_name(const char *name, ts_dtype *out) {
  for (int i = 0; i < TS_DTYPE_COUNT; i++)
    if (name && strcmp(name, dtypes[i].oip) == 0) {
      *out = (ts_dtype)i;
      return 0;
    }
  return -TS_EINVAL;
}

int ts_dtype_from_st_name(const char *name, ts_dtype *out) {
  for (int i = 0; i < TS_DTYPE_COUNT; i++)
    if (name && dtypes[i].st && strcmp(name, dtypes[i].st) == 0) {
      *out = (ts_dtype)i;
      return 0;
    }
  return -TS_EINVAL;
}

int ts_numel(const int64_t *shape, int ndim, int64_t *out, ts_err *err) {
  if (ndim < 0 || ndim > TS_MAXDIM)
    return ts_errf(err, TS_EINVAL, "rank %d outside 0..%d", ndim, TS_MAXDIM);
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0)
      return ts_errf(err, TS_EINVAL, "dimension %d is negative (%lld)", i, (long long)shape[i]);
    if (shape[i] != 0 && n > INT64_MAX / 16 / shape[i])
      return ts_errf(err, TS_EINVAL, "shape's element count overflows");
    n *= shape[i];
  }
  *out = n;
  return 0;
}

int64_t ts_tensor_numel(const ts_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

const char *ts_shape_str(const int64_t *shape, int ndim, char *buf, size_t n) {
  size_t off = 0;
  off += snprintf(buf + off, n - off, "[");
  for (int i = 0; i < ndim && off < n; i++)
    off += snprintf(buf + off, n - off, "%s%lld", i ? ", " : "", (long long)shape[i]);
  if (off < n) snprintf(buf + off, n - off, "]");
  return buf;
}

static int set_header(ts_tensor *t, const char *name, ts_dtype dtype, int ndim,
                      const int64_t *shape, ts_err *err) {
  memset(t, 0, sizeof *t);
  int64_t n;
  int r = ts_numel(shape, ndim, &n, err);
  if (r) return r;
  if (name && !(t->name = tl_strdup(name))) return ts_errf(err, TS_ENOMEM, "out of memory");
  t->dtype = dtype;
  t->ndim = ndim;
  memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
  t->nbytes = (size_t)n * ts_dtype_size(dtype);
  return 0;
}

int ts_alloc(ts_tensor *t, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
             ts_err *err) {
  int r = set_header(t, name, dtype, ndim, shape, err);
  if (r) return r;
  t->data = tl_calloc(1, t->nbytes ? t->nbytes : 1);
  if (!t->data) {
    tl_free(t->name);
    t->name = NULL;
    return ts_errf(err, TS_ENOMEM, "out of memory allocating %zu bytes for tensor '%s'", t->nbytes,
                   name ? name : "?");
  }
  t->owns_data = 1;
  return 0;
}

int ts_wrap(ts_tensor *t, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
            void *data, size_t nbytes, ts_err *err) {
  int r = set_header(t, name, dtype, ndim, shape, err);
  if (r) return r;
  if (dtype != TS_BYTES && t->nbytes != nbytes) {
    tl_free(t->name);
    t->name = NULL;
    return ts_errf(err, TS_EINVAL, "tensor '%s': %zu bytes do not match its shape (%zu)",
                   name ? name : "?", nbytes, t->nbytes);
  }
  t->nbytes = nbytes;
  t->data = data;
  t->owns_data = 0;
  return 0;
}

void ts_free(ts_tensor *t) {
  if (!t) return;
  if (t->owns_data) tl_free(t->data);
  tl_free(t->name);
  memset(t, 0, sizeof *t);
}

float ts_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t f;
  if (exp == 0) {
    if (man == 0) {
      f = sign;
    } else { /* subnormal: normalise */
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while (!(man & 0x400));
      f = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    f = sign | 0x7f800000u | (man << 13);
  } else {
    f = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float out;
  memcpy(&out, &f, 4);
  return out;
}

uint16_t ts_float_to_half(float v) {
  uint32_t f;
  memcpy(&f, &v, 4);
  uint32_t sign = (f >> 16) & 0x8000;
  int32_t exp = (int32_t)((f >> 23) & 0xff) - 127 + 15;
  uint32_t man = f & 0x7fffff;
  if (((f >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
  if (exp >= 31) return (uint16_t)(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    man |= 0x800000;
    uint32_t shift = (uint32_t)(14 - exp);
    uint32_t half = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t half = sign | ((uint32_t)exp << 10) | (man >> 13);
  uint32_t rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
  return (uint16_t)half;
}

float ts_bf16_to_float(uint16_t h) {
  uint32_t f = (uint32_t)h << 16;
  float out;
  memcpy(&out, &f, 4);
  return out;
}

uint16_t ts_float_to_bf16(float v) {
  uint32_t f;
  memcpy(&f, &v, 4);
  if ((f & 0x7fffffff) > 0x7f800000) return (uint16_t)((f >> 16) | 0x40);
  f += 0x7fff + ((f >> 16) & 1);
  return (uint16_t)(f >> 16);
}

double ts_get_f64(const ts_tensor *t, int64_t i) {
  const void *p = t->data;
  switch (t->dtype) {
    case TS_BOOL: return ((const uint8_t *)p)[i] ? 1.0 : 0.0;
    case TS_UINT8: return ((const uint8_t *)p)[i];
    case TS_UINT16: return ((const uint16_t *)p)[i];
    case TS_UINT32: return ((const uint32_t *)p)[i];
    case TS_UINT64: return (double)((const uint64_t *)p)[i];
    case TS_INT8: return ((const int8_t *)p)[i];
    case TS_INT16: return ((const int16_t *)p)[i];
    case TS_INT32: return ((const int32_t *)p)[i];
    case TS_INT64: return (double)((const int64_t *)p)[i];
    case TS_FP16: return ts_half_to_float(((const uint16_t *)p)[i]);
    case TS_BF16: return ts_bf16_to_float(((const uint16_t *)p)[i]);
    case TS_FP32: return ((const float *)p)[i];
    case TS_FP64: return ((const double *)p)[i];
    default: return NAN;
  }
}

static int check_numeric(const ts_tensor *t, ts_err *err) {
  if (t->dtype == TS_BYTES || (unsigned)t->dtype >= TS_DTYPE_COUNT)
    return ts_errf(err, TS_EINVAL, "input '%s': datatype %s cannot be converted to a number",
                   t->name ? t->name : "?", ts_dtype_name(t->dtype));
  return 0;
}

static int check_finite(const ts_tensor *t, double v, int64_t i, ts_err *err) {
  if (isnan(v))
    return ts_errf(err, TS_EINVAL, "input '%s': element %lld is NaN, which is not allowed",
                   t->name ? t->name : "?", (long long)i);
  if (isinf(v))
    return ts_errf(err, TS_EINVAL, "input '%s': element %lld is infinite, which is not allowed",
                   t->name ? t->name : "?", (long long)i);
  return 0;
}

int ts_to_f64(const ts_tensor *t, int allow_nonfinite, double **out, ts_err *err) {
  int r = check_numeric(t, err);
  if (r) return r;
  int64_t n = ts_tensor_numel(t);
  double *d = tl_malloc(sizeof(double) * (size_t)(n ? n : 1));
  if (!d) return ts_errf(err, TS_ENOMEM, "out of memory converting '%s'", t->name ? t->name : "?");
  for (int64_t i = 0; i < n; i++) {
    d[i] = ts_get_f64(t, i);
    if (!allow_nonfinite && (r = check_finite(t, d[i], i, err))) {
      tl_free(d);
      return r;
    }
  }
  *out = d;
  return 0;
}

int ts_to_f32(const ts_tensor *t, int allow_nonfinite, float **out, ts_err *err) {
  int r = check_numeric(t, err);
  if (r) return r;
  int64_t n = ts_tensor_numel(t);
  float *d = tl_malloc(sizeof(float) * (size_t)(n ? n : 1));
  if (!d) return ts_errf(err, TS_ENOMEM, "out of memory converting '%s'", t->name ? t->name : "?");
  if (t->dtype == TS_FP32 && allow_nonfinite) {
    memcpy(d, t->data, sizeof(float) * (size_t)n);
    *out = d;
    return 0;
  }
  for (int64_t i = 0; i < n; i++) {
    double v = ts_get_f64(t, i);
    if (!allow_nonfinite && (r = check_finite(t, v, i, err))) goto fail;
    if (isfinite(v) && fabs(v) > 3.4028234663852886e38) {
      r = ts_errf(err, TS_EINVAL, "input '%s': element %lld (%g) overflows FP32",
                  t->name ? t->name : "?", (long long)i, v);
      goto fail;
    }
    d[i] = (float)v;
  }
  *out = d;
  return 0;
fail:
  tl_free(d);
  return r;
}

int ts_to_i64(const ts_tensor *t, int64_t **out, ts_err *err) {
  int r = check_numeric(t, err);
  if (r) return r;
  int64_t n = ts_tensor_numel(t);
  int64_t *d = tl_malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
  if (!d) return ts_errf(err, TS_ENOMEM, "out of memory converting '%s'", t->name ? t->name : "?");
  for (int64_t i = 0; i < n; i++) {
    if (t->dtype == TS_INT64) {
      d[i] = ((const int64_t *)t->data)[i];
      continue;
    }
    if (t->dtype == TS_UINT64) {
      uint64_t u = ((const uint64_t *)t->data)[i];
      if (u > (uint64_t)INT64_MAX) {
        r = ts_errf(err, TS_EINVAL, "input '%s': element %lld is out of the INT64 range",
                    t->name ? t->name : "?", (long long)i);
        goto fail;
      }
      d[i] = (int64_t)u;
      continue;
    }
    double v = ts_get_f64(t, i);
    if (!isfinite(v) || v != floor(v) || fabs(v) > 9007199254740992.0) {
      r = ts_errf(err, TS_EINVAL,
                  "input '%s': element %lld (%g) is not an integer, so it cannot be "
                  "converted without losing meaning",
                  t->name ? t->name : "?", (long long)i, v);
      goto fail;
    }
    d[i] = (int64_t)v;
  }
  *out = d;
  return 0;
fail:
  tl_free(d);
  return r;
}

void ts_list_init(ts_list *l) {
  memset(l, 0, sizeof *l);
}

ts_tensor *ts_list_add(ts_list *l) {
  if (l->n == l->cap) {
    int nc = l->cap ? l->cap * 2 : 4;
    ts_tensor *p = tl_realloc(l->items, sizeof(ts_tensor) * (size_t)nc);
    if (!p) return NULL;
    l->items = p;
    l->cap = nc;
  }
  ts_tensor *t = &l->items[l->n++];
  memset(t, 0, sizeof *t);
  return t;
}

ts_tensor *ts_list_find(const ts_list *l, const char *name) {
  for (int i = 0; i < l->n; i++)
    if (l->items[i].name && strcmp(l->items[i].name, name) == 0) return &l->items[i];
  return NULL;
}

void ts_list_free(ts_list *l) {
  for (int i = 0; i < l->n; i++) ts_free(&l->items[i]);
  tl_free(l->items);
  memset(l, 0, sizeof *l);
}
