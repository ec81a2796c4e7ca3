/* live.h - the live scores of served versions (rolling coverage, pinball
 * and WIS of quantile models, their adaptive conformal levels), fed by
 * md_kind.observe, as Prometheus gauges for /metrics (quantile_live.c;
 * the names are listed in docs/operations.md). */
#ifndef TALLYD_LIVE_H
#define TALLYD_LIVE_H

#include "../base/sbuf.h"

/* Appends every family with its HELP and TYPE lines, one series per loaded
 * version that has observed rows (label values: model, version, interval). */
void md_live_metrics(sbuf *b);

#endif
