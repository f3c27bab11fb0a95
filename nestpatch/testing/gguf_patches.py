"""Realistic random patches for a GGUF model, without torch and without loading the model.

Why: benchmarks and tests on real or generated multi-GB GGUF files need a patch whose base
sketches match the file; reading only the touched rows/blocks keeps that cheap at any size.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..fingerprint import attach_sketches, fingerprint_info
from ..format.constants import BaseKey
from ..format.patch import Patch, Target
from ..models.files import GGUFModel
from ..models.naming import MODULE_AXIS, MLPRef


def random_patch_gguf(path: str | os.PathLike, *, seed: int = 0, modules: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
                      neurons_per_target: int = 8, clusters: int = 2, scale: float = 0.5,
                      layers: Sequence[int] | None = None) -> Patch:
    """Like :func:`nestpatch.testing.pico.random_patch`, for a llama-family GGUF file.

    Each cluster's delta has about ``scale`` times the mean norm of the neuron vectors it touches.
    """
    with GGUFModel(path) as model:
        return _random_patch(model, seed=seed, modules=modules, neurons_per_target=neurons_per_target, clusters=clusters,
                             scale=scale, layers=layers)


def _random_patch(model: GGUFModel, *, seed: int, modules: Sequence[str], neurons_per_target: int, clusters: int,
                  scale: float, layers: Sequence[int] | None) -> Patch:
    desc = model.describe()
    n_layers = int(desc[BaseKey.N_LAYERS])
    rng = np.random.default_rng(seed)
    targets: list[Target] = []
    for layer in (range(n_layers) if layers is None else layers):
        for mod in modules:
            ref = MLPRef(layer, mod)
            info = model.tensors[ref.gguf_name]
            shape = (int(info.shape[0]), int(info.shape[1]))
            axis = MODULE_AXIS[mod]
            n_axis = shape[0] if axis == "row" else shape[1]
            d = shape[1] if axis == "row" else shape[0]
            n = min(neurons_per_target, n_axis)
            idx = np.sort(rng.choice(n_axis, size=n, replace=False)).astype(np.int32)
            k = max(1, min(clusters, n))
            cl = rng.permutation(np.arange(n) % k).astype(np.int32)
            t = Target(ref.hf_name, axis, shape, idx, cl, np.zeros((k, d), np.float32))
            vecs = model.neuron_vectors(t)  # (n, d)
            typical = float(np.linalg.norm(vecs, axis=1).mean())
            t.deltas = (rng.standard_normal((k, d)) * (scale * typical / np.sqrt(d))).astype(np.float32)
            targets.append(t)
    base = {**desc, BaseKey.NAME: model.path.name, BaseKey.REVISION: "", BaseKey.FINGERPRINT: fingerprint_info()}
    patch = Patch(targets=targets, base=base, policy={"name": "random-gguf", "version": "0"})
    attach_sketches(patch, model.neuron_vectors)
    return patch
