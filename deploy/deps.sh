#!/usr/bin/env bash
# Installs the Debian packages one use of tallyd needs, and only those:
#
#   deploy/deps.sh run       build and serve (make run, make all)
#   deploy/deps.sh test      run + what the test suite calls (make test)
#   deploy/deps.sh bench     run + wrk (make bench)
#   deploy/deps.sh fuzz      run + clang for the libFuzzer targets (make fuzz)
#   deploy/deps.sh image     buildah and debootstrap (make image)
#   deploy/deps.sh baselines OpenBLAS and PyTorch: the yardsticks bench_sgemm
#                            and bench/qfit_vs_torch.sh print beside tallyd's
#                            figures (never needed to build, test or serve)
#   deploy/deps.sh promtool  Prometheus's promtool alone, unpacked from the
#                            Debian package into build/tools/bin (no server is
#                            installed; tests/run.sh puts that folder on PATH)
#
# Several steps may be given at once (deploy/deps.sh test fuzz); none means run.
# Only what is missing is installed, so a second call is quick. No step
# installs a service, and none is started: while apt runs, a policy-rc.d that
# denies every start is in place unless the machine already has one.
# Elsewhere than Debian/Ubuntu, install the equivalents by hand: a C11 compiler,
# make, pkg-config, libmicrohttpd >= 0.9.75, jansson, libuv >= 1.40, OpenSSL 3,
# libcurl, zlib, PCRE2, python3 (run); cmocka, numpy, PyYAML, curl, openssl, nginx (test).
set -eu
cd "$(dirname "$0")/.."

RUN="build-essential pkg-config libmicrohttpd-dev libjansson-dev libuv1-dev libssl-dev
libcurl4-openssl-dev zlib1g-dev libpcre2-dev python3"
TEST="$RUN libcmocka-dev python3-numpy python3-yaml curl openssl nginx"

want=""
promtool=0
[ $# -eq 0 ] && set -- run
for step in "$@"; do
  case "$step" in
    run) want="$want $RUN" ;;
    test) want="$want $TEST" ;;
    bench | --bench) want="$want $RUN wrk" ;;
    fuzz) want="$want $RUN clang" ;;
    image) want="$want buildah debootstrap" ;;
    baselines | --baselines) want="$want libopenblas-dev python3-torch" ;;
    promtool) promtool=1 ;;
    *) echo "deps.sh: unknown step '$step' (run, test, bench, fuzz, image, baselines, promtool)" >&2; exit 2 ;;
  esac
done

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
made_policy="" tmp=""
cleanup() {
  if [ -n "$made_policy" ]; then $SUDO rm -f "$made_policy"; fi
  if [ -n "$tmp" ]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT

missing=""
for p in $want; do
  case " $missing " in *" $p "*) continue ;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done

if [ -n "$missing" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "deps.sh: apt-get not found; install these by hand:$missing" >&2
    exit 1
  fi
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "deps.sh: not root and no sudo; as root run: apt-get install$missing" >&2
    exit 1
  fi
  echo "deps.sh: installing:$missing"
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    # invoke-rc.d and deb-systemd-invoke ask this script; 101 = "not allowed"
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 0755 "$policy"
    made_policy=$policy
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq || true
  # shellcheck disable=SC2086
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing
  if [ -n "$made_policy" ]; then $SUDO rm -f "$made_policy"; made_policy=""; fi
fi

if [ $promtool = 1 ]; then
  dest=build/tools/bin
  if [ -x "$dest/promtool" ]; then
    exit 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "deps.sh: apt-get not found; put promtool on PATH by hand" >&2
    exit 1
  fi
  # `apt-get download` fetches the .deb without installing it; only
  # usr/bin/promtool is unpacked from it.
  tmp=$(mktemp -d)
  echo "deps.sh: unpacking promtool from the prometheus package into $dest"
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) ||
    { $SUDO apt-get update -qq || true; (cd "$tmp" && apt-get download -qq prometheus); }
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  mkdir -p "$dest"
  install -m 0755 "$tmp/usr/bin/promtool" "$dest/promtool"
  "$dest/promtool" --version 2>&1 | head -1
fi
