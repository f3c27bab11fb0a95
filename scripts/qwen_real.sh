#!/usr/bin/env bash
# Timed real-model run (out of CI): train a NeST patch on a Qwen2.5-Coder model with its recipe,
# fold it into the model's own GGUF (retention per target), and a quick llama.cpp HarmBench check,
# base vs patched (--compare folds the patch into a cached copy of the base).
#   bash scripts/qwen_real.sh [qwen2.5-coder-0.5b|qwen2.5-coder-1.5b] [extra train flags...]
# Writes runs/<model>.nestpatch, .train.jsonl/.train.toml, .time (GNU time -v: wall, peak RSS),
# the folded GGUF and runs/<model>-eval/. The pytest side of it: NESTPATCH_SLOW_REAL=1 pytest -m slow_real.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-qwen2.5-coder-0.5b}"
shift || true
np=.venv/bin/nestpatch
mkdir -p runs
base="$($np fetch "$model")"
echo "model: $base"
echo "other processes on this machine (the cores are shared):"
ps -eo pcpu,etime,args --sort=-pcpu | head -8
/usr/bin/time -v -o "runs/$model.time" "$np" train "$model" -o "runs/$model.nestpatch" --seed 0 --threads 2 "$@"
grep -E "Elapsed|Maximum resident|User time|System time" "runs/$model.time"
"$np" apply "$model" "runs/$model.nestpatch" -o "runs/$model.nest.gguf" --precision auto --report-json "runs/$model.fold.json"
"$np" eval "$model" --patch "runs/$model.nestpatch" --suite harmbench --limit 20 --backend llama --compare \
    -o "runs/$model-eval"
