/* log.h - one logger for the daemon: levels, text or JSON lines on stderr.
 *
 * Thread-safe (one write(2) per line). The request log line (method, path,
 * status, bytes, duration, request id) is emitted by the server through
 * log_request so that its fields are the same in both formats. */
#ifndef TALLYD_LOG_H
#define TALLYD_LOG_H

typedef enum log_level { LOG_DEBUG = 0, LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3 } log_level;

void log_set_level(log_level l);
int log_level_from_name(const char *name, log_level *out);
void log_set_json(int json);
void log_msg(log_level l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void log_request(const char *method, const char *path, int status, unsigned long long bytes,
                 double duration_ms, const char *request_id, const char *model);

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
