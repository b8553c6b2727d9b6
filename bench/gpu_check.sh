#!/usr/bin/env bash
# The one command to run on a GPU host (see bench/gpu_check.py). Output is also saved to
# $OUT/gpu_check.log when $OUT is set (the device tool), else /tmp/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"${PYTHON:-python3}" bench/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
