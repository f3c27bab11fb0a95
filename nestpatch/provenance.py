"""Provenance recorded next to every output: digests in one notation, and library versions.

Why one home: training, evaluation and the bench each recorded a different set of libraries
and wrote digests with and without the ``sha256:`` prefix, so a training run's chat-template
hash could not be compared with an evaluation's. Every digest here is ``sha256:<hex>``.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from .format.digest import DIGEST_PREFIX
from .format.patch import Patch

#: Distributions whose versions shape results (looked up without importing them).
LIBRARIES = ("nestpatch", "numpy", "torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors", "gguf",
             "llama-cpp-python", "scikit-learn")
#: Files of a model directory that its digest covers.
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".gguf", ".model", ".txt")


def library_versions() -> dict[str, str | None]:
    """``{"python": ..., distribution: version or None}`` for :data:`LIBRARIES`."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def text_digest(text: str | None) -> str | None:
    """``sha256:<hex>`` of UTF-8 text (a chat template, a judge prompt), or None for None."""
    return None if text is None else DIGEST_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    from .assets import sha256_file

    return DIGEST_PREFIX + sha256_file(path)


def model_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a model file, or of a directory's weight and config files (name + digest each)."""
    from .assets import sha256_file

    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix.lower() in _MODEL_FILE_SUFFIXES:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return DIGEST_PREFIX + h.hexdigest()


def patch_digest(patch: Patch) -> str:
    """The patch's content digest: the one stored in it, else computed from its tensors."""
    from .format.writer import compute_digest

    return patch.content_digest or compute_digest(patch)


__all__ = ["LIBRARIES", "library_versions", "text_digest", "file_digest", "model_digest", "patch_digest"]
