/* safetensors.h - reading and writing model weights in the safetensors format.
 *
 * Format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
 *   {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
 *    ..., "__metadata__": {"<key>": "<value>", ...}}
 * then the byte buffer; offsets are relative to the start of the buffer.
 *
 * st_open validates the whole file before anything is used, and refuses with
 * -TS_EINVAL and a message naming the problem (and the tensor): a short file,
 * a header longer than the file or than ST_MAX_HEADER, JSON that is invalid,
 * not UTF-8, not an object or has duplicate keys, an entry without dtype,
 * shape or data_offsets, an unknown dtype, a bad shape, a byte length that
 * does not match shape x dtype, offsets out of bounds, tensors that overlap
 * or leave gaps (sorted by offset they must tile the buffer exactly from 0),
 * bytes after the last tensor, and metadata that is not an object of strings.
 * Keys of an entry other than the three above are ignored, as the reference
 * implementation does. A file with no tensors ("{}") is valid.
 *
 * Ownership: an st_file owns its image of the file (st_open_file with
 * ST_READ: a private copy read into anonymous memory; ST_MMAP and st_open: a
 * read-only MAP_PRIVATE mmap of the whole file) or borrows the caller's
 * buffer (st_open_mem; it must outlive the st_file). Tensors that st_get / st_get_f32 BORROW point
 * into it, are read-only, and are valid until st_close; tensors they had to copy or convert own
 * their data. Either way the caller calls ts_free on the tensor (which frees only what is owned). A
 * mapped (ST_MMAP) file must not be truncated or rewritten in place while open: the mapping would
 * show the new bytes, or raise SIGBUS past a new end of file. A copy (ST_READ) is immune.
 *
 * An st_file is immutable after st_open: st_count, st_name, st_find,
 * st_meta_*, st_get and st_get_f32 may be called from several threads at once.
 * Data is little-endian; tallyd builds only for little-endian targets. */
#ifndef TALLYD_SAFETENSORS_H
#define TALLYD_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "hash.h"
#include "tensor.h"

/* The largest JSON header accepted (the reference implementation's limit). */
#define ST_MAX_HEADER 100000000ull

typedef struct st_file st_file;

/* How st_open_file brings a file into memory. */
typedef enum {
  ST_READ = 0, /* a private copy: writes to the file after the read never reach it */
  ST_MMAP = 1, /* a mapping: no copy, pages shared with the page cache */
} st_load;

/* Opens path (read or mapped as `how` says) and validates it. With sha256_hex
 * non-NULL it also receives the SHA-256 of the file through the same
 * descriptor (for ST_READ, of exactly the bytes read, so a digest check
 * covers what is served; ST_MMAP hashes with pread, so a file truncated
 * during the load is an error, not SIGBUS). ST_READ refuses, with
 * -TS_EIO, a file whose size, inode or modification time changed while it
 * was being read. On failure *out is NULL. */
int st_open_file(st_file **out, const char *path, st_load how, char sha256_hex[HASH_HEX_LEN + 1],
                 ts_err *err);
/* st_open_file(out, path, ST_MMAP, NULL, err). */
int st_open(st_file **out, const char *path, ts_err *err);
/* Validates a file image held in memory (borrowed, see above); `label` names
 * it in messages (may be NULL). */
int st_open_mem(st_file **out, const void *buf, size_t len, const char *label, ts_err *err);
void st_close(st_file *f);

/* Tensors in file order (ascending offset). */
int st_count(const st_file *f);
const char *st_name(const st_file *f, int i);
/* Index of a tensor, or -1. */
int st_find(const st_file *f, const char *name);

/* __metadata__: the value of key, or NULL when absent. */
const char *st_meta_get(const st_file *f, const char *key);
int st_meta_count(const st_file *f);
const char *st_meta_key(const st_file *f, int i);
const char *st_meta_value(const st_file *f, int i);

/* Fills *out (named `name`, owned name) with the tensor as stored. The data is
 * borrowed from the file when it is aligned to its element size, and copied
 * into an owned buffer when it is not (nothing is ever read unaligned).
 * A missing tensor: -TS_ENOTFOUND "weights have no tensor '<name>'". */
int st_get(st_file *f, const char *name, ts_tensor *out, ts_err *err);

/* Fetches a tensor as FP32: checks that it has ndim dimensions matching
 * expect_shape (an entry of -1 matches any size; expect_shape may be NULL to
 * check only ndim; ndim < 0 checks nothing), converts F16, BF16 and F64 into an
 * owned FP32 tensor, borrows F32 when aligned, and refuses integer dtypes,
 * NaN, Inf and F64 values beyond the FP32 range, naming the tensor. */
int st_get_f32(st_file *f, const char *name, int ndim, const int64_t *expect_shape, ts_tensor *out,
               ts_err *err);

/* Writer: collects tensors (copied on add) and metadata, then writes a file
 * the reference implementation reads: "__metadata__" first, tensors ordered
 * by decreasing element size then name (so every tensor is aligned to its
 * element size), header padded with spaces to a multiple of 8 bytes.
 * st_writer_new returns NULL when out of memory. */
typedef struct st_writer st_writer;

st_writer *st_writer_new(void);
/* data holds numel x dtype-size bytes (may be NULL when that is 0). Refuses
 * duplicate names, the name "__metadata__", names that are not UTF-8, and
 * the BYTES dtype. */
int st_writer_add(st_writer *w, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
                  const void *data, ts_err *err);
/* Sets (or replaces) a metadata entry; both strings must be UTF-8. */
int st_writer_meta(st_writer *w, const char *key, const char *value, ts_err *err);
/* Creates or truncates path, writes and fsyncs it (the caller fsyncs the
 * directory, see fsutil.h). A partly written file is removed on failure. */
int st_writer_save(st_writer *w, const char *path, ts_err *err);
void st_writer_free(st_writer *w);

#endif
