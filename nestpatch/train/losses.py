"""Losses on the kept positions of a batch (computed in float32 whatever the autocast dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not -100. ``logits (B, L, V)``, ``labels (B, L)``."""
    mask = labels != -100
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask])


def token_kl(logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(base || patched)`` over masked positions. ``logits, base_logits (B, L, V)``, ``mask (B, L)`` bool."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    lp = F.log_softmax(logits[mask].float(), dim=-1)  # (M, V)
    lq = F.log_softmax(base_logits[mask].float(), dim=-1)  # (M, V)
    return (lq.exp() * (lq - lp)).sum(-1).mean()
