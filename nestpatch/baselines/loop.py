"""Run a baseline's parameters through NeST's own training loop.

LoRA and full fine-tuning differ from NeST only in *what* is trainable. Training them with
:class:`nestpatch.train.trainer.Trainer` (through :class:`~nestpatch.baselines.common.ParamGroup`)
keeps everything else identical: the batches drawn under the seed, refusal cross-entropy plus
the KL retain term, warm-up and cosine schedule, clipping, bf16 autocast, the JSONL log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig
from ..train.trainer import Trainer, TrainSummary
from .common import TRAIN_LOG, ParamGroup, read_jsonl
from .data import SharedData

log = logging.getLogger(__name__)


def progress_factory(enabled: bool) -> Any:
    """What the trainer takes as ``progress``: ``(total, initial) -> tqdm``, or ``None``."""
    if not enabled:
        return None

    def make(total: int, initial: int = 0) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    return make


def run_trainer(model: Any, group: ParamGroup, data: SharedData, cfg: TrainConfig, out_dir: Path, *, pad_id: int,
                progress: bool = False) -> tuple[TrainSummary, list[dict]]:
    """Train ``group``'s parameters for ``cfg.steps`` steps; return the summary and the per-step log."""
    log_path = out_dir / TRAIN_LOG
    if log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    trainer = Trainer(model, group, data.harmful, data.benign, cfg, pad_id=pad_id, log_path=log_path, ckpt=None,
                      progress=progress_factory(progress))
    summary = trainer.run(0)
    return summary, read_jsonl(log_path)
