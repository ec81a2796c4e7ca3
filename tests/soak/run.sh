#!/usr/bin/env bash
# make soak: a long mixed load against a daemon serving deploy/models (see soak.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" tests/soak/soak.py
