"""LoRA baseline: peft low-rank adapters on the MLP projections, trained like NeST.

Same data, loss and loop as ``nestpatch train`` (see :mod:`.loop`); only the trainable part
differs: a rank-``r`` adapter ``B A`` on every ``gate_proj``/``up_proj``/``down_proj`` (the
modules NeST may touch), instead of one shared delta per neuron cluster. The KL retain term's
base is the same model with the adapter switched off.

Artifact: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``,
weights stored as float16 like the NeST deltas), loadable with ``PeftModel.from_pretrained``.
Foldable form: ``merge_and_unload`` gives plain weights (the bench folds them into a GGUF).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_dir
from ..converters.lora_export import PEFT_CONFIG, PEFT_WEIGHTS
from ..errors import InputError
from ..memory import peak_rss_mb
from ..models.files import path_bytes
from ..models.loading import LoadedModel
from ..models.naming import MODULE_AXIS
from .common import ARTIFACT_DIR, MethodContext, ParamGroup, TrainOutcome, loss_summary
from .data import load_method_inputs
from .loop import run_trainer

log = logging.getLogger(__name__)

MLP_MODULES = tuple(MODULE_AXIS)  # gate_proj, up_proj, down_proj

#: Method options and their defaults (the registry fills them in).
DEFAULTS: dict[str, Any] = {"steps": None, "lr": 5e-4, "rank": 8, "alpha": 16.0, "modules": list(MLP_MODULES), "warmup_steps": None}


def make_peft_model(model: Any, *, rank: int, alpha: float, modules: Sequence[str], layers: Sequence[int] | None = None,
                    seed: int = 0) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (A random under ``seed``, B zero: starts as the base)."""
    import torch
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise InputError(f"LoRA rank must be at least 1, got {rank}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, target_modules=list(modules), bias="none",
                     layers_to_transform=list(layers) if layers is not None else None, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def lora_parameters(peft_model: Any) -> dict[str, Any]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def save_adapter(peft_model: Any, out_dir: Path, *, base: str, extra: dict | None = None) -> Path:
    """Write the adapter as a PEFT directory with float16 weights (atomically); return its path."""
    import torch
    from safetensors.torch import load_file, save_file

    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        wfile = tmp / PEFT_WEIGHTS
        tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(wfile)).items()}
        save_file(tensors, str(wfile), metadata={"format": "pt"})
        cfg_file = tmp / PEFT_CONFIG
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = base
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
        if extra:
            (tmp / "nestpatch_baseline.json").write_text(json.dumps(extra, indent=2, sort_keys=True), encoding="utf-8")
    return out_dir


def merge_adapter(lm: LoadedModel, adapter_dir: str | Path) -> Any:
    """A copy of the base with the adapter merged into its weights (the base stays untouched)."""
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / PEFT_CONFIG).exists():
        raise InputError(f"{d}: not a PEFT adapter directory (no {PEFT_CONFIG})")
    model = copy.deepcopy(lm.model)
    merged = PeftModel.from_pretrained(model, str(d), is_trainable=False).merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    return merged


def train(ctx: MethodContext) -> TrainOutcome:
    """Train LoRA adapters on the shared data and write the adapter directory."""
    opts = ctx.options
    timings: dict[str, float] = {}
    cfg, lm, data = load_method_inputs(ctx, timings)
    pm = make_peft_model(lm.model, rank=int(opts["rank"]), alpha=float(opts["alpha"]), modules=opts["modules"], seed=int(cfg.seed or 0))
    group = ParamGroup(lora_parameters(pm), pm.disable_adapter)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    summary, history = run_trainer(pm, group, data, cfg, ctx.out_dir, pad_id=pad, progress=ctx.progress)
    timings["train_s"] = round(time.perf_counter() - t0, 3)
    peak = peak_rss_mb()
    art = save_adapter(pm, ctx.out_dir / ARTIFACT_DIR, base=str(cfg.model),
                       extra={"method": "lora", "rank": opts["rank"], "alpha": opts["alpha"], "steps": cfg.steps, "lr": cfg.lr})
    first, final = loss_summary(history, ("refusal", "retain", "total"))
    return TrainOutcome(
        artifact=str(art), artifact_kind="peft-lora", artifact_bytes=path_bytes(art),
        trainable_parameters=group.trainable_parameters, train_seconds=timings["train_s"], peak_rss_mb=round(peak, 1),
        loss_first=first, loss_final=final, scope=f"LoRA r={opts['rank']} on {', '.join(opts['modules'])}, all layers",
        timings=timings, details={"rank": opts["rank"], "alpha": opts["alpha"], "steps": cfg.steps, "lr": cfg.lr,
                                  "data": data.info, "summary_final": summary.final},
    )


def load_merged(lm: LoadedModel, outcome: TrainOutcome) -> Any:
    """The trained model in its folded form (adapter merged into a copy of the base)."""
    return merge_adapter(lm, outcome.artifact)
