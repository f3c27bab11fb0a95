"""``nestpatch apply / revert / export-lora`` end to end on pico models (real files, real exit codes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nestpatch.cli import cli
from nestpatch.format import write_patch
from nestpatch.testing import write_hf_dir


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def assert_one_line_error(res, pattern: str) -> None:
    import re

    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture()
def workdir(tmp_path, pico_hf_dir, pico_patch):
    """A model directory with its patch beside it (same stem)."""
    model = tmp_path / "pico"
    shutil.copytree(pico_hf_dir, model)
    write_patch(pico_patch, tmp_path / "pico.nestpatch")
    return tmp_path


def test_apply_dir_with_default_patch_then_revert(workdir):
    out = workdir / "patched"
    res = run("apply", workdir / "pico", "-o", out, "--report-json", workdir / "r.json")
    assert res.exit_code == 0, res.output
    assert "L0.gate_proj" in res.stdout and "retention" in res.stdout and "model size" in res.stdout
    report = json.loads((workdir / "r.json").read_text())
    assert report["format"] == "safetensors" and len(report["targets"]) == 6
    assert report["min_retention"] > 0.999
    res = run("revert", out, "-o", workdir / "orig")
    assert res.exit_code == 0, res.output
    for f in (workdir / "pico").iterdir():
        assert sha(workdir / "orig" / f.name) == sha(f)


def test_apply_lone_file_finds_the_only_patch(tmp_path, pico_hf_dir, pico_patch):
    shutil.copy(pico_hf_dir / "model.safetensors", tmp_path / "weights.safetensors")
    write_patch(pico_patch, tmp_path / "policy.nestpatch")
    res = run("apply", tmp_path / "weights.safetensors", "-o", tmp_path / "out.safetensors")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.safetensors").is_file()


def test_patch_discovery_errors(tmp_path, pico_hf_dir, pico_patch):
    shutil.copy(pico_hf_dir / "model.safetensors", tmp_path / "w.safetensors")
    assert_one_line_error(run("apply", tmp_path / "w.safetensors", "-o", tmp_path / "o.safetensors"), "no PATCH given")
    write_patch(pico_patch, tmp_path / "a.nestpatch")
    write_patch(pico_patch, tmp_path / "b.nestpatch")
    assert_one_line_error(run("apply", tmp_path / "w.safetensors", "-o", tmp_path / "o.safetensors"), "2 .nestpatch files")
    assert not (tmp_path / "o.safetensors").exists()


def test_wrong_base_exit_2_nothing_written(tmp_path, pico_model_other, pico_patch):
    other = write_hf_dir(pico_model_other, tmp_path / "other", tokenizer=False)
    write_patch(pico_patch, tmp_path / "p.nestpatch")
    res = run("apply", other, tmp_path / "p.nestpatch", "-o", tmp_path / "out")
    assert_one_line_error(res, "does not match the patch's base model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "p.nestpatch"]


def test_shape_mismatch_and_unknown_tensor_exit_2(workdir, pico_patch):
    p = pico_patch.copy()
    p.base.pop("n_ff", None)
    p.targets[0].shape = (512, 64)
    p.targets[0].indices = p.targets[0].indices  # still valid for 512 rows
    write_patch(p, workdir / "shape.nestpatch")
    assert_one_line_error(run("apply", workdir / "pico", workdir / "shape.nestpatch", "-o", workdir / "o"),
                          r"shape \[256, 64\], the patch expects \[512, 64\]")
    q = pico_patch.copy()
    q.base.pop("n_layers", None)
    q.targets[-1].name = "model.layers.9.mlp.down_proj.weight"
    write_patch(q, workdir / "name.nestpatch")
    assert_one_line_error(run("apply", workdir / "pico", workdir / "name.nestpatch", "-o", workdir / "o"),
                          "has no tensor model.layers.9.mlp.down_proj.weight")
    assert not (workdir / "o").exists()


def test_output_rules_exit_2(workdir):
    model = workdir / "pico"
    assert_one_line_error(run("apply", model, "-o", model), "output is the input")
    assert_one_line_error(run("apply", model), "no output given")
    assert_one_line_error(run("apply", model, "-o", workdir / "nope" / "out"), "does not exist")
    assert_one_line_error(run("apply", model, "-o", workdir / "o", "--precision", "q8_0"), "applies to GGUF")
    assert_one_line_error(run("revert", model, "-o", workdir / "r"), "no revert data")
    assert_one_line_error(run("apply", workdir / "missing", "-o", workdir / "o"), "no such model")


def test_in_place(workdir):
    model = workdir / "pico"
    before = sha(model / "model.safetensors")
    res = run("apply", model, "--in-place")
    assert res.exit_code == 0, res.output
    assert sha(model / "model.safetensors") != before
    res = run("revert", model, "-o", workdir / "orig")
    assert res.exit_code == 0 and sha(workdir / "orig" / "model.safetensors") == before


def test_export_lora_both_formats(workdir, pico_hf_dir):
    patch = workdir / "pico.nestpatch"
    res = run("export-lora", patch, "--format", "gguf", "-o", workdir / "a.gguf")
    assert res.exit_code == 0, res.output
    assert (workdir / "a.gguf").read_bytes()[:4] == b"GGUF"
    res = run("export-lora", patch, "--format", "peft", "-o", workdir / "peft", "--base", pico_hf_dir)
    assert res.exit_code == 0, res.output
    cfg = json.loads((workdir / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(pico_hf_dir)
    assert_one_line_error(run("export-lora", workdir / "missing.nestpatch", "--format", "gguf", "-o", workdir / "b.gguf"),
                          "missing.nestpatch")


def test_gguf_apply_and_revert(workdir, pico_gguf):
    src = workdir / "pico.gguf"
    shutil.copy(pico_gguf("Q8_0"), src)
    res = run("apply", src, "-o", workdir / "folded.gguf", "--precision", "auto")
    assert res.exit_code == 0, res.output
    assert "Q8_0" in res.stdout
    res = run("revert", workdir / "folded.gguf", "-o", workdir / "back.gguf")
    assert res.exit_code == 0, res.output
    assert sha(workdir / "back.gguf") == sha(src)
    (workdir / "outdir").mkdir()
    res = run("apply", src, workdir / "pico.nestpatch", "-o", workdir / "outdir")  # a directory receives MODEL's name
    assert res.exit_code == 0 and (workdir / "outdir" / "pico.gguf").is_file()
    assert_one_line_error(run("apply", workdir / "folded.gguf", "-o", workdir / "twice.gguf"), "already carries a folded patch")
    res = run("apply", src, "--in-place")
    assert res.exit_code == 0 and sha(src) == sha(workdir / "outdir" / "pico.gguf")  # same fold (keep), deterministic


def test_real_process_exit_code(workdir):
    """The installed console script maps a user error to exit 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, "-c", "from nestpatch.cli import main; main()", "apply",
                           str(workdir / "pico"), "-o", str(workdir / "pico")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "output is the input" in proc.stderr


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir_exit_2(workdir):
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line_error(run("apply", workdir / "pico", "-o", ro / "out"), "not writable")
        assert_one_line_error(run("export-lora", workdir / "pico.nestpatch", "--format", "gguf", "-o", ro / "a.gguf"),
                              "not writable")
    finally:
        ro.chmod(0o755)


def test_apply_require_signature_gguf(workdir, pico_gguf):
    """--require-signature: unsigned, other-key and tampered patches are refused before any output exists."""
    pytest.importorskip("cryptography")
    from nestpatch.audit.signing import generate_keypair, sign_patch

    src = workdir / "pico.gguf"
    shutil.copy(pico_gguf("Q8_0"), src)
    before = sha(src)
    patch = workdir / "pico.nestpatch"
    key, pub, _ = generate_keypair(workdir / "release.key")
    other_key, other_pub, _ = generate_keypair(workdir / "other.key")
    out = workdir / "folded.gguf"

    def refused(patch_file: Path, pattern: str, key_file: Path = pub) -> None:
        assert_one_line_error(run("apply", src, patch_file, "-o", out, "--require-signature", key_file), pattern)
        assert not out.exists() and sha(src) == before
        assert not list(workdir.glob(".folded.gguf*"))  # no temporary left behind either

    refused(patch, r"pico\.nestpatch: patch is not signed")
    sign_patch(patch, other_key, out=workdir / "other.nestpatch")
    refused(workdir / "other.nestpatch", r"other\.nestpatch: signed by another key")
    refused(workdir / "missing.nestpatch", r"missing\.nestpatch: no such patch file")
    refused(patch, r"nope\.pub: no such public key file", key_file=workdir / "nope.pub")
    refused(patch, r"release\.key: is a private key", key_file=key)

    sign_patch(patch, key)
    tampered = workdir / "tampered.nestpatch"
    raw = bytearray(patch.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor's data
    tampered.write_bytes(bytes(raw))
    refused(tampered, r"tampered\.nestpatch: signature does not match: tensors changed")

    res = run("apply", src, patch, "-o", out, "--require-signature", pub)
    assert res.exit_code == 0, res.output
    assert "Q8_0" in res.stdout and out.is_file()
    out.unlink()
    res = run("apply", src, "-o", out, "--require-signature", pub)  # the default patch beside MODEL is checked too
    assert res.exit_code == 0 and out.is_file(), res.output
    shutil.copy(workdir / "other.nestpatch", patch)
    out.unlink()
    refused_default = run("apply", src, "-o", out, "--require-signature", pub)
    assert_one_line_error(refused_default, r"pico\.nestpatch: signed by another key")
    assert not out.exists()
