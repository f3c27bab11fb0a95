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
from ..models.naming import MODULE_AXIS, MLPRef, hf_to_gguf


def gguf_neuron_vectors(path: str | os.PathLike, target: Target, layout=None) -> np.ndarray:
    """The GGUF's vectors of ``target``'s neurons, float32 ``(n, d)``, reading only their blocks."""
    from nestpatch.converters.gguf_layout import parse_layout
    from nestpatch.converters.gguf_region import decode_blocks, make_region, neuron_vectors, read_region

    layout = layout or parse_layout(path)
    info = layout.tensor(hf_to_gguf(target.name))
    reg = make_region(target, info)
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = read_region(fd, layout.data_start, reg)
    finally:
        os.close(fd)
    return neuron_vectors(reg, decode_blocks(raw, info.qtype, reg.bs))


def random_patch_gguf(path: str | os.PathLike, *, seed: int = 0, modules: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
                      neurons_per_target: int = 8, clusters: int = 2, scale: float = 0.5,
                      layers: Sequence[int] | None = None) -> Patch:
    """Like :func:`nestpatch.testing.pico.random_patch`, for a llama-family GGUF file.

    Each cluster's delta has about ``scale`` times the mean norm of the neuron vectors it touches.
    """
    from nestpatch.converters.gguf_layout import parse_layout

    layout = parse_layout(path)
    arch = layout.kv("general.architecture")
    n_layers = int(layout.kv(f"{arch}.block_count"))
    rng = np.random.default_rng(seed)
    targets: list[Target] = []
    for layer in (range(n_layers) if layers is None else layers):
        for mod in modules:
            ref = MLPRef(layer, mod)
            info = layout.tensor(ref.gguf_name)
            shape = (int(info.shape[0]), int(info.shape[1]))
            axis = MODULE_AXIS[mod]
            n_axis = shape[0] if axis == "row" else shape[1]
            d = shape[1] if axis == "row" else shape[0]
            n = min(neurons_per_target, n_axis)
            idx = np.sort(rng.choice(n_axis, size=n, replace=False)).astype(np.int32)
            k = max(1, min(clusters, n))
            cl = rng.permutation(np.arange(n) % k).astype(np.int32)
            t = Target(ref.hf_name, axis, shape, idx, cl, np.zeros((k, d), np.float32))
            vecs = gguf_neuron_vectors(path, t, layout)  # (n, d)
            typical = float(np.linalg.norm(vecs, axis=1).mean())
            t.deltas = (rng.standard_normal((k, d)) * (scale * typical / np.sqrt(d))).astype(np.float32)
            targets.append(t)
    ff = layout.kv(f"{arch}.feed_forward_length")
    base = {BaseKey.ARCHITECTURE: arch, BaseKey.N_LAYERS: n_layers, BaseKey.D_MODEL: int(layout.kv(f"{arch}.embedding_length")),
            BaseKey.N_FF: int(ff if np.isscalar(ff) else ff[0]), BaseKey.NAME: os.path.basename(path), BaseKey.REVISION: "",
            BaseKey.FINGERPRINT: fingerprint_info()}
    patch = Patch(targets=targets, base=base, policy={"name": "random-gguf", "version": "0"})
    attach_sketches(patch, lambda t: gguf_neuron_vectors(path, t, layout))
    return patch
