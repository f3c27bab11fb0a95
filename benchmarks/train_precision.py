"""Training micro-batches in float32 and under bfloat16 autocast, side by side on one loaded model.

Why: whether ``--bf16`` pays on a CPU depends on the CPU. Without native bfloat16 arithmetic it was
0.23-0.27x float32's speed here (docs/RESULTS.md, "Qwen2.5-Coder-0.5B-Instruct"); CPUs with AVX512-BF16 or AMX run
bfloat16 matrix products in hardware. This script measures the two on the machine it runs on, with
the real training step (``Trainer.micro_step`` and its backward, activation checkpointing, the KL
retain term by default; ``--retain-loss ce`` is the recipes' term, one no-grad forward pass fewer), alternating the two precisions so that other load hits both
alike, and says how far the bfloat16 losses and gradients are from float32's on the same batch.

    python benchmarks/train_precision.py --model qwen2.5-coder-0.5b --threads 2 --repeats 3

Prints one JSON line per timed micro-batch, then the medians, the speed ratio and the agreement
(relative loss differences; cosine and relative norm difference of the deltas' gradients).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def _examples(tok_vocab: int, n: int, kind: str, response_len: int, rng: np.random.Generator) -> list:
    """Random token sequences with the training set's shapes (prompts of 30-60 tokens with the chat template)."""
    from nestpatch.train.examples import Example

    lo = 1000  # clear of the special and byte tokens at the start of the vocabulary
    return [Example(kind, f"{kind}{i}", rng.integers(lo, tok_vocab, size=int(rng.integers(30, 61))).tolist(),
                    rng.integers(lo, tok_vocab, size=response_len).tolist()) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="named model, GGUF file or HF directory")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4, help="harmful and benign rows per micro-batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed micro-batches per precision")
    ap.add_argument("--neurons", type=int, default=16, help="patched neurons per layer and projection (up, down)")
    ap.add_argument("--retain-loss", choices=("kl", "ce"), default="kl", help="retain term (kl: two forward passes)")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep activations (the Qwen recipes checkpoint)")
    ap.add_argument("--precisions", default="float32,bfloat16",
                    help="comma-separated subset of float32,bfloat16 (benchmarks/huge_pages.py times float32 alone)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nestpatch.models.loading import load_model
    from nestpatch.models.naming import MLPRef
    from nestpatch.train.adapter import SharedDeltas, TargetSpec
    from nestpatch.train.config import TrainConfig
    from nestpatch.train.trainer import Trainer, checkpointed_layers

    t = time.time()
    lm = load_model(args.model, device="cpu")
    model = lm.model
    print(json.dumps({"model": str(lm.source), "load_s": round(time.time() - t, 1), "threads": torch.get_num_threads(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    mcfg = model.config
    rng = np.random.default_rng(0)
    specs = []
    for layer in range(mcfg.num_hidden_layers):
        for proj in ("up_proj", "down_proj"):
            idx = np.sort(rng.choice(mcfg.intermediate_size, size=args.neurons, replace=False))
            specs.append(TargetSpec(MLPRef(layer, proj), idx, np.arange(args.neurons) % 4))  # 4 clusters a target
    deltas = SharedDeltas(model, specs).attach()
    with torch.no_grad():
        for p in deltas.parameters():
            p.normal_(0, 0.004)  # the RMS of a trained 1.5B delta (docs/RESULTS.md, session 10)
    vocab = int(mcfg.vocab_size)
    harmful = _examples(vocab, args.batch_size, "harmful", 48, rng)  # own refusals: 48 tokens
    benign = _examples(vocab, args.batch_size, "benign", 16, rng)  # retain answers: 16 tokens
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    trainers = {}
    wanted = set(args.precisions.split(","))
    for name, bf16 in (("float32", False), ("bfloat16", True)):
        if name not in wanted:
            continue
        cfg = TrainConfig(model=args.model, out="unused.nestpatch", batch_size=args.batch_size, retain_loss=args.retain_loss, bf16=bf16, seed=0)
        trainers[name] = Trainer(model, deltas, harmful, benign, cfg, pad_id=pad)

    idx = list(range(args.batch_size))
    times: dict[str, list[float]] = {k: [] for k in trainers}
    first: dict[str, tuple[dict, list[torch.Tensor]]] = {}
    with checkpointed_layers(model, not args.no_checkpointing):
        for r in range(args.repeats + 1):  # repeat 0 warms both paths up and is not timed
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for name in order:
                for p in deltas.parameters():
                    p.grad = None
                ts = time.perf_counter()
                losses = trainers[name].micro_step(idx, idx)
                losses["total"].backward()
                dt = time.perf_counter() - ts
                if name not in first:
                    first[name] = ({k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in deltas.parameters()])
                if r:
                    times[name].append(dt)
                    print(json.dumps({"repeat": r, "precision": name, "seconds": round(dt, 2)}), flush=True)
    deltas.detach()

    med = {k: statistics.median(v) for k, v in times.items()}
    if len(trainers) < 2:
        from nestpatch.memory import peak_rss_mb

        print(json.dumps({"median_s": {k: round(v, 2) for k, v in med.items()}, "peak_rss_mb": round(peak_rss_mb())}), flush=True)
        return
    (l32, g32), (l16, g16) = first["float32"], first["bfloat16"]
    a, b = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    print(json.dumps({
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "bf16_speedup": round(med["float32"] / med["bfloat16"], 2),
        "loss_rel_diff": {k: round(abs(l16[k] - l32[k]) / max(abs(l32[k]), 1e-12), 4) for k in l32},
        "grad_cosine": round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 4),
        "grad_rel_norm_diff": round(float((b - a).norm() / a.norm()), 4),
    }), flush=True)


if __name__ == "__main__":
    main()
