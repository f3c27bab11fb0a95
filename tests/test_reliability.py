"""Reliability: inputs are never modified, every user error is one line and exit 2, the strict
reader refuses what the spec forbids, and a wrong base stays refused (issue 12).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nestpatch.cli import cli
from nestpatch.errors import FormatError
from nestpatch.format import read_patch, serialize_patch, write_patch

PY = sys.executable


def run(*args: object, env: dict | None = None):
    return CliRunner(env=env).invoke(cli, [str(a) for a in args], obj={})


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def one_line_error(res, pattern: str | None = None) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    if pattern:
        assert pattern in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "cache"
    (h / "assets" / "x").mkdir(parents=True)
    monkeypatch.setenv("NESTPATCH_HOME", str(h))
    return h


@pytest.fixture()
def files(tmp_path, pico_gguf, pico_patch, home):
    """A model, a patch, a signing key pair and a fold report in one directory."""
    d = tmp_path / "w"
    d.mkdir()
    model = d / "m.gguf"
    shutil.copy(pico_gguf("F32"), model)
    patch = d / "p.nestpatch"
    write_patch(pico_patch, patch)
    res = run("keygen", "-o", d / "k")
    assert res.exit_code == 0, res.output
    return {"dir": d, "model": model, "patch": patch, "key": d / "k", "pub": d / "k.pub", "home": home}


def _aliases(f: dict, target: Path, kind: str) -> Path:
    """An output path that aliases ``target`` in the given way (created here when it is a link)."""
    d = f["dir"]
    if kind == "same":
        return target
    if kind == "dir":
        return target.parent
    if kind == "symlink":
        link = d / f"link-{target.name}"
        link.symlink_to(target)
        return link
    if kind == "hardlink":
        link = d / f"hard-{target.name}"
        os.link(target, link)
        return link
    if kind == "cache":
        return f["home"] / "assets" / "x" / "out.bin"
    raise AssertionError(kind)


#: subcommand -> (argv builder given the output, the input it aliases by default)
def _commands(f: dict) -> dict:
    m, p, k = f["model"], f["patch"], f["key"]
    return {
        "apply": (lambda o: ["apply", m, p, "-o", o], m),
        "apply-patch": (lambda o: ["apply", m, p, "-o", o], p),
        "apply-report-json": (lambda o: ["apply", m, p, "-o", f["dir"] / "new.gguf", "--report-json", o], p),
        "revert": (lambda o: ["revert", m, "-o", o], m),
        "export-lora-gguf": (lambda o: ["export-lora", p, "--format", "gguf", "-o", o], p),
        "export-lora-peft": (lambda o: ["export-lora", p, "--format", "peft", "-o", o], p),
        "sign": (lambda o: ["sign", p, "--key", k, "-o", o], k),
        "report": (lambda o: ["report", p, "-o", o], p),
        "keygen": (lambda o: ["keygen", "-o", o], k),
        "eval": (lambda o: ["eval", m, "--patch", p, "--suite", "benign", "-o", o], m),
        "train": (lambda o: ["train", m, "-o", o], m),
        "bench": (lambda o: ["bench", m, "-o", o], m),
    }


ALIASES = ("same", "dir", "symlink", "hardlink", "cache")
COMMANDS = ("apply", "apply-patch", "apply-report-json", "revert", "export-lora-gguf", "export-lora-peft", "sign",
            "report", "keygen", "eval", "train", "bench")


@pytest.mark.parametrize("command", COMMANDS)
def test_inputs_never_modified_matrix(files, command):
    """Every writer x every aliasing of its output to an input: refused with one line, input unchanged."""
    argv_of, target = _commands(files)[command]
    watched = [files[k] for k in ("model", "patch", "key", "pub")]
    for kind in ALIASES:
        before = {p: sha(p) for p in watched}
        listing = sorted(x.name for x in files["dir"].iterdir())
        out = _aliases(files, target, kind)
        res = run(*argv_of(out))
        one_line_error(res)
        assert {p: sha(p) for p in watched} == before, (command, kind)
        assert not [x for x in files["dir"].iterdir() if ".nestpatch-tmp." in x.name]
        if kind in ("symlink", "hardlink"):
            out.unlink()
        assert sorted(x.name for x in files["dir"].iterdir()) == listing, (command, kind)


def test_apply_into_models_own_directory_is_refused(files):
    """The same-file check runs after the model's name is appended to a directory output."""
    before = sha(files["model"])
    line = one_line_error(run("apply", files["model"], files["patch"], "-o", files["dir"]))
    assert "output is the input" in line and "m.gguf" in line
    assert sha(files["model"]) == before


def test_existing_output_needs_force(files):
    other = files["dir"] / "README.md"
    other.write_text("mine")
    one_line_error(run("apply", files["model"], files["patch"], "-o", other), "pass --force")
    one_line_error(run("revert", files["model"], "-o", other), "pass --force")
    one_line_error(run("export-lora", files["patch"], "--format", "gguf", "-o", other), "pass --force")
    one_line_error(run("sign", files["patch"], "--key", files["key"], "-o", other), "pass --force")
    assert other.read_text() == "mine"
    res = run("export-lora", files["patch"], "--format", "gguf", "-o", other, "--force")
    assert res.exit_code == 0, res.output
    assert other.read_bytes()[:4] == b"GGUF"


def test_in_place_on_named_or_cached_model_is_refused(files):
    cached = files["home"] / "assets" / "x" / "m.gguf"
    shutil.copy(files["model"], cached)
    before = sha(cached)
    one_line_error(run("apply", cached, files["patch"], "--in-place"), "--in-place is refused")
    one_line_error(run("apply", "smollm2", files["patch"], "--in-place"), "--in-place is refused")
    assert sha(cached) == before
    assert not (files["home"] / "assets" / "smollm2").exists()  # refused before any fetch


# ----------------------------------------------------------------------------- strict reader


def _doc_rewrite(data: bytes, edit) -> bytes:
    """Rewrite the metadata document text of a serialized patch with ``edit(text) -> text``."""
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    header["__metadata__"]["nestpatch.metadata"] = edit(header["__metadata__"]["nestpatch.metadata"])
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + data[8 + hlen:]


def _doc_edit(data: bytes, fn) -> bytes:
    def edit(text: str) -> str:
        doc = json.loads(text)
        fn(doc)
        return json.dumps(doc)
    return _doc_rewrite(data, edit)


@pytest.mark.parametrize("name,edit,message", [
    ("duplicate key", lambda t: t.replace('"policy":', '"policy":{},"policy":', 1), "duplicate key"),
    ("nan", lambda t: t.replace('"tolerance":0.35', '"tolerance":NaN', 1), "non-finite"),
    ("infinity", lambda t: t.replace('"evaluation":{}', '"evaluation":{"x":-Infinity}', 1), "non-finite"),
    ("overflow", lambda t: t.replace('"tolerance":0.35', '"tolerance":1e999', 1), "out of range"),
])
def test_strict_json(tmp_path, pico_patch, name, edit, message):
    f = tmp_path / "x.nestpatch"
    data = serialize_patch(pico_patch)
    f.write_bytes(_doc_rewrite(data, edit))
    assert f.read_bytes() != data
    with pytest.raises(FormatError, match=message):
        read_patch(f)


def _set(path: list, value):
    def fn(doc):
        obj = doc
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return fn


@pytest.mark.parametrize("edit,message", [
    (_set(["base", "n_layers"], "2"), "base/n_layers"),
    (_set(["base", "fingerprint", "size"], 1 << 26), "base/fingerprint/size"),
    (_set(["base", "fingerprint", "tolerance"], -1), "base/fingerprint/tolerance"),
    (_set(["targets", 0, "shape"], [1, 2, 3]), "targets/0/shape"),
    (_set(["provenance", "seed"], 1.5), "provenance/seed"),
    (_set(["content_digest"], "md5:00"), "content_digest"),
    (_set(["targets", 0, "n_clusters"], 99), "n_clusters 99"),
    (_set(["targets", 0, "delta_dtype"], "F16"), "delta_dtype"),
    (_set(["targets", 0, "axis"], "col"), "axis"),
    (_set(["base", "n_ff"], 128), "does not match base"),
])
def test_schema_and_musts(tmp_path, pico_patch, edit, message):
    f = tmp_path / "x.nestpatch"
    f.write_bytes(_doc_edit(serialize_patch(pico_patch), edit))
    with pytest.raises(FormatError, match=message):
        read_patch(f)
    one_line_error(run("validate", f))


def test_alias_target_names_are_one_weight(tmp_path, pico_patch):
    p = pico_patch.copy()
    dup = p.targets[0]
    alias = type(dup)(**{**dup.__dict__, "name": dup.name.removeprefix("model.")})
    p.targets.append(alias)
    with pytest.raises(FormatError, match="address the same weight"):
        serialize_patch(p)


@pytest.mark.parametrize("version", ["1", "1.0.0", "01.0", "1.x", " 1.0"])
def test_version_must_be_major_minor(tmp_path, pico_patch, version):
    data = serialize_patch(pico_patch)
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    header["__metadata__"]["nestpatch.version"] = version
    hb = json.dumps(header).encode()
    f = tmp_path / "v.nestpatch"
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + hlen:])
    with pytest.raises(FormatError, match="MAJOR.MINOR"):
        read_patch(f)


def test_gguf_given_as_patch_says_so(files):
    line = one_line_error(run("inspect", files["model"]))
    assert "this is a GGUF model" in line and "swap MODEL and PATCH" in line
    one_line_error(run("apply", files["patch"], files["model"], "-o", files["dir"] / "o.gguf"), "GGUF model")


def test_schema_copy_matches_spec():
    root = Path(__file__).resolve().parents[1]
    assert (root / "spec" / "metadata.schema.json").read_bytes() == (root / "nestpatch" / "format" / "metadata.schema.json").read_bytes()


# ----------------------------------------------------------------------------- wrong base


def test_patch_without_fingerprint_needs_explicit_skip(files, pico_patch):
    p = pico_patch.copy()
    for t in p.targets:
        t.base_sketch = None
    bare = files["dir"] / "bare.nestpatch"
    write_patch(p, bare)
    out = files["dir"] / "o.gguf"
    one_line_error(run("apply", files["model"], bare, "-o", out), "--skip-base-check")
    assert not out.exists()
    res = run("apply", files["model"], bare, "-o", out, "--skip-base-check")
    assert res.exit_code == 0, res.output


def test_tolerance_in_patch_cannot_loosen_check(files, pico_patch, pico_model_other, pico_gguf):
    p = pico_patch.copy()
    p.base["fingerprint"]["tolerance"] = 1e9
    loose = files["dir"] / "loose.nestpatch"
    write_patch(p, loose)
    other = pico_gguf("F32", pico_model_other)
    one_line_error(run("apply", other, loose, "-o", files["dir"] / "o.gguf"), "tolerance 0.35")


def test_diff_flags_dropped_fingerprints(files, pico_patch):
    p = pico_patch.copy()
    p.targets[0].base_sketch = None
    b = files["dir"] / "b.nestpatch"
    write_patch(p, b)
    res = run("diff", files["patch"], b)
    assert res.exit_code == 1
    assert "drops the base fingerprint of 1 target" in res.stdout
    res = run("diff", files["patch"], b, "--json")
    changes = json.loads(res.stdout)["base"]["fingerprint_changes"]
    assert changes == [{"target": p.targets[0].name, "change": "removed"}]


# ----------------------------------------------------------------------------- errors and printing


def test_control_characters_are_escaped(files, pico_patch):
    p = pico_patch.copy()
    p.policy["description"] = "nice\x1b[2K\r\n  digest     sha256:fake  [signed]"
    evil = files["dir"] / "evil.nestpatch"
    write_patch(p, evil)
    res = run("inspect", evil)
    assert res.exit_code == 0
    assert "\x1b" not in res.stdout and "\r" not in res.stdout
    assert not any(line.lstrip().startswith("digest     sha256:fake") for line in res.stdout.splitlines())
    assert "\\x1b[2K" in res.stdout
    res = run("diff", files["patch"], evil)
    assert "\x1b" not in res.stdout and res.exit_code == 1


def test_usage_errors_are_one_line():
    one_line_error(run("apply"), "Missing argument")
    one_line_error(run("inspect", "--nope"), "No such option")
    one_line_error(run("no-such-command"), "No such command")


def test_directory_as_patch_and_missing_files(files):
    one_line_error(run("inspect", files["dir"]))
    one_line_error(run("inspect", files["dir"] / "missing.nestpatch"), "no such file")


def test_verify_takes_named_models(files, home):
    one_line_error(run("verify", "no-such-model", "--patch", files["patch"]), "no such model")


def test_signals_give_130_and_143(tmp_path):
    code = ("import os, signal, sys, time, click\n"
            "from nestpatch.cli import cli, main\n"
            "@cli.command('nap')\n"
            "def nap():\n"
            "    sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(30)\n"
            "sys.argv = ['nestpatch', 'nap']\n"
            "main()\n")
    for sig, want in ((15, 143), (2, 130)):
        proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == want, (sig, proc.returncode, err)
        assert "Traceback" not in err


def _can_mount_tmpfs(where: Path) -> str | None:
    if os.geteuid() != 0:
        return "not root"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}"


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, files):
    mnt = tmp_path / "small"
    mnt.mkdir()
    why = _can_mount_tmpfs(mnt)
    if why:
        pytest.skip(f"cannot make a small full filesystem here ({why})")
    try:
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill it: every later write hits ENOSPC
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        before = sha(files["model"])
        line = one_line_error(run("apply", files["model"], files["patch"], "-o", mnt / "o.gguf"))
        assert "No space left" in line, line
        line = one_line_error(run("export-lora", files["patch"], "--format", "peft", "-o", mnt / "peft"))
        assert "No space left" in line, line
        line = one_line_error(run("export-lora", files["patch"], "--format", "gguf", "-o", mnt / "a.gguf"))
        assert "No space left" in line, line
        assert [p.name for p in mnt.iterdir()] == ["filler"]  # no output, no temporary debris
        assert sha(files["model"]) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_report_shows_retention_below_one(tmp_path, files):
    fr = tmp_path / "fold.json"
    fr.write_text(json.dumps({"format": "gguf", "model_out": "x.gguf", "patch_digest": None, "targets": [
        {"name": "model.layers.0.mlp.up_proj.weight", "retention": 0.996, "rel_error": 0.151}]}))
    res = run("report", files["patch"], "-o", tmp_path / "r.html", "--fold-report", fr)
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    assert "0.9960" in html and "0.151" in html


def test_duplicate_key_before_the_signed_one_does_not_verify(files):
    signed = files["dir"] / "signed.nestpatch"
    assert run("sign", files["patch"], "--key", files["key"], "-o", signed).exit_code == 0
    assert run("verify-signature", signed, "--pubkey", files["pub"]).exit_code == 0
    forged = files["dir"] / "forged.nestpatch"
    forged.write_bytes(_doc_rewrite(signed.read_bytes(),
                                    lambda t: t.replace('"policy":', '"policy":{"name":"evil"},"policy":', 1)))
    res = run("verify-signature", forged, "--pubkey", files["pub"])
    assert res.exit_code != 0 and "OK" not in res.stdout
    assert "duplicate key" in res.output


def test_export_memory_is_bounded_before_allocation(files):
    import numpy as np

    from nestpatch.format import Patch, Target

    n = 80
    t = Target("model.layers.0.mlp.up_proj.weight", "row", (1 << 24, 64), np.arange(n, dtype=np.int32),
               np.arange(n, dtype=np.int32), np.ones((n, 64), np.float32))
    p = Patch([t], base={"architecture": "llama"}, policy={"name": "big"})
    big = files["dir"] / "big.nestpatch"
    write_patch(p, big)
    assert big.stat().st_size < 64 * 1024
    one_line_error(run("export-lora", big, "--format", "peft", "-o", files["dir"] / "peft"), "GiB")


def test_layer_counts_are_bounded(tmp_path, pico_patch):
    f = tmp_path / "x.nestpatch"
    f.write_bytes(_doc_edit(serialize_patch(pico_patch), _set(["base", "n_layers"], 1 << 40)))
    with pytest.raises(FormatError, match="base/n_layers"):
        read_patch(f)
