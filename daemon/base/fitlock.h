/* fitlock.h - a lease lock in a file, shared by processes on one file system
 * (replicas on one model repository, local or NFS): at most one fit or
 * calibration of a model at a time across every replica.
 *
 * The lock is a file created with O_EXCL. It holds one JSON object: the
 * holder's "owner" (replica id), "host", "pid", "pidns", "token" (random, this
 * acquisition's), "lease_ms" and "expires_ms" (wall clock, ms since the
 * epoch). The holder keeps its descriptor open and a thread of its own
 * rewrites "expires_ms" every lease/3 (and fdatasyncs, so that NFS clients
 * see it), for as long as the fit runs.
 *
 * A lock whose "expires_ms" has passed (a holder killed or hung; hosts are
 * assumed to keep their clocks in step, as with NTP, to well under a lease)
 * is stale and is taken over. So is the lock of this replica's own previous
 * process (same owner, host and pid namespace, and that pid is gone: a
 * restart after a crash), without waiting for its expiry. A stale lock is
 * taken over: the taker renames the file to a unique name and
 * checks that what it moved is the very file (inode) it judged stale; only
 * then does it remove it and create its own with O_EXCL. Two takers of one
 * stale lock cannot both win: the second one's rename moves the first one's
 * fresh lock, which the inode check catches, and it is put back with link(2)
 * (which never replaces). A file whose contents cannot be read (being written
 * over NFS, or damaged) is judged by its mtime instead.
 *
 * The holder checks at each renewal that the file at the path is still its
 * own (same inode); if it is not (taken over after the holder stalled past
 * its lease), the lock is lost: renewal stops, fl_lost says so, and release
 * leaves the new holder's file alone.
 *
 * Threads: an fl_lock is used by one thread at a time (acquire, lost,
 * release); its renewer is internal. */
#ifndef TALLYD_FITLOCK_H
#define TALLYD_FITLOCK_H

#include <stdint.h>

#include "err.h"

typedef struct fl_lock fl_lock;

#define FL_OWNER_MAX 64
#define FL_HOST_MAX 256

typedef struct fl_holder {
  char owner[FL_OWNER_MAX];
  char host[FL_HOST_MAX];
  long long pid;
  char pidns[64];     /* the holder's pid namespace ("pid:[4026531836]"), "" unknown */
  int64_t expires_ms; /* wall clock; 0: unknown (the contents could not be read) */
  int64_t lease_ms;
} fl_holder;

/* Takes the lock at path for `owner` with a lease of lease_ms (>= 100).
 * -TS_ECONFLICT when another holder's lock is live, with a message naming
 * it ("... held by replica 'r2' (host h, pid 12), lease expires in 3 s");
 * *holder (may be NULL) then receives it. Other failures: -TS_EIO (the
 * directory cannot be written), -TS_ENOMEM. On success *out is held and
 * renewed until fl_release. */
int fl_acquire(const char *path, const char *owner, int64_t lease_ms, fl_lock **out,
               fl_holder *holder, ts_err *err);
/* 1 when the lock was taken from us (we stalled past the lease). */
int fl_lost(fl_lock *l);
/* Stops renewing and removes the lock file if it is still ours; frees l
 * (NULL is fine). */
void fl_release(fl_lock *l);
/* Reads the lock at path: 1 and *h filled when there is one (expires_ms 0
 * when its contents could not be read), 0 when none, or a negative status. */
int fl_read(const char *path, fl_holder *h, ts_err *err);

/* Wall-clock milliseconds since the epoch. */
int64_t fl_now_ms(void);

#endif
