"""``nestpatch tune``: search the training recipe for one model on validation data (Optuna, multi-objective)."""

from __future__ import annotations

import json

import click


@click.command("tune")
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; rerun with the same directory to resume the study).")
@click.option("--trials", type=int, default=20, show_default=True,
              help="Finished trials wanted in the study in total (a rerun continues up to this number).")
@click.option("--timeout", type=float, default=None, help="Stop starting new trials after this many seconds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed of every trial and the sampler's seed.")
@click.option("--sampler", type=click.Choice(["nsga2", "tpe"]), default="nsga2", show_default=True,
              help="Optuna sampler: NSGA-II (multi-objective genetic) or TPE.")
@click.option("--population", type=int, default=8, show_default=True, help="NSGA-II population size (TPE: random start trials).")
@click.option("--space", "space", type=click.Path(dir_okay=False), default=None,
              help="TOML file that updates the default search space (lists: choices; {low, high, log}: ranges; scalars: fixed).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="train.toml with fixed settings for every trial (the space overrides the fields it searches).")
@click.option("--limit", type=int, default=0, show_default=True, help="At most this many prompts per validation set (0 = all).")
@click.option("--tokens", type=int, default=32, show_default=True, help="New tokens per validation reply.")
@click.option("--kl-prompts", type=int, default=16, show_default=True, help="Benign validation prompts the KL is measured on.")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default).")
@click.option("--no-defaults-first", is_flag=True, help="Do not run the base config (today's defaults) as trial 0.")
@click.option("--json", "as_json", is_flag=True, help="Print the front as JSON at the end.")
def tune_cmd(model: str, out: str, trials: int, timeout: float | None, seed: int, sampler: str, population: int,
             space: str | None, config_file: str | None, limit: int, tokens: int, kl_prompts: int, threads: int,
             no_defaults_first: bool, as_json: bool) -> None:
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
    from ..tune.study import TuneOptions, run_tune

    if trials < 1:
        raise InputError(f"--trials must be at least 1, got {trials}")
    base = TrainConfig.from_toml(config_file) if config_file else TrainConfig()
    if threads:
        base = base.merged({"threads": threads})
    opts = TuneOptions(trials=trials, timeout=timeout, seed=seed, sampler=sampler, population=population, space=space,
                       limit=limit, tokens=tokens, kl_prompts=kl_prompts, enqueue_defaults=not no_defaults_first)
    result = run_tune(model, out, opts, base, progress=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps({"out": str(result.out), "finished": result.finished, "ran_now": result.ran_now,
                               "chosen": result.chosen and result.chosen["trial"], "base": result.base,
                               "front": [{"trial": r["trial"], **r["metrics"], "params": r["params"]} for r in result.front]},
                              indent=2))
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
