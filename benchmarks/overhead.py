"""Inference overhead in llama.cpp: base GGUF vs folded GGUF vs base + LoRA adapter (tokens/s).

The promise under test: a folded patch costs nothing at inference (target: folded >= 0.97x base),
while serving the same patch as a LoRA adapter costs a little. The three variants run
interleaved, round after round, in one process, so drift in machine load hits all of them alike;
each round times a batched prefill and token-by-token decoding over the same fixed tokens
(teacher-forced, no sampling: identical work for every variant). Medians are reported.

    python benchmarks/overhead.py                       # smollm2 + a generated realistic patch
    python benchmarks/overhead.py --model M.gguf --patch P.nestpatch --threads 4 --json out.json

Measured 2026-11-23 on an idle 2-core VM (20 rounds, 1 thread, SmolLM2 Q4_1 with the default
`nestpatch train` patch: 60 targets / 822 neurons / 163 clusters): decode tok/s ratio to base:
folded 0.984, base + LoRA 0.936; prefill: folded 0.964, base + LoRA 0.944 (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import mmap
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def realistic_patch_from_gguf(path: Path, *, seed: int = 0, neurons: int = 6, clusters: int = 2, scale: float = 0.65,
                              modules: tuple[str, ...] = ("gate_proj", "up_proj")):
    """A NeST-like patch for a GGUF model without loading it in torch.

    Per layer and module: ``neurons`` random rows in ``clusters`` clusters, each cluster delta with
    about ``scale`` times the norm of the rows it is added to (trained NeST row deltas on SmolLM2
    were 0.6-0.7x the row norm). Base description and fingerprint sketches come from the file.
    """
    from nestpatch.converters import gguf_codecs as codecs
    from nestpatch.models.gguf_layout import parse_layout
    from nestpatch.fingerprint import attach_sketches, fingerprint_info
    from nestpatch.format import Patch, Target
    from nestpatch.format.constants import AXIS_ROW, BaseKey
    from nestpatch.models.naming import MODULE_AXIS, MLPRef

    layout = parse_layout(path)
    arch = str(layout.kv("general.architecture"))
    n_layers = int(layout.kv(f"{arch}.block_count"))
    rng = np.random.default_rng(seed)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:

        def rows_or_cols(ref: MLPRef, idx: np.ndarray) -> np.ndarray:
            info = layout.tensor(ref.gguf_name)
            raw = np.frombuffer(mm, np.uint8, info.nbytes, layout.data_start + info.offset).reshape(info.n_rows, info.row_bytes)
            if ref.axis == AXIS_ROW:
                return codecs.dequantize_rows(raw[idx], info.qtype, info.row_len)
            return codecs.dequantize_rows(raw, info.qtype, info.row_len)[:, idx].T.copy()

        targets = []
        for layer in range(n_layers):
            for mod in modules:
                ref = MLPRef(layer, mod)
                info = layout.tensor(ref.gguf_name)
                shape = (int(info.shape[0]), int(info.shape[1]))  # HF (out, in)
                n_axis = shape[0] if MODULE_AXIS[mod] == AXIS_ROW else shape[1]
                idx = np.sort(rng.choice(n_axis, size=neurons, replace=False)).astype(np.int32)
                vecs = rows_or_cols(ref, idx.astype(np.int64))  # (n, d)
                d = vecs.shape[1]
                typical = float(np.linalg.norm(vecs, axis=1).mean())
                deltas = (rng.standard_normal((clusters, d)) * scale * typical / np.sqrt(d)).astype(np.float32)
                cl = rng.permutation(np.arange(neurons) % clusters).astype(np.int32)
                targets.append(Target(ref.hf_name, MODULE_AXIS[mod], shape, idx, cl, deltas))
        patch = Patch(targets, base={
            BaseKey.ARCHITECTURE: arch, BaseKey.N_LAYERS: n_layers, BaseKey.D_MODEL: int(layout.kv(f"{arch}.embedding_length")),
            BaseKey.N_FF: int(layout.kv(f"{arch}.feed_forward_length")), BaseKey.NAME: path.name,
            BaseKey.FINGERPRINT: fingerprint_info()}, policy={"name": "bench-random", "version": "0"})
        attach_sketches(patch, lambda t: rows_or_cols(MLPRef(int(t.name.split(".")[2]), t.name.split(".")[4]), t.indices.astype(np.int64)))
    return patch


def time_variant(llm, prompt: list[int], decode: list[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one pass over fixed tokens."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in decode:
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(decode) / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="base GGUF (path or asset name)")
    ap.add_argument("--patch", help=".nestpatch to fold/export (default: a generated realistic patch)")
    ap.add_argument("--precision", default="keep", choices=("keep", "auto", "q8_0", "f16"))
    # many short rounds rather than few long ones: finer interleaving, so a burst of load from
    # another process lands on all three variants alike
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads; on a busy machine more threads than idle cores spin-wait and distort ratios")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)

    import llama_cpp

    from nestpatch.assets import resolve_model
    from nestpatch.converters.gguf_fold import fold_gguf
    from nestpatch.converters.lora_export import export_gguf_lora, max_rank
    from nestpatch.format import read_patch

    model = resolve_model(args.model)
    patch = read_patch(args.patch) if args.patch else realistic_patch_from_gguf(model, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="nestpatch-overhead-") as tmp:
        folded, adapter = Path(tmp) / "folded.gguf", Path(tmp) / "adapter.gguf"
        fold_gguf(model, patch, folded, precision=args.precision, progress=False)
        export_gguf_lora(patch, adapter)
        kw = dict(n_ctx=args.prompt_tokens + args.decode_tokens + 8, n_threads=args.threads, n_threads_batch=args.threads,
                  verbose=False, seed=args.seed)
        variants = {
            "base": llama_cpp.Llama(model_path=str(model), **kw),
            "folded": llama_cpp.Llama(model_path=str(folded), **kw),
            "base+lora": llama_cpp.Llama(model_path=str(model), lora_path=str(adapter), **kw),
        }
        n_vocab = variants["base"].n_vocab()
        prompt = rng.integers(100, n_vocab, args.prompt_tokens).tolist()
        decode = rng.integers(100, n_vocab, args.decode_tokens).tolist()
        for llm in variants.values():  # warm-up: page in the weights, build the graphs
            time_variant(llm, prompt[:16], decode[:4])
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                samples[name].append(time_variant(variants[name], prompt, decode))
        for llm in variants.values():
            llm.close()
        sizes = {"base": model.stat().st_size, "folded": folded.stat().st_size, "adapter": adapter.stat().st_size}

    result = {
        "model": str(model), "patch": args.patch or f"generated (seed {args.seed})",
        "targets": len(patch.targets), "neurons": patch.n_neurons, "clusters": patch.n_clusters, "lora_rank": max_rank(patch),
        "precision": args.precision, "rounds": args.rounds, "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "sizes": sizes,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "llama_cpp_python": llama_cpp.__version__, "variants": {},
    }
    # ratios are paired per round (same round, same machine load) and then the median is taken;
    # "best" is the fastest round of each variant, the figure least disturbed by other processes
    base_s = samples["base"]
    for name, s in samples.items():
        result["variants"][name] = {
            "prefill_tok_s": statistics.median(x[0] for x in s),
            "decode_tok_s": statistics.median(x[1] for x in s),
            "prefill_ratio": statistics.median(x[0] / b[0] for x, b in zip(s, base_s)),
            "decode_ratio": statistics.median(x[1] / b[1] for x, b in zip(s, base_s)),
            "decode_best_tok_s": max(x[1] for x in s),
            "decode_best_ratio": max(x[1] for x in s) / max(b[1] for b in base_s),
        }
    result["folded_ok"] = result["variants"]["folded"]["decode_ratio"] >= 0.97

    print(f"{model.name}: {result['targets']} targets, {result['neurons']} neurons, {result['clusters']} clusters "
          f"(LoRA rank {result['lora_rank']}); {args.rounds} interleaved rounds, {args.threads} threads")
    print(f"{'variant':<10} {'prefill tok/s':>14} {'ratio':>6} {'decode tok/s':>13} {'ratio':>6} {'best decode':>12} {'ratio':>6}")
    for name, v in result["variants"].items():
        print(f"{name:<10} {v['prefill_tok_s']:>14.1f} {v['prefill_ratio']:>6.3f} {v['decode_tok_s']:>13.1f} {v['decode_ratio']:>6.3f}"
              f" {v['decode_best_tok_s']:>12.1f} {v['decode_best_ratio']:>6.3f}")
    print("(tok/s: medians over rounds; ratios: median of per-round ratios to base; best: fastest round)")
    print(f"sizes: base {sizes['base']:,} B, folded {sizes['folded']:,} B, adapter {sizes['adapter']:,} B")
    print(f"folded >= 0.97x base (decode): {'yes' if result['folded_ok'] else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
