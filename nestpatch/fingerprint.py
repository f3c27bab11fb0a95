"""Base-model fingerprint: tells "the same model in another format or precision" from "another model".

For each target, the patch stores a sketch of the base model's touched neuron vectors (rows
for gate/up, columns for down): ``S`` projections onto a fixed Rademacher (+-1) matrix plus
the vector's L2 norm. The matrix is derived from the target name with SHAKE-256, so any
implementation can rebuild it (spec/nestpatch-v1.md, "Fingerprint").

Re-quantization perturbs each weight by a few percent of its magnitude, which moves the sketch
by about the same relative amount (Q4 ~ 0.10, Q8 ~ 0.005); another model's weights of the same
shape give a relative error around 1.4. The default tolerance 0.35 sits between the two.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import BaseMismatchError
from .format.constants import SKETCH_METHOD, SKETCH_SIZE, SKETCH_TOLERANCE, BaseKey, FingerprintKey
from .format.patch import Patch, Target

log = logging.getLogger(__name__)

_SALT = b"nestpatch-sketch-v1:"

#: The loosest tolerance this tool accepts: a patch may tighten it, never loosen it (a patch that
#: says 1e9 would otherwise switch the wrong-base check off by editing one number).
TOLERANCE_CAP = SKETCH_TOLERANCE
#: Largest sketch size S a reader accepts (the projection matrix is S x d floats).
MAX_SKETCH_SIZE = 64

_SKIP = contextvars.ContextVar("nestpatch_skip_base_check", default=False)


@contextlib.contextmanager
def base_check_skipped(skip: bool = True) -> Iterator[None]:
    """Within this block a patch without base sketches is accepted (the user said so explicitly).

    Without it, :func:`check_base` refuses such a patch: a fingerprint that is simply absent must
    not switch off the wrong-base check.
    """
    token = _SKIP.set(bool(skip))
    try:
        yield
    finally:
        _SKIP.reset(token)


def tolerance(patch: Patch) -> float:
    """The tolerance to check against: the patch's own, capped at :data:`TOLERANCE_CAP`."""
    fp = patch.base.get(BaseKey.FINGERPRINT) or {}
    raw = fp.get(FingerprintKey.TOLERANCE, SKETCH_TOLERANCE) if isinstance(fp, dict) else SKETCH_TOLERANCE
    try:
        tol = float(raw)
    except (TypeError, ValueError):
        return TOLERANCE_CAP
    return min(tol, TOLERANCE_CAP) if tol == tol and tol > 0 else TOLERANCE_CAP


def sketch_size(t: Target) -> int:
    """Sketch size S of a target, from its stored sketch (never from a metadata number)."""
    if t.base_sketch is not None and t.base_sketch.ndim == 2 and t.base_sketch.shape[1] >= 2:
        return int(t.base_sketch.shape[1]) - 1
    return SKETCH_SIZE


def projection_matrix(name: str, dim: int, size: int = SKETCH_SIZE) -> np.ndarray:
    """Rademacher matrix ``(size, dim)`` of +-1, from SHAKE-256(salt || name).

    Bit k of the digest (LSB-first within each byte) gives entry k in row-major order: 1 -> +1, 0 -> -1.
    Unscaled on purpose: a projection of ``v`` then has the magnitude of ``||v||``, so the
    projections (which tell models apart) and the norm (which does not, for models initialised
    alike) weigh the same in the relative error.
    """
    nbits = size * dim
    raw = hashlib.shake_256(_SALT + name.encode("utf-8")).digest((nbits + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:nbits]
    signs = bits.astype(np.float32) * 2.0 - 1.0
    return signs.reshape(size, dim)


def sketch(name: str, vectors: np.ndarray, size: int = SKETCH_SIZE) -> np.ndarray:
    """Sketch of neuron vectors ``(n, d)`` -> ``(n, size + 1)``: projections, then the L2 norm."""
    v = np.asarray(vectors, dtype=np.float32)
    proj = v @ projection_matrix(name, v.shape[1], size).T  # (n, size)
    norms = np.linalg.norm(v, axis=1, keepdims=True)  # (n, 1)
    return np.concatenate([proj, norms], axis=1).astype(np.float32)


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` over the whole target (0 when identical)."""
    denom = float(np.linalg.norm(expected))
    if denom == 0.0:
        return float(np.linalg.norm(actual))
    return float(np.linalg.norm(actual - expected)) / denom


def fingerprint_info(tolerance: float = SKETCH_TOLERANCE) -> dict:
    """The ``base.fingerprint`` metadata block written with every patch."""
    return {FingerprintKey.METHOD: SKETCH_METHOD, FingerprintKey.SIZE: SKETCH_SIZE, FingerprintKey.TOLERANCE: tolerance}


def attach_sketches(patch: Patch, get_vectors: Callable[[Target], np.ndarray]) -> None:
    """Fill ``base_sketch`` of every target from the base model (used when a patch is made)."""
    fp = patch.base.get(BaseKey.FINGERPRINT) or {}
    size = int(fp.get(FingerprintKey.SIZE, SKETCH_SIZE))
    if not 1 <= size <= MAX_SKETCH_SIZE:
        raise ValueError(f"sketch size {size} outside [1, {MAX_SKETCH_SIZE}]")
    for t in patch.targets:
        t.base_sketch = sketch(t.name, get_vectors(t), size)


def check_description(patch: Patch, model_desc: dict, model_label: str) -> None:
    """Compare the patch's base description (architecture, sizes) with a model's, cheaply, first."""
    for key in (BaseKey.D_MODEL, BaseKey.N_FF, BaseKey.N_LAYERS):
        want, got = patch.base.get(key), model_desc.get(key)
        if want is not None and got is not None and int(want) != int(got):
            raise BaseMismatchError(
                f"{model_label}: patch was made for a model with {key}={want}, this model has {key}={got}"
            )


def check_base(
    patch: Patch,
    get_vectors: Callable[[Target], np.ndarray],
    model_label: str,
    targets: Iterable[Target] | None = None,
) -> dict[str, float]:
    """Refuse a model the patch was not made for; return the relative error per target.

    A target without a base sketch is refused unless :func:`base_check_skipped` is active; the
    tolerance is the patch's, capped at :data:`TOLERANCE_CAP`; the sketch size comes from the
    stored sketch, so no metadata number sizes an allocation.

    Args:
        get_vectors: returns the model's current vectors of ``target.indices`` as float32 ``(n, d)``.
        model_label: names the model in error messages (a path, usually).

    Raises:
        BaseMismatchError: naming the first target whose sketch is off by more than the tolerance.
    """
    tol = tolerance(patch)
    errors: dict[str, float] = {}
    for t in targets if targets is not None else patch.targets:
        if t.base_sketch is None:
            if not _SKIP.get():
                raise BaseMismatchError(
                    f"{model_label}: the patch carries no base fingerprint for {t.name}, so it cannot be checked "
                    f"against this model; pass --skip-base-check to apply it anyway")
            log.warning("target %s carries no base sketch; fingerprint not checked (--skip-base-check)", t.name)
            continue
        size = sketch_size(t)
        vec = get_vectors(t)
        if vec.shape != (t.n_neurons, t.vector_len):
            raise BaseMismatchError(
                f"{model_label}: tensor {t.name}: neuron vectors have shape {vec.shape}, patch expects {(t.n_neurons, t.vector_len)}"
            )
        err = relative_error(np.asarray(t.base_sketch, np.float32), sketch(t.name, vec, size))
        errors[t.name] = err
        if not err <= tol:
            raise BaseMismatchError(
                f"{model_label}: tensor {t.name} does not match the patch's base model "
                f"(fingerprint relative error {err:.3f} > tolerance {tol}); the patch was made for "
                f"{patch.base.get(BaseKey.NAME) or 'another model'}"
            )
    return errors
