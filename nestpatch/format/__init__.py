"""The `.nestpatch` v1 format: numpy only (no torch, no llama.cpp).

Normative text: ``spec/nestpatch-v1.md``.
"""

from .constants import FILE_EXTENSION, FORMAT_VERSION
from .patch import Patch, Target
from .reader import read_document, read_patch
from .validate import validate_patch
from .writer import compute_digest, serialize_patch, write_patch

__all__ = [
    "FILE_EXTENSION", "FORMAT_VERSION", "Patch", "Target", "read_patch", "read_document",
    "write_patch", "serialize_patch", "compute_digest", "validate_patch",
]
