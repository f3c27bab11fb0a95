"""``nestpatch robustness``: white-box attacks against a patch and other safety updates."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from .options import json_option, model_argument, output_option, print_json, progress_option


def _ints(value: str, flag: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{flag} {value!r}: expected comma-separated integers (e.g. 50,200,800)") from None
    if not out or min(out) < 1:
        raise InputError(f"{flag} {value!r}: expected positive integers")
    return out


def _names(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


@click.command("robustness")
@model_argument()
@click.option("--patch", "patch", required=True, type=click.Path(dir_okay=False), help="The .nestpatch to attack.")
@click.option("--patch-name", default="nest", show_default=True, help="Its name in the table.")
@click.option("--baseline-patch", "baselines", multiple=True, metavar="NAME=PATH",
              help="Another safety update to attack (repeatable): a .nestpatch, a PEFT adapter directory (LoRA baseline) "
                   "or an HF model directory (full fine-tuning), as `nestpatch bench` writes them.")
@output_option("out_dir", required=True, help="Run directory (created; --resume continues a run there).", file_okay=False)
@click.option("--suites", default="harmbench", show_default=True,
              help="Comma-separated eval suites run after each attack (harmful suites give the ASR), e.g. harmbench,jailbreak:prefill.")
@click.option("--limit", type=click.IntRange(1), default=40, show_default=True, help="Samples per suite.")
@click.option("--attacks", default="ablation,pruning,finetune", show_default=True, help="Attacks to run.")
@click.option("--prune", "prune", default="50,200,800", show_default=True, help="Numbers of neurons pruned.")
@click.option("--ft-steps", default="10,50,100", show_default=True, help="LoRA fine-tuning step counts evaluated.")
@click.option("--ft-lr", type=float, default=2e-4, show_default=True, help="Fine-tuning attack learning rate.")
@click.option("--ft-rank", type=click.IntRange(1), default=8, show_default=True, help="Fine-tuning attack LoRA rank.")
@click.option("--ft-batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--attack-pairs", type=click.IntRange(2), default=64, show_default=True,
              help="Harmful (request, answer) pairs generated for the fine-tuning attack (kept under the run directory).")
@click.option("--answer-model", default=None, help="Complying model that writes the answers (default: MODEL itself).")
@click.option("--direction-prompts", type=click.IntRange(2), default=64, show_default=True,
              help="Harmful and harmless training prompts each, for the refusal direction and the pruning detector.")
@click.option("--val-prompts", type=click.IntRange(2), default=32, show_default=True,
              help="HarmBench validation and held-out benign prompts each, to choose the ablation layer.")
@click.option("--kl-max", type=float, default=0.1, show_default=True, help="KL ceiling of the ablation layer choice.")
@click.option("--max-new-tokens", type=click.IntRange(1, 8192), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True, help="Generation batch.")
@click.option("--judge", "judges", default="refusal-phrase", show_default=True, help="Comma-separated judge names.")
@click.option("--device", default="auto", show_default=True, help="torch: auto|cpu|cuda|mps.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--base-attacks/--no-base-attacks", default=True, show_default=True,
              help="Attack the base model too; without, the base is only evaluated (the reference ASR).")
@click.option("--resume", is_flag=True, help="Continue a run, reading back finished evaluation points.")
@progress_option
@json_option("Print results.json instead of the table.")
def robustness_cmd(model: str, patch: str, patch_name: str, baselines: tuple[str, ...], out_dir: str, suites: str, limit: int,
                   attacks: str, prune: str, ft_steps: str, ft_lr: float, ft_rank: int, ft_batch_size: int, attack_pairs: int,
                   answer_model: str | None, direction_prompts: int, val_prompts: int, kl_max: float, max_new_tokens: int,
                   batch_size: int, judges: str, device: str, threads: int | None, seed: int, base_attacks: bool, resume: bool,
                   progress: bool, as_json: bool) -> None:
    """Attack MODEL, MODEL + PATCH and any baselines with weight access; report ASR after each attack.

    \b
    Attacks: refusal-direction ablation (Arditi et al. 2024), pruning of the safety neurons our
    detector finds (NeuroStrike; patched neurons first), LoRA fine-tuning on harmful answers of
    a complying model. Writes RUNDIR/results.md, results.json, robustness-<suite>.png and
    samples.jsonl. Example:
      nestpatch robustness smollm2 --patch smol.nestpatch -o rob/ --limit 40 --threads 1
    """
    from ..robustness.finetune import FinetuneConfig
    from ..robustness.render import TABLE_FILE, render_markdown
    from ..robustness.runner import RobustnessOptions, run_robustness
    from ..robustness.updates import classify

    if threads:
        import torch

        torch.set_num_threads(threads)
    updates = [classify(patch_name, patch)]
    if updates[0].kind != "nestpatch":
        raise InputError(f"{patch}: --patch must be a .nestpatch file")
    for item in baselines:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"--baseline-patch {item!r}: expected NAME=PATH (e.g. lora=bench/lora/artifact)")
        updates.append(classify(name.strip(), path.strip()))
    opts = RobustnessOptions(
        suites=_names(suites), limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, judges=_names(judges),
        attacks=_names(attacks), prune_counts=_ints(prune, "--prune"),
        finetune=FinetuneConfig(steps=_ints(ft_steps, "--ft-steps"), rank=ft_rank, lr=ft_lr, batch_size=ft_batch_size, seed=seed),
        attack_pairs=attack_pairs, answer_model=answer_model, direction_prompts=direction_prompts, val_prompts=val_prompts,
        kl_max=kl_max, seed=seed, device=device, attack_base=base_attacks, resume=resume, progress=progress)
    results = run_robustness(model, updates, out_dir, opts)
    if as_json:
        print_json(results)
        return
    click.echo(render_markdown(results))
    click.echo(f"wrote {Path(out_dir) / TABLE_FILE}, results.json, samples.jsonl and the plots in {out_dir}")


def register(group: click.Group) -> None:
    group.add_command(robustness_cmd)
