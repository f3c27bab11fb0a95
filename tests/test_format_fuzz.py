"""Property-based tests: hostile bytes never crash, hang or exhaust memory in the reader.

Only :class:`FormatError` may come out. Each property must really read its hostile files: the
number of files each test read is checked after it, whatever order or subset of tests runs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nestpatch.errors import FormatError
from nestpatch.format import read_patch

VECTOR = (Path(__file__).resolve().parents[1] / "spec" / "vectors" / "mixed_axes_dtypes.nestpatch").read_bytes()
CASES = {"count": 0}
EXAMPLES = 250
#: Files each property must read (hypothesis may stop short of max_examples on a small space).
MIN_CASES = EXAMPLES // 2
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _every_property_reads_files():
    """After each test (not each example): it read at least MIN_CASES files."""
    before = CASES["count"]
    yield
    assert CASES["count"] - before >= MIN_CASES, f"only {CASES['count'] - before} hostile files were read"


def _read(tmp_path: Path, data: bytes) -> None:
    CASES["count"] += 1
    f = tmp_path / "fuzz.nestpatch"
    f.write_bytes(data)
    try:
        read_patch(f)
    except FormatError as e:
        assert str(f) in str(e) and "\n" not in str(e)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(VECTOR) - 1))
def test_truncated(tmp_path, cut):
    _read(tmp_path, VECTOR[:cut])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(VECTOR) - 1), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flips(tmp_path, flips):
    data = bytearray(VECTOR)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    _read(tmp_path, bytes(data))


def _header_and_data() -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", VECTOR[:8])
    return json.loads(VECTOR[8 : 8 + n]), VECTOR[8 + n :]


def _pack(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


hostile_ints = st.one_of(st.integers(-(2**63), 2**63), st.sampled_from([0, -1, 1, 2**31, 2**32, 2**62, 10**30]))


@FUZZ
@given(data=st.data())
def test_hostile_headers(tmp_path, data):
    header, body = _header_and_data()
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    what = data.draw(st.sampled_from(["offsets", "shape", "dtype", "drop", "extra", "header_len"]))
    if what == "offsets":
        header[name]["data_offsets"] = [data.draw(hostile_ints), data.draw(hostile_ints)]
    elif what == "shape":
        header[name]["shape"] = data.draw(st.lists(hostile_ints, max_size=6))
    elif what == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F64", "I8", "BOOL", "U8", "I64", "", "F32", "BF16"]))
    elif what == "drop":
        del header[name]
    elif what == "extra":
        header["zzz/indices"] = {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}
    raw = _pack(header, body)
    if what == "header_len":
        raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    _read(tmp_path, raw)


def _with_tensor(header: dict, body: bytes, name: str, arr: np.ndarray, dtype: str) -> bytes:
    """Replace tensor ``name``'s content (appended at the end of the data section)."""
    start, end = header[name]["data_offsets"]
    assert end - start == arr.nbytes
    body = body[:start] + arr.tobytes() + body[end:]
    header[name]["dtype"] = dtype
    return _pack(header, body)


@FUZZ
@given(data=st.data())
def test_hostile_values(tmp_path, data):
    """Valid container, invalid patch values (NaN deltas, bad indices/cluster ids, bad document)."""
    header, body = _header_and_data()
    tgt = "model.layers.0.mlp.up_proj.weight"
    what = data.draw(st.sampled_from(["nan", "indices", "clusters", "doc"]))
    if what == "nan":
        n = (header[f"{tgt}/deltas"]["data_offsets"][1] - header[f"{tgt}/deltas"]["data_offsets"][0]) // 4
        arr = np.zeros(n, np.float32)
        arr[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        raw = _with_tensor(header, body, f"{tgt}/deltas", arr, "F32")
    elif what in ("indices", "clusters"):
        arr = np.array(data.draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=3, max_size=3)), np.int32)
        raw = _with_tensor(header, body, f"{tgt}/{what}", arr, "I32")
    else:
        doc = json.loads(header["__metadata__"]["nestpatch.metadata"])
        key = data.draw(st.sampled_from(["targets", "base", "policy", "provenance", "content_digest"]))
        doc[key] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3),
                                       st.just([{"name": tgt, "axis": "row", "shape": [2**40, -1]}])))
        header["__metadata__"]["nestpatch.metadata"] = json.dumps(doc)
        raw = _pack(header, body)
    _read(tmp_path, raw)
