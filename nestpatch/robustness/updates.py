"""The safety updates under attack: the base itself, a NeST patch, and baselines as ``bench`` writes them.

Each update is materialised as a fresh in-memory model (a copy of the loaded base with the
update folded into its weights), so an attack can edit it freely and the base stays intact.
Accepted forms (dispatch on what the path is, in this one place):

* ``.nestpatch`` file: attached to the copy and left attached (= folded in memory);
* PEFT adapter directory (``adapter_config.json``, the LoRA baseline): merged into the copy;
* full fine-tuning weights (``bench``'s ``full/artifact``: a directory holding
  ``weights.safetensors``, or that file itself): copied into the copy by name;
* HF model directory (``config.json`` + safetensors, e.g. a model folded by ``nestpatch apply``):
  loaded as is (its shapes must match the base).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..format.patch import Patch
from ..models.loading import LoadedModel

BASE = "base"


@dataclass
class SafetyUpdate:
    """One model to attack: a name, its kind and where it came from."""

    name: str
    kind: str  # "base", "nestpatch", "peft-lora", "full-weights" or "hf-dir"
    path: str | None = None
    patch: Patch | None = None

    def info(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "path": self.path}
        if self.patch is not None:
            d["content_digest"] = self.patch.content_digest
            d["neurons"] = int(self.patch.n_neurons)
        return d


def classify(name: str, path: str | os.PathLike) -> SafetyUpdate:
    """What ``path`` holds, or an :class:`InputError` naming it."""
    from ..baselines.full import WEIGHTS_FILE
    from ..format import read_patch

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_file() and p.name == WEIGHTS_FILE:
        return SafetyUpdate(name, "full-weights", str(p))
    if p.is_file():
        return SafetyUpdate(name, "nestpatch", str(p), read_patch(p))
    if (p / "adapter_config.json").exists():
        return SafetyUpdate(name, "peft-lora", str(p))
    if (p / WEIGHTS_FILE).is_file() and not (p / "config.json").exists():
        return SafetyUpdate(name, "full-weights", str(p / WEIGHTS_FILE))
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return SafetyUpdate(name, "hf-dir", str(p))
    raise InputError(f"{p}: expected a .nestpatch file, a PEFT adapter directory, full fine-tuning weights "
                     f"({WEIGHTS_FILE}) or an HF model directory")


def materialize(base: LoadedModel, update: SafetyUpdate) -> Any:
    """A new model object: ``base`` with ``update`` folded in (the base model is not modified)."""
    if update.kind == "base":
        return copy.deepcopy(base.model)
    if update.kind == "nestpatch":
        from nestpatch.runtime.attach import attach

        m = copy.deepcopy(base.model)
        attach(m, update.patch)  # left attached: the copy now holds the folded weights
        return m
    if update.kind == "peft-lora":
        from ..baselines.lora import merge_adapter

        return merge_adapter(base, update.path)
    if update.kind == "full-weights":
        from ..baselines.full import load_weights

        m = copy.deepcopy(base.model)
        load_weights(m, Path(update.path))
        return m
    if update.kind == "hf-dir":
        from ..models.loading import load_model

        lm = load_model(update.path, device=str(base.model.device))
        shapes = {n: tuple(p.shape) for n, p in base.model.named_parameters()}
        bad = [n for n, p in lm.model.named_parameters() if n in shapes and tuple(p.shape) != shapes[n]]
        if bad:
            raise InputError(f"{update.path}: tensor {bad[0]} has another shape than in the base model")
        return lm.model
    raise InputError(f"unknown safety update kind {update.kind!r}")
