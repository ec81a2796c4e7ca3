/* safetensors.c - validated, memory-mapped safetensors reader and a writer
 * (see safetensors.h for the format and the ownership rules).
 *
 * Invariants once parse() succeeds, which everything after it relies on:
 *   - entries are sorted by offset and tile [0, data_len) exactly, so every
 *     tensor's bytes lie inside the file and no two tensors share a byte;
 *   - every entry's byte length equals numel x dtype size, numel fits int64;
 *   - names are unique (the JSON parser rejects duplicate keys).
 * Nothing reads tensor bytes through a pointer whose alignment is not checked:
 * a misaligned tensor is copied (st_get) or converted through memcpy. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "hash.h"
#include "mem.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; tallyd supports only little-endian targets"
#endif

#define META_KEY "__metadata__"

typedef struct st_entry {
  char *name;
  ts_dtype dtype;
  int ndim;
  int64_t shape[TS_MAXDIM];
  uint64_t begin, end; /* relative to the byte buffer */
} st_entry;

struct st_file {
  const unsigned char *data; /* the byte buffer, after the header */
  size_t data_len;
  void *map; /* the whole-file mapping when opened from a path */
  size_t map_len;
  st_entry *e; /* sorted by offset */
  int n;
  st_entry **by_name; /* sorted by name, for lookup */
  char **meta;        /* key, value, key, value, ... */
  int nmeta;
};

/* ------------------------------------------------------------------ reader */

static int oom(ts_err *err) {
  return ts_errf(err, TS_ENOMEM, "out of memory");
}

static int cmp_offset(const void *a, const void *b) {
  const st_entry *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return strcmp(x->name, y->name);
}

static int cmp_name(const void *a, const void *b) {
  return strcmp((*(st_entry *const *)a)->name, (*(st_entry *const *)b)->name);
}

/* A JSON integer >= 0, into *out. */
static int json_u64(const json_t *v, uint64_t *out) {
  if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
  *out = (uint64_t)json_integer_value(v);
  return 1;
}

static int parse_entry(st_entry *e, const char *name, json_t *obj, ts_err *err) {
  if (!json_is_object(obj))
    return ts_errf(err, TS_EINVAL, "tensor '%s': entry is not a JSON object", name);
  json_t *jd = json_object_get(obj, "dtype"), *js = json_object_get(obj, "shape"),
         *jo = json_object_get(obj, "data_offsets");
  if (!jd) return ts_errf(err, TS_EINVAL, "tensor '%s': missing \"dtype\"", name);
  if (!js) return ts_errf(err, TS_EINVAL, "tensor '%s': missing \"shape\"", name);
  if (!jo) return ts_errf(err, TS_EINVAL, "tensor '%s': missing \"data_offsets\"", name);

  if (!json_is_string(jd))
    return ts_errf(err, TS_EINVAL, "tensor '%s': \"dtype\" is not a string", name);
  if (ts_dtype_from_st_name(json_string_value(jd), &e->dtype) != 0)
    return ts_errf(err, TS_EINVAL,
                   "tensor '%s': unknown dtype '%s' (expected one of F16, BF16, F32, F64, "
                   "I8, I16, I32, I64, U8, U16, U32, U64, BOOL)",
                   name, json_string_value(jd));

  if (!json_is_array(js))
    return ts_errf(err, TS_EINVAL, "tensor '%s': \"shape\" is not an array", name);
  if (json_array_size(js) > TS_MAXDIM)
    return ts_errf(err, TS_EINVAL, "tensor '%s': shape has %zu dimensions, more than %d", name,
                   json_array_size(js), TS_MAXDIM);
  e->ndim = (int)json_array_size(js);
  for (int i = 0; i < e->ndim; i++) {
    json_t *d = json_array_get(js, (size_t)i);
    if (!json_is_integer(d))
      return ts_errf(err, TS_EINVAL, "tensor '%s': shape entry %d is not an integer", name, i);
    e->shape[i] = json_integer_value(d);
  }
  int64_t numel;
  int r = ts_numel(e->shape, e->ndim, &numel, err);
  if (r) {
    ts_err_prefix(err, "tensor '%s': shape", name);
    return r;
  }

  if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
      !json_is_integer(json_array_get(jo, 1)))
    return ts_errf(err, TS_EINVAL, "tensor '%s': \"data_offsets\" is not [begin, end]", name);
  if (!json_u64(json_array_get(jo, 0), &e->begin) || !json_u64(json_array_get(jo, 1), &e->end))
    return ts_errf(err, TS_EINVAL, "tensor '%s': data_offsets [%lld, %lld] are negative", name,
                   (long long)json_integer_value(json_array_get(jo, 0)),
                   (long long)json_integer_value(json_array_get(jo, 1)));
  if (e->end < e->begin)
    return ts_errf(err, TS_EINVAL, "tensor '%s': data_offsets end %llu is before begin %llu", name,
                   (unsigned long long)e->end, (unsigned long long)e->begin);

  /* numel <= INT64_MAX / 16 (ts_numel), so this cannot overflow. */
  uint64_t need = (uint64_t)numel * ts_dtype_size(e->dtype);
  if (e->end - e->begin != need) {
    char sh[128];
    return ts_errf(err, TS_EINVAL,
                   "tensor '%s': shape %s of %s needs %llu bytes, but data_offsets [%llu, %llu] "
                   "span %llu",
                   name, ts_shape_str(e->shape, e->ndim, sh, sizeof sh), ts_dtype_st_name(e->dtype),
                   (unsigned long long)need, (unsigned long long)e->begin,
                   (unsigned long long)e->end, (unsigned long long)(e->end - e->begin));
  }
  if (!(e->name = tl_strdup(name))) return oom(err);
  return 0;
}

static int parse_meta(st_file *f, json_t *m, ts_err *err) {
  if (!json_is_object(m))
    return ts_errf(err, TS_EINVAL, "\"" META_KEY "\" is not an object of strings");
  size_t n = json_object_size(m);
  if (!(f->meta = tl_calloc(n ? 2 * n : 1, sizeof(char *)))) return oom(err);
  const char *k;
  json_t *v;
  json_object_foreach(m, k, v) {
    if (!json_is_string(v))
      return ts_errf(err, TS_EINVAL, "\"" META_KEY "\" value for '%s' is not a string", k);
    int i = f->nmeta++;
    f->meta[2 * i] = tl_strdup(k);
    f->meta[2 * i + 1] = tl_strdup(json_string_value(v));
    if (!f->meta[2 * i] || !f->meta[2 * i + 1]) return oom(err);
  }
  return 0;
}

/* Checks that the entries, sorted by offset, tile the buffer exactly. */
static int check_layout(const st_file *f, ts_err *err) {
  uint64_t at = 0;
  const st_entry *prev = NULL; /* the entry that ends at `at` */
  for (int i = 0; i < f->n; i++) {
    const st_entry *e = &f->e[i];
    if (e->end > f->data_len)
      return ts_errf(err, TS_EINVAL,
                     "tensor '%s': data_offsets [%llu, %llu] run past the end of the byte "
                     "buffer (%zu bytes)",
                     e->name, (unsigned long long)e->begin, (unsigned long long)e->end,
                     f->data_len);
    if (e->begin < at)
      return ts_errf(err, TS_EINVAL, "tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap",
                     prev->name, (unsigned long long)prev->begin, (unsigned long long)prev->end,
                     e->name, (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->begin > at && !prev)
      return ts_errf(err, TS_EINVAL,
                     "gap of %llu bytes before tensor '%s' (the first tensor must start at "
                     "offset 0, it starts at %llu)",
                     (unsigned long long)e->begin, e->name, (unsigned long long)e->begin);
    if (e->begin > at)
      return ts_errf(err, TS_EINVAL,
                     "gap of %llu bytes before tensor '%s' (tensors must be contiguous: it "
                     "starts at %llu, '%s' ends at %llu)",
                     (unsigned long long)(e->begin - at), e->name, (unsigned long long)e->begin,
                     prev->name, (unsigned long long)at);
    if (e->end > e->begin || !prev) prev = e;
    at = e->end;
  }
  if (at != f->data_len)
    return ts_errf(err, TS_EINVAL, "%llu trailing bytes after the last tensor",
                   (unsigned long long)(f->data_len - at));
  return 0;
}

static int parse_header(st_file *f, const char *hdr, size_t hlen, ts_err *err) {
  json_error_t je;
  json_t *root = json_loadb(hdr, hlen, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
  if (!root) {
    switch (json_error_code(&je)) {
      case json_error_duplicate_key:
        return ts_errf(err, TS_EINVAL, "header has a duplicate name (%s)", je.text);
      case json_error_invalid_utf8:
        return ts_errf(err, TS_EINVAL, "header is not valid UTF-8 (%s)", je.text);
      case json_error_out_of_memory: return oom(err);
      default:
        return ts_errf(err, TS_EINVAL, "header is not valid JSON: %s (line %d, column %d)", je.text,
                       je.line, je.column);
    }
  }
  int r = 0;
  if (!json_is_object(root)) {
    r = ts_errf(err, TS_EINVAL, "header is not a JSON object");
    goto out;
  }
  size_t cap = json_object_size(root);
  f->e = tl_calloc(cap ? cap : 1, sizeof *f->e);
  f->by_name = tl_calloc(cap ? cap : 1, sizeof *f->by_name);
  if (!f->e || !f->by_name) {
    r = oom(err);
    goto out;
  }
  const char *k;
  json_t *v;
  json_object_foreach(root, k, v) {
    if (strcmp(k, META_KEY) == 0)
      r = parse_meta(f, v, err);
    else if (!(r = parse_entry(&f->e[f->n], k, v, err)))
      f->n++;
    if (r) goto out;
  }
  qsort(f->e, (size_t)f->n, sizeof *f->e, cmp_offset);
  for (int i = 0; i < f->n; i++) f->by_name[i] = &f->e[i];
  qsort(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_name);
  r = check_layout(f, err);
out:
  json_decref(root);
  return r;
}

/* Validates a whole file image; f->map (if any) is already set. */
static int parse_image(st_file *f, const unsigned char *buf, size_t len, ts_err *err) {
  if (len < 8)
    return ts_errf(err, TS_EINVAL, "file is %zu bytes, shorter than the 8-byte header length", len);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
  if (hlen > ST_MAX_HEADER)
    return ts_errf(err, TS_EINVAL, "header length %llu exceeds the limit of %llu bytes",
                   (unsigned long long)hlen, ST_MAX_HEADER);
  if (hlen > len - 8)
    return ts_errf(err, TS_EINVAL, "header length %llu runs past the end of the file (%zu bytes)",
                   (unsigned long long)hlen, len);
  f->data = buf + 8 + hlen;
  f->data_len = len - 8 - (size_t)hlen;
  return parse_header(f, (const char *)buf + 8, (size_t)hlen, err);
}

static int finish_open(st_file **out, st_file *f, const unsigned char *buf, size_t len,
                       const char *label, ts_err *err) {
  int r = parse_image(f, buf, len, err);
  if (r) {
    ts_err_prefix(err, "weights '%s'", label ? label : "<memory>");
    st_close(f);
    return r;
  }
  *out = f;
  return 0;
}

int st_open_mem(st_file **out, const void *buf, size_t len, const char *label, ts_err *err) {
  *out = NULL;
  st_file *f = tl_calloc(1, sizeof *f);
  if (!f) return oom(err);
  return finish_open(out, f, buf, len, label, err);
}

/* Reads the first len bytes of fd with pread into dst, or through a 1 MiB
 * scratch buffer when dst is NULL, and hashes them into h (if any). A file
 * that ends early shrank while being read. */
static int read_all(int fd, size_t len, const char *path, unsigned char *dst, hash_ctx *h,
                    ts_err *err) {
  const size_t chunk = dst ? (8u << 20) : (1u << 20);
  unsigned char *scratch = dst ? NULL : tl_malloc(chunk);
  if (!dst && !scratch) return oom(err);
  size_t got = 0;
  int r = 0;
  while (got < len) {
    size_t want = len - got < chunk ? len - got : chunk;
    unsigned char *to = dst ? dst + got : scratch;
    ssize_t n = pread(fd, to, want, (off_t)got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      r = n == 0 ? ts_errf(err, TS_EIO,
                           "weights '%s' shrank while being read (%zu of %zu bytes); "
                           "write new versions by rename, not in place",
                           path, got, len)
                 : ts_errf(err, TS_EIO, "cannot read weights '%s': %s", path, strerror(errno));
      break;
    }
    if (h) hash_update(h, to, (size_t)n);
    got += (size_t)n;
  }
  tl_free(scratch);
  return r;
}

/* Reads the whole file into a private anonymous mapping (page-aligned, given
 * back to the system at st_close), hashing as it goes. A file whose size,
 * inode or modification time differ after the read was changed while being
 * read: refused, the caller keeps what it had. */
static int read_image(int fd, const struct stat *before, const char *path, void **image,
                      hash_ctx *h, ts_err *err) {
  size_t len = (size_t)before->st_size;
  void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED)
    return ts_errf(err, TS_ENOMEM, "cannot allocate %zu bytes for weights '%s'", len, path);
  int r = read_all(fd, len, path, m, h, err);
  struct stat after;
  if (!r && (fstat(fd, &after) != 0 || after.st_size != before->st_size ||
             after.st_ino != before->st_ino || after.st_mtim.tv_sec != before->st_mtim.tv_sec ||
             after.st_mtim.tv_nsec != before->st_mtim.tv_nsec))
    r = ts_errf(err, TS_EIO,
                "weights '%s' changed while being read; write new versions by rename, "
                "not in place",
                path);
  if (r) {
    munmap(m, len);
    return r;
  }
  mprotect(m, len, PROT_READ);
  *image = m;
  return 0;
}

int st_open_file(st_file **out, const char *path, st_load how, char sha256_hex[HASH_HEX_LEN + 1],
                 ts_err *err) {
  *out = NULL;
  if (sha256_hex) sha256_hex[0] = 0;
  /* O_NONBLOCK: a FIFO named model.safetensors must not stall the load (it
   * is refused below as not a regular file) */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    int e = errno;
    struct stat lst;
    if ((e == ENXIO || e == ENODEV) && stat(path, &lst) == 0 && !S_ISREG(lst.st_mode))
      return ts_errf(err, TS_EINVAL, "weights '%s' is a %s, not a regular file", path,
                     fs_type_name(lst.st_mode));
    return ts_errf(err,
                   e == ENOENT  ? TS_ENOTFOUND
                   : e == ELOOP ? TS_EINVAL
                                : TS_EIO,
                   "cannot open weights '%s': %s", path,
                   e == ELOOP ? "a loop of symbolic links" : strerror(e));
  }
  struct stat st;
  int r = 0;
  st_file *f = NULL;
  hash_ctx *h = NULL;
  if (fstat(fd, &st) != 0) {
    r = ts_errf(err, TS_EIO, "cannot stat weights '%s': %s", path, strerror(errno));
    goto fail;
  }
  if (!S_ISREG(st.st_mode)) {
    r = ts_errf(err, TS_EINVAL, "weights '%s' is a %s, not a regular file", path,
                fs_type_name(st.st_mode));
    goto fail;
  }
  {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  }
  if ((uint64_t)st.st_size > SIZE_MAX) {
    r = ts_errf(err, TS_ETOOBIG, "weights '%s' are too large to map", path);
    goto fail;
  }
  if (!(f = tl_calloc(1, sizeof *f)) || (sha256_hex && !(h = hash_sha256_new()))) {
    r = oom(err);
    goto fail;
  }
  size_t len = (size_t)st.st_size;
  if (len > 0 && how == ST_READ) {
    if ((r = read_image(fd, &st, path, &f->map, h, err))) goto fail;
    f->map_len = len;
  } else if (len > 0) {
    void *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      r = ts_errf(err, errno == ENOMEM ? TS_ENOMEM : TS_EIO, "cannot map weights '%s': %s", path,
                  strerror(errno));
      goto fail;
    }
    f->map = m;
    f->map_len = len;
    /* hashed through the descriptor, not the mapping: a file truncated now
     * gives a wrong digest or a short read, never SIGBUS in the loader */
    if (h && (r = read_all(fd, len, path, NULL, h, err))) goto fail;
  }
  close(fd);
  if (h) {
    hash_final_hex(h, sha256_hex);
    hash_free(h);
  }
  static const unsigned char none[1];
  return finish_open(out, f, f->map ? f->map : none, len, path, err);
fail:
  hash_free(h);
  if (f && f->map) munmap(f->map, f->map_len);
  tl_free(f);
  close(fd);
  return r;
}

int st_open(st_file **out, const char *path, ts_err *err) {
  return st_open_file(out, path, ST_MMAP, NULL, err);
}

void st_close(st_file *f) {
  if (!f) return;
  for (int i = 0; i < f->n; i++) tl_free(f->e[i].name);
  for (int i = 0; i < 2 * f->nmeta; i++) tl_free(f->meta[i]);
  tl_free(f->e);
  tl_free(f->by_name);
  tl_free(f->meta);
  if (f->map) munmap(f->map, f->map_len);
  tl_free(f);
}

int st_count(const st_file *f) {
  return f->n;
}

const char *st_name(const st_file *f, int i) {
  return i >= 0 && i < f->n ? f->e[i].name : NULL;
}

static const st_entry *find(const st_file *f, const char *name) {
  st_entry key = {.name = (char *)name}, *kp = &key;
  st_entry **hit = bsearch(&kp, f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_name);
  return hit ? *hit : NULL;
}

int st_find(const st_file *f, const char *name) {
  const st_entry *e = find(f, name);
  return e ? (int)(e - f->e) : -1;
}

int st_meta_count(const st_file *f) {
  return f->nmeta;
}
const char *st_meta_key(const st_file *f, int i) {
  return i >= 0 && i < f->nmeta ? f->meta[2 * i] : NULL;
}
const char *st_meta_value(const st_file *f, int i) {
  return i >= 0 && i < f->nmeta ? f->meta[2 * i + 1] : NULL;
}
const char *st_meta_get(const st_file *f, const char *key) {
  for (int i = 0; i < f->nmeta; i++)
    if (strcmp(f->meta[2 * i], key) == 0) return f->meta[2 * i + 1];
  return NULL;
}

static int not_found(const char *name, ts_err *err) {
  return ts_errf(err, TS_ENOTFOUND, "weights have no tensor '%s'", name);
}

int st_get(st_file *f, const char *name, ts_tensor *out, ts_err *err) {
  memset(out, 0, sizeof *out);
  const st_entry *e = find(f, name);
  if (!e) return not_found(name, err);
  const unsigned char *p = f->data + e->begin;
  size_t nbytes = (size_t)(e->end - e->begin);
  if ((uintptr_t)p % ts_dtype_size(e->dtype) == 0)
    return ts_wrap(out, name, e->dtype, e->ndim, e->shape, (void *)(uintptr_t)p, nbytes, err);
  int r = ts_alloc(out, name, e->dtype, e->ndim, e->shape, err);
  if (r) return r;
  memcpy(out->data, p, nbytes);
  return 0;
}

/* "[4, *]" for an expected shape, -1 printed as "*". */
static const char *expect_str(const int64_t *s, int ndim, char *buf, size_t n) {
  size_t off = (size_t)snprintf(buf, n, "[");
  for (int i = 0; i < ndim && off < n; i++) {
    if (s[i] < 0)
      off += (size_t)snprintf(buf + off, n - off, "%s*", i ? ", " : "");
    else
      off += (size_t)snprintf(buf + off, n - off, "%s%lld", i ? ", " : "", (long long)s[i]);
  }
  if (off < n) snprintf(buf + off, n - off, "]");
  return buf;
}

static int check_shape(const st_entry *e, int ndim, const int64_t *expect, ts_err *err) {
  if (ndim < 0) return 0;
  int ok = e->ndim == ndim;
  for (int i = 0; ok && expect && i < ndim; i++)
    if (expect[i] >= 0 && expect[i] != e->shape[i]) ok = 0;
  if (ok) return 0;
  char want[160], got[160];
  ts_shape_str(e->shape, e->ndim, got, sizeof got);
  if (expect)
    return ts_errf(err, TS_EINVAL, "tensor '%s': expected shape %s, got %s", e->name,
                   expect_str(expect, ndim, want, sizeof want), got);
  return ts_errf(err, TS_EINVAL, "tensor '%s': expected %d dimensions, got shape %s", e->name, ndim,
                 got);
}

static int nonfinite(const char *name, int64_t i, double v, ts_err *err) {
  return ts_errf(err, TS_EINVAL, "tensor '%s': element %lld is %s; weights must be finite", name,
                 (long long)i, isnan(v) ? "NaN" : "infinite");
}

int st_get_f32(st_file *f, const char *name, int ndim, const int64_t *expect_shape, ts_tensor *out,
               ts_err *err) {
  memset(out, 0, sizeof *out);
  const st_entry *e = find(f, name);
  if (!e) return not_found(name, err);
  int r = check_shape(e, ndim, expect_shape, err);
  if (r) return r;
  if (e->dtype == TS_FP32) {
    if ((r = st_get(f, name, out, err))) return r;
    int64_t n = ts_tensor_numel(out);
    const float *x = out->data;
    for (int64_t i = 0; i < n; i++)
      if (!isfinite(x[i])) {
        r = nonfinite(name, i, x[i], err);
        ts_free(out);
        return r;
      }
    return 0;
  }
  if (e->dtype != TS_FP16 && e->dtype != TS_BF16 && e->dtype != TS_FP64)
    return ts_errf(err, TS_EINVAL,
                   "tensor '%s': dtype %s cannot be used where floating-point weights are "
                   "expected (F16, BF16, F32 or F64)",
                   name, ts_dtype_st_name(e->dtype));
  if ((r = ts_alloc(out, name, TS_FP32, e->ndim, e->shape, err))) return r;
  const unsigned char *p = f->data + e->begin;
  float *y = out->data;
  int64_t n = ts_tensor_numel(out);
  for (int64_t i = 0; i < n; i++) {
    double v;
    if (e->dtype == TS_FP64) {
      memcpy(&v, p + 8 * i, 8);
    } else {
      uint16_t h;
      memcpy(&h, p + 2 * i, 2);
      v = e->dtype == TS_FP16 ? ts_half_to_float(h) : ts_bf16_to_float(h);
    }
    if (!isfinite(v)) {
      r = nonfinite(name, i, v, err);
      goto fail;
    }
    if (fabs(v) > 3.4028234663852886e38) {
      r = ts_errf(err, TS_EINVAL, "tensor '%s': element %lld (%g) overflows FP32", name,
                  (long long)i, v);
      goto fail;
    }
    y[i] = (float)v;
  }
  return 0;
fail:
  ts_free(out);
  return r;
}

/* ------------------------------------------------------------------ writer */

typedef struct wt_entry {
  char *name;
  ts_dtype dtype;
  int ndim;
  int64_t shape[TS_MAXDIM];
  void *data;
  size_t nbytes;
} wt_entry;

struct st_writer {
  wt_entry *e;
  int n, cap;
  char **meta; /* key, value, ... */
  int nmeta, capmeta;
};

/* Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const char *s) {
  const unsigned char *p = (const unsigned char *)s;
  while (*p) {
    unsigned c = *p++;
    int more;
    unsigned min, cp;
    if (c < 0x80) continue;
    if (c >= 0xc2 && c <= 0xdf)
      more = 1, min = 0x80, cp = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef)
      more = 2, min = 0x800, cp = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4)
      more = 3, min = 0x10000, cp = c & 0x07;
    else
      return 0;
    for (int i = 0; i < more; i++) {
      if ((*p & 0xc0) != 0x80) return 0;
      cp = cp << 6 | (*p++ & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  }
  return 1;
}

st_writer *st_writer_new(void) {
  return tl_calloc(1, sizeof(st_writer));
}

void st_writer_free(st_writer *w) {
  if (!w) return;
  for (int i = 0; i < w->n; i++) {
    tl_free(w->e[i].name);
    tl_free(w->e[i].data);
  }
  for (int i = 0; i < 2 * w->nmeta; i++) tl_free(w->meta[i]);
  tl_free(w->e);
  tl_free(w->meta);
  tl_free(w);
}

int st_writer_add(st_writer *w, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
                  const void *data, ts_err *err) {
  if (!utf8_valid(name))
    return ts_errf(err, TS_EINVAL, "tensor name '%s' is not valid UTF-8", name);
  if (strcmp(name, META_KEY) == 0)
    return ts_errf(err, TS_EINVAL, "'" META_KEY "' is reserved and cannot name a tensor");
  if ((unsigned)dtype >= TS_DTYPE_COUNT || dtype == TS_BYTES)
    return ts_errf(err, TS_EINVAL, "tensor '%s': dtype %s cannot be stored in safetensors", name,
                   ts_dtype_name(dtype));
  int64_t numel;
  int r = ts_numel(shape, ndim, &numel, err);
  if (r) {
    ts_err_prefix(err, "tensor '%s'", name);
    return r;
  }
  for (int i = 0; i < w->n; i++)
    if (strcmp(w->e[i].name, name) == 0)
      return ts_errf(err, TS_ECONFLICT, "tensor '%s' was already added", name);
  size_t nbytes = (size_t)numel * ts_dtype_size(dtype);
  if (nbytes && !data)
    return ts_errf(err, TS_EINVAL, "tensor '%s': no data for %zu bytes", name, nbytes);
  if (w->n == w->cap) {
    int nc = w->cap ? 2 * w->cap : 8;
    wt_entry *p = tl_realloc(w->e, sizeof *p * (size_t)nc);
    if (!p) return oom(err);
    w->e = p;
    w->cap = nc;
  }
  wt_entry *e = &w->e[w->n];
  memset(e, 0, sizeof *e);
  e->name = tl_strdup(name);
  e->data = tl_malloc(nbytes);
  if (!e->name || !e->data) {
    tl_free(e->name);
    tl_free(e->data);
    return oom(err);
  }
  if (nbytes) memcpy(e->data, data, nbytes);
  e->dtype = dtype;
  e->ndim = ndim;
  if (ndim > 0) memcpy(e->shape, shape, sizeof(int64_t) * (size_t)ndim);
  e->nbytes = nbytes;
  w->n++;
  return 0;
}

int st_writer_meta(st_writer *w, const char *key, const char *value, ts_err *err) {
  if (!utf8_valid(key) || !utf8_valid(value))
    return ts_errf(err, TS_EINVAL, "metadata '%s' is not valid UTF-8", key);
  char *v = tl_strdup(value);
  if (!v) return oom(err);
  for (int i = 0; i < w->nmeta; i++)
    if (strcmp(w->meta[2 * i], key) == 0) {
      tl_free(w->meta[2 * i + 1]);
      w->meta[2 * i + 1] = v;
      return 0;
    }
  if (w->nmeta == w->capmeta) {
    int nc = w->capmeta ? 2 * w->capmeta : 4;
    char **p = tl_realloc(w->meta, sizeof *p * 2 * (size_t)nc);
    if (!p) {
      tl_free(v);
      return oom(err);
    }
    w->meta = p;
    w->capmeta = nc;
  }
  char *k = tl_strdup(key);
  if (!k) {
    tl_free(v);
    return oom(err);
  }
  w->meta[2 * w->nmeta] = k;
  w->meta[2 * w->nmeta + 1] = v;
  w->nmeta++;
  return 0;
}

static int cmp_write_order(const void *a, const void *b) {
  const wt_entry *x = *(wt_entry *const *)a, *y = *(wt_entry *const *)b;
  size_t sx = ts_dtype_size(x->dtype), sy = ts_dtype_size(y->dtype);
  if (sx != sy) return sx > sy ? -1 : 1;
  return strcmp(x->name, y->name);
}

/* Builds the header JSON for entries in `order`; NULL when out of memory. */
static json_t *build_header(const st_writer *w, wt_entry **order) {
  json_t *root = json_object();
  if (!root) return NULL;
  if (w->nmeta) {
    json_t *m = json_object();
    if (json_object_set_new(root, META_KEY, m)) goto fail;
    for (int i = 0; i < w->nmeta; i++)
      if (json_object_set_new(m, w->meta[2 * i], json_string(w->meta[2 * i + 1]))) goto fail;
  }
  uint64_t at = 0;
  for (int i = 0; i < w->n; i++) {
    const wt_entry *e = order[i];
    json_t *t = json_object();
    if (json_object_set_new(root, e->name, t)) goto fail; /* t is freed on failure */
    json_t *shape = json_array(), *offs = json_array();
    /* each set_new consumes its value, even when it fails */
    if (json_object_set_new(t, "dtype", json_string(ts_dtype_st_name(e->dtype)))) {
      json_decref(shape);
      json_decref(offs);
      goto fail;
    }
    if (json_object_set_new(t, "shape", shape)) {
      json_decref(offs);
      goto fail;
    }
    if (json_object_set_new(t, "data_offsets", offs)) goto fail;
    for (int d = 0; d < e->ndim; d++)
      if (json_array_append_new(shape, json_integer(e->shape[d]))) goto fail;
    if (json_array_append_new(offs, json_integer((json_int_t)at)) ||
        json_array_append_new(offs, json_integer((json_int_t)(at + e->nbytes))))
      goto fail;
    at += e->nbytes;
  }
  return root;
fail:
  json_decref(root);
  return NULL;
}

int st_writer_save(st_writer *w, const char *path, ts_err *err) {
  wt_entry **order = tl_calloc(w->n ? (size_t)w->n : 1, sizeof *order);
  json_t *root = NULL;
  unsigned char *hdr = NULL;
  int r = 0, fd = -1;
  if (!order) return oom(err);
  for (int i = 0; i < w->n; i++) order[i] = &w->e[i];
  qsort(order, (size_t)w->n, sizeof *order, cmp_write_order);
  if (!(root = build_header(w, order))) {
    r = oom(err);
    goto out;
  }
  size_t jlen = json_dumpb(root, NULL, 0, JSON_COMPACT);
  size_t hlen = (jlen + 7) / 8 * 8; /* the reference pads with spaces to 8 */
  if (jlen == 0 || !(hdr = tl_malloc(8 + hlen))) {
    r = oom(err);
    goto out;
  }
  json_dumpb(root, (char *)hdr + 8, jlen, JSON_COMPACT);
  memset(hdr + 8 + jlen, ' ', hlen - jlen);
  for (int i = 0; i < 8; i++) hdr[i] = (unsigned char)((uint64_t)hlen >> (8 * i));

  fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    r = ts_errf(err, errno == ENOENT ? TS_ENOTFOUND : TS_EIO, "cannot create '%s': %s", path,
                strerror(errno));
    goto out;
  }
  r = fs_write_all(fd, hdr, 8 + hlen, path, err);
  for (int i = 0; !r && i < w->n; i++)
    r = fs_write_all(fd, order[i]->data, order[i]->nbytes, path, err);
  if (!r && fsync(fd) != 0)
    r = ts_errf(err, TS_EIO, "cannot fsync '%s': %s", path, strerror(errno));
  if (close(fd) != 0 && !r)
    r = ts_errf(err, TS_EIO, "cannot close '%s': %s", path, strerror(errno));
  if (r) unlink(path);
out:
  tl_free(hdr);
  json_decref(root);
  tl_free(order);
  return r;
}
