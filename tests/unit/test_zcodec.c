/* test_zcodec.c - the HTTP content codings (base/zcodec.h): round trips of
 * both codings, streams made by other encoders (Python's gzip.compress and
 * zlib.compress, a raw deflate stream, two gzip members back to back), the
 * cap on the inflated size (a 256 MiB bomb refused at a 1 MiB cap, a body of
 * exactly the cap taken), corrupt, truncated and trailing bytes, the
 * Content-Encoding parser, the Accept-Encoding choice with q-values, and
 * allocation failures turned into errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/base/zcodec.h"

/* Python 3: gzip.compress(b"hello tallyd", mtime=0) and zlib.compress(b"hello tallyd") */
static const unsigned char py_gzip[] = {
    0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x57,
    0x28, 0x49, 0xcc, 0xc9, 0xa9, 0x4c, 0x01, 0x00, 0x0d, 0xf7, 0x0c, 0x73, 0x0c, 0x00, 0x00, 0x00};
static const unsigned char py_zlib[] = {0x78, 0x9c, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x57, 0x28, 0x49,
                                        0xcc, 0xc9, 0xa9, 0x4c, 0x01, 0x00, 0x1e, 0x86, 0x04, 0xbf};
static const char hello[] = "hello tallyd";

static void text_of(size_t n, char *buf) {
  for (size_t i = 0; i < n; i++) buf[i] = "{\"data\": [0.125, 1.5, -3]}\n"[i % 26];
}

static void test_round_trips(void **s) {
  (void)s;
  ts_err err = {0};
  size_t sizes[] = {0, 1, 300, 100000};
  for (int c = ZC_GZIP; c <= ZC_DEFLATE; c++)
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
      size_t n = sizes[k];
      char *in = malloc(n + 1);
      text_of(n, in);
      char *z, *back;
      size_t zn, bn;
      assert_int_equal(zc_compress((zc_coding)c, in, n, 6, &z, &zn, &err), 0);
      if (n >= 300) assert_true(zn < n / 2); /* repetitive text shrinks */
      assert_int_equal(zc_inflate((zc_coding)c, z, zn, n, &back, &bn, &err), 0);
      assert_int_equal(bn, n);
      assert_memory_equal(back, in, n);
      assert_int_equal(back[n], 0); /* NUL-terminated for the JSON parser */
      tl_free(back);
      tl_free(z);
      free(in);
    }
  char *z;
  size_t zn;
  assert_int_equal(zc_compress(ZC_IDENTITY, "x", 1, 0, &z, &zn, &err), -TS_EINVAL);
}

static void test_foreign_streams(void **s) {
  (void)s;
  ts_err err = {0};
  char *out;
  size_t n;
  assert_int_equal(zc_inflate(ZC_GZIP, py_gzip, sizeof py_gzip, 1024, &out, &n, &err), 0);
  assert_int_equal(n, strlen(hello));
  assert_string_equal(out, hello);
  tl_free(out);
  assert_int_equal(zc_inflate(ZC_DEFLATE, py_zlib, sizeof py_zlib, 1024, &out, &n, &err), 0);
  assert_string_equal(out, hello);
  tl_free(out);
  /* raw deflate (RFC 1951): the zlib stream without its 2-byte header and
   * 4-byte Adler-32 trailer */
  assert_int_equal(zc_inflate(ZC_DEFLATE, py_zlib + 2, sizeof py_zlib - 6, 1024, &out, &n, &err),
                   0);
  assert_string_equal(out, hello);
  tl_free(out);
  /* two gzip members, as `cat a.gz b.gz` */
  unsigned char two[2 * sizeof py_gzip];
  memcpy(two, py_gzip, sizeof py_gzip);
  memcpy(two + sizeof py_gzip, py_gzip, sizeof py_gzip);
  assert_int_equal(zc_inflate(ZC_GZIP, two, sizeof two, 1024, &out, &n, &err), 0);
  assert_string_equal(out, "hello tallydhello tallyd");
  tl_free(out);
  /* a gzip body labelled deflate is refused, not misread */
  assert_int_equal(zc_inflate(ZC_DEFLATE, py_gzip, sizeof py_gzip, 1024, &out, &n, &err),
                   -TS_EINVAL);
  assert_null(out);
}

static void test_bad_streams(void **s) {
  (void)s;
  ts_err err = {0};
  char *out;
  size_t n;
  unsigned char bad[sizeof py_gzip];
  memcpy(bad, py_gzip, sizeof bad);
  bad[12] ^= 0x55; /* corrupt the deflate data: the CRC-32 or the codes fail */
  assert_int_equal(zc_inflate(ZC_GZIP, bad, sizeof bad, 1024, &out, &n, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "gzip"));
  assert_null(out);
  /* truncated: the trailer is missing */
  assert_int_equal(zc_inflate(ZC_GZIP, py_gzip, sizeof py_gzip - 5, 1024, &out, &n, &err),
                   -TS_EINVAL);
  assert_non_null(strstr(err.msg, "truncated"));
  /* bytes after the end */
  unsigned char tail[sizeof py_zlib + 3];
  memcpy(tail, py_zlib, sizeof py_zlib);
  memcpy(tail + sizeof py_zlib, "xyz", 3);
  assert_int_equal(zc_inflate(ZC_DEFLATE, tail, sizeof tail, 1024, &out, &n, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "3 bytes after"));
  /* not compressed at all */
  assert_int_equal(zc_inflate(ZC_GZIP, "{\"inputs\": []}", 14, 1024, &out, &n, &err), -TS_EINVAL);
  /* empty */
  assert_int_equal(zc_inflate(ZC_GZIP, "", 0, 1024, &out, &n, &err), -TS_EINVAL);
}

/* A deflate stream of `total` zero bytes, made in 64 KiB steps so that the
 * test itself never holds the inflated bytes. */
static unsigned char *zero_bomb(zc_coding c, size_t total, size_t *zn) {
  z_stream z;
  memset(&z, 0, sizeof z);
  assert_int_equal(deflateInit2(&z, 9, Z_DEFLATED, c == ZC_GZIP ? 31 : 15, 9, Z_DEFAULT_STRATEGY),
                   Z_OK);
  static unsigned char zeros[65536];
  size_t cap = total / 500 + 4096, have = 0;
  unsigned char *out = malloc(cap);
  for (size_t done = 0; done < total; done += sizeof zeros) {
    z.next_in = zeros;
    z.avail_in = sizeof zeros;
    int last = done + sizeof zeros >= total;
    do {
      z.next_out = out + have;
      z.avail_out = (uInt)(cap - have);
      deflate(&z, last ? Z_FINISH : Z_NO_FLUSH);
      have = cap - z.avail_out;
    } while (z.avail_in);
  }
  deflateEnd(&z);
  *zn = have;
  return out;
}

static void test_bomb_and_cap(void **s) {
  (void)s;
  ts_err err = {0};
  char *out;
  size_t n, zn;
  /* 256 MiB of zeros is about 256 KiB of gzip: refused at a 1 MiB cap,
   * having made at most 1 MiB + 1 byte of it */
  unsigned char *bomb = zero_bomb(ZC_GZIP, (size_t)256 << 20, &zn);
  assert_true(zn < (size_t)1 << 20);
  assert_int_equal(zc_inflate(ZC_GZIP, bomb, zn, (size_t)1 << 20, &out, &n, &err), -TS_ETOOBIG);
  assert_null(out);
  assert_non_null(strstr(err.msg, "inflates to more than the limit of 1048576 bytes"));
  free(bomb);
  /* the cap is inclusive: exactly cap bytes inflate, one more does not */
  bomb = zero_bomb(ZC_DEFLATE, 65536 * 4, &zn);
  assert_int_equal(zc_inflate(ZC_DEFLATE, bomb, zn, 65536 * 4, &out, &n, &err), 0);
  assert_int_equal(n, 65536 * 4);
  tl_free(out);
  assert_int_equal(zc_inflate(ZC_DEFLATE, bomb, zn, 65536 * 4 - 1, &out, &n, &err), -TS_ETOOBIG);
  free(bomb);
  /* identity is held to the cap too */
  assert_int_equal(zc_inflate(ZC_IDENTITY, "abcd", 4, 3, &out, &n, &err), -TS_ETOOBIG);
  assert_int_equal(zc_inflate(ZC_IDENTITY, "abcd", 4, 4, &out, &n, &err), 0);
  assert_string_equal(out, "abcd");
  tl_free(out);
}

static void test_content_encoding(void **s) {
  (void)s;
  ts_err err = {0};
  zc_coding c;
  struct {
    const char *v;
    int rc;
    zc_coding want;
  } cases[] = {{NULL, 0, ZC_IDENTITY},
               {"", 0, ZC_IDENTITY},
               {"gzip", 0, ZC_GZIP},
               {"x-gzip", 0, ZC_GZIP},
               {"GZip", 0, ZC_GZIP},
               {" deflate\t", 0, ZC_DEFLATE},
               {"identity", 0, ZC_IDENTITY},
               {"br", -TS_EMEDIA, ZC_IDENTITY},
               {"gzip, deflate", -TS_EMEDIA, ZC_IDENTITY},
               {"compress", -TS_EMEDIA, ZC_IDENTITY}};
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    assert_int_equal(zc_parse_content_encoding(cases[i].v, &c, &err), cases[i].rc);
    if (!cases[i].rc) assert_int_equal(c, cases[i].want);
  }
  zc_parse_content_encoding("br", &c, &err);
  assert_non_null(strstr(err.msg, "'br' is not supported"));
  assert_string_equal(zc_name(ZC_GZIP), "gzip");
  assert_string_equal(zc_name(ZC_DEFLATE), "deflate");
  assert_string_equal(zc_name(ZC_IDENTITY), "identity");
}

static void test_accept_encoding(void **s) {
  (void)s;
  struct {
    const char *v;
    zc_coding want;
  } cases[] = {
      {NULL, ZC_IDENTITY},
      {"", ZC_IDENTITY},
      {"gzip", ZC_GZIP},
      {"deflate", ZC_DEFLATE},
      {"deflate, gzip", ZC_GZIP},          /* a tie: gzip */
      {"gzip;q=0.5, deflate", ZC_DEFLATE}, /* q decides */
      {"gzip; q=0.9 , deflate;q=0.8", ZC_GZIP},
      {"gzip;q=0", ZC_IDENTITY},                            /* refused */
      {"gzip;q=0, deflate;q=0, identity;q=0", ZC_IDENTITY}, /* nothing else: identity */
      {"*", ZC_GZIP},
      {"*;q=0, deflate", ZC_DEFLATE},
      {"deflate;q=0.2, *;q=0.5", ZC_GZIP}, /* "*" covers gzip only */
      {"br", ZC_IDENTITY},
      {"br, identity", ZC_IDENTITY},
      {"x-gzip;q=0.8, deflate;q=0.9", ZC_DEFLATE},
      {"gzip;q=abc, deflate;q=0.1", ZC_DEFLATE}, /* an unreadable q: that element ignored */
      {"gzip;q=2", ZC_IDENTITY},
      {"GZIP;Q=1", ZC_GZIP},
      {",,gzip,,", ZC_GZIP},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    zc_coding got = zc_choose(cases[i].v);
    if (got != cases[i].want)
      fail_msg("Accept-Encoding '%s': chose %s, want %s", cases[i].v ? cases[i].v : "(none)",
               zc_name(got), zc_name(cases[i].want));
  }
}

static void test_alloc_failures(void **s) {
  (void)s;
  ts_err err = {0};
  char *out;
  size_t n;
  char in[1000];
  text_of(sizeof in, in);
  char *z;
  size_t zn;
  assert_int_equal(zc_compress(ZC_GZIP, in, sizeof in, 0, &z, &zn, &err), 0);
  for (long k = 0; k < 6; k++) {
    tl_mem_fail_after(k);
    int rc = zc_inflate(ZC_GZIP, z, zn, 64, &out, &n, &err); /* grows: several allocations */
    tl_mem_fail_reset();
    assert_true(rc == -TS_ENOMEM || rc == -TS_ETOOBIG);
    assert_null(out);
  }
  tl_mem_fail_after(0);
  assert_int_equal(zc_inflate(ZC_GZIP, z, zn, 4096, &out, &n, &err), -TS_ENOMEM);
  assert_int_equal(zc_compress(ZC_DEFLATE, in, sizeof in, 0, &out, &n, &err), -TS_ENOMEM);
  tl_mem_fail_reset();
  tl_free(z);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_round_trips),      cmocka_unit_test(test_foreign_streams),
      cmocka_unit_test(test_bad_streams),      cmocka_unit_test(test_bomb_and_cap),
      cmocka_unit_test(test_content_encoding), cmocka_unit_test(test_accept_encoding),
      cmocka_unit_test(test_alloc_failures)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
