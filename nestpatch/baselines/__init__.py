"""Baselines and the reproduction bench: NeST against LoRA, full fine-tuning and circuit breakers.

Every method trains on the same data, chat template, refusal targets and retain term as
``nestpatch train`` and is evaluated by the same runner (:mod:`nestpatch.evaluate`):

- :mod:`.registry`: the methods behind one interface (``train``, ``load_merged``, ``DEFAULTS``).
- :mod:`.nest`, :mod:`.lora`, :mod:`.full`, :mod:`.circuit_breakers`: one module per method.
- :mod:`.data` (shared training sequences), :mod:`.loop` (NeST's trainer for other parameters),
  :mod:`.common` (context, outcome, measurements).
- :mod:`.jobs` (one method: train, evaluate, fold), :mod:`.worker` (its process), :mod:`.bench`
  (all methods, speed, tables), :mod:`.fold` (folded GGUF), :mod:`.speed` (tokens/s),
  :mod:`.table` (results.json, Markdown, plot, targets).

Imports are lazy: ``import nestpatch.baselines`` does not import torch.
"""

from __future__ import annotations

from .registry import METHODS, MethodInfo, get_method, parse_methods, register_method

__all__ = ["METHODS", "MethodInfo", "get_method", "parse_methods", "register_method"]
