"""Utility measures: how much a patch changes the model where it should not.

* **KL to the reference** (``base``): for each benign prompt, the reference model answers
  greedily (``reply_tokens`` tokens); then both models read prompt + that answer, and
  ``KL(P_ref || P_variant)`` of the next-token distributions is averaged over the answer
  positions (the last prompt position predicts the first answer token). Measured where the
  model speaks, not over the user's text. Also the top-1 agreement at those positions.
* **Perplexity** of each variant on a small set of ordinary texts (per-token, pooled).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .backends import Backend


def kl_rows(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """``KL(P || Q)`` per row from log-probabilities ``(n, V)`` -> ``(n,)`` (float64 sums)."""
    p = np.exp(p_log.astype(np.float64))
    return (p * (p_log.astype(np.float64) - q_log.astype(np.float64))).sum(axis=-1)


def kl_records(backend: Backend, reference: str, others: Sequence[str], prompts: Sequence[Any], *,
               reply_tokens: int) -> list[dict]:
    """Per-prompt KL of each variant in ``others`` to ``reference`` (see module doc).

    Returns one record per prompt: ``{"id", "prompt", "n_positions", "kl": {variant: mean},
    "top1_agreement": {variant: share}}``.
    """
    gens = backend.generate(reference, [s.prompt for s in prompts], max_new_tokens=reply_tokens)
    seqs, starts = [], []
    for s, g in zip(prompts, gens):
        ptoks = backend.tokenize_prompt(s.prompt)
        seqs.append(ptoks + list(g.tokens))
        starts.append(len(ptoks) - 1)  # position predicting the first answer token
    ref = backend.token_logprobs(reference, seqs)
    records = [{"id": s.id, "prompt": s.prompt, "reference": reference, "n_positions": 0, "kl": {}, "top1_agreement": {}}
               for s in prompts]
    for v in others:
        lps = backend.token_logprobs(v, seqs)
        for rec, r, q, st, seq in zip(records, ref, lps, starts, seqs):
            end = len(seq) - 1 if len(seq) - 1 > st else st + 1  # an empty answer still has one position
            rr, qq = r[st:end], q[st:end]  # (P, V); shorter if the backend cut a long sequence
            rec["n_positions"] = int(rr.shape[0])
            if rr.shape[0] == 0:
                continue
            rec["kl"][v] = float(kl_rows(rr, qq).mean())
            rec["top1_agreement"][v] = float((rr.argmax(-1) == qq.argmax(-1)).mean())
    return records


def nll_records(backend: Backend, variants: Sequence[str], texts: Sequence[Any]) -> list[dict]:
    """Per-text summed negative log-likelihood and token count for each variant."""
    seqs = [backend.tokenize_text(t.prompt) for t in texts]
    records = [{"id": t.id, "text": t.prompt, "n_tokens": max(0, len(s) - 1), "nll": {}} for t, s in zip(texts, seqs)]
    for v in variants:
        for rec, lp, s in zip(records, backend.token_logprobs(v, seqs), seqs):
            t = min(len(s), lp.shape[0])  # the backend may cut a long text
            rec["n_tokens"] = max(0, t - 1)
            if t < 2:
                rec["nll"][v] = 0.0
                continue
            target = np.asarray(s[1:t], dtype=np.int64)  # (t-1,)
            rec["nll"][v] = float(-lp[np.arange(t - 1), target].astype(np.float64).sum())
    return records


def summarize_utility(kl_recs: Sequence[dict], nll_recs: Sequence[dict], variants: Sequence[str]) -> dict[str, dict]:
    """Per variant: mean KL (over prompts), mean top-1 agreement, perplexity (pooled over tokens)."""
    out: dict[str, dict] = {}
    for v in variants:
        d: dict[str, Any] = {}
        kls = [r["kl"][v] for r in kl_recs if v in r.get("kl", {})]
        if kls:
            d["kl"] = float(np.mean(kls))
            d["kl_median"] = float(np.median(kls))
            d["top1_agreement"] = float(np.mean([r["top1_agreement"][v] for r in kl_recs if v in r["kl"]]))
            d["kl_prompts"] = len(kls)
            d["kl_reference"] = kl_recs[0].get("reference")
        tot_nll = sum(r["nll"][v] for r in nll_recs if v in r.get("nll", {}))
        tot_tok = sum(r["n_tokens"] for r in nll_recs if v in r.get("nll", {}))
        if tot_tok:
            d["ppl"] = float(math.exp(tot_nll / tot_tok))
            d["ppl_tokens"] = int(tot_tok)
            d["ppl_texts"] = sum(1 for r in nll_recs if v in r.get("nll", {}))
        out[v] = d
    return out
