"""How much llama.cpp itself gains from batching on this machine: tokens/s at B tokens per decode call.

Why: ``benchmarks/batched_generation.py`` measures the batched decoder against the sequential path;
this measures the ceiling under it. One context feeds the first 512 tokens of one sequence B at a
time (logits of the last token only), so the figure is llama.cpp's matrix products alone, without
the per-sequence LM head that generation needs. Ratios between rows are the batching gain.

``--sequences`` adds the generation ceiling: B sequences in their own KV streams (as the batched
decoder keeps them), each 40 tokens in, then 40 steps of one token per sequence per call with every
sequence's logits computed (the LM head included), against one sequence.

    python benchmarks/llama_batch_ceiling.py [--model smollm2] [--threads 2] [--sizes 1,4,16,64,256] \
        [--sequences 1,16,64]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a GGUF path or a model asset name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1,4,16,64,256", help="tokens per llama_decode call")
    ap.add_argument("--sequences", default="", help="also: sequences decoded together, one token each per call")
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
    if args.sequences:
        print("| sequences per call (1 token each, all logits) | tok/s | x (vs 1) |\n|---|---|---|")
        base = None
        for n_seq in (int(x) for x in args.sequences.split(",")):
            rate = multi_sequence_rate(llm, n_seq)
            base = base or rate
            print(f"| {n_seq} | {rate:.1f} | {rate / base:.2f}x |", flush=True)
    llm.close()


def multi_sequence_rate(llm, n_seq: int, prompt: int = 40, steps: int = 40) -> float:
    """Tokens/s of ``steps`` decode calls with one token for each of ``n_seq`` streams, all logits."""
    import llama_cpp as lc
    from llama_cpp import _internals

    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.n_ctx, params.n_seq_max, params.kv_unified = 256 * n_seq, n_seq, False
    params.n_batch = params.n_ubatch = 512
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = lc.llama_batch_init(512, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        for n, (tok, pos, seq, logits) in enumerate(items):
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = tok, pos, 1, logits
            batch.seq_id[n][0] = seq
        batch.n_tokens = len(items)
        if lc.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        fill = [(100 + j, j, s, j == prompt - 1) for s in range(n_seq) for j in range(prompt)]
        for i in range(0, len(fill), 512):
            decode(fill[i:i + 512])
        t0 = time.perf_counter()
        for step in range(steps):
            decode([(200 + step, prompt + step, s, True) for s in range(n_seq)])
        return n_seq * steps / (time.perf_counter() - t0)
    finally:
        lc.llama_batch_free(batch)
        ctx.close()


if __name__ == "__main__":
    main()
