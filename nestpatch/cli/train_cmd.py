"""``nestpatch train``: detect safety neurons, cluster them, train shared deltas, write a ``.nestpatch``.

Every flag is generated from :class:`nestpatch.train.config.TrainConfig` (one source for flags,
TOML files and the resolved config saved next to the output). Flags override ``--config``.
"""

from __future__ import annotations

import json
from typing import Any, get_args, get_origin

import click

from ..train.config import TrainConfig, field_specs


def _param_type(hint: Any, meta: dict) -> tuple[Any, bool]:
    """click type and whether the option repeats, from a field's type hint."""
    origin, args = get_origin(hint), get_args(hint)
    if args and type(None) in args:
        hint = [a for a in args if a is not type(None)][0]
        origin, args = get_origin(hint), get_args(hint)
    multiple = origin is list
    base = args[0] if multiple else hint
    if meta.get("choices"):
        return click.Choice([str(c) for c in meta["choices"]]), multiple
    return {int: int, float: float, str: str, bool: bool}.get(base, str), multiple


def _show_default(default: Any) -> str:
    if default is None or default == "" or default == []:
        return "none" if default is None else ""
    if isinstance(default, list):
        return ",".join(map(str, default))
    return str(default)


def config_options(f: Any) -> Any:
    """Decorate ``f`` with one click option per config field (defaults ``None``: "not given")."""
    for name, hint, default, meta in reversed(field_specs()):
        flag = "--" + name.replace("_", "-")
        typ, multiple = _param_type(hint, meta)
        shown = _show_default(default)
        help_text = meta.get("help", "") + (f"  [default: {shown}]" if shown else "")
        if typ is bool:
            f = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)(f)
        elif multiple:
            f = click.option(flag, name, type=typ, multiple=True, help=help_text + " (repeatable; commas also split)")(f)
        else:
            f = click.option(flag, name, type=typ, default=None, help=help_text)(f)
    return f


def _overrides(kwargs: dict) -> dict:
    """CLI values that were given, lists split on commas and converted to the field type."""
    out = {}
    types = {name: _param_type(hint, meta) for name, hint, _, meta in field_specs()}
    for name, value in kwargs.items():
        if name not in types or value is None:
            continue
        typ, multiple = types[name]
        if multiple:
            if not value:
                continue
            items = [x for v in value for x in str(v).split(",") if x != ""]
            out[name] = [typ(x) if typ in (int, float) else x for x in items]
        else:
            out[name] = value
    return out


def _render(result: Any) -> str:
    det, cfg, patch = result.detection, result.config, result.patch
    modules = list(cfg.modules)
    lines = [f"detection ({det['detector']}, z > {det['threshold']:g}): {det['selected']} of {det['of']} neurons "
             f"({100 * det['fraction']:.2f}%), {det['prompts']['harmful']}+{det['prompts']['benign']} prompts",
             "  layer  " + "  ".join(f"{m:>9}" for m in modules)]
    for layer in sorted(result.per_layer):
        row = result.per_layer[layer]
        lines.append(f"  {layer:>5}  " + "  ".join(f"{row.get(m, 0):>9}" for m in modules))
    s = result.summary
    lines += [
        f"clusters: {patch.n_clusters} over {len(patch.targets)} targets; trainable parameters: {patch.trainable_parameters:,}",
        f"training: {s.steps} steps (from {s.start_step}), final loss " + ", ".join(f"{k} {v:.4f}" for k, v in s.final.items()),
        f"seed {cfg.seed}; time {result.timings.get('total_s', 0):.0f} s; peak memory {result.peak_rss_mb:.0f} MB",
        f"wrote {result.paths.patch}",
        f"      {result.paths.config} (resolved config), {result.paths.log} (training log)",
    ]
    return "\n".join(lines)


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with any of the options below (flags given here override it).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the table.")
@click.option("--force", is_flag=True, help="Replace an existing OUT patch (without --resume).")
@config_options
def train_cmd(config_file: str | None, quiet: bool, as_json: bool, force: bool, **kwargs: Any) -> None:
    """Train a NeST safety policy for MODEL and write it to OUT (.nestpatch).

    \b
    Example:
      nestpatch train --model smollm2 --out safety.nestpatch
      nestpatch train --config train.toml --steps 200 --resume
    """
    from ..train.pipeline import train_policy
    from ..train.recipes import config_file_keys

    cfg = TrainConfig.from_toml(config_file) if config_file else TrainConfig()
    given = _overrides(kwargs)
    cfg = cfg.merged(given)
    explicit = set(given) | (config_file_keys(config_file) if config_file else set())  # the model's recipe fills the rest
    if cfg.out:
        from . import inputs

        inputs.guard_outputs([cfg.out], [inputs.model_location(cfg.model) if cfg.model else None, config_file],
                             force=force, existing_ok=bool(cfg.resume))
    result = train_policy(cfg, progress=not quiet, explicit=explicit)
    if as_json:
        click.echo(json.dumps({
            "out": str(result.paths.patch), "seed": result.config.seed, "detection": result.detection,
            "clusters": result.patch.n_clusters, "trainable_parameters": result.patch.trainable_parameters,
            "final_loss": result.summary.final, "timings_s": result.timings, "peak_rss_mb": round(result.peak_rss_mb, 1),
        }, indent=2))
    else:
        click.echo(_render(result))


def register(group: click.Group) -> None:
    group.add_command(train_cmd)
