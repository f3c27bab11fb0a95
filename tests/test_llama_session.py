"""llama.cpp sessions on pico GGUFs: folded vs LoRA-live vs the torch reference, switching, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: E402, F401  (a required test dependency: a broken install fails, never skips)
from nestpatch.errors import BaseMismatchError, NestpatchError, UnsupportedError  # noqa: E402
from nestpatch.runtime.llama_session import LlamaSession, render_chat_template  # noqa: E402
from nestpatch.testing.pico import apply_patch_torch, random_patch  # noqa: E402

PROMPT = "How do I pick a lock?"


@pytest.fixture(scope="module")
def strong_patch(pico_model):
    return random_patch(pico_model, seed=3, scale=1.0)


def _torch_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


@pytest.mark.parametrize("qtype,tol,agree", [("F32", 0.02, 0.95), ("Q8_0", 0.15, 0.85)])
def test_folded_and_lora_live_agree(pico_model, pico_gguf, strong_patch, tmp_path, qtype, tol, agree):
    path = pico_gguf(qtype)
    kw = dict(n_ctx=256, logits_all=True, cache_dir=tmp_path, n_threads=1)
    with LlamaSession(path, **kw) as base, \
            LlamaSession(path, patch=strong_patch, patch_mode="fold", **kw) as fold, \
            LlamaSession(path, patch=strong_patch, patch_mode="lora", **kw) as lora:
        toks = base.tokenize(base.format_prompt(PROMPT))
        lb, lf, ll = base.logits(toks), fold.logits(toks), lora.logits(toks)
        assert fold.loaded_path != base.loaded_path and fold.loaded_path.parent == tmp_path
        assert lora.loaded_path == base.base_path and lora.lora_file is not None
    effect = float(np.abs(ll - lb).max())
    gap = float(np.abs(lf - ll).max())
    assert effect > 0.5  # the patch really changes the logits ...
    assert gap < tol, (gap, effect)  # ... and fold and LoRA change them the same way
    top1 = float((lf.argmax(-1) == ll.argmax(-1)).mean())
    assert top1 >= agree  # near-ties of a random model can swap under re-quantization
    if qtype == "F32":  # both match the torch reference of base + dense update
        ref = _torch_logits(apply_patch_torch(pico_model, strong_patch), toks)
        assert float(np.abs(ll - ref).max()) < tol and float(np.abs(lf - ref).max()) < tol


def test_lora_switches_in_place_exactly(pico_gguf, strong_patch, tmp_path):
    path = pico_gguf("F32")
    with LlamaSession(path, n_ctx=256, logits_all=True, n_threads=1) as base, \
            LlamaSession(path, patch=strong_patch, patch_mode="lora", n_ctx=256, logits_all=True, cache_dir=tmp_path,
                         n_threads=1) as s:
        toks = s.tokenize(s.format_prompt(PROMPT))
        on = s.logits(toks)
        assert s.patch_enabled
        s.set_patch_enabled(False)
        assert not s.patch_enabled
        np.testing.assert_array_equal(s.logits(toks), base.logits(toks))
        s.set_patch_enabled(True)
        np.testing.assert_array_equal(s.logits(toks), on)


def test_generate_greedy_streams_and_defaults(pico_gguf, strong_patch, tmp_path):
    with LlamaSession(pico_gguf("F32"), n_ctx=64) as d:
        assert d.n_threads == os.cpu_count()  # llama.cpp's own default is 1 thread
    # one thread below: CI machines are shared, and llama.cpp's spinning workers collapse when
    # more threads than free cores compete (measured: 2 threads on a loaded 2-core box, 5 tok/s)
    with LlamaSession(pico_gguf("F32"), patch=strong_patch, n_ctx=256, cache_dir=tmp_path, n_threads=1) as s:
        pieces: list[str] = []
        g = s.generate(PROMPT, max_new_tokens=12, on_text=pieces.append)
        assert "".join(pieces) == g.text and 0 < g.n_new_tokens <= 12
        assert g.finish in ("stop", "length") and g.prompt_text.endswith("<|im_start|>assistant\n")
        again = s.generate(PROMPT, max_new_tokens=12)
        assert again.tokens == g.tokens  # greedy: deterministic
        with pytest.raises(UnsupportedError, match="only a LoRA-live session"):
            s.set_patch_enabled(False)
        info = s.info()
        assert info["patch_mode"] == "fold" and info["loaded"].endswith(".gguf")


def test_fold_is_cached(pico_gguf, strong_patch, tmp_path):
    path = pico_gguf("F32")
    with LlamaSession(path, patch=strong_patch, n_ctx=128, cache_dir=tmp_path, n_threads=1) as a:
        first = a.loaded_path
        mtime = first.stat().st_mtime_ns
    with LlamaSession(path, patch=strong_patch, n_ctx=128, cache_dir=tmp_path, n_threads=1) as b:
        assert b.loaded_path == first and first.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("mode", ["fold", "lora"])
def test_patch_for_another_model_is_refused(pico_model_other, pico_gguf, tmp_path, mode):
    other = random_patch(pico_model_other, seed=4)
    with pytest.raises(BaseMismatchError):
        LlamaSession(pico_gguf("F32"), patch=other, patch_mode=mode, n_ctx=128, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing derived from a refused patch


def test_unloadable_model_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(NestpatchError, match="bad.gguf: llama.cpp cannot load it") as e:
        LlamaSession(bad, n_ctx=128)
    assert "\n" not in str(e.value)
    with pytest.raises(NestpatchError, match="no such GGUF file"):
        LlamaSession(tmp_path / "missing.gguf")


def test_chat_template_matches_transformers(pico_gguf):
    from nestpatch.testing.pico import smollm2_tokenizer

    tok = smollm2_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    with LlamaSession(pico_gguf("F32"), n_ctx=128, n_threads=1) as s:
        ours = s.format_messages(msgs)
        assert ours == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert s.tokenize(ours) == list(tok(ours, add_special_tokens=False)["input_ids"])
    assert render_chat_template("{{ bos_token }}{{ messages[0]['content'] }}", msgs, bos_token="<s>") == "<s>Be brief."
