/* fuzz_oip_binary.c - libFuzzer target: the binary tensor data extension.
 *
 * Input layout: 2 bytes little-endian J, then the body. The first
 * J mod (len + 2) bytes of the body are the JSON header (what the
 * Inference-Header-Content-Length header says), the rest is binary tensor
 * data that inputs claim with "binary_data_size". J may exceed the body, as
 * a hostile header would. */
#include "fuzz_common.h"

int FUZZ_ENTRY(const uint8_t *data, size_t size);
int FUZZ_ENTRY(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  size_t j = (size_t)data[0] | (size_t)data[1] << 8;
  const char *body = (const char *)data + 2;
  size_t len = size - 2;
  fuzz_decode_and_infer(body, len, j % (len + 2));
  return 0;
}
