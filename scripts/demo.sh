#!/usr/bin/env bash
# The main job on the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI):
#   1. train a NeST safety policy (detect -> cluster -> shared deltas) -> policy.nestpatch
#   2. fold it into the Q4_1 GGUF (retention measured; auto precision where it is low)
#   3. evaluate before/after in llama.cpp on HarmBench, benign and over-refusal prompts
#   4. write an HTML report
# Environment: OUT (run folder, default runs/demo), LIMIT (samples per suite, default all).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/nestpatch ] || bash scripts/setup.sh
np=.venv/bin/nestpatch
OUT=${OUT:-runs/demo}
limit=()
[ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
mkdir -p "$OUT"
model=$($np fetch smollm2)
echo "== 1/4 train on $model"
$np train "$model" -o "$OUT/policy.nestpatch" --force
$np inspect "$OUT/policy.nestpatch"
echo "== 2/4 fold into GGUF"
$np apply "$model" "$OUT/policy.nestpatch" -o "$OUT/SmolLM2-135M-Instruct.nest.Q4_1.gguf" \
  --precision auto --report-json "$OUT/fold.json" --force
echo "== 3/4 evaluate base vs patched (llama.cpp)"
rm -rf "$OUT/eval"
$np eval "$model" --patch "$OUT/policy.nestpatch" --suite harmbench,benign,overrefusal,utility \
  --backend llama --patch-mode fold --precision auto --compare "${limit[@]}" -o "$OUT/eval"
cat "$OUT/eval/summary.md"
echo "== 4/4 report"
$np report "$OUT/policy.nestpatch" --eval "$OUT/eval" --fold-report "$OUT/fold.json" -o "$OUT/report.html" --force
echo "done: $OUT/policy.nestpatch, $OUT/SmolLM2-135M-Instruct.nest.Q4_1.gguf, $OUT/eval/summary.md, $OUT/report.html"
