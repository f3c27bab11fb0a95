"""``nestpatch eval``: ASR, over-refusal, benign refusal and utility of a model, with or without a patch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from . import inputs
from ..fingerprint import base_check_skipped
from .options import dataclass_from_options, dataclass_options, json_option, model_argument, output_option, print_json, progress_option
from .terminal import deep_escape, echo, escape
from ..evaluate.options import BACKENDS, EvalOptions
from ..evaluate.runner import DIGEST_FILE, SUMMARY_FILE, run_suites
from ..evaluate.suites import SUITE_GROUPS, SUITES


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


#: Options that are not :class:`EvalOptions` fields: what to evaluate (``run_suites``' arguments) and how to report.
CALL_ARGUMENTS = ("model", "patch", "suites", "backend", "out_dir", "skip_base_check", "as_json")


@click.command("eval")
@model_argument()
@click.option("--patch", "patch", type=click.Path(dir_okay=False), default=None, help="A .nestpatch to evaluate on MODEL.")
@click.option("--suite", "suites", required=True, help=_suite_help())
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True)
@output_option("out_dir", required=True, help="Run directory (created; an earlier run there continues with --resume).", file_okay=False)
@progress_option
@click.option("--skip-base-check", is_flag=True, help="Evaluate a patch that carries no base fingerprint (refused otherwise).")
@json_option("Print the run directory's files and the summary (summary.json) as JSON instead of the headline.")
@dataclass_options(EvalOptions, exclude=("progress",))
def eval_cmd(model: str, patch: str | None, suites: str, backend: str, out_dir: str, progress: bool, skip_base_check: bool,
             as_json: bool, **settings: Any) -> None:
    """Evaluate MODEL (a .gguf, an HF directory, or smollm2) on SUITEs; write per-sample JSONL and a summary."""
    # the options from --max-new-tokens on are generated from EvalOptions: parse them into it, then call the runner
    opts = dataclass_from_options(EvalOptions, settings, exclude=("progress",), progress=progress)
    names = [s.strip() for s in suites.split(",") if s.strip()]
    # the run directory may exist (--resume; the runner refuses a foreign one) but is never an input or the cache
    inputs.guard_outputs([out_dir], [inputs.model_location(model), patch, opts.judge_model, opts.require_signature,
                                          opts.reference], existing_ok=True)
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
