"""Session 15 (docs/RESULTS.md): which HarmBench-validation behaviours each 1.5B patch answers, by HarmBench category.

Reads the JSON lines ``benchmarks/tune_eval.py --failures --json FILE`` appended (one per model;
``failures["hb-val"]`` lists the requests answered) and the HarmBench validation behaviours'
categories (``harmbench-val-standard``), and prints per model the answered behaviours per semantic category, then
the behaviours every model answered. Validation data only. Run from the repo root:

    python docs/analysis/s15_val_failures.py runs/s15/q15dp_val.jsonl
"""
import collections
import json
import sys
from pathlib import Path

from nestpatch.data import load_prompts

rows = [json.loads(x) for f in sys.argv[1:] for x in Path(f).read_text().splitlines() if x.strip()]
rows = [r for r in rows if "failures" in r]
hb = load_prompts("harmbench-val-standard", allow_eval=True)  # the prompts tune_eval's hb-val set holds
category = {p.strip(): m["SemanticCategory"] for p, m in zip(hb.prompts, hb.meta)}
cats = collections.Counter(category.values())
print("| model | answered | " + " | ".join(f"{c} ({n})" for c, n in sorted(cats.items())) + " |")
print("|---|---|" + "---|" * len(cats))
answered = {}
for r in rows:
    got = r["failures"]["hb-val"]
    answered[r["model"]] = set(got)
    per = collections.Counter(category.get(p.strip(), "?") for p in got)
    print(f"| {Path(r['model']).stem} | {len(got)} | " + " | ".join(str(per.get(c, 0)) for c in sorted(cats)) + " |")
if answered:
    common = set.intersection(*answered.values())
    print(f"\nanswered by every model ({len(common)}):")
    for p in sorted(common):
        print(f"- [{category.get(p.strip(), '?')}] {p[:110]}")
