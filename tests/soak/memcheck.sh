#!/usr/bin/env bash
# make memcheck: integration tests against tallyd running under valgrind.
#
# The harness runs tallyd under $TALLYD_WRAPPER; each daemon writes its own
# valgrind log. The daemon is clean when every log says "ERROR SUMMARY: 0
# errors" and nothing is "definitely lost", and every test passed (the
# harness scales its waits by SLOW under a wrapper).
# MEMCHECK_TESTS picks the integration files (default: every suite that runs
# the daemon normally; test_faults kills and starves it on purpose, the
# client and deploy-file suites test other programs). The harness multiplies
# its waits by SLOW under a wrapper, so timing tests run too.
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
command -v valgrind >/dev/null || { echo "memcheck: valgrind is not installed"; exit 2; }
logs=$(mktemp -d /tmp/tallyd-memcheck-XXXXXX)
failed_files=""
export TALLYD_BIN="$PWD/$BUILD/tallyd"
export TALLYD_WRAPPER="valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=99 --log-file=$logs/vg.%p.log"
DEFAULT_TESTS="test_server test_hostile test_ensemble test_quantile test_attention test_transformer
  test_sessions test_fit_divergence test_session_params test_reload test_metrics test_notify
  test_auth_tls"
for t in ${MEMCHECK_TESTS:-$DEFAULT_TESTS}; do
  echo "memcheck: tests/integration/$t.py"
  (cd tests/integration && timeout 1200 "$PYTHON" "$t.py" 2>&1) > "$logs/$t.out"
  rc=$?
  grep -E '^(ok|FAIL|skip|tally)' "$logs/$t.out"
  if [ "$rc" -ne 0 ]; then
    failed_files="$failed_files $t"
    grep -A12 '^FAIL' "$logs/$t.out" | grep -E 'Failure|Error' | head -5
  fi
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
[ -z "$failed_files" ] || echo "memcheck: tests failed under valgrind in:$failed_files"
[ "$n" -gt 0 ] && [ "$bad" -eq 0 ] && [ -z "$failed_files" ]
