/* notify.c - systemd's sd_notify protocol over an AF_UNIX datagram socket
 * (see notify.h). The protocol is a datagram of newline-separated
 * assignments; no reply comes back. */
#include "notify.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "../base/log.h"

static int fd = -1;
static struct sockaddr_un addr;
static socklen_t addr_len;
static uint64_t watchdog_usec;

int notify_init(void) {
  const char *p = getenv("NOTIFY_SOCKET");
  if (!p || !*p) return 0;
  size_t n = strlen(p);
  if ((p[0] != '/' && p[0] != '@') || n >= sizeof addr.sun_path) {
    log_warn(
        "NOTIFY_SOCKET '%s' is neither an absolute path nor an abstract name (@...); "
        "systemd notifications are off",
        p);
    return -1;
  }
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, p, n);
  /* an abstract name starts with a NUL byte and is not NUL-terminated */
  if (p[0] == '@') addr.sun_path[0] = 0;
  addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (p[0] == '/'));
  fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    log_warn("systemd notify socket: %s; notifications are off", strerror(errno));
    return -1;
  }
  const char *w = getenv("WATCHDOG_USEC");
  const char *wp = getenv("WATCHDOG_PID");
  if (w && *w) {
    char *end;
    unsigned long long v = strtoull(w, &end, 10);
    int for_us = !wp || !*wp || strtol(wp, NULL, 10) == (long)getpid();
    if (*end == 0 && v > 0 && for_us) watchdog_usec = v;
  }
  return 0;
}

void notify_close(void) {
  if (fd >= 0) close(fd);
  fd = -1;
  watchdog_usec = 0;
}

int notify_enabled(void) {
  return fd >= 0;
}

uint64_t notify_watchdog_usec(void) {
  return fd >= 0 ? watchdog_usec : 0;
}

int notify_send(const char *msg) {
  if (fd < 0) return 0;
  ssize_t n;
  do n = sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    log_debug("systemd notify: %s", strerror(errno));
    return -1;
  }
  return 0;
}

int notify_sendf(const char *fmt, ...) {
  if (fd < 0) return 0;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return notify_send(buf);
}
