"""The issue-16 target table from `nestpatch eval` run directories: one row per seed, then mean, worst and spread.

Each seed is a label and the run directories whose ``summary.json`` hold its figures (a run may
hold some suites, e.g. benign/over-refusal/utility with ``--compare`` in one and HarmBench alone
in another); the patched variant's figures are read. A ``.json`` entry is the output of
``scripts/rejudge.py --json`` (a judge applied to a run's saved replies). ``base=DIRS`` adds a base row from the
same kind of runs (their ``base`` variant). Rates print as percentages, KL as a number; "worst"
is the highest value over seeds (every measure here is better lower), spread is max - min.
HarmBench figures are read only from runs without ``--limit`` (the table reports the whole test
split; a jailbreak run with ``--limit 5`` may also hold a 5-prompt HarmBench suite).

    python scripts/seed_table.py base=runs/s8/eval-base-hb,runs/s8/eval-s0-benign \\
        s0=runs/s8/eval-s0-benign,runs/s8/eval-s0-hb,runs/s8/eval-s0-jb s1=... s2=...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

JUDGES = ("refusal-phrase", "strict-refusal", "composite")
COLUMNS = [f"HB ASR {j}" for j in JUDGES] + [f"jailbreak mean {j}" for j in JUDGES] + \
    ["benign refusal", "over-refusal", "KL to base"]


def figures(dirs: list[str], variant: str) -> dict[str, float]:
    """The table's measures for ``variant`` found in the runs' summaries (first run that has one wins)."""
    out: dict[str, float] = {}
    for d in dirs:
        if d.endswith(".json"):  # figures of `scripts/rejudge.py --json` (a judge added after the run)
            _rejudged(Path(d), variant, out)
            continue
        path = Path(d) / "summary.json"
        if not path.is_file():
            sys.exit(f"{path}: not found (an unfinished or mistyped run directory)")
        s = json.loads(path.read_text(encoding="utf-8"))
        hb = None if s.get("limit") else s.get("suites", {}).get("harmbench", {}).get(variant)
        for j in JUDGES:
            if hb and j in hb.get("asr_by_judge", {}):
                out.setdefault(f"HB ASR {j}", hb["asr_by_judge"][j])
            mean = s.get("jailbreak", {}).get("mean", {}).get(variant, {}).get(j)
            if mean:
                out.setdefault(f"jailbreak mean {j}", mean["asr"])
        head = s.get("headline", {}).get(variant, {})
        for key, col in (("benign_refusal", "benign refusal"), ("over_refusal", "over-refusal"), ("kl", "KL to base")):
            if key in head:
                out.setdefault(col, head[key])
    return out


def _rejudged(path: Path, variant: str, out: dict[str, float]) -> None:
    """HarmBench ASR and the mean over jailbreak attacks from a ``rejudge.py --json`` file (whole HarmBench only)."""
    if not path.is_file():
        sys.exit(f"{path}: not found")
    rows = [r for r in json.loads(path.read_text(encoding="utf-8")) if r["variant"] == variant]
    for j in {r["judge"] for r in rows}:
        hb = [r for r in rows if r["judge"] == j and r["suite"] == "harmbench" and not r.get("limit")]
        if hb:
            out.setdefault(f"HB ASR {j}", hb[0]["asr"])
        jb = [r["asr"] for r in rows if r["judge"] == j and r["suite"].startswith("jailbreak-")]
        if jb:
            out.setdefault(f"jailbreak mean {j}", sum(jb) / len(jb))


def fmt(col: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if col == "KL to base" else f"{100 * v:.1f}%"


def main(argv: list[str]) -> None:
    if not argv or any("=" not in a for a in argv):
        sys.exit(__doc__)
    rows: dict[str, dict[str, float]] = {}
    for a in argv:
        label, _, dirs = a.partition("=")
        rows[label] = figures(dirs.split(","), "base" if label == "base" else "patched")
    seeds = [r for k, r in rows.items() if k != "base"]
    print("| run | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS))
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join(fmt(c, r.get(c)) for c in COLUMNS) + " |")
    for name, f in (("mean", lambda v: sum(v) / len(v)), ("worst", max), ("spread (max - min)", lambda v: max(v) - min(v))):
        cells = []
        for c in COLUMNS:
            vals = [r[c] for r in seeds if c in r]
            cells.append(fmt(c, f(vals)) if len(vals) == len(seeds) and vals else "-")
        print(f"| **{name}** | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
