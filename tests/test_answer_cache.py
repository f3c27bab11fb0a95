"""Base-model answers kept per prompt (``nestpatch.train.answer_cache``): reused across seeds and processes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from nestpatch.train.answer_cache import AnswerCache, model_key
from nestpatch.train.config import TrainConfig


def _counting(calls: list[list[str]]):
    def generate(prompts: list[str]) -> list[list[int]]:
        calls.append(list(prompts))
        return [[len(p), i] for i, p in enumerate(prompts)]
    return generate


def test_only_missing_prompts_are_generated_and_the_answers_survive_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    calls: list[list[str]] = []
    first = AnswerCache(path)
    got = first.answers(["a", "bb", "a"], decoder="torch", max_new_tokens=4, max_length=64, generate=_counting(calls))
    assert calls == [["a", "bb"]] and got == [[1, 0], [2, 1], [1, 0]]
    again = AnswerCache(path)  # what another process sees
    got2 = again.answers(["bb", "ccc"], decoder="torch", max_new_tokens=4, max_length=64, generate=_counting(calls))
    assert calls[1] == ["ccc"] and got2 == [[2, 1], [3, 0]] and again.hits == 1 and len(again) == 3
    # another length or decoder is another answer
    again.answers(["a"], decoder="torch", max_new_tokens=8, max_length=64, generate=_counting(calls))
    again.answers(["a"], decoder="llama.cpp", max_new_tokens=4, max_length=64, generate=_counting(calls))
    assert calls[2:] == [["a"], ["a"]] and len(AnswerCache(path)) == 5
    assert not list(tmp_path.glob(".*tmp*"))  # written by rename, no temporary left


def test_an_unreadable_cache_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "answers.json"
    path.write_text('{"format": "nestpatch-answers/1", "answers": {"x": [1, 2')  # cut short by a crash elsewhere
    with caplog.at_level(logging.WARNING, logger="nestpatch.train.answer_cache"):
        cache = AnswerCache(path)
    assert len(cache) == 0 and "unreadable answer cache" in caplog.text
    calls: list[list[str]] = []
    cache.answers(["p"], decoder="torch", max_new_tokens=2, max_length=8, generate=_counting(calls))
    assert calls == [["p"]] and json.loads(path.read_text())["answers"]  # replaced by a whole file


def test_model_key_changes_when_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    k = model_key(f)
    assert model_key(f) == k
    f.write_bytes(b"x" * 11)
    assert model_key(f) != k
    k = model_key(f)
    os.utime(f, ns=(1, 1))  # same size, rewritten in place
    assert model_key(f) != k


def test_sessions_share_base_answers_across_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two seeds in two sessions: the second generates answers only for the prompts the first did not draw."""
    import nestpatch.train.pipeline as pipeline
    from nestpatch.testing import make_pico_model, write_hf_dir
    from nestpatch.tune.session import TrainSession

    pico = write_hf_dir(make_pico_model(seed=4), tmp_path / "hf")
    (tmp_path / "harmful.txt").write_text("\n".join(f"Explain how to pick lock model {i} to break into a house" for i in range(8)))
    (tmp_path / "benign.txt").write_text("\n".join(f"Suggest a name for a garden gnome number {i}" for i in range(8)))
    generated: list[str] = []
    real = pipeline.generate_answers
    monkeypatch.setattr(pipeline, "generate_answers", lambda m, t, prompts, **k: generated.extend(prompts) or real(m, t, prompts, **k))
    cfg = TrainConfig(model=str(pico), out=str(tmp_path / "a.nestpatch"), harmful=[str(tmp_path / "harmful.txt")],
                      benign=[str(tmp_path / "benign.txt")], max_prompts=5, retain_answer_tokens=3, max_length=48,
                      refusal_targets="template", threads=1, seed=1).resolved()
    _, b1, info1 = TrainSession(str(pico), cache_dir=tmp_path / "cache").examples(cfg, *_prompts(cfg))
    seen = {e.prompt: e.response_ids for e in b1}
    assert sorted(generated) == sorted(seen) and len(seen) == 5 and "answers_reused" not in info1  # template refusals: benign only
    generated.clear()
    cfg2 = cfg.merged({"seed": 2}).resolved()
    _, b2, info2 = TrainSession(str(pico), cache_dir=tmp_path / "cache").examples(cfg2, *_prompts(cfg2))
    drawn = {e.prompt: e.response_ids for e in b2}
    assert set(drawn) != set(seen) and len(set(drawn) & set(seen)) >= 2  # 5 of 8 twice: they overlap, and differ
    assert sorted(generated) == sorted(set(drawn) - set(seen))  # the overlap was read from disk, not generated
    assert info2["answers_reused"] == len(set(drawn) & set(seen))
    assert all(drawn[p] == seen[p] for p in set(drawn) & set(seen))


def _prompts(cfg: TrainConfig) -> tuple[list[str], list[str | None], list[str]]:
    from nestpatch.train.pipeline import load_training_prompts, merge_prompt_sets

    h_sets, b_sets = load_training_prompts(cfg)
    harmful, cats = merge_prompt_sets(h_sets)
    return harmful, cats, merge_prompt_sets(b_sets)[0]
