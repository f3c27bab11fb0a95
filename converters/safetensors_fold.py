"""Fold a patch into a Hugging Face safetensors model, and revert the fold byte for byte.

How the fold keeps every byte it does not change: a rewritten shard is the original data section
copied verbatim under a new header (the same tensors at the same offsets, with ``nestpatch.*``
provenance added to ``__metadata__``), and then only the touched rows (gate/up) or columns (down)
are overwritten in place. Shards without touched tensors are hard-linked (or copied), so the
index stays valid as is. Arithmetic is float32; the result is cast back to the stored dtype
(F32, F16, BF16: round to nearest even, as torch does).

How revert is exact: the fold writes a sidecar (``nestpatch.revert`` in the output directory, or
``<file>.nestpatch.revert`` beside a lone file), a safetensors container holding the original
bytes of every touched row/column and the original header of each rewritten shard. Revert puts
them back and checks the sha256 of each restored shard against the one recorded at fold time.
The sidecar does not end in ``.safetensors`` on purpose: loaders that glob ``*.safetensors``
must not mistake it for weights.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from nestpatch import __version__
from nestpatch.assets import sha256_file
from nestpatch.atomic import atomic_dir, atomic_path
from nestpatch.errors import FormatError, InputError
from nestpatch.fingerprint import check_base, check_description
from nestpatch.format.constants import AXIS_ROW, PolicyKey
from nestpatch.format.patch import Patch, Target
from nestpatch.format.safetensors_io import SafetensorsFile, dumps, encode_header, f32_to_bf16
from nestpatch.models.files import ITEMSIZE, Entry, ModelLayout, Shard, describe_config, discover, gather, parse_shard, to_f32
from nestpatch.provenance import patch_digest

from .provenance import FoldKey
from .fold_report import FoldReport, TargetFold, retention_stats

log = logging.getLogger(__name__)

SIDECAR_NAME = "nestpatch.revert"
SIDECAR_SUFFIX = ".nestpatch.revert"
SIDECAR_FORMAT = "nestpatch-revert"
REVERT_METHOD = "original-bytes-v1"
#: Files up to this size are copied into the output; larger ones are hard-linked (copy if that fails).
LINK_THRESHOLD = 16 << 20
_CHUNK = 16 << 20
_UINT = {4: np.dtype("<u4"), 2: np.dtype("<u2")}


def sidecar_path(patched: str | os.PathLike) -> Path:
    """Where the revert data of a folded model lives (inside a directory, or beside a file)."""
    p = Path(patched)
    return p / SIDECAR_NAME if p.is_dir() else p.with_name(p.name + SIDECAR_SUFFIX)


@dataclass
class _Plan:
    """One target, ready to write: original and new stored values of its touched neurons."""

    target: Target
    fname: str
    tensor: str
    dtype: str
    indices: np.ndarray  # (n,) int64
    orig: np.ndarray  # (n, d) storage dtype, as read
    new: np.ndarray  # (n, d) storage dtype, to write
    retention: float
    rel_error: float
    nbytes: int


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage dtype (BF16 as uint16 bits, round to nearest even)."""
    if dtype == "BF16":
        return f32_to_bf16(x)
    return x.astype("<f4" if dtype == "F32" else "<f2")


def _plan_target(layout: ModelLayout, t: Target, where: str) -> _Plan:
    fname, tensor = layout.resolve(t)
    shard = layout.shard(fname)
    dtype = shard.entries[tensor].dtype
    idx = np.asarray(t.indices, np.int64)
    orig = gather(shard.view(tensor), t.axis, idx)  # (n, d) storage dtype
    base = to_f32(orig, dtype)  # (n, d)
    intended = t.neuron_deltas()  # (n, d) float32
    with np.errstate(over="ignore", invalid="ignore"):
        new = _encode(base + intended, dtype)
        realized = to_f32(new, dtype) - base
    bad = ~np.isfinite(to_f32(new, dtype))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise InputError(
            f"{where}: tensor {tensor}: folding gives non-finite values in {dtype} (neuron {int(idx[row])}); "
            "the patch's deltas are too large for this dtype"
        )
    ret, err = retention_stats(intended, realized)
    e = shard.entries[tensor]
    return _Plan(t, fname, tensor, dtype, idx, orig, new, ret, err, e.end - e.start)


def _check_output(layout: ModelLayout, out_path: str | os.PathLike | None, in_place: bool) -> Path:
    """Decide the output path and refuse unsafe ones before any work starts."""
    root = layout.root
    if in_place:
        out = root if out_path is None else Path(out_path)
        if not (out.exists() and os.path.samefile(out, root)):
            raise InputError(f"{out}: --in-place writes over the input ({root}); give no other output")
        return root
    if out_path is None:
        raise InputError(f"{root}: no output given (use -o OUT, or --in-place to overwrite the input)")
    out = Path(out_path)
    if not layout.is_dir and out.is_dir():
        out = out / root.name
    if out.exists() and os.path.samefile(out, root):
        raise InputError(f"{out}: output is the input model; choose another output or pass --in-place")
    if layout.is_dir:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is a file; the output of a model directory is a directory")
        if out.resolve().is_relative_to(root.resolve()):
            raise InputError(f"{out}: output must not lie inside the input model directory {root}")
        if out.is_dir() and any(out.iterdir()) and not (any(out.glob("*.safetensors")) or (out / "config.json").exists()):
            raise InputError(f"{out}: exists and does not look like a model directory; refusing to replace it")
    elif out.exists() and out.is_dir():
        raise InputError(f"{out}: is a directory")
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: output directory {parent} is not writable")
    return out


def _link_or_copy(src: Path, dst: Path, link: bool = False) -> None:
    """Hard-link weights and big files (nestpatch never writes into an existing inode), copy the rest."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link or src.stat().st_size > LINK_THRESHOLD:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _copy_tree(src_dir: Path, dst_dir: Path, skip: set[str], link: set[str] = frozenset()) -> None:
    """Copy every file of ``src_dir`` (recursively, symlinks followed) except ``skip``; hard-link ``link``."""
    for dirpath, _dirs, files in os.walk(src_dir, followlinks=True):
        for f in files:
            src = Path(dirpath) / f
            rel = src.relative_to(src_dir).as_posix()
            if rel not in skip:
                _link_or_copy(src, dst_dir / rel, link=rel in link)


def _scatter(mm: mmap.mmap, data_start: int, shape: tuple[int, ...], start: int, itemsize: int,
             axis: str, idx: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` (n, d) into rows/columns ``idx`` of a tensor inside a writable map (bits kept)."""
    udt = _UINT[itemsize]
    view = np.frombuffer(mm, dtype=udt, count=int(np.prod(shape)), offset=data_start + start).reshape(shape)
    vals = np.ascontiguousarray(values).view(udt).reshape(len(idx), -1)  # (n, d) as raw bits
    if axis == AXIS_ROW:
        view[idx, :] = vals
    else:
        view[:, idx] = vals.T
    del view


def _scatter_file(path: Path, data_start: int, edits: Iterable[tuple[Entry, str, np.ndarray, np.ndarray]]) -> None:
    """Apply ``edits`` (tensor entry, axis, indices, values (n, d) as stored) to the file at ``path`` in place."""
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            for e, axis, idx, values in edits:
                _scatter(mm, data_start, e.shape, e.start, ITEMSIZE[e.dtype], axis, idx, values)
            mm.flush()
        finally:
            mm.close()


def _write_shard(src: Shard, dst: Path, header: dict, edits: list[tuple[str, np.ndarray, np.ndarray, str]]) -> str:
    """Write ``header`` + ``src``'s data section to ``dst``, apply ``edits``, return sha256 of ``src``.

    ``edits``: (tensor, indices, values (n, d) in storage dtype, axis). The source hash is taken
    while copying, so each shard is read once, and recorded as ``nestpatch.source_sha256``.
    """
    header["__metadata__"][FoldKey.SOURCE_SHA256] = "0" * 64  # placeholder of the same length, filled below
    hbytes = encode_header(header)
    h = hashlib.sha256()
    with open(src.path, "rb") as fin, open(dst, "wb") as fout:
        h.update(fin.read(src.data_start))
        fout.write(struct.pack("<Q", len(hbytes)) + hbytes)
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
        header["__metadata__"][FoldKey.SOURCE_SHA256] = h.hexdigest()
        final = encode_header(header)
        assert len(final) == len(hbytes)
        fout.seek(8)
        fout.write(final)
    if edits:
        _scatter_file(dst, 8 + len(hbytes), ((src.entries[tensor], axis, idx, values) for tensor, idx, values, axis in edits))
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    return h.hexdigest()


def _provenance(patch: Patch, digest: str, tensors: list[str], sidecar: str) -> dict[str, str]:
    return {
        FoldKey.PATCH_DIGEST: digest,
        FoldKey.POLICY_NAME: str(patch.policy.get(PolicyKey.NAME, "")),
        FoldKey.POLICY_VERSION: str(patch.policy.get(PolicyKey.VERSION, "")),
        FoldKey.TOOL_VERSION: __version__,
        FoldKey.PRECISION: "keep",
        FoldKey.TARGETS: json.dumps(sorted(tensors)),  # all tensors of the fold, in every rewritten shard
        FoldKey.REVERT: json.dumps({"method": REVERT_METHOD, "sidecar": sidecar}),
    }


def _refuse_folded(layout: ModelLayout, files: list[str]) -> None:
    side = sidecar_path(layout.root)
    if side.exists():
        raise InputError(f"{layout.root}: already holds a folded patch ({side.name} is there); revert it first")
    for f in files:
        prev = layout.shard(f).metadata.get(FoldKey.PATCH_DIGEST)
        if prev:
            raise InputError(f"{layout.base_dir / f}: already holds folded patch {prev}; revert it first")


def fold_safetensors(model_path: str | os.PathLike, patch: Patch, out_path: str | os.PathLike | None, *,
                     progress: bool = True, in_place: bool = False) -> FoldReport:
    """Fold ``patch`` into an HF model directory (single or sharded) or a lone ``.safetensors`` file.

    The patch's base description and fingerprint are checked before anything is written; the
    output (a directory, or a file for a lone file) appears atomically, with a revert sidecar.

    Args:
        model_path: HF model directory or ``.safetensors`` file.
        out_path: output directory (or file); ignored when ``in_place``.
        in_place: replace the input (atomically) instead of writing a new output.

    Returns:
        A :class:`FoldReport` (retention per target is 1.0 up to the dtype's rounding).

    Raises:
        BaseMismatchError: the patch was made for another model (sizes, fingerprint, shapes).
        UnsupportedError: fused/MoE tensors or a dtype other than F32/F16/BF16.
        InputError: an unsafe or unwritable output, a model already folded, non-finite results.
    """
    t0 = time.perf_counter()
    layout = discover(model_path)
    label = str(layout.root)
    try:
        out = _check_output(layout, out_path, in_place)
        check_description(patch, describe_config(layout.config()), label)
        for t in patch.targets:
            layout.resolve(t)  # names, shapes and dtypes, before reading any value
        _refuse_folded(layout, sorted({layout.resolve(t)[0] for t in patch.targets}))
        check_base(patch, layout.neuron_vectors, label)
        plans = [_plan_target(layout, t, label) for t in patch.targets]
        digest = patch_digest(patch)
        report = _write(layout, patch, plans, out, digest, progress)
    finally:
        layout.close()
    report.seconds = time.perf_counter() - t0
    log.info("folded %d targets into %s in %.2f s", len(plans), out, report.seconds)
    return report


def _write(layout: ModelLayout, patch: Patch, plans: list[_Plan], out: Path, digest: str, progress: bool) -> FoldReport:
    by_file: dict[str, list[_Plan]] = {}
    for p in plans:
        by_file.setdefault(p.fname, []).append(p)
    side_name = SIDECAR_NAME if layout.is_dir else out.name + SIDECAR_SUFFIX
    revert_doc: dict = {"version": 1, "method": REVERT_METHOD, "patch_digest": digest, "files": {}, "tensors": []}
    side_tensors: dict[str, tuple[str, np.ndarray]] = {}
    for i, p in enumerate(plans):
        key = str(i)
        revert_doc["tensors"].append({"key": key, "file": p.fname if layout.is_dir else out.name, "tensor": p.tensor,
                                      "axis": p.target.axis, "dtype": p.dtype})
        side_tensors[f"{key}.indices"] = ("I32", p.indices.astype(np.int32))
        side_tensors[f"{key}.orig"] = ("U8", np.ascontiguousarray(p.orig).view(np.uint8).reshape(len(p.indices), -1))

    all_tensors = [p.tensor for p in plans]  # every rewritten shard lists the whole fold

    def fold_file(fname: str, dst: Path, out_name: str) -> None:
        src = layout.shard(fname)
        fplans = by_file[fname]
        header = {"__metadata__": {**src.metadata, **_provenance(patch, digest, all_tensors, side_name)}}
        header.update({k: v for k, v in src.header.items() if k != "__metadata__"})
        dst.parent.mkdir(parents=True, exist_ok=True)
        sha = _write_shard(src, dst, header, [(p.tensor, p.indices, p.new, p.target.axis) for p in fplans])
        revert_doc["files"][out_name] = {"sha256": sha, "size": src.size,
                                         "header_b64": base64.b64encode(src.header_bytes).decode("ascii")}

    def sidecar_bytes() -> bytes:
        return dumps(side_tensors, {"format": SIDECAR_FORMAT, FoldKey.REVERT: json.dumps(revert_doc)})

    with tqdm(total=len(by_file), desc="fold safetensors", unit="shard", disable=not progress) as bar:
        if layout.is_dir:
            with atomic_dir(out) as tmp:
                _copy_tree(layout.root, tmp, skip=set(by_file), link=set(layout.weight_files))
                for fname in by_file:
                    fold_file(fname, tmp / fname, fname)
                    bar.update(1)
                (tmp / SIDECAR_NAME).write_bytes(sidecar_bytes())
            out_files = [out / f for f in layout.weight_files] + [out / SIDECAR_NAME]
        else:
            # the sidecar is renamed into place first, then the model file
            with atomic_path(out) as tmp_main:
                fold_file(layout.weight_files[0], tmp_main, out.name)
                bar.update(1)
                with atomic_path(out.with_name(side_name)) as tmp_side:
                    tmp_side.write_bytes(sidecar_bytes())
            out_files = [out, out.with_name(side_name)]

    report = FoldReport(model_in=str(layout.root), model_out=str(out), patch_digest=digest, format="safetensors", precision="keep")
    for p in plans:
        report.targets.append(TargetFold(
            name=p.target.name, tensor=p.tensor, type_in=p.dtype, type_out=p.dtype, retention=p.retention,
            rel_error=p.rel_error, bytes_in=p.nbytes, bytes_out=p.nbytes, blocks_touched=len(p.indices),
            blocks_total=p.target.n_neuron_axis,
        ))
    report.bytes_in = sum((layout.base_dir / f).stat().st_size for f in layout.weight_files)
    report.bytes_out = sum(f.stat().st_size for f in out_files)
    return report


# ----------------------------------------------------------------------------------------- revert

def _read_revert(patched: Path) -> tuple[SafetensorsFile, dict]:
    side = sidecar_path(patched)
    if not side.is_file():
        raise InputError(f"{patched}: no revert data ({side.name} is missing); only models folded by nestpatch can be reverted")
    sf = SafetensorsFile(side)
    try:
        doc = json.loads(sf.metadata[FoldKey.REVERT])
    except (KeyError, json.JSONDecodeError):
        raise FormatError(f"{side}: not a nestpatch revert sidecar (no {FoldKey.REVERT} metadata)") from None
    if doc.get("version") != 1 or doc.get("method") != REVERT_METHOD:
        raise FormatError(f"{side}: revert data version {doc.get('version')} / {doc.get('method')} not supported (reads 1 / {REVERT_METHOD})")
    return sf, doc


def _restore_shard(folded_path: Path, dst: Path, info: dict, entries: list[dict], sf: SafetensorsFile) -> None:
    """Rebuild one original shard: original header + folded data with the original bytes put back."""
    folded = parse_shard(folded_path)
    hbytes = base64.b64decode(info["header_b64"])
    original = json.loads(hbytes.decode("utf-8"))
    with open(folded_path, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(hbytes)) + hbytes)
        fin.seek(folded.data_start)
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)

    def originals() -> Iterator[tuple[Entry, str, np.ndarray, np.ndarray]]:
        for ent in entries:
            o = original[ent["tensor"]]
            yield (Entry(o["dtype"], tuple(o["shape"]), *o["data_offsets"]), ent["axis"],
                   np.asarray(sf.get(f"{ent['key']}.indices"), np.int64),
                   np.asarray(sf.get(f"{ent['key']}.orig")))  # (n, d * itemsize) uint8

    _scatter_file(dst, 8 + len(hbytes), originals())
    restored = sha256_file(dst)
    if restored != info["sha256"]:
        raise FormatError(f"{folded_path}: restored bytes do not match the original (sha256 {restored[:16]} != "
                          f"{info['sha256'][:16]}); the folded file was changed after folding")


def revert_safetensors(patched_path: str | os.PathLike, out_path: str | os.PathLike, *, progress: bool = True) -> Path:
    """Restore the model a fold started from, byte for byte, into ``out_path``.

    Raises:
        InputError: no revert sidecar, or an unsafe output path.
        FormatError: the sidecar is damaged, or the folded files were changed since the fold.
    """
    patched = Path(patched_path)
    if not patched.exists():
        raise InputError(f"{patched}: no such file or directory")
    sf, doc = _read_revert(patched)
    out = Path(out_path)
    if not patched.is_dir() and out.is_dir():
        out = out / patched.name
    if out.exists() and os.path.samefile(out, patched):
        raise InputError(f"{out}: output is the folded model itself; choose another output")
    if patched.is_dir() and out.resolve().is_relative_to(patched.resolve()):
        raise InputError(f"{out}: output must not lie inside the folded model directory {patched}")
    if patched.is_dir() and out.is_dir() and any(out.iterdir()) and not (any(out.glob("*.safetensors")) or (out / "config.json").exists()):
        raise InputError(f"{out}: exists and does not look like a model directory; refusing to replace it")
    if not patched.is_dir() and out.is_dir():
        raise InputError(f"{out}: is a directory")
    by_file: dict[str, list[dict]] = {}
    for ent in doc["tensors"]:
        by_file.setdefault(ent["file"], []).append(ent)
    with tqdm(total=len(doc["files"]), desc="revert safetensors", unit="shard", disable=not progress) as bar:
        if patched.is_dir():
            with atomic_dir(out) as tmp:
                _copy_tree(patched, tmp, skip=set(doc["files"]) | {SIDECAR_NAME},
                           link={f for f in os.listdir(patched) if f.endswith(".safetensors")})
                for fname, info in doc["files"].items():
                    if not (patched / fname).is_file():
                        raise InputError(f"{patched}: {fname} is missing; cannot revert")
                    (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
                    _restore_shard(patched / fname, tmp / fname, info, by_file.get(fname, []), sf)
                    bar.update(1)
        else:
            (fname, info), = doc["files"].items()
            with atomic_path(out) as tmp:
                _restore_shard(patched, tmp, info, by_file.get(fname, []), sf)
                bar.update(1)
    log.info("reverted %s into %s", patched, out)
    return out
