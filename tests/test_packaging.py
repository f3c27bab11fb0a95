"""The built wheel installs into a fresh venv and imports everything under ``nestpatch.*``."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = dist.glob("nestpatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"nestpatch"}, f"wheel has top-level entries outside nestpatch: {tops}"
    assert "nestpatch/converters/__init__.py" in names and "nestpatch/runtime/__init__.py" in names
    assert any(n.startswith("nestpatch/data/builtin/") for n in names) or not (ROOT / "nestpatch/data/builtin").exists()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # reuse this environment's third-party packages (numpy, torch...) without its editable nestpatch:
    # every site-packages directory on sys.path (a venv may reach its packages through a .pth of its
    # own, which a nested .pth would not follow)
    dirs = dict.fromkeys([sysconfig.get_paths()["purelib"]] + [p for p in sys.path if p.endswith("site-packages")])
    Path(site, "_reuse_parent.pth").write_text("".join(d + "\n" for d in dirs))
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, capture_output=True)
    code = (
        "import nestpatch, nestpatch.converters, nestpatch.runtime, nestpatch.format, nestpatch.cli;"
        "import importlib.util as u;"
        "assert u.find_spec('converters') is None and u.find_spec('runtime') is None;"
        "print(nestpatch.converters.__file__)"
    )
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert out.strip().startswith(site), out
    assert not (Path(site) / "converters").exists() and not (Path(site) / "runtime").exists()


def test_format_layer_imports_without_torch_or_llama():
    code = (
        "import sys; import nestpatch.format, nestpatch.fingerprint, nestpatch.models.naming;"
        "bad = [m for m in ('torch', 'llama_cpp', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
