"""Training checkpoints: safetensors files (no pickle) in a directory next to the output.

- ``selection.safetensors``: neuron indices and clusters per target, detection/clustering stats
  in its metadata: resuming skips detection.
- ``examples.json``: the tokenized training sequences (refusal targets, the base's answers):
  resuming skips generation.
- ``state.safetensors``: deltas and AdamW moments, plus step / config fingerprint / seed in the
  metadata. Written atomically: an interruption leaves the previous state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..errors import InputError
from ..models.naming import parse_hf_name
from .adapter import TargetSpec
from .examples import Example

log = logging.getLogger(__name__)

SELECTION = "selection.safetensors"
EXAMPLES = "examples.json"
STATE = "state.safetensors"


class CheckpointDir:
    """Reads and writes one run's checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / STATE).exists() or (self.path / SELECTION).exists()

    def _ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # -- selection ------------------------------------------------------------------------------
    def save_selection(self, specs: list[TargetSpec], info: dict) -> None:
        self._ensure()
        tensors = {}
        for s in specs:
            tensors[f"{s.name}/indices"] = torch.as_tensor(np.asarray(s.indices, dtype=np.int64))
            tensors[f"{s.name}/clusters"] = torch.as_tensor(np.asarray(s.clusters, dtype=np.int64))
        with atomic_path(self.path / SELECTION) as tmp:
            save_file(tensors, str(tmp), metadata={"info": json.dumps(info), "order": json.dumps([s.name for s in specs])})

    def load_selection(self) -> tuple[list[TargetSpec], dict] | None:
        p = self.path / SELECTION
        if not p.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            order = json.loads(meta.get("order", "[]"))
            specs = [TargetSpec(parse_hf_name(n), f.get_tensor(f"{n}/indices").numpy(), f.get_tensor(f"{n}/clusters").numpy())
                     for n in order]
        return specs, json.loads(meta.get("info", "{}"))

    # -- examples -------------------------------------------------------------------------------
    def save_examples(self, harmful: list[Example], benign: list[Example], info: dict) -> None:
        self._ensure()
        doc = {"harmful": [e.to_json() for e in harmful], "benign": [e.to_json() for e in benign], "info": info}
        with atomic_path(self.path / EXAMPLES) as tmp:
            tmp.write_text(json.dumps(doc), encoding="utf-8")

    def load_examples(self) -> tuple[list[Example], list[Example], dict] | None:
        p = self.path / EXAMPLES
        if not p.exists():
            return None
        doc = json.loads(p.read_text(encoding="utf-8"))
        return ([Example.from_json(e) for e in doc["harmful"]], [Example.from_json(e) for e in doc["benign"]], doc.get("info", {}))

    # -- state ----------------------------------------------------------------------------------
    def save_state(self, step: int, deltas: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   param_names: list[str], meta: dict) -> None:
        """Deltas and AdamW moments after ``step`` optimizer steps."""
        self._ensure()
        tensors = {f"delta/{n}": t.contiguous() for n, t in deltas.items()}
        st = optimizer.state_dict()["state"]
        for i, name in enumerate(param_names):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if i in st and key in st[i]:
                    t = torch.as_tensor(st[i][key]).detach().float().cpu()
                    tensors[f"adam/{name}/{key}"] = (t.reshape(1) if key == "step" else t).contiguous()
        with atomic_path(self.path / STATE) as tmp:
            save_file(tensors, str(tmp), metadata={"step": str(step), "meta": json.dumps(meta)})

    def load_state(self) -> tuple[int, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict] | None:
        """``(step, deltas, adam moments per param name, meta)`` or ``None`` when no state was saved."""
        p = self.path / STATE
        if not p.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
        deltas = {k[len("delta/"):]: v for k, v in tensors.items() if k.startswith("delta/")}
        adam: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("adam/"):
                name, key = k[len("adam/"):].rsplit("/", 1)
                adam.setdefault(name, {})[key] = v
        return int(meta.get("step", "0")), deltas, adam, json.loads(meta.get("meta", "{}"))

    def remove(self) -> None:
        for name in (STATE, SELECTION, EXAMPLES):
            (self.path / name).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass


def restore_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], param_names: list[str],
                      adam: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load AdamW moments saved by :meth:`CheckpointDir.save_state` into ``optimizer``."""
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for i, (p, name) in enumerate(zip(params, param_names)):
        if name not in adam:
            continue
        a = adam[name]
        if tuple(a["exp_avg"].shape) != tuple(p.shape):
            raise InputError(f"checkpoint optimizer state for {name} has shape {tuple(a['exp_avg'].shape)}, expected {tuple(p.shape)}")
        state[i] = {"step": a["step"].reshape(()).clone(), "exp_avg": a["exp_avg"].to(p.device), "exp_avg_sq": a["exp_avg_sq"].to(p.device)}
    sd["state"] = state
    optimizer.load_state_dict(sd)
