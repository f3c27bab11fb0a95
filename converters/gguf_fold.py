"""Fold a NeST patch into a GGUF file, streaming, re-encoding only the touched blocks; and revert.

What the output is:
    The input's header with its KV entries byte for byte, followed by the ``nestpatch.*``
    provenance entries (:class:`converters.provenance.FoldKey`); the tensor infos, unchanged
    except for a tensor whose type changed (``precision`` auto/q8_0/f16) and the offsets after
    it; the tensor data, untouched tensors copied byte for byte in the kernel; then, after the
    last tensor (at the next aligned offset), the **revert payload**.

Why the revert payload sits after the tensor data: the original bytes of everything the fold
touched must travel with the file so that ``revert_gguf`` restores the input byte for byte from
the folded file alone. A KV array would be read into RAM (and stringified) by llama.cpp at every
load; an extra tensor makes llama.cpp refuse the file ("wrong number of tensors"). Bytes past the
last tensor are never read by llama.cpp or gguf-py, cost no RAM, and are found through the
``nestpatch.revert`` KV entry (JSON: sizes, sha256 and the layout of the payload). A tool that
rewrites the GGUF drops the payload; revert then says so instead of guessing.

The payload holds: the original tensor-info bytes, the original padding before the data, the
bytes after the original data, any non-zero padding between tensors, the original bytes of
every touched block, and, for a tensor whose type changed, its whole original data.
``nestpatch.source_sha256`` (sha256 of the input, hashed on a second core while the fold
writes) lets revert prove the result.

Numbers: arithmetic in float32 on dequantized blocks; F32/F16/BF16 and the legacy quants
(gguf-py) and K-quants (libggml via ctypes) are re-encoded in place; any other type is decoded by
gguf-py and stored as Q8_0 (F16 where rows are not a multiple of 32). Retention per target
follows :mod:`converters.fold_report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFValueType

from nestpatch import __version__
from nestpatch.atomic import atomic_path
from nestpatch.errors import BaseMismatchError, FormatError, InputError, UnsupportedError
from nestpatch.fingerprint import check_base, check_description
from nestpatch.format.constants import AXIS_ROW, BaseKey, PolicyKey
from nestpatch.format.patch import Patch, Target
from nestpatch.format.validate import validate_patch
from nestpatch.models.files import describe_gguf
from nestpatch.models.naming import check_architecture, parse_hf_name
from nestpatch.provenance import patch_digest

from . import gguf_codecs as codecs
from .gguf_io import CHUNK_BYTES, BackgroundWriter, FileHasher, pread_exact, pwrite_all
from nestpatch.models.gguf_layout import GGUFLayout, TensorInfo, align, encode_kv, encode_tensor_info, header_prefix, parse_layout, tensor_nbytes
from .gguf_region import (
    Region, add_region_delta, apply_chunk_delta, decode_blocks, encode_blocks, iter_row_chunks, make_region, neuron_vectors,
    read_region, read_rows,
)
from .gguf_revert import REVERT_VERSION, revert_gguf
from .precision import PRECISIONS
from .provenance import FoldKey
from .fold_report import FoldReport, TargetFold, retention_stats

log = logging.getLogger(__name__)

QType = codecs.QType

__all__ = ["fold_gguf", "revert_gguf", "PRECISIONS"]

_Q8 = QType.Q8_0
_F16 = QType.F16


def _bits(t: QType) -> float:
    return codecs.type_size(t) * 8 / codecs.block_size(t)


def _upcast_type(t: QType, n: int) -> QType:
    """The type a tensor that cannot keep ``t`` is stored as: Q8_0, or F16 for rows not divisible by 32."""
    return _Q8 if n % 32 == 0 and _bits(t) < _bits(_Q8) else _F16


def candidate_types(t: QType, n: int, precision: str) -> list[QType]:
    """Types to try for a touched tensor of type ``t`` and row length ``n``, in order of preference.

    Never a downcast: an F32 tensor stays F32 under ``q8_0``; a Q8_0 tensor becomes F16 under ``f16``.
    """
    keep_ok = codecs.can_encode(t, n)
    if precision == "keep":
        return [t] if keep_ok else [_upcast_type(t, n)]
    if precision == "q8_0":
        if _bits(t) < _bits(_Q8):
            return [_Q8 if n % 32 == 0 else _F16]
        return [t] if keep_ok else [_F16]
    if precision == "f16":
        if _bits(t) < 16:
            return [_F16]
        return [t] if keep_ok else [_F16]
    out: list[QType] = []  # auto
    if keep_ok:
        out.append(t)
    if _bits(t) < _bits(_Q8) and n % 32 == 0:
        out.append(_Q8)
    if _bits(t) < 16:
        out.append(_F16)
    return list(dict.fromkeys(out)) or [t]


# ------------------------------------------------------------------------------------------ planning


def _description(layout: GGUFLayout, label: str) -> dict:
    desc = describe_gguf(layout, label)
    check_architecture(desc[BaseKey.ARCHITECTURE], label)
    return desc


def _locate(layout: GGUFLayout, t: Target, label: str) -> Region:
    ref = parse_hf_name(t.name)  # refuses fused / MoE names
    if ref.axis != t.axis:
        raise FormatError(f"{label}: patch target {t.name} has axis {t.axis}, expected {ref.axis}")
    gname = ref.gguf_name
    info = layout.tensor(gname)
    if info is None:
        fused = [x.name for x in layout.tensors if x.name.startswith(f"blk.{ref.layer}.ffn_")
                 and ("_exps" in x.name or "gate_up" in x.name or "_shexp" in x.name)]
        if fused:
            raise UnsupportedError(f"{label}: tensor {fused[0]}: fused gate_up or mixture-of-experts MLP tensors are not supported")
        raise BaseMismatchError(f"{label}: tensor {gname} (patch target {t.name}) is not in the file")
    if len(info.ne) != 2 or info.shape != tuple(t.shape):
        raise BaseMismatchError(f"{label}: tensor {gname}: shape {info.shape} in the file, the patch expects {tuple(t.shape)}")
    if not codecs.can_decode(info.qtype):
        raise UnsupportedError(f"{label}: tensor {gname} has type {info.qtype.name}, which nestpatch cannot decode")
    return make_region(t, info)


def _retention(reg: Region, realized: np.ndarray) -> tuple[float, float]:
    """:func:`converters.fold_report.retention_stats` of a region's realized change (consumed: modified).

    For a col-axis target the intended delta is zero outside the patched columns: the dot
    products need those columns only, and the rest of the region adds ``||realized||^2`` to the
    error. No dense delta and no float64 copy of the region is made.
    """
    nd = reg.target.neuron_deltas()  # (n, d)
    if reg.axis == AXIS_ROW:
        intended, at = nd, realized  # (n, d) both
        off_sq = 0.0
    else:
        pos = reg.col_positions()
        intended, at = np.ascontiguousarray(nd.T), realized[:, pos]  # (R, n) both
        realized[:, pos] = 0.0
        off_sq = _sq(realized)
    ii = _sq(intended)
    if ii == 0.0:
        return retention_stats(intended, at)
    i, r = intended.ravel(), np.ascontiguousarray(at).ravel()
    diff = r - i
    return float(np.dot(r, i)) / ii, float(np.sqrt(_sq(diff) + off_sq)) / float(np.sqrt(ii))


def _sq(a: np.ndarray) -> float:
    """Sum of squares in float32 BLAS (same numbers as retention_stats' float64 to ~1e-6, no copy)."""
    v = np.ascontiguousarray(a).ravel()
    return float(np.dot(v, v))


def _decide(reg: Region, precision: str, threshold: float, label: str) -> None:
    """Choose the output type of one region, encode it, and measure retention (float32 throughout)."""
    qt, bs = reg.info.qtype, reg.bs
    gname = reg.info.name
    base = decode_blocks(reg.raw, qt, bs)  # (R, B*bs)
    new = base.copy()
    changed = add_region_delta(reg, new)  # the patched values, (n, d) or (R, n)
    if not np.isfinite(changed).all():
        raise InputError(f"{label}: folding produces non-finite values in tensor {gname}")
    cands = candidate_types(qt, reg.info.row_len, precision)
    for i, ct in enumerate(cands):
        if ct == qt:
            enc = encode_blocks(new, ct, bs)  # (R, B, ts)
            realized = decode_blocks(enc, ct, bs)
            realized -= base
            new_raw: np.ndarray | None = enc
        else:
            realized = decode_blocks(encode_blocks(new, ct, bs), ct, bs)
            realized -= decode_blocks(encode_blocks(base, ct, bs), ct, bs)
            new_raw = None
        if not np.isfinite(realized).all():
            if i + 1 < len(cands):
                continue
            raise InputError(f"{label}: folding produces values out of range for {ct.name} in tensor {gname}")
        ret, err = _retention(reg, realized)
        if precision != "auto" or ret >= threshold or i + 1 == len(cands):
            reg.out_type, reg.new_raw, reg.retention, reg.rel_error = ct, new_raw, ret, err
            if ct != qt:
                log.info("%s: %s -> %s (retention %.3f)", gname, qt.name, ct.name, ret)
            return
        log.info("%s: retention %.3f as %s is below %.2f; trying %s", gname, ret, ct.name, threshold, cands[i + 1].name)


@dataclass
class _Slot:
    """One tensor of the output: where it comes from, where it goes, what type it has."""

    info: TensorInfo
    out_type: QType
    out_off: int
    region: Region | None

    @property
    def out_nbytes(self) -> int:
        return tensor_nbytes(self.info.ne, self.out_type)

    @property
    def retyped(self) -> bool:
        return self.out_type != self.info.qtype


def _is_packed(layout: GGUFLayout) -> bool:
    """Whether tensors sit back to back in info order, each padded to the alignment (as llama.cpp requires)."""
    off = 0
    for info in layout.tensors:
        if info.offset != off:
            return False
        off += align(info.nbytes, layout.alignment)
    return True


def _layout_slots(layout: GGUFLayout, regions: dict[str, Region]) -> list[_Slot]:
    """Output offsets, in data order. Unchanged while no tensor changes size.

    llama.cpp refuses a file whose tensors are not packed back to back in info order; a packed
    input gets packed output offsets. An input that is not packed keeps its gaps, shifted after
    a tensor that grew.
    """
    def out_type(info: TensorInfo) -> QType:
        reg = regions.get(info.name)
        return reg.out_type if reg is not None and reg.out_type is not None else info.qtype

    slots: list[_Slot] = []
    if _is_packed(layout):
        off = 0
        for info in layout.tensors:
            s = _Slot(info, out_type(info), off, regions.get(info.name))
            off += align(s.out_nbytes, layout.alignment)
            slots.append(s)
    else:
        shift, prev_end = 0, 0
        for info in sorted(layout.tensors, key=lambda t: t.offset):
            if info.offset < prev_end:
                raise FormatError(f"{layout.path}: tensor {info.name} overlaps the tensor before it")
            prev_end = info.offset + info.nbytes
            s = _Slot(info, out_type(info), info.offset + shift, regions.get(info.name))
            shift += align(s.out_nbytes - info.nbytes, layout.alignment)
            slots.append(s)
    for s in slots:
        if s.out_nbytes < s.info.nbytes:
            raise AssertionError(f"{s.info.name}: a fold never shrinks a tensor")
    return sorted(slots, key=lambda s: s.info.offset)


# ------------------------------------------------------------------------------------------ payload


@dataclass
class _Payload:
    """The revert payload: pieces in order, each bytes in memory or a span of the input file."""

    pieces: list[tuple[int, Any]]  # (length, bytes | (src_offset,))
    size: int = 0

    def add_bytes(self, b: bytes | memoryview) -> list[int]:
        off, n = self.size, memoryview(b).nbytes
        self.pieces.append((n, b))
        self.size += n
        return [off, n]

    def add_span(self, src_off: int, n: int) -> list[int]:
        off = self.size
        self.pieces.append((n, (src_off,)))
        self.size += n
        return [off, n]

    def sha256(self, fd: int) -> str:
        h = hashlib.sha256()
        for n, p in self.pieces:
            if isinstance(p, tuple):
                for k in range(0, n, CHUNK_BYTES):
                    h.update(pread_exact(fd, min(CHUNK_BYTES, n - k), p[0] + k))
            else:
                h.update(p)
        return h.hexdigest()

    def jobs(self, at: int) -> list[tuple]:
        """Jobs for :class:`BackgroundWriter` that write the payload at ``at``."""
        out: list[tuple] = []
        for n, p in self.pieces:
            out.append(("copy", p[0], at, n) if isinstance(p, tuple) else ("write", p, at))
            at += n
        return out


def _build_payload(fd: int, layout: GGUFLayout, slots: list[_Slot]) -> tuple[_Payload, dict]:
    pay = _Payload([])
    rec: dict[str, Any] = {
        "version": REVERT_VERSION,
        "kv_count": len(layout.kvs),
        "source_size": layout.file_size,
        "infos": pay.add_span(layout.infos_start, layout.infos_end - layout.infos_start),
        "pad": pay.add_span(layout.infos_end, layout.data_start - layout.infos_end),
        "tail": pay.add_span(layout.data_end, layout.file_size - layout.data_end),
    }
    gaps = []
    pos = layout.data_start
    for s in slots:  # padding between tensors: recorded only where it is not zeros
        start = layout.data_start + s.info.offset
        if start > pos:
            gap = pread_exact(fd, start - pos, pos)
            if any(gap):
                gaps.append([pos - layout.data_start, *pay.add_bytes(gap)])
        pos = start + s.info.nbytes
    rec["gaps"] = gaps
    tensors = []
    for s in slots:
        reg = s.region
        if reg is None:
            continue
        entry: dict[str, Any] = {"name": s.info.name, "type": s.info.qtype.name}
        if s.retyped:
            entry["mode"] = "whole"
            entry["payload"] = pay.add_span(layout.data_start + s.info.offset, s.info.nbytes)
        else:
            entry["mode"] = "blocks"
            entry["rows"] = None if reg.all_rows else [int(r) for r in reg.rows]
            full = reg.blocks.shape[0] == reg.info.row_len // reg.bs
            entry["blocks"] = None if full else [int(b) for b in reg.blocks]
            entry["payload"] = pay.add_bytes(memoryview(np.ascontiguousarray(reg.raw)).cast("B"))  # no copy
        tensors.append(entry)
    rec["tensors"] = tensors
    return pay, rec


# ------------------------------------------------------------------------------------------ writing


class _Progress:
    def __init__(self, progress: Any, total: int, label: str) -> None:
        self.cb = progress if callable(progress) else None
        self.total, self.done = total, 0
        self.bar = None
        if progress is True:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.cb is not None:
            self.cb(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _kv_entries(patch: Patch, precision: str, targets: list[str], revert: dict, with_sha: bool) -> tuple[bytes, int, int]:
    """The appended KV bytes, their count, and the offset (within them) of the source hash value."""
    pol = patch.policy or {}
    items = [
        (FoldKey.PATCH_DIGEST, patch_digest(patch)),
        (FoldKey.POLICY_NAME, str(pol.get(PolicyKey.NAME, ""))),
        (FoldKey.POLICY_VERSION, str(pol.get(PolicyKey.VERSION, ""))),
        (FoldKey.TOOL_VERSION, __version__),
        (FoldKey.PRECISION, precision),
        (FoldKey.TARGETS, json.dumps(targets)),
    ]
    out = b"".join(encode_kv(k, v, GGUFValueType.STRING) for k, v in items)
    sha_at = -1
    if with_sha:  # a placeholder of the same length, filled in once the input is hashed
        sha_entry = encode_kv(FoldKey.SOURCE_SHA256, "0" * 64, GGUFValueType.STRING)
        sha_at = len(out) + len(sha_entry) - 64
        out += sha_entry
    out += encode_kv(FoldKey.REVERT, json.dumps(revert, separators=(",", ":")), GGUFValueType.STRING)
    return out, len(items) + 1 + int(with_sha), sha_at


def _write_retyped(src: int, out: BackgroundWriter, layout: GGUFLayout, s: _Slot, out_data: int, tick: Callable[[int], None]) -> None:
    """Stream a tensor whose type changes: decode chunk, add the patch, encode in the new type."""
    info, reg = s.info, s.region
    assert reg is not None
    # bound the float32 chunk to ~CHUNK_BYTES*2 whatever the packing of the input type
    max_raw = max(info.row_bytes, int(2 * CHUNK_BYTES * info.row_bytes / (4 * info.row_len)))
    out_rb = tensor_nbytes((info.row_len,), s.out_type)
    for r0, r1 in iter_row_chunks(info, max_raw):
        raw = read_rows(src, layout.data_start, info, r0, r1)  # (rows, row_bytes)
        vals = codecs.dequantize_rows(raw, info.qtype, info.row_len)  # (rows, n)
        apply_chunk_delta(reg, vals, r0)
        enc = codecs.quantize_rows(vals, s.out_type)  # (rows, out_row_bytes)
        out.put(memoryview(enc).cast("B"), out_data + s.out_off + r0 * out_rb)
        tick(0)


def _write_blocks(src: int, out: BackgroundWriter | int, layout: GGUFLayout, s: _Slot, out_data: int,
                  tick: Callable[[int], None]) -> None:
    """Write a same-type touched tensor: row axis, the new rows over the copied tensor; col axis,
    the whole tensor from the input in chunks with the touched blocks replaced."""
    info, reg = s.info, s.region
    assert reg is not None and reg.new_raw is not None
    rb, ts = info.row_bytes, codecs.type_size(info.qtype)
    nb_row = info.row_len // reg.bs
    dst_base = out_data + s.out_off
    if not reg.all_rows:  # row axis: whole rows, written over the copied tensor once the copy is done
        assert isinstance(out, int)
        for i, r in enumerate(reg.rows):
            pwrite_all(out, reg.new_raw[i].tobytes(), dst_base + int(r) * rb)
        return
    assert isinstance(out, BackgroundWriter)
    for r0, r1 in iter_row_chunks(info, CHUNK_BYTES):
        chunk = read_rows(src, layout.data_start, info, r0, r1).reshape(r1 - r0, nb_row, ts).copy()
        chunk[:, reg.blocks] = reg.new_raw[r0:r1]
        out.put(memoryview(chunk).cast("B"), dst_base + r0 * rb)
        tick(0)


def _streamed(s: _Slot) -> bool:
    """Tensors the main thread writes whole: retyped ones, and col-axis targets (every row changes)."""
    return s.region is not None and (s.retyped or s.region.all_rows)


def _copy_plan(layout: GGUFLayout, slots: list[_Slot]) -> list[tuple[int, int, int]]:
    """``(src_abs, dst_rel, n)`` kernel copies of the tensors not streamed, merged (with the padding
    between them) while their shift stays the same."""
    spans: list[list[int]] = []
    prev: _Slot | None = None
    for s in slots:
        if _streamed(s):
            prev = None
            continue
        src = layout.data_start + s.info.offset
        shift = s.out_off - s.info.offset
        if prev is not None and spans and (prev.out_off - prev.info.offset) == shift:
            spans[-1][2] = src + s.info.nbytes - spans[-1][0]
        else:
            spans.append([src, s.out_off, s.info.nbytes])
        prev = s
    return [(a, b, c) for a, b, c in spans]


def fold_gguf(model_path: str | os.PathLike, patch: Patch, out_path: str | os.PathLike, *, precision: str = "keep",
              progress: bool | Callable[[int, int], None] = True, auto_threshold: float = 0.9,
              hash_source: bool = True) -> FoldReport:
    """Fold ``patch`` into the GGUF at ``model_path`` and write ``out_path`` atomically.

    Args:
        precision: ``keep`` each touched tensor's type; ``auto`` keeps it where retention
            >= ``auto_threshold`` and stores that tensor as Q8_0 (then F16) otherwise; ``q8_0`` /
            ``f16`` store every touched quantized tensor at that precision (never a downcast).
        progress: a tqdm bar (True), none (False), or a callable ``(done_bytes, total_bytes)``.
        auto_threshold: retention below which ``auto`` upcasts.
        hash_source: record the input's sha256 (``nestpatch.source_sha256``), computed on a second
            core while the fold writes, so that revert can prove its result. About 1.5 GB/s of CPU.

    Returns:
        The fold report (types, retention and sizes per target; totals).

    Raises:
        BaseMismatchError: the patch was made for another model (sizes, a tensor's shape, or the
            fingerprint of a touched tensor), checked before anything is written.
        UnsupportedError: architecture, fused/MoE tensors, or a tensor type that cannot be decoded.
        FormatError: the GGUF is malformed or truncated, or already carries a folded patch.
    """
    t0 = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    label = str(model_path)
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} invalid, expected one of {', '.join(PRECISIONS)}")
    validate_patch(patch)
    layout = parse_layout(model_path)
    done = [e for e in layout.kvs if e.key.startswith("nestpatch.")]
    if done:
        raise InputError(f"{label}: already carries a folded patch ({FoldKey.PATCH_DIGEST}="
                         f"{layout.kv(FoldKey.PATCH_DIGEST)}); revert it first (nestpatch revert)")
    check_description(patch, _description(layout, label), label)
    regions = [_locate(layout, t, label) for t in patch.targets]

    src = os.open(model_path, os.O_RDONLY)
    try:
        # Fingerprint every target before any float work or output; only the raw touched blocks
        # stay in memory (they are the revert payload anyway), decoded regions are transient.
        for reg in regions:
            reg.raw = read_region(src, layout.data_start, reg)
            base = decode_blocks(reg.raw, reg.info.qtype, reg.bs)  # (R, B*bs)
            check_base(patch, lambda t, b=base, r=reg: neuron_vectors(r, b), label, targets=[reg.target])
        decide_late = precision != "auto"  # only auto needs the float work to know the output types
        for reg in regions:
            if decide_late:
                reg.out_type = candidate_types(reg.info.qtype, reg.info.row_len, precision)[0]
            else:
                _decide(reg, precision, auto_threshold, label)
        report = _write(src, layout, patch, regions, out_path, precision, progress, label, auto_threshold, decide_late,
                        hash_source)
    finally:
        os.close(src)
    report.seconds = time.perf_counter() - t0
    log.info("folded %d targets into %s in %.2f s (min retention %.3f)", len(regions), out_path, report.seconds,
             report.min_retention)
    return report


def _write(src: int, layout: GGUFLayout, patch: Patch, regions: list[Region], out_path: Path, precision: str,
           progress: Any, label: str, auto_threshold: float, decide_late: bool, hash_source: bool) -> FoldReport:
    """Write the output. With ``decide_late`` the types are already fixed and the float work of
    each target runs while a second thread copies the untouched bytes."""
    regs = {r.info.name: r for r in regions}
    slots = _layout_slots(layout, regs)
    slot_of = {s.info.name: s for s in slots}
    payload, revert = _build_payload(src, layout, slots)
    revert["payload_size"] = payload.size
    revert["payload_sha256"] = payload.sha256(src)
    targets = [r.info.name for r in regions]
    kv_bytes, n_new, sha_at = _kv_entries(patch, precision, targets, revert, hash_source)

    orig_kv = pread_exact(src, layout.infos_start - layout.kv_start, layout.kv_start)
    infos = b""
    for info in layout.tensors:
        s = slot_of[info.name]
        if s.out_type == info.qtype and s.out_off == info.offset:
            infos += pread_exact(src, info.end - info.start, info.start)
        else:
            infos += encode_tensor_info(info.name, info.ne, s.out_type, s.out_off)
    prefix = header_prefix(layout.version, len(layout.tensors), len(layout.kvs) + n_new)
    header = prefix + orig_kv + kv_bytes + infos
    sha_pos = len(prefix) + len(orig_kv) + sha_at
    out_data = align(len(header), layout.alignment)
    out_data_end = out_data + max((s.out_off + s.out_nbytes for s in slots), default=0)
    payload_at = align(out_data_end, layout.alignment)
    total = payload_at + payload.size

    tick = _Progress(progress, (out_data_end - out_data) + payload.size, f"fold {out_path.name}")
    hasher = FileHasher(layout.path) if hash_source else None
    if hasher is not None:
        hasher.start()
    writer: BackgroundWriter | None = None
    try:
        with atomic_path(out_path) as tmp:
            dst = os.open(tmp, os.O_WRONLY)  # mkstemp made it empty; no O_TRUNC (ext4 flushes truncated files on close)
            try:
                os.ftruncate(dst, total)  # every byte not written below is zero padding
                pwrite_all(dst, header, 0)
                jobs = [("copy", a, out_data + b, n) for a, b, n in _copy_plan(layout, slots)] + payload.jobs(payload_at)
                writer = BackgroundWriter(src, dst, jobs)
                writer.start()
                seen = 0

                def pump(n: int = 0) -> None:
                    nonlocal seen
                    d = writer.done_bytes
                    tick(d - seen + n)
                    seen = d

                for reg in (regions if decide_late else []):  # float work overlaps the copy
                    _decide(reg, precision, auto_threshold, label)
                    pump()
                for s in slots:  # queued to the writer thread, which serves them between copy steps
                    if _streamed(s):
                        if s.retyped:
                            _write_retyped(src, writer, layout, s, out_data, pump)
                        else:
                            _write_blocks(src, writer, layout, s, out_data, pump)
                writer.close()
                while writer.is_alive():
                    writer.join(0.1)
                    pump()
                writer.check()
                for s in slots:  # after the copy: these overwrite whole rows of copied tensors
                    if s.region is not None and not _streamed(s):
                        _write_blocks(src, dst, layout, s, out_data, pump)
                if hasher is not None:
                    pwrite_all(dst, hasher.result().encode("ascii"), sha_pos)
            finally:
                if writer is not None:
                    writer.cancel()
                    writer.join()
                os.close(dst)
    finally:
        if hasher is not None:
            hasher.cancel()
        tick.close()

    report = FoldReport(model_in=str(layout.path), model_out=str(out_path), patch_digest=patch_digest(patch),
                        format="gguf", precision=precision, bytes_in=layout.file_size, bytes_out=total)
    for reg in regions:
        s = slot_of[reg.info.name]
        report.targets.append(TargetFold(
            name=reg.target.name, tensor=reg.info.name, type_in=reg.info.qtype.name, type_out=s.out_type.name,
            retention=reg.retention, rel_error=reg.rel_error, bytes_in=reg.info.nbytes, bytes_out=s.out_nbytes,
            blocks_touched=reg.n_blocks, blocks_total=reg.blocks_total))
    return report
