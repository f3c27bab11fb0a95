"""Error types. Every error a user can cause is a :class:`NestpatchError`.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and
keeps its traceback. Messages name the file and the problem (expected vs found).
"""

from __future__ import annotations


class NestpatchError(Exception):
    """Base class for user-facing errors (bad input, mismatched models, unsupported things)."""


class FormatError(NestpatchError):
    """A `.nestpatch` file (or another input file) is malformed, truncated or of an unknown version."""


class InputError(NestpatchError):
    """Bad user input: missing files, columns, empty prompt sets, bad options."""


class BaseMismatchError(NestpatchError):
    """A patch does not belong to the model it is applied to (fingerprint or shape mismatch)."""


class UnsupportedError(NestpatchError):
    """An architecture, tensor layout or quantization type nestpatch cannot handle."""


class AssetError(NestpatchError):
    """A named asset could not be fetched or failed its pinned sha256."""


class SignatureError(NestpatchError):
    """A patch is unsigned, signed by an untrusted key, or changed since it was signed."""


class TrainingError(NestpatchError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""
