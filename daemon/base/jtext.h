/* jtext.h - JSON text of a jansson value with doubles written as the
 * shortest text that reads back to the same double (0.845, never jansson's
 * %.17g 0.84499999999999997).
 *
 * Every answer body and every version.json the daemon writes goes through
 * here, so a number printed by tallyd is the number it computed, in the
 * fewest digits. Integral doubles keep a ".0" (3.0, not 3) so that a value
 * written as a real reads back as a real. */
#ifndef TALLYD_JTEXT_H
#define TALLYD_JTEXT_H

#include <jansson.h>
#include <stddef.h>

#include "sbuf.h"

enum {
  JT_COMPACT = 0,
  JT_INDENT = 1, /* two spaces a level, one member a line */
  JT_SORT_KEYS = 2,
};

/* Appends the text of j to b (allocation failure is sticky in b). */
void jtext_add(sbuf *b, const json_t *j, int flags);
/* The text of j, NUL-terminated, owned by the caller (tl_free); NULL when
 * out of memory. *len (optional) is its length. */
char *jtext_dumps(const json_t *j, int flags, size_t *len);
/* Appends the shortest round-trip text of a double: %.15g, %.16g or %.17g,
 * the first that strtod reads back exactly; NaN and Inf as null. */
void jtext_double(sbuf *b, double v);

#endif
