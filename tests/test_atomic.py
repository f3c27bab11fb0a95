"""Atomic writers: recognisable temp names, stale-temp cleanup by dead pid, fsync'd rename."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nestpatch.atomic import TMP_MARKER, atomic_dir, atomic_path, remove_stale, write_bytes_atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_of_dead_writer_is_removed_and_logged(tmp_path, caplog):
    out = tmp_path / "model.gguf"
    dead = tmp_path / f".model.gguf{TMP_MARKER}{_dead_pid()}.abc.tmp"
    dead.write_bytes(b"x" * 1000)
    live = tmp_path / f".model.gguf{TMP_MARKER}{os.getppid()}.abc.tmp"  # a running process: kept
    live.write_bytes(b"y")
    other = tmp_path / ".model.gguf.user-file.tmp"  # not ours: kept
    other.write_bytes(b"z")
    with caplog.at_level("WARNING"):
        write_bytes_atomic(out, b"new")
    assert out.read_bytes() == b"new"
    assert not dead.exists() and live.exists() and other.exists()
    assert "interrupted write" in caplog.text and dead.name in caplog.text


def test_temp_name_carries_pid_and_is_gone_after_failure(tmp_path):
    out = tmp_path / "o.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            assert tmp.name.startswith(f".o.bin{TMP_MARKER}{os.getpid()}.")
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_and_cleans(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_mode_for_secrets(tmp_path):
    p = write_bytes_atomic(tmp_path / "k", b"secret", mode=0o600)
    assert (p.stat().st_mode & 0o777) == 0o600
    assert remove_stale(p) == []
