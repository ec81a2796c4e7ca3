#!/usr/bin/env bash
# wait-ready.sh - waits until tallyd answers 200 on /v2/health/ready (or, with
# --model NAME, until that model is ready), polling until a timeout. For
# deploy scripts: start the daemon, then `wait-ready.sh --timeout 60 && ...`.
#
#   wait-ready.sh [--timeout SECONDS] [--interval SECONDS] [--model NAME]
#
# Honours TALLY_URL (default http://127.0.0.1:8000) and TALLY_API_KEY.
# Exit: 0 ready; 1 usage; 2 never reachable; 3 4xx (unknown model); 4 reachable
# but still not ready (503) when the time ran out.
set -u
url=${TALLY_URL:-http://127.0.0.1:8000}
url=${url%/}
timeout=30 interval=0.2 model=""
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout=${2:?}; shift 2 ;;
    --interval) interval=${2:?}; shift 2 ;;
    --model) model=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "wait-ready.sh: unknown argument '$1'" >&2; exit 1 ;;
  esac
done
case $timeout in ''|*[!0-9.]*) echo "wait-ready.sh: --timeout wants seconds" >&2; exit 1 ;; esac
path=/v2/health/ready
[ -n "$model" ] && path="/v2/models/$model/ready"
# The key goes in a header read from a pipe, so it never shows in `ps`.
tally_curl() {
  if [ -n "${TALLY_API_KEY:-}" ]; then
    curl -H @<(printf 'Authorization: Bearer %s\n' "$TALLY_API_KEY") "$@"
  else
    curl "$@"
  fi
}
deadline=$(awk -v t="$timeout" 'BEGIN { srand(); print srand() + t }')
code=000
while :; do
  code=$(tally_curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url$path") || true
  [ "$code" = 200 ] && { echo "ready: $url$path"; exit 0; }
  case $code in 4??) echo "wait-ready.sh: HTTP $code on $url$path" >&2; exit 3 ;; esac
  now=$(awk 'BEGIN { srand(); print srand() }')
  [ "$now" -ge "${deadline%.*}" ] && break
  sleep "$interval"
done
if [ "$code" = 000 ]; then
  echo "wait-ready.sh: $url not reachable after ${timeout}s" >&2
  exit 2
fi
echo "wait-ready.sh: $url$path still answers HTTP $code after ${timeout}s" >&2
exit 4
