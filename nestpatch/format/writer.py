"""Write a :class:`Patch` as a `.nestpatch` file (safetensors container), atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomic
from .constants import (
    FORMAT_NAME, FORMAT_VERSION, INDEX_DTYPE, SKETCH_DTYPE, T_CLUSTERS, T_DELTAS, T_INDICES, T_SCALES,
    T_SKETCH, Doc, Meta, TargetKey,
)
from .digest import content_digest
from .patch import Patch
from .safetensors_io import dumps, encode_array
from .validate import validate_patch


def patch_tensors(p: Patch) -> dict[str, tuple[str, np.ndarray]]:
    """The file's tensors: ``{f"{target}/{suffix}": (dtype, array)}``."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for t in p.targets:
        out[f"{t.name}/{T_INDICES}"] = (INDEX_DTYPE, np.asarray(t.indices, dtype=np.int32))
        out[f"{t.name}/{T_CLUSTERS}"] = (INDEX_DTYPE, np.asarray(t.clusters, dtype=np.int32))
        out[f"{t.name}/{T_DELTAS}"] = (t.delta_dtype, np.asarray(t.deltas, dtype=np.float32))
        if t.scales is not None:
            out[f"{t.name}/{T_SCALES}"] = (t.delta_dtype, np.asarray(t.scales, dtype=np.float32))
        if t.base_sketch is not None:
            out[f"{t.name}/{T_SKETCH}"] = (SKETCH_DTYPE, np.asarray(t.base_sketch, dtype=np.float32))
    return out


def compute_digest(p: Patch) -> str:
    """Content digest of the tensors exactly as they will be stored."""
    items = []
    for name, (dtype, arr) in patch_tensors(p).items():
        items.append((name, dtype, tuple(np.shape(arr)), encode_array(arr, dtype)))
    return content_digest(items)


def metadata_document(p: Patch, digest: str) -> dict:
    """The JSON document stored under ``nestpatch.metadata``."""
    doc = {
        Doc.TARGETS: [
            {
                TargetKey.NAME: t.name,
                TargetKey.AXIS: t.axis,
                TargetKey.SHAPE: [int(t.shape[0]), int(t.shape[1])],
                TargetKey.N_CLUSTERS: t.n_clusters,
                TargetKey.DELTA_DTYPE: t.delta_dtype,
            }
            for t in p.targets
        ],
        Doc.BASE: p.base,
        Doc.POLICY: p.policy,
        Doc.PROVENANCE: p.provenance,
        Doc.EVALUATION: p.evaluation,
        Doc.CONTENT_DIGEST: digest,
    }
    if p.signature is not None:
        doc[Doc.SIGNATURE] = p.signature
    return doc


def serialize_patch(p: Patch) -> bytes:
    """Validate and serialize ``p``; the stored delta dtype rounding is applied here."""
    validate_patch(p)
    digest = compute_digest(p)
    doc = metadata_document(p, digest)
    meta = {
        Meta.FORMAT: FORMAT_NAME,
        Meta.VERSION: FORMAT_VERSION,
        Meta.DOCUMENT: json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False),
    }
    return dumps(patch_tensors(p), meta)


def write_patch(p: Patch, path: str | os.PathLike) -> Path:
    """Write ``p`` to ``path`` (temporary file + rename: never a half-written patch)."""
    return write_bytes_atomic(path, serialize_patch(p))
