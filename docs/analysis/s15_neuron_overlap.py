"""Session 15 (docs/RESULTS.md): how much the 1.5B's neuron sets overlap across seeds, by detection sample.

Jaccard index of the (tensor, neuron) sets of the patches named on the command line, pairwise. A
directory is read as a training cache's selection (``benchmarks/train_sweep.py``'s ``OUT/cache/sel-*``:
detection and clustering, saved before training; dp160s2's training was stopped after it).
The recipe's seeds detect on 64 + 64 prompts of their training sample; ``--detect-pool sources
--detect-prompts 160`` detects on 160 + 160 of the whole training split. Run from the repo root:

    python docs/analysis/s15_neuron_overlap.py rf50s0=runs/s14/q15rf/rf50.nestpatch rf50s1=runs/s14/q15rf/rf50s1.nestpatch \
        rf50s2=runs/s14/q15rf/rf50s2.nestpatch dp160s1=runs/s15/q15dp/dp160s1.nestpatch dp160s2=runs/s15/q15dp/cache/sel-c249c0e31d0d
"""
import itertools
import sys
from pathlib import Path

from nestpatch.format import read_patch
from nestpatch.train.checkpoint import CheckpointDir


def neurons(path: str) -> set[tuple[str, int]]:
    if Path(path).is_dir():
        specs, _ = CheckpointDir(path).load_selection()
        return {(sp.ref.hf_name, int(i)) for sp in specs for i in list(sp.indices)}
    return {(t.name, int(i)) for t in read_patch(path).targets for i in t.indices.tolist()}


sets = {label: neurons(path) for label, _, path in (a.partition("=") for a in sys.argv[1:])}
for label, s in sets.items():
    print(f"{label}: {len(s)} neurons")
print("\n| pair | Jaccard |\n|---|---|")
for a, b in itertools.combinations(sets, 2):
    print(f"| {a} / {b} | {len(sets[a] & sets[b]) / len(sets[a] | sets[b]):.3f} |")
