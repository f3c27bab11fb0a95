"""Restore the original GGUF, byte for byte, from a file folded by :mod:`converters.gguf_fold`.

The folded file keeps the original KV entries verbatim (the fold appended its ``nestpatch.*``
entries after them) and carries a revert payload after its tensor data (see gguf_fold's module
docstring for why there). Revert rebuilds: original header = the first ``kv_count`` KV entries
+ the original tensor infos and padding from the payload; data = each tensor from the folded
file with its touched blocks put back, or whole from the payload where its type changed; then
the original bytes after the data. The result is checked against ``nestpatch.source_sha256``
before it is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from nestpatch.atomic import atomic_path
from nestpatch.errors import FormatError, InputError

from . import gguf_codecs as codecs
from .gguf_io import CHUNK_BYTES, copy_range, pread_exact, pwrite_all, sha256_fd
from nestpatch.models.gguf_layout import GGUFLayout, TensorInfo, align, header_prefix, parse_layout, parse_tensor_infos
from .provenance import FoldKey

log = logging.getLogger(__name__)

REVERT_VERSION = 1


def _record(layout: GGUFLayout, label: str) -> dict:
    raw = layout.kv(FoldKey.REVERT)
    if not isinstance(raw, str):
        raise InputError(f"{label}: no {FoldKey.REVERT} entry: not a GGUF folded by nestpatch (nothing to revert)")
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError(f"{label}: {FoldKey.REVERT} is not valid JSON") from None
    if rec.get("version") != REVERT_VERSION:
        raise FormatError(f"{label}: revert record version {rec.get('version')!r} not supported (expected {REVERT_VERSION})")
    n_kv = int(rec["kv_count"])
    added = layout.kvs[n_kv:]
    if n_kv > len(layout.kvs) or not added or not all(e.key.startswith("nestpatch.") for e in added):
        raise FormatError(f"{label}: KV entries were changed after the fold ({len(layout.kvs)} entries, "
                          f"expected {n_kv} original ones followed by nestpatch.* ones)")
    return rec


def _slice(fd: int, at: int, span: list[int]) -> bytes:
    off, n = span
    return pread_exact(fd, n, at + off) if n else b""


def revert_gguf(patched_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the original model the folded ``patched_path`` was made from to ``out_path``, atomically.

    Raises:
        InputError: the file carries no nestpatch revert record.
        FormatError: the revert payload is missing, truncated or altered, or the result does not
            match the recorded sha256 of the original (no output is written then).
    """
    patched_path, out_path = Path(patched_path), Path(out_path)
    label = str(patched_path)
    layout = parse_layout(patched_path)
    rec = _record(layout, label)
    n_kv = int(rec["kv_count"])
    payload_at = align(layout.data_end, layout.alignment)
    psize = int(rec["payload_size"])
    if layout.file_size < payload_at + psize:
        raise FormatError(f"{label}: revert payload missing or truncated: expected {psize} bytes at {payload_at}, "
                          f"the file has {layout.file_size} (was it rewritten by another tool?)")
    src = os.open(patched_path, os.O_RDONLY)
    try:
        h = hashlib.sha256()
        for k in range(0, psize, CHUNK_BYTES):
            h.update(pread_exact(src, min(CHUNK_BYTES, psize - k), payload_at + k))
        if h.hexdigest() != rec["payload_sha256"]:
            raise FormatError(f"{label}: revert payload sha256 {h.hexdigest()} does not match the recorded {rec['payload_sha256']}")
        _restore(src, layout, rec, n_kv, payload_at, out_path, label)
    finally:
        os.close(src)
    return out_path


def _restore(src: int, layout: GGUFLayout, rec: dict, n_kv: int, payload_at: int, out_path: Path, label: str) -> None:
    infos_raw = _slice(src, payload_at, rec["infos"])
    orig_infos = parse_tensor_infos(infos_raw, len(layout.tensors), layout.path)
    kv_end = layout.kvs[n_kv].start  # first appended entry
    header = (header_prefix(layout.version, len(layout.tensors), n_kv)
              + pread_exact(src, kv_end - layout.kv_start, layout.kv_start)
              + infos_raw + _slice(src, payload_at, rec["pad"]))
    data0 = len(header)
    if data0 % layout.alignment:
        raise FormatError(f"{label}: revert record is inconsistent (original data would start at {data0})")
    touched = {t["name"]: t for t in rec["tensors"]}
    size = int(rec["source_size"])
    data_end = data0 + max((t.offset + t.nbytes for t in orig_infos), default=0)
    expected_sha = layout.kv(FoldKey.SOURCE_SHA256)

    with atomic_path(out_path) as tmp:
        dst = os.open(tmp, os.O_RDWR)  # mkstemp made it empty
        try:
            os.ftruncate(dst, size)
            pwrite_all(dst, header, 0)
            for orig in sorted(orig_infos, key=lambda t: t.offset):
                folded = layout.tensor(orig.name)
                if folded is None:
                    raise FormatError(f"{label}: tensor {orig.name} of the original is missing from the folded file")
                entry = touched.get(orig.name)
                if entry is not None and entry["mode"] == "whole":
                    off, n = entry["payload"]
                    copy_range(src, dst, n, payload_at + off, data0 + orig.offset)
                    continue
                if folded.nbytes != orig.nbytes:
                    raise FormatError(f"{label}: tensor {orig.name} changed size without a revert record")
                copy_range(src, dst, orig.nbytes, layout.data_start + folded.offset, data0 + orig.offset)
                if entry is not None:
                    _put_blocks(src, dst, orig, entry, payload_at, data0)
            tail = rec["tail"]
            if tail[1]:
                copy_range(src, dst, tail[1], payload_at + tail[0], data_end)
            for rel, off, n in rec["gaps"]:
                copy_range(src, dst, n, payload_at + off, data0 + rel)
            if isinstance(expected_sha, str):
                got = sha256_fd(dst, size)
                if got != expected_sha:
                    raise FormatError(f"{label}: reverted file has sha256 {got}, the original had {expected_sha}")
            else:
                log.warning("%s: no %s recorded; reverted file not verified", label, FoldKey.SOURCE_SHA256)
        finally:
            os.close(dst)


def _put_blocks(src: int, dst: int, info: TensorInfo, entry: dict, payload_at: int, data0: int) -> None:
    """Write the original bytes of a tensor's touched blocks back over the copied tensor."""
    ts, bs = codecs.type_size(info.qtype), codecs.block_size(info.qtype)
    nb_row, rb = info.row_len // bs, info.row_bytes
    blocks = np.arange(nb_row) if entry["blocks"] is None else np.asarray(entry["blocks"], dtype=np.int64)
    rows = np.arange(info.n_rows) if entry["rows"] is None else np.asarray(entry["rows"], dtype=np.int64)
    off, n = entry["payload"]
    raw = np.frombuffer(pread_exact(src, n, payload_at + off), dtype=np.uint8)
    raw = raw.reshape(rows.shape[0], blocks.shape[0], ts)
    base = data0 + info.offset
    if blocks.shape[0] == nb_row:  # whole rows
        for i, r in enumerate(rows):
            pwrite_all(dst, raw[i].tobytes(), base + int(r) * rb)
        return
    step = max(1, CHUNK_BYTES // rb)
    for i0 in range(0, rows.shape[0], step):  # all rows, some blocks: read-modify-write chunks
        r = rows[i0:i0 + step]
        r0, r1 = int(r[0]), int(r[-1]) + 1
        chunk = np.frombuffer(pread_exact(dst, (r1 - r0) * rb, base + r0 * rb), dtype=np.uint8)
        chunk = chunk.reshape(r1 - r0, nb_row, ts).copy()
        chunk[np.ix_(r - r0, blocks)] = raw[i0:i0 + step]
        pwrite_all(dst, chunk, base + r0 * rb)
