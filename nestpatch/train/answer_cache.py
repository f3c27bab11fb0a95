"""The base model's greedy answers kept per prompt, so trainings that differ in seed or sample reuse them.

Why: training sequences need the base model's own answers (its refusals for harmful prompts, its
replies for benign ones). On Qwen2.5-Coder-1.5B, generating them for 96 + 96 prompts took 3 to 15
minutes of llama.cpp per training (docs/RESULTS.md, session 14), and the stage cache of a
:class:`~nestpatch.tune.session.TrainSession` is keyed on the whole config, seed included, so
every seed paid it again although seeds draw overlapping samples and ``--max-prompts 0`` draws
the very same prompts. A greedy answer depends only on the model, the decoder, the prompt and
the token limits, and those make the key here.

The store is one JSON file per model (by path, size and modification time) next to the session's other caches,
rewritten atomically after each batch of new answers. Answers decoded together in llama.cpp can
differ in rare near-ties from answers decoded in another batch; a reused answer is still one of
the base model's greedy answers, which is what the training sequences need.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from ..atomic import atomic_path
from ..models.files import path_bytes

log = logging.getLogger(__name__)

FORMAT = "nestpatch-answers/1"


def model_key(source: str | Path) -> str:
    """Short key of a model file or directory: its resolved path, size and modification time (a replaced file gets a new key)."""
    p = Path(source).resolve()
    stamp = f"{path_bytes(p)}|{p.stat().st_mtime_ns}" if p.exists() else "absent"
    return hashlib.sha256(f"{p}|{stamp}".encode()).hexdigest()[:12]


class AnswerCache:
    """Greedy answers (token ids) by ``(decoder, max_new_tokens, max_length, prompt)``; on disk when ``path`` is given."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._answers: dict[str, list[int]] = {}
        self.hits = 0
        if self.path is not None and self.path.exists():
            self._load()

    @classmethod
    def for_model(cls, cache_dir: str | Path, source: str | Path) -> "AnswerCache":
        """The cache of the model at ``source`` in ``cache_dir`` (created on first write)."""
        return cls(Path(cache_dir) / f"answers-{model_key(source)}.json")

    def __len__(self) -> int:
        return len(self._answers)

    @staticmethod
    def _key(decoder: str, max_new_tokens: int, max_length: int, prompt: str) -> str:
        return json.dumps([decoder, int(max_new_tokens), int(max_length), prompt])

    def _load(self) -> None:
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            self._answers = {str(k): [int(t) for t in v] for k, v in doc["answers"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # a cache is never worth a failed run
            log.warning("%s: unreadable answer cache (%s); answers will be generated again", self.path, e)
            self._answers = {}

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "answers": self._answers}), encoding="utf-8")

    def answers(self, prompts: Sequence[str], *, decoder: str, max_new_tokens: int, max_length: int,
                generate: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
        """Answers to ``prompts`` in order: cached ones as stored, the others from ``generate`` (called once, on those only)."""
        keys = [self._key(decoder, max_new_tokens, max_length, p) for p in prompts]
        missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in self._answers))
        self.hits += len(prompts) - len(missing)
        if missing:
            for p, ids in zip(missing, generate(missing)):
                self._answers[self._key(decoder, max_new_tokens, max_length, p)] = [int(t) for t in ids]
            self._save()
        return [list(self._answers[k]) for k in keys]
