#!/usr/bin/env bash
# metrics-grep.sh - fetches tallyd's Prometheus metrics (/metrics) and prints
# the lines matching an extended regular expression (comments excluded unless
# --all), e.g. `metrics-grep.sh 'tallyd_requests_total.*infer'`.
#
#   metrics-grep.sh [--all] PATTERN
#
# Honours TALLY_URL and TALLY_API_KEY.
# Exit: 0 lines matched; 1 usage; 2 no connection; 3 HTTP 4xx; 4 HTTP 5xx;
# 5 the metrics came back but no line matched.
set -u
url=${TALLY_URL:-http://127.0.0.1:8000}
url=${url%/}
all=0
[ "${1:-}" = "--all" ] && { all=1; shift; }
case ${1:-} in -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
if [ $# -ne 1 ]; then
  echo "usage: metrics-grep.sh [--all] PATTERN" >&2
  exit 1
fi
# The key goes in a header read from a pipe, so it never shows in `ps`.
tally_curl() {
  if [ -n "${TALLY_API_KEY:-}" ]; then
    curl -H @<(printf 'Authorization: Bearer %s\n' "$TALLY_API_KEY") "$@"
  else
    curl "$@"
  fi
}
body=$(mktemp)
trap 'rm -f "$body"' EXIT
code=$(tally_curl -sS -o "$body" -w '%{http_code}' "$url/metrics")
rc=$?
[ $rc -ne 0 ] && { echo "metrics-grep.sh: no answer from $url (curl exit $rc)" >&2; exit 2; }
case $code in
  200) ;;
  4??) echo "metrics-grep.sh: HTTP $code: $(head -c 300 "$body")" >&2; exit 3 ;;
  *) echo "metrics-grep.sh: HTTP $code: $(head -c 300 "$body")" >&2; exit 4 ;;
esac
if [ $all = 1 ]; then
  grep -E -- "$1" "$body" || exit 5
else
  grep -v '^#' "$body" | grep -E -- "$1" || exit 5
fi
