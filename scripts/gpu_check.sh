#!/usr/bin/env bash
# The GPU check: speed and memory at real sizes with random weights, in one command (see scripts/gpu_check.py).
#   bash scripts/gpu_check.sh [--out DIR] [--budget_s 480]     on one GPU, about 8 minutes
#   bash scripts/gpu_check.sh --dry-run                          tiny recipes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" scripts/gpu_check.py --python "$PYTHON" "$@"
