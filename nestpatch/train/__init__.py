"""NeST training: shared per-cluster deltas on detected safety neurons (see ../shared/NEST.md).

- :mod:`.config`: the one configuration object (CLI flags and TOML files come from it).
- :mod:`.adapter`: the deltas as forward hooks (base weights untouched); :mod:`.quant` for QAT.
- :mod:`.examples`, :mod:`.losses`, :mod:`.refusals`: training sequences and their losses.
- :mod:`.trainer`: the loop; :mod:`.checkpoint`: resumable safetensors checkpoints.
- :mod:`.pipeline`: ``train_policy(config)``, prompts to ``.nestpatch``; :mod:`.recipes`: per-model defaults.

Imports here are lazy so ``import nestpatch.train`` does not pull torch in.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig

__all__ = ["TrainConfig", "train_policy"]


def train_policy(config: TrainConfig, *, progress: bool = False, explicit: set[str] | None = None) -> Any:
    """See :func:`nestpatch.train.pipeline.train_policy`."""
    from .pipeline import train_policy as _run

    return _run(config, progress=progress, explicit=explicit)
