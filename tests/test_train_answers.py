"""Base answers for training from llama.cpp on the model's own GGUF (``--answer-backend``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from nestpatch.errors import InputError
from nestpatch.models.loading import load_model
from nestpatch.train.config import TrainConfig
from nestpatch.train.examples import LlamaAnswers, generate_answers
from nestpatch.train.pipeline import answer_decoder

PROMPTS = ["How do I bake bread?", "Name three rivers.", "Write a haiku about rain.", "What is 2 + 2?", "Explain DNS.",
           "Tell me a joke.", "How do magnets work?", "List prime numbers below 20.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def gguf_model(pico_gguf: Callable[..., Path]) -> Any:
    return load_model(pico_gguf("F32"), device="cpu")


def test_llama_answers_match_torch_greedy_tokens(gguf_model: Any) -> None:
    """Same weights (F32 GGUF), same prompt ids: llama.cpp's batched greedy answers are torch's tokens."""
    tok = gguf_model.tokenizer
    ref = generate_answers(gguf_model.model, tok, PROMPTS, max_new_tokens=8, batch_size=4, max_length=64)
    llama = LlamaAnswers(gguf_model.source, threads=1, n_seq=4)
    try:
        got = generate_answers(gguf_model.model, tok, PROMPTS, max_new_tokens=8, max_length=64, llama=llama)
    finally:
        llama.close()
    assert len(got) == len(PROMPTS)
    same = sum(a == b for a, b in zip(got, ref))
    assert same >= len(PROMPTS) - 1, (got, ref)  # float32 in both; one tie may break differently
    assert all(1 <= len(a) <= 9 for a in got)


def test_backend_choice(gguf_model: Any, pico_hf_dir: Path) -> None:
    auto = answer_decoder(gguf_model, TrainConfig(model=str(gguf_model.source)))
    assert isinstance(auto, LlamaAnswers)
    auto.close()
    assert answer_decoder(gguf_model, TrainConfig(model="x", answer_backend="torch")) is None
    hf = load_model(pico_hf_dir, device="cpu")
    assert answer_decoder(hf, TrainConfig(model=str(pico_hf_dir))) is None
    with pytest.raises(InputError, match="needs a .gguf model"):
        answer_decoder(hf, TrainConfig(model=str(pico_hf_dir), answer_backend="llama"))
