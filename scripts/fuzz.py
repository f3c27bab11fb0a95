"""Fuzz `.nestpatch` inputs through the whole CLI (>= 5,000 cases; seeded, reproducible).

    OMP_NUM_THREADS=1 python scripts/fuzz.py --cases 5000 --seed 1

Prints N fuzzed, N accepted, N tracebacks, N inputs modified and the peak RSS; exits 1 if any
traceback, malformed error or modified input was seen (the failures are listed).
See nestpatch/testing/fuzz.py for the mutations and the checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chain-limit", type=int, default=None, help="Run the full chain for at most N accepted files.")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    from nestpatch.testing.fuzz import Fuzzer, build_pico, seed_files

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        os.environ["NESTPATCH_HOME"] = str(work / "home")
        model, patch = build_pico(work)
        seeds = seed_files(ROOT) + [patch, work / "pico_scaled.nestpatch"]
        fz = Fuzzer(work, model, patch, seeds, chain_limit=args.chain_limit)
        t0 = time.time()
        rng_seed = args.seed
        import random

        rng = random.Random(rng_seed)
        for i in range(args.cases):
            fz.run_case(i, rng)
            if (i + 1) % 250 == 0:
                print(f"{i + 1}/{args.cases}: {fz.stats.summary()} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        s = fz.stats
        print(f"command: OMP_NUM_THREADS=1 python scripts/fuzz.py --cases {args.cases} --seed {args.seed}"
              + (f" --chain-limit {args.chain_limit}" if args.chain_limit is not None else ""))
        print(s.summary() + f", {time.time() - t0:.0f} s")
        print("cases per mutation kind: " + ", ".join(f"{k} {v}" for k, v in sorted(s.kinds.items())))
        for f in s.failures[:20]:
            print("FAIL " + f)
        return 1 if (s.tracebacks or s.modified or s.bad_errors) else 0


if __name__ == "__main__":
    sys.exit(main())
