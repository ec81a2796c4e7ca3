/* fuzz_oip.c - libFuzzer target: the OIP JSON request decoder.
 *
 * The input is an inference request body (all JSON). Whatever oip_decode
 * accepts is checked for consistency (element count x dtype size = bytes)
 * and run through every model kind of fuzz_models[] and the encoder, which
 * is where a request's shape and datatype meet a model's expectations. */
#include "fuzz_common.h"

int FUZZ_ENTRY(const uint8_t *data, size_t size);
int FUZZ_ENTRY(const uint8_t *data, size_t size) {
  fuzz_decode_and_infer((const char *)data, size, 0);
  return 0;
}
