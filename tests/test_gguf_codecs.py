"""GGUF row codecs and the fast layout parser, checked bit for bit against libggml and gguf-py."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from nestpatch.converters import gguf_codecs as codecs
from nestpatch.models.gguf_layout import parse_layout
from nestpatch.errors import FormatError, UnsupportedError

FLOAT_LEGACY = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
#: Worst relative round-trip error ||dec(enc(x)) - x|| / ||x|| on Gaussian rows (measured, with margin).
ROUNDTRIP_TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.05, "Q5_1": 0.05,
                 "Q5_K": 0.05, "Q4_0": 0.12, "Q4_1": 0.1, "Q4_K": 0.1, "Q3_K": 0.25, "Q2_K": 0.45}


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((48, 512)) * rng.uniform(0.01, 3.0, (48, 1))).astype(np.float32)  # (rows, n)


needs_ggml = pytest.mark.skipif(codecs.find_libggml() is None, reason="llama-cpp-python's libggml not installed")


@needs_ggml
@pytest.mark.parametrize("qtype", FLOAT_LEGACY)
def test_numpy_encoder_is_bit_exact_with_libggml(rows, qtype):
    np.testing.assert_array_equal(codecs.numpy_quantize_rows(rows, qtype), codecs.ggml_quantize(rows, qtype))


@needs_ggml
@pytest.mark.parametrize("qtype", FLOAT_LEGACY + K_QUANTS)
def test_decoder_is_bit_exact_with_libggml(rows, qtype):
    raw = codecs.quantize_rows(rows, qtype)
    np.testing.assert_array_equal(codecs.numpy_dequantize_rows(raw, qtype, 512), codecs.ggml_dequantize(raw, qtype, 512))
    np.testing.assert_array_equal(codecs.dequantize_rows(raw, qtype, 512), codecs.ggml_dequantize(raw, qtype, 512))


@needs_ggml
@pytest.mark.parametrize("qtype", ["F32"] + FLOAT_LEGACY + K_QUANTS)
def test_blocks_encode_independently(rows, qtype):
    """Re-encoding only the touched blocks is sound: a block's bytes do not depend on its neighbours."""
    bs = codecs.block_size(codecs.qtype_of(qtype))
    whole = codecs.quantize_rows(rows, qtype)  # (48, row_bytes)
    blockwise = codecs.quantize_rows(rows.reshape(-1, bs), qtype).reshape(whole.shape)
    np.testing.assert_array_equal(blockwise, whole)


@needs_ggml
@pytest.mark.parametrize("qtype", ["F32"] + FLOAT_LEGACY + K_QUANTS)
def test_roundtrip_error_per_type(rows, qtype):
    raw = codecs.quantize_rows(rows, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (48, codecs.row_bytes(codecs.qtype_of(qtype), 512))
    dec = codecs.dequantize_rows(raw, qtype, 512)
    rel = np.linalg.norm(dec - rows) / np.linalg.norm(rows)
    assert rel <= ROUNDTRIP_TOL[qtype], rel
    # a legacy block re-encoded from its own decoded values comes back byte-identical
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q8_0"):
        np.testing.assert_array_equal(codecs.quantize_rows(dec, qtype), raw)


def test_sizes_and_errors():
    q = codecs.QType
    assert codecs.block_size(q.Q4_K) == 256 and codecs.type_size(q.Q4_K) == 144
    assert codecs.row_bytes(q.Q8_0, 64) == 68 and codecs.row_bytes("F16", 3) == 6
    with pytest.raises(UnsupportedError, match="not a multiple"):
        codecs.row_bytes(q.Q4_0, 48)
    with pytest.raises(UnsupportedError, match="IQ2_XXS cannot be encoded"):
        codecs.quantize_rows(np.zeros((1, 256), np.float32), "IQ2_XXS")
    with pytest.raises(UnsupportedError, match="unknown GGUF tensor type"):
        codecs.qtype_of("Q9_9")
    assert not codecs.can_decode(q.I8) and codecs.can_decode(q.IQ4_NL)
    assert codecs.can_encode(q.Q4_1, 64) and not codecs.can_encode(q.Q4_1, 48) and not codecs.can_encode(q.IQ4_NL)


def test_layout_matches_gguf_py(smollm2_gguf):
    layout = parse_layout(smollm2_gguf)
    reader = GGUFReader(str(smollm2_gguf))
    assert layout.data_start == reader.data_offset and len(layout.tensors) == len(reader.tensors) == 272
    for mine, ref in zip(layout.tensors, reader.tensors):
        assert (mine.name, mine.qtype, mine.nbytes) == (ref.name, ref.tensor_type, ref.n_bytes)
        assert layout.data_start + mine.offset == ref.data_offset
    assert layout.kv("llama.feed_forward_length") == 1536 and layout.kv("general.architecture") == "llama"
    assert [e.key for e in layout.kvs] == [k for k in reader.fields if not k.startswith("GGUF.")]


def test_layout_rejects_truncated_and_foreign_files(smollm2_gguf, tmp_path):
    src = smollm2_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src[: len(src) - 1000])
    with pytest.raises(FormatError, match=r"truncated GGUF file: tensor .* ends at byte"):
        parse_layout(cut)
    cut.write_bytes(src[:5000])  # inside the tokenizer KV entries
    with pytest.raises(FormatError, match="truncated GGUF file"):
        parse_layout(cut)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(FormatError, match="not a GGUF file"):
        parse_layout(other)
