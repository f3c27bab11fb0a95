"""``nestpatch select``: measure candidate patches on the validation sets and keep the best one.

Why a command: one NeST recipe's seeds differ by up to 19 points of HarmBench test ASR on every
model measured here, and measured on every HarmBench *validation* behaviour in llama.cpp the
seeds rank roughly as they do on the test (Spearman 0.65 over nine SmolLM2 seeds). Keeping the
best of three lowered the expected HarmBench test ASR from 12.6% to 10.5% over every triple of
those seeds (docs/RESULTS.md, session 11). So a release can train a few seeds and ship the one
validation prefers, never looking at an evaluation set. The rule is the
one ``tune`` uses for its trial (:func:`nestpatch.tune.study.objective_sum`: ASR + benign refusal +
KL), and every candidate's figures go into the chosen patch's provenance, so the choice can be
audited from the file alone. The tensors are copied unchanged: the chosen file's content digest
is the candidate's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BaseMismatchError, InputError
from ..format import Patch, write_patch
from ..format.constants import ProvenanceKey
from ..models.files import check_patch_fits
from .options import SelectOptions
from .study import OBJECTIVES, check_llama_model, make_validator, objective_sum
from .validation import validation_sets

log = logging.getLogger(__name__)

RULE = "min asr + benign_refusal + kl on the validation sets (refusal-phrase judge)"


@dataclass
class Candidate:
    """One patch offered to ``select`` and what validation measured for it."""

    label: str
    patch: Patch
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return objective_sum(self.metrics)


@dataclass
class SelectResult:
    """The candidates (measured), the index of the chosen one, and the validation set sizes."""

    candidates: list[Candidate]
    chosen: int
    sets: dict[str, int]


def select_patch(model_path: str | Path, candidates: Sequence[Candidate], out: str | Path, opts: SelectOptions, *,
                 threads: int = 0, progress: Callable[[str], None] | None = None) -> SelectResult:
    """Measure every candidate on ``model_path`` and write the best to ``out`` with a selection record.

    Raises:
        BaseMismatchError: a candidate was made for another base model (checked before any measuring).
        InputError: no candidates, or ``--backend llama`` on a model that is not a GGUF.
    """
    if not candidates:
        raise InputError("select: no candidate patches given")
    for c in candidates:  # every candidate must fit this base: refuse before minutes of generation
        try:
            check_patch_fits(c.patch, model_path)
        except BaseMismatchError as e:
            raise BaseMismatchError(f"{c.label}: not made for this model: {e}") from None
    lm = None
    if opts.backend == "llama":
        check_llama_model(model_path)
    else:
        from ..models.loading import load_model

        lm = load_model(model_path)
    sets = validation_sets(opts.limit, 0, prefill=opts.prefill_validation)
    validator = make_validator(sets, opts, source=model_path, lm=lm, threads=threads)
    for i, c in enumerate(candidates):
        c.metrics = validator.measure(c.patch)
        log.info("%s: %s", c.label, c.metrics)
        if progress:
            progress(f"[{i + 1}/{len(candidates)}] {c.label}: " + ", ".join(f"{k} {c.metrics[k]:.4f}" for k in OBJECTIVES))
    chosen = min(range(len(candidates)), key=lambda i: (candidates[i].score, i))
    sizes = {s.name: len(s.prompts) for s in sets}
    patch = candidates[chosen].patch.copy()
    if patch.signature is not None:  # a signature covers the metadata, which now gains the selection record
        log.warning("%s was signed; the chosen copy is not (sign it again: nestpatch sign)", candidates[chosen].label)
        patch.signature = None
    patch.provenance[ProvenanceKey.SELECTION] = {
        "rule": RULE, "backend": opts.backend, "tokens": opts.tokens, "limit": opts.limit, "kl_prompts": opts.kl_prompts,
        "kl_tokens": opts.kl_tokens, "sets": sizes, "chosen": chosen,
        "candidates": [{"label": c.label, "content_digest": c.patch.content_digest,
                        "seed": c.patch.provenance.get(ProvenanceKey.SEED), "score": round(c.score, 5),
                        **{k: v for k, v in c.metrics.items() if k != "seconds"}} for c in candidates],
    }
    write_patch(patch, out)
    return SelectResult(list(candidates), chosen, sizes)
