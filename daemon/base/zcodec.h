/* zcodec.h - HTTP content codings (gzip, deflate) through zlib.
 *
 * The transport reads Content-Encoding and Accept-Encoding with the parsers
 * here; a worker inflates request bodies and compresses answers with the
 * codecs (the loop thread never runs them: they are compute).
 *
 * "deflate" is the zlib format (RFC 1950), as RFC 9110 8.4.1.2 defines it and
 * as tritonclient and curl send it; a raw deflate stream (RFC 1951, what some
 * old clients sent under that name) is also read. "gzip" may hold several
 * members one after another (RFC 1952 2.2), as `cat a.gz b.gz` makes.
 *
 * Ownership: every buffer returned is tl_malloc'ed and the caller's. */
#ifndef TALLYD_ZCODEC_H
#define TALLYD_ZCODEC_H

#include <stddef.h>

#include "err.h"

typedef enum zc_coding { ZC_IDENTITY = 0, ZC_GZIP, ZC_DEFLATE } zc_coding;

/* Answers below this size are sent as they are: a gzip header and trailer
 * (18 bytes) and the first block cost more than they save. */
#define ZC_MIN_BYTES 256

/* "gzip", "deflate" or "identity". */
const char *zc_name(zc_coding c);

/* A request's Content-Encoding value (NULL or empty: identity). gzip,
 * x-gzip, deflate and identity are known, case-insensitively; a list of
 * codings ("gzip, gzip") or anything else is -TS_EMEDIA naming it. */
int zc_parse_content_encoding(const char *value, zc_coding *out, ts_err *err);

/* The coding to answer with, from an Accept-Encoding value (RFC 9110
 * 12.5.3): the one of gzip and deflate with the highest q above 0 ("*"
 * stands for those not named; x-gzip is gzip), gzip first on a tie; identity
 * when neither is acceptable, when the value is NULL, empty or unreadable,
 * and also when identity is refused ("identity;q=0") but nothing else is
 * acceptable: an uncompressed answer beats none. */
zc_coding zc_choose(const char *accept);

/* Inflates in[0..n) coded as c into *out (NUL-terminated, *out_len bytes
 * before the NUL). The output is held to cap bytes: once it would pass cap,
 * inflating stops there and the answer is -TS_ETOOBIG (a small body that
 * inflates to gigabytes costs at most cap bytes and the time to make them).
 * A stream that is corrupt, truncated, or followed by bytes that are not
 * another gzip member is -TS_EINVAL; -TS_ENOMEM when memory runs out.
 * ZC_IDENTITY copies. */
int zc_inflate(zc_coding c, const void *in, size_t n, size_t cap, char **out, size_t *out_len,
               ts_err *err);

/* Compresses in[0..n) as c (gzip or deflate; level 1-9, 0 for zlib's
 * default) into *out. -TS_EINVAL for ZC_IDENTITY, -TS_ENOMEM. */
int zc_compress(zc_coding c, const void *in, size_t n, int level, char **out, size_t *out_len,
                ts_err *err);

#endif
