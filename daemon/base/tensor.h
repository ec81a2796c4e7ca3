/* tensor.h - the tensor type shared by every floor of tallyd.
 *
 * A ts_tensor is a named, typed, row-major n-d array. Ownership: when
 * owns_data is set the tensor frees `data` in ts_free; otherwise `data` is
 * borrowed (an mmap'ed weight tensor is borrowed for the life of its model
 * version; a request tensor may borrow the request body). `name` is always
 * owned (may be NULL).
 *
 * Conversions (ts_to_f32 and friends) implement the OIP rule "convert what
 * can be converted, refuse with 400 where it would lose meaning": a
 * non-integral or out-of-range value into an integer type, a finite value that
 * overflows the target float type, and BYTES into anything numeric are
 * refused with a message naming the tensor and the element. */
#ifndef TALLYD_TENSOR_H
#define TALLYD_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef enum ts_dtype {
  TS_BOOL,
  TS_UINT8,
  TS_UINT16,
  TS_UINT32,
  TS_UINT64,
  TS_INT8,
  TS_INT16,
  TS_INT32,
  TS_INT64,
  TS_FP16,
  TS_BF16,
  TS_FP32,
  TS_FP64,
  TS_BYTES, /* Triton layout: 4-byte little-endian length, then the bytes */
  TS_DTYPE_COUNT
} ts_dtype;

#define TS_MAXDIM 8

typedef struct ts_tensor {
  char *name;
  ts_dtype dtype;
  int ndim;
  int64_t shape[TS_MAXDIM];
  void *data;
  size_t nbytes;
  int owns_data;
} ts_tensor;

/* OIP names: "FP32", "INT64", ... */
const char *ts_dtype_name(ts_dtype t);
int ts_dtype_from_name(const char *name, ts_dtype *out);
/* safetensors names: "F32", "I64", "BF16", "BOOL", ... */
const char *ts_dtype_st_name(ts_dtype t);
int ts_dtype_from_st_name(const char *name, ts_dtype *out);
/* Bytes per element; 0 for BYTES (variable). */
size_t ts_dtype_size(ts_dtype t);
int ts_dtype_is_float(ts_dtype t);

/* Number of elements, refusing negative dimensions and products that
 * overflow int64 or size_t bytes (returns -TS_EINVAL with a message). */
int ts_numel(const int64_t *shape, int ndim, int64_t *out, ts_err *err);
int64_t ts_tensor_numel(const ts_tensor *t);

/* Allocates a zeroed owned tensor. name may be NULL. */
int ts_alloc(ts_tensor *t, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
             ts_err *err);
/* Wraps borrowed memory. */
int ts_wrap(ts_tensor *t, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
            void *data, size_t nbytes, ts_err *err);
void ts_free(ts_tensor *t);
/* "[4, 11]" into buf. */
const char *ts_shape_str(const int64_t *shape, int ndim, char *buf, size_t n);

/* Element access as double / int64 for any numeric dtype. */
double ts_get_f64(const ts_tensor *t, int64_t i);

/* Converting copies into freshly allocated (tl_malloc) arrays of numel
 * elements; the caller frees with tl_free. allow_nonfinite = 0 refuses NaN
 * and Inf with 400. */
int ts_to_f32(const ts_tensor *t, int allow_nonfinite, float **out, ts_err *err);
int ts_to_f64(const ts_tensor *t, int allow_nonfinite, double **out, ts_err *err);
int ts_to_i64(const ts_tensor *t, int64_t **out, ts_err *err);

float ts_half_to_float(uint16_t h);
uint16_t ts_float_to_half(float f);
float ts_bf16_to_float(uint16_t h);
uint16_t ts_float_to_bf16(float f);

/* A list of named tensors (request inputs, model outputs). Owns its items. */
typedef struct ts_list {
  ts_tensor *items;
  int n, cap;
} ts_list;

void ts_list_init(ts_list *l);
/* Appends a zeroed slot and returns it, NULL on allocation failure. */
ts_tensor *ts_list_add(ts_list *l);
ts_tensor *ts_list_find(const ts_list *l, const char *name);
void ts_list_free(ts_list *l);

#endif
