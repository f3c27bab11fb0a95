#!/usr/bin/env bash
# Set up nestpatch in ./.venv: torch==2.13.0 FIRST (an unpinned torch pulls a multi-GB CUDA
# build), then the package with every extra, llama-cpp-python included (compiled once, then
# cached by pip). Idempotent: a second run on a set-up checkout takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip)
stamp=.venv/.nestpatch-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
t0=$(date +%s)
"${pip[@]}" install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# portable llama.cpp build: same behaviour on every x86-64 machine
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${pip[@]}" install -q -e ".[all]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import nestpatch.converters, nestpatch.runtime, llama_cpp, transformers, torch"
echo "$want" > "$stamp"
echo "setup: done in $(( $(date +%s) - t0 ))s"
