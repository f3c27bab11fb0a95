"""Neuron pruning (NeuroStrike): zero the safety neurons our own detector finds.

NeuroStrike (by the NeST authors) locates safety neurons by activation probing, the very
step NeST uses to decide what to patch, and prunes them. Against a patched model the attacker
also holds the patch file, so the patched neurons go first; then the neurons the detector
selects (z-score > threshold in their module), then the rest by detector score.

A neuron is one MLP channel ``i`` of layer ``l``; pruning zeroes row ``i`` of ``gate_proj``
and of ``up_proj``, so its value ``act(gate) * up`` is exactly 0 and ``down_proj`` never sees it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..detect import detect, select
from ..format.patch import Patch

log = logging.getLogger(__name__)

PRUNED_MODULES = ("gate_proj", "up_proj")
_LAYER = re.compile(r"layers\.(\d+)\.mlp\.")


@dataclass
class NeuronRanking:
    """Neurons ``(layer, index)`` in pruning order, with where each came from."""

    neurons: list[tuple[int, int]]
    tiers: list[str]  # "patched", "detected" or "scored", per neuron
    scores: list[float]
    info: dict = field(default_factory=dict)

    def top(self, k: int) -> list[tuple[int, int]]:
        return self.neurons[:k]


def patched_neurons(patch: Patch | None) -> set[tuple[int, int]]:
    """``(layer, channel)`` of every MLP neuron a patch touches (rows of gate/up, columns of down)."""
    out: set[tuple[int, int]] = set()
    if patch is None:
        return out
    for t in patch.targets:
        m = _LAYER.search(t.name)
        if m:
            out.update((int(m.group(1)), int(i)) for i in np.asarray(t.indices))
    return out


def rank_neurons(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], *, patch: Patch | None = None,
                 threshold: float = 3.0, batch_size: int = 16, max_length: int = 256) -> NeuronRanking:
    """Score every gate/up neuron with :func:`nestpatch.detect.detect` (mean-difference detector) and order them.

    A neuron's score is the larger of its gate and up scores; ``detected`` means the detector's
    own selection (z-score > ``threshold`` in its module) kept it in either module.
    """
    det = detect(model, tokenizer, harmful, benign, modules=PRUNED_MODULES, detector="mean_diff", threshold=-1e30,
                 min_weight=-1e30, batch_size=batch_size, max_length=max_length)
    score: dict[tuple[int, int], float] = {}
    detected: set[tuple[int, int]] = set()
    for ms in det.modules:  # every neuron is kept at this threshold: ms.scores covers the module
        full = np.zeros(ms.n_neurons, dtype=np.float64)
        full[ms.indices] = ms.scores
        for i in select(full, threshold):
            detected.add((ms.ref.layer, int(i)))
        for i, s in zip(ms.indices.tolist(), ms.scores.tolist()):
            key = (ms.ref.layer, int(i))
            score[key] = max(score.get(key, -np.inf), float(s))
    patched = patched_neurons(patch) & set(score)

    def tier(n: tuple[int, int]) -> int:
        return 0 if n in patched else (1 if n in detected else 2)

    order = sorted(score, key=lambda n: (tier(n), -score[n], n))
    names = ("patched", "detected", "scored")
    rk = NeuronRanking(order, [names[tier(n)] for n in order], [score[n] for n in order],
                       {"patched": len(patched), "detected": len(detected - patched), "total": len(order),
                        "threshold": threshold, "prompts": {"harmful": len(harmful), "benign": len(benign)}})
    log.info("pruning order: %d patched, %d detected, %d neurons in all", len(patched), len(detected - patched), len(order))
    return rk


def prune(model: Any, neurons: Sequence[tuple[int, int]]) -> int:
    """Zero rows ``i`` of ``gate_proj`` and ``up_proj`` in layer ``l`` for each ``(l, i)``, in place; return the count."""
    import torch

    by_layer: dict[int, list[int]] = {}
    for layer, i in neurons:
        by_layer.setdefault(int(layer), []).append(int(i))
    with torch.no_grad():
        for layer, idx in by_layer.items():
            mlp = model.model.layers[layer].mlp
            rows = torch.as_tensor(sorted(set(idx)), dtype=torch.long, device=mlp.gate_proj.weight.device)
            for name in PRUNED_MODULES:
                getattr(mlp, name).weight.index_fill_(0, rows, 0.0)
    return sum(len(set(v)) for v in by_layer.values())
