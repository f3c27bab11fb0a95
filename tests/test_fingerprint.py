"""The base fingerprint accepts the same model in other formats/precisions and refuses another model."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from nestpatch.errors import BaseMismatchError
from nestpatch.fingerprint import check_base, projection_matrix, sketch
from nestpatch.models.naming import hf_to_gguf
from nestpatch.testing import write_hf_dir


def gguf_getter(path):
    """Neuron vectors of a target read from a GGUF file (dequantized)."""
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def get(target):
        t = tensors[hf_to_gguf(target.name)]
        w = dequantize(t.data, t.tensor_type).reshape(target.shape)  # numpy view == HF (out, in)
        return w[target.indices] if target.axis == "row" else w[:, target.indices].T

    return get


def safetensors_getter(model_dir):
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))

    def get(target):
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                if target.name in st.keys():
                    w = st.get_tensor(target.name).float().numpy()
                    return w[target.indices] if target.axis == "row" else w[:, target.indices].T
        raise KeyError(target.name)

    return get


def test_projection_matrix_is_deterministic_and_rademacher():
    a = projection_matrix("model.layers.0.mlp.up_proj.weight", 64)
    b = projection_matrix("model.layers.0.mlp.up_proj.weight", 64)
    c = projection_matrix("model.layers.1.mlp.up_proj.weight", 64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("qtype,max_err", [("F32", 1e-6), ("F16", 0.01), ("Q8_0", 0.02), ("Q4_1", 0.2)])
def test_same_model_other_gguf_precision_passes(pico_patch, pico_gguf, qtype, max_err):
    errs = check_base(pico_patch, gguf_getter(pico_gguf(qtype)), f"pico.{qtype}.gguf")
    assert len(errs) == len(pico_patch.targets)
    assert max(errs.values()) <= max_err, errs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_same_model_safetensors_precision_passes(pico_model, pico_patch, tmp_path, dtype):
    d = write_hf_dir(pico_model, tmp_path / dtype, dtype=dtype, tokenizer=False)
    errs = check_base(pico_patch, safetensors_getter(d), str(d))
    assert max(errs.values()) < 0.02


def test_k_quant_passes(pico_patch_k, pico_gguf):
    errs = check_base(pico_patch_k, gguf_getter(pico_gguf("Q4_K")), "pico.Q4_K.gguf")
    assert max(errs.values()) < 0.2, errs


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_other_model_is_refused_naming_the_tensor(pico_patch, pico_model_other, pico_gguf, qtype):
    other = pico_gguf(qtype, pico_model_other)
    with pytest.raises(BaseMismatchError) as e:
        check_base(pico_patch, gguf_getter(other), str(other))
    msg = str(e.value)
    assert pico_patch.targets[0].name in msg and str(other) in msg and "relative error" in msg
    # measured gap: another model sits far above the tolerance
    t = pico_patch.targets[0]
    err = np.linalg.norm(sketch(t.name, gguf_getter(other)(t)) - t.base_sketch) / np.linalg.norm(t.base_sketch)
    assert err > 1.0
