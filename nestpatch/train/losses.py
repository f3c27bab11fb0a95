"""Losses on the kept positions of a batch (computed in float32 whatever the autocast dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_weights(response_pos: torch.Tensor, head_tokens: int, head_weight: float) -> torch.Tensor | None:
    """Per-label weights: ``head_weight`` on the first ``head_tokens`` response tokens, 1 elsewhere.

    Why: whether a reply refuses is decided by its opening tokens ("I can't", "Sure, ..."); a loss
    averaged over a whole sentence gives the opening a small share of the gradient.
    ``None`` when weighting is off.
    """
    if head_tokens <= 0 or head_weight == 1.0:
        return None
    w = torch.ones(response_pos.shape, dtype=torch.float32, device=response_pos.device)
    return torch.where((response_pos >= 0) & (response_pos < head_tokens), w * head_weight, w)


def token_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) mean cross-entropy over positions whose label is not -100. ``logits (B, L, V)``, ``labels (B, L)``."""
    mask = labels != -100
    if not bool(mask.any()):
        return logits.sum() * 0.0
    if weights is None:
        return F.cross_entropy(logits[mask].float(), labels[mask])
    ce = F.cross_entropy(logits[mask].float(), labels[mask], reduction="none")
    w = weights[mask]
    return (ce * w).sum() / w.sum()


def token_kl(logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) mean ``KL(base || patched)`` over masked positions. ``logits, base_logits (B, L, V)``, ``mask (B, L)`` bool."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    lp = F.log_softmax(logits[mask].float(), dim=-1)  # (M, V)
    lq = F.log_softmax(base_logits[mask].float(), dim=-1)  # (M, V)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    if weights is None:
        return kl.mean()
    w = weights[mask]
    return (kl * w).sum() / w.sum()


def sequence_unlikelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-log(1 - p(labelled tokens))``: pushes down the probability of whole openings.

    Used on benign prompts followed by the opening of a refusal: it penalises the patched model for
    starting to refuse a benign request, which a retain term on the base's answers only does
    indirectly. Rows without labels are skipped.
    """
    mask = labels != -100
    rows = mask.any(-1)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    lp = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L)
    seq = (lp * mask).sum(-1)[rows]  # log p of each row's labelled opening
    return -torch.log1p(-seq.exp().clamp(max=1.0 - 1e-6)).mean()
