"""Session 12 (docs/RESULTS.md): validation of the consensus seeds against the default's, and Welch's t.

Reads the `select` JSONs (every candidate's validation figures): runs/s12/cons/pick.json and
pick2.json (consensus seeds 0-5), runs/s11/pick/{A,B,C}.json (default seeds 0-8). Run from the repo root.
"""
import json
import statistics as st

from scipy.stats import ttest_ind

RATES = ("hb-val", "harmful-heldout")  # stored as refusal shares: ASR = 1 - value


def figures(files: list[str]) -> list[dict]:
    return [c for f in files for c in json.load(open(f))["candidates"]]


def value(c: dict, key: str) -> float:
    return 1 - c[key] if key in RATES else c[key]


cons = figures(["runs/s12/cons/pick.json", "runs/s12/cons/pick2.json"])
default = figures([f"runs/s11/pick/{g}.json" for g in "ABC"])
for key in ("hb-val", "harmful-heldout", "asr", "benign_refusal", "kl", "score"):
    a, b = [value(c, key) for c in cons], [value(c, key) for c in default]
    t = ttest_ind(a, b, equal_var=False)
    print(f"{key:16s} consensus {' '.join(f'{x:.3f}' for x in a)} | mean {st.mean(a):.3f} sd {st.stdev(a):.3f} | "
          f"default mean {st.mean(b):.3f} sd {st.stdev(b):.3f} | Welch t {t.statistic:.2f} p {t.pvalue:.2f}")
