"""Session 13 (docs/RESULTS.md): does a simple property of a seed's neuron set predict its ASR? (exploratory)

The nine default SmolLM2 seeds (session 8: s0-s2, session 11: s3-s8): rank correlation of each
set property with HarmBench-validation ASR (session 10/11 validation rows) and HarmBench test ASR
(session 8/11 evaluations, phrase judge; the values of RESULTS.md's session 11 table). Twelve tests
on nine points: read as a search for a lead, not as evidence. Run from the repo root.
"""
import json

import numpy as np
from scipy.stats import spearmanr

from nestpatch.format import read_patch

val = {}
for line in open("runs/s10/smol_val_full128.jsonl"):
    r = json.loads(line)
    val[r["model"]] = r
for draw in "ABC":
    for c in json.load(open(f"runs/s11/pick/{draw}.json"))["candidates"]:
        val.setdefault(c["patch"], c)
TEST_ASR = [7.5, 25.2, 6.3, 10.7, 11.3, 11.9, 8.8, 24.5, 7.5]  # s0..s8, HarmBench test, refusal-phrase

rows = []
for s in range(9):
    path = f"runs/s8/sweep/s{s}.nestpatch" if s < 3 else f"runs/s11/seeds/s{s}.nestpatch"
    p = read_patch(path)
    layers = np.concatenate([[int(t.name.split(".")[2])] * t.n_neurons for t in p.targets])
    gate = sum(t.n_neurons for t in p.targets if "gate_proj" in t.name) / p.n_neurons
    rows.append({"seed": s, "val": 100 * (1 - val[path]["hb-val"]), "test": TEST_ASR[s], "neurons": p.n_neurons,
                 "mean layer": layers.mean(), "share in layers >= 20": (layers >= 20).mean(),
                 "share in layers < 10": (layers < 10).mean(), "gate share": gate, "clusters": p.n_clusters})
for prop in ("neurons", "mean layer", "share in layers >= 20", "share in layers < 10", "gate share", "clusters"):
    x = [r[prop] for r in rows]
    rv, pv = spearmanr([r["val"] for r in rows], x)
    rt, pt = spearmanr([r["test"] for r in rows], x)
    print(f"{prop:>22}: rho vs validation ASR {rv:+.2f} (p {pv:.2f}); vs test ASR {rt:+.2f} (p {pt:.2f})")
