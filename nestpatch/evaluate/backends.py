"""Generation backends for evaluation: torch (batched greedy) and llama.cpp (multi-sequence batches).

A backend runs one or more *variants* of a model: ``base`` (unpatched), ``patched``, or any
name another caller gives (a LoRA baseline, a fully fine-tuned copy). The runner asks for a
variant per call; the backend switches to it (attach/detach in torch, one llama.cpp session per
variant), so ``--compare`` needs one model load.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from ..errors import InputError
from ..format.patch import Patch

log = logging.getLogger(__name__)

#: Context of llama.cpp scoring sessions (utility: prompt + short answer, or a short text).
SCORING_CTX = 512

#: A variant of a torch model: a callable returning a context manager. While it is entered,
#: the model runs as that variant; if it yields a model object, that model is used instead.
VariantFactory = Callable[[], ContextManager[Any]]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 accumulation, float32 out. ``x``: (n, V)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


class Backend(ABC):
    """What the runner needs from a backend."""

    name: str = ""
    variants: tuple[str, ...] = ()
    batch_size: int = 1

    @property
    def prompts_per_call(self) -> int:
        """Prompts the runner hands to one :meth:`generate` call (results are saved per call)."""
        return self.batch_size

    @property
    @abstractmethod
    def chat_template(self) -> str | None: ...

    @abstractmethod
    def format_prompt(self, prompt: str) -> str:
        """The chat-formatted text of a single user prompt."""

    def chat_text(self, prompt: str, prefill: str | None = None) -> str:
        """The chat-formatted user prompt plus an assistant prefix (the prefilling attack).

        The one place both backends build a prefilled turn: the template's generation prompt
        opens the assistant turn, and ``prefill`` is written into it verbatim, so the model
        continues the attacker's opening instead of starting its own.
        """
        return self.format_prompt(prompt) + (prefill or "")

    @abstractmethod
    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens of the chat-formatted user prompt."""

    @abstractmethod
    def tokenize_text(self, text: str) -> list[int]:
        """Tokens of raw text (perplexity), with the BOS token the model expects."""

    @abstractmethod
    def generate(self, variant: str, prompts: Sequence[str], *, max_new_tokens: int,
                 prefills: Sequence[str | None] | None = None) -> list[Any]:
        """Greedy replies (:class:`nestpatch.runtime.llama_session.Generation`) to user prompts.

        ``prefills``: per prompt, an assistant opening the reply continues (:meth:`chat_text`);
        the returned text is the continuation only.
        """

    @abstractmethod
    def token_logprobs(self, variant: str, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Log-probabilities over the vocabulary at every position of each sequence: ``(n_i, V)``."""

    @abstractmethod
    def info(self) -> dict[str, Any]: ...

    def close(self) -> None:
        pass

    def _check_variant(self, variant: str) -> None:
        if variant not in self.variants:
            raise InputError(f"backend {self.name}: no variant {variant!r}; has {', '.join(self.variants)}")


# ------------------------------------------------------------------------------------------ torch


class TorchBackend(Backend):
    """A transformers model; variants switch it by context managers (attach/detach by default).

    Args:
        model, tokenizer: the loaded model (the ``base`` weights when a patch is used).
        variants: name -> :data:`VariantFactory`.
        batch_size: prompts per generation batch (left padding); prompts are sorted by length.
    """

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, variants: dict[str, VariantFactory], *, batch_size: int = 8) -> None:
        from nestpatch.runtime.torch_session import TorchSession

        if not variants:
            raise InputError("no model variants to evaluate")
        self.model = model
        self.session = TorchSession(model, tokenizer)
        self.tokenizer = tokenizer
        self._factories = dict(variants)
        self.variants = tuple(variants)
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def for_patch(cls, model: Any, tokenizer: Any, patch: Patch | None, variants: Sequence[str], **kw: Any) -> "TorchBackend":
        """``base`` = the model as loaded, ``patched`` = with ``patch`` attached (already verified)."""
        from nestpatch.runtime.attach import attach

        facts: dict[str, VariantFactory] = {}
        for v in variants:
            if v == "base":
                facts[v] = contextlib.nullcontext
            elif v == "patched":
                if patch is None:
                    raise InputError("variant 'patched' needs a patch")
                facts[v] = lambda: attach(model, patch, verify_base=False)
            else:
                raise InputError(f"unknown variant {v!r}")
        return cls(model, tokenizer, facts, **kw)

    @contextlib.contextmanager
    def _use(self, variant: str):  # -> Iterator[session]
        self._check_variant(variant)
        from nestpatch.runtime.torch_session import TorchSession

        with self._factories[variant]() as obj:
            if obj is not None and hasattr(obj, "generate") and hasattr(obj, "config") and obj is not self.model:
                yield TorchSession(obj, self.tokenizer)  # the variant is another model object
            else:
                yield self.session

    @property
    def chat_template(self) -> str | None:
        return self.session.chat_template

    def format_prompt(self, prompt: str) -> str:
        return self.session.format_prompt(prompt)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return self.session.tokenize(self.format_prompt(prompt))

    def tokenize_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def generate(self, variant: str, prompts: Sequence[str], *, max_new_tokens: int,
                 prefills: Sequence[str | None] | None = None) -> list[Any]:
        texts = [self.chat_text(p, f) for p, f in zip(prompts, prefills or [None] * len(prompts))]
        with self._use(variant) as sess:
            return sess.generate_batch(texts, max_new_tokens=max_new_tokens)

    def token_logprobs(self, variant: str, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray] = []
        with self._use(variant) as sess:
            model = sess.model
            device = next(model.parameters()).device
            pad = self.tokenizer.pad_token_id or 0
            for i in range(0, len(seqs), self.batch_size):
                chunk = seqs[i:i + self.batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, s in enumerate(chunk):  # right padding: positions keep their indices
                    ids[r, :len(s)] = torch.tensor(list(s))
                    mask[r, :len(s)] = 1
                with torch.no_grad():
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
                    lp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
                out.extend(lp[r, :len(s)] for r, s in enumerate(chunk))
        return out

    def info(self) -> dict[str, Any]:
        p = next(self.model.parameters())
        return {"backend": "torch", "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
                "batch_size": self.batch_size, "padding": "left", "variants": list(self.variants)}


# ------------------------------------------------------------------------------------------ llama


class LlamaBackend(Backend):
    """llama.cpp sessions, one per variant, opened on first use and kept until :meth:`close`.

    Args:
        variants: name -> keyword arguments of :class:`~nestpatch.runtime.llama_session.LlamaSession`
            (``model_path`` and optionally ``patch``/``patch_mode``/``lora_path``).
        n_threads: CPU threads per session (default all cores).
        batch_size: sequences decoded together (:class:`~nestpatch.runtime.llama_batch.BatchDecoder`,
            continuous batching); 1 = one prompt at a time (:meth:`LlamaSession.generate`).
    """

    name = "llama"
    batch_size = 1

    def __init__(self, variants: dict[str, dict[str, Any]], *, n_threads: int | None = None, n_ctx: int = 2048,
                 batch_size: int = 1) -> None:
        if not variants:
            raise InputError("no model variants to evaluate")
        self._specs = {k: dict(v) for k, v in variants.items()}
        self.variants = tuple(variants)
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.batch_size = max(1, int(batch_size))
        self._sessions: dict[tuple[str, bool], Any] = {}
        self._decoders: dict[str, Any] = {}

    @property
    def prompts_per_call(self) -> int:
        # Several prompts per slot, so finished slots are refilled instead of waiting for the batch's longest.
        return self.batch_size * 4 if self.batch_size > 1 else 1

    @classmethod
    def for_patch(cls, model_path: Any, patch: Patch | None, variants: Sequence[str], *, patch_mode: str = "fold",
                  precision: str = "keep", **kw: Any) -> "LlamaBackend":
        specs: dict[str, dict[str, Any]] = {}
        for v in variants:
            if v == "base":
                specs[v] = {"model_path": model_path}
            elif v == "patched":
                if patch is None:
                    raise InputError("variant 'patched' needs a patch")
                specs[v] = {"model_path": model_path, "patch": patch, "patch_mode": patch_mode, "precision": precision,
                            "verify_base": False}
            else:
                raise InputError(f"unknown variant {v!r}")
        return cls(specs, **kw)

    def replace_variant(self, variant: str, spec: dict[str, Any]) -> None:
        """Point ``variant`` (new or existing) at other session settings, e.g. the next patch of a search.

        Its open sessions and decoder are closed; the other variants' stay open, so a base model
        measured once is not loaded again for every patch.
        """
        for key in [k for k in self._sessions if k[0] == variant]:
            self._sessions.pop(key).close()
        decoder = self._decoders.pop(variant, None)
        if decoder is not None:
            decoder.close()
        self._specs[variant] = dict(spec)
        if variant not in self.variants:
            self.variants = (*self.variants, variant)

    def session(self, variant: str, *, logits_all: bool = False) -> Any:
        """The variant's session (a second one with ``logits_all`` for scoring, kept apart so
        generation does not pay for logits of every prompt position)."""
        from nestpatch.runtime.llama_session import LlamaSession

        self._check_variant(variant)
        key = (variant, logits_all)
        if key not in self._sessions:
            # llama-cpp-python keeps n_ctx x vocab float32 scores with logits_all (400 MB at 2048 x
            # 49152): scoring sessions get a short context; longer sequences are cut to it.
            n_ctx = min(self.n_ctx, SCORING_CTX) if logits_all else self.n_ctx
            self._sessions[key] = LlamaSession(n_threads=self.n_threads, n_ctx=n_ctx, logits_all=logits_all,
                                               **self._specs[variant])
        return self._sessions[key]

    def _any(self) -> Any:
        return self.session(self.variants[0])

    @property
    def chat_template(self) -> str | None:
        return self._any().chat_template

    def format_prompt(self, prompt: str) -> str:
        return self._any().format_prompt(prompt)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        s = self._any()
        return s.tokenize(s.format_prompt(prompt))

    def tokenize_text(self, text: str) -> list[int]:
        return list(self._any().llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def generate(self, variant: str, prompts: Sequence[str], *, max_new_tokens: int,
                 prefills: Sequence[str | None] | None = None) -> list[Any]:
        s = self.session(variant)
        pre = list(prefills) if prefills else [None] * len(prompts)
        if self.batch_size == 1:  # one at a time; prefilled turns are the same chat text as torch, given raw
            return [s.generate(self.chat_text(p, f), max_new_tokens=max_new_tokens, raw=True) if f
                    else s.generate(p, max_new_tokens=max_new_tokens) for p, f in zip(prompts, pre)]
        if variant not in self._decoders:
            from nestpatch.runtime.llama_batch import BatchDecoder

            self._decoders[variant] = BatchDecoder(s, self.batch_size)
        texts = [self.chat_text(p, f) if f else s.format_prompt(p) for p, f in zip(prompts, pre)]
        return self._decoders[variant].generate_texts(texts, max_new_tokens=max_new_tokens)

    def token_logprobs(self, variant: str, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        s = self.session(variant, logits_all=True)
        if any(len(q) > s.n_ctx for q in seqs):
            log.warning("scoring: sequences longer than %d tokens are cut to that length", s.n_ctx)
        return [log_softmax(s.logits(list(q)[: s.n_ctx])) for q in seqs]

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "llama.cpp", "batch_size": self.batch_size, "variants": list(self.variants), "sessions": {}}
        for v in self.variants:
            out["sessions"][v] = self.session(v).info()
        first = out["sessions"][self.variants[0]]
        out["llama_cpp_python"] = first.get("llama_cpp_python")
        out["n_threads"] = first.get("n_threads")
        return out

    def close(self) -> None:
        for d in self._decoders.values():
            d.close()
        self._decoders.clear()
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()
