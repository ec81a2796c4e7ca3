#!/usr/bin/env bash
# fit-from-file.sh - POSTs a JSON file (the OIP request form with the labels:
# {"inputs": [...features..., labels or targets], "parameters": {...}}) to
# /v2/models/MODEL/fit and prints the answer (the new version and its metrics).
# With --calibrate it posts to /calibrate, with --evaluate to /evaluate instead.
#
#   fit-from-file.sh [--calibrate | --evaluate] MODEL FILE.json
#
# Honours TALLY_URL and TALLY_API_KEY (fit and calibrate need an admin key).
# Exit: 0 ok; 1 usage; 2 no connection; 3 HTTP 4xx; 4 HTTP 5xx.
set -u
url=${TALLY_URL:-http://127.0.0.1:8000}
url=${url%/}
verb=fit
case ${1:-} in
  --calibrate) verb=calibrate; shift ;;
  --evaluate) verb=evaluate; shift ;;
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
if [ $# -ne 2 ]; then
  echo "usage: fit-from-file.sh [--calibrate | --evaluate] MODEL FILE.json" >&2
  exit 1
fi
model=$1 file=$2
[ -r "$file" ] || { echo "fit-from-file.sh: cannot read $file" >&2; exit 1; }
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
code=$(tally_curl -sS -o "$body" -w '%{http_code}' -X POST -H 'Content-Type: application/json' -H 'Expect:' \
  --data-binary @"$file" "$url/v2/models/$model/$verb")
rc=$?
if [ $rc -ne 0 ]; then
  echo "fit-from-file.sh: no answer from $url (curl exit $rc)" >&2
  exit 2
fi
case $code in
  2??) cat "$body"; echo; exit 0 ;;
  4??) echo "fit-from-file.sh: HTTP $code: $(cat "$body")" >&2; exit 3 ;;
  *) echo "fit-from-file.sh: HTTP $code: $(cat "$body")" >&2; exit 4 ;;
esac
