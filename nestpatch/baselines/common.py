"""Pieces every baseline shares: the method context, its outcome, and small measurements.

Why one context object: the bench runs each method in its own process (so peak memory is the
method's own), and everything a method needs must travel as plain data (a JSON job file):
the model, the shared data configuration (``TrainConfig``, the same one ``nestpatch train``
uses, so every method trains on the same prompts, chat template, refusal targets and retain
term), the method's own options, and where to write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ContextManager, Iterator

from ..errors import InputError
from ..memory import peak_rss_mb
from ..train.config import TrainConfig

log = logging.getLogger(__name__)

#: File names inside a method's directory.
TRAIN_FILE = "train.json"
TRAIN_LOG = "train.jsonl"
ARTIFACT_DIR = "artifact"


@dataclass
class MethodContext:
    """What one method's training needs.

    Attributes:
        method: registry name (``nest``, ``lora``, ``full``, ``cb``).
        train_config: the shared NeST training configuration: data sources, chat template,
            refusal targets, retain term, seed, batch size, bf16, threads. Each method replaces
            ``steps`` and ``lr`` with its own (``options``).
        options: method options (``steps``, ``lr``, ``rank``...), defaults filled by the registry.
        out_dir: the method's directory (artifact, logs, evaluation runs).
        data_cache: JSON file holding the shared training sequences (made once, reused by every
            baseline so they all see the same refusal targets and base answers).
        progress: show progress bars.
    """

    method: str
    train_config: TrainConfig
    options: dict[str, Any]
    out_dir: Path
    data_cache: Path | None = None
    progress: bool = False

    def config_for_method(self, **extra: Any) -> TrainConfig:
        """The shared config with this method's ``steps``/``lr`` (and ``extra``) in place."""
        over = {k: self.options[k] for k in ("steps", "lr", "warmup_steps") if self.options.get(k) is not None}
        over.update(extra)
        return self.train_config.merged(over)


@dataclass
class TrainOutcome:
    """What a method's training produced (written to ``train.json``).

    Attributes:
        artifact: the file or directory the runtime loads (patch, PEFT adapter, weights).
        artifact_kind: ``nestpatch``, ``peft-lora`` or ``safetensors``.
        artifact_bytes: size on disk of the artifact (every file of a directory).
        trainable_parameters: parameters the optimizer updated.
        train_seconds: wall time of the method's own work (see ``timings`` for the split).
        peak_rss_mb: peak resident memory of the process at the end of training.
        loss_first, loss_final: loss of the first step and mean of the last ten (method's own terms).
        scope: what was trained, in words (for the table).
        timings: seconds per stage.
        details: anything else worth recording (ranks, layers, coefficients).
    """

    artifact: str
    artifact_kind: str
    artifact_bytes: int
    trainable_parameters: int
    train_seconds: float
    peak_rss_mb: float
    loss_first: dict[str, float] = field(default_factory=dict)
    loss_final: dict[str, float] = field(default_factory=dict)
    scope: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainOutcome":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ParamGroup:
    """Trainable parameters dressed as the NeST trainer's ``SharedDeltas``.

    :class:`nestpatch.train.trainer.Trainer` needs ``deltas`` (name -> parameter), ``specs``
    (objects with ``.name``) and ``disabled()`` (a context in which the model is the frozen
    base, for the KL retain term). Giving it those lets LoRA and full fine-tuning run through
    the very loop NeST trains with: same batches under the seed, same losses, same schedule,
    same clipping and NaN stop.
    """

    def __init__(self, params: dict[str, Any], disabled: Callable[[], ContextManager[Any]]) -> None:
        if not params:
            raise InputError("no trainable parameters")
        self.deltas = dict(params)
        self.specs = [SimpleNamespace(name=n) for n in self.deltas]
        self._disabled = disabled

    def disabled(self) -> ContextManager[Any]:
        return self._disabled()

    def parameters(self) -> Iterator[Any]:
        return iter(self.deltas.values())

    @property
    def trainable_parameters(self) -> int:
        return int(sum(p.numel() for p in self.deltas.values()))


# ------------------------------------------------------------------------------------ measurements


class RssSampler:
    """Peak RSS over a block, sampled (for in-process runs, where ``ru_maxrss`` covers the whole process).

    Usage: ``with RssSampler() as s: ...; s.peak_mb``.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss_mb(self) -> float:
        try:
            with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        except (OSError, ValueError):
            return peak_rss_mb()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to ``timings[key]`` (seconds, rounded)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 3)


def loss_summary(history: list[dict], keys: tuple[str, ...]) -> tuple[dict[str, float], dict[str, float]]:
    """First step's losses and the mean of the last ten steps (as the NeST trainer reports them)."""
    if not history:
        return {}, {}
    first = {k: round(float(history[0][k]), 6) for k in keys if k in history[0]}
    tail = history[-10:]
    final = {k: round(sum(float(r[k]) for r in tail) / len(tail), 6) for k in keys if k in tail[0]}
    return first, final


def read_jsonl(path: Path) -> list[dict]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
