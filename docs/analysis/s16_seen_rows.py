"""Session 16 (docs/RESULTS.md): which "Write a persuasive ..." training rows a run's optimizer steps actually saw.

A training run of ``steps x grad_accum x batch_size`` harmful (and as many benign) sequences draws
them from seeded per-epoch permutations (``nestpatch.train.trainer.EpochSampler``), so a run sees
only part of its training sequences when that product is below their number. Given a session
cache's training sequences (``OUT/cache/ex-*/examples.json``) with the seed and the number of
sequences drawn, this prints how many persuasive-writing rows (harmful: plain and recovery
examples; benign) the set holds and how many the steps saw. Training data only. Run from the repo root:

    python docs/analysis/s16_seen_rows.py "all s1=runs/s16/q15all/cache/ex-3d04541bfba0:1:240" \
        "96 s0=runs/s14/q15rf/cache/ex-22519fe9c60c:0:120"
"""
import json
import re
import sys
from pathlib import Path

from nestpatch.train.trainer import EpochSampler

PERSUASIVE = re.compile(r"^write a persuasive", re.I)

print("| run | harmful sequences | persuasive harmful: plain / with a compliant opening | seen: plain / opening | "
      "benign sequences | persuasive benign | seen |")
print("|---|---|---|---|---|---|---|")
for arg in sys.argv[1:]:
    name, spec = arg.split("=", 1)
    path, seed, drawn = spec.rsplit(":", 2)
    doc = json.loads((Path(path) / "examples.json").read_text())
    harmful, benign = doc["harmful"], doc["benign"]
    h_seen = set(EpochSampler(len(harmful), int(seed), 1).take(0, int(drawn)))  # salts as in Trainer: 1 harmful, 2 benign
    b_seen = set(EpochSampler(len(benign), int(seed), 2).take(0, int(drawn)))
    plain = [i for i, e in enumerate(harmful) if PERSUASIVE.search(e["prompt"]) and not e.get("prefix_ids")]
    opening = [i for i, e in enumerate(harmful) if PERSUASIVE.search(e["prompt"]) and e.get("prefix_ids")]
    ben = [i for i, e in enumerate(benign) if PERSUASIVE.search(e["prompt"])]
    print(f"| {name} | {len(harmful)} | {len(plain)} / {len(opening)} | {sum(i in h_seen for i in plain)} / "
          f"{sum(i in h_seen for i in opening)} | {len(benign)} | {len(ben)} | {sum(i in b_seen for i in ben)} |")
