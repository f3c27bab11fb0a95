"""Sequential vs batched greedy generation in llama.cpp, side by side on the same prompts.

Why: ``nestpatch eval --backend llama`` decoded one prompt at a time; the batched decoder
(:mod:`nestpatch.runtime.llama_batch`) decodes ``--n-seq`` sequences per llama.cpp call with
continuous batching. This runs both on the same prompts in one process, with the same threads,
and prints prompts/s of each, the ratio, exact-token agreement, and the agreement of refusal
verdicts (refusal-phrase judge), which is what an evaluation reads off the replies.

Prompts: HarmBench validation behaviours and nestpatch's held-out benign prompts (half each);
no training data, no HarmBench test behaviour. The runs alternate (sequential, batched, ...) when
``--rounds`` > 1 so load from other processes hits both alike; the best round of each is reported.

    python benchmarks/batched_generation.py [--model smollm2] [--prompts 64] [--max-new-tokens 96] \\
        [--n-seq 8,16] [--threads 2] [--patch P.nestpatch --patch-mode fold|lora] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def prompts(n: int) -> list[str]:
    from nestpatch.data.sources import load_prompts

    harm = load_prompts("harmbench-val", allow_eval=True).prompts
    benign = load_prompts("builtin-benign-heldout").prompts
    k = n // 2
    return list(harm[:k]) + list(benign[:n - k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--n-seq", default="8", help="sequences in flight (batched); a comma list runs each against the same sequential run")
    ap.add_argument("--chunk", type=int, default=None,
                    help="prompts per decoder call, as the eval runner hands them (default: 4 x n-seq; 0 = all at once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kv-unified", action="store_true", help="one KV buffer for all sequences")
    ap.add_argument("--flash-attn", action="store_true", help="batched path with llama.cpp's fused attention")
    ap.add_argument("--patch", type=Path, default=None)
    ap.add_argument("--patch-mode", choices=["fold", "lora"], default="fold")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from nestpatch.evaluate.judges import RefusalPhraseJudge
    from nestpatch.format import read_patch
    from nestpatch.runtime.llama_batch import BatchDecoder
    from nestpatch.runtime.llama_session import LlamaSession

    patch = read_patch(args.patch) if args.patch else None
    ps = prompts(args.prompts)
    n_seqs = [int(x) for x in str(args.n_seq).split(",")]
    sess = LlamaSession(args.model, patch=patch, patch_mode=args.patch_mode, n_threads=args.threads, n_ctx=2048)
    texts = [sess.format_prompt(p) for p in ps]
    judge = RefusalPhraseJudge()
    n = len(ps)
    load_before = os.getloadavg()

    def sequential() -> list:
        return [sess.generate(p, max_new_tokens=args.max_new_tokens) for p in ps]

    def batched(dec: BatchDecoder, chunk: int) -> list:
        out = []
        for i in range(0, len(texts), chunk):
            out += dec.generate_texts(texts[i:i + chunk], max_new_tokens=args.max_new_tokens)
        return out

    # Rounds alternate sequential and batched, so load from other processes hits both alike; best round kept.
    times: dict[object, list[float]] = {}
    gens: dict[object, list] = {}
    decs = {k: BatchDecoder(sess, k, kv_unified=args.kv_unified, flash_attn=args.flash_attn) for k in n_seqs}
    chunks = {k: (args.chunk if args.chunk is not None else 4 * k) or n for k in n_seqs}
    for _ in range(args.rounds):
        for key in ["sequential", *n_seqs]:
            t0 = time.perf_counter()
            gens[key] = sequential() if key == "sequential" else batched(decs[key], chunks[key])
            times.setdefault(key, []).append(time.perf_counter() - t0)
    load_after = os.getloadavg()

    seq = gens["sequential"]
    ref_s = [judge.judge(p, g.text).refused for p, g in zip(ps, seq)]
    t_seq = min(times["sequential"])
    print(f"model {sess.base_path}  patch {args.patch}  {n} prompts x <= {args.max_new_tokens} new tokens, "
          f"{args.threads} threads, load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print("| path | seconds | prompts/s | new tokens | speedup | same tokens | verdict agreement | refused |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| sequential | {t_seq:.1f} | {n / t_seq:.3f} | {sum(len(g.tokens) for g in seq)} | 1.00x | | | {sum(ref_s) / n:.1%} |")
    rows = []
    for k in n_seqs:
        bat, t = gens[k], min(times[k])
        ref_b = [judge.judge(p, g.text).refused for p, g in zip(ps, bat)]
        row = {
            "model": str(sess.base_path), "patch": str(args.patch) if args.patch else None,
            "patch_mode": args.patch_mode if args.patch else None, "prompts": n, "max_new_tokens": args.max_new_tokens,
            "threads": args.threads, "n_seq": k, "chunk": chunks[k], "kv_unified": args.kv_unified,
            "flash_attn": args.flash_attn, "rounds": args.rounds,
            "seconds_sequential": round(t_seq, 2), "seconds_batched": round(t, 2),
            "prompts_per_s_sequential": round(n / t_seq, 3), "prompts_per_s_batched": round(n / t, 3),
            "speedup": round(t_seq / t, 2),
            "new_tokens_sequential": sum(len(g.tokens) for g in seq), "new_tokens_batched": sum(len(g.tokens) for g in bat),
            "same_tokens": round(sum(a.tokens == b.tokens for a, b in zip(seq, bat)) / n, 4),
            "verdict_agreement": round(sum(a == b for a, b in zip(ref_s, ref_b)) / n, 4),
            "refused_sequential": round(sum(ref_s) / n, 4), "refused_batched": round(sum(ref_b) / n, 4),
            "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(load_after[0], 2),
        }
        rows.append(row)
        print(f"| batched n_seq {k} ({chunks[k]} per call) | {t:.1f} | {n / t:.3f} | {row['new_tokens_batched']} | "
              f"{row['speedup']:.2f}x | {row['same_tokens']:.1%} | {row['verdict_agreement']:.1%} | {row['refused_batched']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    for d in decs.values():
        d.close()
    sess.close()


if __name__ == "__main__":
    main()
