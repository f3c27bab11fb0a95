"""LoRA exports reproduce the fold: llama.cpp adapter GGUF and PEFT directory, on pico models."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from nestpatch.converters.lora_export import export_gguf_lora, export_peft, max_rank
from nestpatch.errors import BaseMismatchError, UnsupportedError
from nestpatch.format import compute_digest
from nestpatch.testing import random_patch, write_gguf, write_hf_dir
from nestpatch.testing.pico import apply_patch_torch

TOKENS = [1, 504, 3458, 282, 2767, 314, 253, 1234, 28, 9, 4471, 30]


@pytest.fixture(scope="module")
def mixed_patch(pico_model):
    """Per-target ranks 1, 2 and 3 (so the alpha/rank scaling matters), with per-neuron scales."""
    p = random_patch(pico_model, seed=3, clusters=3, neurons_per_target=9, scales=True)
    t = p.targets[0]
    t.deltas, t.clusters = t.deltas[:1], np.zeros_like(t.clusters)
    t = p.targets[1]
    t.deltas, t.clusters = t.deltas[:2], (np.arange(t.n_neurons) % 2).astype(np.int32)
    from nestpatch.fingerprint import attach_sketches
    from nestpatch.models.loading import torch_neuron_vectors

    attach_sketches(p, lambda t: torch_neuron_vectors(pico_model, t))
    assert sorted({t.n_clusters for t in p.targets}) == [1, 2, 3]
    return p


def llama_logits(model_path, lora_path=None) -> np.ndarray:
    import llama_cpp

    kw = {"lora_path": str(lora_path)} if lora_path else {}
    # F32 KV cache: the default F16 cache rounds K/V differently for two equal-up-to-1e-7
    # computations, which would blur a comparison that should be at float32 precision
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0, **kw)
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float32)  # (T, vocab)
    finally:
        llm.close()


def test_gguf_adapter_in_llama_cpp_equals_folded_f32(pico_model, pico_gguf, mixed_patch, tmp_path):
    base = pico_gguf("F32")
    adapter = export_gguf_lora(mixed_patch, tmp_path / "adapter.gguf")
    folded = write_gguf(apply_patch_torch(pico_model, mixed_patch), tmp_path / "folded_ref.gguf")
    lb = llama_logits(base)
    lf = llama_logits(folded)
    la = llama_logits(base, adapter)
    assert np.abs(lf - lb).max() > 0.1  # the patch visibly moves the logits
    np.testing.assert_allclose(la, lf, rtol=0, atol=1e-4)
    try:
        from nestpatch.converters.gguf_fold import fold_gguf
    except ImportError:
        return
    fold_gguf(base, mixed_patch, tmp_path / "folded.gguf", progress=False)
    np.testing.assert_allclose(la, llama_logits(tmp_path / "folded.gguf"), rtol=0, atol=1e-4)


def test_gguf_adapter_layout(mixed_patch, tmp_path):
    from gguf import GGUFReader

    out = export_gguf_lora(mixed_patch, tmp_path / "a.gguf")
    r = GGUFReader(str(out))
    kv = {k: f.contents() for k, f in r.fields.items()}
    rank = max_rank(mixed_patch)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama"
    assert kv["adapter.lora.alpha"] == pytest.approx(rank)  # alpha / rank == 1 for every tensor
    assert kv["nestpatch.patch_digest"] == compute_digest(mixed_patch)
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * len(mixed_patch.targets)
    for t in mixed_patch.targets:
        layer = t.name.split(".")[2]
        mod = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[t.name.split(".")[4]]
        a = np.asarray(tensors[f"blk.{layer}.{mod}.weight.lora_a"].data)
        b = np.asarray(tensors[f"blk.{layer}.{mod}.weight.lora_b"].data)
        assert a.shape == (rank, t.shape[1]) and b.shape == (t.shape[0], rank)  # numpy (r, in), (out, r)
        np.testing.assert_array_equal(b @ a, t.dense_update())  # one-hot factors: exact
        assert not a[t.n_clusters:].any() and not b[:, t.n_clusters:].any()  # zero padding only


def test_gguf_adapter_checks_its_base(pico_model_other, mixed_patch, pico_gguf, tmp_path):
    out = export_gguf_lora(mixed_patch, tmp_path / "ok.gguf", base=pico_gguf("Q8_0"))  # same model, quantized
    assert out.is_file()
    other = write_hf_dir(pico_model_other, tmp_path / "other", tokenizer=False)
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        export_gguf_lora(mixed_patch, tmp_path / "bad.gguf", base=other)
    assert not (tmp_path / "bad.gguf").exists()


def test_peft_equals_dense_update_and_merge_equals_fold(pico_model, mixed_patch, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    from nestpatch.converters.safetensors_fold import fold_safetensors

    out = export_peft(mixed_patch, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == max_rank(mixed_patch)
    for t in mixed_patch.targets:
        mod = t.name[: -len(".weight")]
        assert mod in cfg["target_modules"]
        assert cfg["rank_pattern"][mod] == cfg["alpha_pattern"][mod] == t.n_clusters
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as st:
        t = mixed_patch.targets[-1]
        key = f"base_model.model.{t.name[:-len('.weight')]}"
        assert tuple(st.get_tensor(key + ".lora_A.weight").shape) == (t.n_clusters, t.shape[1])
        assert tuple(st.get_tensor(key + ".lora_B.weight").shape) == (t.shape[0], t.n_clusters)

    ids = torch.tensor([TOKENS])
    pm = PeftModel.from_pretrained(copy.deepcopy(pico_model), str(out)).eval()
    dense = apply_patch_torch(pico_model, mixed_patch)
    with torch.no_grad():
        got, want, base = pm(ids).logits, dense(ids).logits, pico_model(ids).logits
    assert (want - base).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    merged = pm.merge_and_unload()
    hf = write_hf_dir(pico_model, tmp_path / "hf", tokenizer=False)
    fold_safetensors(hf, mixed_patch, tmp_path / "folded", progress=False)
    with safe_open(str(tmp_path / "folded" / "model.safetensors"), framework="pt") as st:
        for t in mixed_patch.targets:
            torch.testing.assert_close(merged.get_parameter(t.name), st.get_tensor(t.name), rtol=0, atol=1e-6)


def test_exports_refuse_fused_tensors_and_write_nothing(mixed_patch, tmp_path):
    p = mixed_patch.copy()
    p.targets[0].name = "model.layers.0.mlp.gate_up_proj.weight"
    with pytest.raises(UnsupportedError, match="gate_up_proj"):
        export_gguf_lora(p, tmp_path / "a.gguf")
    with pytest.raises(UnsupportedError, match="gate_up_proj"):
        export_peft(p, tmp_path / "peft")
    assert list(tmp_path.iterdir()) == []
