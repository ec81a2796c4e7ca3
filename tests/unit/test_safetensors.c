/* test_safetensors.c - the safetensors reader and writer.
 *
 * Files are assembled byte by byte here (8-byte length, JSON, buffer), so the
 * reader is checked against the format itself rather than against our own
 * writer; every refusal is checked for the words that name the problem. Files
 * live in a fresh mkdtemp directory under /tmp. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/fsutil.h"
#include "../../daemon/base/mem.h"
#include "../../daemon/base/safetensors.h"

static char dir[PATH_MAX];
static char path[PATH_MAX + 64];

static int setup(void **state) {
  (void)state;
  snprintf(dir, sizeof dir, "/tmp/tallyd-st-XXXXXX");
  return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  return fs_rmtree(dir, NULL);
}

/* A file image: 8-byte LE length of `json`, json, then dlen bytes of data. */
static unsigned char *image(const char *json, const void *data, size_t dlen, size_t *len) {
  size_t jl = strlen(json);
  *len = 8 + jl + dlen;
  unsigned char *b = malloc(*len);
  assert_non_null(b);
  for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)jl >> (8 * i));
  memcpy(b + 8, json, jl);
  if (dlen) memcpy(b + 8 + jl, data, dlen);
  return b;
}

static const char *write_bytes(const char *name, const void *b, size_t len) {
  snprintf(path, sizeof path, "%s/%s", dir, name);
  assert_int_equal(fs_write_file_sync(path, b, len, NULL), 0);
  return path;
}

static const char *write_file(const char *json, const void *data, size_t dlen) {
  size_t len;
  unsigned char *b = image(json, data, dlen, &len);
  write_bytes("w.safetensors", b, len);
  free(b);
  return path;
}

/* Both entry points must refuse the image with EINVAL and a message holding
 * every needle. */
static void refuse_image(const unsigned char *b, size_t len, const char *n1, const char *n2) {
  st_file *f = (st_file *)1;
  ts_err err = {0};
  write_bytes("bad.safetensors", b, len);
  assert_int_equal(st_open(&f, path, &err), -TS_EINVAL);
  assert_null(f);
  if (!strstr(err.msg, n1) || (n2 && !strstr(err.msg, n2)))
    fail_msg("message '%s' lacks '%s' / '%s'", err.msg, n1, n2 ? n2 : "");
  assert_non_null(strstr(err.msg, "bad.safetensors")); /* names the file */
  ts_err_clear(&err);
  assert_int_equal(st_open_mem(&f, b, len, "mem", &err), -TS_EINVAL);
  assert_null(f);
  if (!strstr(err.msg, n1) || (n2 && !strstr(err.msg, n2)))
    fail_msg("message '%s' lacks '%s' / '%s'", err.msg, n1, n2 ? n2 : "");
}

static void refuse(const char *json, const void *data, size_t dlen, const char *n1,
                   const char *n2) {
  size_t len;
  unsigned char *b = image(json, data, dlen, &len);
  refuse_image(b, len, n1, n2);
  free(b);
}

static const unsigned char zeros[64];

/* ------------------------------------------------------------ malformed */

static void test_short_file(void **state) {
  (void)state;
  refuse_image((const unsigned char *)"\x02\0\0\0\0", 5, "shorter than the 8-byte", NULL);
  refuse_image((const unsigned char *)"", 0, "file is 0 bytes", NULL);
}

static void test_header_length(void **state) {
  (void)state;
  unsigned char b[16] = {100, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
  refuse_image(b, 10, "header length 100 runs past the end of the file", NULL);
  /* 200 MB: over the limit even though the file is small */
  uint64_t big = 200000000;
  for (int i = 0; i < 8; i++) b[i] = (unsigned char)(big >> (8 * i));
  refuse_image(b, 10, "header length 200000000 exceeds the limit", NULL);
  memset(b, 0xff, 8); /* 2^64-1 must not wrap any arithmetic */
  refuse_image(b, 10, "exceeds the limit", NULL);
  memset(b, 0, 8); /* zero-length header is not JSON */
  refuse_image(b, 10, "not valid JSON", NULL);
}

static void test_bad_json(void **state) {
  (void)state;
  refuse("{\"a\":", NULL, 0, "not valid JSON", NULL);
  refuse("{} {}", NULL, 0, "not valid JSON", NULL);
  refuse("{\"\xff\xfe\":{}}", NULL, 0, "not valid UTF-8", NULL);
  refuse("{\"a\xc0\xaf\":{}}", NULL, 0, "not valid UTF-8", NULL); /* overlong '/' */
  refuse("[1, 2]", NULL, 0, "not a JSON object", NULL);
  refuse("\"x\"", NULL, 0, "not a JSON object", NULL);
  /* a NUL inside the header */
  static const unsigned char nul[] = {9,   0,   0, 0,   0,   0,   0,   0,  '{',
                                      '"', 'a', 0, '"', ':', '1', '}', ' '};
  refuse_image(nul, sizeof nul, "not valid JSON", NULL);
}

static void test_bad_entries(void **state) {
  (void)state;
  refuse("{\"w\":5}", NULL, 0, "tensor 'w'", "not a JSON object");
  refuse("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", zeros, 4, "tensor 'w'",
         "missing \"dtype\"");
  refuse("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", zeros, 4, "tensor 'w'",
         "missing \"shape\"");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", zeros, 4, "tensor 'w'",
         "missing \"data_offsets\"");
  refuse("{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", zeros, 1,
         "tensor 'w'", "unknown dtype 'F8_E4M3'");
  refuse("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", zeros, 4, "tensor 'w'",
         "unknown dtype 'f32'");
  refuse("{\"w\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", zeros, 4, "tensor 'w'",
         "\"dtype\" is not a string");
}

static void test_bad_shape(void **state) {
  (void)state;
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1,2],\"data_offsets\":[0,8]}}", zeros, 8,
         "tensor 'w'", "negative");
  refuse("{\"w\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,1]}}",
         zeros, 1, "tensor 'w'", "overflows");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", zeros, 8,
         "tensor 'w'", "shape entry 0 is not an integer");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":3,\"data_offsets\":[0,12]}}", zeros, 12, "tensor 'w'",
         "\"shape\" is not an array");
  refuse("{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", zeros,
         1, "tensor 'w'", "9 dimensions");
  /* shape x dtype size must equal the byte length */
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", zeros, 8, "tensor 'w'",
         "needs 12 bytes");
  refuse("{\"w\":{\"dtype\":\"F64\",\"shape\":[2,0],\"data_offsets\":[0,8]}}", zeros, 8,
         "tensor 'w'", "needs 0 bytes");
}

static void test_bad_offsets(void **state) {
  (void)state;
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", zeros, 8,
         "tensor 'w'", "run past the end of the byte buffer");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", zeros, 8, "tensor 'w'",
         "end 4 is before begin 8");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", zeros, 8,
         "tensor 'w'", "negative");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", zeros, 4, "tensor 'w'",
         "not [begin, end]");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", zeros, 4,
         "tensor 'w'", "not [begin, end]");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":\"0-4\"}}", zeros, 4,
         "tensor 'w'", "not [begin, end]");
  refuse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,18446744073709551620]}}",
         zeros, 4, "not valid JSON", NULL);
}

static void test_bad_layout(void **state) {
  (void)state;
  /* overlapping */
  refuse(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
      zeros, 12, "'a' [0, 8] and 'b' [4, 12] overlap", NULL);
  /* the same bytes named twice */
  refuse(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
      zeros, 4, "overlap", NULL);
  /* an empty tensor inside another one */
  refuse(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
      zeros, 8, "'a' [0, 8] and 'z' [4, 4] overlap", NULL);
  /* a gap between tensors */
  refuse(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
      zeros, 12, "gap of 4 bytes before tensor 'b'", "'a' ends at 4");
  /* the buffer does not start at 0 */
  refuse("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", zeros, 8,
         "gap of 4 bytes before tensor 'a'", "must start at offset 0");
  /* trailing bytes after the last tensor, and bytes with no tensors at all */
  refuse("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", zeros, 7,
         "3 trailing bytes after the last tensor", NULL);
  refuse("{}", zeros, 1, "1 trailing bytes", NULL);
}

static void test_duplicates_and_metadata(void **state) {
  (void)state;
  refuse(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
      zeros, 8, "duplicate", "'\"a\"'");
  refuse("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", NULL, 0, "duplicate", NULL);
  refuse("{\"__metadata__\":[\"k\"]}", NULL, 0, "\"__metadata__\" is not an object", NULL);
  refuse("{\"__metadata__\":{\"epochs\":3}}", NULL, 0, "__metadata__", "'epochs' is not a string");
}

static void test_open_errors(void **state) {
  (void)state;
  st_file *f;
  ts_err err = {0};
  snprintf(path, sizeof path, "%s/missing.safetensors", dir);
  assert_int_equal(st_open(&f, path, &err), -TS_ENOTFOUND);
  assert_non_null(strstr(err.msg, "missing.safetensors"));
  assert_int_equal(st_open(&f, dir, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "not a regular file"));
}

/* ------------------------------------------------------------ valid files */

/* Pads a JSON header with spaces so that 8 + its length is a multiple of 8. */
static const char *pad8(const char *json, char *buf, size_t n) {
  size_t l = strlen(json);
  assert_true(l + 8 < n);
  memcpy(buf, json, l);
  while (l % 8) buf[l++] = ' ';
  buf[l] = '\0';
  return buf;
}

static void test_valid_dtypes(void **state) {
  (void)state;
  /* in offset order: f64 [0,16) i64 [16,32) f32 [32,44) i32 [44,48)
   * f16 [48,52) u8 [52,55) flag [55,57) empty [57,57) */
  unsigned char data[57];
  double f64[2] = {1.5, -2.25};
  int64_t i64[2] = {-7, INT64_MAX};
  float f32[3] = {0.5f, -1.0f, 3.0f};
  int32_t i32 = -123456;
  uint16_t f16[2] = {0x3c00, 0xc000}; /* 1, -2 */
  memcpy(data, f64, 16);
  memcpy(data + 16, i64, 16);
  memcpy(data + 32, f32, 12);
  memcpy(data + 44, &i32, 4);
  memcpy(data + 48, f16, 4);
  data[52] = 1, data[53] = 2, data[54] = 255;
  data[55] = 1, data[56] = 0;
  char hdr[1024];
  pad8(
      "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"h\xc3\xa9\"},"
      "\"u8\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[52,55]},"
      "\"f64\":{\"dtype\":\"F64\",\"shape\":[2,1],\"data_offsets\":[0,16]},"
      "\"i64\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[16,32],\"extra\":1},"
      "\"f32\":{\"dtype\":\"F32\",\"shape\":[1,3],\"data_offsets\":[32,44]},"
      "\"i32\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[44,48]},"
      "\"f16\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[48,52]},"
      "\"flag\":{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[55,57]},"
      "\"empty\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[57,57]}}",
      hdr, sizeof hdr);
  write_file(hdr, data, sizeof data);
  st_file *f;
  ts_err err = {0};
  assert_int_equal(st_open(&f, path, &err), 0);
  assert_int_equal(st_count(f), 8);
  const char *order[] = {"f64", "i64", "f32", "i32", "f16", "u8", "flag", "empty"};
  for (int i = 0; i < 8; i++) {
    assert_string_equal(st_name(f, i), order[i]);
    assert_int_equal(st_find(f, order[i]), i);
  }
  assert_null(st_name(f, 8));
  assert_int_equal(st_find(f, "nope"), -1);
  assert_int_equal(st_meta_count(f), 2);
  assert_string_equal(st_meta_get(f, "format"), "pt");
  assert_string_equal(st_meta_get(f, "note"), "h\xc3\xa9");
  assert_null(st_meta_get(f, "absent"));

  ts_tensor t;
  assert_int_equal(st_get(f, "f64", &t, &err), 0);
  assert_string_equal(t.name, "f64");
  assert_int_equal(t.dtype, TS_FP64);
  assert_int_equal(t.ndim, 2);
  assert_int_equal(t.shape[0], 2);
  assert_int_equal(t.shape[1], 1);
  assert_int_equal(t.owns_data, 0); /* aligned: borrowed from the mapping */
  assert_true(((const double *)t.data)[1] == -2.25);
  ts_free(&t);
  assert_int_equal(st_get(f, "i64", &t, &err), 0);
  assert_int_equal(t.owns_data, 0);
  assert_true(((const int64_t *)t.data)[1] == INT64_MAX);
  ts_free(&t);
  assert_int_equal(st_get(f, "i32", &t, &err), 0);
  assert_int_equal(t.ndim, 0);
  assert_int_equal(t.nbytes, 4);
  assert_int_equal(*(const int32_t *)t.data, -123456);
  ts_free(&t);
  assert_int_equal(st_get(f, "u8", &t, &err), 0);
  assert_int_equal(t.dtype, TS_UINT8);
  assert_int_equal(((const uint8_t *)t.data)[2], 255);
  ts_free(&t);
  assert_int_equal(st_get(f, "flag", &t, &err), 0);
  assert_int_equal(t.dtype, TS_BOOL);
  assert_true(ts_get_f64(&t, 0) == 1.0 && ts_get_f64(&t, 1) == 0.0);
  ts_free(&t);
  assert_int_equal(st_get(f, "empty", &t, &err), 0);
  assert_int_equal(t.nbytes, 0);
  assert_int_equal(t.shape[1], 5);
  ts_free(&t);

  assert_int_equal(st_get(f, "layers.0.weight", &t, &err), -TS_ENOTFOUND);
  assert_string_equal(err.msg, "weights have no tensor 'layers.0.weight'");
  assert_null(t.data);

  /* F32 as F32: borrowed; F16 and F64 converted into owned FP32 */
  assert_int_equal(st_get_f32(f, "f32", 2, (const int64_t[]){1, 3}, &t, &err), 0);
  assert_int_equal(t.owns_data, 0);
  assert_true(((const float *)t.data)[2] == 3.0f);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "f16", 1, (const int64_t[]){-1}, &t, &err), 0);
  assert_int_equal(t.dtype, TS_FP32);
  assert_int_equal(t.owns_data, 1);
  assert_true(((const float *)t.data)[0] == 1.0f && ((const float *)t.data)[1] == -2.0f);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "f64", -1, NULL, &t, &err), 0);
  assert_true(((const float *)t.data)[0] == 1.5f && ((const float *)t.data)[1] == -2.25f);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "empty", 2, (const int64_t[]){0, 5}, &t, &err), 0);
  ts_free(&t);

  /* shape checks */
  assert_int_equal(st_get_f32(f, "f32", 2, (const int64_t[]){3, 1}, &t, &err), -TS_EINVAL);
  assert_string_equal(err.msg, "tensor 'f32': expected shape [3, 1], got [1, 3]");
  assert_int_equal(st_get_f32(f, "f32", 2, (const int64_t[]){-1, 4}, &t, &err), -TS_EINVAL);
  assert_string_equal(err.msg, "tensor 'f32': expected shape [*, 4], got [1, 3]");
  assert_int_equal(st_get_f32(f, "f32", 1, NULL, &t, &err), -TS_EINVAL);
  assert_string_equal(err.msg, "tensor 'f32': expected 1 dimensions, got shape [1, 3]");
  assert_int_equal(st_get_f32(f, "i64", 1, NULL, &t, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "tensor 'i64': dtype I64 cannot be used"));
  assert_int_equal(st_get_f32(f, "nope", 1, NULL, &t, &err), -TS_ENOTFOUND);
  st_close(f);
}

static void test_empty_files(void **state) {
  (void)state;
  st_file *f;
  ts_err err = {0};
  write_file("{}", NULL, 0);
  assert_int_equal(st_open(&f, path, &err), 0);
  assert_int_equal(st_count(f), 0);
  assert_int_equal(st_meta_count(f), 0);
  assert_null(st_meta_get(f, "k"));
  st_close(f);
  write_file("{\"__metadata__\":{}}      ", NULL, 0); /* padded the way the reference pads */
  assert_int_equal(st_open(&f, path, &err), 0);
  assert_int_equal(st_count(f), 0);
  st_close(f);
  /* only empty tensors: the buffer is empty */
  write_file(
      "{\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
      "\"y\":{\"dtype\":\"I8\",\"shape\":[3,0],\"data_offsets\":[0,0]}}",
      NULL, 0);
  assert_int_equal(st_open(&f, path, &err), 0);
  assert_int_equal(st_count(f), 2);
  assert_string_equal(st_name(f, 0), "y"); /* ties broken by name */
  st_close(f);
}

static void test_misaligned(void **state) {
  (void)state;
  /* u8 [0,1), then F32 at 1, F64 at 13, F16 at 29: none aligned */
  unsigned char data[33];
  float f32[3] = {1.25f, -0.5f, 1e30f};
  double f64[2] = {0.1, -3.0};
  uint16_t f16[2] = {0x3555, 0x0001}; /* 0.333251953125, 2^-24 */
  data[0] = 9;
  memcpy(data + 1, f32, 12);
  memcpy(data + 13, f64, 16);
  memcpy(data + 29, f16, 4);
  char hdr[512];
  pad8(
      "{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
      "\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[1,13]},"
      "\"d\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[13,29]},"
      "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[29,33]}}",
      hdr, sizeof hdr);
  write_file(hdr, data, sizeof data);
  st_file *f;
  ts_err err = {0};
  ts_tensor t;
  assert_int_equal(st_open(&f, path, &err), 0);
  assert_int_equal(st_get(f, "b", &t, &err), 0);
  assert_int_equal(t.owns_data, 0); /* one byte is always aligned */
  ts_free(&t);
  assert_int_equal(st_get(f, "x", &t, &err), 0);
  assert_int_equal(t.owns_data, 1);
  assert_int_equal((uintptr_t)t.data % 4, 0);
  assert_memory_equal(t.data, f32, 12);
  ts_free(&t);
  assert_int_equal(st_get(f, "d", &t, &err), 0);
  assert_int_equal(t.owns_data, 1);
  assert_true(((const double *)t.data)[0] == 0.1);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "x", 1, (const int64_t[]){3}, &t, &err), 0);
  assert_int_equal(t.owns_data, 1);
  assert_true(((const float *)t.data)[2] == 1e30f);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "d", 1, NULL, &t, &err), 0);
  assert_true(((const float *)t.data)[0] == (float)0.1);
  assert_true(((const float *)t.data)[1] == -3.0f);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "h", 1, NULL, &t, &err), 0);
  assert_true(((const float *)t.data)[0] == 0.333251953125f);
  assert_true(((const float *)t.data)[1] == 5.9604644775390625e-08f);
  ts_free(&t);
  st_close(f);

  /* the same image from an odd address in memory */
  size_t len;
  unsigned char *img = image(hdr, data, sizeof data, &len);
  unsigned char *odd = malloc(len + 1);
  memcpy(odd + 1, img, len);
  assert_int_equal(st_open_mem(&f, odd + 1, len, NULL, &err), 0);
  assert_int_equal(st_get(f, "b", &t, &err), 0);
  assert_int_equal(*(const uint8_t *)t.data, 9);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "x", 1, NULL, &t, &err), 0);
  assert_memory_equal(t.data, f32, 12);
  ts_free(&t);
  st_close(f);
  free(odd);
  free(img);
}

static void test_f32_conversion_refusals(void **state) {
  (void)state;
  /* bf16: 1.0, 3.140625, -123.5; then bf16 inf; f16 NaN; f64 1e40; f32 NaN */
  unsigned char data[32] = {0};
  uint16_t bf[3] = {0x3f80, 0x4049, 0xc2f7}, bfinf = 0x7f80, hnan = 0x7e00;
  double big = 1e40;
  float fnan = NAN;
  memcpy(data, &big, 8);
  memcpy(data + 8, &fnan, 4);
  memcpy(data + 12, bf, 6);
  memcpy(data + 18, &bfinf, 2);
  memcpy(data + 20, &hnan, 2);
  char hdr[512];
  pad8(
      "{\"big\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]},"
      "\"fnan\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
      "\"bf\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[12,18]},"
      "\"binf\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[18,20]},"
      "\"hnan\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[20,22]}}",
      hdr, sizeof hdr);
  write_file(hdr, data, 22);
  st_file *f;
  ts_err err = {0};
  ts_tensor t;
  assert_int_equal(st_open(&f, path, &err), 0);
  assert_int_equal(st_get_f32(f, "bf", 1, NULL, &t, &err), 0);
  const float *y = t.data;
  assert_true(y[0] == 1.0f && y[1] == 3.140625f && y[2] == -123.5f);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "big", 1, NULL, &t, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "tensor 'big': element 0"));
  assert_non_null(strstr(err.msg, "overflows FP32"));
  assert_null(t.data);
  assert_int_equal(st_get_f32(f, "fnan", 1, NULL, &t, &err), -TS_EINVAL);
  assert_string_equal(err.msg, "tensor 'fnan': element 0 is NaN; weights must be finite");
  assert_int_equal(st_get_f32(f, "binf", 1, NULL, &t, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "tensor 'binf': element 0 is infinite"));
  assert_int_equal(st_get_f32(f, "hnan", 1, NULL, &t, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "tensor 'hnan': element 0 is NaN"));
  /* st_get hands out non-finite values as stored; only st_get_f32 refuses */
  assert_int_equal(st_get(f, "fnan", &t, &err), 0);
  assert_true(isnan(((const float *)t.data)[0]));
  ts_free(&t);
  st_close(f);
}

/* ------------------------------------------------------------ writer */

static void test_writer_round_trip(void **state) {
  (void)state;
  st_writer *w = st_writer_new();
  assert_non_null(w);
  ts_err err = {0};
  uint8_t u8[3] = {1, 2, 3};
  float f32[6] = {1, 2, 3, 4, 5, 6};
  double f64[2] = {-1.0 / 3.0, 1e300};
  uint16_t bf16[1] = {0x3f80};
  int64_t i64[1] = {-5};
  assert_int_equal(st_writer_add(w, "a.u8", TS_UINT8, 1, (const int64_t[]){3}, u8, &err), 0);
  assert_int_equal(st_writer_add(w, "b.f32", TS_FP32, 2, (const int64_t[]){2, 3}, f32, &err), 0);
  assert_int_equal(st_writer_add(w, "c.f64", TS_FP64, 1, (const int64_t[]){2}, f64, &err), 0);
  assert_int_equal(st_writer_add(w, "d.bf16", TS_BF16, 0, NULL, bf16, &err), 0);
  assert_int_equal(st_writer_add(w, "e.i64", TS_INT64, 1, (const int64_t[]){1}, i64, &err), 0);
  assert_int_equal(st_writer_add(w, "f.none", TS_FP32, 1, (const int64_t[]){0}, NULL, &err), 0);
  assert_int_equal(st_writer_meta(w, "format", "pt", &err), 0);
  assert_int_equal(st_writer_meta(w, "epochs", "3", &err), 0);
  assert_int_equal(st_writer_meta(w, "epochs", "4", &err), 0); /* replaces */
  memset(f32, 0, sizeof f32);                                  /* the writer copied the data */

  /* refusals */
  assert_int_equal(st_writer_add(w, "a.u8", TS_UINT8, 1, (const int64_t[]){3}, u8, &err),
                   -TS_ECONFLICT);
  assert_non_null(strstr(err.msg, "'a.u8' was already added"));
  assert_int_equal(st_writer_add(w, "__metadata__", TS_UINT8, 1, (const int64_t[]){3}, u8, &err),
                   -TS_EINVAL);
  assert_non_null(strstr(err.msg, "reserved"));
  assert_int_equal(st_writer_add(w, "s", TS_BYTES, 1, (const int64_t[]){3}, u8, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "BYTES"));
  assert_int_equal(st_writer_add(w, "bad\xff", TS_UINT8, 1, (const int64_t[]){3}, u8, &err),
                   -TS_EINVAL);
  assert_non_null(strstr(err.msg, "UTF-8"));
  assert_int_equal(st_writer_add(w, "neg", TS_UINT8, 1, (const int64_t[]){-3}, u8, &err),
                   -TS_EINVAL);
  assert_non_null(strstr(err.msg, "tensor 'neg'"));
  assert_int_equal(st_writer_add(w, "nodata", TS_UINT8, 1, (const int64_t[]){3}, NULL, &err),
                   -TS_EINVAL);
  assert_int_equal(st_writer_meta(w, "k", "\xc3", &err), -TS_EINVAL);

  snprintf(path, sizeof path, "%s/rt.safetensors", dir);
  assert_int_equal(st_writer_save(w, path, &err), 0);
  st_writer_free(w);

  /* the file itself: header length a multiple of 8, padded with spaces,
   * metadata first, then tensors by decreasing element size, then name */
  char *raw;
  size_t rlen;
  assert_int_equal(fs_read_file(path, 1 << 20, &raw, &rlen, &err), 0);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | (unsigned char)raw[i];
  assert_int_equal(hlen % 8, 0);
  assert_int_equal(rlen, 8 + hlen + 3 + 24 + 16 + 2 + 8);
  const char *head =
      "{\"__metadata__\":{\"format\":\"pt\",\"epochs\":\"4\"},"
      "\"c.f64\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]},";
  assert_memory_equal(raw + 8, head, strlen(head));
  const char *end = raw + 8 + hlen;
  while (end[-1] == ' ') end--;
  assert_int_equal(end[-1], '}');
  tl_free(raw);

  st_file *f;
  ts_tensor t;
  assert_int_equal(st_open(&f, path, &err), 0);
  assert_int_equal(st_count(f), 6);
  const char *order[] = {"c.f64", "e.i64", "b.f32", "f.none", "d.bf16", "a.u8"};
  for (int i = 0; i < 6; i++) {
    assert_string_equal(st_name(f, i), order[i]);
    assert_int_equal(st_get(f, order[i], &t, &err), 0);
    assert_int_equal(t.owns_data, 0); /* every tensor came out aligned */
    ts_free(&t);
  }
  assert_string_equal(st_meta_get(f, "epochs"), "4");
  assert_string_equal(st_meta_get(f, "format"), "pt");
  assert_int_equal(st_get(f, "b.f32", &t, &err), 0);
  assert_int_equal(t.ndim, 2);
  assert_int_equal(t.shape[1], 3);
  assert_memory_equal(t.data, ((const float[]){1, 2, 3, 4, 5, 6}), 24);
  ts_free(&t);
  assert_int_equal(st_get(f, "c.f64", &t, &err), 0);
  assert_memory_equal(t.data, f64, 16);
  ts_free(&t);
  assert_int_equal(st_get(f, "d.bf16", &t, &err), 0);
  assert_int_equal(t.ndim, 0);
  assert_int_equal(*(const uint16_t *)t.data, 0x3f80);
  ts_free(&t);
  assert_int_equal(st_get(f, "a.u8", &t, &err), 0);
  assert_memory_equal(t.data, u8, 3);
  ts_free(&t);
  assert_int_equal(st_get(f, "e.i64", &t, &err), 0);
  assert_int_equal(*(const int64_t *)t.data, -5);
  ts_free(&t);
  st_close(f);

  /* an empty writer writes a valid empty file: "{}" padded to 8 */
  w = st_writer_new();
  assert_int_equal(st_writer_save(w, path, &err), 0);
  st_writer_free(w);
  assert_int_equal(fs_read_file(path, 100, &raw, &rlen, &err), 0);
  assert_int_equal(rlen, 16);
  assert_memory_equal(raw, "\x08\0\0\0\0\0\0\0{}      ", 16);
  tl_free(raw);

  /* a path that cannot be created */
  w = st_writer_new();
  snprintf(path, sizeof path, "%s/no/such/dir.safetensors", dir);
  assert_int_equal(st_writer_save(w, path, &err), -TS_ENOTFOUND);
  assert_non_null(strstr(err.msg, "no/such/dir.safetensors"));
  st_writer_free(w);
}

/* Every allocation made while opening, reading and writing may fail: each
 * failure must come back as -TS_ENOMEM and leak nothing (ASan checks). */
static void test_allocation_failures(void **state) {
  (void)state;
  char hdr[512];
  unsigned char data[16] = {0};
  pad8(
      "{\"__metadata__\":{\"k\":\"v\"},"
      "\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[4,16]}}",
      hdr, sizeof hdr);
  write_file(hdr, data, sizeof data);
  char src[sizeof path];
  snprintf(src, sizeof src, "%s", path);
  snprintf(path, sizeof path, "%s/fail.safetensors", dir);
  int done = 0;
  for (long k = 0; !done && k < 1000; k++) {
    ts_err err = {0};
    st_file *f = NULL;
    ts_tensor t = {0};
    st_writer *w = NULL;
    tl_mem_fail_after(k);
    int r = st_open(&f, src, &err);
    if (!r) r = st_get_f32(f, "a", 1, NULL, &t, &err);
    if (!r) {
      ts_free(&t);
      r = st_get(f, "b", &t, &err);
    }
    if (!r) {
      ts_free(&t);
      w = st_writer_new();
      r = w ? st_writer_add(w, "x", TS_FP32, 1, (const int64_t[]){3}, data, &err) : -TS_ENOMEM;
    }
    if (!r) r = st_writer_meta(w, "k", "v", &err);
    if (!r) r = st_writer_save(w, path, &err);
    tl_mem_fail_reset();
    ts_free(&t);
    st_writer_free(w);
    st_close(f);
    if (r)
      assert_int_equal(r, -TS_ENOMEM);
    else
      done = 1;
  }
  assert_true(done);
}

static unsigned char touched; /* keeps the reads of every tensor byte */

/* Truncations and byte flips of a valid image must be refused or accepted
 * cleanly, never read out of bounds (ASan watches the exact-size buffers). */
static void test_mutations(void **state) {
  (void)state;
  char hdr[512];
  unsigned char data[24];
  for (int i = 0; i < 24; i++) data[i] = (unsigned char)(i * 37);
  pad8(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[8,16]},"
      "\"c\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[16,24]}}",
      hdr, sizeof hdr);
  size_t len;
  unsigned char *img = image(hdr, data, sizeof data, &len);
  for (size_t cut = 0; cut < len; cut++) {
    unsigned char *b = malloc(cut ? cut : 1);
    memcpy(b, img, cut);
    st_file *f;
    assert_int_equal(st_open_mem(&f, b, cut, NULL, NULL), -TS_EINVAL);
    free(b);
  }
  uint32_t seed = 12345;
  int accepted = 0;
  for (int iter = 0; iter < 50000; iter++) {
    unsigned char *b = malloc(len);
    memcpy(b, img, len);
    for (int k = 0; k < 1 + iter % 3; k++) {
      seed = seed * 1664525u + 1013904223u;
      size_t at = (seed >> 8) % len;
      seed = seed * 1664525u + 1013904223u;
      b[at] = (unsigned char)(seed >> 24);
    }
    st_file *f;
    ts_err err;
    if (st_open_mem(&f, b, len, NULL, &err) == 0) {
      accepted++;
      for (int i = 0; i < st_count(f); i++) {
        ts_tensor t;
        if (st_get(f, st_name(f, i), &t, &err) == 0) {
          for (size_t j = 0; j < t.nbytes; j++) touched ^= ((const unsigned char *)t.data)[j];
          ts_free(&t);
        }
        if (st_get_f32(f, st_name(f, i), -1, NULL, &t, &err) == 0) ts_free(&t);
      }
      st_close(f);
    } else {
      assert_int_equal(err.status, TS_EINVAL);
      assert_true(err.msg[0] != '\0');
    }
    free(b);
  }
  free(img);
  assert_true(accepted > 0); /* flips inside the data keep the file valid */
}

/* The seeds written by tests/fuzz/make_st_seeds.py (an independent writer,
 * Python standard library) must all be read, and our writer must reproduce
 * the reference-layout ones byte for byte. Needs the repository root as the
 * working directory, as tests/run.sh provides. */
#define SEEDS "tests/fuzz/corpus/safetensors/"

static void test_python_seeds(void **state) {
  (void)state;
  struct stat sb;
  if (stat(SEEDS "mlp.safetensors", &sb) != 0) {
    print_message("skip: %s is missing (run from the repository root)\n", SEEDS "mlp.safetensors");
    skip();
  }
  const char *names[] = {"empty", "metadata_only", "mlp", "dtypes", "zero_size", "misaligned"};
  ts_err err = {0};
  for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
    char src[256], out[PATH_MAX + 64];
    snprintf(src, sizeof src, SEEDS "%s.safetensors", names[k]);
    st_file *f;
    if (st_open(&f, src, &err) != 0) fail_msg("%s", err.msg);
    st_writer *w = st_writer_new();
    for (int i = 0; i < st_count(f); i++) {
      ts_tensor t;
      assert_int_equal(st_get(f, st_name(f, i), &t, &err), 0);
      assert_int_equal(st_writer_add(w, t.name, t.dtype, t.ndim, t.shape, t.data, &err), 0);
      ts_free(&t);
    }
    for (int i = 0; i < st_meta_count(f); i++)
      assert_int_equal(st_writer_meta(w, st_meta_key(f, i), st_meta_value(f, i), &err), 0);
    st_close(f);
    snprintf(out, sizeof out, "%s/seed.safetensors", dir);
    assert_int_equal(st_writer_save(w, out, &err), 0);
    st_writer_free(w);
    if (strcmp(names[k], "misaligned") == 0 || strcmp(names[k], "metadata_only") == 0)
      continue; /* a layout we would not write; "\u00e9" escaped by Python */
    char *a, *b;
    size_t la, lb;
    assert_int_equal(fs_read_file(src, 1 << 20, &a, &la, &err), 0);
    assert_int_equal(fs_read_file(out, 1 << 20, &b, &lb, &err), 0);
    if (la != lb || memcmp(a, b, la) != 0) fail_msg("writer output differs from seed %s", src);
    tl_free(a);
    tl_free(b);
  }
  st_file *f;
  ts_tensor t;
  assert_int_equal(st_open(&f, SEEDS "mlp.safetensors", &err), 0);
  assert_int_equal(st_get_f32(f, "layers.0.weight", 2, (const int64_t[]){3, 2}, &t, &err), 0);
  assert_true(((const float *)t.data)[5] == 1.5f);
  ts_free(&t);
  assert_string_equal(st_meta_get(f, "format"), "pt");
  st_close(f);
  assert_int_equal(st_open(&f, SEEDS "dtypes.safetensors", &err), 0);
  assert_int_equal(st_count(f), 12);
  assert_int_equal(st_get(f, "u64", &t, &err), 0);
  assert_true(*(const uint64_t *)t.data == (uint64_t)1 << 63);
  ts_free(&t);
  assert_int_equal(st_get_f32(f, "bf16", 1, NULL, &t, &err), 0);
  assert_true(((const float *)t.data)[1] == 3.140625f);
  ts_free(&t);
  st_close(f);
}

/* ------------------------------------------------------------ load modes */

/* ST_READ keeps a private copy: the file truncated and rewritten in place
 * afterwards leaves the open tensors as they were read. ST_MMAP shows the
 * new bytes (the documented reason for ST_READ being the default). Both give
 * the SHA-256 of the bytes they loaded, the file's own digest. */
static void test_load_modes(void **state) {
  (void)state;
  float data[4] = {1.5f, -2.0f, 3.25f, 4.0f};
  /* 56 bytes of JSON: the data starts at 64, aligned, so the tensors borrow */
  const char *json = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}} ";
  size_t len;
  unsigned char *b = image(json, data, sizeof data, &len);
  write_bytes("modes.safetensors", b, len);
  char want[HASH_HEX_LEN + 1], got[HASH_HEX_LEN + 1];
  hash_sha256_buf(b, len, want);
  ts_err err = {0};
  st_file *rf, *mf;
  assert_int_equal(st_open_file(&rf, path, ST_READ, got, &err), 0);
  assert_string_equal(got, want);
  assert_int_equal(st_open_file(&mf, path, ST_MMAP, got, &err), 0);
  assert_string_equal(got, want);
  ts_tensor rt, mt;
  assert_int_equal(st_get_f32(rf, "w", 1, (const int64_t[]){4}, &rt, &err), 0);
  assert_int_equal(st_get_f32(mf, "w", 1, (const int64_t[]){4}, &mt, &err), 0);
  assert_memory_equal(rt.data, data, sizeof data);
  assert_memory_equal(mt.data, data, sizeof data);

  /* rewrite the data in place (same inode, same length) */
  FILE *fp = fopen(path, "r+b");
  assert_non_null(fp);
  float other[4] = {9, 9, 9, 9};
  assert_int_equal(fseek(fp, (long)(len - sizeof other), SEEK_SET), 0);
  assert_int_equal(fwrite(other, sizeof other, 1, fp), 1);
  assert_int_equal(fclose(fp), 0);
  assert_memory_equal(rt.data, data, sizeof data);   /* the copy: unchanged */
  assert_memory_equal(mt.data, other, sizeof other); /* the mapping: new bytes */
  ts_free(&mt);
  st_close(mf);
  /* truncate it: the copy still reads (a mapping would fault past the end) */
  assert_int_equal(truncate(path, 10), 0);
  assert_memory_equal(rt.data, data, sizeof data);
  ts_free(&rt);
  st_close(rf);

  /* what is read now is the truncated file, refused by validation; the
   * digest is still of the bytes read */
  st_file *f = (st_file *)1;
  assert_int_equal(st_open_file(&f, path, ST_READ, got, &err), -TS_EINVAL);
  assert_null(f);
  hash_sha256_buf(b, 10, want);
  assert_string_equal(got, want);
  /* an empty file: no image at all, refused as short */
  assert_int_equal(truncate(path, 0), 0);
  assert_int_equal(st_open_file(&f, path, ST_READ, got, &err), -TS_EINVAL);
  hash_sha256_buf("", 0, want);
  assert_string_equal(got, want);
  /* not a regular file, and missing */
  assert_int_equal(st_open_file(&f, dir, ST_READ, NULL, &err), -TS_EINVAL);
  snprintf(path, sizeof path, "%s/none.safetensors", dir);
  assert_int_equal(st_open_file(&f, path, ST_READ, got, &err), -TS_ENOTFOUND);
  assert_string_equal(got, "");
  free(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_short_file),
      cmocka_unit_test(test_header_length),
      cmocka_unit_test(test_bad_json),
      cmocka_unit_test(test_bad_entries),
      cmocka_unit_test(test_bad_shape),
      cmocka_unit_test(test_bad_offsets),
      cmocka_unit_test(test_bad_layout),
      cmocka_unit_test(test_duplicates_and_metadata),
      cmocka_unit_test(test_open_errors),
      cmocka_unit_test(test_valid_dtypes),
      cmocka_unit_test(test_empty_files),
      cmocka_unit_test(test_misaligned),
      cmocka_unit_test(test_f32_conversion_refusals),
      cmocka_unit_test(test_writer_round_trip),
      cmocka_unit_test(test_allocation_failures),
      cmocka_unit_test(test_mutations),
      cmocka_unit_test(test_python_seeds),
      cmocka_unit_test(test_load_modes),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
