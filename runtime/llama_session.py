"""llama.cpp sessions: a GGUF model with a patch folded into it, or live as a LoRA adapter.

Why both: a folded file is what ships (zero overhead, one file), while a LoRA adapter needs
no new multi-GB model file and can be switched off and on in place (``set_patch_enabled``) to
compare answers. A patch with K clusters on a target is exactly a rank-K LoRA, so the two
agree up to re-quantization of the touched blocks.

Generation is greedy, token by token (argmax of the last logits): deterministic, and the
same decoding rule as the torch backend, so verdicts can be compared across backends. Chat
prompts are rendered with the model's own chat template (``tokenizer.chat_template`` in the
GGUF) by the same Jinja rules transformers uses.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from gguf import Keys

from nestpatch.errors import InputError, UnsupportedError
from nestpatch.format.patch import Patch
from nestpatch.provenance import file_digest, patch_digest

log = logging.getLogger(__name__)

PATCH_MODES = ("fold", "lora")
Messages = list[dict[str, str]]


@dataclass
class Generation:
    """One greedy generation."""

    text: str
    tokens: list[int]
    n_prompt_tokens: int
    seconds: float
    finish: str  # "stop" (end-of-generation token) or "length" (max_new_tokens reached)
    prompt_text: str = ""
    stop_token: int | None = None  # the end-of-generation token that ended it (not in ``tokens``)

    @property
    def n_new_tokens(self) -> int:
        return len(self.tokens)


# ------------------------------------------------------------------------------------ chat template


def render_chat_template(template: str, messages: Messages, *, bos_token: str = "", eos_token: str = "",
                         add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face style Jinja chat template (sandboxed, like transformers does)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise InputError(f"chat template failed to render: {e}") from None


# ----------------------------------------------------------------------------- GGUF fingerprinting


def check_gguf_base(patch: Patch, path: str | os.PathLike) -> None:
    """Refuse a GGUF model the patch was not made for (sizes, shapes, fingerprint).

    Reads the GGUF header and only the touched tensors' bytes (the model-file layer's reader:
    fast even for the tokenizer arrays that make gguf-py's reader slow).
    """
    from nestpatch.models.files import check_patch_fits

    check_patch_fits(patch, path)


# -------------------------------------------------------------------------------- derived files


def derived_cache_dir() -> Path:
    """Where folded models and LoRA adapters made for sessions are cached."""
    from nestpatch.assets import home

    d = home() / "cache" / "sessions"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _file_key(path: Path) -> str:
    """Cheap identity of a model file (path, size, mtime): hashing GBs per session would be slow."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _patch_key(patch: Patch) -> str:
    digest = patch_digest(patch)
    return digest.split(":")[-1][:16]


def folded_model(model_path: str | os.PathLike, patch: Patch, *, precision: str = "keep",
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF ``model_path`` with ``patch`` folded in (made once, then cached)."""
    from nestpatch.converters.gguf_fold import fold_gguf

    model_path = Path(model_path)
    out = Path(cache_dir or derived_cache_dir()) / f"{model_path.stem}.{_file_key(model_path)}.{_patch_key(patch)}.{precision}.gguf"
    if not out.exists():
        log.info("folding the patch into %s -> %s", model_path, out)
        # a bar only on a terminal: in a log file (tune, select, CI) it is a stream of carriage returns
        fold_gguf(model_path, patch, out, precision=precision, progress=sys.stderr.isatty())
    return out


def lora_adapter(patch: Patch, base: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The patch exported as a llama.cpp LoRA adapter GGUF (made once, then cached)."""
    from nestpatch.converters.lora_export import export_gguf_lora

    key = _file_key(Path(base)) if base is not None else "nobase"
    out = Path(cache_dir or derived_cache_dir()) / f"lora.{key}.{_patch_key(patch)}.gguf"
    if not out.exists():  # the export checks the patch against ``base``; a cached file was checked
        log.info("exporting the patch as a LoRA adapter -> %s", out)
        export_gguf_lora(patch, out, base=base)
    return out


# ------------------------------------------------------------------------------------- the session


class PromptFormatting:
    """Prompt text from a user prompt or a conversation, shared by the llama.cpp and torch sessions.

    A session gives ``chat_template`` and ``_apply_template``; without a template the
    messages are joined as plain text.
    """

    chat_template: str | None

    def _apply_template(self, template: str, messages: Messages, add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def format_messages(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation: the model's chat template, or plain text without one."""
        tmpl = self.chat_template
        if not tmpl:
            return "\n\n".join(m["content"] for m in messages) + ("\n\n" if add_generation_prompt else "")
        return self._apply_template(tmpl, messages, add_generation_prompt)

    def format_prompt(self, prompt: str, system: str | None = None) -> str:
        msgs: Messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.format_messages(msgs)

    def prompt_text(self, prompt: str | Messages, *, system: str | None = None, raw: bool = False) -> str:
        """What :meth:`generate` feeds the model: ``prompt`` itself if ``raw``, else the formatted prompt."""
        if raw:
            assert isinstance(prompt, str)
            return prompt
        return self.format_prompt(prompt, system) if isinstance(prompt, str) else self.format_messages(prompt)


@dataclass
class LlamaSession(PromptFormatting):
    """A llama.cpp model, optionally patched (folded or LoRA-live), with greedy chat generation.

    Args:
        model_path: the GGUF to load: a base model (then ``patch`` may be given), or a file
            already folded by ``nestpatch apply``.
        patch: a patch to run with, made for ``model_path``; checked against the model's
            fingerprint (a fold always checks; ``verify_base=False`` skips it for LoRA only).
        patch_mode: ``"fold"`` (fold into a cached copy of the model and load that) or ``"lora"``
            (load the base and the patch as a LoRA adapter, switchable in place).
        lora_path: a ready LoRA adapter GGUF (from ``nestpatch export-lora``) instead of a patch.
        n_threads: CPU threads; default: all cores (llama.cpp's default of 1 is 40% slower).
        n_ctx: context length (prompt + reply).
        logits_all: keep the logits of every position (needed by :meth:`logits`).
    """

    model_path: str | os.PathLike
    patch: Patch | None = None
    patch_mode: str = "fold"
    lora_path: str | os.PathLike | None = None
    n_threads: int | None = None
    n_ctx: int = 2048
    logits_all: bool = False
    verify_base: bool = True
    require_signature: Any = None
    precision: str = "keep"
    cache_dir: str | os.PathLike | None = None
    seed: int = 0
    n_gpu_layers: int = 0
    verbose: bool = False
    base_path: Path = field(init=False)
    loaded_path: Path = field(init=False)

    def __post_init__(self) -> None:
        from nestpatch.assets import resolve_model

        self.base_path = resolve_model(self.model_path)
        if not self.base_path.is_file():
            raise InputError(f"{self.base_path}: no such GGUF file")
        if self.patch_mode not in PATCH_MODES:
            raise InputError(f"patch mode {self.patch_mode!r} invalid, expected one of {PATCH_MODES}")
        if self.patch is not None and self.lora_path is not None:
            raise InputError("give either a patch or a LoRA adapter, not both")
        self.n_threads = self.n_threads or os.cpu_count() or 1
        self.loaded_path = self.base_path
        lora = Path(self.lora_path) if self.lora_path is not None else None
        if self.patch is not None:
            if self.require_signature is not None:
                from nestpatch.runtime.attach import verify_signature

                verify_signature(self.patch, self.require_signature)
            # No separate fingerprint check: the fold and the LoRA export both check the patch
            # against this model before writing anything (and cache per model file and patch).
            if self.patch_mode == "fold":
                self.loaded_path = folded_model(self.base_path, self.patch, precision=self.precision, cache_dir=self.cache_dir)
            else:
                lora = lora_adapter(self.patch, self.base_path if self.verify_base else None, cache_dir=self.cache_dir)
        if lora is not None and not lora.is_file():
            raise InputError(f"{lora}: no such LoRA adapter file")
        self.lora_file = lora
        self._llm = _load_llama(self.loaded_path, lora=lora, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                logits_all=self.logits_all, seed=self.seed, n_gpu_layers=self.n_gpu_layers,
                                verbose=self.verbose)
        self._adapter_on = lora is not None
        self._vocab = _llama_cpp().llama_model_get_vocab(self._llm.model)
        self._n_vocab = int(self._llm.n_vocab())
        self._bos_auto = self._llm.tokenize(b"", add_bos=True, special=True)  # [bos] if the vocab adds one

    # ---------------------------------------------------------------- properties

    @property
    def llama(self) -> Any:
        """The underlying ``llama_cpp.Llama``."""
        return self._llm

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._llm.metadata)

    @property
    def chat_template(self) -> str | None:
        return self._llm.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)

    @property
    def has_patch(self) -> bool:
        return self.patch is not None or self.lora_file is not None

    @property
    def patch_enabled(self) -> bool:
        """Whether generation currently runs with the patch (always True for a fold)."""
        return self._adapter_on if self.lora_file is not None else self.patch is not None

    def set_patch_enabled(self, on: bool) -> None:
        """Switch the LoRA adapter on or off in place (LoRA mode only)."""
        if self.lora_file is None:
            raise UnsupportedError("only a LoRA-live session can switch its patch off in place; open a base session instead")
        if on == self._adapter_on:
            return
        lc = _llama_cpp()
        adapter = getattr(self._llm, "_lora_adapter", None)
        if on:
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            rc = lc.llama_set_adapters_lora(self._llm.ctx, arr, 1, scales)
        else:
            rc = lc.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
        if rc:
            raise UnsupportedError(f"llama.cpp refused to {'set' if on else 'remove'} the LoRA adapter (code {rc})")
        self._adapter_on = on
        self._llm.reset()  # cached KV entries were computed with the other weights

    def info(self) -> dict[str, Any]:
        """What this session runs, for result files."""
        return {
            "backend": "llama.cpp",
            "llama_cpp_python": _llama_cpp().__version__,
            "model": str(self.base_path),
            "loaded": str(self.loaded_path),
            "lora": str(self.lora_file) if self.lora_file else None,
            "lora_sha256": file_digest(self.lora_file) if self.lora_file else None,
            "patch_mode": self.patch_mode if self.has_patch else None,
            "n_threads": self.n_threads,
            "n_ctx": self.n_ctx,
        }

    # ---------------------------------------------------------------- prompts

    def _apply_template(self, template: str, messages: Messages, add_generation_prompt: bool) -> str:
        bos = self._piece(self._llm.token_bos())
        eos = self._piece(self._llm.token_eos())
        return render_chat_template(template, messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a formatted prompt: special tokens parsed, BOS added once if the vocab wants one."""
        if self._bos_auto:
            bos_text = self._piece(self._bos_auto[0])
            if bos_text and text.startswith(bos_text):
                text = text[len(bos_text):]  # the template wrote it; the tokenizer adds it
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def tokenize_plain(self, text: str) -> list[int]:
        """Tokens of a bare piece of text: no BOS, special tokens not parsed (e.g. an answer word)."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _piece(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self._llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- generation

    def generate(self, prompt: str | Messages, *, max_new_tokens: int = 256, system: str | None = None,
                 raw: bool = False, on_text: Callable[[str], None] | None = None) -> Generation:
        """Greedy reply to ``prompt`` (a user message, a conversation, or raw text if ``raw``).

        Args:
            on_text: called with each new piece of text as it is decoded (streaming).
        """
        text = self.prompt_text(prompt, system=system, raw=raw)
        tokens = self.tokenize(text)
        gen = self.generate_tokens(tokens, max_new_tokens=max_new_tokens, on_text=on_text)
        gen.prompt_text = text
        return gen

    def generate_tokens(self, tokens: Sequence[int], *, max_new_tokens: int = 256,
                        on_text: Callable[[str], None] | None = None) -> Generation:
        """Greedy continuation of ``tokens`` until an end-of-generation token or ``max_new_tokens``."""
        lc = _llama_cpp()
        if len(tokens) + max_new_tokens > self.n_ctx:
            raise InputError(f"prompt of {len(tokens)} tokens + {max_new_tokens} new tokens exceeds the context of {self.n_ctx} tokens")
        t0 = time.perf_counter()
        llm = self._llm
        llm.reset()
        llm.eval(list(tokens))
        out: list[int] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        finish = "length"
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self._last_logits()))
            if lc.llama_vocab_is_eog(self._vocab, tok):
                finish = "stop"
                break
            out.append(tok)
            piece = decoder.decode(llm.detokenize([tok], special=False))
            if piece:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
            if len(out) < max_new_tokens:
                llm.eval([tok])
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_text is not None:
                on_text(tail)
        return Generation(text="".join(pieces), tokens=out, n_prompt_tokens=len(tokens),
                          seconds=time.perf_counter() - t0, finish=finish)

    def _last_logits(self) -> np.ndarray:
        ptr = _llama_cpp().llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))  # (V,)

    def next_token_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of the token after ``tokens``, float32 ``(V,)``: one forward pass, nothing generated."""
        if len(tokens) + 1 > self.n_ctx:
            raise InputError(f"{len(tokens)} tokens exceed the context of {self.n_ctx} tokens")
        self._llm.reset()
        self._llm.eval(list(tokens))
        return np.array(self._last_logits(), dtype=np.float32)  # a copy: the buffer is reused

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of ``tokens``, float32 ``(n, V)`` (needs ``logits_all=True``)."""
        if not self.logits_all:
            raise UnsupportedError("open the session with logits_all=True to read logits of every position")
        if len(tokens) > self.n_ctx:
            raise InputError(f"{len(tokens)} tokens exceed the context of {self.n_ctx} tokens")
        self._llm.reset()
        self._llm.eval(list(tokens))
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)  # (n, V), a copy

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

    def __enter__(self) -> "LlamaSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_session(model_path: str | os.PathLike, patch: Patch | None = None, *, mode: str = "fold", **kwargs: Any) -> LlamaSession:
    """Open ``model_path`` in llama.cpp with ``patch`` folded (``mode="fold"``) or live as LoRA."""
    return LlamaSession(model_path, patch=patch, patch_mode=mode, **kwargs)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedError("the llama.cpp backend needs llama-cpp-python (pip install 'nestpatch[llama]')") from None
    return llama_cpp


def _load_llama(path: Path, *, lora: Path | None, n_ctx: int, n_threads: int, logits_all: bool, seed: int,
                n_gpu_layers: int, verbose: bool) -> Any:
    """``llama_cpp.Llama`` or a one-line :class:`NestpatchError` naming the file."""
    lc = _llama_cpp()
    kwargs: dict[str, Any] = dict(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                  logits_all=logits_all, seed=seed, n_gpu_layers=n_gpu_layers, verbose=verbose)
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    try:
        return lc.Llama(**kwargs)
    except (ValueError, RuntimeError) as e:
        what = f"LoRA adapter {lora}" if lora is not None and "LoRA" in str(e) else str(path)
        raise UnsupportedError(f"{what}: llama.cpp cannot load it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


__all__ = ["LlamaSession", "Generation", "open_session", "render_chat_template", "check_gguf_base",
           "folded_model", "lora_adapter"]
