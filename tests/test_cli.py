"""CLI conventions: version, one-line errors with exit 2, --debug keeps the traceback."""

from __future__ import annotations

import subprocess
import sys

from nestpatch import __version__


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nestpatch", *args], capture_output=True, text=True)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_missing_file_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope.nestpatch"
    r = run("inspect", str(missing))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {missing}: no such file"


def test_debug_keeps_traceback(tmp_path):
    missing = tmp_path / "nope.nestpatch"
    r = run("--debug", "validate", str(missing))
    assert r.returncode != 0 and "Traceback" in r.stderr and "FormatError" in r.stderr


def test_directory_instead_of_patch(tmp_path):
    r = run("validate", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
