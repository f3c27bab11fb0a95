"""The methods the bench can run, behind one interface.

A method is a name, a one-line description, its option defaults, ``train(ctx) -> TrainOutcome``
(writes the artifact into ``ctx.out_dir``) and ``load_merged(lm, outcome) -> model`` (the trained
model in folded form: a copy of the base with the change in its weights, which is what gets
evaluated and folded into a GGUF). Modules are imported only when a method runs, so listing
methods does not import torch or peft.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError


@dataclass(frozen=True)
class MethodInfo:
    """One registered method.

    Attributes:
        name: what users type (``--methods nest,lora``).
        label: the table's row label.
        description: one line for ``--help`` and the results.
        module: module holding ``train``, ``load_merged`` and ``DEFAULTS``.
    """

    name: str
    label: str
    description: str
    module: str
    aliases: tuple[str, ...] = field(default=())

    def _mod(self) -> Any:
        return importlib.import_module(self.module)

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self._mod().DEFAULTS)

    @property
    def train(self) -> Callable[..., Any]:
        return self._mod().train

    @property
    def load_merged(self) -> Callable[..., Any]:
        return self._mod().load_merged

    def options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults with ``given`` on top; unknown option names are refused."""
        d = self.defaults
        for k, v in (given or {}).items():
            if k not in d:
                raise InputError(f"method {self.name}: unknown option {k!r}; known: {', '.join(sorted(d))}")
            d[k] = v
        return d


#: Name -> method. Add a line (or call :func:`register_method`) to add one.
METHODS: dict[str, MethodInfo] = {m.name: m for m in [
    MethodInfo("nest", "NeST", "shared per-cluster deltas on detected safety neurons (nestpatch train)", "nestpatch.baselines.nest"),
    MethodInfo("lora", "LoRA", "peft LoRA on the MLP projections (rank 8), same data and loss as NeST", "nestpatch.baselines.lora"),
    MethodInfo("full", "Full FT", "full fine-tuning (all weights, or all MLP weights when memory is short), same data and loss",
               "nestpatch.baselines.full", aliases=("full-ft", "ft")),
    MethodInfo("cb", "Circuit breakers", "representation rerouting with early-layer LoRA, retain on benign (Zou et al. 2024)",
               "nestpatch.baselines.circuit_breakers", aliases=("circuit-breakers", "rr")),
]}


def register_method(info: MethodInfo) -> None:
    METHODS[info.name] = info


def get_method(name: str) -> MethodInfo:
    key = name.strip().lower()
    for m in METHODS.values():
        if key == m.name or key in m.aliases:
            return m
    raise InputError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


def parse_methods(spec: str) -> list[str]:
    """``"nest,lora"`` -> canonical names, in order, without repeats."""
    out: list[str] = []
    for part in spec.split(","):
        if part.strip():
            name = get_method(part).name
            if name not in out:
                out.append(name)
    if not out:
        raise InputError(f"--methods {spec!r}: no method named; known: {', '.join(METHODS)}")
    return out
