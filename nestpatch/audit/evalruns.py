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

#: The rate shown for each suite kind (``nestpatch eval`` summary: suites[name].kind).
_KIND_METRIC = {"harmful": "asr", "benign": "benign_refusal", "overrefusal": "over_refusal"}
#: Variant names: the unpatched model (before) and the patched one (after).
_BEFORE = ("base", "before")
_AFTER = ("patched", "after")


@dataclass
class EvalRun:
    """One evaluation run: its directory, its summary, and the per-suite rows it yields."""

    path: Path
    summary: dict
    rows: list[dict] = field(default_factory=list)

    def summary_info(self) -> dict:
        return {"path": str(self.path), "rows": len(self.rows), "model": (self.summary.get("model") or {}).get("spec"),
                "judge": self.summary.get("judge"), "created": self.summary.get("created")}


def _rate(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _rows_from_suite(run: str, suite: str, entry: dict, judge: str | None) -> list[dict]:
    """Before/after row of one suite; a run of one variant fills one side only."""
    metric = _KIND_METRIC.get(str(entry.get("kind")))
    if metric is None:  # utility suites (KL, perplexity) have no refusal rate to plot
        return []
    before = next((entry[k] for k in _BEFORE if isinstance(entry.get(k), dict)), None)
    after = next((entry[k] for k in _AFTER if isinstance(entry.get(k), dict)), None)
    b = _rate(before.get(metric)) if before else None
    a = _rate(after.get(metric)) if after else None
    if a is None and b is None:
        return []
    return [{"run": run, "suite": suite, "metric": metric, "before": b, "after": a,
             "n": entry.get("n"), "judge": entry.get("judge") or judge}]


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
    suites = summary.get("suites")
    if not isinstance(suites, dict):
        raise InputError(f"{f}: not an evaluation summary (expected a 'suites' object, as written by 'nestpatch eval')")
    rows: list[dict] = []
    for name, entry in suites.items():
        if isinstance(entry, dict):
            rows.extend(_rows_from_suite(run, str(name), entry, summary.get("judge")))
    if not rows:
        raise InputError(f"{f}: no harmful, benign or over-refusal suite with rates (utility-only run?)")
    return EvalRun(path=d, summary=summary, rows=rows)


def eval_rows(runs: list[EvalRun] | tuple[EvalRun, ...]) -> list[dict]:
    """All runs' rows; a base-only run and a patched-only run of the same suite become one row."""
    rows = [dict(r) for run in runs for r in run.rows]
    merged: list[dict] = []
    for r in rows:
        mate = next((m for m in merged if m["suite"] == r["suite"] and m["metric"] == r["metric"]
                     and ((m["before"] is None) != (r["before"] is None)) and ((m["after"] is None) != (r["after"] is None))
                     and m["judge"] == r["judge"]), None)
        if mate is None:
            merged.append(r)
            continue
        mate["before"] = mate["before"] if mate["before"] is not None else r["before"]
        mate["after"] = mate["after"] if mate["after"] is not None else r["after"]
        mate["run"] = f"{mate['run']} + {r['run']}"
    return merged
