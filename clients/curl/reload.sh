#!/usr/bin/env bash
# reload.sh - makes tallyd rescan its model repository (SIGHUP), then waits
# until it is ready again (and, with --model NAME, until that model is ready).
# Through systemd when the unit is active (`systemctl reload`, which the unit
# maps to SIGHUP), else by signalling the process found with pidof, or --pid.
#
#   reload.sh [--pid PID | --unit UNIT] [--model NAME] [--timeout SECONDS]
#
# Honours TALLY_URL and TALLY_API_KEY (for the readiness checks).
# Exit: 0 reloaded and ready; 1 usage or no daemon to signal; otherwise
# wait-ready.sh's codes (2 unreachable, 3 unknown model, 4 not ready in time).
set -u
here=$(cd "$(dirname "$0")" && pwd)
pid="" unit="" model="" timeout=30
while [ $# -gt 0 ]; do
  case $1 in
    --pid) pid=${2:?}; shift 2 ;;
    --unit) unit=${2:?}; shift 2 ;;
    --model) model=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "reload.sh: unknown argument '$1'" >&2; exit 1 ;;
  esac
done
if [ -z "$pid" ] && [ -z "$unit" ] && command -v systemctl >/dev/null 2>&1 &&
   systemctl is-active --quiet tallyd 2>/dev/null; then
  unit=tallyd
fi
if [ -n "$unit" ]; then
  systemctl reload "$unit" || { echo "reload.sh: systemctl reload $unit failed" >&2; exit 1; }
else
  if [ -z "$pid" ]; then
    pids=$(pidof tallyd 2>/dev/null || true)
    set -- $pids
    if [ $# -ne 1 ]; then
      echo "reload.sh: expected one tallyd process, found ${#}: use --pid PID" >&2
      exit 1
    fi
    pid=$1
  fi
  kill -HUP "$pid" 2>/dev/null || { echo "reload.sh: cannot signal process $pid" >&2; exit 1; }
fi
args=(--timeout "$timeout")
[ -n "$model" ] && args+=(--model "$model")
exec bash "$here/wait-ready.sh" "${args[@]}"
