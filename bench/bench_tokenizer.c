/* bench_tokenizer.c - GPT-2 BPE encoding speed (MB/s) on a few MB of mixed
 * text, beside the byte tokenizer and a plain copy of the same bytes in the
 * same run (the floor any encoder pays to read its input and write ids).
 *
 *   build/bench/bench_tokenizer [TEXT_FILE] [--mb N]
 *
 * Text: the given file, else CPython's standard library sources
 * (/usr/lib/python3.X, every .py file) with accented, CJK and emoji lines mixed in,
 * cut to N MB (default 4). Vocabulary: tests/data/gpt2 (GPT-2's files). */
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../daemon/base/mem.h"
#include "../daemon/base/sbuf.h"
#include "../daemon/text/tokenizer.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void add_file(sbuf *b, const char *path, size_t cap) {
  FILE *f = fopen(path, "rb");
  if (!f) return;
  char buf[65536];
  size_t n;
  while (b->len < cap && (n = fread(buf, 1, sizeof buf, f)) > 0) sbuf_add(b, buf, n);
  fclose(f);
}

int main(int argc, char **argv) {
  const char *file = NULL;
  double mb = 4;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--mb") && i + 1 < argc)
      mb = atof(argv[++i]);
    else
      file = argv[i];
  }
  size_t cap = (size_t)(mb * 1e6);
  sbuf text;
  sbuf_init(&text);
  if (file) {
    add_file(&text, file, cap);
  } else {
    static const char *mix =
        "Caf\xc3\xa9 na\xc3\xafve \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e "
        "\xec\x95\x88\xeb\x85\x95 \xf0\x9f\x98\x80\xf0\x9f\x91\x8d \xe2\x88\x91\n";
    glob_t g;
    if (glob("/usr/lib/python3.*/*.py", 0, NULL, &g) == 0) {
      for (size_t i = 0; i < g.gl_pathc && text.len < cap; i++) {
        add_file(&text, g.gl_pathv[i], cap);
        sbuf_adds(&text, mix);
      }
      globfree(&g);
    }
  }
  if (text.len > cap) text.len = cap;
  if (text.len == 0) {
    fprintf(stderr, "bench_tokenizer: no text\n");
    return 1;
  }
  const char *root = getenv("TALLYD_SRC") ? getenv("TALLYD_SRC") : ".";
  char enc[4096], bpe[4096];
  snprintf(enc, sizeof enc, "%s/tests/data/gpt2/encoder.json", root);
  snprintf(bpe, sizeof bpe, "%s/tests/data/gpt2/vocab.bpe", root);
  tk_tokenizer *t, *bytes = tk_bytes(-1);
  ts_err e;
  double t0 = now();
  if (tk_load_bpe(enc, bpe, &t, &e)) {
    fprintf(stderr, "bench_tokenizer: %s (run from the source tree or set TALLYD_SRC)\n", e.msg);
    return 1;
  }
  double load = now() - t0;
  printf("text: %.2f MB; GPT-2 vocabulary loaded in %.0f ms\n", (double)text.len / 1e6, load * 1e3);
  printf("%-24s %10s %12s %10s\n", "encoder", "MB/s", "ids", "bytes/id");
  for (int round = 0; round < 3; round++) {
    /* the floor: read every byte, write one int64 per byte */
    int64_t *cp = tl_malloc(text.len * sizeof *cp);
    t0 = now();
    for (size_t i = 0; i < text.len; i++) cp[i] = (unsigned char)text.data[i];
    double tc = now() - t0;
    tl_free(cp);
    int64_t *ids;
    size_t n;
    t0 = now();
    tk_encode(bytes, text.data, text.len, 1, &ids, &n, &e);
    double tb = now() - t0;
    tl_free(ids);
    t0 = now();
    if (tk_encode(t, text.data, text.len, 1, &ids, &n, &e)) {
      fprintf(stderr, "encode: %s\n", e.msg);
      return 1;
    }
    double tg = now() - t0;
    /* decoding back (the streamed direction) */
    sbuf out;
    sbuf_init(&out);
    t0 = now();
    tk_decode(t, ids, n, &out, &e);
    double td = now() - t0;
    int same = out.len == text.len && memcmp(out.data, text.data, text.len) == 0;
    sbuf_free(&out);
    printf("round %d\n", round + 1);
    printf("  %-22s %10.1f %12zu %10.2f\n", "copy (floor)", (double)text.len / 1e6 / tc, text.len,
           1.0);
    printf("  %-22s %10.1f %12zu %10.2f\n", "bytes tokenizer", (double)text.len / 1e6 / tb,
           text.len, 1.0);
    printf("  %-22s %10.1f %12zu %10.2f\n", "GPT-2 BPE encode", (double)text.len / 1e6 / tg, n,
           (double)text.len / (double)n);
    printf("  %-22s %10.1f %12s %10s  round trip %s\n", "GPT-2 BPE decode",
           (double)text.len / 1e6 / td, "", "", same ? "exact" : "DIFFERS");
    tl_free(ids);
  }
  tk_free(t);
  tk_free(bytes);
  sbuf_free(&text);
  return 0;
}
