#!/usr/bin/env bash
# Set up nestpatch in ./.venv: torch==2.13.0 FIRST (an unpinned torch pulls a multi-GB CUDA
# build), then the package with every extra, llama-cpp-python included (compiled once, then
# cached by pip). Idempotent: a second run on a set-up checkout takes seconds.
#
# torch comes from PyTorch's CPU wheel index by default (on PyPI, torch's Linux wheel is the
# CUDA build). NESTPATCH_TORCH_INDEX overrides it: a CUDA index for a GPU machine
# (https://download.pytorch.org/whl/cu128), or empty to use only pip's own configuration.
# The index is an *extra* index: wheels that pip's configuration already provides (a local
# mirror, find-links) still satisfy the pin, so an offline machine keeps working.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip)
stamp=.venv/.nestpatch-setup
want=$( (cat pyproject.toml scripts/setup.sh; echo "${NESTPATCH_TORCH_INDEX-}") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
t0=$(date +%s)
torch_index=${NESTPATCH_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
torch_args=()
# --retries 1: where the index is unreachable (an offline mirror serves torch), each of torch's
# dependencies would otherwise wait through five retries before pip falls back to its own configuration.
[ -n "$torch_index" ] && torch_args=(--extra-index-url "$torch_index" --retries 1)
if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
  "${pip[@]}" install -q "${torch_args[@]}" torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# portable llama.cpp build: same behaviour on every x86-64 machine
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${pip[@]}" install -q -e ".[all]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import nestpatch.converters, nestpatch.runtime, llama_cpp, transformers, torch"
echo "$want" > "$stamp"
echo "setup: done in $(( $(date +%s) - t0 ))s"
