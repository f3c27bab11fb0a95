"""A small chat over either backend, with the patch switchable mid-conversation.

Library half of ``nestpatch chat``: it keeps the conversation and interprets commands; the CLI
reads lines and prints. Switching the patch clears the history (so the next answer is not
conditioned on the other model's answers) and ``/retry`` asks the last prompt again, which is
how one compares answers with and without the patch on the same prompt.

Commands: ``/patch on|off`` (or ``/patch`` to show the state), ``/retry``, ``/reset``,
``/help``, ``/quit``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nestpatch.errors import InputError, UnsupportedError
from nestpatch.format.patch import Patch
from nestpatch.models.files import is_gguf

from .llama_session import Generation, LlamaSession, Messages

log = logging.getLogger(__name__)

HELP = ("commands: /patch on|off (switch the patch; clears history), /patch (show state), "
        "/retry (ask the last prompt again), /reset (clear history), /help, /quit")


class ChatEngine:
    """A model to chat with, optionally patched, with the patch switchable in place.

    Build with :func:`open_chat`. llama.cpp: a LoRA-live session switches its adapter; a fold
    keeps two sessions (the base opened on first ``/patch off``). torch: attach/detach.
    """

    def __init__(self, *, backend: str, generate: Callable[..., Generation], has_patch: bool,
                 set_patch: Callable[[bool], None] | None, describe: dict[str, Any], close: Callable[[], None]) -> None:
        self.backend = backend
        self._generate = generate
        self.has_patch = has_patch
        self._set_patch = set_patch
        self.patch_on = has_patch
        self.describe = describe
        self._close = close

    def set_patch(self, on: bool) -> None:
        if not self.has_patch:
            raise InputError("no patch loaded (start with --patch P)")
        if on != self.patch_on:
            assert self._set_patch is not None
            self._set_patch(on)
            self.patch_on = on

    def generate(self, messages: Messages, *, max_new_tokens: int, on_text: Callable[[str], None] | None = None) -> Generation:
        return self._generate(messages, max_new_tokens=max_new_tokens, on_text=on_text)

    def close(self) -> None:
        self._close()


def _llama_engine(path: Path, patch: Patch | None, *, patch_mode: str, n_threads: int | None, n_ctx: int,
                  verify_base: bool, require_signature: Any) -> ChatEngine:
    if patch is None or patch_mode == "lora":
        sess = LlamaSession(path, patch=patch, patch_mode="lora", n_threads=n_threads, n_ctx=n_ctx,
                            verify_base=verify_base, require_signature=require_signature)
        return ChatEngine(backend="llama", generate=sess.generate, has_patch=patch is not None,
                          set_patch=sess.set_patch_enabled if patch is not None else None,
                          describe=sess.info(), close=sess.close)
    patched = LlamaSession(path, patch=patch, patch_mode="fold", n_threads=n_threads, n_ctx=n_ctx,
                           verify_base=verify_base, require_signature=require_signature)
    state: dict[str, Any] = {"on": True, "base": None}

    def set_patch(on: bool) -> None:
        if not on and state["base"] is None:
            state["base"] = LlamaSession(path, n_threads=n_threads, n_ctx=n_ctx)
        state["on"] = on

    def generate(messages: Messages, **kw: Any) -> Generation:
        return (patched if state["on"] else state["base"]).generate(messages, **kw)

    def close() -> None:
        patched.close()
        if state["base"] is not None:
            state["base"].close()

    return ChatEngine(backend="llama", generate=generate, has_patch=True, set_patch=set_patch, describe=patched.info(), close=close)


def _torch_engine(path: Path, patch: Patch | None, *, device: str, dtype: str, verify_base: bool,
                  require_signature: Any) -> ChatEngine:
    from nestpatch.models.loading import load_model

    from .torch_session import TorchSession

    loaded = load_model(path, device=device, dtype=dtype)
    sess = TorchSession(loaded.model, loaded.tokenizer, patch, verify_base=verify_base, require_signature=require_signature)
    p = next(loaded.model.parameters())
    return ChatEngine(backend="torch", generate=sess.generate, has_patch=patch is not None,
                      set_patch=sess.set_patch_enabled if patch is not None else None,
                      describe={"backend": "torch", "model": str(path), "device": str(p.device), "dtype": str(p.dtype)},
                      close=sess.close)


def open_chat(model: str | os.PathLike, patch: Patch | str | os.PathLike | None = None, *, backend: str = "auto",
              patch_mode: str = "lora", n_threads: int | None = None, n_ctx: int = 2048, device: str = "auto",
              dtype: str = "float32", verify_base: bool = True, require_signature: Any = None) -> ChatEngine:
    """Open ``model`` for chat on ``backend`` (``auto``: llama.cpp for a .gguf, else torch).

    Args:
        patch: a patch or its path; checked against the model's fingerprint.
        patch_mode: llama.cpp only: ``lora`` (adapter switched in place) or ``fold`` (a folded copy).
    """
    from nestpatch.assets import resolve_model
    from nestpatch.format import read_patch

    path = resolve_model(model)
    if not path.exists():
        raise InputError(f"{path}: no such model file or directory")
    if patch is not None and not isinstance(patch, Patch):
        if not Path(patch).is_file():
            raise InputError(f"{patch}: no such patch file")
        if require_signature is not None:  # on the file's exact bytes; not again below
            from .attach import verify_signature

            verify_signature(patch, require_signature)
            require_signature = None
        patch = read_patch(patch)
    if backend == "auto":
        backend = "llama" if is_gguf(path) else "torch"
    if backend in ("llama", "llama.cpp"):
        if not is_gguf(path):
            raise UnsupportedError(f"{path}: the llama backend needs a .gguf file (use --backend torch)")
        return _llama_engine(path, patch, patch_mode=patch_mode, n_threads=n_threads, n_ctx=n_ctx,
                             verify_base=verify_base, require_signature=require_signature)
    if backend == "torch":
        return _torch_engine(path, patch, device=device, dtype=dtype, verify_base=verify_base, require_signature=require_signature)
    raise InputError(f"backend {backend!r} unknown; expected llama or torch")


@dataclass
class ChatEvent:
    """What a line of input produced: a reply, an informational line, or the end."""

    kind: str  # "reply", "info", "quit"
    text: str
    generation: Generation | None = None
    patch_on: bool | None = None


@dataclass
class Chat:
    """Conversation state and command handling over a :class:`ChatEngine`.

    Args:
        history: keep the conversation (multi-turn); False answers every prompt fresh.
    """

    engine: ChatEngine
    system: str | None = None
    max_new_tokens: int = 256
    history: bool = True
    messages: Messages = field(default_factory=list)
    last_prompt: str | None = None

    def _ask(self, prompt: str, on_text: Callable[[str], None] | None) -> ChatEvent:
        base: Messages = [{"role": "system", "content": self.system}] if self.system else []
        convo = (self.messages if self.history else []) + [{"role": "user", "content": prompt}]
        gen = self.engine.generate(base + convo, max_new_tokens=self.max_new_tokens, on_text=on_text)
        if self.history:
            self.messages = convo + [{"role": "assistant", "content": gen.text}]
        self.last_prompt = prompt
        return ChatEvent("reply", gen.text, gen, self.engine.patch_on)

    def handle(self, line: str, on_text: Callable[[str], None] | None = None) -> ChatEvent | None:
        """Interpret one input line: a command or a prompt (None for a blank line)."""
        text = line.strip()
        if not text:
            return None
        if not text.startswith("/"):
            return self._ask(text, on_text)
        cmd, _, arg = text[1:].partition(" ")
        cmd, arg = cmd.lower(), arg.strip().lower()
        if cmd in ("quit", "exit", "q"):
            return ChatEvent("quit", "bye")
        if cmd == "help":
            return ChatEvent("info", HELP)
        if cmd == "reset":
            self.messages = []
            return ChatEvent("info", "history cleared")
        if cmd == "retry":
            if self.last_prompt is None:
                return ChatEvent("info", "nothing to retry yet")
            if self.history and len(self.messages) >= 2 and self.messages[-2]["content"] == self.last_prompt:
                self.messages = self.messages[:-2]
            return self._ask(self.last_prompt, on_text)
        if cmd == "patch":
            if not self.engine.has_patch:
                return ChatEvent("info", "no patch loaded (start with --patch P)")
            if arg in ("", "status"):
                return ChatEvent("info", f"patch is {'on' if self.engine.patch_on else 'off'}", patch_on=self.engine.patch_on)
            if arg not in ("on", "off"):
                return ChatEvent("info", "usage: /patch on|off")
            self.engine.set_patch(arg == "on")
            self.messages = []
            return ChatEvent("info", f"patch {arg}; history cleared (/retry asks the last prompt again)", patch_on=self.engine.patch_on)
        return ChatEvent("info", f"unknown command /{cmd}; {HELP}")


@dataclass
class ChatIO:
    """The terminal side of a session, supplied by the CLI (this module never prints).

    Args:
        read: ``read(label)`` returns the next input line, or None at the end of input.
        write: reply text and piped-input headers (stdout), written as given (no newline added).
        note: an informational line (``# ...``).
        interactive: a person types (prompts shown); else one prompt per input line, each
            reply preceded by a ``> [patch on] prompt`` header so a transcript reads on its own.
    """

    read: Callable[[str], str | None]
    write: Callable[[str], None]
    note: Callable[[str], None]
    interactive: bool


def run_session(chat: Chat, io: ChatIO) -> None:
    """Read lines until the end of input or ``/quit``, answering prompts and commands through ``io``."""
    engine = chat.engine
    header: list[str] = []  # piped input: the header waits until the reply's first piece streams

    def stream(piece: str) -> None:
        if header:
            io.write(header.pop() + "\n")
        io.write(piece)

    def tag() -> str:
        return "" if not engine.has_patch else (" [patch on]" if engine.patch_on else " [patch off]")

    while True:
        line = io.read(f"you{tag()}" if io.interactive else "")
        if line is None:
            break
        if not io.interactive:
            cmd = line.strip().lower()
            if cmd and not cmd.startswith("/"):
                header[:] = [f">{tag()} {line.strip()}"]
            elif cmd == "/retry" and chat.last_prompt is not None:
                header[:] = [f">{tag()} {chat.last_prompt}"]
        event = chat.handle(line, on_text=stream)
        if header and event is not None and event.kind == "reply":
            io.write(header.pop() + "\n")  # an empty reply streamed nothing
        if event is None:
            continue
        if event.kind == "quit":
            break
        if event.kind == "info":
            io.note(f"# {event.text}")
            continue
        header.clear()
        io.write("" if event.text.endswith("\n") else "\n")
        if not io.interactive:
            io.write("\n")
