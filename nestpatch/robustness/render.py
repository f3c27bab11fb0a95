"""Human renderings of a robustness run, made from ``results.json`` only: Markdown table and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_path

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
_LABELS = {"none": "no attack", "ablation": "refusal-dir. ablation", "pruning": "prune", "finetune": "LoRA FT"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def columns(results: dict) -> list[tuple[str, int]]:
    """(attack, strength) pairs in table order: none, ablation, pruning by count, fine-tuning by steps."""
    order = {"none": 0, "ablation": 1, "pruning": 2, "finetune": 3}
    cols = {(p["attack"], int(p["strength"])) for p in results["points"]}
    return sorted(cols, key=lambda c: (order.get(c[0], 9), c[1]))


def column_label(attack: str, strength: int) -> str:
    if attack == "pruning":
        return f"prune {strength}"
    if attack == "finetune":
        return f"LoRA FT {strength} steps"
    return _LABELS.get(attack, attack)


def table_rows(results: dict, suite: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ASR table of ``suite`` (one row per safety update)."""
    cols = columns(results)
    updates = [u["name"] for u in results["updates"]]
    asr = {(p["update"], p["attack"], int(p["strength"])): p["asr"].get(suite) for p in results["points"]}
    cost = results.get("cost_to_remove", {})
    cost_cols = [a for a in ("pruning", "finetune") if any(c[0] == a for c in cols)]
    header = ["update"] + [column_label(*c) for c in cols] + [f"cost to remove ({'neurons' if a == 'pruning' else 'FT steps'})"
                                                              for a in cost_cols]
    rows = []
    for u in updates:
        row = [u] + [_pct(asr.get((u, *c))) for c in cols]
        for a in cost_cols:
            v = cost.get(u, {}).get(suite, {}).get(a)
            top = max(c[1] for c in cols if c[0] == a)
            row.append("0 (at base ASR)" if u == "base" else (str(v) if v is not None else f"> {top}"))
        rows.append(row)
    return header, rows


def render_markdown(results: dict) -> str:
    """The run as Markdown: what was attacked, the ASR table per suite, the chosen ablation layers."""
    lines = [f"# Robustness of safety updates: {results['model'].get('spec')}", ""]
    o = results["options"]
    lines.append(f"Suites {', '.join(o['suites'])} (limit {o['limit']}, greedy, {o['max_new_tokens']} new tokens), "
                 f"judge `{results['points'][0].get('judge')}`. Reference: base ASR "
                 + ", ".join(f"{s} {_pct(v)}" for s, v in results["reference_asr"].items()) + ".")
    lines.append("Cost to remove: the smallest attack strength at which the update's ASR reaches the base's.")
    lines.append("")
    for suite in results["reference_asr"]:
        header, rows = table_rows(results, suite)
        lines += [f"## ASR on {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    abl = {u: d["ablation"] for u, d in results.get("attacks", {}).items() if "ablation" in d}
    if abl:
        lines += ["## Refusal-direction ablation: chosen layers", ""]
        for u, a in abl.items():
            best = next((c for c in a["candidates"] if c["layer"] == a["layer"]), {})
            lines.append(f"- {u}: layer {a['layer']} (validation refusal score {a['baseline_refusal_score']} -> "
                         f"{best.get('refusal_score')}, KL {best.get('kl')})")
        lines.append("")
    pr = {u: d["pruning"] for u, d in results.get("attacks", {}).items() if "pruning" in d}
    if pr:
        lines += ["## Pruning order", ""]
        for u, p in pr.items():
            lines.append(f"- {u}: {p['patched']} patched neurons first, then {p['detected']} detector-selected, of {p['total']}")
        lines.append("")
    return "\n".join(lines)


def plot_png(results: dict, suite: str) -> bytes:
    """ASR vs attack strength, one panel per attack, one line per safety update; PNG bytes."""
    from ..audit.figures import _plt, _png

    plt = _plt()
    attacks = [a for a in ("ablation", "pruning", "finetune") if any(p["attack"] == a for p in results["points"])]
    fig, axes = plt.subplots(1, max(1, len(attacks)), figsize=(4.2 * max(1, len(attacks)), 3.4), squeeze=False)
    ref = results["reference_asr"].get(suite)
    xlabels = {"ablation": "ablated (0 = no, 1 = yes)", "pruning": "neurons pruned", "finetune": "LoRA fine-tuning steps"}
    for ax, a in zip(axes[0], attacks):
        for u in [x["name"] for x in results["updates"]]:
            pts = {0: next((p["asr"].get(suite) for p in results["points"] if p["update"] == u and p["attack"] == "none"), None)}
            pts.update({int(p["strength"]): p["asr"].get(suite) for p in results["points"] if p["update"] == u and p["attack"] == a})
            xs = sorted(k for k, v in pts.items() if v is not None)
            ax.plot(xs, [100 * pts[x] for x in xs], marker="o", label=u)
        if ref is not None:
            ax.axhline(100 * ref, color="grey", linestyle="--", linewidth=1, label="base ASR")
        if a == "pruning":
            ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel(xlabels[a])
        ax.set_ylabel(f"ASR on {suite} (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(_LABELS[a])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_file(suite: str) -> str:
    return f"robustness-{suite.replace(':', '_').replace('/', '_')}.png"


def write_outputs(out: str | os.PathLike, results: dict) -> list[Path]:
    """Write ``results.json``, ``results.md`` and a plot per suite into ``out``; return the paths."""
    out = Path(out)
    written = []
    for name, text in ((RESULTS_FILE, json.dumps(results, indent=2, default=str) + "\n"), (TABLE_FILE, render_markdown(results))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    for suite in results["reference_asr"]:
        with atomic_path(out / plot_file(suite)) as tmp:
            tmp.write_bytes(plot_png(results, suite))
        written.append(out / plot_file(suite))
    return written


def load_results(run_dir: str | os.PathLike) -> dict:
    """``results.json`` of a robustness run directory."""
    from ..errors import InputError

    f = Path(run_dir) / RESULTS_FILE
    if not f.exists():
        raise InputError(f"{run_dir}: not a robustness run directory (no {RESULTS_FILE})")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{f}: not valid JSON ({e})") from None


__all__: Sequence[str] = ["write_outputs", "render_markdown", "plot_png", "table_rows", "load_results"]
