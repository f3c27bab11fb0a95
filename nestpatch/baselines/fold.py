"""The folded form of a trained model: its changed weights written into a copy of the base file.

Why: "no inference-time overhead" is a claim about the folded model, so tokens/s is measured on
it, and every method is folded the same way. For a GGUF base, the output is the base file with
every KV entry and every unchanged tensor copied byte for byte, and each changed tensor
re-encoded in the base's own type for that tensor (so all methods run with the same tensor
types as the base, and speed differences are not type differences). For a base given as an HF
directory, the folded form is an HF directory written by transformers.

A method whose update is small against the base's quantization step loses it in that
re-encoding: session 13 found LoRA and full fine-tuning folded into SmolLM2's Q4_1 file refusing
like the base. So every fold reports each changed tensor's *retention* (the share of the trained
change the file keeps, as ``nestpatch apply`` reports it), and ``precision`` takes apply's
choices (``keep``, ``auto``, ``q8_0``, ``f16``; :func:`nestpatch.converters.gguf_fold.candidate_types`).

Tensor names and layouts follow llama.cpp's converter (gguf-py's name map; the Q/K row
permutation of the llama architecture, none for qwen2). Other GGUF architectures raise
UnsupportedError and the bench falls back to an HF directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir, atomic_path
from ..errors import InputError, UnsupportedError

log = logging.getLogger(__name__)

#: GGUF architecture -> whether llama.cpp's converter permutes its q/k rows (llama does, qwen2 does not).
QK_PERMUTED: dict[str, bool] = {"llama": True, "qwen2": False}
#: GGUF architectures whose tensors we can map from HF names.
SUPPORTED_GGUF_ARCHS = tuple(QK_PERMUTED)


def changed_parameters(base: Any, merged: Any) -> dict[str, np.ndarray]:
    """``{hf_name: float32 array}`` of the merged model's parameters that differ from the base's."""
    import torch

    base_params = dict(base.named_parameters())
    out = {}
    for name, p in merged.named_parameters():
        b = base_params.get(name)
        if b is None or b.shape != p.shape or not torch.equal(b.detach(), p.detach()):
            out[name] = p.detach().float().cpu().numpy()
    return out


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs (what its converter does for llama)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str, arch: str, n_layers: int) -> str:
    """GGUF name of an HF parameter (``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``)."""
    import gguf

    enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if enum is None:
        raise UnsupportedError(f"GGUF architecture {arch!r} unknown to gguf-py")
    mapped = gguf.get_tensor_name_map(enum, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UnsupportedError(f"tensor {hf_name}: no GGUF name for architecture {arch}")
    return mapped


def _gguf_layout_values(hf_name: str, arr: np.ndarray, config: Any, arch: str) -> np.ndarray:
    if not QK_PERMUTED[arch]:
        return arr
    if hf_name.endswith("q_proj.weight"):
        return permute_qk(arr, int(config.num_attention_heads))
    if hf_name.endswith("k_proj.weight"):
        return permute_qk(arr, int(config.num_key_value_heads))
    return arr


def _encode_rows(rows: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 ``(rows, n)`` -> the raw data of ``qtype`` (float types as float arrays)."""
    from nestpatch.converters import gguf_codecs as codecs

    if qtype == codecs.QType.F32:
        return rows.astype(np.float32)
    if qtype == codecs.QType.F16:
        return rows.astype(np.float16)
    return codecs.quantize_rows(rows, qtype)  # (rows, row_bytes)


def _decode_rows(raw: np.ndarray, qtype: Any, n: int) -> np.ndarray:
    from nestpatch.converters import gguf_codecs as codecs

    if qtype in (codecs.QType.F32, codecs.QType.F16):
        return raw.astype(np.float32)
    return codecs.dequantize_rows(raw, qtype, n)


def _encode(values: np.ndarray, base_values: np.ndarray, qtype: Any, precision: str = "keep",
            threshold: float = 0.9, base_raw: np.ndarray | None = None) -> tuple[np.ndarray, Any, float]:
    """Encode float32 ``values`` for a tensor stored as ``qtype`` whose base values are ``base_values``.

    Returns ``(raw data, type, retention)``. The type is the first of apply's candidates for
    ``precision``; under ``auto``, the first whose retention of ``values - base_values`` reaches
    ``threshold`` (else the last). Retention compares the decoded result with the base as the
    reader of each file sees it: the base decodes to ``base_values`` when the type is kept, and to
    the base re-encoded in the new type otherwise (the rule of ``nestpatch apply``).

    When the type is kept and ``base_raw`` (the file's bytes of the tensor) is given, only the rows
    that changed are re-encoded and every other row keeps its bytes: re-quantizing a K-quant row
    is not exact, and a patch of a few hundred rows must not perturb the rest of the tensor.
    """
    from nestpatch.converters.fold_report import retention_stats
    from nestpatch.converters.gguf_fold import candidate_types

    n = values.shape[-1]
    rows, base_rows = values.reshape(-1, n), base_values.reshape(-1, n)
    cands = candidate_types(qtype, n, precision)
    changed = np.any(rows != base_rows, axis=1)
    for i, t in enumerate(cands):
        if t == qtype and base_raw is not None:
            raw = np.array(base_raw.reshape(len(rows), -1), copy=True)
            if changed.any():
                raw[changed] = _encode_rows(rows[changed], t)
        else:
            raw = _encode_rows(rows, t)
        base_seen = base_rows if t == qtype else _decode_rows(_encode_rows(base_rows, t), t, n)
        retention, _ = retention_stats(rows - base_rows, _decode_rows(raw, t, n) - base_seen)
        if precision != "auto" or retention >= threshold or i + 1 == len(cands):
            if t != qtype:
                log.info("%s -> %s (retention %.3f)", qtype.name, t.name, retention)
            return raw.reshape(*values.shape[:-1], raw.shape[-1]), t, retention
    raise AssertionError("candidate_types returned no type")  # pragma: no cover - it never does


def fold_into_gguf(base_gguf: str | os.PathLike, base_model: Any, merged: Any, out_path: str | os.PathLike,
                   precision: str = "keep") -> dict:
    """Write ``out_path``: ``base_gguf`` with ``merged``'s changed tensors re-encoded in place.

    Returns:
        ``{"changed_tensors", "precision", "retyped", "types", "min_retention", "mean_retention",
        "retention", "bytes"}``; ``retention`` maps each changed GGUF tensor to the share of its
        trained change the file keeps, ``types`` to its type in the file.

    Raises:
        UnsupportedError: a GGUF architecture other than llama and qwen2, or a changed tensor the file lacks.
    """
    import gguf

    from nestpatch.converters.precision import PRECISIONS

    if precision not in PRECISIONS:
        raise InputError(f"fold precision {precision!r} invalid, expected one of {', '.join(PRECISIONS)}")
    reader = gguf.GGUFReader(str(base_gguf))
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    arch = str(arch_field.contents()) if arch_field is not None else ""
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise UnsupportedError(f"{base_gguf}: folding baselines into GGUF supports {', '.join(SUPPORTED_GGUF_ARCHS)}, not {arch!r}")
    cfg = merged.config
    n_layers = int(cfg.num_hidden_layers)
    changed = changed_parameters(base_model, merged)
    by_gguf = {gguf_tensor_name(k, arch, n_layers): _gguf_layout_values(k, v, cfg, arch) for k, v in changed.items()}
    base_params = dict(base_model.named_parameters())
    base_by_gguf = {gguf_tensor_name(k, arch, n_layers): _gguf_layout_values(k, base_params[k].detach().float().cpu().numpy(),
                                                                               cfg, arch) for k in changed}
    names = {t.name for t in reader.tensors}
    missing = sorted(set(by_gguf) - names)
    if missing:
        raise UnsupportedError(f"{base_gguf}: has no tensor {missing[0]} (changed by training)")
    out = Path(out_path)
    retyped: list[str] = []
    types: dict[str, str] = {}
    retention: dict[str, float] = {}
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        data: list[np.ndarray] = []
        for t in reader.tensors:
            arr, qtype = t.data, t.tensor_type
            if t.name in by_gguf:
                shape = [int(x) for x in reversed(t.shape)]  # numpy layout (rows, n)
                arr, qtype, retention[t.name] = _encode(by_gguf[t.name].reshape(shape), base_by_gguf[t.name].reshape(shape),
                                                        t.tensor_type, precision, base_raw=np.asarray(t.data))
                types[t.name] = qtype.name
                if qtype != t.tensor_type:
                    retyped.append(t.name)
            w.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, qtype)
            data.append(arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for arr in data:
            w.write_tensor_data(arr, tensor_endianess=reader.endianess)
        w.close()
    kept = list(retention.values())
    log.info("folded %d changed tensors into %s (precision %s, min retention %.3f)", len(by_gguf), out, precision,
             min(kept, default=1.0))
    return {"changed_tensors": len(by_gguf), "precision": precision, "retyped": retyped, "types": types,
            "min_retention": round(min(kept, default=1.0), 4), "mean_retention": round(sum(kept) / len(kept), 4) if kept else 1.0,
            "retention": {k: round(v, 4) for k, v in retention.items()}, "bytes": out.stat().st_size}


def fold_into_hf_dir(merged: Any, tokenizer: Any, out_dir: str | os.PathLike) -> dict:
    """Write the merged model as an HF directory (safetensors, atomically)."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return {"bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
