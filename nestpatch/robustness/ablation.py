"""Refusal-direction ablation (Arditi et al. 2024, "Refusal in LLMs is mediated by a single direction").

The attack an owner of the weights runs in minutes: take the difference of means of the
residual stream on harmful vs harmless prompts at the last prompt token (the end of the
assistant header, where the model decides to refuse), one candidate per layer; pick the layer
whose removal lowers the refusal score most on *validation* prompts while keeping the next-token
KL on harmless prompts under a ceiling; then orthogonalise every weight that writes to the
residual stream (token embeddings, attention ``o_proj``, MLP ``down_proj``) against it, so no
layer can write the direction again.

Choices that are ours: the refusal score is the log-odds of the first tokens of the project's
own refusal sentences (``builtin/refusals.jsonl``) at the first reply position; candidate layers
are 1 .. 0.8 L (Arditi drop the last fifth, whose directions act on the output vocabulary);
a tied LM head is untied first, so the head keeps reading the residual stream as before and
only the writers change (the paper edits writers only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..detect import encode_prompts, left_pad
from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass
class AblationResult:
    """The chosen direction and how every candidate layer scored on the validation prompts."""

    layer: int
    direction: np.ndarray  # (d_model,) float32, unit norm
    candidates: list[dict] = field(default_factory=list)  # {"layer", "refusal_score", "kl"}
    baseline_refusal_score: float = float("nan")

    def info(self) -> dict:
        return {"layer": self.layer, "baseline_refusal_score": round(self.baseline_refusal_score, 4),
                "candidates": self.candidates}


def _n_layers(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


def _batches(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_length: int):
    import torch

    enc = encode_prompts(tokenizer, prompts, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.get_input_embeddings().weight.device
    for b in range(0, len(enc), batch_size):
        ids, mask = left_pad([e[0] for e in enc[b:b + batch_size]], pad)
        ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        yield ids_t, mask_t, (mask_t.cumsum(-1) - 1).clamp(min=0)


def last_token_residuals(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16,
                         max_length: int = 256) -> np.ndarray:
    """Residual stream entering each layer at the last prompt token: float32 ``(L, N, d_model)``.

    ``hidden_states[l]`` is the input of layer ``l`` (``[0]`` the embeddings); the last entry is
    after the final norm and is not a residual, so it is left out.
    """
    import torch

    n_layers = _n_layers(model)
    out: list[np.ndarray] = []
    with torch.no_grad():
        for ids, mask, pos in _batches(model, tokenizer, prompts, batch_size, max_length):
            hs = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False).hidden_states
            out.append(torch.stack([h[:, -1, :].float() for h in hs[:n_layers]]).cpu().numpy())  # (L, B, d)
    return np.concatenate(out, axis=1)


def difference_of_means(harmful: np.ndarray, harmless: np.ndarray) -> np.ndarray:
    """Per layer, the unit vector ``mean(harmful) - mean(harmless)``: ``(L, d_model)``."""
    diff = harmful.mean(axis=1) - harmless.mean(axis=1)  # (L, d)
    return (diff / np.maximum(np.linalg.norm(diff, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def refusal_token_ids(tokenizer: Any, sentences: Sequence[str] | None = None) -> list[int]:
    """First token of each refusal sentence (default: the project's built-in refusals)."""
    if sentences is None:
        from ..data.sources import load_refusals

        sentences = [r["refusal"] for r in load_refusals()]
    ids: list[int] = []
    for s in sentences:
        toks = tokenizer(s.strip(), add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(int(toks[0]))
    if not ids:
        raise InputError("no refusal sentences to take refusal tokens from")
    return ids


class _Ablate:
    """Forward hooks that remove ``direction`` from every write to the residual stream.

    Equivalent to :func:`orthogonalize` (same writers: embeddings, ``o_proj``, ``down_proj``)
    without copying the weights, so each candidate layer costs one forward pass.
    """

    def __init__(self, model: Any, direction: Any) -> None:
        self.model, self.r = model, direction
        self.handles: list[Any] = []

    def _hook(self, _m: Any, _a: Any, y: Any) -> Any:
        r = self.r.to(y.dtype)
        return y - (y @ r)[..., None] * r

    def __enter__(self) -> "_Ablate":
        for mod in residual_writers(self.model):
            self.handles.append(mod.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def residual_writers(model: Any) -> list[Any]:
    """The modules whose outputs are added to the residual stream: embeddings, then per layer o_proj, down_proj."""
    mods = [model.get_input_embeddings()]
    for layer in model.model.layers:
        mods.append(layer.self_attn.o_proj)
        mods.append(layer.mlp.down_proj)
    return mods


def next_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16,
                        max_length: int = 256) -> np.ndarray:
    """Log-probabilities of the first reply token: float32 ``(N, vocab)``."""
    import torch

    out = []
    with torch.no_grad():
        for ids, mask, pos in _batches(model, tokenizer, prompts, batch_size, max_length):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1, :]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu().numpy())
    return np.concatenate(out, axis=0)


def refusal_score(logprobs: np.ndarray, refusal_ids: Sequence[int]) -> float:
    """Mean log-odds of starting the reply with a refusal token."""
    p = np.exp(logprobs[:, list(refusal_ids)]).sum(axis=1).clip(1e-9, 1 - 1e-9)
    return float(np.mean(np.log(p) - np.log1p(-p)))


def mean_kl(ref: np.ndarray, new: np.ndarray) -> float:
    """Mean ``KL(ref || new)`` of next-token distributions given as log-probabilities ``(N, V)``."""
    return float(np.mean(np.sum(np.exp(ref) * (ref - new), axis=1)))


def choose_direction(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                     val_harmful: Sequence[str], val_harmless: Sequence[str], *, kl_max: float = 0.1,
                     max_layer_fraction: float = 0.8, batch_size: int = 16, max_length: int = 256,
                     refusal_ids: Sequence[int] | None = None,
                     progress: Callable[[int], None] | None = None) -> AblationResult:
    """Directions from the training prompts, the layer chosen on the validation prompts.

    The chosen layer has the lowest refusal score on ``val_harmful`` among candidates whose KL
    on ``val_harmless`` stays under ``kl_max``; when none does, the one with the lowest KL.
    """
    import torch

    if not (harmful and harmless and val_harmful and val_harmless):
        raise InputError("refusal-direction ablation needs harmful, harmless and validation prompts")
    rid = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(tokenizer)
    dirs = difference_of_means(last_token_residuals(model, tokenizer, harmful, batch_size=batch_size, max_length=max_length),
                               last_token_residuals(model, tokenizer, harmless, batch_size=batch_size, max_length=max_length))
    n_layers = dirs.shape[0]
    top = min(n_layers, max(2, int(max_layer_fraction * n_layers)))
    # layer 0's input is the token embedding: the last prompt token is the same for every prompt
    layers = [layer for layer in range(1, top) if np.isfinite(dirs[layer]).all() and np.linalg.norm(dirs[layer]) > 0.5]
    if not layers:
        raise InputError("no layer gives a refusal direction (harmful and harmless prompts have the same mean activations)")
    ref_h = next_token_logprobs(model, tokenizer, val_harmful, batch_size=batch_size, max_length=max_length)
    ref_b = next_token_logprobs(model, tokenizer, val_harmless, batch_size=batch_size, max_length=max_length)
    base_score = refusal_score(ref_h, rid)
    device = model.get_input_embeddings().weight.device
    cands = []
    for layer in layers:
        r = torch.from_numpy(dirs[layer]).to(device)
        with _Ablate(model, r):
            h = next_token_logprobs(model, tokenizer, val_harmful, batch_size=batch_size, max_length=max_length)
            b = next_token_logprobs(model, tokenizer, val_harmless, batch_size=batch_size, max_length=max_length)
        cands.append({"layer": layer, "refusal_score": round(refusal_score(h, rid), 4), "kl": round(mean_kl(ref_b, b), 5)})
        if progress:
            progress(1)
    ok = [c for c in cands if c["kl"] <= kl_max]
    best = min(ok, key=lambda c: c["refusal_score"]) if ok else min(cands, key=lambda c: c["kl"])
    if not ok:
        log.warning("no candidate layer kept the KL under %g; using the lowest-KL layer %d", kl_max, best["layer"])
    log.info("refusal direction: layer %d (refusal score %.3f -> %.3f, KL %.4f)", best["layer"], base_score,
             best["refusal_score"], best["kl"])
    return AblationResult(best["layer"], dirs[best["layer"]], cands, base_score)


def untie_lm_head(model: Any) -> None:
    """Give the LM head its own copy of a tied embedding matrix (so editing writers leaves the reader alone)."""
    import torch

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def orthogonalize(model: Any, direction: np.ndarray) -> list[str]:
    """Project ``direction`` out of every residual-writing weight, in place; return their names.

    ``W <- W - r r^T W`` for ``o_proj`` / ``down_proj`` (``(d_model, in)``, they write ``W x``) and
    ``E <- E - (E r) r^T`` for the embedding rows; biases of those modules lose their component too.
    Arithmetic in float32, cast back to the weight's dtype.
    """
    import torch

    untie_lm_head(model)
    r64 = np.asarray(direction, dtype=np.float64)
    r64 = r64 / np.linalg.norm(r64)
    names = []
    with torch.no_grad():
        emb = model.get_input_embeddings()
        r = torch.from_numpy(r64.astype(np.float32)).to(emb.weight.device)
        e = emb.weight.float()  # (V, d)
        emb.weight.copy_((e - (e @ r)[:, None] * r[None, :]).to(emb.weight.dtype))
        names.append("embed_tokens")
        for i, layer in enumerate(model.model.layers):
            for label, mod in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj)):
                w = mod.weight.float()  # (d_model, in)
                mod.weight.copy_((w - r[:, None] * (r @ w)[None, :]).to(mod.weight.dtype))
                if getattr(mod, "bias", None) is not None:
                    b = mod.bias.float()
                    mod.bias.copy_((b - (b @ r) * r).to(mod.bias.dtype))
                names.append(f"layers.{i}.{label}")
    return names


def residual_projections(model: Any, direction: np.ndarray) -> dict[str, float]:
    """Largest |component along ``direction``| of each residual-writing weight (0 after :func:`orthogonalize`)."""
    import torch

    r = torch.from_numpy(np.asarray(direction, dtype=np.float32) / np.linalg.norm(direction))
    out = {}
    with torch.no_grad():
        out["embed_tokens"] = float((model.get_input_embeddings().weight.float().cpu() @ r).abs().max())
        for i, layer in enumerate(model.model.layers):
            out[f"layers.{i}.self_attn.o_proj"] = float((r @ layer.self_attn.o_proj.weight.float().cpu()).abs().max())
            out[f"layers.{i}.mlp.down_proj"] = float((r @ layer.mlp.down_proj.weight.float().cpu()).abs().max())
    return out
