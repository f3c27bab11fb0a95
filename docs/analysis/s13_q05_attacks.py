"""Session 13 (docs/RESULTS.md): Qwen2.5-Coder-0.5B, ASR per jailbreak attack, recipe without and with recovery examples.

Mean over the three seeds of the patched model's ASR (refusal-phrase and composite judges) per
attack, from the `nestpatch eval --suite jailbreak --limit 5` runs: the recipe's seeds of session 9
(seed 0: runs/s8/jb-q05) and the recovery-example seeds of session 13. Run from the repo root.
"""
import json

RUNS = {
    "recipe": ["runs/s8/jb-q05", "runs/s9/ev-q05-s1-jb", "runs/s9/ev-q05-s2-jb"],
    "recovery 0.5": ["runs/s13/ev-q05rf50-s0-jb", "runs/s13/ev-q05rf50-s1-jb", "runs/s13/ev-q05rf50-s2-jb"],
}
JUDGES = ("refusal-phrase", "composite")


def per_attack(run: str) -> dict[str, dict[str, float]]:
    suites = json.load(open(f"{run}/summary.json"))["suites"]
    return {name.removeprefix("jailbreak-"): s["patched"]["asr_by_judge"] for name, s in suites.items()
            if name.startswith("jailbreak-")}


tables = {k: [per_attack(r) for r in runs] for k, runs in RUNS.items()}
attacks = list(tables["recipe"][0])
head = " | ".join(f"{k} ({j})" for k in RUNS for j in JUDGES)
print(f"| attack | {head} |\n|---|" + "---|" * (len(RUNS) * len(JUDGES)))
means = {(k, j): [] for k in RUNS for j in JUDGES}
for a in attacks:
    cells = []
    for k in RUNS:
        for j in JUDGES:
            m = sum(t[a][j] for t in tables[k]) / len(tables[k])
            means[(k, j)].append(m)
            cells.append(f"{100 * m:.1f}%")
    print(f"| {a} | " + " | ".join(cells) + " |")
print("| **mean over attacks** | " + " | ".join(f"{100 * sum(v) / len(v):.1f}%" for v in means.values()) + " |")
