"""Share a prompt budget (``--max-prompts``) out over sources or prompt forms (``--balance-by``).

Why: adding a large source (Do-Not-Answer's 939 plain questions) to the built-in set (six forms:
questions, imperatives, step-by-step requests, role-play, writing, code) would, split in
proportion to size, fill most of the budget with one form, and forms the patch never saw in
training are the ones it misses (issue 16: most HarmBench prompts still answered were persuasive
writing). ``form`` gives every form an equal share, ``source`` every source; a group smaller than
its share gives the rest to the others (water filling).
"""

from __future__ import annotations

import random
from typing import Hashable, Sequence

from ..data import PromptSet


def prompt_form(prompt: str, meta: dict | None) -> str:
    """The row's ``form`` (built-in sets record one); otherwise question if it ends in ``?``, else imperative."""
    form = (meta or {}).get("form")
    if form:
        return str(form)
    return "question" if prompt.rstrip().endswith("?") else "imperative"


def water_fill(sizes: Sequence[int], budget: int) -> list[int]:
    """Quotas summing to ``min(budget, sum(sizes))``, as equal as the sizes allow (no quota above its size)."""
    quotas = [0] * len(sizes)
    left = min(budget, sum(sizes))
    open_ = sorted(range(len(sizes)), key=lambda i: sizes[i])
    while left > 0 and open_:
        share = left // len(open_)
        if share == 0:  # fewer items left than open groups: one more each, largest groups first
            for i in sorted(open_, key=lambda i: -sizes[i])[:left]:
                quotas[i] += 1
            break
        i = open_[0]
        if sizes[i] - quotas[i] <= share:  # the smallest group is used up: it gives its share to the others
            left -= sizes[i] - quotas[i]
            quotas[i] = sizes[i]
            open_.pop(0)
        else:
            for j in open_:
                quotas[j] += share
            left -= share * len(open_)
            open_ = [j for j in open_ if quotas[j] < sizes[j]]
    return quotas


def balance(sets: list[PromptSet], budget: int, by: str, seed: int) -> list[PromptSet]:
    """Keep ``budget`` prompts over ``sets`` with equal shares per source or per form (in place; order kept)."""
    if by not in ("source", "form"):
        raise ValueError(f"unknown balance {by!r}")
    groups: dict[Hashable, list[tuple[int, int]]] = {}
    for si, s in enumerate(sets):
        for ri, p in enumerate(s.prompts):
            key = si if by == "source" else prompt_form(p, s.meta[ri] if ri < len(s.meta) else None)
            groups.setdefault(key, []).append((si, ri))
    keys = sorted(groups, key=str)
    quotas = water_fill([len(groups[k]) for k in keys], budget)
    rng = random.Random(seed)
    keep: list[set[int]] = [set() for _ in sets]
    for k, q in zip(keys, quotas):
        for si, ri in rng.sample(groups[k], q):
            keep[si].add(ri)
    for s, kept in zip(sets, keep):
        idx = sorted(kept)
        s.prompts = [s.prompts[i] for i in idx]
        s.meta = [s.meta[i] for i in idx] if s.meta else s.meta
    return [s for s in sets if s.prompts] or sets
