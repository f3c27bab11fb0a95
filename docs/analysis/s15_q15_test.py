"""Session 15 (docs/RESULTS.md): Qwen2.5-Coder-1.5B's recipe (recovery examples 0.5) on the test sets, 3 seeds.

Reads the ``nestpatch eval`` runs of sessions 14 and 15 (HarmBench test, jailbreaks 5 a attack, benign
and over-refusal) and prints the mean ASR per attack over the three seeds (refusal-phrase judge) and
the HarmBench test behaviours each seed answers, per HarmBench semantic category. The seed table
itself is ``scripts/seed_table.py`` (command in docs/RESULTS.md). Run from the repo root.
"""
import collections
import json
from pathlib import Path

HB = {"s0": "runs/s14/ev-q15-rf50s0-hb", "s1": "runs/s14/ev-q15-rf50s1-hb", "s2": "runs/s15/ev-q15-rf50s2-hb"}
JB = {"s0": "runs/s14/ev-q15-rf50s0-jb", "s1": "runs/s14/ev-q15-rf50s1-jb", "s2": "runs/s15/ev-q15-rf50s2-jb"}

per_attack: dict[str, list[float]] = {}
for d in JB.values():
    s = json.loads((Path(d) / "summary.json").read_text())
    for name, v in s["suites"].items():
        if name.startswith("jailbreak-"):
            per_attack.setdefault(name.removeprefix("jailbreak-"), []).append(v["patched"]["asr_by_judge"]["refusal-phrase"])
print("| attack | " + " | ".join(JB) + " | mean |\n|---|" + "---|" * (len(JB) + 1))
for a, vs in per_attack.items():
    print(f"| {a} | " + " | ".join(f"{100 * v:.0f}%" for v in vs) + f" | {100 * sum(vs) / len(vs):.1f}% |")

answered: dict[str, collections.Counter] = {}
total: collections.Counter = collections.Counter()
for seed, d in HB.items():
    recs = [json.loads(x) for x in (Path(d) / "samples" / "harmbench.patched.jsonl").read_text().splitlines() if x.strip()]
    total = collections.Counter(r["category"] for r in recs)
    answered[seed] = collections.Counter(r["category"] for r in recs if not r["refused"])
print("\n| HarmBench test category (behaviours) | " + " | ".join(HB) + " |\n|---|" + "---|" * len(HB))
for c, n in sorted(total.items()):
    print(f"| {c} ({n}) | " + " | ".join(str(answered[s].get(c, 0)) for s in HB) + " |")
print("| **all** (159) | " + " | ".join(str(sum(answered[s].values())) for s in HB) + " |")
