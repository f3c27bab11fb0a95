"""Everything the CLI prints goes through here: control characters escaped, so a path or a metadata
string (a policy description, a target name) can never rewrite or hide a line on the terminal.

Newlines the CLI itself puts between lines are kept; any other C0/C1 control character, DEL and
the Unicode bidirectional overrides are shown as ``\\xNN`` / ``\\uNNNN``.
"""

from __future__ import annotations

import re

import click

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(m: re.Match) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def _no_surrogates(text: str) -> str:
    # a non-UTF-8 file name arrives as lone surrogates; printing one would raise
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def escape(text: object) -> str:
    """``text`` with every control character escaped, newlines and tabs included."""
    return _CONTROL.sub(_escape_char, _no_surrogates(str(text))).replace("\n", "\\n").replace("\t", "\\t")


def escape_lines(text: str) -> str:
    """Escape each line of a multi-line rendering, keeping its line breaks."""
    return "\n".join(_CONTROL.sub(_escape_char, line).replace("\t", "\\t")
                     for line in _no_surrogates(str(text)).split("\n"))


def echo(text: object = "", *, err: bool = False, nl: bool = True) -> None:
    """``click.echo`` of a rendering the CLI built, its lines escaped."""
    click.echo(escape_lines(str(text)), err=err, nl=nl)


def error_line(message: object) -> str:
    """The one line a failed command prints: ``error: PATH: problem``, escaped."""
    return f"error: {escape(message)}"


def deep_escape(obj: object) -> object:
    """A copy of a JSON-like value with every string (keys too) passed through :func:`escape`.

    Applied to a result before a human rendering, so a newline inside a metadata string cannot
    fake a line of its own.
    """
    if isinstance(obj, str):
        return escape(obj)
    if isinstance(obj, dict):
        return {(escape(k) if isinstance(k, str) else k): deep_escape(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(deep_escape(v) for v in obj)
    return obj
