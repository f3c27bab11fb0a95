#!/usr/bin/env bash
# Device run: Qwen2.5-Coder-0.5B, 3 seeds (named-model recipe) + 1 seed plain defaults; train + eval in torch on CUDA.
# Used once on a lent GPU machine (docs/RESULTS.md, "3 seeds (lent H200)"): the model GGUF arrives in
# pieces under /tmp/q (the machine has no network), the pinned prompt-set assets under .gpu/home, and
# wheels the machine lacks (gguf, jsonschema) under .gpu/whl. OUT is the folder whose files come back.
set -u
t0=$(date +%s)
LOG=$OUT/run.log
exec > >(tee -a "$LOG") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
ln -sfn ../converters nestpatch/converters; ln -sfn ../runtime nestpatch/runtime
export NESTPATCH_HOME=$PWD/.gpu/home
A=$NESTPATCH_HOME/assets/qwen2.5-coder-0.5b; mkdir -p $A
F=$A/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
cat /tmp/q/qc.* > $F; ls -la $F
sha=$(sha256sum $F | cut -d' ' -f1); echo "$sha"; echo "$sha" > $F.sha256
[ "$sha" = 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 ] || { echo BAD SHA; exit 1; }
python3 -c "import transformers, torch; print(transformers.__version__, torch.__version__, torch.cuda.is_available())"
job() {  # name, extra train flags
  n=$1; shift
  timeout 300 python3 -m nestpatch train qwen2.5-coder-0.5b --device cuda -o $OUT/$n.nestpatch "$@" > /tmp/$n.train.log 2>&1
  echo "$n train rc=$? $(( $(date +%s) - t0 ))s"; tail -3 /tmp/$n.train.log
  [ -f $OUT/$n.nestpatch ] || return
  timeout $(( 540 - ($(date +%s) - t0) )) python3 -m nestpatch eval qwen2.5-coder-0.5b --patch $OUT/$n.nestpatch --compare \
    --suite harmbench,jailbreak,benign,overrefusal,utility --device cuda --batch-size 64 --no-progress -o /tmp/ev-$n > /tmp/$n.eval.log 2>&1
  echo "$n eval rc=$? $(( $(date +%s) - t0 ))s"; tail -8 /tmp/$n.eval.log
}
job s0 --seed 0 & job s1 --seed 1 & job s2 --seed 2 & job d0 --seed 0 --recipe none &
wait
cd /tmp && tar czf $OUT/results.tgz ev-* *.train.log *.eval.log 2>/dev/null; ls -la $OUT
echo "total $(( $(date +%s) - t0 ))s"
