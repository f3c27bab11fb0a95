"""Regenerate the test vectors in this folder (deterministic; no randomness but a fixed seed).

Valid vectors: ``<name>.nestpatch`` + ``<name>.json`` (the decoded patch: metadata document,
tensors as nested lists, and the dense update ``dW`` of every target, so an implementation can
check its reader and its application rule). Invalid vectors: ``invalid/<name>.nestpatch`` +
``invalid/<name>.txt`` (a substring the reference reader's error contains).

    python spec/vectors/make_vectors.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from nestpatch.fingerprint import fingerprint_info, sketch
from nestpatch.format import Patch, Target, read_document, read_patch, serialize_patch
from nestpatch.format.constants import Meta

HERE = Path(__file__).resolve().parent


def _base(d_model: int, n_ff: int) -> dict:
    return {"architecture": "llama", "n_layers": 2, "d_model": d_model, "n_ff": n_ff,
            "name": "spec-vector-model", "revision": "v1", "fingerprint": fingerprint_info()}


def _weights(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def valid_patches() -> dict[str, Patch]:
    rng = np.random.default_rng(20260211)
    d_model, n_ff = 8, 16
    w_up, w_down = _weights(rng, (n_ff, d_model)), _weights(rng, (d_model, n_ff))
    up = Target("model.layers.0.mlp.up_proj.weight", "row", (n_ff, d_model),
                np.array([2, 3, 11], np.int32), np.array([0, 1, 0], np.int32),
                np.round(rng.standard_normal((2, d_model)), 3).astype(np.float32))
    up.base_sketch = sketch(up.name, w_up[up.indices])
    down = Target("model.layers.1.mlp.down_proj.weight", "col", (d_model, n_ff),
                  np.array([0, 7, 15], np.int32), np.array([0, 0, 0], np.int32),
                  np.round(rng.standard_normal((1, d_model)), 3).astype(np.float32), delta_dtype="F16")
    down.base_sketch = sketch(down.name, w_down[:, down.indices].T)
    scaled = Target("model.layers.1.mlp.gate_proj.weight", "row", (n_ff, d_model),
                    np.array([1, 4, 5, 9], np.int32), np.array([1, 0, 1, 0], np.int32),
                    np.round(rng.standard_normal((2, d_model)), 2).astype(np.float32),
                    scales=np.array([1.0, 0.5, -2.0, 0.25], np.float32), delta_dtype="BF16")
    policy = {"name": "spec-vector", "version": "1.0", "description": "test vector"}
    return {
        "minimal": Patch([up], base=_base(d_model, n_ff), policy=policy),
        "mixed_axes_dtypes": Patch([up, down, scaled], base=_base(d_model, n_ff), policy=policy,
                                   provenance={"tool": "nestpatch", "seed": 7,
                                               "data": [{"role": "harmful", "source": "example", "rows": 3,
                                                         "sha256": "0" * 64}]},
                                   evaluation={"asr": {"before": 0.5, "after": 0.0, "judge": "refusal-phrases"}}),
    }


def decoded(path: Path) -> dict:
    p = read_patch(path)
    _, doc = read_document(path)
    return {
        "metadata": doc,
        "targets": [
            {"name": t.name, "axis": t.axis, "shape": list(t.shape), "indices": t.indices.tolist(),
             "clusters": t.clusters.tolist(), "deltas": np.asarray(t.deltas, np.float32).tolist(),
             "scales": None if t.scales is None else np.asarray(t.scales, np.float32).tolist(),
             "dense_update": t.dense_update().tolist()}
            for t in p.targets
        ],
    }


def _with_doc(data: bytes, mutate) -> bytes:
    """Rewrite the metadata document of a serialized patch (tensor bytes untouched)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    doc = json.loads(header["__metadata__"][Meta.DOCUMENT])
    mutate(header, doc)
    header["__metadata__"][Meta.DOCUMENT] = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def _with_doc_text(data: bytes, edit) -> bytes:
    """Rewrite the metadata document's JSON *text* (for what a JSON library would hide)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"][Meta.DOCUMENT] = edit(header["__metadata__"][Meta.DOCUMENT])
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def _alias_names(good: bytes) -> bytes:
    """The one target again under another spelling of its name (same weight twice), digest right."""
    from nestpatch.format.digest import content_digest
    from nestpatch.format.safetensors_io import SafetensorsFile, dumps

    tmp = HERE / "invalid" / ".alias.tmp"
    tmp.write_bytes(good)
    st = SafetensorsFile(tmp)
    tensors = {n: (st.dtype(n), np.array(st.get(n))) for n in st.entries}
    tmp.unlink()
    doc = json.loads(st.metadata[Meta.DOCUMENT])
    first = doc["targets"][0]
    alias = dict(first, name=first["name"].removeprefix("model."))
    doc["targets"].append(alias)
    for n in list(tensors):
        if n.startswith(first["name"] + "/"):
            tensors[alias["name"] + n[len(first["name"]):]] = tensors[n]
    from nestpatch.format.safetensors_io import encode_array

    doc["content_digest"] = content_digest(
        (n, dt, tuple(a.shape), encode_array(a, dt)) for n, (dt, a) in sorted(tensors.items()))
    meta = dict(st.metadata)
    meta[Meta.DOCUMENT] = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return dumps(tensors, meta)


def invalid_files(good: bytes) -> dict[str, tuple[bytes, str]]:
    def set_version(h, d):
        h["__metadata__"][Meta.VERSION] = "2.0"

    def wrong_digest(h, d):
        d["content_digest"] = "sha256:" + "0" * 64

    def bad_axis(h, d):
        d["targets"][0]["axis"] = "diagonal"

    def set_version_3(h, d):
        h["__metadata__"][Meta.VERSION] = "1.0.0"

    def n_layers_string(h, d):
        d["base"]["n_layers"] = "2"

    def huge_size(h, d):
        d["base"]["fingerprint"]["size"] = 1 << 26

    def index_out_of_range(h, d):
        d["targets"][0]["shape"] = [3, 8]

    return {
        "truncated": (good[: len(good) // 2], "truncated"),
        "huge_header": (struct.pack("<Q", 1 << 40) + good[8:], "exceeds the limit"),
        "unknown_major_version": (_with_doc(good, set_version), "not supported"),
        "digest_mismatch": (_with_doc(good, wrong_digest), "digest mismatch"),
        "bad_axis": (_with_doc(good, bad_axis), "axis"),
        "index_out_of_range": (_with_doc(good, index_out_of_range), "indices must lie in"),
        "not_a_patch": (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "not a nestpatch file"),
        "duplicate_key": (_with_doc_text(good, lambda t: t.replace('"policy":', '"policy":{},"policy":', 1)), "duplicate key"),
        "nan_number": (_with_doc_text(good, lambda t: t.replace('"tolerance":0.35', '"tolerance":NaN', 1)), "non-finite"),
        "version_not_major_minor": (_with_doc(good, set_version_3), "MAJOR.MINOR"),
        "schema_violation": (_with_doc(good, n_layers_string), "base/n_layers"),
        "huge_fingerprint_size": (_with_doc(good, huge_size), "base/fingerprint/size"),
        "alias_target_names": (_alias_names(good), "address the same weight"),
        "gguf_model": (b"GGUF\x03\x00\x00\x00" + bytes(16), "this is a GGUF model"),
    }


def main() -> None:
    (HERE / "invalid").mkdir(exist_ok=True)
    good = b""
    for name, patch in valid_patches().items():
        data = serialize_patch(patch)
        (HERE / f"{name}.nestpatch").write_bytes(data)
        (HERE / f"{name}.json").write_text(json.dumps(decoded(HERE / f"{name}.nestpatch"), indent=1, sort_keys=True) + "\n")
        good = good or data
    for name, (data, message) in invalid_files(good).items():
        (HERE / "invalid" / f"{name}.nestpatch").write_bytes(data)
        (HERE / "invalid" / f"{name}.txt").write_text(message + "\n")


if __name__ == "__main__":
    main()
