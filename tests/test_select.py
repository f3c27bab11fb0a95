"""``nestpatch select`` on pico models: validation in llama.cpp (folded GGUF) and in torch, the rule,
the provenance record, and the refusals (another model's patch, overwriting an input)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nestpatch.format import read_patch, write_patch

FAST = ["--limit", "3", "--tokens", "4", "--kl-prompts", "3", "--kl-tokens", "4", "--threads", "1"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _candidates(model: Any, tmp: Path) -> tuple[Path, Path]:
    """A patch that moves the model a lot and one that barely moves it (same shapes, same base)."""
    from nestpatch.testing import random_patch

    loud, quiet = tmp / "loud.nestpatch", tmp / "quiet.nestpatch"
    write_patch(random_patch(model, seed=0, scale=2.0), loud)
    write_patch(random_patch(model, seed=1, scale=0.01), quiet)
    return loud, quiet


def _select(model: str, patches: list[Path], out: Path, *extra: str) -> Any:
    from nestpatch.cli import cli

    return CliRunner().invoke(cli, ["select", model, *map(str, patches), "-o", str(out), "--json", *FAST, *extra])


def _check_choice(res: Any, out: Path, loud: Path, quiet: Path) -> dict:
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    by = {Path(c["patch"]).name: c for c in report["candidates"]}
    assert by["quiet.nestpatch"]["kl"] < by["loud.nestpatch"]["kl"]  # measured, not assumed
    for c in report["candidates"]:
        assert c["score"] == pytest.approx(c["asr"] + c["benign_refusal"] + c["kl"], abs=1e-4)
    assert Path(report["chosen"]).name == "quiet.nestpatch"
    chosen = read_patch(out)
    assert chosen.content_digest == read_patch(quiet).content_digest  # the tensors are the candidate's
    sel = chosen.provenance["selection"]
    assert sel["chosen"] == 1 and [Path(c["label"]).name for c in sel["candidates"]] == ["loud.nestpatch", "quiet.nestpatch"]
    assert sel["sets"] == report["sets"] and all(n == 3 for n in sel["sets"].values())
    assert sel["candidates"][1]["kl"] == by["quiet.nestpatch"]["kl"]
    return sel


def test_select_in_llama_cpp_keeps_the_patch_validation_prefers(pico_model: Any, pico_gguf: Any, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    loud, quiet = _candidates(pico_model, tmp_path)
    before = {p: _sha(p) for p in (loud, quiet)}
    out = tmp_path / "chosen.nestpatch"
    sel = _check_choice(_select(str(pico_gguf("F32")), [loud, quiet], out), out, loud, quiet)
    assert sel["backend"] == "llama" and sel["tokens"] == 4
    assert {p: _sha(p) for p in (loud, quiet)} == before  # inputs untouched


def test_select_in_torch(pico_model: Any, pico_hf_dir: Path, tmp_path: Path) -> None:
    loud, quiet = _candidates(pico_model, tmp_path)
    out = tmp_path / "chosen.nestpatch"
    sel = _check_choice(_select(str(pico_hf_dir), [loud, quiet], out, "--backend", "torch"), out, loud, quiet)
    assert sel["backend"] == "torch"


def test_select_refuses_another_models_patch_and_overwriting(pico_model: Any, pico_model_other: Any, pico_hf_dir: Path,
                                                            tmp_path: Path) -> None:
    from nestpatch.testing import random_patch

    loud, quiet = _candidates(pico_model, tmp_path)
    stranger = tmp_path / "stranger.nestpatch"
    write_patch(random_patch(pico_model_other, seed=0), stranger)
    out = tmp_path / "chosen.nestpatch"
    res = _select(str(pico_hf_dir), [loud, stranger], out, "--backend", "torch")
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {stranger}: not made for this model: ") and "does not match the patch's base model" in line
    assert not out.exists()
    res = _select(str(pico_hf_dir), [loud, quiet], quiet, "--backend", "torch")
    assert res.exit_code == 2 and "output is the input" in res.output
    out.write_bytes(b"keep me")
    res = _select(str(pico_hf_dir), [loud, quiet], out, "--backend", "torch")
    assert res.exit_code == 2 and "exists; pass --force" in res.output and out.read_bytes() == b"keep me"
    res = _select(str(pico_hf_dir), [loud, quiet], out, "--backend", "llama", "--force")
    assert res.exit_code == 2 and "needs a GGUF model" in res.output and out.read_bytes() == b"keep me"
