#!/usr/bin/env bash
# make memcheck: integration tests against tallyd running under valgrind.
#
# The harness runs tallyd under $TALLYD_WRAPPER; each daemon writes its own
# valgrind log. The daemon is clean when every log says "ERROR SUMMARY: 0
# errors" and nothing is "definitely lost". Test failures under valgrind's
# slowdown (timing-sensitive cases) are reported but do not decide the verdict.
# MEMCHECK_TESTS picks the integration files (default: test_server test_hostile).
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
command -v valgrind >/dev/null || { echo "memcheck: valgrind is not installed"; exit 2; }
logs=$(mktemp -d /tmp/tallyd-memcheck-XXXXXX)
export TALLYD_BIN="$PWD/$BUILD/tallyd"
export TALLYD_WRAPPER="valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=99 --log-file=$logs/vg.%p.log"
for t in ${MEMCHECK_TESTS:-test_server test_hostile}; do
  echo "memcheck: tests/integration/$t.py"
  (cd tests/integration && timeout 1200 "$PYTHON" "$t.py" 2>&1 | grep -E '^(ok|FAIL|skip|tally)')
done
n=0 bad=0 cut=0
for f in "$logs"/vg.*.log; do
  [ -f "$f" ] || continue
  if ! grep -q "ERROR SUMMARY" "$f"; then
    # killed before exit (a test's timeout under valgrind's slowdown): no verdict
    cut=$((cut + 1)); echo "memcheck: $f: no summary (the daemon was killed before it exited)"
    continue
  fi
  n=$((n + 1))
  if ! grep -q "ERROR SUMMARY: 0 errors" "$f" || grep -qE "definitely lost: [1-9]" "$f"; then
    bad=$((bad + 1))
    echo "---- $f"; grep -E "ERROR SUMMARY|definitely lost|Invalid|uninitialised" "$f" | head -20
  fi
done
echo "memcheck: $n daemon runs checked under valgrind, $bad with errors or definite leaks, $cut killed before a summary (logs in $logs)"
[ "$n" -gt 0 ] && [ "$bad" -eq 0 ]
