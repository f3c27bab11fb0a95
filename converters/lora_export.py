"""Export a patch as a LoRA adapter: a llama.cpp adapter GGUF, or a PEFT directory.

Why this is lossless: a target with K clusters changes its weight by ``dW = B @ A`` with
B ``(out, K)`` and A ``(K, in)`` (:meth:`Target.lora_factors`): for gate/up, B is the one-hot
neuron-to-cluster matrix (times the per-neuron scales) and A the cluster deltas; for down, B is
the deltas and A the one-hot matrix. No SVD, no truncation: the adapter reproduces the fold.

Scaling, which is where LoRA exports usually go wrong:
* llama.cpp multiplies each tensor's product by ``alpha / rank`` with ONE ``adapter.lora.alpha``
  for the whole file and ``rank`` read from each ``lora_b``. Ranks differ per target, so every
  pair is zero-padded to the largest rank R and alpha is R: the scale is exactly 1 everywhere,
  in any runtime that follows the alpha/rank convention (or ignores alpha).
* PEFT scales by ``lora_alpha / r`` per module; ``rank_pattern`` and ``alpha_pattern`` give each
  module its own rank K and alpha K (scale 1), and the global ``r = lora_alpha = R`` keep the
  scale 1 in servers that read only the global values.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from nestpatch import __version__
from nestpatch.atomic import atomic_dir, atomic_path
from nestpatch.errors import InputError, UnsupportedError
from nestpatch.format.constants import BaseKey, PolicyKey
from nestpatch.format.patch import Patch, Target
from nestpatch.format.safetensors_io import dumps
from nestpatch.models.files import check_patch_fits
from nestpatch.provenance import patch_digest
from nestpatch.models.naming import check_architecture, hf_to_gguf, parse_hf_name

from .provenance import FoldKey

log = logging.getLogger(__name__)

#: HF model_type -> GGUF general.architecture, where llama.cpp's converter renames it.
GGUF_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def max_rank(patch: Patch) -> int:
    """The largest per-target rank (cluster count) R."""
    return max(t.n_clusters for t in patch.targets)


def padded_factors(t: Target, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B (out, rank), A (rank, in))`` float32 with ``B @ A == dW``; zero-padded beyond K."""
    b, a = t.lora_factors()  # (out, K), (K, in)
    k = t.n_clusters
    bp = np.zeros((b.shape[0], rank), np.float32)
    ap = np.zeros((rank, a.shape[1]), np.float32)
    bp[:, :k] = b
    ap[:k, :] = a
    return bp, ap


# ------------------------------------------------------------------------------------------ bases


def check_against_base(patch: Patch, base: str | os.PathLike) -> tuple[Path, str | None]:
    """Refuse a base the patch was not made for. Returns the base path and its GGUF arch (if GGUF)."""
    path, desc = check_patch_fits(patch, base)
    return path, (str(desc.get(BaseKey.ARCHITECTURE) or "") if desc["format"] == "gguf" else None)


def gguf_architecture(patch: Patch) -> str:
    """GGUF architecture name for the patch's base (``llama`` for mistral, as llama.cpp converts it)."""
    import gguf

    arch = check_architecture(str(patch.base.get(BaseKey.ARCHITECTURE, "")), "patch base")
    arch = GGUF_ARCH.get(arch, arch)
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise UnsupportedError(f"architecture {arch!r} has no GGUF name known to gguf-py")
    return arch


# ------------------------------------------------------------------------------------------ GGUF


def export_gguf_lora(patch: Patch, out_path: str | os.PathLike, *, base: str | os.PathLike | None = None) -> Path:
    """Write ``patch`` as a llama.cpp LoRA adapter GGUF (F32 factors, scale exactly 1).

    Tensors ``blk.N.ffn_*.weight.lora_a`` (numpy ``(R, in)``) and ``.lora_b`` (``(out, R)``),
    ``adapter.lora.alpha = R``. Load with ``llama_cpp.Llama(model_path=base, lora_path=out)``.

    Args:
        base: optional base model (GGUF, HF dir or ``smollm2``): checked against the patch's
            fingerprint, and its architecture name is used.

    Raises:
        BaseMismatchError: ``base`` is not the patch's base model.
        UnsupportedError: a target GGUF cannot address (fused, MoE), or an unknown architecture.
    """
    import gguf

    arch = None
    base_label = str(patch.base.get(BaseKey.NAME) or "")
    if base is not None:
        base_path, arch = check_against_base(patch, base)
        base_label = base_path.name
    arch = arch or gguf_architecture(patch)
    names = [hf_to_gguf(t.name) for t in patch.targets]  # refuses fused/MoE names first
    rank = max_rank(patch)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        w.add_name(f"nestpatch {patch.policy.get(PolicyKey.NAME, '')} {patch.policy.get(PolicyKey.VERSION, '')}".strip())
        if base_label:
            w.add_base_model_count(1)
            w.add_base_model_name(0, base_label)
        w.add_string(FoldKey.PATCH_DIGEST, patch_digest(patch))
        w.add_string(FoldKey.POLICY_NAME, str(patch.policy.get(PolicyKey.NAME, "")))
        w.add_string(FoldKey.POLICY_VERSION, str(patch.policy.get(PolicyKey.VERSION, "")))
        w.add_string(FoldKey.TOOL_VERSION, __version__)
        for t, gname in zip(patch.targets, names):
            b, a = padded_factors(t, rank)  # (out, R), (R, in)
            w.add_tensor(f"{gname}.lora_a", a)
            w.add_tensor(f"{gname}.lora_b", b)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    log.info("wrote LoRA adapter %s (%d tensor pairs, rank %d)", out, len(names), rank)
    return out


# ------------------------------------------------------------------------------------------ PEFT


def peft_config(patch: Patch, base_name: str) -> dict:
    """The ``adapter_config.json`` document (every module at scale exactly 1)."""
    for t in patch.targets:
        parse_hf_name(t.name)  # refuses fused/MoE tensors with a message naming them
    modules = {t.name[: -len(".weight")]: t.n_clusters for t in patch.targets}
    rank = max_rank(patch)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(modules),
        "rank_pattern": dict(sorted(modules.items())),
        "alpha_pattern": dict(sorted(modules.items())),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def export_peft(patch: Patch, out_dir: str | os.PathLike, *, base: str | os.PathLike | None = None) -> Path:
    """Write ``patch`` as a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` ``(K, in)`` and
    ``.lora_B.weight`` ``(out, K)`` in float32; ``adapter_config.json`` gives each module rank K
    and alpha K.

    Args:
        base: optional base model, checked against the fingerprint and recorded as
            ``base_model_name_or_path`` (else the patch's base name).
    """
    base_name = str(patch.base.get(BaseKey.NAME) or "")
    if base is not None:
        base_path, _ = check_against_base(patch, base)
        base_name = str(base_path)
    cfg = peft_config(patch, base_name)  # validates names before anything is written
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for t in patch.targets:
        b, a = t.lora_factors()  # (out, K), (K, in)
        module = t.name[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = ("F32", a)
        tensors[f"base_model.model.{module}.lora_B.weight"] = ("F32", b)
    meta = {"format": "pt", FoldKey.PATCH_DIGEST: patch_digest(patch), FoldKey.TOOL_VERSION: __version__,
            FoldKey.POLICY_NAME: str(patch.policy.get(PolicyKey.NAME, "")),
            FoldKey.POLICY_VERSION: str(patch.policy.get(PolicyKey.VERSION, ""))}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is a file; a PEFT adapter is a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / PEFT_CONFIG).exists():
        raise InputError(f"{out}: exists and is not a PEFT adapter directory; refusing to replace it")
    with atomic_dir(out) as tmp:
        (tmp / PEFT_WEIGHTS).write_bytes(dumps(tensors, meta))
        (tmp / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    log.info("wrote PEFT adapter %s (%d modules, max rank %d)", out, len(patch.targets), cfg["r"])
    return out
