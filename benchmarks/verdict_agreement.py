"""Agreement of refusal verdicts between two evaluation runs of the same prompts.

The converters' promise is that a folded (re-quantized) GGUF behaves like the patched model it
came from. This reads the per-sample JSONL of two ``nestpatch eval`` run directories (e.g. the
torch backend with the patch attached, and the llama backend on the folded Q4_1 GGUF) and prints,
per suite and variant: prompts in common, verdict agreement, refusal rate / ASR of each.

    python benchmarks/verdict_agreement.py runs/eval-torch runs/eval-llama [--variant patched] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path, judge: str) -> dict[tuple[str, str], dict[str, bool]]:
    """``(suite, variant) -> {sample id: refused}`` for the generation suites of a run directory."""
    from nestpatch.evaluate.records import read_records

    out: dict[tuple[str, str], dict[str, bool]] = {}
    for path in sorted((run / "samples").glob("*.jsonl")):
        for r in read_records(path):
            if "verdicts" not in r or judge not in r["verdicts"]:
                continue
            out.setdefault((r["suite"], r["variant"]), {})[r["id"]] = bool(r["verdicts"][judge]["refused"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--variant", action="append", help="only these variants (e.g. patched, base)")
    ap.add_argument("--judge", default="refusal-phrase")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    a, b = load(args.run_a, args.judge), load(args.run_b, args.judge)
    rows = []
    for key in sorted(set(a) & set(b)):
        if args.variant and key[1] not in args.variant:
            continue
        common = sorted(set(a[key]) & set(b[key]))
        if not common:
            continue
        agree = sum(a[key][i] == b[key][i] for i in common)
        rows.append({"suite": key[0], "variant": key[1], "n": len(common), "agreement": round(agree / len(common), 4),
                     "refused_a": round(sum(a[key][i] for i in common) / len(common), 4),
                     "refused_b": round(sum(b[key][i] for i in common) / len(common), 4)})
    print(f"A = {args.run_a}\nB = {args.run_b}\n")
    print("| suite | variant | prompts | verdict agreement | refused A | refused B |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['suite']} | {r['variant']} | {r['n']} | {r['agreement']:.1%} | {r['refused_a']:.1%} | {r['refused_b']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
