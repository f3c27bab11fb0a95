"""Per-sample JSONL files of a run directory: append as samples finish, read back on resume.

Why JSONL appended sample by sample (and not one atomic file at the end): a run interrupted
half-way must keep every finished sample. A crash can cut the last line short; reading
drops such a line (and truncates the file to its last complete line before appending), any
other bad line is an error.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError

log = logging.getLogger(__name__)


def read_records(path: Path, *, repair: bool = False) -> list[dict]:
    """Records of a JSONL file (``[]`` if it does not exist).

    Args:
        repair: truncate a cut-off last line away (before appending to the file).
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    out: list[dict] = []
    pos = 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        end = pos + len(line) + 1
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                last = i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1:])
                if not last:
                    raise InputError(f"{path}: line {i + 1} is not valid JSON (the file was edited or corrupted)") from None
                log.warning("%s: dropping a cut-off last line (an interrupted run)", path)
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(pos)
                break
            if not isinstance(rec, dict):
                raise InputError(f"{path}: line {i + 1} is not a JSON object")
            out.append(rec)
        pos = end
    if repair and path.stat().st_size:
        with open(path, "r+b") as f:  # a complete last record written without its newline
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return out


class RecordWriter:
    """Appends one JSON object per line, flushed and fsynced per batch."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self._f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
