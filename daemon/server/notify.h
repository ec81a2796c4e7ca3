/* notify.h - the systemd notify protocol, spoken without libsystemd.
 *
 * When the service manager sets NOTIFY_SOCKET (a path, or an abstract name
 * written with a leading '@'), the daemon sends datagrams of "KEY=value"
 * lines to it: READY=1 once the repository is loaded and the server
 * listens; RELOADING=1 with MONOTONIC_USEC at SIGHUP and READY=1 after the
 * rescan; STOPPING=1 when the drain starts; WATCHDOG=1 every half of
 * WATCHDOG_USEC (only when WATCHDOG_PID is unset or names this process);
 * STATUS=... for `systemctl status`. Without NOTIFY_SOCKET every call does
 * nothing. notify_send is thread-safe (one sendto per message). */
#ifndef TALLYD_NOTIFY_H
#define TALLYD_NOTIFY_H

#include <stdint.h>

/* Reads the environment and opens the socket. 0, or -1 when NOTIFY_SOCKET
 * is set but unusable (logged; the daemon runs on). */
int notify_init(void);
void notify_close(void);
int notify_enabled(void);
/* Sends one message (lines separated by '\n'). 0 or -1. */
int notify_send(const char *msg);
int notify_sendf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The watchdog period asked for (WATCHDOG_USEC), 0 when none. */
uint64_t notify_watchdog_usec(void);

#endif
