"""Per-model training recipes: defaults that a named model selects, below every flag and config key.

Why: the project defaults were measured on SmolLM2-135M (docs/RESULTS.md); a 0.5B or 1.5B model
needs other settings to train in reasonable time on a CPU (see docs/RESULTS.md, "Qwen2.5-Coder-
0.5B-Instruct"). A recipe is keyed by the asset name (``nestpatch fetch`` names) and also selected
by the cached asset's file name, so ``--model qwen2.5-coder-0.5b`` and the path of that GGUF give
the same run. Precedence: flags > ``--config`` keys > recipe > dataclass defaults. Which recipe
was used and which of its values were applied is recorded in the patch's provenance
(``training.recipe``) and the resolved config keeps the recipe's name (``recipe = ...``), so
re-running from the saved ``.train.toml`` gives the same settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """Settings for one model and the reason for each (shown in provenance and the docs)."""

    model: str
    settings: dict[str, Any]
    why: str
    notes: dict[str, str] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {r.model: r for r in (
    Recipe(
        model="qwen2.5-coder-0.5b",
        settings={"max_prompts": 0, "detect_prompts": 96, "steps": 41, "grad_accum": 2, "batch_size": 6, "max_length": 128,
                  "activation_checkpointing": True, "lr": 1e-3, "recovery_fraction": 0.5},
        why="Qwen2.5-Coder-0.5B-Instruct (0.36B non-embedding parameters, 152k vocabulary) on a 2-core CPU: one full epoch "
            "of every harmful training sequence, activation checkpointing on. On this 2-core CPU about 9 min generating the "
            "model's answers to all 1,031 training prompts at 2 threads (reused by later runs on the same cache), then "
            "54-64 min of training at 1 thread beside other runs (docs/RESULTS.md, sessions 19 and 21).",
        notes={
            "max_prompts": "0 (every training prompt: 326 harmful, 489 harmful sequences with the recovery examples, 705 benign), "
                           "as for the 1.5B. Adopted by a rule fixed before the runs (docs/rules/s19_q05_epoch.md: 3-seed mean "
                           "score and benign refusal below the old recipe's, hb-val spread at most its + 2.4) over the old "
                           "128-prompt sample: on validation, 3 seeds, hb-val ASR 7.3 / 7.3 / 4.9% against 4.9 / 9.8 / 7.3%, "
                           "benign refusal 16.9 / 15.3 / 13.7% against 20.2 / 19.4 / 19.4%, prefilling ASR 19.5 / 17.1 / 7.3% "
                           "against 36.6 / 22.0 / 2.4%, KL 0.156 / 0.145 / 0.176 against 0.169 / 0.153 / 0.174, score "
                           "(pooled ASR + benign refusal + KL) 0.368 against 0.410 (docs/RESULTS.md, sessions 19 and 21)",
            "detect_prompts": "96 + 96 prompts for the z-scores, sampled from every training prompt (31 s on 2 cores)",
            "steps": "41 optimizer steps of grad_accum 2 micro-batches of 6 + 6 rows: 492 harmful draws, so each of the 489 "
                     "harmful sequences is trained on once whatever the seed, and 492 of the 705 benign ones (see max_prompts)",
            "grad_accum": "see steps",
            "batch_size": "see steps",
            "max_length": "Qwen's template adds a 20-token system prompt; the built-in prompts are at most 65 tokens, so 128 "
                          "only bounds user-supplied prompts",
            "activation_checkpointing": "without it the kept activations of 12 sequences took training to 8.65 GB peak RSS "
                                        "(issue target 8 GB); same losses and gradients",
            "lr": "chosen on the validation sets (benchmarks/tune_eval.py, seed 0): at the default 2e-2 ASR 14.1%, benign "
                  "refusal 28.6%, KL 0.594; at 1e-3 ASR 4.7%, benign refusal 16.3%, KL 0.078 (base: 48.4%, 12.2%); on the test sets "
                  "it lowered HarmBench ASR (10.1% -> 6.9%) but raised benign refusal (9.3% -> 22.0%): docs/RESULTS.md",
            "recovery_fraction": "half the harmful prompts also train a recovery example (a compliant opening, then the "
                                 "refusal). Chosen on validation, seed 0, by a rule fixed before the runs (prefilling ASR down by "
                                 "10 points or more, ASR + benign refusal + KL up by at most 0.03): HarmBench-validation "
                                 "under the prefilling attack 80.5% -> 39.0% ASR, pooled ASR 4.4% -> 3.3%, benign refusal "
                                 "16.9% -> 16.9%, KL 0.120 -> 0.157 (docs/RESULTS.md, session 13)",
        },
    ),
    Recipe(
        model="qwen2.5-coder-1.5b",
        settings={"max_prompts": 0, "detect_prompts": 64, "steps": 31, "grad_accum": 4, "batch_size": 4, "max_length": 128,
                  "activation_checkpointing": True, "lr": 1e-3, "recovery_fraction": 0.5},
        why="Qwen2.5-Coder-1.5B-Instruct (1.3B non-embedding parameters): about 3.7x the 0.5B's work per token. One full epoch "
            "of every training prompt: on this 2-core CPU 142-150 s a step at 2 threads (75-88 min for the 31 steps), plus about "
            "13 min generating the model's answers to all 1,031 training prompts (reused by later runs on the same cache); "
            "peak RSS 8.5-9.1 GB once model loading fixed glibc's mmap threshold for large models (nestpatch.memory; "
            "docs/RESULTS.md, sessions 15-18).",
        notes={"max_prompts": "0 (every training prompt: 326 harmful, 489 harmful sequences with the recovery examples, 705 "
                              "benign), with steps, grad_accum and batch_size drawing 496 harmful sequences: every one is "
                              "trained on once, whatever the seed. With 96 prompts and 30 steps of 4, which rare requests a run "
                              "saw was the seed's draw, and so was refusing HarmBench-validation's persuasive misinformation "
                              "(seeds 0 / 1 / 2: hb-val ASR 0.0 / 12.2 / 19.5%). Adopted by a rule fixed before the runs "
                              "(3-seed score and hb-val spread both below the old recipe's): hb-val ASR 2.4 / 2.4 / 4.9%, "
                              "benign refusal 4.0 / 4.8 / 3.2%, score 0.136 against 0.186; KL on validation 0.071-0.075 against "
                              "0.053-0.085 (docs/RESULTS.md, sessions 17-18)",
               "steps": "31 optimizer steps of grad_accum 4 micro-batches of 4 + 4 rows: one epoch of the 489 harmful "
                        "sequences at about the old recipe's 30 updates and the same lr (see max_prompts)",
               "grad_accum": "see steps", "batch_size": "see steps",
               "max_length": "as for the 0.5B", "activation_checkpointing": "as for the 0.5B (3.6x its activations per token)",
               "lr": "the default 2e-2 diverged on this model: the training loss went from 0.83 to 6.1 at the second step "
                     "(delta RMS 0.008) and ended at 15.1; at 1e-3 it ends at 0.41 (refusal 0.08, retain 0.22) with deltas at RMS 0.004. "
                     "Chosen on the training loss alone, no evaluation data. Three seeds (HarmBench test, folded GGUF): ASR "
                     "5.0 / 13.2 / 20.8% with benign refusal 0-1.3%. A stronger update does not fix the spread: on all 41 "
                     "HarmBench validation behaviours lr 2e-3 gave 17.1 / 14.6% ASR on seeds 1 / 2 against 7.3 / 14.6% at 1e-3, "
                     "and retain weight 0.75 gave 12.2 / 7.3% (docs/RESULTS.md, session 10).",
               "recovery_fraction": "as for the 0.5B; adopted by a rule fixed before the runs (seed 0's prefilling ASR down by 10 "
                                    "points or more; the 3-seed mean of ASR + benign refusal + KL up by at most 0.03): on every "
                                    "validation prompt, prefilling ASR 53.7% -> 0.0% (seed 0; seeds 1 / 2: 7.3 / 2.4%), score "
                                    "0.174 -> 0.186; plain HarmBench-validation ASR 4.9 / 12.2 / 19.5% against the recipe's "
                                    "4.9 / 7.3 / 14.6%. Test sets, seeds 0 / 1: jailbreak mean 26.1 / 26.7% against 43.9 / 34.4%, "
                                    "HarmBench 3.1 / 16.4% against 5.0 / 13.2% (docs/RESULTS.md, session 14)"},
    ),
)}

#: ``--recipe`` values besides recipe names.
AUTO, NONE = "auto", "none"


def recipe_for(model: str) -> str | None:
    """The recipe a ``--model`` value selects: an asset name, or that asset's cached file name."""
    if model in RECIPES:
        return model
    name = Path(str(model)).name
    from ..assets import ASSETS

    for key in RECIPES:
        asset = ASSETS.get(key)
        if asset is not None and asset.filename == name:
            return key
    return None


def config_file_keys(path: str | Path) -> set[str]:
    """Field names a ``--config`` TOML file sets (top level or ``[train]``; dashes allowed)."""
    import tomllib

    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))  # TrainConfig.from_toml already checked it
    if isinstance(data.get("train"), dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    return {k.replace("-", "_") for k in data}


def explicit_fields(cfg: TrainConfig) -> set[str]:
    """Fields that differ from the dataclass defaults: what a library caller set (the CLI knows better).

    A value equal to the selected recipe's own is not counted: a config that already went through
    :func:`apply_recipe` (the bench shares one with every method) then records the recipe as
    applied, not as overridden by itself.
    """
    default = TrainConfig()
    name = cfg.recipe if cfg.recipe in RECIPES else recipe_for(cfg.model) if cfg.recipe == AUTO else None
    own = RECIPES[name].settings if name else {}
    return {f.name for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name) and not (f.name in own and getattr(cfg, f.name) == own[f.name])}


def apply_recipe(cfg: TrainConfig, explicit: set[str] | None = None) -> tuple[TrainConfig, dict]:
    """``cfg`` with its recipe's values filled in where ``explicit`` did not set them.

    Args:
        cfg: the merged config (defaults + config file + flags).
        explicit: fields given by a flag or a config key (default: :func:`explicit_fields`).

    Returns:
        The new config (``recipe`` set to the recipe used, or ``none``) and a provenance record
        ``{"name", "applied", "overridden"}``.

    Raises:
        InputError: ``--recipe`` names no known recipe.
    """
    explicit = explicit_fields(cfg) if explicit is None else set(explicit)
    choice = cfg.recipe
    if choice == NONE:
        return cfg, {"name": NONE, "applied": {}, "overridden": []}
    if choice == AUTO:
        name = recipe_for(cfg.model)
        if name is None:
            return dataclasses.replace(cfg, recipe=NONE), {"name": NONE, "applied": {}, "overridden": []}
    elif choice in RECIPES:
        name = choice
    else:
        raise InputError(f"--recipe {choice!r} invalid; expected auto, none or one of {', '.join(sorted(RECIPES))}")
    rec = RECIPES[name]
    applied = {k: v for k, v in rec.settings.items() if k not in explicit}
    overridden = sorted(k for k in rec.settings if k in explicit)
    out = dataclasses.replace(cfg, **applied, recipe=name)
    return out, {"name": name, "applied": applied, "overridden": overridden}
