"""The pico fixtures are real: transformers and llama.cpp load them and agree on the logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nestpatch.errors import BaseMismatchError
from nestpatch.fingerprint import check_base
from nestpatch.format import read_patch, validate_patch, write_patch
from nestpatch.models.loading import torch_neuron_vectors
from nestpatch.testing.pico import apply_patch_torch, permute_qk, random_patch, smollm2_tokenizer, unpermute_qk

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # (T, vocab)


def _llama_logits(path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0,
                          type_k=0, type_v=0)  # F32 KV cache: the default F16 cache costs ~1e-3
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, vocab)
    finally:
        llm.close()


def test_tokenizer_is_smollm2():
    tok = smollm2_tokenizer()
    assert len(tok) == 49152
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")


def test_qk_permutation_roundtrip():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    p = permute_qk(w, 2)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, 2), w)
    # head 0 rows [0 1 2 3] (halves [0 1] / [2 3]) become pairs (0, 2), (1, 3)
    np.testing.assert_array_equal(p[:4, 0], w[[0, 2, 1, 3], 0])


def test_hf_dir_roundtrip(pico_model, pico_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (pico_hf_dir / "model.safetensors").exists()
    cfg = json.loads((pico_hf_dir / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["tie_word_embeddings"] is True
    m = AutoModelForCausalLM.from_pretrained(str(pico_hf_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(pico_hf_dir))
    ids = tok(PROMPT)["input_ids"]
    np.testing.assert_array_equal(_hf_logits(m, ids), _hf_logits(pico_model, ids))


def test_sharded_hf_dir(pico_model, tmp_path):
    from nestpatch.testing import write_hf_dir

    out = write_hf_dir(pico_model, tmp_path / "sharded", dtype="bfloat16", max_shard_size="4MB", tokenizer=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2


@pytest.mark.parametrize("qtype,atol,rel", [("F32", 2e-4, 1e-4), ("Q8_0", 0.3, 0.03)])
def test_gguf_logits_match_transformers(pico_model, pico_gguf, qtype, atol, rel):
    """Same logits in llama.cpp and transformers: proves names, Q/K permutation and KV are right."""
    tok = smollm2_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    ref = _hf_logits(pico_model, ids)
    got = _llama_logits(pico_gguf(qtype), ids)
    assert got.shape == ref.shape
    assert float(np.abs(ref).max()) > 1.0  # logits spread: the comparison means something
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < rel
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_every_gguf_type_runs_in_llama_cpp(pico_gguf, qtype):
    tok = smollm2_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    got = _llama_logits(pico_gguf(qtype), ids)
    assert np.isfinite(got).all() and got.std() > 0.1


def test_random_patch_is_valid_and_fingerprinted(pico_model, pico_model_other, pico_patch, tmp_path):
    validate_patch(pico_patch)
    assert pico_patch.base["d_model"] == 64 and pico_patch.base["n_ff"] == 256
    assert len(pico_patch.targets) == 6 and all(t.base_sketch is not None for t in pico_patch.targets)
    for t in pico_patch.targets:
        assert np.bincount(t.clusters, minlength=t.n_clusters).min() > 0
        vec = torch_neuron_vectors(pico_model, t)  # (n, d)
        ratio = np.linalg.norm(t.neuron_deltas(), axis=1).mean() / np.linalg.norm(vec, axis=1).mean()
        assert 0.2 < ratio < 1.0  # about `scale` (0.5) of the neuron vectors' norm
    q = read_patch(write_patch(pico_patch, tmp_path / "p.nestpatch"))
    check_base(q, lambda t: torch_neuron_vectors(pico_model, t), "pico")
    with pytest.raises(BaseMismatchError, match="does not match"):
        check_base(q, lambda t: torch_neuron_vectors(pico_model_other, t), "other")


def test_patch_changes_logits_visibly(pico_model, pico_patch):
    ids = smollm2_tokenizer()(PROMPT)["input_ids"]
    base = _hf_logits(pico_model, ids)
    patched = _hf_logits(apply_patch_torch(pico_model, pico_patch), ids)
    diff = np.abs(patched - base).max()
    assert 0.05 < diff < 50, diff
    assert np.isfinite(patched).all()


def test_random_patch_options(pico_model):
    p = random_patch(pico_model, seed=3, modules=("down_proj",), neurons_per_target=3, clusters=5, layers=[1], scales=True)
    (t,) = p.targets
    assert t.name == "model.layers.1.mlp.down_proj.weight" and t.axis == "col"
    assert t.n_clusters == 3 and t.scales is not None  # never more clusters than neurons
    assert list(t.indices) == sorted(set(t.indices))
