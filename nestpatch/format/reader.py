"""Read a `.nestpatch` file: lazily (memory-mapped tensors), strictly (every invariant checked)."""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import FormatError
from .constants import (
    FORMAT_NAME, READABLE_MAJOR_VERSIONS, T_CLUSTERS, T_DELTAS, T_INDICES, T_SCALES, T_SKETCH,
    TENSOR_SUFFIXES, Doc, Meta, TargetKey, AXES,
)
from .digest import content_digest
from .patch import Patch, Target
from .safetensors_io import SafetensorsFile
from .validate import validate_patch


def _version_major(path: Any, version: str) -> int:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise FormatError(f"{path}: format version {version!r} is not of the form MAJOR.MINOR") from None
    if major not in READABLE_MAJOR_VERSIONS:
        readable = ", ".join(f"{m}.x" for m in READABLE_MAJOR_VERSIONS)
        raise FormatError(f"{path}: format version {version} is not supported; this nestpatch reads {readable}")
    return major


def read_document(path: str | os.PathLike) -> tuple[SafetensorsFile, dict]:
    """Open the container and return it with the parsed metadata document (no tensor reads)."""
    st = SafetensorsFile(path)
    meta = st.metadata
    if meta.get(Meta.FORMAT) != FORMAT_NAME:
        raise FormatError(f"{path}: not a nestpatch file (metadata 'format' is {meta.get(Meta.FORMAT)!r}, expected {FORMAT_NAME!r})")
    if Meta.VERSION not in meta:
        raise FormatError(f"{path}: metadata lacks {Meta.VERSION!r}")
    _version_major(path, meta[Meta.VERSION])
    try:
        doc = json.loads(meta.get(Meta.DOCUMENT, ""))
    except (json.JSONDecodeError, RecursionError):
        raise FormatError(f"{path}: metadata {Meta.DOCUMENT!r} is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(Doc.TARGETS), list):
        raise FormatError(f"{path}: metadata document lacks a 'targets' list")
    for key in (Doc.BASE, Doc.POLICY, Doc.PROVENANCE, Doc.EVALUATION):
        if not isinstance(doc.get(key, {}), dict):
            raise FormatError(f"{path}: metadata {key!r} must be an object")
    return st, doc


def read_patch(path: str | os.PathLike, *, verify_digest: bool = True) -> Patch:
    """Read and validate a patch.

    Raises:
        FormatError: naming ``path`` and the first broken rule.
    """
    st, doc = read_document(path)
    targets: list[Target] = []
    expected_names: set[str] = set()
    for i, entry in enumerate(doc[Doc.TARGETS]):
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: targets[{i}] must be an object")
        name = entry.get(TargetKey.NAME)
        axis = entry.get(TargetKey.AXIS)
        shape = entry.get(TargetKey.SHAPE)
        if not isinstance(name, str) or not name:
            raise FormatError(f"{path}: targets[{i}] has no name")
        if axis not in AXES:
            raise FormatError(f"{path}: target {name!r}: axis {axis!r} invalid, expected one of {AXES}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)):
            raise FormatError(f"{path}: target {name!r}: shape {shape!r} invalid, expected two positive ints")
        for req in (T_INDICES, T_CLUSTERS, T_DELTAS):
            if f"{name}/{req}" not in st.entries:
                raise FormatError(f"{path}: target {name!r} lacks tensor '{name}/{req}'")
        def opt(suffix: str):
            key = f"{name}/{suffix}"
            return st.get(key) if key in st.entries else None
        deltas_dtype = st.dtype(f"{name}/{T_DELTAS}")
        if st.dtype(f"{name}/{T_INDICES}") != "I32" or st.dtype(f"{name}/{T_CLUSTERS}") != "I32":
            raise FormatError(f"{path}: target {name!r}: indices and clusters must be I32")
        if deltas_dtype not in ("F32", "F16", "BF16"):
            raise FormatError(f"{path}: target {name!r}: deltas dtype {deltas_dtype} invalid, expected F32, F16 or BF16")
        for suffix in TENSOR_SUFFIXES:
            expected_names.add(f"{name}/{suffix}")
        targets.append(Target(
            name=name, axis=axis, shape=(shape[0], shape[1]),
            indices=st.get(f"{name}/{T_INDICES}"), clusters=st.get(f"{name}/{T_CLUSTERS}"),
            deltas=st.get(f"{name}/{T_DELTAS}"), scales=opt(T_SCALES), base_sketch=opt(T_SKETCH),
            delta_dtype=deltas_dtype,
        ))
    stray = sorted(set(st.entries) - expected_names)
    if stray:
        raise FormatError(f"{path}: tensor {stray[0]!r} belongs to no target listed in the metadata")
    patch = Patch(
        targets=targets,
        base=doc.get(Doc.BASE, {}), policy=doc.get(Doc.POLICY, {}), provenance=doc.get(Doc.PROVENANCE, {}),
        evaluation=doc.get(Doc.EVALUATION, {}), signature=doc.get(Doc.SIGNATURE),
        content_digest=doc.get(Doc.CONTENT_DIGEST),
    )
    validate_patch(patch, where=f"{path}: ")
    if verify_digest:
        actual = content_digest((n, st.dtype(n), st.entries[n][1], st.raw(n)) for n in st.entries)
        if patch.content_digest != actual:
            raise FormatError(f"{path}: content digest mismatch: metadata says {patch.content_digest}, tensors hash to {actual}")
    return patch
