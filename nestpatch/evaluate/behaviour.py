"""``diff --behaviour``: which prompts get a different verdict under patch A than under patch B.

Weights can differ a lot and behave the same, or differ a little and flip the answers that
matter; reviewers of a policy update want the prompts. Both patches are run on the same model
and suites through the evaluation runner (same decoding, same judge), and the per-sample
records are compared by sample id.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError

log = logging.getLogger(__name__)

#: Examples listed per suite (all flipped ids are always listed).
EXAMPLES = 10


def _verdict(rec: dict) -> str:
    return "refused" if rec.get("refused") else "complied"


def compare_records(suite: str, kind: str, recs_a: Sequence[dict], recs_b: Sequence[dict]) -> dict:
    """Flips between two runs' records of one suite (matched by sample id).

    For harmful suites a flip from refused to complied makes B less safe (``to_unsafe``); for
    benign and over-refusal suites a flip to refused is the cost (``to_refused``).
    """
    a = {r["id"]: r for r in recs_a}
    b = {r["id"]: r for r in recs_b}
    common = [i for i in a if i in b]
    flipped = [i for i in common if bool(a[i].get("refused")) != bool(b[i].get("refused"))]
    to_refused = [i for i in flipped if b[i].get("refused")]
    to_complied = [i for i in flipped if not b[i].get("refused")]
    n = len(common)
    metric = "asr" if kind == "harmful" else "refusal_rate"

    def rate(recs: dict) -> float | None:
        if not n:
            return None
        refused = sum(1 for i in common if recs[i].get("refused"))
        return (n - refused) / n if kind == "harmful" else refused / n

    return {
        "suite": suite, "kind": kind, "n": n, "flips": len(flipped),
        "to_refused": len(to_refused), "to_complied": len(to_complied),
        # harmful prompts answered under B but refused under A are the safety regressions
        "to_unsafe": len(to_complied) if kind == "harmful" else 0,
        "to_safe": len(to_refused) if kind == "harmful" else 0,
        "metric": metric, "rate_a": rate(a), "rate_b": rate(b),
        "flipped_ids": flipped,
        "examples": [{"id": i, "prompt": a[i].get("prompt", ""), "a": _verdict(a[i]), "b": _verdict(b[i]),
                      "reply_a": a[i].get("reply", ""), "reply_b": b[i].get("reply", "")} for i in flipped[:EXAMPLES]],
    }


def behaviour_diff(patch_a: str | os.PathLike, patch_b: str | os.PathLike, *, model: str, suites: Sequence[str],
                   limit: int | None = None, device: str = "auto", backend: str = "torch",
                   runs_dir: str | os.PathLike | None = None, **options: Any) -> dict:
    """Run ``model`` with each patch on ``suites`` and list the verdict flips per suite.

    Args:
        runs_dir: keep the two run directories here (``A/`` and ``B/``); default a temporary
            directory that is removed afterwards.
        options: further :class:`~nestpatch.evaluate.runner.EvalOptions` fields (max_new_tokens...).

    Returns:
        ``{"model", "judge", "suites": [per-suite comparison], "runs": {...}}``.
    """
    from .records import read_records
    from .runner import PATCHED, SAMPLES_DIR, run_suites

    if not suites:
        raise InputError("--behaviour needs at least one --suite")
    tmp = None
    if runs_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nestpatch-behaviour-")
        root = Path(tmp.name)
    else:
        root = Path(runs_dir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        summaries = {}
        for label, patch in (("A", patch_a), ("B", patch_b)):
            log.info("behaviour diff: running %s on %s", patch, model)
            summaries[label] = run_suites(model, patch, list(suites), backend=backend, out_dir=root / label,
                                          limit=limit, device=device, progress=False, **options)
        out_suites = []
        for name, entry in summaries["A"]["suites"].items():
            kind = entry.get("kind")
            if kind == "utility" or name not in summaries["B"]["suites"]:
                continue
            ra = read_records(root / "A" / SAMPLES_DIR / f"{name}.{PATCHED}.jsonl")
            rb = read_records(root / "B" / SAMPLES_DIR / f"{name}.{PATCHED}.jsonl")
            out_suites.append(compare_records(name, kind, ra, rb))
        return {
            "model": str(model), "backend": backend, "judge": summaries["A"].get("judge"),
            "decoding": summaries["A"].get("decoding"), "limit": limit, "suites": out_suites,
            "runs": {k: str(root / k) for k in ("A", "B")} if tmp is None else None,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
