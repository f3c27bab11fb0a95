"""Read a `.nestpatch` file: lazily (memory-mapped tensors), strictly (every invariant checked)."""

from __future__ import annotations

import functools
import json
import os
import re
from importlib import resources
from typing import Any

from ..errors import FormatError
from .constants import (
    FORMAT_NAME, INDEX_DTYPE, READABLE_MAJOR_VERSIONS, SKETCH_DTYPE, T_CLUSTERS, T_DELTAS, T_INDICES, T_SCALES,
    T_SKETCH, TENSOR_SUFFIXES, Doc, Meta, TargetKey, AXES,
)
from .digest import content_digest
from .patch import Patch, Target
from .safetensors_io import SafetensorsFile, strict_loads
from .validate import canonical_target_name, validate_patch  # noqa: F401  (re-exported)

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")


@functools.lru_cache(maxsize=1)
def _schema_validator() -> Any:
    """The JSON Schema of the metadata document (a copy of spec/metadata.schema.json; a test keeps them equal)."""
    import jsonschema

    schema = json.loads(resources.files(__package__).joinpath("metadata.schema.json").read_text("utf-8"))
    return jsonschema.Draft202012Validator(schema)


def check_schema(doc: Any, where: str) -> None:
    """Raise :class:`FormatError` naming the first place ``doc`` breaks the metadata schema."""
    import jsonschema

    err = jsonschema.exceptions.best_match(_schema_validator().iter_errors(doc))
    if err is not None:
        loc = "/".join(str(x) for x in err.absolute_path) or "(document)"
        msg = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        raise FormatError(f"{where}: metadata {loc}: {msg} (spec/metadata.schema.json)")


def _version_major(path: Any, version: str) -> int:
    m = _VERSION_RE.match(version) if isinstance(version, str) else None
    if m is None:
        raise FormatError(f"{path}: format version {version!r} is not of the form MAJOR.MINOR")
    major = int(m.group(1))
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
    if Meta.DOCUMENT not in meta:
        raise FormatError(f"{path}: metadata lacks {Meta.DOCUMENT!r}")
    doc = strict_loads(meta[Meta.DOCUMENT], f"{path}: metadata {Meta.DOCUMENT!r}")
    if not isinstance(doc, dict) or not isinstance(doc.get(Doc.TARGETS), list):
        raise FormatError(f"{path}: metadata document lacks a 'targets' list")
    check_schema(doc, str(path))
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
        if st.dtype(f"{name}/{T_INDICES}") != INDEX_DTYPE or st.dtype(f"{name}/{T_CLUSTERS}") != INDEX_DTYPE:
            raise FormatError(f"{path}: target {name!r}: indices and clusters must be I32")
        if deltas_dtype not in ("F32", "F16", "BF16"):
            raise FormatError(f"{path}: target {name!r}: deltas dtype {deltas_dtype} invalid, expected F32, F16 or BF16")
        if entry.get(TargetKey.DELTA_DTYPE) != deltas_dtype:
            raise FormatError(f"{path}: target {name!r}: delta_dtype {entry.get(TargetKey.DELTA_DTYPE)!r} in the metadata, "
                              f"but the deltas tensor is {deltas_dtype}")
        k_stored = st.entries[f"{name}/{T_DELTAS}"][1][0] if st.entries[f"{name}/{T_DELTAS}"][1] else None
        if entry.get(TargetKey.N_CLUSTERS) != k_stored:
            raise FormatError(f"{path}: target {name!r}: n_clusters {entry.get(TargetKey.N_CLUSTERS)!r} in the metadata, "
                              f"but the deltas tensor holds {k_stored} rows")
        if f"{name}/{T_SCALES}" in st.entries and st.dtype(f"{name}/{T_SCALES}") != deltas_dtype:
            raise FormatError(f"{path}: target {name!r}: scales are {st.dtype(f'{name}/{T_SCALES}')}, must match the deltas ({deltas_dtype})")
        if f"{name}/{T_SKETCH}" in st.entries and st.dtype(f"{name}/{T_SKETCH}") != SKETCH_DTYPE:
            raise FormatError(f"{path}: target {name!r}: base_sketch is {st.dtype(f'{name}/{T_SKETCH}')}, must be {SKETCH_DTYPE}")
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
