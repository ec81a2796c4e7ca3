/* sample.c - the token sampler of text generation (see sample.h for the
 * order of a step and the determinism rule).
 *
 * A step costs O(V) for the copy, the penalties touch only the ids seen so
 * far, and a filtered draw sorts only the candidates within SMP_CUTOFF of
 * the largest logit (after top-k's selection when top-k is set), so a
 * sharp distribution over a 50k vocabulary sorts a handful of ids. */
#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/rng.h"

smp_params smp_defaults(void) {
  smp_params p = {.temperature = 1.0,
                  .top_p = 1.0,
                  .top_k = 0,
                  .min_p = 0.0,
                  .repetition_penalty = 1.0,
                  .presence_penalty = 0.0,
                  .frequency_penalty = 0.0};
  return p;
}

int smp_check(const smp_params *p, ts_err *err) {
  if (!(p->temperature >= 0) || !isfinite(p->temperature))
    return ts_errf(err, TS_EINVAL, "temperature must be a finite number >= 0, got %g",
                   p->temperature);
  if (!(p->top_p > 0 && p->top_p <= 1))
    return ts_errf(err, TS_EINVAL, "top_p must be in (0, 1], got %g", p->top_p);
  if (p->top_k < 0)
    return ts_errf(err, TS_EINVAL, "top_k must be >= 0 (0: off), got %lld", (long long)p->top_k);
  if (!(p->min_p >= 0 && p->min_p <= 1))
    return ts_errf(err, TS_EINVAL, "min_p must be in [0, 1], got %g", p->min_p);
  if (!(p->repetition_penalty > 0) || !isfinite(p->repetition_penalty))
    return ts_errf(err, TS_EINVAL, "repetition_penalty must be a finite number > 0, got %g",
                   p->repetition_penalty);
  if (!isfinite(p->presence_penalty) || fabs(p->presence_penalty) > 2)
    return ts_errf(err, TS_EINVAL, "presence_penalty must be in [-2, 2], got %g",
                   p->presence_penalty);
  if (!isfinite(p->frequency_penalty) || fabs(p->frequency_penalty) > 2)
    return ts_errf(err, TS_EINVAL, "frequency_penalty must be in [-2, 2], got %g",
                   p->frequency_penalty);
  return 0;
}

int smp_init(smp_state *s, int64_t V, uint64_t seed, ts_err *err) {
  memset(s, 0, sizeof *s);
  if (V < 1 || V > INT32_MAX)
    return ts_errf(err, TS_EINVAL, "sampler: vocabulary size %lld out of range", (long long)V);
  s->V = V;
  s->rng = seed;
  s->gen_count = tl_calloc((size_t)V, sizeof *s->gen_count);
  s->seen = tl_calloc((size_t)V, 1);
  s->seen_ids = tl_calloc((size_t)V, sizeof *s->seen_ids);
  s->gen_ids = tl_calloc((size_t)V, sizeof *s->gen_ids);
  s->work = tl_calloc((size_t)V, sizeof *s->work);
  s->cand = tl_calloc((size_t)V, sizeof *s->cand);
  if (!s->gen_count || !s->seen || !s->seen_ids || !s->gen_ids || !s->work || !s->cand) {
    smp_free(s);
    return ts_errf(err, TS_ENOMEM, "sampler: out of memory for a vocabulary of %lld", (long long)V);
  }
  return 0;
}

void smp_free(smp_state *s) {
  tl_free(s->gen_count);
  tl_free(s->seen);
  tl_free(s->seen_ids);
  tl_free(s->gen_ids);
  tl_free(s->work);
  tl_free(s->cand);
  memset(s, 0, sizeof *s);
}

static void mark_seen(smp_state *s, int32_t id) {
  if (!s->seen[id]) {
    s->seen[id] = 1;
    s->seen_ids[s->n_seen++] = id;
  }
}

void smp_observe_prompt(smp_state *s, const int32_t *ids, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (ids[i] >= 0 && ids[i] < s->V) mark_seen(s, ids[i]);
}

void smp_observe(smp_state *s, int32_t id) {
  if (id < 0 || id >= s->V) return;
  mark_seen(s, id);
  if (s->gen_count[id]++ == 0) s->gen_ids[s->n_gen++] = id;
}

/* Descending by value, then ascending by id: the one order every filter and
 * the draw use. */
static _Thread_local const float *tl_vals;
static int by_value_then_id(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  float vx = tl_vals[x], vy = tl_vals[y];
  if (vx > vy) return -1;
  if (vx < vy) return 1;
  return (x > y) - (x < y);
}

static int32_t argmax_lowest(const float *x, int64_t V) {
  int32_t best = 0;
  for (int64_t i = 1; i < V; i++)
    if (x[i] > x[best]) best = (int32_t)i;
  return best;
}

/* The k best of ids[0..n) by (value desc, id asc), moved to the front in
 * that order; returns min(k, n). A quickselect on the same order, then a
 * sort of the k. */
static int64_t select_top(int32_t *ids, int64_t n, int64_t k, const float *vals) {
  if (k >= n) k = n;
  tl_vals = vals;
  if (k < n) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      int32_t pivot = ids[lo + (hi - lo) / 2];
      int64_t i = lo, j = hi;
      while (i <= j) {
        while (by_value_then_id(&ids[i], &pivot) < 0) i++;
        while (by_value_then_id(&ids[j], &pivot) > 0) j--;
        if (i <= j) {
          int32_t t = ids[i];
          ids[i] = ids[j];
          ids[j] = t;
          i++;
          j--;
        }
      }
      if (k - 1 <= j)
        hi = j;
      else if (k - 1 >= i)
        lo = i;
      else
        break;
    }
  }
  qsort(ids, (size_t)k, sizeof *ids, by_value_then_id);
  return k;
}

int64_t smp_top_ids(const float *x, int64_t V, int64_t k, int32_t *ids) {
  if (k <= 0 || V <= 0) return 0;
  int32_t *all = tl_malloc((size_t)V * sizeof *all);
  if (!all) { /* fall back to k passes; k is small (<= 20 for logprobs) */
    int64_t got = 0;
    for (; got < k && got < V; got++) {
      int32_t best = -1;
      for (int64_t i = 0; i < V; i++) {
        int taken = 0;
        for (int64_t g = 0; g < got; g++) taken |= ids[g] == i;
        if (!taken && (best < 0 || x[i] > x[best])) best = (int32_t)i;
      }
      ids[got] = best;
    }
    return got;
  }
  for (int64_t i = 0; i < V; i++) all[i] = (int32_t)i;
  int64_t got = select_top(all, V, k, x);
  memcpy(ids, all, (size_t)got * sizeof *ids);
  tl_free(all);
  return got;
}

double smp_log_softmax(const float *logits, int64_t V, float *lp) {
  float m = logits[0];
  for (int64_t i = 1; i < V; i++)
    if (logits[i] > m) m = logits[i];
  double z = 0;
  for (int64_t i = 0; i < V; i++) z += exp((double)logits[i] - m);
  double lz = m + log(z);
  if (lp)
    for (int64_t i = 0; i < V; i++) lp[i] = (float)((double)logits[i] - lz);
  return lz;
}

static void apply_penalties(smp_state *s, const smp_params *p, float *w) {
  double rp = p->repetition_penalty;
  if (rp != 1.0)
    for (int64_t i = 0; i < s->n_seen; i++) {
      int32_t id = s->seen_ids[i];
      w[id] = w[id] > 0 ? (float)(w[id] / rp) : (float)(w[id] * rp);
    }
  if (p->presence_penalty != 0 || p->frequency_penalty != 0)
    for (int64_t i = 0; i < s->n_gen; i++) {
      int32_t id = s->gen_ids[i];
      w[id] -= (float)(p->presence_penalty + p->frequency_penalty * s->gen_count[id]);
    }
}

int32_t smp_next(smp_state *s, const smp_params *p, const float *logits) {
  const int64_t V = s->V;
  float *w = s->work;
  memcpy(w, logits, (size_t)V * sizeof *w);
  apply_penalties(s, p, w);
  if (p->temperature == 0) return argmax_lowest(w, V);

  const float inv_t = (float)(1.0 / p->temperature);
  float m = -INFINITY;
  for (int64_t i = 0; i < V; i++) {
    w[i] *= inv_t;
    if (w[i] > m) m = w[i];
  }
  double z = 0; /* the normaliser over the whole vocabulary */
  for (int64_t i = 0; i < V; i++) z += exp((double)w[i] - m);
  const double u = rng_unif01(&s->rng);

  if (p->top_k == 0 && p->top_p >= 1.0 && p->min_p <= 0) {
    /* Unfiltered: walk ids in order; exact, no sort. */
    double target = u * z, acc = 0;
    int32_t last = 0;
    for (int64_t i = 0; i < V; i++) {
      double e = exp((double)w[i] - m);
      if (e <= 0) continue;
      acc += e;
      last = (int32_t)i;
      if (acc > target) return (int32_t)i;
    }
    return last;
  }

  int64_t n = 0;
  const float floor_v = m - SMP_CUTOFF;
  for (int64_t i = 0; i < V; i++)
    if (w[i] >= floor_v) s->cand[n++] = (int32_t)i;
  int64_t k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
  k = select_top(s->cand, n, k, w);

  /* top-p: the smallest prefix whose probability reaches top_p. */
  int64_t keep = k;
  if (p->top_p < 1.0) {
    double acc = 0;
    for (int64_t i = 0; i < k; i++) {
      acc += exp((double)w[s->cand[i]] - m) / z;
      if (acc >= p->top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  /* min-p: drop p < min_p * p_max; the first candidate is the most likely. */
  if (p->min_p > 0) {
    double pmax = exp((double)w[s->cand[0]] - m) / z, thr = p->min_p * pmax;
    int64_t i = 1;
    while (i < keep && exp((double)w[s->cand[i]] - m) / z >= thr) i++;
    keep = i;
  }
  double total = 0;
  for (int64_t i = 0; i < keep; i++) total += exp((double)w[s->cand[i]] - m);
  double target = u * total, acc = 0;
  for (int64_t i = 0; i < keep; i++) {
    acc += exp((double)w[s->cand[i]] - m);
    if (acc > target) return s->cand[i];
  }
  return s->cand[keep - 1];
}

int64_t smp_stop_find(const smp_stops *st, const char *text, size_t len) {
  int64_t best = -1;
  for (int i = 0; i < st->n; i++) {
    size_t L = st->len[i];
    if (L == 0 || L > len) continue;
    for (size_t at = 0; at + L <= len; at++) {
      if (best >= 0 && (int64_t)at >= best) break;
      if (memcmp(text + at, st->s[i], L) == 0) {
        best = (int64_t)at;
        break;
      }
    }
  }
  return best;
}

size_t smp_stop_safe(const smp_stops *st, const char *text, size_t len) {
  size_t hold = 0; /* the longest suffix of text that is a proper prefix of a stop */
  for (int i = 0; i < st->n; i++) {
    size_t L = st->len[i];
    for (size_t k = L > 1 ? L - 1 : 0; k > hold; k--) {
      if (k > len) continue;
      if (memcmp(text + len - k, st->s[i], k) == 0) {
        hold = k;
        break;
      }
    }
  }
  return len - hold;
}
