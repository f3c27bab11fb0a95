"""Greedy chat generation on a live transformers model, with a patch switchable in place.

The torch counterpart of :class:`nestpatch.runtime.llama_session.LlamaSession`: same prompt
rendering (the tokenizer's chat template), same decoding rule (greedy), plus batched
generation with left padding for evaluation, and streaming for chat. The patch is attached
with :func:`nestpatch.runtime.attach.attach`, so switching it off restores the weights exactly.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from nestpatch.format.patch import Patch

from .attach import AttachHandle, attach
from .llama_session import Generation, Messages, PromptFormatting

log = logging.getLogger(__name__)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a reply (the tokenizer's eos and the model's generation config's)."""
    ids: list[int] = []
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    return ids


class TorchSession(PromptFormatting):
    """A transformers causal LM and its tokenizer, optionally with a patch attached.

    Args:
        model, tokenizer: a loaded model (e.g. from :func:`nestpatch.models.loading.load_model`).
        patch: attached now (fingerprint checked unless ``verify_base`` is False).
    """

    def __init__(self, model: Any, tokenizer: Any, patch: Patch | None = None, *, verify_base: bool = True,
                 require_signature: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.patch = patch
        self._verify = verify_base
        self._handle: AttachHandle | None = None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if patch is not None:
            self._handle = attach(model, patch, verify_base=verify_base, require_signature=require_signature)
        self.eos = eos_ids(model, tokenizer)

    # ---------------------------------------------------------------- patch

    @property
    def has_patch(self) -> bool:
        return self.patch is not None

    @property
    def patch_enabled(self) -> bool:
        return self._handle is not None and self._handle.attached

    def set_patch_enabled(self, on: bool) -> None:
        """Attach or detach the patch in place (exact restore on detach)."""
        if self.patch is None:
            raise RuntimeError("this session has no patch")
        if on and not self.patch_enabled:
            self._handle = attach(self.model, self.patch, verify_base=False)  # checked when opened
        elif not on and self.patch_enabled:
            assert self._handle is not None
            self._handle.detach()

    # ---------------------------------------------------------------- prompts

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or None

    def _apply_template(self, template: str, messages: Messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a formatted prompt (the template already holds any special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---------------------------------------------------------------- generation

    def _generation_config(self, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos)

    def _cut(self, ids: Sequence[int]) -> tuple[list[int], str]:
        out: list[int] = []
        finish = "length"
        for i in ids:
            if int(i) in self.eos:
                finish = "stop"
                break
            out.append(int(i))
        return out, finish

    def generate_batch(self, texts: Sequence[str], *, max_new_tokens: int = 256) -> list[Generation]:
        """Greedy replies to formatted prompts, as one left-padded batch.

        Each :class:`Generation` gets the batch's wall time divided by the batch size.
        """
        import torch

        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # generation continues from the right edge of every row
        try:
            enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**enc, generation_config=self._generation_config(max_new_tokens))
        secs = (time.perf_counter() - t0) / max(1, len(texts))
        width = enc["input_ids"].shape[1]
        n_prompt = enc["attention_mask"].sum(dim=1).tolist()
        gens = []
        for row, text, n in zip(out[:, width:].tolist(), texts, n_prompt):
            ids, finish = self._cut(row)
            gens.append(Generation(text=tok.decode(ids, skip_special_tokens=True), tokens=ids, n_prompt_tokens=int(n),
                                   seconds=secs, finish=finish, prompt_text=text))
        return gens

    def generate(self, prompt: str | Messages, *, max_new_tokens: int = 256, system: str | None = None,
                 raw: bool = False, on_text: Callable[[str], None] | None = None) -> Generation:
        """Greedy reply to one prompt, streaming text pieces to ``on_text`` as they are decoded."""
        import torch
        from transformers.generation.streamers import TextStreamer

        text = self.prompt_text(prompt, system=system, raw=raw)
        ids = torch.tensor([self.tokenize(text)], device=next(self.model.parameters()).device)
        streamer = None
        if on_text is not None:
            class _Stream(TextStreamer):
                def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                    if piece:
                        on_text(piece)

            streamer = _Stream(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=self._generation_config(max_new_tokens), streamer=streamer)
        new, finish = self._cut(out[0, ids.shape[1]:].tolist())
        return Generation(text=self.tokenizer.decode(new, skip_special_tokens=True), tokens=new,
                          n_prompt_tokens=int(ids.shape[1]), seconds=time.perf_counter() - t0, finish=finish, prompt_text=text)

    def close(self) -> None:
        """Detach the patch (the model is the caller's and stays loaded)."""
        if self._handle is not None:
            self._handle.detach()
