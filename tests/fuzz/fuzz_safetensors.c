/* fuzz_safetensors.c - libFuzzer target: the safetensors reader.
 *
 * The input is a whole file image. st_open_mem validates it; when it is
 * accepted, every tensor is fetched as stored (st_get) and as FP32
 * (st_get_f32) and every byte of what comes back is read, so a header that
 * passes validation but points outside the buffer shows up under ASan. */
#include "fuzz_common.h"

int FUZZ_ENTRY(const uint8_t *data, size_t size);
int FUZZ_ENTRY(const uint8_t *data, size_t size) {
  st_file *f = NULL;
  ts_err err = {0};
  int rc = st_open_mem(&f, data, size, "fuzz", &err);
  fuzz_check_err(rc, &err);
  if (rc) {
    FUZZ_ASSERT(f == NULL);
    return 0;
  }
  int n = st_count(f);
  for (int i = 0; i < n; i++) {
    const char *name = st_name(f, i);
    FUZZ_ASSERT(name != NULL && st_find(f, name) == i);
    ts_tensor t;
    rc = st_get(f, name, &t, &err);
    fuzz_check_err(rc, &err);
    if (!rc) {
      int64_t numel;
      FUZZ_ASSERT(ts_numel(t.shape, t.ndim, &numel, &err) == 0);
      FUZZ_ASSERT(t.nbytes == (size_t)numel * ts_dtype_size(t.dtype));
      fuzz_touch(&t);
      ts_free(&t);
    }
    rc = st_get_f32(f, name, -1, NULL, &t, &err);
    fuzz_check_err(rc, &err);
    if (!rc) {
      FUZZ_ASSERT(t.dtype == TS_FP32);
      const float *x = t.data;
      for (size_t k = 0; k < t.nbytes / 4; k++) FUZZ_ASSERT(x[k] == x[k]); /* no NaN */
      ts_free(&t);
    }
  }
  ts_tensor t;
  FUZZ_ASSERT(st_get(f, "\x01no such tensor", &t, &err) == -TS_ENOTFOUND);
  for (int i = 0; i < st_meta_count(f); i++) {
    const char *k = st_meta_key(f, i), *v = st_meta_value(f, i);
    FUZZ_ASSERT(k && v && st_meta_get(f, k) != NULL);
  }
  st_close(f);
  return 0;
}
