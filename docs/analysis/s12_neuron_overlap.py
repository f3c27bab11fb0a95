"""Session 12 (docs/RESULTS.md): how much two seeds' neuron sets share, one detection sample against consensus.

Jaccard index |A & B| / |A | B| of the (projection, neuron) pairs of two patches, for every pair
of seeds of a recipe. Run from the repo root after the trainings of the section:

    python docs/analysis/s12_neuron_overlap.py default=runs/s8/sweep/s0,runs/s8/sweep/s1,runs/s8/sweep/s2 \
        consensus=runs/s12/cons/s0,runs/s12/cons/s1,runs/s12/cons/s2

(each argument is NAME=PATHS: comma-separated patches, the .nestpatch suffix optional).
"""
import itertools
import sys

from nestpatch.format import read_patch


def neurons(path: str) -> set[tuple[str, int]]:
    p = read_patch(path if path.endswith(".nestpatch") else path + ".nestpatch")
    return {(t.name, int(i)) for t in p.targets for i in t.indices}


def main(args: list[str]) -> None:
    for arg in args:
        name, paths = arg.split("=", 1)
        sets = {q: neurons(q) for q in paths.split(",")}
        pairs = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets.values(), 2)]
        sizes = ", ".join(str(len(s)) for s in sets.values())
        print(f"{name}: neurons {sizes}; pairwise Jaccard {', '.join(f'{j:.2f}' for j in pairs)} "
              f"(mean {sum(pairs) / len(pairs):.2f}); in all: {len(set.intersection(*sets.values()))}")


if __name__ == "__main__":
    main(sys.argv[1:])
