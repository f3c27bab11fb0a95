"""Seeded fuzzing of patch inputs through the CLI, in process (CI subset of scripts/fuzz.py).

Every case must end in exit 0, or 2 with one ``error:`` line naming the file, never a
traceback; every file ``validate`` accepts must pass inspect, inspect --json, diff, apply +
verify on a pico GGUF, export-lora (both formats), sign and report; no input changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from nestpatch.testing.fuzz import Fuzzer, build_pico, seed_files

ROOT = Path(__file__).resolve().parents[1]
#: CI subset; the full run is ``python scripts/fuzz.py --cases 5000``.
CASES = int(os.environ.get("NESTPATCH_FUZZ_CASES", "320"))
#: Accepted files that run the whole command chain in CI (the script runs it for every one).
CHAIN_LIMIT = int(os.environ.get("NESTPATCH_FUZZ_CHAIN", "12"))


def test_fuzz_cli_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTPATCH_HOME", str(tmp_path / "home"))
    model, patch = build_pico(tmp_path)
    seeds = seed_files(ROOT) + [patch, tmp_path / "pico_scaled.nestpatch"]
    stats = Fuzzer(tmp_path, model, patch, seeds, chain_limit=CHAIN_LIMIT).run(CASES, seed=12)
    assert stats.fuzzed == CASES
    assert stats.tracebacks == 0 and stats.bad_errors == 0 and stats.modified == 0, \
        stats.summary() + "\n" + "\n".join(stats.failures[:5])
    assert stats.accepted >= 10, stats.summary()  # the benign mutations reach the whole chain
    assert stats.accepted < stats.fuzzed / 2, stats.summary()  # most mutations are refused
    assert len(stats.kinds) == 13, stats.kinds  # every mutation kind ran
    # memory is bounded by model + patch (a few MB here) plus the interpreter with torch loaded, never by
    # a metadata number: a 2^26 sketch size or shape would need gigabytes
    assert stats.peak_rss_mb < 2048, stats.summary()
