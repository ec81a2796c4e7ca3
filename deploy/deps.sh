#!/usr/bin/env bash
# Installs what tallyd needs to build, test and serve, on Debian/Ubuntu (apt).
# Elsewhere: install the equivalents by hand (C11 compiler, make, pkg-config,
# libmicrohttpd >= 0.9.75, jansson, libuv >= 1.40, OpenSSL 3, cmocka, libcurl,
# python3 with numpy, wrk, prometheus's promtool) and run `make` again.
# Runs quickly when everything is already present: it only calls apt for what
# is missing.
set -eu
PKGS="build-essential pkg-config clang libmicrohttpd-dev libjansson-dev libuv1-dev
libssl-dev libcmocka-dev libcurl4-openssl-dev python3 python3-numpy python3-yaml
curl openssl prometheus"
[ "${1:-}" = "--bench" ] && PKGS="$PKGS wrk"
[ "${1:-}" = "--ops" ] && PKGS="$PKGS prometheus"
# The yardsticks the kernel benches print beside tallyd's figures (OpenBLAS
# for bench_sgemm, PyTorch for bench/qfit_vs_torch.sh). Never needed to
# build, test or serve.
[ "${1:-}" = "--baselines" ] && PKGS="$PKGS libopenblas-dev python3-torch"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "deps.sh: apt-get not found; install these by hand:$missing" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "deps.sh: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends $missing
