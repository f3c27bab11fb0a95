"""The search space of ``nestpatch tune``: which TrainConfig fields a trial samples, and how.

A space maps config field names to one of:

* a list: a categorical choice. List-valued fields (``modules``, ``harmful``, ``benign``) take
  comma-joined strings (``"gate_proj,up_proj"``); ``layers`` takes ``all``, ``first-half``,
  ``second-half``, ``middle`` (the middle half) or ``A-B`` (inclusive), resolved against the
  model's layer count.
* a table ``{low, high, log?, step?}``: a range; int or float from the field's type.
* a scalar: a fixed value (the way to take a field out of the default space).

The default space covers detector, threshold, k range, modules, layers, lr, steps, retain and
head weights and the data mix; a ``--space`` TOML file replaces the entries it names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..errors import InputError
from ..train.config import TrainConfig, read_toml

#: name -> spec (see the module doc). Ranges bracket the measured defaults of docs/RESULTS.md.
DEFAULT_SPACE: dict[str, Any] = {
    "detector": ["mean_diff", "gatebreaker"],
    "threshold": {"low": 1.5, "high": 3.5},
    "k_min": {"low": 2, "high": 4},
    "k_max": {"low": 2, "high": 8},
    "modules": ["gate_proj,up_proj", "gate_proj", "up_proj", "gate_proj,up_proj,down_proj"],
    "layers": ["all", "second-half", "middle"],
    "lr": {"low": 5e-3, "high": 8e-2, "log": True},
    "steps": {"low": 30, "high": 150, "step": 10},
    "retain_weight": {"low": 0.5, "high": 6.0, "log": True},
    "head_weight": {"low": 1.0, "high": 8.0, "log": True},
    "harmful": ["builtin-harmful", "builtin-harmful,donotanswer"],
    "balance_by": ["none", "form"],
    "recovery_fraction": [0.0, 0.25, 0.5],
}

LIST_FIELDS = ("modules", "harmful", "benign")
LAYER_NAMES = ("all", "first-half", "second-half", "middle")


def layer_indices(spec: str, n_layers: int) -> list[int]:
    """Layers named by ``spec`` (see the module doc); ``[]`` means all (the config's convention)."""
    if spec == "all":
        return []
    half = n_layers // 2
    if spec == "first-half":
        return list(range(0, max(1, half)))
    if spec == "second-half":
        return list(range(half, n_layers))
    if spec == "middle":
        q = n_layers // 4
        return list(range(q, max(q + 1, n_layers - q)))
    a, sep, b = spec.partition("-")
    if sep and a.isdigit() and b.isdigit() and int(a) <= int(b) < n_layers:
        return list(range(int(a), int(b) + 1))
    raise InputError(f"layers {spec!r} invalid for a {n_layers}-layer model; expected {', '.join(LAYER_NAMES)} or A-B")


class SearchSpace:
    """A validated space: ``sample(trial)`` gives TrainConfig overrides.

    Args:
        spec: name -> list / range table / scalar (see the module doc).
        n_layers: the model's layer count (resolves ``layers`` names).
    """

    def __init__(self, spec: dict[str, Any], n_layers: int) -> None:
        hints = get_type_hints(TrainConfig)
        self.n_layers = n_layers
        self.hints = hints
        self.searched: dict[str, Any] = {}
        self.fixed: dict[str, Any] = {}
        for name, v in spec.items():
            if name not in hints:
                raise InputError(f"search space: unknown option {name!r} (not a train option)")
            if name in ("model", "out", "seed", "resume"):
                raise InputError(f"search space: {name!r} cannot be searched")
            if isinstance(v, dict):
                if set(v) - {"low", "high", "log", "step"} or "low" not in v or "high" not in v or v["low"] > v["high"]:
                    raise InputError(f"search space: {name!r} range must be {{low, high, log?, step?}} with low <= high, got {v}")
                if self._base(name) not in (int, float):
                    raise InputError(f"search space: {name!r} is not numeric; give a list of choices")
                self.searched[name] = v
            elif isinstance(v, list):
                if not v:
                    raise InputError(f"search space: {name!r} has no choices")
                if len(v) == 1:
                    self.fixed[name] = self.decode(name, v[0])
                else:
                    for c in v:
                        self.decode(name, c)  # check every choice now, not at trial 30
                    self.searched[name] = v
            else:
                self.fixed[name] = self.decode(name, v)

    def _base(self, name: str) -> Any:
        hint = self.hints[name]
        args = get_args(hint)
        if args and type(None) in args:
            hint = [a for a in args if a is not type(None)][0]
        return hint

    def decode(self, name: str, value: Any) -> Any:
        """A choice as the config value (comma strings split, layer names resolved)."""
        if name == "layers":
            if isinstance(value, list):
                return [int(x) for x in value]
            return layer_indices(str(value), self.n_layers)
        if name in LIST_FIELDS or get_origin(self._base(name)) is list:
            return [x for x in str(value).split(",") if x] if isinstance(value, str) else list(value)
        return value

    def sample(self, trial: Any) -> dict[str, Any]:
        """Config overrides for one Optuna trial (fixed values included)."""
        out = dict(self.fixed)
        for name, v in self.searched.items():
            if isinstance(v, dict):
                if self._base(name) is int:
                    out[name] = trial.suggest_int(name, int(v["low"]), int(v["high"]), step=int(v.get("step", 1)),
                                                  log=bool(v.get("log", False)))
                else:
                    out[name] = trial.suggest_float(name, float(v["low"]), float(v["high"]), log=bool(v.get("log", False)),
                                                    step=v.get("step"))
            else:
                out[name] = self.decode(name, trial.suggest_categorical(name, v))
        if "k_min" in out or "k_max" in out:  # a range cannot be empty: k_min follows k_max down
            k_max = out.get("k_max", TrainConfig.k_max)
            out["k_min"] = min(out.get("k_min", TrainConfig.k_min), k_max)
        return out

    def params_of(self, cfg: TrainConfig) -> dict[str, Any]:
        """The trial parameters that reproduce ``cfg`` where it lies inside the space (to enqueue the defaults first)."""
        out: dict[str, Any] = {}
        for name, v in self.searched.items():
            cur = getattr(cfg, name)
            if isinstance(v, dict):
                if cur is not None and v["low"] <= cur <= v["high"]:
                    out[name] = cur
            else:
                for c in v:
                    if self.decode(name, c) == cur:
                        out[name] = c
                        break
        return out


def load_space(path: str | Path | None) -> dict[str, Any]:
    """The default space updated with a TOML file's entries (keys at the top level or under ``[space]``)."""
    spec = dict(DEFAULT_SPACE)
    if path is None:
        return spec
    p = Path(path)
    data = read_toml(p, "space file")
    if isinstance(data.get("space"), dict):
        data = data["space"]
    spec.update({k.replace("-", "_"): v for k, v in data.items()})
    return spec
