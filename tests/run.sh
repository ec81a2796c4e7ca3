#!/usr/bin/env bash
# Runs every test: the cmocka unit binaries in $BUILD/tests, then the
# integration suites in tests/integration (Python, standard library plus numpy
# where present), each of which starts its own tallyd on a free port.
# Lists every skipped test with its reason, then one closing line "N passed,
# N failed, N skipped"; exits non-zero on any failure. TESTS=pattern limits
# the run to matching files.
#
# Skip reasons: a cmocka test prints its reason (any line) before skip(), and
# the reason is the last line it printed between "[ RUN      ] name" and
# "[  SKIPPED ] name"; the Python harness prints "skip NAME: REASON" per test
# and a whole file that cannot run prints "skip: REASON".
set -u
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
export TALLYD_BIN="$PWD/$BUILD/tallyd" TALLYD_BUILD="$PWD/$BUILD" PYTHONUNBUFFERED=1
# tools that deploy/deps.sh unpacks without installing a package (promtool)
[ -d "$PWD/build/tools/bin" ] && export PATH="$PWD/build/tools/bin:$PATH"
case "$BUILD" in *san*) export TALLYD_SANITIZED=1 ;; esac
pattern=${TESTS:-}
passed=0 failed=0 skipped=0
failed_names=()
skips=()
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

cmocka_skips() { # name log -> appends "name/test: reason" for each cmocka skip
  local line
  while IFS= read -r line; do skips+=("$1/$line"); done < <(awk '
    /^\[ RUN      \] / { t = $4; why = ""; next }
    /^\[  SKIPPED \] / && NF == 4 && $4 == t {
      print t ": " (why == "" ? "(no reason printed)" : why); t = ""; next }
    /^\[/ { next }
    NF { why = $0; sub(/^[ \t]*(skip(ped)?:)?[ \t]*/, "", why) }' "$2")
}

harness_skips() { # name log -> appends "name/test: reason" for each harness skip
  local line
  while IFS= read -r line; do skips+=("$1/$line"); done < <(sed -n \
    -e 's/^skip \([A-Za-z0-9_.]*\): /\1: /p' -e 's/^skip: /(whole file): /p' "$2")
}

for t in "$BUILD"/tests/test_*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  [ -n "$pattern" ] && [[ "$name" != *$pattern* ]] && continue
  out="$log/$name.log"
  if timeout 600 "$t" >"$out" 2>&1; then rc=0; else rc=$?; fi
  count "$out"
  cmocka_skips "$name" "$out"
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
  harness_skips "$name" "$out"
  if [ $rc -ne 0 ]; then
    failed_names+=("$name")
    grep -qaE '^tally: ' "$out" || failed=$((failed + 1))
    echo "---- $name (exit $rc)"
    # which tests failed and why (a failing test's daemon log can push them
    # out of the tail below)
    grep -aE -A12 '^FAIL ' "$out" | grep -avE ' (info|debug) ' | head -80
    echo "---- $name: last lines"; tail -60 "$out"
  else
    echo "ok   $name"
  fi
done

if [ ${#skips[@]} -gt 0 ]; then
  echo "skipped:"
  printf '  %s\n' "${skips[@]}"
fi
[ ${#failed_names[@]} -gt 0 ] && echo "failing: ${failed_names[*]}"
echo "$passed passed, $failed failed, $skipped skipped"
[ ${#failed_names[@]} -eq 0 ] && [ $failed -eq 0 ]
