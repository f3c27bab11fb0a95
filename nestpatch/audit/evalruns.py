"""Read ``nestpatch eval`` run directories for the report: before/after rates per suite.

Kept apart from the report so the one place that knows the evaluation's ``summary.json``
layout is small and easy to follow when that layout changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

SUMMARY_NAME = "summary.json"

#: metric names in the summary -> the report's metric names
_METRICS = {"asr": "asr", "over_refusal": "over_refusal", "overrefusal": "over_refusal",
            "benign_refusal": "benign_refusal", "refusal_rate": "refusal_rate"}
_BEFORE = ("base", "before", "baseline")
_AFTER = ("patched", "after", "patch")


@dataclass
class EvalRun:
    """One evaluation run: its directory, its summary, and the per-suite rows it yields."""

    path: Path
    summary: dict
    rows: list[dict] = field(default_factory=list)

    def summary_info(self) -> dict:
        return {"path": str(self.path), "rows": len(self.rows)}


def _rate(x: Any) -> float | None:
    if isinstance(x, dict):
        for k in ("rate", "value", "mean"):
            if k in x:
                return _rate(x[k])
        return None
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _rows_from_suite(run: str, suite: str, entry: dict, judge: str | None) -> list[dict]:
    rows = []
    before = next((entry[k] for k in _BEFORE if isinstance(entry.get(k), dict)), None)
    after = next((entry[k] for k in _AFTER if isinstance(entry.get(k), dict)), None)
    if before is None and after is None:
        after = entry  # a run of one model only
    for src, metric in _METRICS.items():
        b = _rate(before.get(src)) if before else None
        a = _rate(after.get(src)) if after else None
        if a is None and b is None:
            continue
        n = (after or before or {}).get("n") or entry.get("n")
        rows.append({"run": run, "suite": suite, "metric": metric, "before": b, "after": a,
                     "n": n, "judge": entry.get("judge") or judge})
    return rows


def load_eval_run(path: str | os.PathLike) -> EvalRun:
    """Parse ``RUN_DIR/summary.json`` into before/after rows per suite and metric."""
    d = Path(path)
    f = d / SUMMARY_NAME if d.is_dir() else d
    if not f.exists():
        raise InputError(f"{d}: no {SUMMARY_NAME} (expected a run directory written by 'nestpatch eval')")
    try:
        summary = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{f}: not valid JSON") from None
    if not isinstance(summary, dict):
        raise InputError(f"{f}: expected a JSON object")
    run = d.name if d.is_dir() else d.parent.name
    judge = summary.get("judge")
    if isinstance(judge, dict):
        judge = judge.get("name")
    suites = summary.get("suites", {})
    items = suites.items() if isinstance(suites, dict) else ((s.get("suite") or s.get("name"), s) for s in suites)
    rows: list[dict] = []
    for name, entry in items:
        if isinstance(entry, dict):
            rows.extend(_rows_from_suite(run, str(name), entry, judge))
    if not rows:
        raise InputError(f"{f}: no per-suite rates found (expected 'suites' with asr / over_refusal per model)")
    return EvalRun(path=d, summary=summary, rows=rows)


def eval_rows(runs: list[EvalRun] | tuple[EvalRun, ...]) -> list[dict]:
    return [r for run in runs for r in run.rows]
