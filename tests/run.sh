#!/usr/bin/env bash
# Runs every test: the cmocka unit binaries in $BUILD/tests, then the
# integration suites in tests/integration (Python, standard library plus numpy
# where present), each of which starts its own tallyd on a free port.
# Prints one closing line "N passed, N failed, N skipped"; exits non-zero on
# any failure. TESTS=pattern limits the run to matching files.
set -u
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
export TALLYD_BIN="$PWD/$BUILD/tallyd" TALLYD_BUILD="$PWD/$BUILD" PYTHONUNBUFFERED=1
case "$BUILD" in *san*) export TALLYD_SANITIZED=1 ;; esac
pattern=${TESTS:-}
passed=0 failed=0 skipped=0
failed_names=()
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

count() { # file -> adds cmocka/unittest counts
  local f=$1 p fl s
  p=$(grep -aE '^\[  PASSED  \] [0-9]+ test' "$f" | awk '{s+=$4} END{print s+0}')
  fl=$(grep -aE '^\[  FAILED  \] [0-9]+ test' "$f" | awk '{s+=$4} END{print s+0}')
  s=$(grep -aE '^\[  SKIPPED \] [0-9]+ test' "$f" | awk '{s+=$4} END{print s+0}')
  # our python harness prints "tally: N passed, N failed, N skipped"
  if grep -aqE '^tally: [0-9]+ passed' "$f"; then
    p=$((p + $(grep -aE '^tally: ' "$f" | tail -1 | awk '{print $2}')))
    fl=$((fl + $(grep -aE '^tally: ' "$f" | tail -1 | awk '{print $4}')))
    s=$((s + $(grep -aE '^tally: ' "$f" | tail -1 | awk '{print $6}')))
  fi
  passed=$((passed + p)); failed=$((failed + fl)); skipped=$((skipped + s))
}

for t in "$BUILD"/tests/test_*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  [ -n "$pattern" ] && [[ "$name" != *$pattern* ]] && continue
  out="$log/$name.log"
  if timeout 600 "$t" >"$out" 2>&1; then rc=0; else rc=$?; fi
  count "$out"
  if [ $rc -ne 0 ]; then
    failed_names+=("$name")
    grep -qaE '^\[  FAILED  \]' "$out" || failed=$((failed + 1))
    echo "---- $name (exit $rc)"; tail -40 "$out"
  else
    echo "ok   $name"
  fi
done

for t in tests/integration/test_*.py tests/reference/test_*.py; do
  [ -f "$t" ] || continue
  name=$(basename "$t" .py)
  [ -n "$pattern" ] && [[ "$name" != *$pattern* ]] && continue
  out="$log/$name.log"
  if timeout 900 "$PYTHON" "$t" >"$out" 2>&1; then rc=0; else rc=$?; fi
  count "$out"
  if [ $rc -ne 0 ]; then
    failed_names+=("$name")
    grep -qaE '^tally: ' "$out" || failed=$((failed + 1))
    echo "---- $name (exit $rc)"; tail -60 "$out"
  else
    echo "ok   $name"
  fi
done

[ ${#failed_names[@]} -gt 0 ] && echo "failing: ${failed_names[*]}"
echo "$passed passed, $failed failed, $skipped skipped"
[ ${#failed_names[@]} -eq 0 ] && [ $failed -eq 0 ]
