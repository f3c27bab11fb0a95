"""Shared per-cluster deltas applied to a live model through forward hooks.

The base weights are never written: a hook on each target ``nn.Linear`` adds the effect of the
update to the module's output, which is exactly the output of the folded weight:

- row axis (gate/up, neuron i = row i): ``W'[i] = W[i] + D[c_i]`` so ``y'[..., i] = y[..., i] + x @ D[c_i]``.
- col axis (down, neuron i = column i): ``W'[:, i] = W[:, i] + D[c_i]`` so
  ``y' = y + sum_c (sum_{i in c} x_i) D[c]``.

With quantization-aware training the added term is the difference the fold will really make
once the touched GGUF blocks are re-encoded: ``Q(W_blocks + dW) - Q(W_blocks)``, with the
rounding passed straight through in the backward pass. Disabling the hooks (``with
deltas.disabled():``) gives the unpatched base on the same forward pass code, which the KL
retain term uses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..detect import module_of
from ..format.constants import AXIS_ROW
from ..format.patch import Target
from ..models.naming import MLPRef
from .quant import BLOCK, fake_quant, roundtrip


@dataclass
class TargetSpec:
    """Which neurons of one MLP projection are patched, and their clusters."""

    ref: MLPRef
    indices: np.ndarray  # (n,) sorted unique
    clusters: np.ndarray  # (n,) ids in [0, K)

    @property
    def name(self) -> str:
        return self.ref.hf_name

    @property
    def axis(self) -> str:
        return self.ref.axis

    @property
    def k(self) -> int:
        return int(np.max(self.clusters)) + 1


def _key(name: str) -> str:
    return name.replace(".", "__")


class SharedDeltas(nn.Module):
    """Trainable ``(K, d)`` delta per target; hooks apply them to the wrapped model.

    Args:
        model: a transformers causal LM (frozen; never modified).
        specs: the targets.
        qat: ``"none"`` or a GGUF block type (``Q4_1``...) to train through.
    """

    def __init__(self, model: Any, specs: Sequence[TargetSpec], qat: str = "none") -> None:
        super().__init__()
        self.specs = list(specs)
        self.qat = qat
        self.enabled = True
        self.deltas = nn.ParameterDict()
        self._handles: list[Any] = []
        self._model = [model]  # a list keeps the model out of this module's parameters
        self._buffers_per: dict[str, dict[str, torch.Tensor]] = {}
        for s in self.specs:
            lin = module_of(model, s.ref)
            w = lin.weight  # (out, in)
            d = w.shape[1] if s.axis == AXIS_ROW else w.shape[0]
            self.deltas[_key(s.name)] = nn.Parameter(torch.zeros(s.k, d, device=w.device, dtype=torch.float32))
            self._buffers_per[s.name] = self._prepare(s, w)

    # -- setup ----------------------------------------------------------------------------------
    def _prepare(self, s: TargetSpec, w: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = w.device
        buf = {
            "idx": torch.as_tensor(s.indices, dtype=torch.long, device=dev),
            "cl": torch.as_tensor(s.clusters, dtype=torch.long, device=dev),
        }
        if self.qat != "none":
            with torch.no_grad():
                if s.axis == AXIS_ROW:
                    rows = w.index_select(0, buf["idx"]).float()  # (n, d)
                    buf["base"], buf["base_q"] = rows, roundtrip(rows, self.qat)
                else:
                    if w.shape[1] % BLOCK:
                        raise ValueError(f"{s.name}: {w.shape[1]} columns is not a multiple of the {BLOCK}-value block")
                    blocks = torch.unique(buf["idx"] // BLOCK)  # touched blocks along the row
                    cols = (blocks[:, None] * BLOCK + torch.arange(BLOCK, device=dev)).reshape(-1)  # (nb*32,)
                    base = w.index_select(1, cols).float()  # (d_out, nb*32)
                    pos = torch.searchsorted(cols, buf["idx"])  # where each neuron sits in cols
                    buf.update(cols=cols, pos=pos, base=base, base_q=roundtrip(base, self.qat))
        return buf

    def attach(self) -> "SharedDeltas":
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        model = self._model[0]
        for s in self.specs:
            lin = module_of(model, s.ref)
            self._handles.append(lin.register_forward_hook(self._make_hook(s)))
        return self

    def detach(self) -> None:
        """Remove the hooks: the model is the base again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model (hooks stay registered but add nothing)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    # -- the update -----------------------------------------------------------------------------
    def neuron_update(self, s: TargetSpec) -> torch.Tensor:
        """The update the fold makes, as a matrix over the touched vectors.

        Row axis: ``(n, d_in)``, one row per neuron. Col axis without QAT: ``(n, d_out)``, one
        vector per neuron; with QAT: ``(d_out, nb*32)`` over every column of the touched blocks.
        """
        D = self.deltas[_key(s.name)]
        buf = self._buffers_per[s.name]
        per = D.index_select(0, buf["cl"])  # (n, d)
        if self.qat == "none":
            return per
        with torch.autocast(device_type=D.device.type, enabled=False):
            if s.axis == AXIS_ROW:
                return fake_quant(buf["base"] + per, self.qat) - buf["base_q"]  # (n, d_in)
            dense = torch.zeros_like(buf["base"]).index_copy(1, buf["pos"], per.T)  # (d_out, nb*32)
            return fake_quant(buf["base"] + dense, self.qat) - buf["base_q"]

    def _make_hook(self, s: TargetSpec):
        buf = self._buffers_per[s.name]

        def hook(_mod: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            x = args[0]
            upd = self.neuron_update(s) if self.qat != "none" else None
            if s.axis == AXIS_ROW:  # x (B, T, d_in) -> add (B, T, n) on the neuron channels
                if self.qat == "none":
                    z = nn.functional.linear(x, self.deltas[_key(s.name)])  # (B, T, K)
                    add = z.index_select(-1, buf["cl"])  # (B, T, n)
                else:
                    add = nn.functional.linear(x, upd)  # (B, T, n)
                return y.index_add(-1, buf["idx"], add.to(y.dtype))
            if self.qat == "none":  # x (B, T, n_ff): sum the neurons of each cluster, then one (K, d_out) matmul
                xs = x.index_select(-1, buf["idx"])  # (B, T, n)
                k = self.deltas[_key(s.name)].shape[0]
                agg = xs.new_zeros(*xs.shape[:-1], k).index_add(-1, buf["cl"], xs)  # (B, T, K)
                add = nn.functional.linear(agg, self.deltas[_key(s.name)].T)  # (B, T, d_out)
            else:
                add = nn.functional.linear(x.index_select(-1, buf["cols"]), upd)  # (B, T, d_out)
            return y + add.to(y.dtype)

        return hook

    # -- export ---------------------------------------------------------------------------------
    @property
    def trainable_parameters(self) -> int:
        return int(sum(p.numel() for p in self.deltas.values()))

    def to_targets(self, delta_dtype: str = "F32") -> list[Target]:
        """The ``.nestpatch`` targets (deltas as trained; QAT deltas are what the fold adds before re-encoding)."""
        model = self._model[0]
        out = []
        for s in self.specs:
            w = module_of(model, s.ref).weight
            out.append(Target(
                name=s.name, axis=s.axis, shape=(int(w.shape[0]), int(w.shape[1])),
                indices=np.asarray(s.indices, dtype=np.int32), clusters=np.asarray(s.clusters, dtype=np.int32),
                deltas=self.deltas[_key(s.name)].detach().float().cpu().numpy().astype(np.float32), delta_dtype=delta_dtype,
            ))
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{target name: (K, d) float32 on CPU}`` (for checkpoints)."""
        return {s.name: self.deltas[_key(s.name)].detach().float().cpu().contiguous() for s in self.specs}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for s in self.specs:
                p = self.deltas[_key(s.name)]
                t = tensors[s.name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"checkpoint delta {s.name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.device))
