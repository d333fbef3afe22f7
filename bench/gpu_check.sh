#!/usr/bin/env bash
# The GPU check in one call (at most about 8 minutes, no network): tests on CUDA, copy bandwidth, benchmark.
# Usage, from anywhere: bash bench/gpu_check.sh   (extra arguments go to `python -m bench --gpu-check`)
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
exec timeout 480 python -m bench --gpu-check "$@"
