"""In-memory model of a NeST patch (numpy only).

A patch is a list of :class:`Target` s. Each target is one weight matrix, named by its
Hugging Face name, whose selected neurons (rows for gate/up, columns for down) receive the
shared delta of their cluster: ``W[i, :] += scale_i * deltas[cluster_i]`` (row axis).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import AXIS_ROW


@dataclass
class Target:
    """One patched weight matrix.

    Attributes:
        name: Hugging Face weight name, e.g. ``model.layers.7.mlp.up_proj.weight``.
        axis: ``"row"`` (neuron i is row i: gate/up) or ``"col"`` (neuron i is column i: down).
        shape: full shape ``(out_features, in_features)`` of the HF weight.
        indices: sorted unique neuron indices, int32 ``(n,)``.
        clusters: cluster id of each neuron, int32 ``(n,)``, values in ``[0, K)``.
        deltas: one shared update per cluster, float32 ``(K, d)``; ``d`` is the length of a row
            (``shape[1]``) for the row axis and of a column (``shape[0]``) for the col axis.
        scales: optional per-neuron scale, float32 ``(n,)``; ``None`` means all ones.
        base_sketch: fingerprint of the base model's touched neurons, float32 ``(n, S+1)``.
        delta_dtype: dtype the deltas are stored in (``F32``, ``F16``, ``BF16``).
    """

    name: str
    axis: str
    shape: tuple[int, int]
    indices: np.ndarray
    clusters: np.ndarray
    deltas: np.ndarray
    scales: np.ndarray | None = None
    base_sketch: np.ndarray | None = None
    delta_dtype: str = "F32"

    @property
    def n_neurons(self) -> int:
        return int(self.indices.shape[0])

    @property
    def n_clusters(self) -> int:
        return int(self.deltas.shape[0])

    @property
    def vector_len(self) -> int:
        """Length of one neuron's weight vector (the delta length)."""
        return int(self.shape[1] if self.axis == AXIS_ROW else self.shape[0])

    @property
    def n_neuron_axis(self) -> int:
        """Number of neurons in the matrix (rows for row axis, columns for col axis)."""
        return int(self.shape[0] if self.axis == AXIS_ROW else self.shape[1])

    @property
    def trainable_parameters(self) -> int:
        return int(self.deltas.size + (self.scales.size if self.scales is not None else 0))

    def neuron_deltas(self) -> np.ndarray:
        """Per-neuron update vectors, float32 ``(n, d)``: ``scale_i * deltas[cluster_i]``."""
        out = np.asarray(self.deltas, dtype=np.float32)[np.asarray(self.clusters)]
        if self.scales is not None:
            out = out * np.asarray(self.scales, dtype=np.float32)[:, None]
        return out

    def dense_update(self) -> np.ndarray:
        """The full ``dW`` of the HF weight's shape (float32). For tests and small models."""
        dw = np.zeros(self.shape, dtype=np.float32)
        nd = self.neuron_deltas()
        if self.axis == AXIS_ROW:
            dw[self.indices, :] = nd
        else:
            dw[:, self.indices] = nd.T
        return dw

    def lora_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact rank-K factors ``(B, A)`` with ``dW = B @ A`` (B: out x K, A: K x in).

        Row axis: B is the (scaled) one-hot neuron-to-cluster matrix, A the deltas.
        Col axis: B is the deltas transposed, A the one-hot matrix.
        """
        k = self.n_clusters
        onehot = np.zeros((self.n_neuron_axis, k), dtype=np.float32)
        s = np.ones(self.n_neurons, np.float32) if self.scales is None else np.asarray(self.scales, np.float32)
        onehot[self.indices, self.clusters] = s
        d = np.asarray(self.deltas, dtype=np.float32)
        if self.axis == AXIS_ROW:
            return onehot, d  # (out, K), (K, in)
        return d.T.copy(), onehot.T.copy()  # (out, K), (K, in)


@dataclass
class Patch:
    """A whole patch: targets plus the metadata document (everything but the tensors)."""

    targets: list[Target]
    base: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, Any] | None = None
    #: digest recorded in the file (set by the reader; the writer recomputes it)
    content_digest: str | None = None

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def trainable_parameters(self) -> int:
        return sum(t.trainable_parameters for t in self.targets)

    @property
    def n_neurons(self) -> int:
        return sum(t.n_neurons for t in self.targets)

    @property
    def n_clusters(self) -> int:
        return sum(t.n_clusters for t in self.targets)

    def copy(self) -> "Patch":
        return copy.deepcopy(self)
