"""How much llama.cpp itself gains from batching on this machine: tokens/s at B tokens per decode call.

Why: ``benchmarks/batched_generation.py`` measures the batched decoder against the sequential path;
this measures the ceiling under it. One context feeds the first 512 tokens of one sequence B at a
time (logits of the last token only), so the figure is llama.cpp's matrix products alone, without
the per-sequence LM head that generation needs. Ratios between rows are the batching gain.

    python benchmarks/llama_batch_ceiling.py [--model smollm2] [--threads 2] [--sizes 1,4,16,64,256]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a GGUF path or a model asset name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1,4,16,64,256", help="tokens per llama_decode call")
    args = ap.parse_args()

    import llama_cpp

    from nestpatch.assets import resolve_model

    path = str(resolve_model(args.model)) if not args.model.endswith(".gguf") else args.model
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    toks = llm.tokenize(b"hello world " * 300, add_bos=True)[:512]
    base = None
    print(f"{path}, {args.threads} threads, {len(toks)} tokens per row")
    print("| tokens per call | tok/s | x (vs 1) |\n|---|---|---|")
    for b in (int(x) for x in args.sizes.split(",")):
        llm.reset()
        t0, n = time.perf_counter(), 0
        while n + b <= len(toks):
            llm.eval(toks[n:n + b])
            n += b
        rate = n / (time.perf_counter() - t0)
        base = base or rate
        print(f"| {b} | {rate:.1f} | {rate / base:.2f}x |", flush=True)
    llm.close()


if __name__ == "__main__":
    main()
