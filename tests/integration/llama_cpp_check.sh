#!/usr/bin/env bash
# llama.cpp proof of the GGUF export: install llama-cpp-python into .venv if it is missing (built from
# its sdist: no Linux wheel on PyPI; ~6-7 min on 2 idle cores), then run llama_cpp_check.py.
#
#   tests/integration/llama_cpp_check.sh [llama_cpp_check.py arguments, e.g. --ckpt out/sft]
#
# PYTHON (default .venv/bin/python, created by bin/setup when missing) runs everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
  bin/setup
  PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c "import llama_cpp" 2>/dev/null; then
  echo "llama_cpp_check: building llama-cpp-python from source (tests/integration/requirements.txt)"
  start=$SECONDS
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
    "$PYTHON" -m pip install --quiet --no-cache-dir -r tests/integration/requirements.txt
  echo "llama_cpp_check: built and installed in $((SECONDS - start)) s"
fi
"$PYTHON" tests/integration/llama_cpp_check.py "$@"
