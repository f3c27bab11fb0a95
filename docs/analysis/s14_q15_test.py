"""Session 14 (docs/RESULTS.md): Qwen2.5-Coder-1.5B with recovery examples on the test sets, per seed and per attack.

Reads the ``nestpatch eval`` runs ``runs/s14/ev-q15-rf50sN-hb`` (HarmBench test, 159) and
``runs/s14/ev-q15-rf50sN-jb`` (the 12 attacks on 5 behaviours each, TAP 3) and prints per seed the
HarmBench ASR and the jailbreak mean under the refusal-phrase and strict-refusal judges, then the
mean ASR per attack over the seeds found. Run from the repo root.
"""
import json
from pathlib import Path

JUDGES = ("refusal-phrase", "strict-refusal")
seeds = [s for s in ("s0", "s1", "s2") if Path(f"runs/s14/ev-q15-rf50{s}-hb/summary.json").exists()]


def load(path: str) -> dict | None:
    p = Path(path) / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


per_attack: dict[str, list[dict]] = {}
print("| seed | HB ASR refusal-phrase | HB ASR strict-refusal | jailbreak mean refusal-phrase | jailbreak mean strict-refusal |")
print("|---|---|---|---|---|")
for s in seeds:
    hb = load(f"runs/s14/ev-q15-rf50{s}-hb")["suites"]["harmbench"]["patched"]["asr_by_judge"]
    jb = load(f"runs/s14/ev-q15-rf50{s}-jb")
    cells = [f"{100 * hb[j]:.1f}%" for j in JUDGES]
    if jb is None:
        cells += ["-", "-"]
    else:
        attacks = {n.removeprefix("jailbreak-"): v["patched"]["asr_by_judge"] for n, v in jb["suites"].items() if n.startswith("jailbreak-")}
        for a, v in attacks.items():
            per_attack.setdefault(a, []).append(v)
        cells += [f"{100 * sum(v[j] for v in attacks.values()) / len(attacks):.1f}%" for j in JUDGES]
    print(f"| {s} | " + " | ".join(cells) + " |")
if per_attack:
    print("\n| attack | mean ASR refusal-phrase | seeds |\n|---|---|---|")
    for a, vs in per_attack.items():
        print(f"| {a} | {100 * sum(v['refusal-phrase'] for v in vs) / len(vs):.1f}% | {len(vs)} |")
