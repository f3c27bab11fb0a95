"""Prompt sets: files (JSONL / CSV / TXT / JSON) and named sources (pinned assets, built-in sets)."""

from .sources import (
    EVAL_ONLY_SOURCES, NAMED_SOURCES, NamedSource, PromptSet, eval_prompt_index, load_many, load_prompts, load_refusals,
    normalise,
)

__all__ = [
    "EVAL_ONLY_SOURCES", "NAMED_SOURCES", "NamedSource", "PromptSet", "eval_prompt_index", "load_many", "load_prompts",
    "load_refusals", "normalise",
]
