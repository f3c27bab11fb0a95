"""``nestpatch tune``: search the training recipe for one model on validation data (Optuna, multi-objective)."""

from __future__ import annotations

from typing import Any

import click

from ..tune.options import TuneOptions
from .options import dataclass_from_options, dataclass_options, json_option, model_argument, output_option, print_json, quiet


#: Options that are not :class:`TuneOptions` fields: the base training config every trial starts from, and the report.
CALL_ARGUMENTS = ("model", "out", "config_file", "threads", "as_json")


@click.command("tune")
@model_argument()
@output_option("out", required=True, help="Output directory (created; rerun with the same directory to resume the study).",
               file_okay=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="train.toml with fixed settings for every trial (the space overrides the fields it searches).")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default).")
@json_option("Print the front as JSON at the end.")
@dataclass_options(TuneOptions)
def tune_cmd(model: str, out: str, config_file: str | None, threads: int, as_json: bool, **kwargs: Any) -> None:
    """Find the NeST recipe for MODEL: each trial trains a patch and measures it on validation sets.

    \b
    Objectives (minimised): ASR, benign refusal, KL to base, on HarmBench validation, the held-out
    splits of the built-in sets and the built-in edgy held-out rows; no evaluation set is used.
    Writes OUT/pareto.md, OUT/pareto.png, OUT/train.toml (the chosen trial) and OUT/trials.jsonl.

    \b
    Example:
      nestpatch tune smollm2 -o runs/tune --trials 30 --timeout 7200
      nestpatch train --config runs/tune/train.toml
    """
    from ..errors import InputError
    from ..train.config import TrainConfig
    from ..tune.study import run_tune

    opts = dataclass_from_options(TuneOptions, kwargs)
    if opts.trials < 1:
        raise InputError(f"--trials must be at least 1, got {opts.trials}")
    base = TrainConfig.from_toml(config_file) if config_file else TrainConfig()
    if threads:
        base = base.merged({"threads": threads})
    result = run_tune(model, out, opts, base, progress=None if quiet() else (lambda line: click.echo(line, err=True)))
    if as_json:
        print_json({"out": str(result.out), "finished": result.finished, "ran_now": result.ran_now,
                    "chosen": result.chosen and result.chosen["trial"], "base": result.base,
                    "front": [{"trial": r["trial"], **r["metrics"], "params": r["params"]} for r in result.front]})
        return
    click.echo(f"{result.finished} trials finished ({result.ran_now} now); Pareto front: {len(result.front)}")
    if result.chosen:
        m = result.chosen["metrics"]
        click.echo(f"chosen trial {result.chosen['trial']}: ASR {m['asr']:.3f}, benign refusal {m['benign_refusal']:.3f}, "
                   f"KL {m['kl']:.4f} (base ASR {result.base.get('asr', float('nan')):.3f}, "
                   f"benign refusal {result.base.get('benign_refusal', float('nan')):.3f})")
        click.echo(f"wrote {result.out / 'pareto.md'}, {result.out / 'pareto.png'}, {result.out / 'trials.jsonl'}")
        click.echo(f"      {result.out / 'train.toml'} (nestpatch train --config {result.out / 'train.toml'})")
    else:
        click.echo("no trial finished; see trials.jsonl for the errors")


def register(group: click.Group) -> None:
    group.add_command(tune_cmd)
