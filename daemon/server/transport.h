/* transport.h - the server's transport (http.c) as the lifecycle
 * (lifecycle.c) sees it: start libmicrohttpd under the loop, sweep the
 * waiting requests, stop. Loop thread only; internal to daemon/server. */
#ifndef TALLYD_TRANSPORT_H
#define TALLYD_TRANSPORT_H

#include <sys/socket.h>

#include "server.h"

/* Starts libmicrohttpd on sa (port in host order) with s->cfg's connection
 * options, s->conn_limit and, when s->tls_cert_pem is set, TLS 1.2+; makes
 * s->done_mu, s->done_async, s->mhd_poll and s->mhd_timer. 0, or an error
 * ("address in use" when the port is taken); what it made before failing
 * stays for server_init's unwinding (handles are closed by their loop). */
int transport_start(server *s, const struct sockaddr_storage *sa, int v6, int port, ts_err *err);
/* Runs libmicrohttpd once and re-arms its timer. */
void transport_run(server *s);
/* 504 for requests past their deadline; cancels the jobs of clients that
 * hung up. */
void transport_sweep(server *s, double now);
/* Open connections now (0 when not started). */
unsigned transport_connections(server *s);
/* Stops accepting (the drain); open connections are served on. */
void transport_quiesce(server *s);
/* Answers every waiting request 503, stops libmicrohttpd. Idempotent. */
void transport_stop(server *s);
/* Frees the jobs that came back after the transport stopped. */
void transport_drop_done(server *s);

#endif
