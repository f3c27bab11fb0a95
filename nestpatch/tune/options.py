"""The settings of ``nestpatch tune``, in a module without torch so the CLI can build its flags from them.

Each field's ``metadata["help"]`` is the flag's help text (``--kl-prompts`` for ``kl_prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

SAMPLERS = ("nsga2", "tpe")
BACKENDS = ("torch", "llama")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ValidationOptions:
    """How a patch is measured on the validation sets (shared by ``tune`` and ``select``)."""

    limit: int = _f(0, "At most this many prompts per validation set (0 = all).")
    tokens: int = _f(32, "New tokens per validation reply.")
    kl_prompts: int = _f(16, "Benign validation prompts the KL is measured on.")
    kl_tokens: int = _f(16, "Reply tokens the KL is measured over.")
    batch_size: int = _f(16, "Validation generation batch size (llama: sequences decoded together).")
    backend: str = _f("torch", "Validation backend: torch (the float model with the patch attached) or llama (the patch "
                               "folded into the GGUF and run in llama.cpp, as `eval --backend llama` reports; GGUF models only).",
                      choices=BACKENDS)
    prefill_validation: bool = _f(False, "Also measure HarmBench validation under the prefilling attack (prefill_asr in "
                                         "the metrics; not an objective).")


def _default(name: str, value: Any) -> Any:
    """The :class:`ValidationOptions` field ``name`` with another default (same help and choices)."""
    return field(default=value, metadata={f.name: f for f in fields(ValidationOptions)}[name].metadata)


@dataclass
class TuneOptions(ValidationOptions):
    """What ``nestpatch tune`` takes besides the model and the output directory."""

    trials: int = _f(20, "Finished trials wanted in the study in total (a rerun continues up to this number).")
    timeout: float | None = _f(None, "Stop starting new trials after this many seconds (this call).")
    seed: int = _f(0, "Training seed of every trial (the first, with --seeds) and the sampler's seed.")
    seeds: int = _f(1, "Train and validate each trial with this many seeds (seed, seed+1, ...); its objectives are the "
                       "means over them, and the worst seed and the spread are recorded (one seed can be lucky).")
    sampler: str = _f("nsga2", "Optuna sampler: NSGA-II (multi-objective genetic) or TPE.", choices=SAMPLERS)
    population: int = _f(8, "NSGA-II population size (TPE: random start trials).")
    space: str | None = _f(None, "TOML file that updates the default search space (lists: choices; {low, high, log}: ranges; "
                                 "scalars: fixed).")
    enqueue_defaults: bool = _f(True, "Trial 0 = the base config (today's defaults) where it lies in the space.",
                                flag="--no-defaults-first", negate=True,
                                flag_help="Do not run the base config (today's defaults) as trial 0.")


@dataclass
class SelectOptions(ValidationOptions):
    """What ``nestpatch select`` takes besides the model, the candidates and the output.

    Its defaults are the setting whose ranking of seeds followed the HarmBench test (docs/RESULTS.md,
    sessions 10 and 11): every validation prompt, the folded GGUF in llama.cpp, 128-token replies.
    """

    backend: str = _default("backend", "llama")
    tokens: int = _default("tokens", 128)
