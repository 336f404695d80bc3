#!/usr/bin/env bash
# Every CUDA path of thresher once, with figures for BENCHMARKS.md (see bench/gpu_check.py).
#   bash bench/gpu_check.sh [--device cuda|cpu] [--quick]
# Runs with $PYTHON when set, else the repository's .venv when there is one, else python3 (a
# `pip install -e .` machine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" "$root/bench/gpu_check.py" "$@"
