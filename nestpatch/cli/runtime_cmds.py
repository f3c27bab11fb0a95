"""``nestpatch chat``: talk to a model with and without a patch (llama.cpp or transformers).

Interactive on a terminal; without one (a pipe or a file on stdin) it reads one prompt per
line, answers each, and exits at the end of input: no prompt ever waits for a human.
"""

from __future__ import annotations

import sys

import click

from ..runtime.chat import HELP, Chat, ChatIO, open_chat, run_session
from .options import model_argument


@click.command("chat")
@model_argument()
@click.option("--patch", "patch", type=click.Path(dir_okay=False), help="A .nestpatch to run with (checked against MODEL).")
@click.option("--backend", type=click.Choice(["auto", "llama", "torch"]), default="auto", show_default=True,
              help="auto: llama.cpp for a .gguf, transformers otherwise.")
@click.option("--patch-mode", type=click.Choice(["lora", "fold"]), default="lora", show_default=True,
              help="llama.cpp: run the patch as a LoRA adapter (switched in place) or fold it into a cached copy.")
@click.option("--system", default=None, help="System prompt (default: the chat template's own).")
@click.option("--max-new-tokens", type=click.IntRange(1, 8192), default=256, show_default=True)
@click.option("--history/--no-history", default=None,
              help="Keep the conversation (default: on a terminal yes; with piped input every line is a fresh prompt).")
@click.option("--threads", type=click.IntRange(1), default=None, help="llama.cpp threads (default: all cores).")
@click.option("--ctx", "n_ctx", type=click.IntRange(256), default=2048, show_default=True, help="llama.cpp context length.")
@click.option("--device", default="auto", show_default=True, help="torch: auto|cpu|cuda|mps.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--require-signature", "pubkey", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Refuse a patch not signed with this public key.")
@click.option("--no-verify", "--skip-base-check", "no_verify", is_flag=True,
              help="Skip the base-model fingerprint check (not recommended; needed for a patch without fingerprints).")
def chat_cmd(model: str, patch: str | None, backend: str, patch_mode: str, system: str | None, max_new_tokens: int,
             history: bool | None, threads: int | None, n_ctx: int, device: str, dtype: str, pubkey: str | None,
             no_verify: bool) -> None:
    """Chat with MODEL (a .gguf, an HF directory, or smollm2); /patch on|off compares answers."""
    tty = sys.stdin.isatty()
    engine = open_chat(model, patch, backend=backend, patch_mode=patch_mode, n_threads=threads, n_ctx=n_ctx, device=device,
                       dtype=dtype, verify_base=not no_verify, require_signature=pubkey)
    try:
        chat = Chat(engine, system=system, max_new_tokens=max_new_tokens, history=tty if history is None else history)
        if tty:
            click.echo(f"# {engine.backend} backend, {'patch on' if engine.has_patch else 'no patch'}. {HELP}", err=True)
        run_session(chat, ChatIO(read=_prompt if tty else _readline, write=_write,
                                 note=lambda line: click.echo(line, err=tty), interactive=tty))
    finally:
        engine.close()


def _prompt(label: str) -> str | None:
    try:
        return click.prompt(label, prompt_suffix="> ", default="", show_default=False)
    except (EOFError, click.exceptions.Abort):
        click.echo("", err=True)
        return None


def _readline(label: str) -> str | None:
    raw = sys.stdin.readline()
    return None if raw == "" else raw.rstrip("\n")


def _write(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


def register(group: click.Group) -> None:
    group.add_command(chat_cmd)
