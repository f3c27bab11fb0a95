"""Round trips of the .nestpatch format on hand-built patches."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from nestpatch.errors import FormatError
from nestpatch.format import Patch, Target, read_patch, write_patch


def make_patch(rng: np.random.Generator, dtype: str = "F32", scales: bool = False) -> Patch:
    t1 = Target(
        name="model.layers.0.mlp.up_proj.weight", axis="row", shape=(32, 16),
        indices=np.array([1, 5, 9], np.int32), clusters=np.array([0, 1, 0], np.int32),
        deltas=rng.standard_normal((2, 16)).astype(np.float32),
        scales=rng.standard_normal(3).astype(np.float32) if scales else None,
        base_sketch=rng.standard_normal((3, 9)).astype(np.float32), delta_dtype=dtype,
    )
    t2 = Target(
        name="model.layers.1.mlp.down_proj.weight", axis="col", shape=(16, 32),
        indices=np.array([0, 31], np.int32), clusters=np.array([0, 0], np.int32),
        deltas=rng.standard_normal((1, 16)).astype(np.float32), delta_dtype=dtype,
    )
    return Patch(targets=[t1, t2], base={"architecture": "llama", "d_model": 16, "n_ff": 32, "n_layers": 2},
                 policy={"name": "test", "version": "1"})


@pytest.mark.parametrize("dtype,tol", [("F32", 0.0), ("F16", 1e-3), ("BF16", 1e-2)])
@pytest.mark.parametrize("scales", [False, True])
def test_roundtrip_values(tmp_path, dtype, tol, scales):
    p = make_patch(np.random.default_rng(0), dtype, scales)
    path = write_patch(p, tmp_path / "a.nestpatch")
    q = read_patch(path)
    assert [t.name for t in q.targets] == [t.name for t in p.targets]
    for a, b in zip(p.targets, q.targets):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.clusters, b.clusters)
        np.testing.assert_allclose(b.deltas, a.deltas, rtol=tol, atol=tol)
        np.testing.assert_allclose(b.dense_update(), a.dense_update(), rtol=4 * tol + 1e-7, atol=4 * tol + 1e-7)
    assert q.policy == {"name": "test", "version": "1"}
    assert q.content_digest and q.content_digest.startswith("sha256:")


def test_file_is_plain_safetensors(tmp_path):
    p = make_patch(np.random.default_rng(1))
    path = write_patch(p, tmp_path / "a.nestpatch")
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        assert "model.layers.0.mlp.up_proj.weight/deltas" in keys
        np.testing.assert_array_equal(f.get_tensor("model.layers.0.mlp.up_proj.weight/indices"), [1, 5, 9])
        assert f.metadata()["format"] == "nestpatch"


def test_lora_factors_are_exact(tmp_path):
    p = make_patch(np.random.default_rng(2), scales=True)
    for t in p.targets:
        b, a = t.lora_factors()
        assert b.shape == (t.shape[0], t.n_clusters) and a.shape == (t.n_clusters, t.shape[1])
        np.testing.assert_allclose(b @ a, t.dense_update(), rtol=1e-6, atol=1e-6)


def test_digest_detects_tensor_change(tmp_path):
    p = make_patch(np.random.default_rng(3))
    path = write_patch(p, tmp_path / "a.nestpatch")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte: inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="digest|NaN|cluster|indices"):
        read_patch(path)


def test_invalid_patch_is_not_written(tmp_path):
    p = make_patch(np.random.default_rng(4))
    p.targets[0].indices = np.array([5, 1, 9], np.int32)
    out = tmp_path / "bad.nestpatch"
    with pytest.raises(FormatError, match="sorted"):
        write_patch(p, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
