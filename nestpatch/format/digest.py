"""Content digest and canonical metadata (what signatures and `verify` rely on).

content digest = sha256 over, for each tensor in sorted name order:
``name UTF-8 || 0x00 || dtype || 0x00 || shape as JSON || 0x00 || 8-byte LE length || raw bytes``.
It covers every tensor byte but no metadata, so editing the evaluation summary keeps it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Iterable

DIGEST_PREFIX = "sha256:"


def content_digest(items: Iterable[tuple[str, str, tuple[int, ...], bytes | memoryview]]) -> str:
    """Digest of ``(name, dtype, shape, raw_bytes)`` items (any order; sorted here)."""
    h = hashlib.sha256()
    for name, dtype, shape, raw in sorted(items, key=lambda it: it[0]):
        h.update(name.encode("utf-8") + b"\0" + dtype.encode("ascii") + b"\0")
        h.update(json.dumps(list(shape), separators=(",", ":")).encode("ascii") + b"\0")
        h.update(struct.pack("<Q", len(raw)))
        h.update(raw)
    return DIGEST_PREFIX + h.hexdigest()


def canonical_json(doc: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII only. Used for signing."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
