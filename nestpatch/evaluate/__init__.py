"""nestpatch.evaluate: judges, suites, generation backends and the evaluation runner.

The public entry points are :func:`run_suites` (a model on disk, an optional patch) and
:func:`evaluate_torch_model` (an in-memory torch model with any modification); both write a
run directory (per-sample JSONL, ``summary.json``, ``summary.md``) and return the summary.
``behaviour`` compares the verdicts of two patches (``nestpatch diff --behaviour``).
Submodules import torch or llama.cpp only when a backend needs them.
"""

from .judges import JUDGES, REFUSAL_PHRASES, RefusalPhraseJudge, Verdict, make_judge, register_judge
from .runner import EvalOptions, evaluate_backend, evaluate_torch_model, run_suites
from .suites import SUITES, Sample, Suite, load_suite, load_suites, register_suite

__all__ = [
    "JUDGES", "REFUSAL_PHRASES", "RefusalPhraseJudge", "Verdict", "make_judge", "register_judge",
    "EvalOptions", "evaluate_backend", "evaluate_torch_model", "run_suites",
    "SUITES", "Sample", "Suite", "load_suite", "load_suites", "register_suite",
]
