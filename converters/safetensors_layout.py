"""Where the tensors of a Hugging Face model live, and zero-copy access to the rows a patch touches.

Why not ``safetensors.safe_open``: the fold must keep every byte it does not change, so it needs
the exact header bytes and data offsets of each shard, and it must read bfloat16 rows without
torch (numpy has no bfloat16). Headers are parsed and checked here; tensor data is reached
through a read-only memory map, so reading the touched rows of a 10 GB shard reads a few pages.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nestpatch.errors import BaseMismatchError, FormatError, InputError, UnsupportedError
from nestpatch.format.constants import AXIS_ROW, BaseKey
from nestpatch.format.patch import Target
from nestpatch.format.safetensors_io import bf16_to_f32
from nestpatch.models.naming import parse_hf_name

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
#: Largest safetensors header accepted (the reference implementation's limit).
MAX_HEADER = 100_000_000
#: Bytes per element of every safetensors dtype with a whole-byte size.
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}
#: dtypes a fold can change: arithmetic in float32, cast back to the same dtype.
FOLDABLE = ("F32", "F16", "BF16")
_STORAGE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass
class Entry:
    """One tensor of a shard: dtype, shape and byte span inside the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class Shard:
    """A parsed safetensors file: exact header bytes, header JSON (order kept) and entries."""

    path: Path
    header_bytes: bytes  # the JSON header exactly as stored (padding included)
    header: dict[str, Any]  # parsed header, key order kept, __metadata__ included
    entries: dict[str, Entry]
    size: int
    _mm: mmap.mmap | None = field(default=None, repr=False)

    @property
    def data_start(self) -> int:
        return 8 + len(self.header_bytes)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.get("__metadata__") or {})

    def view(self, name: str) -> np.ndarray:
        """Read-only numpy view of a foldable tensor in its storage dtype (BF16 as raw uint16)."""
        e = self.entries[name]
        if e.dtype not in _STORAGE:
            raise UnsupportedError(f"{self.path}: tensor {name} has dtype {e.dtype}; folding needs F32, F16 or BF16")
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = int(np.prod(e.shape)) if e.shape else 1
        arr = np.frombuffer(self._mm, dtype=_STORAGE[e.dtype], count=count, offset=self.data_start + e.start)
        return arr.reshape(e.shape)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a numpy view is still alive; the map is freed with it
                pass
            self._mm = None


def parse_shard(path: str | os.PathLike) -> Shard:
    """Parse and check a safetensors header (offsets in bounds, contiguous, sizes consistent).

    Raises:
        FormatError: naming the file and the broken rule (a truncated file, for instance).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated: {size} bytes, a safetensors file starts with an 8-byte header length")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise FormatError(f"{path}: header length {hlen} is invalid for a file of {size} bytes (truncated or not safetensors)")
            hbytes = f.read(hlen)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(hbytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: safetensors header is not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - hlen
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: header entry for tensor {name!r} is malformed") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise FormatError(f"{path}: tensor {name!r}: data_offsets [{start}, {end}] out of bounds (data is {data_len} bytes; truncated?)")
        if dtype in ITEMSIZE and end - start != int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]:
            raise FormatError(f"{path}: tensor {name!r} holds {end - start} bytes, expected {int(np.prod(shape))} x {ITEMSIZE[dtype]} for {dtype} {list(shape)}")
        entries[name] = Entry(dtype, shape, start, end)
    return Shard(path=path, header_bytes=hbytes, header=header, entries=entries, size=size)


def encode_header(header: dict[str, Any]) -> bytes:
    """Header bytes as the reference implementation lays them out: compact JSON padded to 8 bytes."""
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    return raw + b" " * ((8 - len(raw) % 8) % 8)


@dataclass
class ModelLayout:
    """An HF model directory (or a lone safetensors file) as the fold sees it.

    Attributes:
        root: the directory, or the file itself for a lone ``.safetensors`` file.
        is_dir: whether ``root`` is a directory.
        weight_files: weight file names relative to the directory (the file name when lone).
        weight_map: tensor name -> weight file name (from the index, or from the headers).
        index_file: the index file name, if the model is sharded with one.
    """

    root: Path
    is_dir: bool
    weight_files: list[str]
    weight_map: dict[str, str]
    index_file: str | None = None
    _shards: dict[str, Shard] = field(default_factory=dict, repr=False)

    @property
    def base_dir(self) -> Path:
        return self.root if self.is_dir else self.root.parent

    def shard(self, fname: str) -> Shard:
        if fname not in self._shards:
            self._shards[fname] = parse_shard(self.base_dir / fname)
        return self._shards[fname]

    def close(self) -> None:
        for s in self._shards.values():
            s.close()

    def config(self) -> dict:
        """``config.json`` next to the weights, or ``{}`` when there is none."""
        p = self.base_dir / "config.json"
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{p}: not valid JSON ({e})") from None

    def resolve(self, target: Target) -> tuple[str, str]:
        """``(weight file, tensor name)`` of a patch target, checking name, shape and dtype.

        Tries the exact HF name first, then the same layer/module under another prefix
        (``model.language_model.layers...`` in multimodal checkpoints).

        Raises:
            UnsupportedError: fused or MoE tensors, or a dtype that cannot be folded.
            BaseMismatchError: no such tensor, or a shape other than the patch's.
        """
        name = target.name
        if name not in self.weight_map:
            ref = parse_hf_name(name)  # refuses fused/MoE names with a clear message
            suffix = re.compile(rf"(^|\.)layers\.{ref.layer}\.mlp\.{ref.module}\.weight$")
            hits = [k for k in self.weight_map if suffix.search(k)]
            if len(hits) != 1:
                raise BaseMismatchError(
                    f"{self.root}: has no tensor {name} (the patch targets it; "
                    f"{'several candidates: ' + ', '.join(hits[:3]) if hits else 'is the patch for another model?'})"
                )
            name = hits[0]
        fname = self.weight_map[name]
        entry = self.shard(fname).entries.get(name)
        if entry is None:
            raise FormatError(f"{self.base_dir / fname}: the index maps {name} to this file but it does not hold it")
        if entry.shape != tuple(target.shape):
            raise BaseMismatchError(f"{self.base_dir / fname}: tensor {name} has shape {list(entry.shape)}, the patch expects {list(target.shape)}")
        if entry.dtype not in FOLDABLE:
            raise UnsupportedError(f"{self.base_dir / fname}: tensor {name} has dtype {entry.dtype}; folding supports {', '.join(FOLDABLE)}")
        return fname, name

    def neuron_vectors(self, target: Target) -> np.ndarray:
        """The touched neuron vectors of ``target`` as float32 ``(n, d)``; reads only those values."""
        fname, name = self.resolve(target)
        shard = self.shard(fname)
        raw = gather(shard.view(name), target.axis, np.asarray(target.indices, np.int64))  # (n, d) storage dtype
        return to_f32(raw, shard.entries[name].dtype)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored values (BF16 as uint16 bits) to float32."""
    if dtype == "BF16":
        return bf16_to_f32(np.ascontiguousarray(raw))
    return np.asarray(raw, dtype=np.float32)


def gather(view: np.ndarray, axis: str, idx: np.ndarray) -> np.ndarray:
    """Neuron vectors as ``(n, d)``: rows ``idx`` (row axis) or columns ``idx`` transposed (col axis)."""
    return np.ascontiguousarray(view[idx, :] if axis == AXIS_ROW else view[:, idx].T)


def discover(model_path: str | os.PathLike) -> ModelLayout:
    """Find the weight files of an HF directory (index or ``*.safetensors``) or a lone file.

    Raises:
        InputError: nothing there, or no safetensors weights.
    """
    root = Path(model_path)
    if not root.exists():
        raise InputError(f"{root}: no such model file or directory")
    if root.is_file():
        if root.suffix != ".safetensors":
            raise InputError(f"{root}: expected a .safetensors file, an HF model directory or a .gguf file")
        shard = parse_shard(root)
        layout = ModelLayout(root, False, [root.name], {n: root.name for n in shard.entries})
        layout._shards[root.name] = shard
        return layout
    index = root / INDEX_NAME
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(wmap, dict)
        except (OSError, json.JSONDecodeError, KeyError, AssertionError):
            raise FormatError(f"{index}: not a valid safetensors index (expected a JSON object with weight_map)") from None
        files = sorted(set(wmap.values()))
        for f in files:
            if not (root / f).is_file():
                raise InputError(f"{index}: refers to {f}, which is missing from {root}")
        return ModelLayout(root, True, files, dict(wmap), INDEX_NAME)
    files = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        raise InputError(f"{root}: model directory holds no *.safetensors weights")
    layout = ModelLayout(root, True, files, {})
    for f in files:
        for name in layout.shard(f).entries:
            layout.weight_map[name] = f
    return layout


def describe_config(config: dict) -> dict:
    """Base description (sizes) from an HF ``config.json``, for the cheap first check."""
    text = config.get("text_config") or config
    desc = {}
    for key, cfg_key in ((BaseKey.D_MODEL, "hidden_size"), (BaseKey.N_FF, "intermediate_size"), (BaseKey.N_LAYERS, "num_hidden_layers")):
        v = text.get(cfg_key, config.get(cfg_key))
        if isinstance(v, int):
            desc[key] = v
    if config.get("model_type"):
        desc[BaseKey.ARCHITECTURE] = config["model_type"]
    return desc
