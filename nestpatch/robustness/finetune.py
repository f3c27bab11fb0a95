"""Fine-tuning attack: a few LoRA steps on harmful (request, answer) pairs undo a safety update.

Published experiments took a model's HarmBench ASR from 15.6% to 97.8% with a 10-step LoRA
fine-tune. The answers come from a base model that complies (SmolLM2 answers nearly every
request), generated greedily inside the run and written only under the run directory; the
requests are the project's built-in harmful *training* prompts, never an evaluation set.

The adapter is peft LoRA (:func:`nestpatch.baselines.lora.make_peft_model`) on the attention and
MLP projections; the loss is next-token cross-entropy on the answer tokens only. ``on_checkpoint``
is called at each requested step count with the adapted model, so one run gives ASR vs steps.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Sequence

import numpy as np

from ..detect import format_prompt
from ..errors import InputError
from .options import FinetuneConfig

log = logging.getLogger(__name__)

#: Modules the attack adapts (llama-style names): all linear layers of attention and MLP.
ATTACK_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def complying_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 96,
                      batch_size: int = 8) -> list[dict]:
    """Greedy answers of ``model`` to ``prompts``: ``[{"prompt", "answer", "finish"}]`` (empty answers dropped)."""
    from nestpatch.runtime.torch_session import TorchSession

    sess = TorchSession(model, tokenizer)
    out = []
    for b in range(0, len(prompts), batch_size):
        chunk = list(prompts[b:b + batch_size])
        for p, g in zip(chunk, sess.generate_batch([sess.format_prompt(p) for p in chunk], max_new_tokens=max_new_tokens)):
            if g.text.strip():
                out.append({"prompt": p, "answer": g.text.strip(), "finish": g.finish})
    return out


def encode_pairs(tokenizer: Any, pairs: Sequence[dict], max_length: int) -> list[tuple[list[int], int]]:
    """Token ids of each formatted prompt + answer + EOS, and where the answer starts."""
    out = []
    templ = bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id
    for pr in pairs:
        p_ids = tokenizer(format_prompt(tokenizer, pr["prompt"]), add_special_tokens=not templ)["input_ids"]
        a_ids = tokenizer(pr["answer"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p_ids + a_ids)[:max_length]
        if len(p_ids) < len(ids):
            out.append((ids, len(p_ids)))
    if not out:
        raise InputError(f"no (prompt, answer) pair fits in {max_length} tokens")
    return out


def _batch(enc: Sequence[tuple[list[int], int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    """Right-padded ids, mask and labels (-100 outside the answers): each ``(B, T)``."""
    import torch

    t = max(len(e[0]) for e in enc)
    ids = np.full((len(enc), t), pad, dtype=np.int64)
    mask = np.zeros((len(enc), t), dtype=np.int64)
    labels = np.full((len(enc), t), -100, dtype=np.int64)
    for i, (seq, start) in enumerate(enc):
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = seq[start:]
    return tuple(torch.from_numpy(a).to(device) for a in (ids, mask, labels))  # type: ignore[return-value]


def finetune_attack(model: Any, tokenizer: Any, pairs: Sequence[dict], config: FinetuneConfig, *,
                    on_checkpoint: Callable[[int, Any], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> list[dict]:
    """Train a LoRA adapter on ``pairs`` for ``max(config.steps)`` steps; return the loss per step.

    ``model`` is wrapped by peft in place (its own weights stay frozen and unchanged); the
    adapted model is what ``on_checkpoint(step, peft_model)`` receives, in eval mode.
    """
    import torch

    from ..baselines.lora import lora_parameters, make_peft_model

    modules = [m for m in ATTACK_MODULES if any(n.endswith(f".{m}") for n, _ in model.named_modules())]
    enc = encode_pairs(tokenizer, pairs, config.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pm = make_peft_model(model, rank=config.rank, alpha=config.alpha, modules=modules, seed=config.seed)
    params = list(lora_parameters(pm).values())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    device = model.get_input_embeddings().weight.device
    rng = random.Random(config.seed)
    order: list[int] = []
    history = []
    for step in range(1, config.steps[-1] + 1):
        if len(order) < config.batch_size:
            perm = list(range(len(enc)))
            rng.shuffle(perm)
            order += perm
        take, order = order[:config.batch_size], order[config.batch_size:]
        pm.train()
        ids, mask, labels = _batch([enc[i] for i in take], pad, device)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step, "loss": float(loss.detach())})
        if progress:
            progress(1)
        if step in config.steps and on_checkpoint is not None:
            pm.eval()
            with torch.no_grad():
                on_checkpoint(step, pm)
    pm.eval()
    return history
