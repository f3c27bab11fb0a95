"""Full fine-tuning baseline: every weight trainable (or every MLP weight when memory is short).

Same data, loss and loop as ``nestpatch train`` (see :mod:`.loop`). The KL retain term needs
the frozen base next to the model being trained; we keep a copy of the trained tensors and, for
the base forward pass, point each parameter at its frozen copy (``param.data = base``, an O(1)
swap, restored before the backward pass) instead of holding a second model.

Scope ``auto`` trains all weights when ``weights x 20 bytes`` (fp32 weight, gradient, two Adam
moments, frozen copy) fits in half the available memory, else only the MLP weights; the table
says which. Artifact: the trained tensors as float16 safetensors (HF names; the MLP-only file
if the scope is MLP).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from ..atomic import atomic_path
from ..errors import InputError
from ..memory import peak_rss_mb
from ..models.files import path_bytes
from ..models.loading import LoadedModel
from .common import ARTIFACT_DIR, MethodContext, ParamGroup, TrainOutcome, loss_summary
from .data import load_method_inputs
from .loop import run_trainer

log = logging.getLogger(__name__)

SCOPES = ("auto", "all", "mlp")
#: Bytes per trained weight: fp32 weight + gradient + Adam m and v + frozen copy.
BYTES_PER_WEIGHT = 20
DEFAULTS: dict[str, Any] = {"steps": None, "lr": 1e-5, "scope": "auto", "warmup_steps": None}
WEIGHTS_FILE = "weights.safetensors"


def available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_scope(model: Any, scope: str) -> str:
    """``all`` or ``mlp``: ``auto`` picks ``all`` when its optimizer state fits in half the free memory."""
    if scope not in SCOPES:
        raise InputError(f"full fine-tuning scope {scope!r} invalid; expected one of {', '.join(SCOPES)}")
    if scope != "auto":
        return scope
    n = sum(p.numel() for p in model.parameters())
    need, avail = n * BYTES_PER_WEIGHT, available_bytes()
    picked = "all" if need <= avail // 2 else "mlp"
    log.info("full fine-tuning: %d weights need ~%.1f GB, %.1f GB available -> scope %s", n, need / 1e9, avail / 1e9, picked)
    return picked


def trainable(model: Any, scope: str) -> dict[str, Any]:
    """Parameters to train (tied weights once: ``named_parameters`` skips repeats)."""
    params = dict(model.named_parameters())
    if scope == "mlp":
        params = {n: p for n, p in params.items() if ".mlp." in n and n.endswith(".weight")}
    if not params:
        raise InputError(f"full fine-tuning: no parameters in scope {scope!r}")
    return params


class FrozenBase:
    """Frozen copies of the trained tensors, swapped in for the base forward pass."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.base = {n: p.detach().clone() for n, p in params.items()}

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        live = {n: p.data for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.data = self.base[n]
            yield
        finally:
            for n, p in self.params.items():
                p.data = live[n]


def save_weights(params: dict[str, Any], path: Path, meta: dict) -> Path:
    """The trained tensors as float16 safetensors (atomically)."""
    import torch
    from safetensors.torch import save_file

    tensors = {n: p.detach().to(torch.float16).cpu().contiguous() for n, p in params.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "nestpatch_baseline": json.dumps(meta, sort_keys=True)})
    return path


def load_weights(model: Any, path: Path) -> None:
    """Copy the tensors of ``path`` into ``model`` (names must exist, shapes must match)."""
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    with torch.no_grad():
        for name, t in load_file(str(path)).items():
            try:
                p = model.get_parameter(name)
            except AttributeError:
                raise InputError(f"{path}: tensor {name} is not a parameter of the model") from None
            if tuple(p.shape) != tuple(t.shape):
                raise InputError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
            p.data.copy_(t.to(p.dtype))


def train(ctx: MethodContext) -> TrainOutcome:
    """Fine-tune all (or all MLP) weights on the shared data and write them."""
    import torch

    opts = ctx.options
    timings: dict[str, float] = {}
    cfg, lm, data = load_method_inputs(ctx, timings)
    scope = choose_scope(lm.model, str(opts["scope"]))
    params = trainable(lm.model, scope)
    for p in params.values():
        p.requires_grad_(True)
    frozen = FrozenBase(params)
    group = ParamGroup(params, frozen.swapped)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    torch.manual_seed(int(cfg.seed or 0))
    t0 = time.perf_counter()
    summary, history = run_trainer(lm.model, group, data, cfg, ctx.out_dir, pad_id=pad, progress=ctx.progress)
    timings["train_s"] = round(time.perf_counter() - t0, 3)
    peak = peak_rss_mb()
    del frozen
    art_dir = ctx.out_dir / ARTIFACT_DIR
    art_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": "full", "scope": scope, "steps": cfg.steps, "lr": cfg.lr, "base": str(cfg.model)}
    art = save_weights(params, art_dir / WEIGHTS_FILE, meta)
    first, final = loss_summary(history, ("refusal", "retain", "total"))
    words = "all weights" if scope == "all" else "all MLP weights (memory was short for all weights)"
    return TrainOutcome(
        artifact=str(art), artifact_kind="safetensors", artifact_bytes=path_bytes(art),
        trainable_parameters=group.trainable_parameters, train_seconds=timings["train_s"], peak_rss_mb=round(peak, 1),
        loss_first=first, loss_final=final, scope=f"full fine-tuning, {words}", timings=timings,
        details={"scope": scope, "steps": cfg.steps, "lr": cfg.lr, "data": data.info, "summary_final": summary.final},
    )


def load_merged(lm: LoadedModel, outcome: TrainOutcome) -> Any:
    """A copy of the base with the fine-tuned tensors in place."""
    model = copy.deepcopy(lm.model)
    load_weights(model, Path(outcome.artifact))
    model.eval()
    model.requires_grad_(False)
    return model
