"""``nestpatch robustness``: white-box attacks against a patch and other safety updates."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from ..errors import InputError
from ..robustness.options import RobustnessOptions
from .options import (dataclass_from_options, dataclass_options, json_option, model_argument, output_option, print_json,
                      progress_option)


#: Options that are not :class:`RobustnessOptions` fields: what to attack (``run_robustness``' arguments) and how to report.
CALL_ARGUMENTS = ("model", "patch", "patch_name", "baselines", "out_dir", "as_json")


@click.command("robustness")
@model_argument()
@click.option("--patch", "patch", required=True, type=click.Path(dir_okay=False), help="The .nestpatch to attack.")
@click.option("--patch-name", default="nest", show_default=True, help="Its name in the table.")
@click.option("--baseline-patch", "baselines", multiple=True, metavar="NAME=PATH",
              help="Another safety update to attack (repeatable): a .nestpatch, a PEFT adapter directory (LoRA baseline) "
                   "or an HF model directory (full fine-tuning), as `nestpatch bench` writes them.")
@output_option("out_dir", required=True, help="Run directory (created; --resume continues a run there).", file_okay=False)
@progress_option
@json_option("Print results.json instead of the table.")
@dataclass_options(RobustnessOptions, exclude=("progress",))
def robustness_cmd(model: str, patch: str, patch_name: str, baselines: tuple[str, ...], out_dir: str, progress: bool,
                   as_json: bool, **settings: Any) -> None:
    """Attack MODEL, MODEL + PATCH and any baselines with weight access; report ASR after each attack.

    \b
    Attacks: refusal-direction ablation (Arditi et al. 2024), pruning of the safety neurons our
    detector finds (NeuroStrike; patched neurons first), LoRA fine-tuning on harmful answers of
    a complying model. Writes RUNDIR/results.md, results.json, robustness-<suite>.png and
    samples.jsonl. Example:
      nestpatch robustness smollm2 --patch smol.nestpatch -o rob/ --limit 40 --threads 1
    """
    from ..robustness.render import TABLE_FILE, render_markdown
    from ..robustness.runner import run_robustness
    from ..robustness.updates import classify

    updates = [classify(patch_name, patch)]
    if updates[0].kind != "nestpatch":
        raise InputError(f"{patch}: --patch must be a .nestpatch file")
    for item in baselines:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"--baseline-patch {item!r}: expected NAME=PATH (e.g. lora=bench/lora/artifact)")
        updates.append(classify(name.strip(), path.strip()))
    # the options after --json are generated from RobustnessOptions (the --ft-* ones from its FinetuneConfig)
    opts = dataclass_from_options(RobustnessOptions, settings, exclude=("progress",), progress=progress)
    opts.finetune = dataclasses.replace(opts.finetune, seed=opts.seed)  # one --seed for the run and the attack
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    results = run_robustness(model, updates, out_dir, opts)
    if as_json:
        print_json(results)
        return
    click.echo(render_markdown(results))
    click.echo(f"wrote {Path(out_dir) / TABLE_FILE}, results.json, samples.jsonl and the plots in {out_dir}")


def register(group: click.Group) -> None:
    group.add_command(robustness_cmd)
