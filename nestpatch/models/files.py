"""The one model-file layer: open any model argument, describe it, locate and read its tensors.

A model argument is a named asset (``smollm2``), a ``.gguf`` file, an HF model directory
(single file, sharded with or without index) or a lone ``.safetensors`` file. Everything that
reads a base model without torch goes through here: the folds, the exporters, ``verify`` and
the base checks. Nothing here modifies a file; tensor data is reached through read-only memory
maps, so reading the touched rows of a 10 GB shard reads a few pages.

Why not ``safetensors.safe_open``: the fold must keep every byte it does not change, so it needs
the exact header bytes and data offsets of each shard, and it must read bfloat16 rows without
torch (numpy has no bfloat16). Why not gguf-py's GGUFReader: it decodes every tokenizer string
up front (~10 s on a 49k-token vocabulary, against ~0.3 s for :mod:`.gguf_layout`).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BaseMismatchError, FormatError, InputError, UnsupportedError
from ..format.constants import AXIS_ROW, BaseKey
from ..format.patch import Target
from ..format.safetensors_io import bf16_to_f32, read_header
from .gguf_layout import parse_layout
from .naming import hf_to_gguf, parse_hf_name

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


def map_readonly(path: Path) -> mmap.mmap:
    """A read-only memory map of a whole file."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def unmap(mm: mmap.mmap | None) -> None:
    """Close a map; while a numpy view of it is alive it stays open and goes with the view."""
    if mm is not None:
        try:
            mm.close()
        except BufferError:
            pass


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

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._mm = map_readonly(self.path)
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as a flat, read-only uint8 view."""
        e = self.entries[name]
        return np.frombuffer(self._map(), dtype=np.uint8, count=e.end - e.start, offset=self.data_start + e.start)

    def view(self, name: str) -> np.ndarray:
        """Read-only numpy view of a foldable tensor in its storage dtype (BF16 as raw uint16)."""
        e = self.entries[name]
        if e.dtype not in _STORAGE:
            raise UnsupportedError(f"{self.path}: tensor {name} has dtype {e.dtype}; folding needs F32, F16 or BF16")
        count = int(np.prod(e.shape)) if e.shape else 1
        arr = np.frombuffer(self._map(), dtype=_STORAGE[e.dtype], count=count, offset=self.data_start + e.start)
        return arr.reshape(e.shape)

    def close(self) -> None:
        unmap(self._mm)
        self._mm = None


def parse_shard(path: str | os.PathLike) -> Shard:
    """Parse and check a safetensors header (offsets in bounds, contiguous, sizes consistent).

    Raises:
        FormatError: naming the file and the broken rule (a truncated file, for instance).
    """
    path = Path(path)
    raw = read_header(path, limit=MAX_HEADER, strict=False)
    header, data_len = raw.header, raw.size - raw.data_start
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
            raise FormatError(f"{path}: tensor {name!r} holds {end - start} bytes, "
                              f"expected {int(np.prod(shape))} x {ITEMSIZE[dtype]} for {dtype} {list(shape)}")
        entries[name] = Entry(dtype, shape, start, end)
    return Shard(path=path, header_bytes=raw.header_bytes, header=header, entries=entries, size=raw.size)


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
        if root.suffix.lower() != ".safetensors":
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
            if name in layout.weight_map:
                raise FormatError(f"{root / f}: tensor {name!r} also appears in {layout.weight_map[name]}")
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


def describe_gguf(layout: Any, label: str) -> dict:
    """Base description (architecture and sizes) from a parsed GGUF header (``GGUFLayout``).

    Raises:
        FormatError: the file names no architecture.
    """
    from gguf import Keys

    arch = layout.kv(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise FormatError(f"{label}: GGUF has no {Keys.General.ARCHITECTURE}")

    def num(key: str) -> int | None:
        v = layout.kv(key.format(arch=arch))
        if v is None:
            return None
        if isinstance(v, np.ndarray):  # per-layer values (some architectures): only a constant compares
            return int(v[0]) if v.size and bool((v == v[0]).all()) else None
        return int(v)

    return {BaseKey.ARCHITECTURE: arch, BaseKey.D_MODEL: num(Keys.LLM.EMBEDDING_LENGTH),
            BaseKey.N_FF: num(Keys.LLM.FEED_FORWARD_LENGTH), BaseKey.N_LAYERS: num(Keys.LLM.BLOCK_COUNT)}


def describe_hf_config(config: Any) -> dict:
    """Base description (sizes) from a transformers config object (a live torch model's ``config``)."""
    if config is None:
        return {}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return describe_config({k: getattr(text, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
                           | {"model_type": getattr(config, "model_type", None)})



def path_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or of every file under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix, in any case): the one dispatch test."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and not p.is_dir()


# ------------------------------------------------------------------------------------------ model files

#: Types stored as plain floats: a fold of these must be bit-exact.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
_ST_TYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


@dataclass
class TensorInfo:
    name: str
    type: str  # "F32", "Q4_1", "BF16", ...
    shape: tuple[int, ...]  # HF orientation (rows, cols) for 2-D tensors

    @property
    def quantized(self) -> bool:
        return self.type not in FLOAT_TYPES


class ModelFile:
    """Read-only access shared by :class:`GGUFModel` and :class:`SafetensorsModel`."""

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

    def describe(self) -> dict:
        """Base description (architecture and sizes, as far as the file says) for :func:`check_description`."""
        raise NotImplementedError

    def target_tensor(self, hf_name: str) -> str | None:
        """The name of a patch target's tensor in this file, or None when it has none."""
        raise NotImplementedError

    def neuron_vectors(self, target: Target) -> np.ndarray:
        """The file's vectors of ``target``'s neurons, float32 ``(n, d)``, checking name and shape.

        Raises:
            BaseMismatchError: no such tensor, or a shape other than the patch's.
        """
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GGUFModel(ModelFile):
    """A GGUF file through the layout parser (:mod:`.gguf_layout`) (spans of every entry, no tokenizer decoding)."""

    format = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.layout = parse_layout(self.path)
        self._t = {t.name: t for t in self.layout.tensors}
        self.tensors = {t.name: TensorInfo(t.name, t.qtype.name, tuple(int(s) for s in t.shape)) for t in self.layout.tensors}
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._mm = map_readonly(self.path)
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        t = self._t[name]
        return np.frombuffer(self._map(), dtype=np.uint8, count=t.nbytes, offset=self.layout.data_start + t.offset)

    def locate(self, name: str) -> tuple[Path, int, int]:
        t = self._t[name]
        return self.path, self.layout.data_start + t.offset, t.nbytes

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
        for e in self.layout.kvs:
            v = e.value
            if v is None:
                v = bytes(mm[e.start:e.end])  # string arrays (tokenizer vocabularies): compared byte for byte
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            out[e.key] = v
        return out

    def describe(self) -> dict:
        return describe_gguf(self.layout, str(self.path))

    def target_tensor(self, hf_name: str) -> str | None:
        try:
            name = hf_to_gguf(hf_name)
        except UnsupportedError:
            return None
        return name if name in self.tensors else None

    def neuron_vectors(self, target: Target) -> np.ndarray:
        """Decodes only the quantization blocks that hold the target's neurons."""
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        gname = hf_to_gguf(target.name)
        info = self._t.get(gname)
        if info is None:
            raise BaseMismatchError(f"{self.path}: has no tensor {gname} (patch target {target.name})")
        if tuple(info.shape) != tuple(target.shape):
            raise BaseMismatchError(f"{self.path}: tensor {gname} has shape {list(info.shape)}, the patch expects {list(target.shape)}")
        bs, ts = GGML_QUANT_SIZES[info.qtype]
        blocks = self.raw(gname).reshape(info.n_rows, info.row_len // bs, ts)  # (rows, blocks per row, type size)
        idx = np.asarray(target.indices, np.int64)
        if target.axis == AXIS_ROW:  # neuron j = row j: decode those rows
            raw = blocks[idx]  # (n, B, ts)
            return np.asarray(dequantize(raw.reshape(-1, ts), info.qtype), np.float32).reshape(len(idx), -1)  # (n, in)
        cols = np.unique(idx // bs)  # column axis: only the blocks holding a patched column, in every row
        values = np.asarray(dequantize(blocks[:, cols].reshape(-1, ts), info.qtype), np.float32).reshape(info.n_rows, -1)
        pos = np.searchsorted(cols, idx // bs) * bs + idx % bs  # (n,) positions inside the decoded columns
        return np.ascontiguousarray(values[:, pos].T)  # (n, out)

    def close(self) -> None:
        unmap(self._mm)
        self._mm = None


class SafetensorsModel(ModelFile):
    """An HF model directory (single file, sharded with or without index) or a lone file."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.layout = discover(self.path)
        self.tensors = {}
        for name, fname in self.layout.weight_map.items():
            e = self.layout.shard(fname).entries.get(name)
            if e is None:
                raise FormatError(f"{self.layout.base_dir / fname}: the index maps {name} to this file but it does not hold it")
            self.tensors[name] = TensorInfo(name, e.dtype, e.shape)

    def _shard(self, name: str) -> Shard:
        return self.layout.shard(self.layout.weight_map[name])

    def raw(self, name: str) -> np.ndarray:
        return self._shard(name).raw(name)

    def locate(self, name: str) -> tuple[Path, int, int]:
        shard = self._shard(name)
        e = shard.entries[name]
        return shard.path, shard.data_start + e.start, e.end - e.start

    def floats(self, name: str) -> np.ndarray:
        shard = self._shard(name)
        e = shard.entries[name]
        if e.dtype not in _ST_TYPES:
            raise UnsupportedError(f"{shard.path}: tensor {name} has dtype {e.dtype}; only float tensors can be decoded")
        arr = shard.raw(name).view(_ST_TYPES[e.dtype])
        out = bf16_to_f32(arr) if e.dtype == "BF16" else arr.astype(np.float32)
        return out.reshape(e.shape)

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.layout.weight_files:
            for k, v in self.layout.shard(f).metadata.items():
                out.setdefault(k, v)
        return out

    def describe(self) -> dict:
        return describe_config(self.layout.config())

    def target_tensor(self, hf_name: str) -> str | None:
        if hf_name in self.tensors:
            return hf_name
        try:
            ref = parse_hf_name(hf_name)
        except UnsupportedError:
            return None
        suffix = f"layers.{ref.layer}.mlp.{ref.module}.weight"
        hits = [n for n in self.tensors if n == suffix or n.endswith("." + suffix)]
        return hits[0] if len(hits) == 1 else None

    def neuron_vectors(self, target: Target) -> np.ndarray:
        return self.layout.neuron_vectors(target)

    def close(self) -> None:
        self.layout.close()


def open_model(spec: str | os.PathLike) -> ModelFile:
    """Open a model argument: a named asset, a ``.gguf`` file, or a safetensors model (directory or file).

    Raises:
        InputError: nothing there, or no weights in it.
    """
    from ..assets import resolve_model

    p = resolve_model(spec)
    if not p.exists():
        raise InputError(f"{p}: no such model file or directory")
    if is_gguf(p):
        return GGUFModel(p)
    return SafetensorsModel(p)


def check_patch_fits(patch: Any, spec: str | os.PathLike) -> tuple[Path, dict]:
    """Refuse a model file the patch was not made for: sizes first, then the fingerprint.

    Reads headers and only the touched neurons' bytes. Returns the model's path and description
    (with ``format``: ``gguf`` or ``safetensors``).

    Raises:
        BaseMismatchError: the patch was made for another model.
        InputError: no such model.
    """
    from ..fingerprint import check_base, check_description

    with open_model(spec) as model:
        desc = model.describe()
        check_description(patch, desc, str(model.path))
        check_base(patch, model.neuron_vectors, str(model.path))
        return model.path, {**desc, "format": model.format}


#: ``(n, d)`` neuron vectors of a full tensor: rows ``idx`` (row axis) or columns ``idx`` transposed.
neuron_vectors = gather
