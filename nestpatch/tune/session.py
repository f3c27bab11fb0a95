"""One loaded model, many trainings: what a sweep or a tune study repeats, paid once.

``nestpatch train`` loads the model, detects, builds targets and trains for one config. A search
runs that for dozens of configs on the same model; :class:`TrainSession` keeps the model, the
pooled activations (keyed by what they depend on, see :func:`nestpatch.detect.detect`), the
neuron selection and the training sequences across them, and the base model's answers by prompt
(:mod:`nestpatch.train.answer_cache`: other seeds and samples reuse them). Selection, sequences
and answers are cached in memory and, when ``cache_dir`` is given, on disk (so a resumed search
skips them too). Cache keys hash every config field except those known not to matter for the
stage; a field added later misses the cache (slower, never wrong).
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..format import Patch
from ..models.loading import LoadedModel, load_model
from ..train.adapter import SharedDeltas, TargetSpec
from ..train.answer_cache import AnswerCache
from ..train.checkpoint import CheckpointDir
from ..train.config import TrainConfig
from ..train.examples import Example
from ..train.pipeline import build_examples, build_patch, load_training_prompts, merge_prompt_sets, select_neurons
from ..train.trainer import Trainer, TrainSummary

log = logging.getLogger(__name__)

#: Fields that only change outputs, runtime or bookkeeping (never a stage's result).
_RUNTIME = ("out", "policy_name", "policy_version", "policy_description", "delta_dtype", "device", "device_map", "bf16",
            "threads", "batch_size_detect", "checkpoint_every", "resume", "keep_checkpoint")
#: Fields read only by the optimizer loop.
_LOOP = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm", "qat",
         "retain_weight", "head_tokens", "head_weight", "benign_refusal_weight", "benign_refusal_tokens")
#: Fields read only by detection and clustering.
_DETECT = ("modules", "layers", "detector", "threshold", "min_weight", "max_neurons_per_module", "pool", "probe_epochs",
           "probe_lr", "probe_weight_decay", "probe_standardize", "clusters", "k_min", "k_max", "detect_prompts",
           "detect_resamples", "detect_consensus", "cluster_seed", "detect_pool")
#: Fields read only when building the training sequences.
_EXAMPLES = ("refusal_targets", "retain_loss", "retain_answer_tokens", "recovery_fraction", "recovery_tokens")


class LRUCache(OrderedDict):
    """A dict that keeps its ``maxsize`` most recently used entries.

    Why: pooled activations of a 1.5B model on 256 prompts take most of a gigabyte per
    module/layer choice; a search that tries many choices must not keep them all.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


def stage_key(cfg: TrainConfig, ignore: tuple[str, ...]) -> str:
    """Hash of the config fields not in ``ignore`` (the cache key of one stage)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class SessionRun:
    """One training of a session: the patch and what a search reports about it."""

    config: TrainConfig
    patch: Patch
    specs: list[TargetSpec]
    detection: dict
    clusters: dict
    summary: TrainSummary
    timings: dict = field(default_factory=dict)

    @property
    def neurons(self) -> int:
        return sum(len(s.indices) for s in self.specs)


class TrainSession:
    """A loaded model that trains many configs (see the module doc).

    Args:
        model: what ``--model`` takes (every config trained here must name the same model).
        cache_dir: where selections and training sequences are kept between processes (optional).
        activation_entries: pooled-activation sets kept in memory (each is one prompt/module/layer choice).
    """

    def __init__(self, model: str, *, device: str = "auto", device_map: str | None = None,
                 cache_dir: str | Path | None = None, lm: LoadedModel | None = None, activation_entries: int = 2) -> None:
        t = time.time()
        self.model_name = model
        self.lm = lm or load_model(model, device=device, device_map=device_map)
        self.load_s = round(time.time() - t, 2)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.activations: dict = LRUCache(activation_entries)
        self._selections: dict[str, tuple[list[TargetSpec], dict, dict]] = {}
        self._examples: dict[str, tuple[list[Example], list[Example], dict]] = {}
        # base-model answers by prompt: seeds and samples overlap, and their stage keys differ
        self.answers = AnswerCache.for_model(self.cache_dir, self.lm.source) if self.cache_dir else AnswerCache()
        tok = self.lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def _disk(self, name: str) -> CheckpointDir | None:
        return CheckpointDir(self.cache_dir / name) if self.cache_dir else None

    def selection(self, cfg: TrainConfig, harmful: list[str], benign: list[str]) -> tuple[list[TargetSpec], dict, dict]:
        """Target specs, detection stats and cluster stats for ``cfg`` (cached)."""
        key = stage_key(cfg, _RUNTIME + _LOOP + _EXAMPLES)
        if key in self._selections:
            return self._selections[key]
        disk = self._disk(f"sel-{key}")
        got = disk.load_selection() if disk and disk.exists() else None
        if got is not None:
            specs, info = got
            det, cstats = info["detection"], info["clusters"]
        else:
            specs, det, _, cstats = select_neurons(self.lm, cfg, harmful, benign, cache=self.activations)
            if disk:
                disk.save_selection(specs, {"detection": det, "clusters": cstats})
        self._selections[key] = (specs, det, cstats)
        return self._selections[key]

    def examples(self, cfg: TrainConfig, harmful: list[str], h_cats: list[str | None], benign: list[str]
                 ) -> tuple[list[Example], list[Example], dict]:
        """Harmful and benign training sequences for ``cfg`` (cached).

        ``--neurons`` replaces detection only: a run on another patch's neurons shares the sequences
        of the same config without it (keyed as if unset, so earlier caches stay valid).
        """
        key = stage_key(dataclasses.replace(cfg, neurons=None), _RUNTIME + _LOOP + _DETECT)
        if key in self._examples:
            return self._examples[key]
        disk = self._disk(f"ex-{key}")
        got = disk.load_examples() if disk else None
        if got is None:
            got = build_examples(self.lm, cfg, harmful, h_cats, benign, answers=self.answers)
            if disk:
                disk.save_examples(*got)
        self._examples[key] = got
        return got

    def train(self, cfg: TrainConfig, log_path: str | Path | None = None) -> SessionRun:
        """Detect (cached), build sequences (cached), train and return the patch; the model is left unpatched."""
        cfg = cfg.resolved()
        if cfg.model != self.model_name:
            raise ValueError(f"session holds {self.model_name!r}, config names {cfg.model!r}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        timings: dict[str, float] = {}
        h_sets, b_sets = load_training_prompts(cfg)
        harmful, h_cats = merge_prompt_sets(h_sets)
        benign, _ = merge_prompt_sets(b_sets)
        t = time.time()
        specs, det, cstats = self.selection(cfg, harmful, benign)
        timings["detect_cluster_s"] = round(time.time() - t, 2)
        t = time.time()
        h_ex, b_ex, ex_info = self.examples(cfg, harmful, h_cats, benign)
        timings["targets_s"] = round(time.time() - t, 2)
        torch.manual_seed(int(cfg.seed))  # type: ignore[arg-type]
        deltas = SharedDeltas(self.lm.model, specs, qat=cfg.qat).attach()
        try:
            if log_path is not None:
                Path(log_path).unlink(missing_ok=True)
            t = time.time()
            summary = Trainer(self.lm.model, deltas, h_ex, b_ex, cfg, pad_id=self.pad_id,
                              log_path=Path(log_path) if log_path else None).run()
            timings["train_s"] = round(time.time() - t, 2)
            patch = build_patch(self.lm, cfg, deltas, h_sets, b_sets, ex_info, det, cstats, summary, timings)
        finally:
            deltas.detach()
        return SessionRun(cfg, patch, specs, det, cstats, summary, timings)
