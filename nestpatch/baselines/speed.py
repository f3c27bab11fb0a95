"""Inference speed of a folded model: greedy decode tokens/s at batch 1.

Every model decodes exactly ``new_tokens`` tokens after the same prompt (end-of-turn tokens do
not stop it), so the work is identical whatever the model says: a refusing model is not
"faster" because its answers are short. Only the decode loop is timed (prompt evaluation is
not). The bench interleaves models round by round and keeps the median, because the machine
is shared and its speed drifts.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Where the bench keeps its speed measurement.
SPEED_FILE = "speed.json"
PROMPT = "Explain in a few sentences how a refrigerator keeps food cold."


class LlamaDecoder:
    """A GGUF in llama.cpp (CPU), kept open across rounds."""

    backend = "llama.cpp"

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None) -> None:
        from nestpatch.runtime.llama_session import LlamaSession

        self.session = LlamaSession(model_path=str(path), n_threads=n_threads, n_ctx=512)
        self.prompt = self.session.tokenize(self.session.format_prompt(PROMPT))

    def decode_seconds(self, new_tokens: int) -> float:
        llm = self.session.llama
        llm.reset()
        llm.eval(list(self.prompt))
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.session.close()


class TorchDecoder:
    """An in-memory transformers model (used when no GGUF fold is possible)."""

    backend = "torch"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from ..detect import format_prompt

        self.model, self.tok = model, tokenizer
        self.ids = tokenizer(format_prompt(tokenizer, PROMPT), return_tensors="pt", add_special_tokens=False)["input_ids"]

    def decode_seconds(self, new_tokens: int) -> float:
        import torch

        dev = next(self.model.parameters()).device
        ids = self.ids.to(dev)
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)  # (1, 1)
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = self.model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            sync()  # GPU work is asynchronous: wait for it before reading the clock
            return time.perf_counter() - t0

    def close(self) -> None:
        pass


def measure(decoders: dict[str, Any], *, new_tokens: int = 64, rounds: int = 3, warmup: int = 8) -> dict[str, dict]:
    """Interleaved rounds over ``decoders`` (order rotated each round); per name: median tokens/s, every round's figure, backend."""
    for d in decoders.values():
        d.decode_seconds(warmup)
    per: dict[str, list[float]] = {k: [] for k in decoders}
    names = list(decoders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no model always goes first
            per[name].append(new_tokens / max(decoders[name].decode_seconds(new_tokens), 1e-9))
    return {k: {"tokens_per_s": round(statistics.median(v), 2), "rounds": [round(x, 2) for x in v],
                "backend": decoders[k].backend, "new_tokens": new_tokens} for k, v in per.items()}


def speed_stage(bench_dir: Path, entries: dict[str, dict], *, base: str, threads: int | None, rounds: int, new_tokens: int,
                device: str = "cpu") -> dict:
    """Decode tokens/s of the base and every folded model, interleaved; writes ``speed.json``."""
    from ..assets import resolve_model
    from ..models.files import is_gguf
    from .jobs import BASE, read_json, write_json

    out = bench_dir / SPEED_FILE
    saved = read_json(out)
    names = [BASE] + list(entries)
    if saved is not None and all(n in saved.get("results", {}) for n in names):
        return saved
    from ..models.loading import load_model

    base_path = resolve_model(base)
    decoders: dict[str, Any] = {}
    try:
        for name in names:
            path, kind = (base_path, "gguf" if is_gguf(base_path) else "hf") if name == BASE else \
                (Path(entries[name]["path"]), entries[name]["kind"])
            if kind == "gguf":
                try:
                    decoders[name] = LlamaDecoder(path, n_threads=threads)
                    continue
                except Exception as e:  # noqa: BLE001 - no llama.cpp: measure in torch, and the table says so
                    log.warning("llama.cpp cannot run %s (%s); measuring in torch", path, e)
            lm = load_model(path, device=device)
            decoders[name] = TorchDecoder(lm.model, lm.tokenizer)
        results = measure(decoders, new_tokens=new_tokens, rounds=rounds)
    finally:
        for d in decoders.values():
            d.close()
    data = {"results": results, "rounds": rounds, "new_tokens": new_tokens, "threads": threads, "device": device,
            "note": "greedy decode at batch 1, prompt evaluation not timed; median of interleaved rounds"}
    write_json(out, data)
    return data
