"""Session 13 (docs/RESULTS.md): the k-means seed alone, against the training seed alone (SmolLM2, validation).

Rows: neuron set n (detection and training seed n), clustered with k-means seed c. The c = n cells
are session 8's patches (session 10's validation rows); the others are session 13's
``--cluster-seed`` runs. For comparison, session 11's grid varied the training seed with the
neurons *and clusters* of seed n fixed (``--neurons``). Run from the repo root:

    python docs/analysis/s13_cluster_seed.py
"""
import json
import re

import numpy as np


def rows(path: str) -> list[dict]:
    return [json.loads(x) for x in open(path) if x.strip()]


def figures(r: dict) -> tuple[float, float, float]:
    return 100 * (1 - r["hb-val"]), 100 * r["benign_refusal"], r["kl"]


cells: dict[tuple[int, int], dict] = {}
for r in rows("runs/s10/smol_val_full128.jsonl"):
    m = re.fullmatch(r"runs/s8/sweep/s(\d)\.nestpatch", r["model"])
    if m:
        cells[(int(m[1]), int(m[1]))] = r
for r in rows("runs/s13/clus_val.jsonl"):
    m = re.fullmatch(r"runs/s13/clus/n(\d)c(\d)\.nestpatch", r["model"])
    if m:
        cells[(int(m[1]), int(m[2]))] = r
grid: dict[tuple[int, int], dict] = {}
for r in rows("runs/s11/grid_val.jsonl"):
    m = re.fullmatch(r"runs/s11/grid/n(\d)-t(\d)\.nestpatch", r["model"])
    if m:
        grid[(int(m[1]), int(m[2]))] = r
for n in (0, 1, 2):  # the grid's diagonal is the s8 patch itself
    if (n, n) in cells:
        grid[(n, n)] = cells[(n, n)]

print("| neurons (seed) | k-means seed | hb-val ASR (41) | benign refusal | KL |\n|---|---|---|---|---|")
for (n, c), r in sorted(cells.items()):
    a, b, k = figures(r)
    print(f"| n{n} | c{c}{' (its own)' if c == n else ''} | {a:.1f}% | {b:.1f}% | {k:.3f} |")

print()
for n in sorted({n for n, _ in cells}):
    by_c = np.array([figures(r) for (m, _), r in cells.items() if m == n])
    by_t = np.array([figures(r) for (m, _), r in grid.items() if m == n])
    if len(by_c) < 2:
        continue
    line = (f"neurons n{n}: over {len(by_c)} k-means seeds, hb-val ASR {by_c[:, 0].min():.1f}-{by_c[:, 0].max():.1f}% "
            f"(sd {by_c[:, 0].std(ddof=1):.1f}), benign refusal {by_c[:, 1].min():.1f}-{by_c[:, 1].max():.1f}% "
            f"(sd {by_c[:, 1].std(ddof=1):.1f})")
    if len(by_t) >= 2:
        line += (f"; over {len(by_t)} training seeds (session 11, clusters fixed): hb-val ASR sd {by_t[:, 0].std(ddof=1):.1f}, "
                 f"benign refusal sd {by_t[:, 1].std(ddof=1):.1f}")
    print(line)
