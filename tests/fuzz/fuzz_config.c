/* fuzz_config.c - libFuzzer target: flags and the --config JSON file.
 *
 * First byte even: the rest is a config file, written to a memfd and passed
 * as --config /proc/self/fd/N (plus one flag, to cover the merge). First
 * byte odd: the rest is an argument vector, NUL-separated (at most 32). */
#include <sys/mman.h>

#include "../../daemon/server/config.h"
#include "fuzz_common.h"

#define FUZZ_CFG_MAX_ARGS 32

static void fuzz_cfg_run(int argc, char **argv) {
  srv_config c;
  ts_err err = {0};
  cfg_defaults(&c);
  int rc = cfg_parse(&c, argc, argv, &err);
  fuzz_check_err(rc, &err);
  if (!rc) {
    FUZZ_ASSERT(c.listen && c.log_level && c.log_format);
    char host[256];
    int port;
    rc = cfg_listen(&c, host, sizeof host, &port, &err);
    fuzz_check_err(rc, &err);
    if (!rc) FUZZ_ASSERT(port >= 0 && port <= 65535);
  }
  cfg_free(&c);
}

int FUZZ_ENTRY(const uint8_t *data, size_t size);
int FUZZ_ENTRY(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  if ((data[0] & 1) == 0) {
    int fd = memfd_create("tallyd-fuzz-config", MFD_CLOEXEC);
    if (fd < 0) return 0;
    if (size > 1 && write(fd, data + 1, size - 1) != (ssize_t)(size - 1)) {
      close(fd);
      return 0;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    char *argv[] = {"tallyd", "--config", path, "--threads", "2", NULL};
    fuzz_cfg_run(5, argv);
    close(fd);
    return 0;
  }
  /* an argument vector: copy so that every argument is NUL-terminated */
  char *buf = malloc(size);
  if (!buf) return 0;
  memcpy(buf, data + 1, size - 1);
  buf[size - 1] = 0;
  char *argv[FUZZ_CFG_MAX_ARGS + 2];
  int argc = 0;
  argv[argc++] = "tallyd";
  for (size_t i = 0; i < size - 1 && argc <= FUZZ_CFG_MAX_ARGS;) {
    argv[argc++] = buf + i;
    i += strlen(buf + i) + 1;
  }
  argv[argc] = NULL;
  /* --config with a fuzzed path would read arbitrary files: keep the fuzzer
   * off the file system there (the file form above covers the parser). */
  for (int i = 1; i < argc; i++)
    if (strncmp(argv[i], "--config", 8) == 0) argv[i] = "--help";
  fuzz_cfg_run(argc, argv);
  free(buf);
  return 0;
}
