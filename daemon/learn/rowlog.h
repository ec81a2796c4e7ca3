/* rowlog.h - the served-row log: a bounded, crash-safe append-only store.
 *
 * A directory of segment files seg-<16 digits>.log, numbered upwards. Each
 * segment starts with the 8-byte magic "TLYRLOG1", then records:
 *
 *     u32 length (little-endian, of the payload; bit 31 set: a row record)
 *     u32 crc32  (zlib's, of the payload)
 *     payload    (length bytes; opaque here: learn/lrow.c writes it)
 *
 * Invariants:
 * - Appends go only to the newest segment, which is always one this
 *   process created: an existing segment is never written again, so a torn
 *   tail left by a crash is never followed by good records.
 * - Reading a segment stops at its first record whose length is impossible
 *   or whose CRC does not match (a torn or corrupt tail): that record and
 *   what follows it in that segment are skipped and counted, never served.
 * - The store holds at most max_rows records counted as rows (rl_append's
 *   `is_row`): a segment is closed after seg_rows of them, and whole
 *   segments, oldest first, are deleted while the rows of the others would
 *   still exceed max_rows.
 *
 * One process at a time: rl_open takes an flock on <dir>/lock (released by
 * rl_close or the process's death) and refuses with -TS_ECONFLICT while
 * another process holds it.
 *
 * Threads: rl_append copies the record into a bounded queue (max_queue_bytes;
 * beyond it the record is dropped and counted) and returns; one writer
 * thread per store writes the queue out and fsyncs the segment at most once
 * per sync_interval seconds (1 by default), so a crash loses at most the
 * records of the last interval. rl_flush waits until everything appended
 * before it is written and synced. Every function is safe from any thread. */
#ifndef TALLYD_ROWLOG_H
#define TALLYD_ROWLOG_H

#include <stddef.h>
#include <stdint.h>

#include "../base/err.h"

#define RL_MAGIC "TLYRLOG1"
#define RL_MAX_RECORD (16u << 20) /* a longer length field is corruption */

typedef struct rl_store rl_store;

typedef struct rl_opts {
  int64_t max_rows;       /* >= 1 */
  int64_t seg_rows;       /* rows per segment; 0: max(1, max_rows / 8) */
  double sync_interval;   /* seconds between fsyncs; 0: 1 */
  size_t max_queue_bytes; /* 0: 64 MiB */
} rl_opts;

typedef struct rl_stats {
  uint64_t appended, written, dropped_queue; /* records */
  uint64_t syncs, segments_dropped;
  uint64_t skipped_records; /* found torn or corrupt while reading */
  int64_t rows;             /* row records now in the store */
  int segments;
  int write_failed; /* the last write or fsync failed (errno in the log) */
} rl_stats;

/* Called for every good record at open, oldest first. */
typedef void (*rl_replay_fn)(void *data, const void *payload, size_t len, int is_row);

/* Opens (creating) the store in dir, replays what is there through fn
 * (which may be NULL), deletes segments over the bound, starts a new
 * segment and the writer thread. */
int rl_open(rl_store **out, const char *dir, const rl_opts *o, rl_replay_fn fn, void *data,
            ts_err *err);
/* Queues one record (copied). is_row: counts against max_rows. 0, or
 * -TS_EBUSY when the queue is full (the record is dropped and counted). */
int rl_append(rl_store *s, const void *payload, size_t len, int is_row, ts_err *err);
/* Waits until every record appended before the call is written and fsynced. */
void rl_flush(rl_store *s);
void rl_get_stats(rl_store *s, rl_stats *out);
/* Flushes, stops the writer, closes. NULL is fine. */
void rl_close(rl_store *s);

/* Reads one segment file (for tests and tools): calls fn for each good
 * record; *skipped receives 1 when a torn/corrupt tail was found. */
int rl_read_segment(const char *path, rl_replay_fn fn, void *data, int *skipped, ts_err *err);

#endif
