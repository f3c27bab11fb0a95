"""``nestpatch train``: detect safety neurons, cluster them, train shared deltas, write a ``.nestpatch``.

Every flag is generated from :class:`nestpatch.train.config.TrainConfig` (one source for flags,
TOML files and the resolved config saved next to the output). Flags override ``--config``.
"""

from __future__ import annotations

from typing import Any

import click

from ..train.config import TrainConfig
from .options import (dataclass_options, dataclass_overrides, force_option, json_option, model_argument, output_option,
                      print_json, progress_option)


#: Fields that are not generated flags: MODEL is the positional, OUT is ``-o/--output``.
_NOT_FLAGS = ("model", "out")


def config_options(f: Any) -> Any:
    """One click option per :class:`TrainConfig` field except MODEL and OUT (defaults ``None``: "not given")."""
    return dataclass_options(TrainConfig, exclude=_NOT_FLAGS)(f)


def _overrides(kwargs: dict) -> dict:
    """CLI values that were given (MODEL and OUT included), lists split on commas and converted to the field type."""
    given = dataclass_overrides(TrainConfig, kwargs)
    return {k: v for k, v in given.items() if k in kwargs}


def _render(result: Any) -> str:
    det, cfg, patch = result.detection, result.config, result.patch
    modules = list(cfg.modules)
    if "neurons_from" in det:  # the source patch's targets decide the modules, not --modules
        modules = [m for m in ("gate_proj", "up_proj", "down_proj") if any(m in row for row in result.per_layer.values())]
        src = det["neurons_from"]
        head = f"neurons from {src['path']} (seed {src['seed']}): {det['selected']} of {det['of']} neurons ({100 * det['fraction']:.2f}%)"
    else:
        head = (f"detection ({det['detector']}, z > {det['threshold']:g}): {det['selected']} of {det['of']} neurons "
                f"({100 * det['fraction']:.2f}%), {det['prompts']['harmful']}+{det['prompts']['benign']} prompts")
    lines = [head, "  layer  " + "  ".join(f"{m:>9}" for m in modules)]
    for layer in sorted(result.per_layer):
        row = result.per_layer[layer]
        lines.append(f"  {layer:>5}  " + "  ".join(f"{row.get(m, 0):>9}" for m in modules))
    s = result.summary
    lines += [
        f"clusters: {patch.n_clusters} over {len(patch.targets)} targets; trainable parameters: {patch.trainable_parameters:,}",
        f"training: {s.steps} steps (from {s.start_step}), final loss " + ", ".join(f"{k} {v:.4f}" for k, v in s.final.items()),
        *([f"  the steps drew {c['harmful_seen']} of {c['harmful_sequences']} harmful and {c['benign_seen']} of "
           f"{c['benign_sequences']} benign training sequences"] if (c := s.coverage) else []),
        f"seed {cfg.seed}; time {result.timings.get('total_s', 0):.0f} s; peak memory {result.peak_rss_mb:.0f} MB",
        f"wrote {result.paths.patch}",
        f"      {result.paths.config} (resolved config), {result.paths.log} (training log)",
    ]
    return "\n".join(lines)


@click.command("train")
@model_argument(required=False, old_option=True)
@output_option("out", help="Output .nestpatch path (default: the config's out). The resolved config (.train.toml), the training "
               "log (.train.jsonl) and checkpoints (.ckpt/) go next to it.", dir_okay=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with any of the options below (flags given here override it).")
@progress_option
@json_option("Print a JSON summary instead of the table.")
@force_option("Replace an existing OUT patch (without --resume).")
@config_options
def train_cmd(model: str | None, out: str | None, config_file: str | None, progress: bool, as_json: bool, force: bool,
              **kwargs: Any) -> None:
    """Train a NeST safety policy for MODEL and write it to OUT (.nestpatch).

    MODEL (HF directory, .gguf file or a named model such as smollm2) and OUT may also come
    from --config.

    \b
    Example:
      nestpatch train smollm2 -o safety.nestpatch
      nestpatch train --config train.toml --steps 200 --resume
    """
    from ..train.pipeline import train_policy
    from ..train.recipes import config_file_keys

    cfg = TrainConfig.from_toml(config_file) if config_file else TrainConfig()
    given = _overrides({**kwargs, "model": model, "out": out})
    cfg = cfg.merged(given)
    explicit = set(given) | (config_file_keys(config_file) if config_file else set())  # the model's recipe fills the rest
    if cfg.out:
        from . import inputs

        inputs.guard_outputs([cfg.out], [inputs.model_location(cfg.model) if cfg.model else None, config_file],
                             force=force, existing_ok=bool(cfg.resume))
    result = train_policy(cfg, progress=progress, explicit=explicit)
    if as_json:
        print_json({
            "out": str(result.paths.patch), "seed": result.config.seed, "detection": result.detection,
            "clusters": result.patch.n_clusters, "trainable_parameters": result.patch.trainable_parameters,
            "final_loss": result.summary.final, "coverage": result.summary.coverage, "timings_s": result.timings,
            "peak_rss_mb": round(result.peak_rss_mb, 1),
        })
    else:
        click.echo(_render(result))


def register(group: click.Group) -> None:
    group.add_command(train_cmd)
