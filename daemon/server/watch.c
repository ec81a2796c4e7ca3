/* watch.c - repository change notifications (see watch.h). */
#include "watch.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "../base/log.h"

/* What a change looks like in each directory watched. No IN_MODIFY: a
 * file still being written is noticed once it is closed or renamed into
 * place, and the fit lock's renewals (rewrites of an open file) stay quiet. */
#define WATCH_MASK                                                                    \
  (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB | \
   IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)

/* File systems on which inotify sees only this host's changes. */
static const char *network_fs(const char *path) {
  struct statfs sf;
  if (statfs(path, &sf) != 0) return NULL;
  switch ((unsigned long)sf.f_type) {
    case 0x6969UL: return "NFS";
    case 0xFF534D42UL: return "CIFS";
    case 0xFE534D42UL: return "SMB2";
    case 0x517BUL: return "SMB";
    case 0x00C36400UL: return "CephFS";
    case 0x65735546UL: return "FUSE";
    case 0x47504653UL: return "GPFS";
    case 0x0BD00BD0UL: return "Lustre";
    default: return NULL;
  }
}

static void add_watch(server *s, const char *path) {
  if (inotify_add_watch(s->watch_fd, path, WATCH_MASK) < 0 && errno != ENOENT && errno != ENOTDIR &&
      !s->watch_warned) {
    s->watch_warned = 1; /* once: ENOSPC repeats for every directory */
    log_warn("repository watch: %s: %s%s", path, strerror(errno),
             errno == ENOSPC ? " (raise fs.inotify.max_user_watches, or use "
                               "--repository-poll-secs)"
                             : "");
  }
}

/* Watches the directories in dir (not hidden ones: temporaries, locks);
 * depth 1 goes one level further down. */
static void add_dirs(server *s, const char *dir, int depth) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  char p[PATH_MAX];
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    if (e->d_type != DT_DIR && e->d_type != DT_UNKNOWN && e->d_type != DT_LNK) continue;
    if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= (int)sizeof p) continue;
    struct stat st;
    if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
    add_watch(s, p);
    if (depth > 0) add_dirs(s, p, depth - 1);
  }
  closedir(d);
}

void watch_rearm(server *s) {
  if (s->watch_fd < 0) return;
  add_watch(s, s->cfg->model_repository);
  add_dirs(s, s->cfg->model_repository, 1); /* models, and their version directories */
}

static void on_settled(uv_timer_t *t) {
  server *s = t->data;
  if (atomic_load(&s->draining)) return;
  server_schedule_sync(s, "repository change");
}

static void on_events(uv_poll_t *p, int status, int events) {
  server *s = p->data;
  (void)events;
  if (status < 0) return;
  char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
  int relevant = 0;
  for (;;) {
    ssize_t n = read(s->watch_fd, buf, sizeof buf);
    if (n <= 0) break; /* EAGAIN: drained */
    for (char *q = buf; q < buf + n;) {
      const struct inotify_event *ev = (const struct inotify_event *)q;
      q += sizeof *ev + ev->len;
      if (ev->mask & IN_IGNORED) continue; /* a watched directory went */
      /* hidden names: temporary version directories (their rename into
       * place is the event), the fit lock and its leftovers */
      if (ev->len && ev->name[0] == '.') continue;
      relevant = 1;
    }
  }
  if (relevant && !uv_is_active((uv_handle_t *)&s->watch_timer))
    uv_timer_start(&s->watch_timer, on_settled, WATCH_DEBOUNCE_MS, 0);
}

uint64_t watch_start(server *s) {
  const srv_config *cfg = s->cfg;
  const char *mode = cfg->repository_watch ? cfg->repository_watch : "inotify";
  uint64_t poll_ms = (uint64_t)cfg->repository_poll_secs * 1000;
  s->watch_fd = -1;
  uv_timer_init(s->loop, &s->watch_timer);
  s->watch_timer.data = s;
  if (strcmp(mode, "poll") == 0) {
    if (!poll_ms) poll_ms = WATCH_NET_POLL_SECS * 1000;
    log_info("repository watch: polling every %llu ms", (unsigned long long)poll_ms);
    return poll_ms;
  }
  if (strcmp(mode, "off") == 0) return poll_ms;
  const char *net = network_fs(cfg->model_repository);
  if (net) {
    if (!poll_ms) poll_ms = WATCH_NET_POLL_SECS * 1000;
    log_warn(
        "repository watch: %s is on %s, where inotify sees only this host's changes: "
        "polling every %llu ms as well (--repository-poll-secs)",
        cfg->model_repository, net, (unsigned long long)poll_ms);
  }
  s->watch_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (s->watch_fd < 0) {
    if (!poll_ms) poll_ms = WATCH_NET_POLL_SECS * 1000;
    log_warn("repository watch: no inotify (%s): polling every %llu ms", strerror(errno),
             (unsigned long long)poll_ms);
    return poll_ms;
  }
  watch_rearm(s);
  uv_poll_init(s->loop, &s->watch_poll, s->watch_fd);
  s->watch_poll.data = s;
  uv_poll_start(&s->watch_poll, UV_READABLE, on_events);
  log_info("repository watch: inotify on %s%s", cfg->model_repository,
           poll_ms ? ", and polling" : "");
  return poll_ms;
}

void watch_stop(server *s) {
  if (s->watch_poll.loop) uv_poll_stop(&s->watch_poll);
  if (s->watch_timer.loop) uv_timer_stop(&s->watch_timer);
}
