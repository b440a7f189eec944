#!/usr/bin/env bash
# The GPU check: speed and memory at real sizes with random weights, in one command (see toolbox/benchmarks/gpu_check.py).
#   bash scripts/gpu_check.sh [--out DIR] [--budget_s 480]     on one GPU, about 8 minutes
#   bash scripts/gpu_check.sh --dry-run                          tiny recipes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" scripts/benchmark.py gpu --python "$PYTHON" "$@"
