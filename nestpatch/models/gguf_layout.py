"""The byte layout of a GGUF file (v2/v3, little-endian), parsed fast and kept as byte spans.

Why not gguf-py's GGUFReader: it decodes every KV entry into numpy views, which takes seconds on
a real tokenizer (98k strings), and it keeps no notion of "the exact bytes of entry k". The fold
must copy every existing KV entry and tensor info byte for byte and append its own entries, and
revert must strip them again; so this parser records the span of each entry and decodes only
scalars, strings and numeric arrays (string arrays are skipped, not decoded).

Layout: magic ``GGUF`` | version u32 | tensor_count u64 | kv_count u64 | KV entries | tensor infos
| zero padding to ``general.alignment`` (default 32) | tensor data (each tensor at an aligned
offset relative to the data start).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from nestpatch.errors import FormatError, UnsupportedError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = Keys.General.ALIGNMENT

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}
#: Numeric arrays longer than this are not decoded (their span is still recorded).
_MAX_DECODED_ARRAY = 1 << 16


@dataclass
class KVEntry:
    key: str
    vtype: GGUFValueType
    start: int  # absolute offset of the entry (its key length field)
    end: int  # absolute offset just past the entry
    value: Any = None  # decoded scalar / str / numpy array; None for string arrays and huge arrays


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    qtype: GGMLQuantizationType
    offset: int  # relative to the data start
    start: int  # absolute span of the info entry
    end: int

    @property
    def row_len(self) -> int:
        return int(self.ne[0])

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ne[1:], dtype=np.int64)) if len(self.ne) > 1 else 1

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy shape (``ne`` reversed): ``(rows, row_len)`` for matrices."""
        return tuple(reversed(self.ne))

    @property
    def row_bytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        return self.row_len // bs * ts

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.n_rows


@dataclass
class GGUFLayout:
    path: Path
    version: int
    kvs: list[KVEntry]
    tensors: list[TensorInfo]
    kv_start: int  # offset of the first KV entry (24)
    infos_start: int
    infos_end: int
    alignment: int
    data_start: int
    file_size: int

    def kv(self, key: str, default: Any = None) -> Any:
        for e in self.kvs:
            if e.key == key:
                return e.value
        return default

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    @property
    def data_end(self) -> int:
        """Absolute end of the last tensor's data."""
        return self.data_start + max((t.offset + t.nbytes for t in self.tensors), default=0)


def align(x: int, a: int) -> int:
    return x + (-x % a)


class _Cursor:
    """Reads little-endian fields from a buffer, raising FormatError on truncation."""

    def __init__(self, buf: bytes | memoryview, path: Path, pos: int = 0) -> None:
        self.buf, self.path, self.pos = buf, path, pos

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise _Short(what, self.pos + n)

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.unpack("<Q", what)
        self.need(n, what)
        self.pos += n


class _Short(Exception):
    def __init__(self, what: str, needed: int) -> None:
        super().__init__(what)
        self.what, self.needed = what, needed


def _read_value(c: _Cursor, vtype: GGUFValueType, key: str) -> Any:
    if vtype == GGUFValueType.STRING:
        return c.string(f"value of {key}")
    if vtype in _SCALAR:
        return c.unpack(_SCALAR[vtype], f"value of {key}")
    if vtype == GGUFValueType.ARRAY:
        etype = _vtype(c.unpack("<I", f"array type of {key}"), c.path, key)
        count = c.unpack("<Q", f"array length of {key}")
        if etype == GGUFValueType.STRING:
            for _ in range(count):
                c.skip_string(f"array {key}")
            return None
        if etype == GGUFValueType.ARRAY:
            raise UnsupportedError(f"{c.path}: KV {key}: nested arrays are not supported")
        isz = struct.calcsize(_SCALAR[etype])
        c.need(isz * count, f"array {key}")
        value = None
        if count <= _MAX_DECODED_ARRAY:
            value = np.frombuffer(c.buf, dtype=_NP[etype], count=count, offset=c.pos).copy()
        c.pos += isz * count
        return value
    raise FormatError(f"{c.path}: KV {key}: unknown value type {int(vtype)}")


def _vtype(v: int, path: Path, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(v)
    except ValueError:
        raise FormatError(f"{path}: KV {key}: unknown value type {v}") from None


def parse_layout(path: str | os.PathLike) -> GGUFLayout:
    """Parse header, KV entries and tensor infos of a GGUF file; check every tensor lies in the file.

    Raises:
        FormatError: not a GGUF file, an unsupported version, or truncated (names what is missing).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such GGUF file")
    file_size = path.stat().st_size
    # Headers are read in growing prefixes: most are well under a few MB (tokenizers included).
    prefix = 1 << 22
    with open(path, "rb") as f:
        while True:
            f.seek(0)
            buf = f.read(min(prefix, file_size))
            try:
                return _parse(buf, path, file_size)
            except _Short as e:
                if len(buf) >= file_size:
                    raise FormatError(f"{path}: truncated GGUF file: {e.what} needs {e.needed} bytes, "
                                      f"the file has {file_size}") from None
                prefix = max(prefix * 4, e.needed + (1 << 20))


def _parse(buf: bytes, path: Path, file_size: int) -> GGUFLayout:
    c = _Cursor(buf, path)
    c.need(4, "magic")
    if bytes(buf[:4]) != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (2, 3):
            raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
        raise FormatError(f"{path}: GGUF version {version} not supported (expected 2 or 3)")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "KV count")
    kv_start = c.pos
    kvs: list[KVEntry] = []
    for i in range(n_kv):
        start = c.pos
        key = c.string(f"key of KV entry {i}")
        vtype = _vtype(c.unpack("<I", f"type of {key}"), path, key)
        value = _read_value(c, vtype, key)
        kvs.append(KVEntry(key, vtype, start, c.pos, value))
    infos_start = c.pos
    tensors = _parse_infos(c, n_tensors)
    infos_end = c.pos
    alignment = DEFAULT_ALIGNMENT
    for e in kvs:
        if e.key == ALIGNMENT_KEY and e.value is not None:
            alignment = int(e.value)
    if alignment <= 0 or alignment % 8:
        raise FormatError(f"{path}: general.alignment {alignment} invalid (expected a positive multiple of 8)")
    data_start = align(infos_end, alignment)
    for t in tensors:
        if t.offset % alignment:
            raise FormatError(f"{path}: tensor {t.name}: data offset {t.offset} is not aligned to {alignment}")
        end = data_start + t.offset + t.nbytes
        if end > file_size:
            raise FormatError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte {end}, the file has {file_size}")
    return GGUFLayout(path, version, kvs, tensors, kv_start, infos_start, infos_end, alignment, data_start, file_size)


def _parse_infos(c: _Cursor, n_tensors: int) -> list[TensorInfo]:
    path = c.path
    tensors: list[TensorInfo] = []
    for i in range(n_tensors):
        start = c.pos
        name = c.string(f"name of tensor info {i}")
        n_dims = c.unpack("<I", f"dims of {name}")
        if not 1 <= n_dims <= 4:
            raise FormatError(f"{path}: tensor {name}: {n_dims} dimensions (expected 1 to 4)")
        ne = tuple(int(c.unpack("<Q", f"shape of {name}")) for _ in range(n_dims))
        traw = c.unpack("<I", f"type of {name}")
        offset = c.unpack("<Q", f"offset of {name}")
        try:
            qtype = GGMLQuantizationType(traw)
        except ValueError:
            raise UnsupportedError(f"{path}: tensor {name}: unknown tensor type {traw}") from None
        if qtype not in GGML_QUANT_SIZES or ne[0] % GGML_QUANT_SIZES[qtype][0]:
            raise FormatError(f"{path}: tensor {name}: row length {ne[0]} invalid for type {qtype.name}")
        tensors.append(TensorInfo(name, ne, qtype, int(offset), start, c.pos))
    return tensors


def parse_tensor_infos(buf: bytes, n_tensors: int, path: Path) -> list[TensorInfo]:
    """Tensor infos from a buffer holding exactly the info section (spans relative to ``buf``)."""
    c = _Cursor(buf, path)
    try:
        infos = _parse_infos(c, n_tensors)
    except _Short as e:
        raise FormatError(f"{path}: tensor info section is truncated ({e.what})") from None
    if c.pos != len(buf):
        raise FormatError(f"{path}: tensor info section has {len(buf) - c.pos} stray bytes")
    return infos


# ------------------------------------------------------------------------------------------- encoding


def encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, value: Any, vtype: GGUFValueType) -> bytes:
    """One KV entry (string, scalar) as GGUF bytes."""
    out = encode_string(key) + struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return out + encode_string(str(value))
    if vtype in _SCALAR:
        return out + struct.pack(_SCALAR[vtype], value)
    raise UnsupportedError(f"encode_kv: type {vtype.name} not supported")


def encode_tensor_info(name: str, ne: tuple[int, ...], qtype: GGMLQuantizationType, offset: int) -> bytes:
    out = encode_string(name) + struct.pack("<I", len(ne))
    out += b"".join(struct.pack("<Q", int(n)) for n in ne)
    return out + struct.pack("<IQ", int(qtype), int(offset))


def header_prefix(version: int, n_tensors: int, n_kv: int) -> bytes:
    return MAGIC + struct.pack("<IQQ", version, n_tensors, n_kv)


def tensor_nbytes(ne: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
    return int(ne[0]) // bs * ts * rows
