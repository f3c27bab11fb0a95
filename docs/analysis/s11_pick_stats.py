"""Session 11 (docs/RESULTS.md): Best-of-3 on validation vs one seed, over the nine seeds of the default SmolLM2 recipe.

Reads every seed's validation figures (the `select` JSONs) and test figures (`nestpatch eval`
summaries), then (1) Spearman between validation and test, (2) for every one of the 84 triples
of seeds, the test figures of the patch `select`'s rule keeps, against a single seed's."""
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

val, test = {}, {}
for g in "ABC":
    for c in json.load(open(f"runs/s11/pick/{g}.json"))["candidates"]:
        s = int(Path(c["patch"]).stem[1:])
        val[s] = c
hb = {0: "runs/s8/eval-s0-hb", 1: "runs/s8/eval-s1-hb", 2: "runs/s8/eval-s2-hb", 4: "runs/s11/eval-B-hb", 8: "runs/s11/eval-C-hb"}
bn = {0: "runs/s8/eval-s0-benign", 1: "runs/s8/eval-s1-benign", 2: "runs/s8/eval-s2-benign", 4: "runs/s11/eval-B-benign", 8: "runs/s11/eval-C-benign"}
for s in (3, 5, 6, 7):
    hb[s], bn[s] = f"runs/s11/eval-s{s}-hb", f"runs/s11/eval-s{s}-benign"


sys.path.insert(0, "scripts")
from seed_table import figures  # noqa: E402


def rate(run: str, col: str) -> float | None:
    if not (Path(run) / "summary.json").exists():
        return None
    v = figures([run], "patched").get(col)
    return None if v is None else 100 * v


for s in range(9):
    test[s] = {"hb": rate(hb[s], "HB ASR refusal-phrase"), "benign": rate(bn[s], "benign refusal")}
seeds = sorted(val)
print("| seed | validation hb-val ASR | validation benign refusal | select score | test HarmBench ASR | test benign refusal |")
print("|---|---|---|---|---|---|")
for s in seeds:
    v, t = val[s], test[s]
    tb = "-" if t["benign"] is None else f"{t['benign']:.1f}%"
    print(f"| s{s} | {100 * (1 - v['hb-val']):.1f}% | {100 * v['benign_refusal']:.1f}% | {v['score']:.3f} | {t['hb']:.1f}% | {tb} |")
x = [100 * (1 - val[s]["hb-val"]) for s in seeds]
y = [test[s]["hb"] for s in seeds]
print("Spearman(val hb-val ASR, test HB ASR) over 9 seeds: rho %.2f (p %.3f)" % spearmanr(x, y))
if all(test[s]["benign"] is not None for s in seeds):
    print("Spearman(val benign refusal, test benign refusal): rho %.2f (p %.3f)" % spearmanr(
        [val[s]["benign_refusal"] for s in seeds], [test[s]["benign"] for s in seeds]))
for key in ("hb", "benign"):
    if any(test[s][key] is None for s in seeds):
        print(f"{key}: some test figures missing")
        continue
    single = np.array([test[s][key] for s in seeds])
    picks = np.array([test[min(t, key=lambda s: (val[s]["score"], s))][key] for t in itertools.combinations(seeds, 3)])
    print(f"test {key}: one seed mean {single.mean():.1f}%, worst {single.max():.1f}%, sd {single.std():.1f}; "
          f"best-of-3 over all 84 triples mean {picks.mean():.1f}%, worst {picks.max():.1f}%, sd {picks.std():.1f}")
