"""``nestpatch bench``: NeST against LoRA, full fine-tuning and circuit breakers, one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..baselines.options import BenchOptions
from .options import dataclass_from_options, dataclass_options, json_option, model_argument, output_option, print_json, progress_option


#: Options that are not :class:`BenchOptions` fields: what to bench (``run_bench``'s model and directory) and how to report.
CALL_ARGUMENTS = ("model", "out_dir", "as_json")


@click.command("bench")
@model_argument(old_option=True)
@output_option("out_dir", required=True, help="Bench directory (created; a rerun skips methods already finished there).",
               file_okay=False)
@progress_option
@json_option("Print results.json instead of the table.")
@dataclass_options(BenchOptions)
def bench_cmd(model: str, out_dir: str, progress: bool, as_json: bool, **settings: Any) -> None:
    """Train NeST and the baselines on MODEL with the same data, evaluate them the same way, write one table.

    \b
    Writes BENCH_DIR/results.md, results.json and asr_vs_params.png, plus one
    directory per method (artifact, training log, evaluation runs, folded model).
    Example:
      nestpatch bench smollm2 --methods nest,lora,full,cb -o bench/ --limit 50
    """
    import logging

    from ..baselines import bench

    from . import inputs

    # the options after --json are generated from BenchOptions: parse them into it, then build the runner's config
    opts = dataclass_from_options(BenchOptions, settings)
    # the bench directory resumes (may exist) but is never the model, a config, or inside the cache
    inputs.guard_outputs([out_dir], [inputs.model_location(model), opts.train_config], existing_ok=True)
    cfg = opts.config(model, out_dir, progress=progress, log_level=logging.getLogger().getEffectiveLevel())
    table = bench.run_bench(cfg)
    if as_json:
        print_json(table)
        return
    from ..baselines.table import render_markdown

    click.echo(render_markdown(table))
    out = Path(out_dir)
    click.echo(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'asr_vs_params.png'}")


def register(group: click.Group) -> None:
    group.add_command(bench_cmd)
