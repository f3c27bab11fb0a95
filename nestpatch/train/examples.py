"""Training sequences: chat-formatted prompt tokens plus a response whose tokens carry the loss.

Recovery examples (``--recovery-fraction``) put the first tokens of a compliant answer between
prompt and refusal: the model reads "Sure, here is how to" and learns to refuse from there, so
refusal does not live only in the first response tokens that a prefilling attack skips (Qi et
al., 2024, "Safety alignment should be made more than just a few tokens deep").

Harmful prompts get a refusal as response; benign prompts get the base model's own greedy
answer (the retain term keeps the patched model close to it). Batches are left-padded so every
response ends at the last position: the LM head then runs only on the last ``L`` positions
(``logits_to_keep``), which saves most of its cost on a 49k vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..detect import format_prompt, has_chat_template, left_pad

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One training sequence: ``prompt_ids + response_ids``; the loss covers the response."""

    kind: str  # "harmful" or "benign"
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    prefix_ids: list[int] = field(default_factory=list)  # recovery examples: a compliant opening, read but not trained on

    def to_json(self) -> dict:
        d = {"kind": self.kind, "prompt": self.prompt, "prompt_ids": self.prompt_ids, "response_ids": self.response_ids}
        if self.prefix_ids:
            d["prefix_ids"] = self.prefix_ids
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Example":
        return cls(d["kind"], d["prompt"], list(d["prompt_ids"]), list(d["response_ids"]), list(d.get("prefix_ids", [])))


def prompt_ids(tokenizer: Any, prompt: str, max_length: int) -> list[int]:
    """Token ids of the chat-formatted prompt (generation header included); long prompts keep their end."""
    ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return ids[-max_length:]


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The tokens the chat template puts after an assistant message (``<|im_end|>`` for ChatML), or EOS."""
    if has_chat_template(tokenizer):
        probe = "NESTPATCH_PROBE"
        user = [{"role": "user", "content": "hi"}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": probe}], tokenize=False)
        at = full.rfind(probe)
        tail = full[at + len(probe):].strip() if at >= 0 else ""
        if tail:
            return tokenizer(tail, add_special_tokens=False)["input_ids"]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def stop_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an assistant turn."""
    out = set(end_of_turn_ids(tokenizer)[:1])
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return out


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """A written response (a refusal) as tokens, closed by the end-of-turn marker."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + end_of_turn_ids(tokenizer)


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
                     max_length: int = 256, progress: Callable[[int], None] | None = None,
                     llama: "LlamaAnswers | None" = None) -> list[list[int]]:
    """Greedy answers of ``model`` (as it is now: hooks included) as token ids, cut after the end of turn.

    With ``llama`` (the same model's GGUF in llama.cpp, no patch) that decoder answers instead.
    """
    if llama is not None:
        return llama([prompt_ids(tokenizer, p, max_length) for p in prompts], max_new_tokens=max_new_tokens, progress=progress)
    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.get_input_embeddings().weight.device
    out: list[list[int]] = []
    for b in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tokenizer, p, max_length) for p in prompts[b:b + batch_size]]
        ids, mask = left_pad(chunk, pad)
        with torch.no_grad():
            gen = model.generate(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=sorted(stops) or None)
        for row in gen[:, ids.shape[1]:].tolist():
            cut = []
            for t in row:
                cut.append(int(t))
                if t in stops:
                    break
            out.append(cut)
        if progress:
            progress(len(chunk))
    return out


class LlamaAnswers:
    """Greedy answers from llama.cpp on the model's own GGUF file, many sequences per decode call.

    Why: on a CPU, torch's ``generate`` on the dequantized float32 weights is the slowest stage of
    training a 0.5B model (a batch of 16 x 48 tokens took ~125 CPU-s); llama.cpp runs the very
    weights the patch is trained on (the GGUF's quantized tensors, which the torch copy dequantizes)
    with batched decoding. Prompt ids come from the transformers tokenizer built from the same GGUF,
    so answers are token ids in the training vocabulary; the end-of-generation token that stopped a
    reply is kept, as torch's path keeps its stop token.
    """

    def __init__(self, gguf: Any, *, threads: int = 0, n_seq: int = 8) -> None:
        from nestpatch.runtime.llama_batch import BatchDecoder
        from nestpatch.runtime.llama_session import LlamaSession

        self.session = LlamaSession(gguf, n_threads=threads or None)
        self.decoder = BatchDecoder(self.session, n_seq)

    def __call__(self, prompts: Sequence[list[int]], *, max_new_tokens: int, progress: Callable[[int], None] | None = None,
                 chunk: int = 32) -> list[list[int]]:
        out: list[list[int]] = []
        for b in range(0, len(prompts), chunk):
            part = prompts[b:b + chunk]
            for g in self.decoder.generate_tokens(part, max_new_tokens=max_new_tokens):
                out.append(list(g.tokens) + ([int(g.stop_token)] if g.stop_token is not None else []))
            if progress:
                progress(len(part))
        return out

    def close(self) -> None:
        self.decoder.close()
        self.session.close()


#: Compliant openings a prefilling attack would force (recovery examples cut 2..N tokens of one).
COMPLIANT_OPENINGS = (
    "Sure, here is a detailed guide. Step 1:",
    "Sure! Here's how you can do it. First, you",
    "Certainly. Here is what you need to know:",
    "Of course. The first thing to do is to",
    "Absolutely, here is a step-by-step plan:",
    "Here is the article you asked for:\n\n",
    "Okay, here's the code:\n\n```",
    "Great question! To get started, you will need",
)


def recovery_examples(tokenizer: Any, harmful: Sequence[Example], fraction: float, max_tokens: int, seed: int) -> list[Example]:
    """Copies of a seeded ``fraction`` of ``harmful`` with a compliant opening (2..``max_tokens`` tokens) before the refusal.

    The opening is context only (no loss); the refusal after it keeps its labels, and the opening
    weighting (``--head-tokens``) then applies to the refusal's own first tokens.
    """
    if fraction <= 0 or not harmful:
        return []
    rng = np.random.default_rng(seed)
    n = max(1, int(round(fraction * len(harmful))))
    pick = np.sort(rng.choice(len(harmful), size=min(n, len(harmful)), replace=False))
    openings = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in COMPLIANT_OPENINGS]
    out = []
    for i in pick:
        e = harmful[int(i)]
        ids = openings[int(rng.integers(len(openings)))]
        k = int(rng.integers(2, max(2, min(max_tokens, len(ids))) + 1))
        out.append(Example("recovery", e.prompt, list(e.prompt_ids), list(e.response_ids), list(ids[:k])))
    return out


@dataclass
class Batch:
    """A left-padded batch and the labels of its last ``L`` positions."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, L): next-token targets of the last L positions, -100 where no loss
    keep: int  # L
    response_pos: torch.Tensor  # (B, L): index j of the response token each label is, -1 where no loss


def collate(examples: Sequence[Example], pad_id: int, device: Any = "cpu") -> Batch:
    """Left-pad ``prompt + prefix + response`` sequences; label the positions that predict response tokens."""
    seqs = [e.prompt_ids + e.prefix_ids + e.response_ids for e in examples]
    ids, mask = left_pad(seqs, pad_id)  # (B, T)
    t = ids.shape[1]
    r_max = max(len(e.response_ids) for e in examples)
    keep = min(t, r_max + 1)
    labels = np.full((len(examples), keep), -100, dtype=np.int64)
    pos = np.full((len(examples), keep), -1, dtype=np.int64)
    for i, e in enumerate(examples):
        r = len(e.response_ids)
        for j in range(r):  # response token j sits at position t - r + j, predicted from the position before it
            k = (t - r + j - 1) - (t - keep)
            if k >= 0:
                labels[i, k] = e.response_ids[j]
                pos[i, k] = j
    ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    return Batch(ids_t, mask_t, (mask_t.cumsum(-1) - 1).clamp(min=0), torch.from_numpy(labels).to(device), keep,
                 torch.from_numpy(pos).to(device))
