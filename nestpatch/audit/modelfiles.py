"""Read-only, uniform access to the tensors and metadata of a GGUF file or a safetensors model.

``verify`` compares two models tensor by tensor: first raw bytes (cheap, exact), then decoded
float32 values only for the tensors that differ. This module hides the two containers behind
one small interface; it never modifies a file and reads tensor data through memory maps.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InputError, UnsupportedError
from ..format.constants import AXIS_ROW
from ..format.safetensors_io import bf16_to_f32
from ..models.naming import hf_to_gguf, parse_hf_name

#: Types stored as plain floats: a fold of these must be bit-exact.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


@dataclass
class TensorInfo:
    name: str
    type: str  # "F32", "Q4_1", "BF16", ...
    shape: tuple[int, ...]  # HF orientation (rows, cols) for 2-D tensors

    @property
    def quantized(self) -> bool:
        return self.type not in FLOAT_TYPES


class ModelFile:
    """Interface shared by :class:`GGUFModel` and :class:`SafetensorsModel`."""

    path: Path
    format: str
    tensors: dict[str, TensorInfo]

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as a flat uint8 view."""
        raise NotImplementedError

    def locate(self, name: str) -> tuple[Path, int, int]:
        """``(file, absolute byte offset, byte length)`` of a tensor's data (for reports and tests)."""
        raise NotImplementedError

    def floats(self, name: str) -> np.ndarray:
        """The tensor decoded (dequantized) to float32, HF orientation."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """Key/value metadata (GGUF KV; the union of the safetensors shards' ``__metadata__``)."""
        raise NotImplementedError

    def target_tensor(self, hf_name: str) -> str | None:
        """The name of a patch target's tensor in this file, or None when it has none."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class GGUFModel(ModelFile):
    """A GGUF file through the converters' header parser (gguf's GGUFReader decodes every
    tokenizer string up front: ~10 s on a 49k-token vocabulary, against ~0.3 s here)."""

    format = "gguf"

    def __init__(self, path: str | os.PathLike):
        from ..converters.gguf_layout import parse_layout

        self.path = Path(path)
        self._layout = parse_layout(self.path)
        self._t = {t.name: t for t in self._layout.tensors}
        self.tensors = {t.name: TensorInfo(t.name, t.qtype.name, tuple(int(s) for s in t.shape)) for t in self._layout.tensors}
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        t = self._t[name]
        return np.frombuffer(self._map(), dtype=np.uint8, count=t.nbytes, offset=self._layout.data_start + t.offset)

    def locate(self, name: str) -> tuple[Path, int, int]:
        t = self._t[name]
        return self.path, self._layout.data_start + t.offset, t.nbytes

    def row_bytes(self, name: str) -> int:
        """Bytes per stored row (quantized rows are whole blocks)."""
        return self._t[name].row_bytes

    def floats(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._t[name]
        rows = self.raw(name).reshape(t.n_rows, t.row_bytes)  # (rows, bytes per row)
        return np.asarray(dequantize(rows, t.qtype), dtype=np.float32).reshape(self.tensors[name].shape)

    def metadata(self) -> dict[str, Any]:
        """KV entries: decoded values where the parser decodes them, else the entry's exact bytes."""
        out: dict[str, Any] = {}
        mm = self._map()
        for e in self._layout.kvs:
            v = e.value
            if v is None:
                v = bytes(mm[e.start:e.end])  # string arrays (tokenizer vocabularies): compared byte for byte
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            out[e.key] = v
        return out

    def target_tensor(self, hf_name: str) -> str | None:
        try:
            name = hf_to_gguf(hf_name)
        except UnsupportedError:
            return None
        return name if name in self.tensors else None

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a numpy view is alive; the map goes with it
                pass
            self._mm = None


_ST_TYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


@dataclass
class _StEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsModel(ModelFile):
    """An HF model directory (single file, sharded with or without index) or a lone file."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such model file or directory")
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise InputError(f"{self.path}: expected a .gguf file, a .safetensors file or an HF model directory")
            files = [self.path]
        else:
            files = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
            if not files:
                raise InputError(f"{self.path}: model directory holds no *.safetensors weights")
        self._entries: dict[str, _StEntry] = {}
        self._meta: dict[str, Any] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for f in files:
            self._read_header(f)
        self.tensors = {n: TensorInfo(n, e.dtype, e.shape) for n, e in self._entries.items()}

    def _read_header(self, f: Path) -> None:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError(f"{f}: truncated safetensors file ({size} bytes)")
            hlen = int.from_bytes(head, "little")
            if 8 + hlen > size:
                raise FormatError(f"{f}: header length {hlen} exceeds the file size {size} (truncated?)")
            try:
                header = json.loads(fh.read(hlen).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise FormatError(f"{f}: safetensors header is not valid UTF-8 JSON") from None
        for k, v in (header.pop("__metadata__", None) or {}).items():
            self._meta.setdefault(k, v)
        data0 = 8 + hlen
        for name, info in header.items():
            try:
                s, e = info["data_offsets"]
                entry = _StEntry(f, str(info["dtype"]), tuple(int(x) for x in info["shape"]), data0 + int(s), data0 + int(e))
            except (TypeError, KeyError, ValueError):
                raise FormatError(f"{f}: header entry for tensor {name!r} is malformed") from None
            if entry.end > size:
                raise FormatError(f"{f}: tensor {name!r} extends past the end of the file (truncated?)")
            if name in self._entries:
                raise FormatError(f"{f}: tensor {name!r} also appears in {self._entries[name].file.name}")
            self._entries[name] = entry

    def _map(self, f: Path) -> mmap.mmap:
        if f not in self._maps:
            with open(f, "rb") as fh:
                self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[f]

    def raw(self, name: str) -> np.ndarray:
        e = self._entries[name]
        return np.frombuffer(self._map(e.file), dtype=np.uint8, count=e.end - e.start, offset=e.start)

    def locate(self, name: str) -> tuple[Path, int, int]:
        e = self._entries[name]
        return e.file, e.start, e.end - e.start

    def floats(self, name: str) -> np.ndarray:
        e = self._entries[name]
        if e.dtype not in _ST_TYPES:
            raise UnsupportedError(f"{e.file}: tensor {name} has dtype {e.dtype}; only float tensors can be decoded")
        arr = self.raw(name).view(_ST_TYPES[e.dtype])
        out = bf16_to_f32(arr) if e.dtype == "BF16" else arr.astype(np.float32)
        return out.reshape(e.shape)

    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)

    def target_tensor(self, hf_name: str) -> str | None:
        if hf_name in self._entries:
            return hf_name
        try:
            ref = parse_hf_name(hf_name)
        except UnsupportedError:
            return None
        suffix = f"layers.{ref.layer}.mlp.{ref.module}.weight"
        hits = [n for n in self._entries if n == suffix or n.endswith("." + suffix)]
        return hits[0] if len(hits) == 1 else None

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a numpy view is alive; the map goes with it
                pass
        self._maps.clear()


def open_model(path: str | os.PathLike) -> ModelFile:
    """Open a ``.gguf`` file or a safetensors model (directory or file)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such model file or directory")
    if p.is_file() and p.suffix == ".gguf":
        return GGUFModel(p)
    return SafetensorsModel(p)


def neuron_vectors(values: np.ndarray, axis: str, idx: np.ndarray) -> np.ndarray:
    """``(n, d)`` neuron vectors: rows ``idx`` (row axis) or columns ``idx`` transposed (col axis)."""
    return np.ascontiguousarray(values[idx, :] if axis == AXIS_ROW else values[:, idx].T)


__all__ = ["FLOAT_TYPES", "TensorInfo", "ModelFile", "GGUFModel", "SafetensorsModel", "open_model", "neuron_vectors"]
