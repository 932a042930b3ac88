#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): CUDA paths, packed parity, compiled bf16 throughput + MFU, DDP.
# Runs with .venv/bin/python when the repo has one, else with the machine's python3 (a CUDA machine's own
# torch; nothing is installed). Arguments go to gpu_check.py (--quick: CPU mode as CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
