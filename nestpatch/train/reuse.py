"""``train --neurons PATCH``: train on the neurons and clusters of an existing patch.

Two uses share this. A new policy version trained on the neurons of the previous one differs
from it only in its deltas, so ``nestpatch diff`` reads as "what the update changed". And an
experiment that keeps the selection fixed while the seed varies separates what detection and
clustering contribute to a recipe's seed spread from what training contributes.

The patch must have been made for the loaded base model: its base description and fingerprint
are checked as ``attach`` checks them, so neurons chosen on another model are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UnsupportedError
from ..fingerprint import check_base, check_description
from ..format import read_patch
from ..format.constants import ProvenanceKey
from ..models.loading import LoadedModel, torch_neuron_vectors
from ..models.naming import parse_hf_name
from .adapter import TargetSpec

log = logging.getLogger(__name__)


def neurons_from_patch(lm: LoadedModel, path: str | Path) -> tuple[list[TargetSpec], dict, dict[int, dict[str, int]], dict]:
    """Target specs, detection stats, per-layer counts and cluster stats taken from the patch at ``path``.

    The shapes match :func:`nestpatch.train.pipeline.select_neurons`, so the rest of training is
    unchanged. Per-neuron scales of the source patch are not carried over: training learns the
    shared deltas afresh.

    Raises:
        FormatError: ``path`` is not a readable patch.
        BaseMismatchError: the patch was made for another base model.
        UnsupportedError: it touches a tensor nestpatch cannot train.
    """
    label = str(path)
    patch = read_patch(path)
    check_description(patch, lm.description, label)
    check_base(patch, lambda t: torch_neuron_vectors(lm.model, t), label)
    specs: list[TargetSpec] = []
    per_layer: dict[int, dict[str, int]] = {}
    cstats: dict[str, dict[str, Any]] = {}
    for t in patch.targets:
        try:
            ref = parse_hf_name(t.name)
        except UnsupportedError as e:
            raise UnsupportedError(f"{label}: {e}") from None
        specs.append(TargetSpec(ref, np.asarray(t.indices, np.int64), np.asarray(t.clusters, np.int64)))
        per_layer.setdefault(ref.layer, {})[ref.module] = t.n_neurons
        cstats[t.name] = {"k": t.n_clusters, "chosen_by": "patch"}
    source_det = dict(patch.provenance.get(ProvenanceKey.DETECTION) or {})
    source_det.pop("clusters", None)
    probed = int(source_det.get("of", sum(t.n_neuron_axis for t in patch.targets)))  # neurons the source's detection scored
    det = {
        "detector": source_det.get("detector", "patch"), "threshold": source_det.get("threshold"),
        "prompts": source_det.get("prompts", {"harmful": 0, "benign": 0}),
        "selected": patch.n_neurons, "of": probed, "fraction": round(patch.n_neurons / max(1, probed), 6),
        "neurons_from": {"path": Path(path).name, "content_digest": patch.content_digest,
                         "seed": patch.provenance.get(ProvenanceKey.SEED)},
    }
    log.info("reusing %d neurons in %d clusters over %d targets from %s", patch.n_neurons, patch.n_clusters,
             len(patch.targets), label)
    return specs, det, per_layer, cstats
