"""The one training configuration: a dataclass with help text on every field.

It is the single source of the ``nestpatch train`` flags (generated from the fields) and of
``--config train.toml`` files (same keys). :meth:`TrainConfig.validate` checks every value; the
resolved config (seed drawn, defaults filled) is saved next to the output and inside the patch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..errors import InputError
from ..format.constants import DELTA_DTYPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

QAT_TYPES = ("none", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
REFUSAL_TARGETS = ("auto", "template", "own")
RETAIN_LOSSES = ("kl", "ce", "none")
ANSWER_BACKENDS = ("auto", "llama", "torch")
SCHEDULES = ("cosine", "constant")
BALANCE_BY = ("none", "source", "form")
DETECT_POOLS = ("training", "sources")


def _f(default: Any, help: str, *, choices: tuple | None = None, group: str = "training", **kw: Any) -> Any:
    meta = {"help": help, "group": group}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)



def read_toml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one ``InputError`` naming it (``what``: its role)."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: no such {what}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p}: invalid TOML ({e})") from None


#: Options added after checkpoints and bench data caches were first keyed by
#: :meth:`TrainConfig.fingerprint`: left out of it at their defaults, so those stay valid.
_LATER_FIELDS = ("detect_resamples", "detect_consensus", "cluster_seed", "detect_pool")


@dataclass
class TrainConfig:
    """Everything ``nestpatch train`` needs. Defaults are the measured defaults of docs/RESULTS.md."""

    # --- inputs and outputs ---
    model: str = _f("", "Model to patch: HF directory (safetensors), .gguf file (dequantized), or a named model (smollm2).", group="io")
    out: str = _f("", "Output .nestpatch path. The resolved config (.train.toml), the training log (.train.jsonl) and "
                      "checkpoints (.ckpt/) go next to it.", group="io")
    harmful: list[str] = _f(["builtin-harmful"], "Harmful prompt sources (files .jsonl/.csv/.txt/.json or named sources; "
                                                 "repeatable). HarmBench sets are refused: they are for evaluation.", group="data")
    harmful_column: str | None = _f(None, "Column/field holding the prompt in --harmful files (default: prompt, text, Behavior, ...).", group="data")
    benign: list[str] = _f(["builtin-benign"], "Benign prompt sources (retain set and probe negatives; repeatable).", group="data")
    benign_column: str | None = _f(None, "Column/field holding the prompt in --benign files.", group="data")
    max_prompts: int = _f(256, "Use at most this many prompts per role (sampled under --seed, in proportion to each source); 0 = all.", group="data")
    detect_prompts: int = _f(128, "Prompts per role used for detection (a seeded sample of the training prompts); 0 = all.", group="data")
    detect_resamples: int = _f(1, "Stability selection: detect on this many seeded samples of --detect-prompts a role (every "
                                  "training prompt pooled once) and keep the neurons that at least --detect-consensus of them "
                                  "choose; 1 = one sample.", group="detect")
    detect_consensus: float = _f(0.5, "With --detect-resamples > 1: the share of samples that must choose a neuron.", group="detect")
    policy_name: str = _f("nestpatch-policy", "Policy name recorded in the patch.", group="io")
    policy_version: str = _f("0.1.0", "Policy version recorded in the patch.", group="io")
    policy_description: str = _f("Refuse harmful requests; answer benign ones as before.", "Policy description recorded in the patch.", group="io")
    delta_dtype: str = _f("F16", "Dtype the deltas are stored in.", choices=DELTA_DTYPES, group="io")

    # --- detection and clustering ---
    modules: list[str] = _f(["gate_proj", "up_proj"], "MLP projections to probe and patch (gate_proj, up_proj, down_proj).", group="detect")
    layers: list[int] = _f([], "Layers to probe (default: all).", group="detect")
    detector: str = _f("mean_diff", "Neuron scorer: standardized mean difference harmful - benign (mean_diff), the raw mean "
                                    "difference of the authors' GateBreaker code (gatebreaker; they keep z > 2), or logistic probe "
                                    "weights (probe: NeuroStrike; slow on CPU, see docs/RESULTS.md).",
                       choices=("mean_diff", "probe", "gatebreaker"), group="detect")
    threshold: float = _f(2.5, "Keep neurons whose score has z-score above this (within its module).", group="detect")
    min_weight: float = _f(0.0, "...and whose score is above this.", group="detect")
    max_neurons_per_module: int = _f(0, "Keep at most this many neurons per module (highest scores); 0 = no cap.", group="detect")
    pool: str = _f("max", "How a neuron's activation is pooled over the prompt tokens.", choices=("max", "mean", "last"), group="detect")
    probe_epochs: int = _f(5000, "Probe: maximum full-batch Adam epochs (stops early when the loss settles).", group="detect")
    probe_lr: float = _f(1e-3, "Probe: Adam learning rate.", group="detect")
    probe_weight_decay: float = _f(1e-3, "Probe: weight decay.", group="detect")
    probe_standardize: bool = _f(False, "Probe: z-score each neuron's pooled activations first (NeuroStrike: raw).", group="detect")
    clusters: int | None = _f(None, "Fixed number of clusters per module (default: chosen by silhouette in [k_min, k_max]).", group="detect")
    k_min: int = _f(2, "Smallest k tried by the silhouette search.", group="detect")
    k_max: int = _f(4, "Largest k tried by the silhouette search.", group="detect")
    cluster_seed: int | None = _f(None, "Seed of k-means alone (default: --seed). Varying it with every other seed fixed "
                                        "measures what the clustering contributes to a recipe's spread.", group="detect")
    neurons: str | None = _f(None, "Reuse the neurons and clusters of this .nestpatch (made for the same base model) instead of "
                                   "detecting and clustering: a new policy version on the same neurons, so `nestpatch diff` "
                                   "compares deltas, or a run that varies only training. Its targets replace --modules/--layers.",
                             group="detect")

    # --- training ---
    refusal_targets: str = _f("auto", "Refusal targets: the model's own refusals (own), the project's templates (template), or "
                                      "own when the model refuses at least a quarter of a harmful sample, else templates (auto).",
                              choices=REFUSAL_TARGETS)
    retain_loss: str = _f("ce", "Retain term on benign prompts: KL to the frozen base on its own answers (kl), cross-entropy on "
                                "those answers (ce), or none.", choices=RETAIN_LOSSES)
    retain_weight: float = _f(1.5, "Weight of the retain term.")
    retain_answer_tokens: int = _f(16, "Length of the base model's greedy answers used by the retain term.")
    head_tokens: int = _f(4, "Opening response tokens (refusal targets and retain answers) weighted by --head-weight: "
                             "the opening decides whether a reply refuses.")
    head_weight: float = _f(4.0, "Loss weight of the first --head-tokens response tokens (1 = plain mean).")
    benign_refusal_weight: float = _f(0.0, "Weight of an unlikelihood term that pushes down refusal openings after benign "
                                           "prompts (-log(1 - p(opening))); 0 disables.")
    benign_refusal_tokens: int = _f(4, "Tokens of the refusal opening the unlikelihood term scores.")
    steps: int = _f(60, "Optimizer steps.")
    batch_size: int = _f(8, "Harmful prompts per micro-batch (the same number of benign prompts is added).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    lr: float = _f(2e-2, "AdamW learning rate for the shared deltas.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(5, "Linear warm-up steps.")
    schedule: str = _f("cosine", "Learning-rate schedule after warm-up.", choices=SCHEDULES)
    max_grad_norm: float = _f(1.0, "Gradient clipping (global L2 norm); 0 disables.")
    max_length: int = _f(192, "Longest prompt in tokens (longer prompts keep their end).")
    qat: str = _f("none", "Quantization-aware training: train the delta through this GGUF type's quantize/dequantize round "
                          "trip (straight-through estimator), as it will run once folded.", choices=QAT_TYPES)
    seed: int | None = _f(None, "Random seed (drawn and recorded when absent).")

    # --- runtime ---
    device: str = _f("auto", "Device: auto, cpu, cuda, mps.", choices=("auto", "cpu", "cuda", "mps"), group="runtime")
    device_map: str | None = _f(None, "accelerate device map (auto) for models larger than one device.", group="runtime")
    bf16: bool = _f(False, "bfloat16 autocast for forward/backward (the deltas and optimizer stay float32). Helps on GPUs and "
                           "on CPUs with native bfloat16 (AVX512-BF16, AMX: 1.9x float32's speed on Qwen2.5-Coder-0.5B, "
                           "benchmarks/train_precision.py); on CPUs without it, several times slower. The recipes were "
                           "validated in float32.", group="runtime")
    threads: int = _f(0, "torch CPU threads (0 = leave torch's default).", group="runtime")
    activation_checkpointing: bool = _f(False, "Recompute each decoder layer's forward during backward instead of keeping its "
                                               "activations: same losses and gradients, much less memory, about a third more "
                                               "compute (the Qwen recipes turn it on).", group="runtime")
    batch_size_detect: int = _f(16, "Batch size for detection and answer generation.", group="runtime")
    answer_backend: str = _f("auto", "What generates the base model's answers (own refusals, retain answers): llama.cpp on the GGUF "
                                     "file itself, with batched decoding (llama; auto picks it for a .gguf model when llama-cpp-python "
                                     "is installed: several times faster on a CPU than torch's generate on the dequantized weights), "
                                     "or torch.", choices=ANSWER_BACKENDS, group="runtime")
    checkpoint_every: int = _f(20, "Save a checkpoint every this many steps (0 = only at the end).", group="runtime")
    resume: bool = _f(False, "Resume from the checkpoint next to --out after an interruption.", group="runtime")
    keep_checkpoint: bool = _f(False, "Keep the checkpoint directory after a successful run.", group="runtime")
    recipe: str = _f("auto", "Per-model recipe (nestpatch/train/recipes.py): auto = the one the named --model selects, if any; "
                             "none = plain defaults; or a recipe name. Flags and --config keys override its values.",
                     group="runtime")

    # --- method options (issue 16; appended so other fields keep their order) ---
    balance_by: str = _f("none", "How --max-prompts is shared out: in proportion to each source's size (none), equally per "
                                 "source (source), or equally per prompt form (form: question, imperative, steps, role-play, "
                                 "writing, code; rows without a form count as question or imperative), so a large source of "
                                 "one form does not crowd out the others.", choices=BALANCE_BY, group="data")
    recovery_fraction: float = _f(0.0, "Share of harmful prompts that also get a recovery example: the prompt, the first few "
                                       "tokens of a compliant answer (no loss), then the refusal (loss): refusal that is not only "
                                       "in the first tokens, against prefilling attacks (Qi et al., 2024). 0 disables.")
    recovery_tokens: int = _f(8, "Most tokens of the compliant opening in a recovery example (each draws 2..this many).")
    detect_pool: str = _f("training", "Where --detect-prompts are drawn from: the training sample (--max-prompts) or every prompt "
                                      "of the --harmful/--benign sources (sources). Detection needs no targets, so a detection "
                                      "sample larger than the training sample costs forward passes only.",
                          choices=DETECT_POOLS, group="detect")

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every value; raise :class:`InputError` naming the option."""
        if not self.model:
            raise InputError("--model is required (an HF directory, a .gguf file, or smollm2)")
        if not self.out:
            raise InputError("--out is required (the .nestpatch to write)")
        if not self.harmful or not self.benign:
            raise InputError("at least one --harmful and one --benign source are needed")
        for f in fields(self):
            choices = f.metadata.get("choices")
            v = getattr(self, f.name)
            if choices and v is not None and v not in choices:
                raise InputError(f"--{_flag(f.name)} {v!r} invalid; expected one of {', '.join(map(str, choices))}")
        for m in self.modules:
            if m not in ("gate_proj", "up_proj", "down_proj"):
                raise InputError(f"--modules {m!r} invalid; expected gate_proj, up_proj or down_proj")
        positive = ("steps", "batch_size", "grad_accum", "max_length", "probe_epochs", "retain_answer_tokens", "batch_size_detect",
                    "benign_refusal_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise InputError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.detect_resamples < 1 or not 0.0 < self.detect_consensus <= 1.0:
            raise InputError(f"--detect-resamples must be at least 1 and --detect-consensus in (0, 1]; got "
                             f"{self.detect_resamples} and {self.detect_consensus}")
        if self.detect_resamples > 1 and self.detector == "probe":
            raise InputError("--detect-resamples needs the mean_diff or gatebreaker detector (probe would fit a probe per sample)")
        for name in ("max_prompts", "detect_prompts", "warmup_steps", "checkpoint_every", "threads", "max_neurons_per_module",
                     "retain_weight", "weight_decay", "max_grad_norm", "head_tokens", "head_weight",
                     "benign_refusal_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.recovery_fraction <= 1.0:
            raise InputError(f"--recovery-fraction must be in [0, 1], got {self.recovery_fraction}")
        if self.recovery_tokens < 2:
            raise InputError(f"--recovery-tokens must be at least 2, got {self.recovery_tokens}")
        if self.clusters is not None and self.clusters < 1:
            raise InputError(f"--clusters must be at least 1, got {self.clusters}")
        if self.cluster_seed is not None and self.cluster_seed < 0:
            raise InputError(f"--cluster-seed must be at least 0, got {self.cluster_seed}")
        if self.k_min < 2 or self.k_max < self.k_min:
            raise InputError(f"--k-min/--k-max must satisfy 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise InputError(f"--seed must be in [0, 2^32), got {self.seed}")
        if self.neurons is not None and not Path(self.neurons).is_file():
            raise InputError(f"{self.neurons}: no such patch (--neurons)")
        if self.device_map not in (None, "auto"):
            raise InputError(f"--device-map {self.device_map!r} invalid; expected auto")
        return self

    def resolved(self) -> "TrainConfig":
        """A validated copy with the seed drawn when absent."""
        c = dataclasses.replace(self, modules=list(self.modules), layers=list(self.layers), harmful=list(self.harmful),
                                benign=list(self.benign))
        if c.seed is None:
            c.seed = secrets.randbelow(2**31)
        return c.validate()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def fingerprint(self, ignore: tuple[str, ...] = ("resume", "keep_checkpoint", "checkpoint_every", "threads", "device",
                                                     "device_map", "out", "steps", "policy_name", "policy_version",
                                                     "policy_description", "delta_dtype", "activation_checkpointing")) -> str:
        """Hash of the settings that change the training trajectory (checked by ``--resume``)."""
        default = TrainConfig()
        d = {k: v for k, v in self.to_dict().items()
             if k not in ignore and not (k in _LATER_FIELDS and v == getattr(default, k))}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict, label: str = "config") -> "TrainConfig":
        """Build from a mapping (TOML keys = field names; dashes allowed), checking names and types."""
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        kw = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise InputError(f"{label}: unknown option {key!r}; known options: {', '.join(sorted(known))}")
            kw[name] = _coerce(value, hints[name], f"{label}: option {key!r}")
        return cls(**kw)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a TOML file; keys may sit at the top level or under a ``[train]`` table."""
        p = Path(path)
        data = read_toml(p, "config file")
        if "train" in data and isinstance(data["train"], dict):
            data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
        return cls.from_dict(data, str(p))

    def merged(self, overrides: dict) -> "TrainConfig":
        """A copy with ``overrides`` (values that are not ``None``) applied."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_toml(self) -> str:
        """The config as TOML, fields under a comment naming their group (``None`` values are written as comments: TOML has no null)."""
        lines = ["# nestpatch train: resolved configuration (usable with --config)"]
        groups: dict[str, list] = {}  # io, data, detect, ... in the order they first appear
        for f in fields(self):
            groups.setdefault(f.metadata.get("group", "training"), []).append(f)
        for group, members in groups.items():
            lines.append(f"\n# [{group}]")
            for f in members:
                v = getattr(self, f.name)
                lines.append(f"# {f.name} = (unset)" if v is None else f"{f.name} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a TOML value against a field type (``int``, ``float``, ``str``, ``bool``, lists, optionals)."""
    origin, args = get_origin(hint), get_args(hint)
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        return None if value is None else _coerce(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], where) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{where} must be a string, got {value!r}")
        return value
    return value


def field_specs() -> list[tuple[str, Any, Any, dict]]:
    """``(name, type hint, default, metadata)`` of every field, in order (the CLI builds its flags from this)."""
    hints = get_type_hints(TrainConfig)
    out = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, hints[f.name], default, dict(f.metadata)))
    return out
