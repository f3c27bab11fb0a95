"""The model-file layer: one way to open, describe and read GGUF and safetensors models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nestpatch.errors import BaseMismatchError, FormatError, InputError
from nestpatch.format.constants import BaseKey
from nestpatch.models.files import is_gguf, open_model
from nestpatch.models.loading import describe_model, torch_neuron_vectors
from nestpatch.provenance import library_versions, model_digest, patch_digest, text_digest


def test_is_gguf_ignores_case(tmp_path):
    assert is_gguf("m.gguf") and is_gguf("M.GGUF") and is_gguf(tmp_path / "x.Gguf")
    assert not is_gguf("m.safetensors") and not is_gguf("gguf")
    (tmp_path / "dir.gguf").mkdir()
    assert not is_gguf(tmp_path / "dir.gguf")


@pytest.mark.parametrize("fmt", ["safetensors", "F32", "Q8_0"])
def test_every_format_describes_and_reads_the_same_neurons(fmt, pico_model, pico_hf_dir, pico_gguf, pico_patch):
    """Description and neuron vectors agree with the torch model the files were written from."""
    path = pico_hf_dir if fmt == "safetensors" else pico_gguf(fmt)
    want = describe_model(pico_model)
    with open_model(path) as m:
        assert m.format == ("safetensors" if fmt == "safetensors" else "gguf")
        desc = m.describe()
        for key in (BaseKey.D_MODEL, BaseKey.N_FF, BaseKey.N_LAYERS):
            assert desc[key] == want[key], key
        tol = {"safetensors": 0.0, "F32": 0.0, "Q8_0": 0.02}[fmt]
        for t in pico_patch.targets:
            got = m.neuron_vectors(t)  # (n, d)
            ref = torch_neuron_vectors(pico_model, t)
            assert got.shape == ref.shape == (len(t.indices), t.shape[1] if t.axis == "row" else t.shape[0])
            assert np.abs(got - ref).max() <= tol * np.abs(ref).max() + 1e-7
            name = m.target_tensor(t.name)
            full = m.floats(name)  # (rows, cols), HF orientation
            idx = np.asarray(t.indices)
            np.testing.assert_array_equal(got, full[idx] if t.axis == "row" else full[:, idx].T)
            f, off, n = m.locate(name)
            assert f.is_file() and n == m.raw(name).nbytes and off + n <= f.stat().st_size


def test_wrong_shape_and_missing_files_are_one_line_errors(pico_hf_dir, pico_gguf, pico_patch, tmp_path):
    t = pico_patch.targets[0]
    bad = type(t)(t.name, t.axis, (t.shape[0] + 1, t.shape[1]), t.indices, t.clusters, t.deltas)
    for path in (pico_hf_dir, pico_gguf("F32")):
        with open_model(path) as m, pytest.raises(BaseMismatchError, match="shape"):
            m.neuron_vectors(bad)
    with pytest.raises(InputError, match="no such model"):
        open_model(tmp_path / "missing.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no \\*.safetensors"):
        open_model(empty)


def test_a_tensor_in_two_shards_is_refused(pico_hf_dir, tmp_path):
    d = tmp_path / "twice"
    shutil.copytree(pico_hf_dir, d)
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    src = next(d.glob("*.safetensors"))
    shutil.copy(src, d / "zz-copy.safetensors")
    with pytest.raises(FormatError, match="also appears in"):
        open_model(d)


def test_truncated_safetensors_is_a_format_error(pico_hf_dir, tmp_path):
    src = next(pico_hf_dir.glob("*.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated"):
        open_model(cut)


def test_digests_share_one_notation(pico_hf_dir, pico_patch):
    assert text_digest("{{ messages }}").startswith("sha256:") and text_digest(None) is None
    assert model_digest(pico_hf_dir).startswith("sha256:")
    assert patch_digest(pico_patch).startswith("sha256:")
    v = library_versions()
    assert v["numpy"] == np.__version__ and "python" in v and "llama-cpp-python" in v
    json.dumps(v)
