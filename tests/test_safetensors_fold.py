"""Folding patches into real safetensors models (pico Llama), and reverting them byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nestpatch.converters.provenance import FoldKey
from nestpatch.converters.safetensors_fold import SIDECAR_NAME, fold_safetensors, revert_safetensors, sidecar_path
from nestpatch.errors import BaseMismatchError, FormatError, InputError, UnsupportedError
from nestpatch.format import compute_digest
from nestpatch.testing import write_hf_dir

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def load_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def no_strays(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def hf_dirs(pico_model, tmp_path_factory):
    """Factory of pico HF dirs per (dtype, sharded), built once per module."""
    root = tmp_path_factory.mktemp("st_models")
    cache: dict[tuple[str, bool], Path] = {}

    def make(dtype: str = "float32", sharded: bool = False) -> Path:
        key = (dtype, sharded)
        if key not in cache:
            cache[key] = write_hf_dir(pico_model, root / f"{dtype}_{'sharded' if sharded else 'single'}", dtype=dtype,
                                      max_shard_size="100KB" if sharded else None)
        return cache[key]

    return make


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fold_equals_float_reference_and_reverts_exactly(hf_dirs, pico_patch, tmp_path, dtype, sharded):
    src = hf_dirs(dtype, sharded)
    before = tree_hashes(src)
    out = tmp_path / "folded"
    report = fold_safetensors(src, pico_patch, out, progress=False)
    assert tree_hashes(src) == before  # the input is never modified

    # every touched tensor equals the float32 reference cast back to the stored dtype, bit for bit
    orig, folded = load_tensors(src), load_tensors(out)
    assert set(orig) == set(folded)
    touched = {t.name for t in pico_patch.targets}
    for t in pico_patch.targets:
        ref = (orig[t.name].float() + torch.from_numpy(t.dense_update())).to(TORCH_DTYPE[dtype])
        assert folded[t.name].dtype == TORCH_DTYPE[dtype]
        assert torch.equal(folded[t.name], ref), t.name
    for name in set(orig) - touched:
        assert torch.equal(orig[name], folded[name]), name

    # report: retention ~1 (exact in F32, rounding only in F16/BF16), sizes, types kept
    short = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    assert [t.type_out for t in report.targets] == [short] * len(pico_patch.targets)
    tol = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    assert all(abs(t.retention - 1) < tol and t.rel_error < 3 * tol for t in report.targets)
    assert report.bytes_out > report.bytes_in  # provenance header + sidecar

    # layout: same files plus the sidecar; untouched shards hard-linked; index unchanged and valid
    files = {p.name for p in out.iterdir()}
    assert files == {p.name for p in src.iterdir()} | {SIDECAR_NAME}
    weight_files = sorted(p.name for p in src.glob("*.safetensors"))
    rewritten = set()
    for f in weight_files:
        with safe_open(str(out / f), framework="pt") as st:
            meta = st.metadata() or {}
            hits = set(st.keys()) & touched
        if hits:
            rewritten.add(f)
            assert meta["format"] == "pt"  # existing metadata kept
            assert meta[FoldKey.PATCH_DIGEST] == compute_digest(pico_patch)
            assert set(json.loads(meta[FoldKey.TARGETS])) == touched  # the whole fold, in every shard
            assert meta[FoldKey.POLICY_NAME] == pico_patch.policy["name"]
            assert meta[FoldKey.SOURCE_SHA256] == before[f]
            assert os.stat(out / f).st_ino != os.stat(src / f).st_ino
        else:
            assert FoldKey.PATCH_DIGEST not in meta
            assert os.stat(out / f).st_ino == os.stat(src / f).st_ino  # hard link
    if sharded:
        assert len(weight_files) > len(rewritten) >= 2
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sha(out / "model.safetensors.index.json") == sha(src / "model.safetensors.index.json")
        for name, f in index["weight_map"].items():
            with safe_open(str(out / f), framework="pt") as st:
                assert name in st.keys()
    for name in ("config.json", "tokenizer.json"):
        assert sha(out / name) == sha(src / name)

    # revert: byte-identical to the original, file by file, no sidecar left
    back = revert_safetensors(out, tmp_path / "reverted", progress=False)
    assert tree_hashes(back) == before
    assert no_strays(tmp_path) == []


def test_folded_dir_loads_in_transformers_with_patched_logits(hf_dirs, pico_model, pico_patch, tmp_path):
    from transformers import AutoModelForCausalLM

    from nestpatch.testing.pico import apply_patch_torch

    out = tmp_path / "folded"
    fold_safetensors(hf_dirs("float32"), pico_patch, out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 2767, 314, 253, 1234]])
    with torch.no_grad():
        got = model(ids).logits
        want = apply_patch_torch(pico_model, pico_patch)(ids).logits
        base = pico_model(ids).logits
    assert (want - base).abs().max() > 0.05  # the patch does something visible
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lone_file_fold_and_revert(hf_dirs, pico_patch, tmp_path):
    src = hf_dirs("bfloat16") / "model.safetensors"
    out = tmp_path / "patched.safetensors"
    report = fold_safetensors(src, pico_patch, out, progress=False)
    assert out.is_file() and sidecar_path(out).is_file()
    assert report.model_out == str(out)
    with safe_open(str(out), framework="pt") as st:
        assert st.metadata()[FoldKey.PATCH_DIGEST] == compute_digest(pico_patch)
    back = revert_safetensors(out, tmp_path / "orig.safetensors", progress=False)
    assert sha(back) == sha(src)
    # an output directory receives the file under its own name
    d = tmp_path / "d"
    d.mkdir()
    fold_safetensors(src, pico_patch, d, progress=False)
    assert (d / "model.safetensors").is_file()


def test_wrong_base_is_refused_before_anything_is_written(pico_model_other, pico_patch, tmp_path):
    other = write_hf_dir(pico_model_other, tmp_path / "other", tokenizer=False)
    out = tmp_path / "out"
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        fold_safetensors(other, pico_patch, out, progress=False)
    assert not out.exists() and no_strays(tmp_path) == []


def test_shape_and_name_mismatches(hf_dirs, pico_patch, tmp_path):
    src = hf_dirs("float32")
    p = pico_patch.copy()
    p.base = {k: v for k, v in p.base.items() if k not in ("n_ff", "d_model")}
    t = p.targets[0]
    t.shape = (t.shape[0] * 2, t.shape[1])
    with pytest.raises(BaseMismatchError, match=r"has shape \[256, 64\], the patch expects \[512, 64\]"):
        fold_safetensors(src, p, tmp_path / "a", progress=False)
    p = pico_patch.copy()
    p.base = {k: v for k, v in p.base.items() if k != "n_layers"}
    p.targets[0].name = "model.layers.7.mlp.up_proj.weight"
    with pytest.raises(BaseMismatchError, match="has no tensor model.layers.7.mlp.up_proj.weight"):
        fold_safetensors(src, p, tmp_path / "b", progress=False)
    p.targets[0].name = "model.layers.0.mlp.gate_up_proj.weight"
    with pytest.raises(UnsupportedError, match="gate_up_proj.*fused"):
        fold_safetensors(src, p, tmp_path / "c", progress=False)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_description_mismatch_is_reported_first(hf_dirs, pico_patch, tmp_path):
    p = pico_patch.copy()
    p.base["d_model"] = 4096
    with pytest.raises(BaseMismatchError, match="d_model=4096.*d_model=64"):
        fold_safetensors(hf_dirs("float32"), p, tmp_path / "o", progress=False)


def test_output_rules(hf_dirs, pico_patch, tmp_path):
    src = hf_dirs("float32")
    with pytest.raises(InputError, match="output is the input"):
        fold_safetensors(src, pico_patch, src, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        fold_safetensors(src, pico_patch, tmp_path / "missing" / "out", progress=False)
    with pytest.raises(InputError, match="inside the input"):
        fold_safetensors(src, pico_patch, src / "sub", progress=False)
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "a.txt").write_text("mine")
    with pytest.raises(InputError, match="does not look like a model directory"):
        fold_safetensors(src, pico_patch, keep, progress=False)
    assert (keep / "a.txt").read_text() == "mine"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(hf_dirs, pico_patch, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            fold_safetensors(hf_dirs("float32"), pico_patch, ro / "out", progress=False)
    finally:
        ro.chmod(0o755)


def test_in_place_and_refold_refused(hf_dirs, pico_patch, tmp_path):
    import shutil

    src = hf_dirs("float16", True)
    work = tmp_path / "model"
    shutil.copytree(src, work)
    original = tree_hashes(work)
    fold_safetensors(work, pico_patch, None, in_place=True, progress=False)
    assert (work / SIDECAR_NAME).is_file() and tree_hashes(work) != original
    with pytest.raises(InputError, match="already holds a folded patch"):
        fold_safetensors(work, pico_patch, tmp_path / "again", progress=False)
    back = revert_safetensors(work, tmp_path / "back", progress=False)
    assert tree_hashes(back) == original
    assert no_strays(tmp_path) == []


def test_non_finite_result_is_refused(hf_dirs, pico_patch, tmp_path):
    p = pico_patch.copy()
    p.targets[1].deltas = p.targets[1].deltas * 1e6  # overflows float16
    out = tmp_path / "out"
    with pytest.raises(InputError, match="non-finite values in F16"):
        fold_safetensors(hf_dirs("float16"), p, out, progress=False)
    assert not out.exists() and no_strays(tmp_path) == []


def test_revert_detects_a_changed_folded_file(hf_dirs, pico_patch, tmp_path):
    out = tmp_path / "folded"
    fold_safetensors(hf_dirs("float32"), pico_patch, out, progress=False)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # a byte the fold did not touch (last tensor is not an MLP weight)
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="changed after folding"):
        revert_safetensors(out, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists() and no_strays(tmp_path) == []
    (out / SIDECAR_NAME).unlink()
    with pytest.raises(InputError, match="no revert data"):
        revert_safetensors(out, tmp_path / "back", progress=False)


def test_interrupted_fold_leaves_nothing(hf_dirs, pico_patch, tmp_path, monkeypatch):
    import nestpatch.converters.safetensors_fold as sf

    calls = {"n": 0}
    real = sf._write_shard

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sf, "_write_shard", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fold_safetensors(hf_dirs("float32", True), pico_patch, out, progress=False)
    assert calls["n"] == 2
    assert not out.exists() and no_strays(tmp_path) == []


def test_truncated_shard_is_a_clear_error(hf_dirs, pico_patch, tmp_path):
    import shutil

    work = tmp_path / "m"
    shutil.copytree(hf_dirs("float32"), work)
    f = work / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(FormatError, match="out of bounds.*truncated"):
        fold_safetensors(work, pico_patch, tmp_path / "o", progress=False)


def test_reference_values_are_really_changed(hf_dirs, pico_patch, tmp_path):
    """Guard against a vacuous test: the folded rows differ from the base rows by the deltas."""
    out = tmp_path / "f"
    fold_safetensors(hf_dirs("float32"), pico_patch, out, progress=False)
    t = pico_patch.targets[0]
    with safe_open(str(hf_dirs("float32") / "model.safetensors"), framework="numpy") as a, \
            safe_open(str(out / "model.safetensors"), framework="numpy") as b:
        diff = b.get_tensor(t.name) - a.get_tensor(t.name)
    np.testing.assert_allclose(diff, t.dense_update(), rtol=1e-5, atol=1e-6)
    assert np.abs(diff).max() > 0.01
