"""Memory and time of a model load, a detection pass and backward passes under glibc's mmap-threshold settings.

Runs each setting in a fresh process of its own, one after the other, and prints RSS after the
load, RSS after pooling activations on ``--prompts`` built-in prompts, RSS after ``--train-steps``
backward passes, peak RSS and the seconds each took, then the ratios to glibc's default. See
``nestpatch.memory`` for why the threshold matters.

    python benchmarks/load_memory.py --model smollm2 --prompts 64
    python benchmarks/load_memory.py --model qwen2.5-coder-0.5b --prompts 64 --modes default,131072 --train-steps 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(model: str, prompts: int, mode: str, threads: int, train_steps: int) -> dict:
    """Load, pool activations, run backward passes, and report; runs in its own process.

    ``mode``: ``default`` (glibc's dynamic threshold), a fixed threshold in bytes, or ``trim``
    (the dynamic threshold, and ``malloc_trim(0)`` after each phase and each backward pass).
    """
    import ctypes

    from nestpatch.memory import fix_mmap_threshold, keep_glibc_default, peak_rss_mb

    if mode.isdigit():
        fix_mmap_threshold(int(mode))
    else:
        keep_glibc_default()  # load_model would fix it for a large model
    libc = ctypes.CDLL("libc.so.6")

    def trim() -> None:
        if mode == "trim":
            libc.malloc_trim(0)

    import torch

    if threads:
        torch.set_num_threads(threads)
    from nestpatch.data import load_prompts
    from nestpatch.detect import mlp_refs, pooled_activations
    from nestpatch.models.loading import load_model

    def rss_mb() -> float:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    t0 = time.perf_counter()
    lm = load_model(model)
    trim()
    load_s, after_load = time.perf_counter() - t0, rss_mb()
    texts = load_prompts("builtin-harmful").prompts[:prompts]
    t0 = time.perf_counter()
    pooled_activations(lm.model, lm.tokenizer, texts, mlp_refs(lm.model, ("gate_proj", "up_proj")), batch_size=16, max_length=128)
    trim()
    detect_s, after_detect = time.perf_counter() - t0, rss_mb()
    # backward passes through the whole model (one small weight trainable), as a training step allocates
    for p in lm.model.parameters():
        p.requires_grad_(False)
    lm.model.get_output_embeddings().weight.requires_grad_(False)
    norm = lm.model.model.norm.weight
    norm.requires_grad_(True)
    ids = lm.tokenizer(texts[:4], return_tensors="pt", padding="max_length", max_length=64, truncation=True)["input_ids"]
    t0 = time.perf_counter()
    for _ in range(train_steps):
        lm.model(input_ids=ids, labels=ids).loss.backward()
        trim()
    return {"load_s": round(load_s, 1), "rss_after_load_mb": round(after_load), "detect_s": round(detect_s, 1),
            "rss_after_detect_mb": round(after_detect), "backward_s": round(time.perf_counter() - t0, 1),
            "rss_after_backward_mb": round(rss_mb()), "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--train-steps", type=int, default=4, help="forward + backward passes on 4 prompts of 64 tokens")
    ap.add_argument("--modes", default="default,131072,trim", help="default, a fixed threshold in bytes, or trim (comma-separated)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.prompts, args.child, args.threads, args.train_steps)))
        return
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    common = ["--model", args.model, "--prompts", str(args.prompts), "--threads", str(args.threads), "--train-steps", str(args.train_steps)]
    rows = {}
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, *common], check=True, capture_output=True, text=True, env=env)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:<8} {rows[mode]}", flush=True)
    d = rows.get("default")
    for mode, r in rows.items():
        if d is None or mode == "default":
            continue
        print(f"{mode} / default: " + ", ".join(f"{k} {r[k] / d[k]:.2f}" for k in r if d[k]), flush=True)


if __name__ == "__main__":
    main()
