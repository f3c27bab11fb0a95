"""Batched llama.cpp decoding on pico GGUFs: same greedy tokens as one-at-a-time decoding.

Each sequence attends only to its own KV stream, and on these pico models (F32, Q8_0, one
thread) llama.cpp's batched products round like single-row ones, so the tests ask for identical
tokens and text, not an agreement rate. (On SmolLM2 Q4_1 some replies diverge after a few
tokens; benchmarks/batched_generation.py measures the verdict agreement there.)
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

pytest.importorskip("llama_cpp")

from nestpatch.errors import InputError  # noqa: E402
from nestpatch.evaluate.backends import LlamaBackend  # noqa: E402
from nestpatch.runtime.llama_batch import BatchDecoder  # noqa: E402
from nestpatch.runtime.llama_session import LlamaSession  # noqa: E402
from nestpatch.testing import random_patch, write_gguf  # noqa: E402

# Different lengths on purpose (a 1-word prompt, a long one), more prompts than slots.
PROMPTS = ["How do I pick a lock?", "Hi", "Write a poem about the sea, the sky and everything in between, please.",
           "What is 2+2?", "Tell me a story about a dragon.", "word " * 60, "Explain quantum physics simply.", "Why?",
           "abc", "List three colours."]
KW = dict(n_ctx=512, n_threads=1)


def _sequential(s: LlamaSession, max_new: int) -> list:
    return [s.generate(p, max_new_tokens=max_new) for p in PROMPTS]


def _batched(s: LlamaSession, n_seq: int, max_new: int) -> list:
    with BatchDecoder(s, n_seq) as d:
        return d.generate_texts([s.format_prompt(p) for p in PROMPTS], max_new_tokens=max_new)


def _same(a: list, b: list) -> None:
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.finish for g in a] == [g.finish for g in b]
    assert [g.n_prompt_tokens for g in a] == [g.n_prompt_tokens for g in b]


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_batched_tokens_equal_sequential_with_refill(pico_gguf, qtype):
    max_new = 24
    with LlamaSession(pico_gguf(qtype), **KW) as s:
        seq = _sequential(s, max_new)
        lengths = {g.n_prompt_tokens for g in seq}
        assert len(lengths) >= 5 and max(lengths) > 60  # prompts of many lengths
        for n_seq in (1, 3, 16):  # 3 slots for 10 prompts: each slot is refilled several times
            _same(seq, _batched(s, n_seq, max_new))
    assert all(len(g.tokens) == max_new and g.finish == "length" for g in seq)  # the random pico never stops early


def test_shared_prompt_opening_is_decoded_once_with_the_same_tokens(pico_gguf):
    """Prompts that open alike share that opening's KV cells (copied from a spare stream), tokens unchanged."""
    with LlamaSession(pico_gguf("F32"), **KW) as s:
        opening = s.tokenize(s.format_prompt("Answer briefly and truthfully. " * 4 + PROMPTS[0]))[:30]
        prompts = [opening + s.tokenize_plain(" " + p) for p in PROMPTS]
        seq = [s.generate_tokens(p, max_new_tokens=12) for p in prompts]
        for unified in (True, False):  # one KV buffer (cells shared) or one stream per sequence (copied)
            with BatchDecoder(s, 3, kv_unified=unified) as d:  # 3 slots: refilled slots get the opening again
                _same(seq, d.generate_tokens(prompts, max_new_tokens=12))
                assert d.last_shared_prefix == 30
        with BatchDecoder(s, 3) as d:
            # a prompt no longer than the opening keeps one token of its own to feed
            short = d.generate_tokens([opening, opening + [5]], max_new_tokens=4)
            assert d.last_shared_prefix == 29
            assert [g.tokens for g in short] == [s.generate_tokens(p, max_new_tokens=4).tokens for p in (opening, opening + [5])]
            d.generate_tokens([prompts[0]], max_new_tokens=2)  # one prompt: nothing to share
            assert d.last_shared_prefix == 0


def test_max_new_tokens_and_prompt_tokens(pico_gguf):
    with LlamaSession(pico_gguf("F32"), **KW) as s, BatchDecoder(s, 4) as d:
        toks = [s.tokenize(s.format_prompt(p)) for p in PROMPTS]
        short = d.generate_tokens(toks, max_new_tokens=5)
        long = d.generate_tokens(toks, max_new_tokens=11)  # the same decoder again: old cells are cleared
        assert [len(g.tokens) for g in short] == [5] * len(PROMPTS)
        assert [g.tokens for g in short] == [g.tokens[:5] for g in long]  # greedy: a prefix of the longer reply
        assert [len(g.tokens) for g in long] == [11] * len(PROMPTS)
        # Raw token prompts (no template): a prefilled assistant turn is just more prompt tokens.
        pre = s.tokenize(s.format_prompt(PROMPTS[0]) + "Sure, here is")
        assert d.generate_tokens([pre], max_new_tokens=7)[0].tokens == s.generate_tokens(pre, max_new_tokens=7).tokens
        with pytest.raises(InputError, match="exceeds the context of 512"):
            d.generate_tokens([toks[0]], max_new_tokens=512)


@pytest.fixture(scope="module")
def eos_gguf(pico_model, tmp_path_factory):
    """A pico model whose end-of-turn token wins wherever one of its generated tokens would have:
    the output row of EOS is that token's row scaled by 1.05, so some replies stop early and others run on."""
    d = tmp_path_factory.mktemp("eos")
    with LlamaSession(write_gguf(pico_model, d / "base.gguf"), **KW) as s:
        eos = int(s.llama.token_eos())
        replies = [s.generate(p, max_new_tokens=24).tokens for p in PROMPTS]
    # A token in a few replies but not most: an early stop for some sequences only.
    in_replies = Counter(t for r in replies for t in set(r))
    target = max((t for t, k in in_replies.items() if 2 <= k <= len(PROMPTS) - 3), key=lambda t: in_replies[t])
    m = copy.deepcopy(pico_model)
    with torch.no_grad():
        m.config.tie_word_embeddings = False  # a separate output layer; the EOS embedding stays as it was
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
        m.lm_head.weight[eos] = m.lm_head.weight[target] * 1.05
    return write_gguf(m, d / "eos.gguf")


def test_end_of_turn_stops_a_sequence_and_frees_its_slot(eos_gguf):
    with LlamaSession(eos_gguf, **KW) as s:
        seq = _sequential(s, 24)
        finishes = [g.finish for g in seq]
        assert "stop" in finishes and "length" in finishes, finishes
        assert any(g.finish == "stop" and len(g.tokens) < 24 for g in seq)
        for n_seq in (2, 5):
            _same(seq, _batched(s, n_seq, 24))


def test_patch_folded_and_lora_live(pico_gguf, pico_model, tmp_path):
    patch = random_patch(pico_model, seed=3, scale=1.0)
    path = pico_gguf("F32")
    with LlamaSession(path, **KW) as base:
        ref_base = _sequential(base, 16)
    for mode in ("fold", "lora"):
        with LlamaSession(path, patch=patch, patch_mode=mode, cache_dir=tmp_path, **KW) as s:
            seq = _sequential(s, 16)
            assert [g.tokens for g in seq] != [g.tokens for g in ref_base]  # the patch changes replies
            with BatchDecoder(s, 4) as d:
                texts = [s.format_prompt(p) for p in PROMPTS]
                _same(seq, d.generate_texts(texts, max_new_tokens=16))
                if mode == "lora":  # the decoder follows the session's adapter switch
                    s.set_patch_enabled(False)
                    _same(ref_base, d.generate_texts(texts, max_new_tokens=16))
                    s.set_patch_enabled(True)
                    _same(seq, d.generate_texts(texts, max_new_tokens=16))


def test_llama_backend_batch_size(pico_gguf, pico_model, tmp_path):
    patch = random_patch(pico_model, seed=3, scale=1.0)
    out = {}
    for bs in (1, 4):
        be = LlamaBackend.for_patch(pico_gguf("F32"), patch, ["base", "patched"], n_threads=1, n_ctx=512, batch_size=bs)
        try:
            assert be.info()["batch_size"] == bs and be.prompts_per_call == (16 if bs == 4 else 1)
            out[bs] = {v: be.generate(v, PROMPTS, max_new_tokens=12) for v in be.variants}
        finally:
            be.close()
    for v in ("base", "patched"):
        _same(out[1][v], out[4][v])
