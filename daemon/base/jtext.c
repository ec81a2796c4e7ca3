/* jtext.c - JSON text with shortest round-trip doubles (see jtext.h). */
#include "jtext.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

void jtext_double(sbuf *b, double v) {
  if (!isfinite(v)) {
    sbuf_add(b, "null", 4);
    return;
  }
  char t[40];
  int n = 0;
  for (int p = 15; p <= 17; p++) {
    n = snprintf(t, sizeof t, "%.*g", p, v);
    if (strtod(t, NULL) == v) break;
  }
  /* a real stays a real when read back: 3 -> 3.0, 1e+20 is already one */
  if (!strpbrk(t, ".eEn") && n + 2 < (int)sizeof t) {
    t[n++] = '.';
    t[n++] = '0';
    t[n] = 0;
  }
  sbuf_add(b, t, (size_t)n);
}

static int cmp_keys(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void newline(sbuf *b, int flags, int depth) {
  if (!(flags & JT_INDENT)) return;
  sbuf_add(b, "\n", 1);
  for (int i = 0; i < depth; i++) sbuf_add(b, "  ", 2);
}

static void add(sbuf *b, const json_t *j, int flags, int depth) {
  switch (json_typeof(j)) {
    case JSON_OBJECT: {
      size_t n = json_object_size(j);
      if (n == 0) {
        sbuf_add(b, "{}", 2);
        return;
      }
      const char **keys = tl_malloc(n * sizeof *keys);
      if (!keys) {
        b->failed = 1;
        return;
      }
      size_t k = 0;
      const char *key;
      json_t *v;
      json_object_foreach((json_t *)j, key, v) keys[k++] = key;
      if (flags & JT_SORT_KEYS) qsort(keys, k, sizeof *keys, cmp_keys);
      sbuf_add(b, "{", 1);
      for (size_t i = 0; i < k; i++) {
        if (i) sbuf_add(b, ",", 1);
        newline(b, flags, depth + 1);
        sbuf_json_str(b, keys[i]);
        sbuf_adds(b, flags & JT_INDENT ? ": " : ":");
        add(b, json_object_get(j, keys[i]), flags, depth + 1);
      }
      tl_free(keys);
      newline(b, flags, depth);
      sbuf_add(b, "}", 1);
      return;
    }
    case JSON_ARRAY: {
      size_t n = json_array_size(j);
      sbuf_add(b, "[", 1);
      for (size_t i = 0; i < n; i++) {
        if (i) sbuf_adds(b, flags & JT_INDENT ? ", " : ",");
        add(b, json_array_get(j, i), flags, depth + 1);
      }
      sbuf_add(b, "]", 1);
      return;
    }
    case JSON_STRING: sbuf_json_str(b, json_string_value(j)); return;
    case JSON_INTEGER: sbuf_printf(b, "%" JSON_INTEGER_FORMAT, json_integer_value(j)); return;
    case JSON_REAL: jtext_double(b, json_real_value(j)); return;
    case JSON_TRUE: sbuf_add(b, "true", 4); return;
    case JSON_FALSE: sbuf_add(b, "false", 5); return;
    case JSON_NULL: sbuf_add(b, "null", 4); return;
  }
}

void jtext_add(sbuf *b, const json_t *j, int flags) {
  if (!j) {
    b->failed = 1;
    return;
  }
  add(b, j, flags, 0);
}

char *jtext_dumps(const json_t *j, int flags, size_t *len) {
  sbuf b;
  sbuf_init(&b);
  jtext_add(&b, j, flags);
  if (flags & JT_INDENT) sbuf_add(&b, "\n", 1);
  if (sbuf_failed(&b)) {
    sbuf_free(&b);
    return NULL;
  }
  return sbuf_take(&b, len);
}
