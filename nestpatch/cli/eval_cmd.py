"""``nestpatch eval``: ASR, over-refusal, benign refusal and utility of a model, with or without a patch."""

from __future__ import annotations

from pathlib import Path

import click

from . import inputs
from ..fingerprint import base_check_skipped
from .options import json_option, model_argument, output_option, print_json, progress_option
from .terminal import deep_escape, echo, escape
from ..evaluate.runner import DIGEST_FILE, SUMMARY_FILE, EvalOptions, run_suites
from ..evaluate.suites import FILE_KINDS, SUITE_GROUPS, SUITES


def _suite_help() -> str:
    return "Comma-separated suites: " + "; ".join(f"{k} ({v[1]})" for k, v in SUITES.items()) + \
        "; " + "; ".join(f"{k} ({v})" for k, v in SUITE_GROUPS.items()) + "; or a prompt file (.jsonl/.json/.csv/.txt)."


def _headline(summary: dict) -> str:
    lines = []
    for v, h in summary.get("headline", {}).items():
        parts = []
        if h.get("asr") is not None:
            by = h.get("asr_by_judge") or {}
            parts.append(f"ASR ({h.get('asr_suite')}) " + ", ".join(f"{j} {100 * a:.1f}%" for j, a in by.items() if a is not None))
        if h.get("benign_refusal") is not None:
            parts.append(f"benign refusal {100 * h['benign_refusal']:.1f}%")
        if h.get("over_refusal") is not None:
            parts.append(f"over-refusal {100 * h['over_refusal']:.1f}%")
        if h.get("kl") is not None:
            parts.append(f"KL {h['kl']:.4f}")
        if h.get("ppl") is not None:
            parts.append(f"ppl {h['ppl']:.2f}")
        lines.append(f"  {v:<8} " + ", ".join(parts))
    return "\n".join(lines)


@click.command("eval")
@model_argument()
@click.option("--patch", "patch", type=click.Path(dir_okay=False), default=None, help="A .nestpatch to evaluate on MODEL.")
@click.option("--suite", "suites", required=True, help=_suite_help())
@click.option("--backend", type=click.Choice(["torch", "llama"]), default="torch", show_default=True)
@output_option("out_dir", required=True, help="Run directory (created; an earlier run there continues with --resume).", file_okay=False)
@click.option("--compare", is_flag=True, help="Run with and without the patch and report the flips.")
@click.option("--resume", is_flag=True, help="Continue the run in the directory, skipping finished samples.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N samples of each suite.")
@click.option("--max-new-tokens", type=click.IntRange(1, 8192), default=64, show_default=True,
              help="Reply length of benign and over-refusal suites.")
@click.option("--harmful-max-new-tokens", type=click.IntRange(1, 8192), default=128, show_default=True,
              help="Reply length of harmful and jailbreak suites (late pivots from a refusal need room).")
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True,
              help="torch: prompts per generation batch; llama: sequences decoded together (1 = one at a time).")
@click.option("--judge", "judges", default="refusal-phrase,strict-refusal", show_default=True,
              help="Comma-separated judges: refusal-phrase, strict-refusal, harm, composite (harm AND no refusal phrase).")
@click.option("--harm-model", default=None, help="GGUF path or model asset of the harm/composite judges "
              "[default: qwen2.5-coder-1.5b].")
@click.option("--judge-model", type=click.Path(dir_okay=False), default=None,
              help="A local safety classifier GGUF (e.g. Llama Guard): adds the model judge.")
@click.option("--judge-format", default="auto", show_default=True, help="Its prompt format: auto, llama-guard-3, or a template file.")
@click.option("--column", default=None, help="Prompt column of suite files.")
@click.option("--file-kind", type=click.Choice(FILE_KINDS), default="harmful", show_default=True, help="What suite files hold.")
@click.option("--patch-mode", type=click.Choice(["fold", "lora"]), default="fold", show_default=True,
              help="llama: fold the patch into a cached GGUF copy, or run it as a LoRA adapter.")
@click.option("--precision", type=click.Choice(["keep", "auto", "q8_0", "f16"]), default="keep", show_default=True,
              help="llama fold precision of touched tensors.")
@click.option("--threads", type=click.IntRange(1), default=None, help="llama.cpp threads (default: all cores).")
@click.option("--device", default="auto", show_default=True, help="torch: auto|cpu|cuda|mps.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--require-signature", "pubkey", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Refuse a patch not signed with this public key.")
@progress_option
@click.option("--skip-base-check", is_flag=True, help="Evaluate a patch that carries no base fingerprint (refused otherwise).")
@json_option("Print the run directory's files and the summary (summary.json) as JSON instead of the headline.")
def eval_cmd(model: str, patch: str | None, suites: str, backend: str, out_dir: str, compare: bool, resume: bool,
             limit: int | None, max_new_tokens: int, harmful_max_new_tokens: int, batch_size: int, judges: str,
             harm_model: str | None, judge_model: str | None, judge_format: str,
             column: str | None, file_kind: str, patch_mode: str, precision: str, threads: int | None, device: str,
             dtype: str, seed: int, pubkey: str | None, progress: bool, skip_base_check: bool, as_json: bool) -> None:
    """Evaluate MODEL (a .gguf, an HF directory, or smollm2) on SUITEs; write per-sample JSONL and a summary."""
    opts = EvalOptions(max_new_tokens=max_new_tokens, harmful_max_new_tokens=harmful_max_new_tokens, harm_model=harm_model,
                       batch_size=batch_size, limit=limit, seed=seed,
                       judges=tuple(j.strip() for j in judges.split(",") if j.strip()), judge_model=judge_model,
                       judge_format=judge_format, resume=resume, progress=progress, compare=compare, device=device,
                       dtype=dtype, patch_mode=patch_mode, precision=precision, n_threads=threads, column=column,
                       file_kind=file_kind, require_signature=pubkey)
    names = [s.strip() for s in suites.split(",") if s.strip()]
    # the run directory may exist (--resume; the runner refuses a foreign one) but is never an input or the cache
    inputs.guard_outputs([out_dir], [inputs.model_location(model), patch, judge_model, pubkey], existing_ok=True)
    with base_check_skipped(skip_base_check):
        summary = run_suites(model, patch, names, backend=backend, out_dir=out_dir, options=opts)
    out = Path(out_dir)
    if as_json:
        print_json({"out_dir": str(out), "summary_file": str(out / SUMMARY_FILE), "digest_file": str(out / DIGEST_FILE),
                    "summary": summary})
        return
    echo(_headline(deep_escape(summary)))
    echo(f"wrote {escape(out / SUMMARY_FILE)}, {escape(out / DIGEST_FILE)} and per-sample JSONL under "
         f"{escape(out / 'samples')} ({summary['wall_seconds']:.1f} s)")


def register(group: click.Group) -> None:
    group.add_command(eval_cmd)
