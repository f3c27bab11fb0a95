"""Train several recipe variants on one loaded model, sharing detection and targets where they can.

A sweep over `nestpatch train` settings pays the model load once, and detection and target
building once per distinct setting of what they depend on (the selection is cached under
``OUT/cache``). Each variant writes ``OUT/NAME.nestpatch`` and its training log; score them with
``benchmarks/tune_eval.py`` (tuning sets only). The cache is keyed on settings, not file contents:
clear ``OUT/cache`` after editing a prompt file.

    python benchmarks/train_sweep.py -o runs/sweep --seed 0 \\
        default='{}' rw10='{"retain_weight": 10}' ul='{"benign_refusal_weight": 1}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=JSON overrides of TrainConfig fields")
    ap.add_argument("-o", "--out", required=True, help="output directory")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from nestpatch.format import write_patch
    from nestpatch.models.loading import load_model
    from nestpatch.train.adapter import SharedDeltas
    from nestpatch.train.checkpoint import CheckpointDir
    from nestpatch.train.config import TrainConfig
    from nestpatch.train.pipeline import build_examples, build_patch, load_training_prompts, merge_prompt_sets, select_neurons
    from nestpatch.train.trainer import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for v in args.variants:
        name, _, js = v.partition("=")
        variants.append((name, json.loads(js or "{}")))
    if args.threads:
        torch.set_num_threads(args.threads)
    base_cfg = TrainConfig(model=args.model, out=str(out / "sweep.nestpatch"), seed=args.seed, threads=args.threads)
    t = time.time()
    lm = load_model(args.model)
    print(f"model loaded in {time.time() - t:.0f} s", flush=True)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    for name, overrides in variants:
        cfg = base_cfg.merged({**overrides, "out": str(out / f"{name}.nestpatch")}).resolved()
        timings: dict[str, float] = {}
        h_sets, b_sets = load_training_prompts(cfg)  # per variant: a variant may change the data
        harmful, h_cats = merge_prompt_sets(h_sets)
        benign, _ = merge_prompt_sets(b_sets)
        sel_key = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in (
            "modules", "layers", "detector", "threshold", "min_weight", "max_neurons_per_module", "pool", "clusters", "k_min",
            "k_max", "detect_prompts", "max_prompts", "harmful", "benign", "seed")}, sort_keys=True).encode()).hexdigest()[:12]
        ex_key = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in (
            "refusal_targets", "retain_loss", "retain_answer_tokens", "max_length", "max_prompts", "harmful", "benign", "seed")},
            sort_keys=True).encode()).hexdigest()[:12]
        sel_dir, ex_dir = CheckpointDir(out / "cache" / f"sel-{sel_key}"), CheckpointDir(out / "cache" / f"ex-{ex_key}")
        t = time.time()
        sel = sel_dir.load_selection() if sel_dir.exists() else None
        if sel is None:
            specs, det, per_layer, cstats = select_neurons(lm, cfg, harmful, benign)
            sel_dir.save_selection(specs, {"detection": det, "clusters": cstats})
        else:
            specs, info = sel
            det, cstats = info["detection"], info["clusters"]
        timings["detect_cluster_s"] = round(time.time() - t, 2)
        t = time.time()
        ex = ex_dir.load_examples()
        if ex is None:
            h_ex, b_ex, ex_info = build_examples(lm, cfg, harmful, h_cats, benign)
            ex_dir.save_examples(h_ex, b_ex, ex_info)
        else:
            h_ex, b_ex, ex_info = ex
        timings["targets_s"] = round(time.time() - t, 2)
        torch.manual_seed(int(cfg.seed))
        deltas = SharedDeltas(lm.model, specs, qat=cfg.qat).attach()
        log_path = out / f"{name}.train.jsonl"
        log_path.unlink(missing_ok=True)
        t = time.time()
        summary = Trainer(lm.model, deltas, h_ex, b_ex, cfg, pad_id=pad, log_path=log_path).run()
        timings["train_s"] = round(time.time() - t, 2)
        patch = build_patch(lm, cfg, deltas, h_sets, b_sets, ex_info, det, cstats, summary, timings)
        deltas.detach()
        write_patch(patch, out / f"{name}.nestpatch")
        print(json.dumps({"variant": name, "overrides": overrides, "neurons": sum(len(s.indices) for s in specs),
                          "params": deltas.trainable_parameters, "final": summary.final, **timings}), flush=True)


if __name__ == "__main__":
    main()
