"""Load a causal LM into torch from an HF directory, a GGUF file, or a named asset.

GGUF files are dequantized by transformers' GGUF loader (fp32). The model is returned in
eval mode with gradients off; callers choose what to make trainable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..assets import resolve_model
from ..errors import InputError, UnsupportedError
from ..fingerprint import fingerprint_info
from ..format.constants import AXIS_ROW, BaseKey
from ..format.patch import Target
from ..memory import LARGE_MODEL_BYTES, fix_mmap_threshold, prefer_huge_pages
from .files import describe_hf_config, is_gguf, path_bytes
from .naming import check_architecture

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    source: Path  # directory or GGUF file
    description: dict  # base description (BaseKey fields)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> cuda, then mps, then cpu."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def describe_model(model: Any, name: str = "", revision: str = "") -> dict:
    """Base description written into patches: architecture and sizes, plus fingerprint settings."""
    desc = describe_hf_config(model.config)
    for key in (BaseKey.N_LAYERS, BaseKey.D_MODEL, BaseKey.N_FF):
        if key not in desc:
            raise UnsupportedError(f"{name or 'model'}: its config gives no {key}")
    return {
        **desc,
        BaseKey.ARCHITECTURE: check_architecture(getattr(model.config, "model_type", ""), name or "model"),
        BaseKey.NAME: name,
        BaseKey.REVISION: revision,
        BaseKey.FINGERPRINT: fingerprint_info(),
    }


def _split_gguf(path: Path) -> tuple[str, str]:
    return str(path.parent), path.name


def load_model(spec: str | os.PathLike, *, device: str = "auto", dtype: str = "float32",
               device_map: str | None = None) -> LoadedModel:
    """Load model and tokenizer from an HF dir, a ``.gguf`` file or a named asset (``smollm2``).

    Raises:
        InputError: the path does not exist or holds no weights.
        UnsupportedError: the architecture is not one nestpatch can address.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    if not path.exists():
        raise InputError(f"{path}: no such model file or directory")
    if path_bytes(path) >= LARGE_MODEL_BYTES:
        fix_mmap_threshold()  # a large load would otherwise leave GBs of fragmented heap: see nestpatch.memory
        prefer_huge_pages()  # and each fresh 4 KiB mmapped page would be a page fault
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    if path.is_file() and is_gguf(path):
        d, f = _split_gguf(path)
        log.info("loading %s through transformers' GGUF loader (dequantized)", path)
        try:
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **kwargs)
        except ValueError as e:
            raise UnsupportedError(f"{path}: transformers cannot load this GGUF ({str(e).splitlines()[0]})") from None
    elif path.is_dir():
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise InputError(f"{path}: model directory holds no weights (*.safetensors)")
        if not (path / "config.json").exists():
            raise InputError(f"{path}: model directory has no config.json")
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        raise InputError(f"{path}: expected a .gguf file, a model directory, or a named model (smollm2)")
    if not device_map:
        model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    desc = describe_model(model, name=path.name)
    return LoadedModel(model=model, tokenizer=tok, source=path, description=desc)


def parameter_vectors(param: Any, target: Target) -> np.ndarray:
    """A torch weight's current vectors of ``target``'s neurons, float32 ``(n, d)`` (for fingerprints)."""
    import torch

    idx = torch.as_tensor(np.asarray(target.indices, dtype=np.int64), device=param.device)
    with torch.no_grad():
        v = param.index_select(0, idx) if target.axis == AXIS_ROW else param.index_select(1, idx).T
    return v.detach().float().cpu().numpy()


def torch_neuron_vectors(model: Any, target: Target) -> np.ndarray:
    """The model's current vectors of ``target``'s neurons, float32 ``(n, d)`` (for fingerprints)."""
    try:
        w = model.get_parameter(target.name)
    except AttributeError:
        raise UnsupportedError(f"model has no tensor {target.name}") from None
    if tuple(w.shape) != tuple(target.shape):
        from ..errors import BaseMismatchError

        raise BaseMismatchError(f"tensor {target.name}: model shape {tuple(w.shape)} != patch shape {tuple(target.shape)}")
    return parameter_vectors(w, target)
