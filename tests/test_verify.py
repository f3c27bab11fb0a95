"""``nestpatch verify``: real folds (safetensors, GGUF F16 and Q4_1) pass; one changed byte fails, naming the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from nestpatch.models.files import open_model
from nestpatch.audit.verify import block_steps, verify_model
from nestpatch.cli import cli
from nestpatch.format import write_patch


def _flip(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def _byte_of(model: Path, tensor: str, row: int, byte_in_row: int) -> int:
    """Absolute offset of one byte of ``tensor``'s stored row ``row``."""
    m = open_model(model)
    try:
        _, start, nbytes = m.locate(tensor)
        row_bytes = m.row_bytes(tensor) if hasattr(m, "row_bytes") else nbytes // m.tensors[tensor].shape[0]
    finally:
        m.close()
    return start + row * row_bytes + byte_in_row


@pytest.fixture(scope="module")
def st_fold(tmp_path_factory: pytest.TempPathFactory, pico_hf_dir: Path, pico_patch: Any) -> dict[str, Path]:
    from nestpatch.converters.safetensors_fold import fold_safetensors

    d = tmp_path_factory.mktemp("verify_st")
    patch = write_patch(pico_patch, d / "p.nestpatch")
    fold_safetensors(pico_hf_dir, pico_patch, d / "folded", progress=False)
    return {"patch": patch, "folded": d / "folded", "base": pico_hf_dir, "dir": d}


@pytest.fixture(scope="module")
def gguf_folds(tmp_path_factory: pytest.TempPathFactory, pico_gguf: Any, pico_patch: Any) -> dict[str, Any]:
    from nestpatch.converters.gguf_fold import fold_gguf

    d = tmp_path_factory.mktemp("verify_gguf")
    patch = write_patch(pico_patch, d / "p.nestpatch")
    out = {"patch": patch, "dir": d}
    for q in ("F16", "Q4_1"):
        base = pico_gguf(q)
        fold_gguf(base, pico_patch, d / f"folded_{q}.gguf", progress=False)
        out[q] = (base, d / f"folded_{q}.gguf")
    return out


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def test_safetensors_correct_fold_passes(st_fold: dict[str, Path]) -> None:
    res = verify_model(st_fold["folded"], st_fold["patch"], base=st_fold["base"])
    assert res.ok and res.tensors_compared == res.tensors_identical > 0 and res.format == "safetensors"
    r = CliRunner().invoke(cli, ["verify", str(st_fold["folded"]), "--patch", str(st_fold["patch"]), "--base", str(st_fold["base"])])
    assert r.exit_code == 0 and "OK: is" in r.output
    res = verify_model(st_fold["folded"], st_fold["patch"])  # provenance + fingerprints only
    assert res.ok and res.mode == "provenance"


def test_safetensors_one_byte_changed(st_fold: dict[str, Path], pico_patch: Any, tmp_path: Path) -> None:
    t = pico_patch.targets[0]  # a row target (gate/up)
    neuron = int(t.indices[0])
    bad = _copy(st_fold["folded"], tmp_path / "bad")
    _flip(bad / "model.safetensors", _byte_of(bad, t.name, neuron, 4 * 3 + 2), 0x40)  # float 3 of the neuron's row
    r = CliRunner().invoke(cli, ["verify", str(bad), "--patch", str(st_fold["patch"]), "--base", str(st_fold["base"])])
    assert r.exit_code == 1
    assert f"unexpected_values  {t.name}: patched neurons {neuron} differ from base + delta" in r.output
    assert "1 differ" in r.output and "Traceback" not in r.output
    res = verify_model(bad, st_fold["patch"], base=st_fold["base"])
    assert [(f.tensor, f.problem) for f in res.findings] == [(t.name, "unexpected_values")]

    # a byte of a tensor the patch does not touch
    other = "model.layers.0.self_attn.q_proj.weight"
    bad2 = _copy(st_fold["folded"], tmp_path / "bad2")
    _flip(bad2 / "model.safetensors", _byte_of(bad2, other, 5, 2), 0x40)
    res = verify_model(bad2, st_fold["patch"], base=st_fold["base"])
    assert [(f.tensor, f.problem) for f in res.findings] == [(other, "touched_outside")]
    assert "rows 5 differ" in res.findings[0].detail

    # a neuron the patch does not list, inside a patched tensor
    outside = next(i for i in range(t.n_neuron_axis) if i not in set(t.indices.tolist()))
    bad3 = _copy(st_fold["folded"], tmp_path / "bad3")
    _flip(bad3 / "model.safetensors", _byte_of(bad3, t.name, outside, 2), 0x40)
    res = verify_model(bad3, st_fold["patch"], base=st_fold["base"])
    assert [(f.tensor, f.problem) for f in res.findings] == [(t.name, "touched_outside")]
    assert res.findings[0].detail.startswith(f"neurons {outside} changed but the patch does not touch them")


def test_safetensors_missing_delta(st_fold: dict[str, Path], pico_patch: Any, tmp_path: Path) -> None:
    """One target's tensor put back to the base bytes: named with and without --base."""
    t = pico_patch.targets[1]
    bad = _copy(st_fold["folded"], tmp_path / "bad")
    b = open_model(st_fold["base"])
    base_bytes = bytes(b.raw(t.name))
    b.close()
    _, start, n = open_model(bad).locate(t.name)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(start)
        f.write(base_bytes)
    res = verify_model(bad, st_fold["patch"], base=st_fold["base"])
    assert [(f.tensor, f.problem) for f in res.findings] == [(t.name, "missing_delta")]
    res = verify_model(bad, st_fold["patch"])
    assert [(f.tensor, f.problem) for f in res.findings] == [(t.name, "missing_delta")]


def test_not_a_fold_and_wrong_patch(st_fold: dict[str, Path], pico_model: Any, tmp_path: Path) -> None:
    from nestpatch.testing import random_patch

    r = CliRunner().invoke(cli, ["verify", str(st_fold["base"]), "--patch", str(st_fold["patch"])])
    assert r.exit_code == 1 and "MODEL records no folded patch" in r.output
    other = write_patch(random_patch(pico_model, seed=5), tmp_path / "other.nestpatch")
    r = CliRunner().invoke(cli, ["verify", str(st_fold["folded"]), "--patch", str(other), "--json"])
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert not d["ok"] and d["findings"][0]["problem"] == "provenance" and "MODEL records patch sha256:" in d["findings"][0]["detail"]
    r = CliRunner().invoke(cli, ["verify", str(st_fold["folded"]), "--patch", str(other), "--base", str(st_fold["base"])])
    assert r.exit_code == 1 and "6 differ" in r.output
    assert "missing_delta      model.layers.0.mlp.gate_proj.weight: patched neurons" in r.output  # P's neurons lack P's delta
    assert "touched_outside    model.layers.0.mlp.gate_proj.weight: neurons" in r.output  # the other patch's neurons
    assert "provenance         nestpatch.patch_digest: expected" in r.output


def test_bad_inputs_are_user_errors(st_fold: dict[str, Path], tmp_path: Path, pico_gguf: Any) -> None:
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "nope"), "--patch", str(st_fold["patch"])])
    assert r.exit_code == 2 and "nope: no such model file or directory" in r.output
    r = CliRunner().invoke(cli, ["verify", str(st_fold["folded"]), "--patch", str(st_fold["patch"]), "--base", str(pico_gguf("F16"))])
    assert r.exit_code == 2 and "is safetensors but --base" in r.output


def test_wrong_base_is_refused(st_fold: dict[str, Path], pico_model_other: Any, tmp_path: Path) -> None:
    from nestpatch.testing import write_hf_dir

    other = write_hf_dir(pico_model_other, tmp_path / "other", tokenizer=False)
    r = CliRunner().invoke(cli, ["verify", str(st_fold["folded"]), "--patch", str(st_fold["patch"]), "--base", str(other)])
    assert r.exit_code == 2 and "does not match the patch's base model" in r.output


@pytest.mark.parametrize("qtype", ["F16", "Q4_1"])
def test_gguf_correct_fold_passes(gguf_folds: dict[str, Any], qtype: str) -> None:
    base, folded = gguf_folds[qtype]
    res = verify_model(folded, gguf_folds["patch"], base=base)
    assert res.ok and res.format == "gguf" and res.tensors_identical == res.tensors_compared > 0, res.findings
    assert verify_model(folded, gguf_folds["patch"]).ok


def test_gguf_one_byte_changed(gguf_folds: dict[str, Any], pico_patch: Any, tmp_path: Path) -> None:
    t = pico_patch.targets[0]
    name = "blk.0.ffn_gate.weight" if "gate_proj" in t.name and ".0." in t.name else None
    assert name is not None
    neuron = int(t.indices[0])
    for qtype, byte_in_row in (("F16", 7), ("Q4_1", 5)):  # Q4_1 block: 2+2 bytes of scale/min, then nibbles
        base, folded = gguf_folds[qtype]
        bad = _copy(folded, tmp_path / f"bad_{qtype}.gguf")
        _flip(bad, _byte_of(bad, name, neuron, byte_in_row), 0x88)  # high bits: values move by many steps
        r = CliRunner().invoke(cli, ["verify", str(bad), "--patch", str(gguf_folds["patch"]), "--base", str(base)])
        assert r.exit_code == 1, r.output
        assert f"unexpected_values  {name}: patched neurons {neuron} differ from base + delta" in r.output


def test_gguf_reencoding_tolerance(gguf_folds: dict[str, Any], pico_patch: Any, tmp_path: Path) -> None:
    """A lowest-bit change in a Q4_1 nibble is what another encoder's rounding looks like: within
    tolerance by default, refused with --exact."""
    t = pico_patch.targets[0]
    base, folded = gguf_folds["Q4_1"]
    bad = _copy(folded, tmp_path / "low.gguf")
    _flip(bad, _byte_of(bad, "blk.0.ffn_gate.weight", int(t.indices[0]), 5), 0x01)
    res = verify_model(bad, gguf_folds["patch"], base=base)
    assert res.ok and res.within_tolerance == ["blk.0.ffn_gate.weight"]
    r = CliRunner().invoke(cli, ["verify", str(bad), "--patch", str(gguf_folds["patch"]), "--base", str(base), "--exact"])
    assert r.exit_code == 1 and "blk.0.ffn_gate.weight" in r.output


def test_gguf_low_bit_change_outside_the_patched_neurons_fails(gguf_folds: dict[str, Any], pico_patch: Any, tmp_path: Path) -> None:
    """The re-encoding tolerance covers only blocks the fold re-encodes: a one-step change in a
    neuron the patch does not touch (same tensor) is tampering, with or without --exact."""
    t = pico_patch.targets[0]
    untouched = next(i for i in range(t.n_neuron_axis) if i not in set(int(x) for x in t.indices))
    base, folded = gguf_folds["Q4_1"]
    bad = _copy(folded, tmp_path / "outside.gguf")
    _flip(bad, _byte_of(bad, "blk.0.ffn_gate.weight", untouched, 5), 0x01)
    res = verify_model(bad, gguf_folds["patch"], base=base)
    assert not res.ok and res.within_tolerance == []
    assert [(f.tensor, f.problem) for f in res.findings] == [("blk.0.ffn_gate.weight", "touched_outside")]
    assert f"neurons {untouched} changed but the patch does not touch them" in res.findings[0].detail


def test_block_steps() -> None:
    v = np.concatenate([np.linspace(0, 15, 32), np.linspace(-3, 3, 32)])[None, :].astype(np.float32)  # (1, 64)
    s = block_steps(v, "Q4_1")
    assert s.shape == v.shape and s[0, 0] == pytest.approx(1.0) and s[0, 40] == pytest.approx(6 / 15)


@pytest.mark.slow
def test_smollm2_fold_verifies_and_one_byte_fails(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The real Q4_1 SmolLM2 (272 tensors): a fold verifies byte for byte; a nibble's high bit flipped fails."""
    from nestpatch.converters.gguf_fold import fold_gguf
    from nestpatch.fingerprint import fingerprint_info, sketch
    from nestpatch.format import Patch, Target
    from nestpatch.models.naming import MLPRef

    m = open_model(smollm2_gguf)
    rng = np.random.default_rng(0)
    targets = []
    for layer, module in ((3, "gate_proj"), (10, "up_proj"), (20, "gate_proj")):
        ref = MLPRef(layer, module)
        w = m.floats(ref.gguf_name)  # (1536, 576)
        idx = np.sort(rng.choice(w.shape[0], 6, replace=False)).astype(np.int32)
        targets.append(Target(name=ref.hf_name, axis="row", shape=tuple(w.shape), indices=idx,
                              clusters=np.array([0, 0, 0, 1, 1, 1], np.int32),
                              deltas=(rng.standard_normal((2, w.shape[1])) * 0.05).astype(np.float32),
                              base_sketch=sketch(ref.hf_name, w[idx])))
    m.close()
    patch = Patch(targets=targets, policy={"name": "smol-verify", "version": "1"},
                  base={"architecture": "llama", "n_layers": 30, "d_model": 576, "n_ff": 1536,
                        "name": smollm2_gguf.name, "fingerprint": fingerprint_info()})
    pp = write_patch(patch, tmp_path / "p.nestpatch")
    folded = tmp_path / "folded.gguf"
    fold_gguf(smollm2_gguf, patch, folded, progress=False)
    res = verify_model(folded, pp, base=smollm2_gguf)
    assert res.ok and res.tensors_compared == res.tensors_identical == 272
    neuron = int(targets[1].indices[2])
    _flip(folded, _byte_of(folded, "blk.10.ffn_up.weight", neuron, 4 + 3 * 20 + 7), 0x88)  # block 3 of the row
    r = CliRunner().invoke(cli, ["verify", str(folded), "--patch", str(pp), "--base", str(smollm2_gguf)])
    assert r.exit_code == 1
    assert f"unexpected_values  blk.10.ffn_up.weight: patched neurons {neuron} differ from base + delta" in r.output
