/* watch.h - how a replica learns that the shared repository changed
 * (--repository-watch): inotify on the repository root, every model
 * directory and every directory inside one (versions, and whatever else a
 * model keeps in directories), read on the loop thread through a uv_poll of
 * the inotify descriptor; changes within WATCH_DEBOUNCE_MS of the first are
 * taken together into one rescan (server_schedule_sync). Polling
 * (--repository-poll-secs) is the fallback where notifications do not
 * cross hosts (NFS, CephFS, SMB, FUSE), and a safety net beside inotify.
 * Internal to daemon/server. */
#ifndef TALLYD_WATCH_H
#define TALLYD_WATCH_H

#include <stdint.h>

#include "server.h"

#define WATCH_DEBOUNCE_MS 50
#define WATCH_NET_POLL_SECS 2 /* polling where inotify cannot see other hosts */

/* Starts what --repository-watch asks for (loop thread, at start): the
 * inotify descriptor, its uv_poll and the debounce timer (s->watch_*).
 * Returns the rescan period in ms that polling should use (0: none):
 * --repository-poll-secs, or WATCH_NET_POLL_SECS when the repository is on
 * a network file system or the mode is "poll" without a period. Never
 * fails: without inotify it falls back to polling, logged. */
uint64_t watch_start(server *s);
/* Adds watches for directories that appeared since the last call; called
 * by the rescan (on a worker) before it scans, so that nothing made after
 * the scan goes unseen. Adding a watch that exists is a no-op. */
void watch_rearm(server *s);
/* Stops reacting (the drain); the handles are closed with the others. */
void watch_stop(server *s);

#endif
