"""``nestpatch bench``: NeST against LoRA, full fine-tuning and circuit breakers, one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import InputError
from .options import json_option, model_argument, output_option, print_json, progress_option


def _per_method(value: str | None, flag: str, cast: type, methods: list[str]) -> dict[str, Any]:
    """``"120"`` (every method) or ``"nest=120,lora=60"`` -> ``{method: value}``."""
    from ..baselines.registry import get_method

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


def _options(pairs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--option lora.rank=16`` -> ``{"lora": {"rank": 16}}`` (values parsed as JSON when they are JSON)."""
    from ..baselines.registry import get_method

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


@click.command("bench")
@model_argument(old_option=True)
@click.option("--methods", default="nest,lora,full,cb", show_default=True,
              help="Comma-separated methods: nest, lora, full, cb (circuit breakers).")
@output_option("out_dir", required=True, help="Bench directory (created; a rerun skips methods already finished there).",
               file_okay=False)
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N prompts of each suite.")
@click.option("--steps", default=None, help="Optimizer steps: N for every method, or METHOD=N pairs (default: nestpatch train's).")
@click.option("--lr", default=None, help="Learning rate: X for every method, or METHOD=X pairs (default: each method's own).")
@click.option("--lora-rank", type=click.IntRange(1), default=None, help="LoRA rank (default 8).")
@click.option("--full-scope", type=click.Choice(["auto", "all", "mlp"]), default=None,
              help="Full fine-tuning: all weights, MLP weights only, or auto (all when memory allows).")
@click.option("--option", "options", multiple=True, help="Any method option as METHOD.KEY=VALUE (repeatable), e.g. cb.coefficient=5.")
@click.option("--suites", default="harmbench,harmful-heldout,benign,overrefusal,utility", show_default=True,
              help="Evaluation suites (see nestpatch eval; harmful-heldout is the held-out split of the training prompts).")
@click.option("--train-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A nestpatch train TOML: its data, seed and training settings are shared by every method.")
@click.option("--seed", type=int, default=None, help="Seed shared by every method (default: the config's, else 0).")
@click.option("--max-prompts", type=click.IntRange(0), default=None, help="Training prompts per role (0 = all).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Harmful (and as many benign) sequences per step.")
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast in training (default: nestpatch train's).")
@click.option("--device", default=None, help="torch device: auto, cpu, cuda, mps.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for torch and llama.cpp.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True, help="Reply length in evaluation.")
@click.option("--eval-batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--speed/--no-speed", default=True, show_default=True, help="Measure decode tokens/s of the folded models.")
@click.option("--speed-rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--in-process", is_flag=True, help="Run every method in this process (faster start; peak memory is sampled).")
@click.option("--no-base", is_flag=True, help="Do not evaluate the untouched model.")
@progress_option
@json_option("Print results.json instead of the table.")
def bench_cmd(model: str, methods: str, out_dir: str, limit: int | None, steps: str | None, lr: str | None,
              lora_rank: int | None, full_scope: str | None, options: tuple[str, ...], suites: str, train_config: str | None,
              seed: int | None, max_prompts: int | None, batch_size: int | None, bf16: bool | None, device: str | None,
              threads: int | None, max_new_tokens: int, eval_batch_size: int, speed: bool, speed_rounds: int, in_process: bool,
              no_base: bool, progress: bool, as_json: bool) -> None:
    """Train NeST and the baselines on MODEL with the same data, evaluate them the same way, write one table.

    \b
    Writes BENCH_DIR/results.md, results.json and asr_vs_params.png, plus one
    directory per method (artifact, training log, evaluation runs, folded model).
    Example:
      nestpatch bench smollm2 --methods nest,lora,full,cb -o bench/ --limit 50
    """
    import logging

    from ..baselines.bench import BenchConfig, run_bench
    from ..baselines.registry import parse_methods
    from ..train.config import TrainConfig

    from . import inputs

    # the bench directory resumes (may exist) but is never the model, a config, or inside the cache
    inputs.guard_outputs([out_dir], [inputs.model_location(model), train_config], existing_ok=True)
    names = parse_methods(methods)
    tc = TrainConfig.from_toml(train_config) if train_config else TrainConfig()
    tc = tc.merged({"seed": seed, "max_prompts": max_prompts, "batch_size": batch_size, "bf16": bf16, "device": device})
    mopts = _options(options)
    _merge(mopts, "steps", _per_method(steps, "--steps", int, names))
    _merge(mopts, "lr", _per_method(lr, "--lr", float, names))
    if lora_rank is not None:
        mopts.setdefault("lora", {})["rank"] = lora_rank
    if full_scope is not None:
        mopts.setdefault("full", {})["scope"] = full_scope
    verbose = logging.getLogger().getEffectiveLevel()
    cfg = BenchConfig(model=model, out_dir=out_dir, methods=names, train_config=tc, method_options=mopts,
                      suites=[s.strip() for s in suites.split(",") if s.strip()], limit=limit, max_new_tokens=max_new_tokens,
                      eval_batch_size=eval_batch_size, speed=speed, speed_rounds=speed_rounds, threads=threads,
                      isolate=not in_process, include_base=not no_base, progress=progress, log_level=verbose)
    table = run_bench(cfg)
    if as_json:
        print_json(table)
        return
    from ..baselines.table import render_markdown

    click.echo(render_markdown(table))
    out = Path(out_dir)
    click.echo(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'asr_vs_params.png'}")


def register(group: click.Group) -> None:
    group.add_command(bench_cmd)
