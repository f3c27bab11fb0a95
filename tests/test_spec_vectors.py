"""The spec's test vectors: the reference reader decodes them exactly, refuses the invalid ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from nestpatch.cli import cli
from nestpatch.errors import FormatError
from nestpatch.format import read_document, read_patch

SPEC = Path(__file__).resolve().parents[1] / "spec"
VALID = sorted((SPEC / "vectors").glob("*.nestpatch"))
INVALID = sorted((SPEC / "vectors" / "invalid").glob("*.nestpatch"))


def test_vectors_exist():
    assert len(VALID) >= 2 and len(INVALID) >= 6


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector_decodes_to_expected_json(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    p = read_patch(path)
    _, doc = read_document(path)
    assert doc == expected["metadata"]
    for t, e in zip(p.targets, expected["targets"], strict=True):
        assert (t.name, t.axis, list(t.shape)) == (e["name"], e["axis"], e["shape"])
        assert t.indices.tolist() == e["indices"] and t.clusters.tolist() == e["clusters"]
        np.testing.assert_array_equal(np.asarray(t.deltas, np.float32), np.array(e["deltas"], np.float32))
        np.testing.assert_array_equal(t.dense_update(), np.array(e["dense_update"], np.float32))


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_metadata_matches_json_schema(path):
    schema = json.loads((SPEC / "metadata.schema.json").read_text())
    _, doc = read_document(path)
    jsonschema.validate(doc, schema)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector_is_refused_with_its_reason(path):
    reason = path.with_suffix(".txt").read_text().strip()
    with pytest.raises(FormatError, match=reason):
        read_patch(path)


def test_vectors_are_reproducible(tmp_path):
    """make_vectors.py regenerates byte-identical files (the vectors are not hand-edited)."""
    import shutil

    work = tmp_path / "vectors"
    shutil.copytree(SPEC / "vectors", work)
    subprocess.run([sys.executable, str(work / "make_vectors.py")], check=True)
    for f in sorted((SPEC / "vectors").rglob("*.nestpatch")):
        assert (work / f.relative_to(SPEC / "vectors")).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_cli_inspect_and_validate_vectors(path):
    r = CliRunner().invoke(cli, ["validate", str(path)])
    assert r.exit_code == 0 and ": ok (" in r.output
    r = CliRunner().invoke(cli, ["inspect", "--json", str(path)])
    assert r.exit_code == 0
    s = json.loads(r.output)
    assert s["neurons"] == sum(len(t["indices"]) for t in json.loads(path.with_suffix(".json").read_text())["targets"])
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    assert r.exit_code == 0 and "policy     spec-vector 1.0" in r.output


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_cli_refuses_invalid_with_one_line_exit_2(path):
    r = subprocess.run([sys.executable, "-m", "nestpatch.cli", "validate", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}")
    assert "Traceback" not in r.stderr
