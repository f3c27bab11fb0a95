"""The touched blocks of one GGUF tensor: where they are, their bytes, their float values.

A target's neurons live in rows (gate/up: neuron j is row j of the GGUF numpy view) or columns
(down: neuron j is column j). A region is the cross product ``rows x blocks`` of the tensor's
quantization blocks that hold those neurons:

* row axis: the patched rows, every block of each row;
* col axis: every row, and in each row only the block(s) holding a patched column.

Only these blocks are decoded, changed and re-encoded; every other byte of the tensor is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nestpatch.format.constants import AXIS_ROW
from nestpatch.format.patch import Target

from . import gguf_codecs as codecs
from .gguf_io import CHUNK_BYTES, pread_exact
from nestpatch.models.gguf_layout import TensorInfo

QType = codecs.QType


@dataclass
class Region:
    """Touched blocks of one tensor, and what the fold decided for them."""

    target: Target
    info: TensorInfo
    rows: np.ndarray  # int64 (R,) sorted row indices
    blocks: np.ndarray  # int64 (B,) sorted block indices within a row
    raw: np.ndarray | None = None  # uint8 (R, B, type_size): the original bytes
    out_type: QType | None = None
    new_raw: np.ndarray | None = None  # uint8 (R, B, type_size) when the type is kept
    retention: float = 1.0
    rel_error: float = 0.0

    @property
    def axis(self) -> str:
        return self.target.axis

    @property
    def all_rows(self) -> bool:
        return self.rows.shape[0] == self.info.n_rows

    @property
    def bs(self) -> int:
        return codecs.block_size(self.info.qtype)

    @property
    def n_blocks(self) -> int:
        return int(self.rows.shape[0] * self.blocks.shape[0])

    @property
    def blocks_total(self) -> int:
        return self.info.n_rows * (self.info.row_len // self.bs)

    def col_positions(self) -> np.ndarray:
        """Col axis: position of each patched column inside the region's columns ``(n,)``."""
        idx = np.asarray(self.target.indices, dtype=np.int64)
        return np.searchsorted(self.blocks, idx // self.bs) * self.bs + idx % self.bs


def make_region(target: Target, info: TensorInfo) -> Region:
    bs = codecs.block_size(info.qtype)
    idx = np.asarray(target.indices, dtype=np.int64)
    if target.axis == AXIS_ROW:
        rows, blocks = idx, np.arange(info.row_len // bs, dtype=np.int64)
    else:
        rows, blocks = np.arange(info.n_rows, dtype=np.int64), np.unique(idx // bs)
    return Region(target, info, rows, blocks)


def read_region(fd: int, data_start: int, reg: Region) -> np.ndarray:
    """The original bytes of the region, uint8 ``(R, B, type_size)``; memory bounded by a chunk."""
    info = reg.info
    ts = codecs.type_size(info.qtype)
    rb = info.row_bytes
    base = data_start + info.offset
    nb_row = info.row_len // reg.bs
    out = np.empty((reg.rows.shape[0], reg.blocks.shape[0], ts), dtype=np.uint8)
    if not reg.all_rows:  # row axis: read whole rows, one positional read each
        for i, r in enumerate(reg.rows):
            row = np.frombuffer(pread_exact(fd, rb, base + int(r) * rb), dtype=np.uint8).reshape(nb_row, ts)
            out[i] = row[reg.blocks]
        return out
    chunk_rows = max(1, CHUNK_BYTES // rb)
    for r0 in range(0, info.n_rows, chunk_rows):
        r1 = min(info.n_rows, r0 + chunk_rows)
        buf = np.frombuffer(pread_exact(fd, (r1 - r0) * rb, base + r0 * rb), dtype=np.uint8)
        out[r0:r1] = buf.reshape(r1 - r0, nb_row, ts)[:, reg.blocks]
    return out


def decode_blocks(raw: np.ndarray, qtype: QType, bs: int) -> np.ndarray:
    """uint8 ``(R, B, ts)`` -> float32 ``(R, B * bs)`` (blocks decode independently)."""
    r, b, ts = raw.shape
    return codecs.dequantize_rows(raw.reshape(r * b, ts), qtype, bs).reshape(r, b * bs)


def encode_blocks(values: np.ndarray, qtype: QType, bs: int) -> np.ndarray:
    """float32 ``(R, B * bs)`` -> uint8 ``(R, B, ts_out)``: each block of ``bs`` values on its own.

    ``qtype``'s block size must divide ``bs`` (always so for an upcast: 256 -> 32 -> 1).
    """
    r = values.shape[0]
    b = values.shape[1] // bs
    enc = codecs.quantize_rows(values.reshape(r * b, bs), qtype)  # (R*B, bs-values encoded)
    return enc.reshape(r, b, enc.shape[-1])


def add_region_delta(reg: Region, values: np.ndarray) -> np.ndarray:
    """Add the patch to the decoded region ``(R, B * bs)`` in place; return the changed values.

    Returns ``(n, d)`` (row axis: whole rows) or ``(R, n)`` (col axis: the patched columns).
    """
    nd = reg.target.neuron_deltas()  # (n, d)
    if reg.axis == AXIS_ROW:
        values += nd  # rows are the neurons, blocks cover the full row
        return values
    pos = reg.col_positions()
    values[:, pos] += nd.T  # (R, n)
    return values[:, pos]


def neuron_vectors(reg: Region, base: np.ndarray) -> np.ndarray:
    """The base model's vectors of the patched neurons ``(n, d)`` from the decoded region."""
    if reg.axis == AXIS_ROW:
        return base
    return np.ascontiguousarray(base[:, reg.col_positions()].T)


def apply_chunk_delta(reg: Region, values: np.ndarray, r0: int) -> None:
    """Add the patch to full decoded rows ``[r0, r0 + len(values))`` of the tensor, in place."""
    nd = reg.target.neuron_deltas()  # (n, d)
    r1 = r0 + values.shape[0]
    if reg.axis == AXIS_ROW:
        lo, hi = np.searchsorted(reg.rows, [r0, r1])
        if hi > lo:
            values[reg.rows[lo:hi] - r0] += nd[lo:hi]
    else:
        idx = np.asarray(reg.target.indices, dtype=np.int64)
        values[:, idx] += nd[:, r0:r1].T  # (rows in chunk, n)


def iter_row_chunks(info: TensorInfo, max_bytes: int) -> list[tuple[int, int]]:
    rb = max(1, info.row_bytes)
    step = max(1, max_bytes // rb)
    return [(r0, min(info.n_rows, r0 + step)) for r0 in range(0, info.n_rows, step)]


def read_rows(fd: int, data_start: int, info: TensorInfo, r0: int, r1: int) -> np.ndarray:
    """Raw rows ``[r0, r1)`` of a tensor, uint8 ``(r1 - r0, row_bytes)``."""
    rb = info.row_bytes
    buf = pread_exact(fd, (r1 - r0) * rb, data_start + info.offset + r0 * rb)
    return np.frombuffer(buf, dtype=np.uint8).reshape(r1 - r0, rb)


