"""The training sequences every baseline shares with ``nestpatch train``.

This is a thin adapter over :mod:`nestpatch.train.pipeline`: the same prompt loading (and its
HarmBench guard), the same chat template, the same refusal targets and the same base-model
answers for the retain term, built by the same functions under the same seed. They are made
once per bench (the base model's greedy answers are the slow part) and cached as JSON, so
LoRA, full fine-tuning and circuit breakers train on identical sequences.

Circuit breakers also need *harmful completions* to reroute (the representations of the model
complying): we use the base model's own greedy answers to the same harmful prompts, so no
extra data source enters the comparison.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..models.loading import LoadedModel, load_model
from ..train.config import TrainConfig
from ..train.examples import Example, generate_answers, prompt_ids

log = logging.getLogger(__name__)

CACHE_SCHEMA = "nestpatch-bench-data/1"


@dataclass
class SharedData:
    """Training sequences and where they came from.

    Attributes:
        harmful: harmful prompt -> refusal target.
        benign: benign prompt -> the base model's own answer (retain term).
        info: how targets were made (``refusal_targets``, judge...), from the train pipeline.
        sources: provenance entries of the prompt sets (source, rows, sha256).
        harmful_answers: harmful prompt -> the base model's own answer (circuit breakers only;
            empty until asked for).
    """

    harmful: list[Example]
    benign: list[Example]
    info: dict[str, Any]
    sources: list[dict]
    harmful_answers: list[Example] = field(default_factory=list)

    def to_json(self, key: str) -> dict:
        return {"schema": CACHE_SCHEMA, "key": key, "info": self.info, "sources": self.sources,
                "harmful": [e.to_json() for e in self.harmful], "benign": [e.to_json() for e in self.benign],
                "harmful_answers": [e.to_json() for e in self.harmful_answers]}

    @classmethod
    def from_json(cls, d: dict) -> "SharedData":
        ex = lambda rows: [Example.from_json(r) for r in rows]  # noqa: E731
        return cls(ex(d["harmful"]), ex(d["benign"]), d.get("info", {}), d.get("sources", []), ex(d.get("harmful_answers", [])))


def cache_key(cfg: TrainConfig) -> str:
    """What the cached sequences depend on: the training config's trajectory settings (seed included)."""
    return cfg.fingerprint()


def _load_cache(path: Path | None, key: str) -> SharedData | None:
    if path is None or not path.exists():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s: unreadable data cache; rebuilding it", path)
        return None
    if d.get("schema") != CACHE_SCHEMA or d.get("key") != key:
        log.info("%s: made with other settings; rebuilding it", path)
        return None
    return SharedData.from_json(d)


def save_cache(path: Path | None, data: SharedData, key: str) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data.to_json(key)), encoding="utf-8")


def build_shared_data(lm: LoadedModel, cfg: TrainConfig) -> SharedData:
    """Prompts -> training sequences exactly as ``nestpatch train`` makes them (same functions, same seed)."""
    from ..train import pipeline

    h_sets, b_sets = pipeline.load_training_prompts(cfg)
    harmful, h_cats = pipeline.merge_prompt_sets(h_sets)
    benign, _ = pipeline.merge_prompt_sets(b_sets)
    h_ex, b_ex, info = pipeline.build_examples(lm, cfg, harmful, h_cats, benign)
    sources = [s.provenance("harmful") for s in h_sets] + [s.provenance("benign") for s in b_sets]
    log.info("shared data: %d harmful, %d benign sequences (%s refusal targets)", len(h_ex), len(b_ex), info.get("refusal_targets"))
    return SharedData(h_ex, b_ex, info, sources)


def shared_data(lm: LoadedModel, cfg: TrainConfig, cache: Path | None = None, *, harmful_answers: bool = False) -> SharedData:
    """The shared sequences, from ``cache`` when it matches ``cfg``, else built (and cached).

    Args:
        harmful_answers: also make the base model's own answers to the harmful prompts.
    """
    cfg = cfg.resolved() if cfg.seed is None else cfg
    key = cache_key(cfg)
    data = _load_cache(cache, key)
    dirty = False
    if data is None:
        data, dirty = build_shared_data(lm, cfg), True
    if harmful_answers and not data.harmful_answers:
        prompts = [e.prompt for e in data.harmful]
        answers = generate_answers(lm.model, lm.tokenizer, prompts, max_new_tokens=cfg.retain_answer_tokens,
                                   batch_size=cfg.batch_size_detect, max_length=cfg.max_length)
        data.harmful_answers = [Example("harmful-answer", p, prompt_ids(lm.tokenizer, p, cfg.max_length), a)
                                for p, a in zip(prompts, answers) if a]
        dirty = True
    if dirty:
        save_cache(cache, data, key)
    return data


def load_method_inputs(ctx: Any, timings: dict[str, float], *, harmful_answers: bool = False) -> tuple[TrainConfig, LoadedModel, SharedData]:
    """Load the model and the data every method shares, timing both into ``timings``.

    One place for what each baseline's ``train`` starts with, so all methods load and time alike.
    """
    from .common import timed

    cfg = ctx.config_for_method()
    with timed(timings, "load_s"):
        lm = load_model(cfg.model, device=cfg.device)
    with timed(timings, "shared_data_s"):
        data = shared_data(lm, ctx.train_config, ctx.data_cache, harmful_answers=harmful_answers)
    return cfg, lm, data
