"""``nestpatch select``: validate candidate patches (seeds of one recipe, usually) and keep the best."""

from __future__ import annotations

from typing import Any

import click

from ..tune.options import SelectOptions
from .options import dataclass_from_options, dataclass_options, force_option, json_option, model_argument, output_option, print_json, quiet


@click.command("select")
@model_argument()
@click.argument("patches", nargs=-1, required=True, type=click.Path(dir_okay=False))
@output_option("out", required=True, help="Where the chosen patch is written (a copy with the selection in its provenance).",
               dir_okay=False)
@click.option("--threads", type=int, default=0, help="CPU threads for validation (0 = the library's default).")
@force_option("Replace an existing OUT.")
@json_option("Print every candidate's figures and the choice as JSON.")
@dataclass_options(SelectOptions)
def select_cmd(model: str, patches: tuple[str, ...], out: str, threads: int, force: bool, as_json: bool, **kwargs: Any) -> None:
    """Measure PATCHES on MODEL's validation sets and write the best one to OUT.

    \b
    The rule is tune's: the smallest ASR + benign refusal + KL, on HarmBench validation, the
    held-out splits of the built-in sets and the built-in edgy held-out rows (no evaluation set).
    Every candidate's figures are recorded in OUT's provenance; the tensors are unchanged.

    \b
    Example:
      for s in 0 1 2; do nestpatch train smollm2 --seed $s -o s$s.nestpatch; done
      nestpatch select smollm2 s0.nestpatch s1.nestpatch s2.nestpatch -o policy.nestpatch
    """
    from ..tune.select import Candidate, select_patch
    from .inputs import guard_outputs, open_model, open_patch

    opts = dataclass_from_options(SelectOptions, kwargs)
    guard_outputs([out], [*patches], force=force)
    candidates = [Candidate(p, open_patch(p)) for p in patches]  # every file read before the model
    model_path = open_model(model)
    guard_outputs([out], [model_path], force=True)
    echo = None if quiet() or as_json else (lambda line: click.echo(line, err=True))
    result = select_patch(model_path, candidates, out, opts, threads=threads, progress=echo)
    best = result.candidates[result.chosen]
    if as_json:
        print_json({"out": out, "chosen": best.label, "sets": result.sets,
                    "candidates": [{"patch": c.label, "score": round(c.score, 5), **c.metrics} for c in result.candidates]})
        return
    click.echo(f"{'patch':<32} {'ASR':>7} {'benign refusal':>15} {'KL':>8} {'score':>7}")
    for c in result.candidates:
        mark = "  <- chosen" if c is best else ""
        click.echo(f"{c.label[:32]:<32} {100 * c.metrics['asr']:>6.1f}% {100 * c.metrics['benign_refusal']:>14.1f}% "
                   f"{c.metrics['kl']:>8.4f} {c.score:>7.4f}{mark}")
    click.echo(f"wrote {out} (= {best.label}, selected on {sum(result.sets.values())} validation prompts)")


def register(group: click.Group) -> None:
    group.add_command(select_cmd)
