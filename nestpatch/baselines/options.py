"""The settings of ``nestpatch bench`` (:class:`BenchOptions`), in a module without torch.

``nestpatch bench`` generates its flags from the fields (:func:`nestpatch.cli.options.dataclass_options`);
:meth:`BenchOptions.config` turns them into the runner's :class:`~nestpatch.baselines.bench.BenchConfig`
(the shared training config, per-method options).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..converters.precision import PRECISIONS
from ..errors import InputError

DEFAULT_METHODS = ("nest", "lora", "full", "cb")
DEFAULT_SUITES = ("harmbench", "harmful-heldout", "benign", "overrefusal", "utility")
FULL_SCOPES = ("auto", "all", "mlp")
EVAL_BACKENDS = ("torch", "llama")


def _f(default: Any, help: str = "", **meta: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class BenchOptions:
    """What ``nestpatch bench`` takes besides MODEL and the bench directory (the flags, one field each).

    ``steps`` and ``lr`` are ``"N"`` (every method) or ``"METHOD=N,..."``; ``options`` are
    ``METHOD.KEY=VALUE`` strings; ``seed``, ``max_prompts``, ``batch_size``, ``bf16`` and
    ``device`` override the shared training config (``train_config``, a TOML file) when set.
    """

    methods: list[str] = _f(list(DEFAULT_METHODS), "Comma-separated methods: nest, lora, full, cb (circuit breakers).")
    limit: int | None = _f(None, "Evaluate only the first N prompts of each suite.", min=1, show_default=False)
    steps: str | None = _f(None, "Optimizer steps: N for every method, or METHOD=N pairs (default: nestpatch train's).",
                           show_default=False)
    lr: str | None = _f(None, "Learning rate: X for every method, or METHOD=X pairs (default: each method's own).",
                        show_default=False)
    lora_rank: int | None = _f(None, "LoRA rank (default 8).", min=1, show_default=False)
    full_scope: str | None = _f(None, "Full fine-tuning: all weights, MLP weights only, or auto (all when memory allows).",
                                choices=FULL_SCOPES, show_default=False)
    options: tuple[str, ...] = _f((), "Any method option as METHOD.KEY=VALUE, e.g. cb.coefficient=5.", flag="--option",
                                  split=False)
    suites: list[str] = _f(list(DEFAULT_SUITES), "Evaluation suites (see nestpatch eval). harmful-heldout, benign-heldout "
                                                 "and utility-heldout are the held-out splits of the training prompts: "
                                                 "choose a baseline's settings on them, not on test suites.")
    train_config: str | None = _f(None, "A nestpatch train TOML: its data, seed and training settings are shared by every "
                                        "method.", path="file", exists=True, show_default=False)
    seed: int | None = _f(None, "Seed shared by every method (default: the config's, else 0).", show_default=False)
    max_prompts: int | None = _f(None, "Training prompts per role (0 = all).", min=0, show_default=False)
    batch_size: int | None = _f(None, "Harmful (and as many benign) sequences per step.", min=1, show_default=False)
    bf16: bool | None = _f(None, "bfloat16 autocast in training (default: nestpatch train's).", show_default=False)
    device: str | None = _f(None, "torch device: auto, cpu, cuda, mps.", show_default=False)
    threads: int | None = _f(None, "CPU threads for torch and llama.cpp.", min=1, show_default=False)
    max_new_tokens: int = _f(64, "Reply length in evaluation.", min=1)
    eval_batch_size: int = _f(8, "Prompts per evaluation generation batch.", min=1)
    fold_precision: str = _f("keep", "Types of the changed tensors when a method is folded into a GGUF base (as nestpatch "
                                     "apply --precision; keep re-encodes them in the base's types, which can round a small "
                                     "update away: fold.json reports each tensor's retention).", choices=PRECISIONS)
    eval_backend: str = _f("torch", "torch: evaluate each trained model in float32; llama: evaluate its folded GGUF in "
                                    "llama.cpp, the file a release ships (needs a GGUF base).", choices=EVAL_BACKENDS)
    speed: bool = _f(True, "Measure decode tokens/s of the folded models.")
    speed_rounds: int = _f(3, "Interleaved rounds of the speed measurement.", min=1)
    isolate: bool = _f(True, "One process per method.", flag="--in-process", negate=True,
                       flag_help="Run every method in this process (faster start; peak memory is sampled).")
    include_base: bool = _f(True, "Evaluate the untouched model (the reference row).", flag="--no-base", negate=True,
                            flag_help="Do not evaluate the untouched model.")

    def config(self, model: str, out_dir: str, *, progress: bool = True, log_level: int | None = None) -> Any:
        """The runner's :class:`~nestpatch.baselines.bench.BenchConfig` for MODEL and the bench directory."""
        import logging

        from ..train.config import TrainConfig
        from .bench import BenchConfig
        from .registry import parse_methods

        names = parse_methods(",".join(self.methods))
        tc = TrainConfig.from_toml(self.train_config) if self.train_config else TrainConfig()
        tc = tc.merged({"seed": self.seed, "max_prompts": self.max_prompts, "batch_size": self.batch_size, "bf16": self.bf16,
                        "device": self.device})
        mopts = method_options(self.options)
        _merge(mopts, "steps", per_method(self.steps, "--steps", int, names))
        _merge(mopts, "lr", per_method(self.lr, "--lr", float, names))
        if self.lora_rank is not None:
            mopts.setdefault("lora", {})["rank"] = self.lora_rank
        if self.full_scope is not None:
            mopts.setdefault("full", {})["scope"] = self.full_scope
        return BenchConfig(model=model, out_dir=out_dir, methods=names, train_config=tc, method_options=mopts,
                           suites=list(self.suites), limit=self.limit, max_new_tokens=self.max_new_tokens,
                           eval_batch_size=self.eval_batch_size, fold_precision=self.fold_precision,
                           eval_backend=self.eval_backend, speed=self.speed, speed_rounds=self.speed_rounds,
                           threads=self.threads, isolate=self.isolate, include_base=self.include_base, progress=progress,
                           log_level=logging.WARNING if log_level is None else log_level)


def per_method(value: str | None, flag: str, cast: type, methods: list[str]) -> dict[str, Any]:
    """``"120"`` (every method) or ``"nest=120,lora=60"`` -> ``{method: value}``."""
    from .registry import get_method

    if not value:
        return {}
    out: dict[str, Any] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, v = part.partition("=")
        try:
            if sep:
                out[get_method(name).name] = cast(v)
            else:
                for m in methods:
                    out[m] = cast(name)
        except ValueError:
            raise InputError(f"{flag} {value!r}: expected a number, or METHOD=NUMBER pairs separated by commas") from None
    return out


def method_options(pairs: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """``--option lora.rank=16`` -> ``{"lora": {"rank": 16}}`` (values parsed as JSON when they are JSON)."""
    from .registry import get_method

    out: dict[str, dict[str, Any]] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        method, dot, opt = key.partition(".")
        if not sep or not dot or not opt:
            raise InputError(f"--option {item!r}: expected METHOD.KEY=VALUE (e.g. lora.rank=16)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(get_method(method).name, {})[opt] = value
    return out


def _merge(into: dict[str, dict[str, Any]], key: str, values: dict[str, Any]) -> None:
    for m, v in values.items():
        into.setdefault(m, {})[key] = v
