"""Clustering of kept neurons by their standardized activation profiles (k-means, k by silhouette)."""

from __future__ import annotations

import numpy as np
import pytest

from nestpatch.cluster import cluster_modules, cluster_neurons, standardize_profiles
from nestpatch.errors import InputError


def _groups(sizes: list[int], n_prompts: int = 60, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Profiles ``(n_prompts, n)`` of neurons in groups; each group reacts to its own block of prompts.

    Neurons are interleaved (group of neuron j is truth[j]) and scaled differently, so only the
    *shape* of a profile tells the groups apart.
    """
    rng = np.random.default_rng(seed)
    g = len(sizes)
    truth = np.concatenate([[i] * s for i, s in enumerate(sizes)])
    truth = truth[rng.permutation(len(truth))]
    block = n_prompts // g
    cols = []
    for grp in truth:
        base = np.zeros(n_prompts)
        base[grp * block:(grp + 1) * block] = 1.0
        cols.append((base + noise * rng.normal(size=n_prompts)) * (1 + 5 * rng.random()) + 10 * rng.normal())
    return np.stack(cols, axis=1).astype(np.float32), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_standardized_features_are_zero_mean_unit_std() -> None:
    prof, _ = _groups([4, 4])
    f = standardize_profiles(prof)
    assert f.shape == (8, 60)
    np.testing.assert_allclose(f.mean(1), 0, atol=1e-9)
    np.testing.assert_allclose(f.std(1), 1, atol=1e-9)


@pytest.mark.parametrize("sizes", [[6, 5], [5, 4, 6]])
def test_silhouette_recovers_the_groups(sizes: list[int]) -> None:
    prof, truth = _groups(sizes)
    res = cluster_neurons(prof, k_min=2, k_max=6, seed=0)
    assert res.k == len(sizes) and res.chosen_by == "silhouette"
    assert _same_partition(res.labels, truth)
    assert res.silhouette > 0.5
    assert res.labels[0] == 0 and res.labels.dtype == np.int32  # ids in order of first appearance


def test_scale_and_offset_of_a_neuron_do_not_matter() -> None:
    prof, _ = _groups([5, 5], seed=3)
    a = cluster_neurons(prof, seed=0).labels
    scaled = prof * np.linspace(0.1, 50, prof.shape[1])[None, :] - 7.0
    np.testing.assert_array_equal(a, cluster_neurons(scaled, seed=0).labels)


def test_fixed_k_and_caps() -> None:
    prof, _ = _groups([4, 4, 4])
    res = cluster_neurons(prof, k=2, seed=0)
    assert res.k == 2 and res.chosen_by == "fixed" and set(res.labels.tolist()) == {0, 1}
    assert cluster_neurons(prof[:, :2], k=5).k == 2  # capped at n
    one = cluster_neurons(prof, k=1)
    assert one.k == 1 and (one.labels == 0).all()


def test_few_or_identical_neurons_make_one_cluster() -> None:
    prof, _ = _groups([2])
    assert cluster_neurons(prof[:, :1]).k == 1
    assert cluster_neurons(prof[:, :2]).chosen_by == "single"
    same = np.repeat(prof[:, :1], 5, axis=1) * np.arange(1, 6)[None, :]  # the same shape, scaled
    assert cluster_neurons(same).k == 1


def test_deterministic_under_seed() -> None:
    prof, _ = _groups([7, 6, 5], noise=1.0, seed=4)
    a = cluster_neurons(prof, seed=11)
    b = cluster_neurons(prof, seed=11)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.silhouette == b.silhouette


def test_cluster_modules_skips_empty_modules() -> None:
    prof, _ = _groups([4, 4])
    out = cluster_modules({"a": prof, "b": prof[:, :0]}, seed=0)
    assert list(out) == ["a"] and out["a"].k == 2


def test_bad_bounds() -> None:
    prof, _ = _groups([4, 4])
    with pytest.raises(InputError, match="k_min"):
        cluster_neurons(prof, k_min=1)
    with pytest.raises(InputError, match="at least 1"):
        cluster_neurons(prof, k=0)
    with pytest.raises(InputError, match="zero neurons"):
        cluster_neurons(prof[:, :0])
