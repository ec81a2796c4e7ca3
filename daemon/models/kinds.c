/* kinds.c - the registry of model kinds. A new kind adds one line here. */
#include <string.h>

#include <jansson.h>

#include "model.h"

extern const md_kind md_kind_mlp;
extern const md_kind md_kind_ensemble;
extern const md_kind md_kind_quantile_ensemble;
extern const md_kind md_kind_attention;
extern const md_kind md_kind_transformer;

static const md_kind *const kinds[] = {
    &md_kind_mlp,       &md_kind_ensemble,    &md_kind_quantile_ensemble,
    &md_kind_attention, &md_kind_transformer,
};

const md_kind *md_kind_find(const char *name) {
  if (!name) return NULL;
  for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++)
    if (strcmp(kinds[i]->name, name) == 0) return kinds[i];
  return NULL;
}

const md_kind *md_kind_of_config(const json_t *config, const char **what) {
  const char *kind = json_string_value(json_object_get(config, "kind"));
  if (kind || json_object_get(config, "kind")) {
    *what = kind ? kind : "(not a string)";
    return md_kind_find(kind);
  }
  const char *mt = json_string_value(json_object_get(config, "model_type"));
  *what = "(missing)";
  if (!mt) return NULL;
  *what = mt;
  return strcmp(mt, "gpt2") == 0 ? &md_kind_transformer : NULL;
}

const char *md_kind_names(void) {
  static char buf[256];
  if (!buf[0]) {
    size_t o = 0;
    for (size_t i = 0; i < sizeof kinds / sizeof *kinds && o < sizeof buf; i++) {
      size_t n = strlen(kinds[i]->name);
      if (o + n + 2 >= sizeof buf) break;
      if (i) buf[o++] = ',';
      memcpy(buf + o, kinds[i]->name, n);
      o += n;
      buf[o] = 0;
    }
  }
  return buf;
}
