/* fsutil.h - the file-system steps behind tallyd's crash-safe model repository.
 *
 * A new model version appears atomically: its files are written into a
 * temporary directory "<model>/.tmp-XXXXXX" (fs_mkdtemp_in), each file is
 * written and fsynced (fs_write_file_sync), the directory is fsynced
 * (fs_fsync_dir), then renamed to "<model>/<version>" (fs_rename_atomic, which
 * also fsyncs the parent so the rename itself survives a power cut). A crash
 * before the rename leaves only a ".tmp-*" directory, which fs_clean_tmp
 * removes at the next start and fs_list_versions never reports.
 *
 * Every function returns 0 or a negative ts_status and fills err (may be NULL)
 * with a message naming the path. Strings and arrays handed out are allocated
 * with tl_malloc; the caller frees them with tl_free. */
#ifndef TALLYD_FSUTIL_H
#define TALLYD_FSUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* The prefix of temporary directories inside a model directory. */
#define FS_TMP_PREFIX ".tmp-"

/* Writes all len bytes to fd, retrying short writes and EINTR. `what` names
 * the file in the error message. */
int fs_write_all(int fd, const void *data, size_t len, const char *what, ts_err *err);

/* Creates or truncates path (mode 0644), writes data, fsyncs and closes it.
 * The parent directory is not fsynced (see fs_fsync_dir). */
int fs_write_file_sync(const char *path, const void *data, size_t len, ts_err *err);

/* fsyncs a directory, so that entries created or renamed in it are durable. */
int fs_fsync_dir(const char *path, ts_err *err);

/* Creates a fresh directory "<dir>/<prefix>XXXXXX" (mode 0700) and returns its
 * path in *out_path (tl_malloc'ed). */
int fs_mkdtemp_in(const char *dir, const char *prefix, char **out_path, ts_err *err);

/* rename(2) from -> to, then fsyncs the parent directory of `to` (and of
 * `from` when it differs). Like rename(2), a directory never replaces a
 * non-empty directory (-TS_ECONFLICT), so a published version is never
 * overwritten. */
int fs_rename_atomic(const char *from, const char *to, ts_err *err);

/* Publishes the directory tmp as the first free version of model_dir at or
 * after *version, atomically and without a race between processes (replicas
 * on one shared repository): each number is claimed by a rename that fails
 * when the target exists (renameat2 RENAME_NOREPLACE; where the file system
 * lacks it, rename(2), which still never replaces a non-empty directory).
 * Before each attempt, prepare(tmp, version, ctx) writes what depends on the
 * number (version.json) and makes it durable. *version receives the number
 * taken. -TS_ECONFLICT after 64 numbers taken by others, or past
 * FS_MAX_VERSION. */
typedef int (*fs_prepare_fn)(const char *tmp, int64_t version, void *ctx, ts_err *err);
int fs_claim_version(const char *model_dir, const char *tmp, int64_t *version,
                     fs_prepare_fn prepare, void *ctx, ts_err *err);

/* Removes path and everything below it without following symbolic links: a
 * link is removed, never what it points to. A missing path is not an error. */
int fs_rmtree(const char *path, ts_err *err);

/* Opens path read-only if it is a regular file (following symbolic links):
 * a FIFO, device, socket or directory is refused with -TS_EINVAL naming
 * what it is, a loop of links likewise, and opening never blocks (a FIFO
 * without a writer). On success *fd is open, blocking, close-on-exec. */
int fs_open_regular(const char *path, int *fd, ts_err *err);
/* "regular file", "FIFO", "character device", ... for a st_mode. */
const char *fs_type_name(unsigned mode);

/* The largest version number: 2^53 - 1, so that every version is exact as a
 * JSON number in any client (JavaScript's doubles included), and version + 1
 * never overflows. URLs, directory names and new versions keep to it. */
#define FS_MAX_VERSION INT64_C(9007199254740991)

/* The one rule for model names (directory names in the repository, and the
 * {model} of every route) and session ids: 1..FS_NAME_MAX characters of
 * letters, digits, '_', '-' and '.', not starting with '.' (so never "." or
 * "..", nor a hidden or temporary directory). */
#define FS_NAME_MAX 200
int fs_name_valid(const char *s);

/* Parses a version as URLs and directory names spell it: a positive decimal
 * integer without leading zeros. 1: *out set; 0: not a version ("0", "01",
 * "+1", "abc", ".tmp-x"); -1: a version above FS_MAX_VERSION. */
int fs_parse_version(const char *s, int64_t *out);

/* Lists the version directories of model_dir: names that are versions
 * (fs_parse_version) and directories (a symbolic link to a directory
 * counts). A directory named like a version above FS_MAX_VERSION is an
 * error (-TS_EINVAL naming it), never silently skipped or wrapped.
 * *versions (tl_malloc'ed, NULL when *n is 0) is sorted ascending. */
int fs_list_versions(const char *model_dir, int64_t **versions, int *n, ts_err *err);

/* Removes every entry of model_dir whose name starts with FS_TMP_PREFIX (left
 * behind by writes that crashed before their rename). *n_removed (may be
 * NULL) receives how many were removed. */
int fs_clean_tmp(const char *model_dir, int *n_removed, ts_err *err);

/* Reads a whole file into *out (tl_malloc'ed, NUL-terminated for convenience;
 * *len excludes the NUL). A file longer than max_bytes is refused with
 * -TS_ETOOBIG before more than max_bytes + 1 bytes are read. */
int fs_read_file(const char *path, size_t max_bytes, char **out, size_t *len, ts_err *err);

#endif
