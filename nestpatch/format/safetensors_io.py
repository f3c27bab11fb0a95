"""A small, strict, numpy-only safetensors codec.

Why not ``safetensors.numpy``: numpy has no bfloat16, and a reader facing hostile files must
bound every size before it allocates. Files written here are plain safetensors and open in
every safetensors tool; files read here are checked offset by offset.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from .constants import MAX_DIM, MAX_HEADER_BYTES

#: safetensors dtype name -> (numpy dtype used for storage, element size)
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; see bf16_to_f32 / f32_to_bf16
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
}


class _JSONReject(ValueError):
    """A JSON text that parses but breaks the strict rules (duplicate key, NaN/Infinity)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _JSONReject(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise _JSONReject(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    x = float(text)
    if x != x or x in (float("inf"), float("-inf")):
        raise _JSONReject(f"number {text[:20]} is out of range (not a finite double)")
    return x


def strict_loads(text: str | bytes, where: str) -> Any:
    """``json.loads`` that refuses duplicate keys and NaN/Infinity anywhere (FormatError naming ``where``).

    A duplicate key is how two readers come to see two different documents (the first or the
    last value wins), which is exactly what a signature must not allow.
    """
    return _loads(text, where, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite_float)


def _loads(text: str | bytes, where: str, **hooks: Any) -> Any:
    """``json.loads`` whose every failure is a one-line FormatError naming ``where``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, **hooks)
    except _JSONReject as e:
        raise FormatError(f"{where}: {e}") from None
    except UnicodeDecodeError:
        raise FormatError(f"{where}: not valid UTF-8") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise FormatError(f"{where}: not valid JSON ({type(e).__name__})") from None


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (round to nearest even), as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((u >> 16) & 1) + 0x7FFF
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def encode_array(x: np.ndarray, dtype: str) -> bytes:
    """Encode a numpy array as the raw little-endian bytes of safetensors ``dtype``."""
    if dtype == "BF16":
        return f32_to_bf16(np.asarray(x, dtype=np.float32)).tobytes()
    return np.ascontiguousarray(x, dtype=_DTYPES[dtype]).tobytes()


def decode_array(raw: np.ndarray | bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode raw bytes into a numpy array (BF16 widened to float32)."""
    arr = np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        return bf16_to_f32(arr).reshape(shape)
    return arr


def dumps(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    """Serialize ``{name: (dtype, array)}`` plus string metadata to safetensors bytes.

    Tensors are laid out in sorted name order; the header is padded with spaces to 8 bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        blob = encode_array(arr, dtype)
        header[name] = {"dtype": dtype, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    hbytes = encode_header(header)
    return struct.pack("<Q", len(hbytes)) + hbytes + b"".join(blobs)


def encode_header(header: dict[str, Any]) -> bytes:
    """Header bytes as the reference implementation lays them out: compact ASCII JSON padded with spaces to 8 bytes."""
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    return raw + b" " * ((8 - len(raw) % 8) % 8)


@dataclass(frozen=True)
class RawHeader:
    """A safetensors header as read by :func:`read_header`."""

    header: dict[str, Any]  # the decoded JSON object, key order kept, ``__metadata__`` included
    header_bytes: bytes  # the JSON header exactly as stored (padding included)
    size: int  # bytes in the whole file

    @property
    def data_start(self) -> int:
        return 8 + len(self.header_bytes)


def read_header(path: str | os.PathLike, *, limit: int = MAX_HEADER_BYTES, strict: bool = True,
                expected: str = "a safetensors file", gguf_hint: str = "") -> RawHeader:
    """Read and decode the header of the safetensors file at ``path``: the one place that does.

    Checks the 8-byte length against ``limit`` and the file size before reading, then decodes
    the JSON object. ``strict`` refuses duplicate keys and NaN/Infinity (:func:`strict_loads`);
    otherwise any JSON is taken, as other safetensors readers do. Tensor entries are the
    caller's to check. ``expected`` names what the file should be, for the messages;
    ``gguf_hint`` ends the message for a GGUF model given in its place.

    Raises:
        FormatError: one line naming the file (missing, a directory, a GGUF model, truncated,
            header too large, not UTF-8 JSON, not an object).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, expected {expected}")
    if size < 8:
        raise FormatError(f"{path}: truncated: {size} bytes, expected at least an 8-byte header length")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"GGUF":
                raise FormatError(f"{path}: this is a GGUF model, not {expected}{gguf_hint}")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > limit:
                raise FormatError(f"{path}: header length {hlen} exceeds the limit of {limit} bytes")
            if 8 + hlen > size:
                raise FormatError(f"{path}: truncated: header claims {hlen} bytes, file has {size - 8} after the length")
            hraw = f.read(hlen)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    header = (strict_loads if strict else _loads)(hraw, f"{path}: header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return RawHeader(header, hraw, size)


class SafetensorsFile:
    """A validated, memory-mapped view of a safetensors file.

    All header fields are checked before any tensor is touched: offsets in bounds, contiguous,
    non-overlapping, sizes consistent with dtype and shape, header size bounded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        raw = read_header(self.path, expected="a .nestpatch file", gguf_hint="; did you swap MODEL and PATCH?")
        header = dict(raw.header)
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise FormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self._data_start = raw.data_start
        data_len = raw.size - self._data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            self.entries[name] = self._check_entry(name, info, data_len)
            spans.append((self.entries[name][2], self.entries[name][3], name))
        spans.sort()
        pos = 0
        for start, end, name in spans:
            if start != pos:
                what = "overlaps the previous tensor" if start < pos else "leaves a gap before it"
                raise FormatError(f"{self.path}: tensor {name!r} starts at byte {start}, which {what} (expected {pos})")
            pos = end
        if pos != data_len:
            raise FormatError(f"{self.path}: tensors cover {pos} data bytes but the file holds {data_len}")
        self._mmap: mmap.mmap | None = None

    def _check_entry(self, name: str, info: Any, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise FormatError(f"{where}: header entry must be an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            raise FormatError(f"{where}: dtype {dtype!r} not supported (expected one of {sorted(_DTYPES)})")
        if not isinstance(shape, list) or not all(type(s) is int and 0 <= s <= MAX_DIM for s in shape) or len(shape) > 4:
            raise FormatError(f"{where}: shape {shape!r} is invalid (expected up to 4 non-negative ints <= {MAX_DIM})")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise FormatError(f"{where}: data_offsets {offs!r} must be two integers")
        start, end = offs
        if not (0 <= start <= end <= data_len):
            raise FormatError(f"{where}: data_offsets [{start}, {end}] out of bounds (data is {data_len} bytes)")
        n = 1
        for s in shape:
            n *= s
        expected = n * _DTYPES[dtype].itemsize
        if end - start != expected:
            raise FormatError(f"{where}: holds {end - start} bytes, expected {expected} for {dtype} {shape}")
        return dtype, tuple(shape), start, end

    def _buffer(self) -> mmap.mmap | bytes:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                if self.path.stat().st_size == 0:
                    return b""
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def raw(self, name: str) -> memoryview:
        """Raw little-endian bytes of a tensor (zero-copy view of the memory map)."""
        _, _, start, end = self.entries[name]
        buf = self._buffer()
        return memoryview(buf)[self._data_start + start : self._data_start + end]

    def get(self, name: str) -> np.ndarray:
        """Decoded tensor (read-only view; BF16 is widened to a float32 copy)."""
        dtype, shape, _, _ = self.entries[name]
        return decode_array(self.raw(name), dtype, shape)
