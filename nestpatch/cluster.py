"""Group the selected neurons of each MLP module by their activation profiles.

NeST gives every cluster one shared update, so neurons that react alike to the probe prompts
should share it. A neuron's feature is its vector of pooled activations over the probe prompts,
standardized per neuron (so the distance between two neurons is a correlation distance: what
matters is *which* prompts move them, not by how much). k-means (scikit-learn) with ``k`` chosen per
module by the best silhouette score in ``[k_min, k_max]``; a fixed ``k`` overrides the search.
A module with fewer than three kept neurons gets one cluster (silhouette needs ``2 <= k < n``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)


@dataclass
class ClusterResult:
    """Cluster id per neuron (``(n,)`` int32, ids in order of first appearance) and how k was chosen."""

    labels: np.ndarray
    k: int
    silhouette: float  # NaN when k was not searched or could not be scored
    chosen_by: str  # "silhouette", "fixed", "single"


def standardize_profiles(profiles: np.ndarray) -> np.ndarray:
    """``(N_prompts, n)`` activations -> ``(n, N_prompts)`` features, each row mean 0 and std 1."""
    f = np.asarray(profiles, dtype=np.float64).T  # (n, N)
    f = f - f.mean(1, keepdims=True)
    sd = f.std(1, keepdims=True)
    return f / np.where(sd > 1e-12, sd, 1.0)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster ids in order of first appearance, so the output does not depend on k-means' numbering."""
    order = {}
    for lab in labels.tolist():
        order.setdefault(lab, len(order))
    return np.array([order[lab] for lab in labels.tolist()], dtype=np.int32)


def _kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on duplicate points: the labels are still valid
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def cluster_neurons(profiles: np.ndarray, *, k: int | None = None, k_min: int = 2, k_max: int = 8, seed: int = 0) -> ClusterResult:
    """Cluster the neurons whose pooled activations are the columns of ``profiles`` ``(N_prompts, n)``.

    Args:
        k: fixed number of clusters (capped at n); ``None`` searches ``[k_min, k_max]`` by silhouette.
    """
    from sklearn.metrics import silhouette_score

    n = int(profiles.shape[1])
    if n == 0:
        raise InputError("cannot cluster zero neurons")
    if k is not None:
        if k < 1:
            raise InputError(f"--clusters must be at least 1, got {k}")
        kk = min(k, n)
        if kk == 1:
            return ClusterResult(np.zeros(n, np.int32), 1, float("nan"), "fixed")
        labels = _kmeans(standardize_profiles(profiles), kk, seed)
        return ClusterResult(_relabel(labels), int(len(set(labels.tolist()))), float("nan"), "fixed")
    if k_min < 2 or k_max < k_min:
        raise InputError(f"cluster bounds must satisfy 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    hi = min(k_max, n - 1)
    if n < 3 or hi < k_min:
        return ClusterResult(np.zeros(n, np.int32), 1, float("nan"), "single")
    feats = standardize_profiles(profiles)
    if np.unique(np.round(feats, 9), axis=0).shape[0] < 2:  # all neurons alike: one cluster
        return ClusterResult(np.zeros(n, np.int32), 1, float("nan"), "single")
    best: tuple[float, int, np.ndarray] | None = None
    for kk in range(k_min, hi + 1):
        labels = _kmeans(feats, kk, seed)
        if len(set(labels.tolist())) < 2:
            continue
        s = float(silhouette_score(feats, labels))
        if best is None or s > best[0] + 1e-12:
            best = (s, kk, labels)
    if best is None:
        return ClusterResult(np.zeros(n, np.int32), 1, float("nan"), "single")
    labels = _relabel(best[2])
    return ClusterResult(labels, int(labels.max()) + 1, best[0], "silhouette")


def cluster_modules(profiles: dict[str, np.ndarray], *, k: int | None = None, k_min: int = 2, k_max: int = 8,
                    seed: int = 0, names: Sequence[str] | None = None) -> dict[str, ClusterResult]:
    """:func:`cluster_neurons` for every module with at least one kept neuron."""
    out = {}
    for name in names if names is not None else profiles:
        p = profiles[name]
        if p.shape[1] == 0:
            continue
        out[name] = cluster_neurons(p, k=k, k_min=k_min, k_max=k_max, seed=seed)
    return out
