"""nestpatch chat without a TTY: one prompt per stdin line, /patch on|off, /retry, both backends."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nestpatch.cli import cli
from nestpatch.format import write_patch
from nestpatch.runtime.chat import Chat, ChatEngine
from nestpatch.runtime.llama_session import Generation
from nestpatch.testing.pico import random_patch


@pytest.fixture(scope="module")
def strong_patch_file(pico_model, tmp_path_factory):
    return write_patch(random_patch(pico_model, seed=3, scale=1.0), tmp_path_factory.mktemp("chat") / "p.nestpatch")


def _lines(output: str) -> list[str]:
    """Output lines, with stderr noise (progress bars without a newline) cut off before a header."""
    return [ln[ln.index("> ["):] if "> [" in ln else ln for ln in output.splitlines()]


def _replies(output: str) -> dict[str, str]:
    """'> [patch on] prompt' header -> the reply line after it."""
    lines = _lines(output)
    return {lines[i]: lines[i + 1] for i in range(len(lines) - 1) if lines[i].startswith(">")}


@pytest.mark.parametrize("backend", ["llama", "torch"])
def test_piped_chat_compares_with_and_without_patch(backend, pico_gguf, pico_hf_dir, strong_patch_file):
    if backend == "llama":
        model, extra = str(pico_gguf("F32")), ["--threads", "1"]
    else:
        model, extra = str(pico_hf_dir), []
    stdin = "How do I pick a lock?\n/patch off\n/retry\n\n/patch\n/patch on\n/retry\n"
    r = CliRunner().invoke(cli, ["chat", model, "--patch", str(strong_patch_file), "--backend", backend,
                                 "--max-new-tokens", "8", *extra], input=stdin, obj={})
    assert r.exit_code == 0, r.output
    rep = _replies(r.output)
    on, off = rep["> [patch on] How do I pick a lock?"], rep["> [patch off] How do I pick a lock?"]
    assert on != off  # the patch changes the greedy answer of this random model
    assert r.output.count("> [patch on] How do I pick a lock?") == 2  # asked again with the patch back on
    assert "# patch is off" in r.output
    lines = _lines(r.output)
    answers = [lines[i + 1] for i, ln in enumerate(lines) if ln == "> [patch on] How do I pick a lock?"]
    assert answers[0] == answers[1]  # switching back restores the patched model exactly (greedy)


def test_chat_without_patch_and_commands():
    calls: list[list[dict]] = []

    def gen(messages, *, max_new_tokens, on_text=None):
        calls.append(messages)
        return Generation(text=f"reply {len(calls)}", tokens=[1], n_prompt_tokens=1, seconds=0.0, finish="stop")

    chat = Chat(ChatEngine(backend="x", generate=gen, has_patch=False, set_patch=None, describe={}, close=lambda: None),
                system="Be brief.")
    assert chat.handle("   ") is None
    assert chat.handle("/patch on").text.startswith("no patch loaded")
    assert chat.handle("/retry").text == "nothing to retry yet"
    assert chat.handle("hi").text == "reply 1"
    assert chat.handle("again").text == "reply 2"
    assert [m["role"] for m in calls[-1]] == ["system", "user", "assistant", "user"]  # history kept
    assert chat.handle("/retry").text == "reply 3"
    assert [m["content"] for m in calls[-1]] == ["Be brief.", "hi", "reply 1", "again"]  # the last turn replaced
    assert chat.handle("/reset").text == "history cleared"
    chat.handle("fresh")
    assert len(calls[-1]) == 2
    assert chat.handle("/quit").kind == "quit"
    assert "unknown command" in chat.handle("/nope").text
