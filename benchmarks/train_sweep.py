"""Train several recipe variants on one loaded model, sharing detection and targets where they can.

A sweep over `nestpatch train` settings pays the model load once, and detection and target
building once per distinct setting of what they depend on (``nestpatch.tune.session``, the same
code `nestpatch tune` runs; the selection and training sequences are cached under ``OUT/cache``).
Each variant writes ``OUT/NAME.nestpatch`` and its training log; score them with
``benchmarks/tune_eval.py`` (tuning sets only). The cache is keyed on settings, not file contents:
clear ``OUT/cache`` after editing a prompt file.

    python benchmarks/train_sweep.py -o runs/sweep --seed 0 \\
        default='{}' rw10='{"retain_weight": 10}' ul='{"benign_refusal_weight": 1}'
"""

from __future__ import annotations

import argparse
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
    from nestpatch.train.config import TrainConfig
    from nestpatch.train.recipes import apply_recipe
    from nestpatch.tune.session import TrainSession

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
    session = TrainSession(args.model, cache_dir=out / "cache")
    print(f"model loaded in {time.time() - t:.0f} s", flush=True)

    for name, overrides in variants:
        cfg = base_cfg.merged({**overrides, "out": str(out / f"{name}.nestpatch")})
        cfg, _ = apply_recipe(cfg, set(overrides) | {"model", "out", "seed", "threads"})  # the named model's recipe, as `train`
        run = session.train(cfg, log_path=out / f"{name}.train.jsonl")
        write_patch(run.patch, out / f"{name}.nestpatch")
        print(json.dumps({"variant": name, "overrides": overrides, "neurons": run.neurons,
                          "params": run.patch.trainable_parameters, "final": run.summary.final, "coverage": run.summary.coverage,
                          **run.timings}), flush=True)


if __name__ == "__main__":
    main()
