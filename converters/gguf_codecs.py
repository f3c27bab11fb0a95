"""Encode and decode rows of GGUF tensor data, one quantization type at a time.

Why a module of its own: the GGUF fold re-encodes only the blocks a patch touches, and the pico
fixtures write whole quantized files; both need the same row codec. Two engines back it:

* gguf-py's numpy codecs for F32, F16, BF16 and the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
  they are bit-exact with libggml (tests/test_gguf_codecs.py checks it), need no native code,
  and decode every type gguf-py knows (K-quants and IQ types included).
* ``ggml_quantize_chunk`` from the libggml that llama-cpp-python ships, for the K-quants
  (Q2_K..Q6_K), which gguf-py can decode but not encode. Loaded lazily through ctypes, so
  nothing here needs llama-cpp-python until a K-quant must be written.

A "row" is one innermost GGUF row (``ne[0]`` values, the last numpy axis): the length of a
row of ffn_gate/ffn_up (``d_model``) or of ffn_down (``n_ff``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from nestpatch.errors import UnsupportedError

log = logging.getLogger(__name__)

QType = GGMLQuantizationType

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
LEGACY_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0)
K_TYPES = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
#: Types this module can both decode and encode.
ENCODABLE = FLOAT_TYPES + LEGACY_TYPES + K_TYPES


def qtype_of(name_or_type: str | int | QType) -> QType:
    """``"Q4_1"`` / ``3`` / ``QType.Q4_1`` -> ``QType.Q4_1`` (case-insensitive names)."""
    if isinstance(name_or_type, QType):
        return name_or_type
    if isinstance(name_or_type, (int, np.integer)):
        return QType(int(name_or_type))
    try:
        return QType[str(name_or_type).upper()]
    except KeyError:
        raise UnsupportedError(f"unknown GGUF tensor type {name_or_type!r}") from None


def block_size(qtype: QType) -> int:
    """Values per block (1 for float types, 32 for legacy quants, 256 for K-quants)."""
    return GGML_QUANT_SIZES[qtype_of(qtype)][0]


def type_size(qtype: QType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[qtype_of(qtype)][1]


def row_bytes(qtype: QType, n: int) -> int:
    """Bytes of one encoded row of ``n`` values (``n`` must be a multiple of the block size)."""
    qtype = qtype_of(qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    if n % bs:
        raise UnsupportedError(f"{qtype.name}: row length {n} is not a multiple of the block size {bs}")
    return n // bs * ts


def can_encode(qtype: QType, n: int | None = None) -> bool:
    """Whether rows of length ``n`` of this type can be re-encoded here (K-quants need libggml)."""
    if qtype not in ENCODABLE:
        return False
    if n is not None and n % block_size(qtype):
        return False
    if qtype in K_TYPES:
        return _ggml() is not None
    return True


def can_decode(qtype: QType) -> bool:
    return qtype in FLOAT_TYPES or qtype in gq._type_traits  # noqa: SLF001 - gguf-py's registry of codecs


# --------------------------------------------------------------------------------------------- decode


def dequantize_rows(raw: np.ndarray, qtype: QType, n: int) -> np.ndarray:
    """Encoded rows ``(rows, row_bytes)`` uint8 -> float32 ``(rows, n)``."""
    qtype = qtype_of(qtype)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, row_bytes(qtype, n))
    if qtype == QType.F32:
        return raw.view(np.float32).reshape(-1, n).copy()
    if qtype == QType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, n)
    if not can_decode(qtype):
        raise UnsupportedError(f"GGUF tensor type {qtype.name} cannot be decoded")
    if _ggml() is not None and _ggml_traits(qtype) is not None:
        return _ggml_dequantize(raw, qtype, n)
    return _gq_apply(raw, qtype, decode=True).reshape(-1, n)


def numpy_dequantize_rows(raw: np.ndarray, qtype: QType, n: int) -> np.ndarray:
    """:func:`dequantize_rows` through gguf-py only (the fallback; tests compare it with libggml)."""
    qtype = qtype_of(qtype)
    if qtype in (QType.F32, QType.F16):
        return dequantize_rows(raw, qtype, n)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, row_bytes(qtype, n))
    return _gq_apply(raw, qtype, decode=True).reshape(-1, n)


# --------------------------------------------------------------------------------------------- encode


def quantize_rows(arr: np.ndarray, qtype: QType) -> np.ndarray:
    """float32 rows ``(rows, n)`` -> encoded rows uint8 ``(rows, row_bytes)``.

    Raises:
        UnsupportedError: the type cannot be encoded (IQ types, or a K-quant without libggml),
            or ``n`` is not a multiple of the type's block size.
    """
    qtype = qtype_of(qtype)
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    rows, n = a.shape
    rb = row_bytes(qtype, n)
    if qtype == QType.F32:
        return a.view(np.uint8).reshape(rows, rb).copy()
    if qtype == QType.F16:
        return a.astype(np.float16).view(np.uint8).reshape(rows, rb)
    if qtype in LEGACY_TYPES and _ggml() is not None:  # same bytes as gguf-py, ~20x faster
        return _ggml_quantize(a, qtype).reshape(rows, rb)
    if qtype in (QType.BF16,) + LEGACY_TYPES:
        return _gq_apply(a, qtype, decode=False).reshape(rows, rb)
    if qtype in K_TYPES:
        return _ggml_quantize(a, qtype).reshape(rows, rb)
    raise UnsupportedError(f"GGUF tensor type {qtype.name} cannot be encoded (supported: "
                           f"{', '.join(t.name for t in ENCODABLE)})")


def numpy_quantize_rows(arr: np.ndarray, qtype: QType) -> np.ndarray:
    """:func:`quantize_rows` through gguf-py only (BF16 and legacy types; tests compare it with libggml)."""
    qtype = qtype_of(qtype)
    if qtype in (QType.F32, QType.F16):
        return quantize_rows(arr, qtype)
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return _gq_apply(a, qtype, decode=False).reshape(a.shape[0], row_bytes(qtype, a.shape[-1]))


#: Blocks per call into gguf-py's vectorized codecs (bounds the temporaries to a few tens of MB).
_GROUP_BLOCKS = 1 << 15


def _gq_apply(arr: np.ndarray, qtype: QType, *, decode: bool) -> np.ndarray:
    """gguf-py's per-type codec over independent blocks, in large vectorized groups.

    ``gq.quantize``/``gq.dequantize`` split their input into groups of 16 rows: fine for whole
    tensors, but tens of thousands of Python calls for a region of single-block rows. Blocks are
    independent, so any grouping gives the same bytes.
    """
    codec = gq._type_traits[qtype]  # noqa: SLF001 - gguf-py's per-type codec classes
    bs, ts = GGML_QUANT_SIZES[qtype]
    if decode:
        blocks = arr.reshape(-1, ts)
        out = np.empty((blocks.shape[0], bs), dtype=np.float32)
        for i in range(0, blocks.shape[0], _GROUP_BLOCKS):
            out[i:i + _GROUP_BLOCKS] = codec.dequantize_rows(blocks[i:i + _GROUP_BLOCKS])
    else:
        blocks = arr.reshape(-1, bs)
        out = np.empty((blocks.shape[0], ts), dtype=np.uint8)
        for i in range(0, blocks.shape[0], _GROUP_BLOCKS):
            out[i:i + _GROUP_BLOCKS] = codec.quantize_rows(blocks[i:i + _GROUP_BLOCKS])
    return out


# --------------------------------------------------------------------------------------------- libggml

_LIB: ctypes.CDLL | None = None
_LIB_TRIED = False
_LOCK = threading.Lock()


def find_libggml() -> Path | None:
    """The ``libggml-base`` shared library inside the installed llama_cpp package, if any.

    Found without importing llama_cpp (which loads the whole llama library).
    """
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        root_p = Path(root)
        cands = sorted(root_p.rglob("libggml-base.*")) + sorted(root_p.rglob("ggml-base.dll")) + sorted(root_p.rglob("libggml.*"))
        for c in cands:
            if c.suffix in (".so", ".dylib", ".dll") or ".so." in c.name:
                return c
    return None


def _ggml() -> ctypes.CDLL | None:
    global _LIB, _LIB_TRIED
    with _LOCK:
        if _LIB_TRIED:
            return _LIB
        _LIB_TRIED = True
        path = find_libggml()
        if path is None:
            log.info("llama-cpp-python's libggml not found: K-quants cannot be encoded")
            return None
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        if hasattr(lib, "ggml_quantize_init"):
            lib.ggml_quantize_init.restype = None
            lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        if hasattr(lib, "ggml_quantize_requires_imatrix"):
            lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _LIB = lib
        log.debug("using %s for K-quant encoding", path)
        return _LIB


def ggml_quantize(arr: np.ndarray, qtype: QType) -> np.ndarray:
    """Encode float32 rows with libggml's own quantizer (any type it can encode without an imatrix).

    Public so tests can compare gguf-py's numpy codecs with libggml bit for bit.
    """
    return _ggml_quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype_of(qtype))


def _ggml_quantize(a: np.ndarray, qtype: QType) -> np.ndarray:
    lib = _ggml()
    if lib is None:
        raise UnsupportedError(f"encoding {qtype.name} needs llama-cpp-python's libggml "
                               "(pip install 'nestpatch[llama]')")
    if a.ndim == 1:
        a = a[None, :]
    rows, n = a.shape
    rb = row_bytes(qtype, n)
    if hasattr(lib, "ggml_quantize_requires_imatrix") and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise UnsupportedError(f"{qtype.name} needs an importance matrix to be encoded")
    if hasattr(lib, "ggml_quantize_init"):
        lib.ggml_quantize_init(int(qtype))
    out = np.empty((rows, rb), dtype=np.uint8)
    if rows == 0:
        return out
    written = lib.ggml_quantize_chunk(int(qtype), a.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h): only ``to_float`` is used."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


_TRAITS: dict[QType, Any] = {}


def _ggml_traits(qtype: QType) -> Any:
    """libggml's ``to_float`` for a type, or None (cached; checked against gguf-py's sizes)."""
    if qtype in _TRAITS:
        return _TRAITS[qtype]
    lib = _ggml()
    fn = None
    if lib is not None and hasattr(lib, "ggml_get_type_traits") and qtype not in (QType.F32,):
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        tr = lib.ggml_get_type_traits(int(qtype)).contents
        if tr.to_float and int(tr.blck_size) == block_size(qtype) and int(tr.type_size) == type_size(qtype):
            fn = _TO_FLOAT(tr.to_float)
    _TRAITS[qtype] = fn
    return fn


def ggml_dequantize(raw: np.ndarray, qtype: QType, n: int) -> np.ndarray:
    """Decode rows with libggml's own ``to_float``, float32 ``(rows, n)`` (public for tests)."""
    qtype = qtype_of(qtype)
    if _ggml() is None or _ggml_traits(qtype) is None:
        raise UnsupportedError(f"libggml cannot decode {qtype.name} here (pip install 'nestpatch[llama]')")
    return _ggml_dequantize(raw, qtype, n)


def _ggml_dequantize(raw: np.ndarray, qtype: QType, n: int) -> np.ndarray:
    src = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, row_bytes(qtype, n))
    out = np.empty((src.shape[0], n), dtype=np.float32)
    if out.size:
        _ggml_traits(qtype)(src.ctypes.data, out.ctypes.data, out.size)
    return out
