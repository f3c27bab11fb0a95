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

import hashlib
import logging
from typing import Callable, Iterable

import numpy as np

from .errors import BaseMismatchError
from .format.constants import SKETCH_METHOD, SKETCH_SIZE, SKETCH_TOLERANCE, BaseKey, FingerprintKey
from .format.patch import Patch, Target

log = logging.getLogger(__name__)

_SALT = b"nestpatch-sketch-v1:"


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
    size = int(patch.base.get(BaseKey.FINGERPRINT, {}).get(FingerprintKey.SIZE, SKETCH_SIZE))
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

    Args:
        get_vectors: returns the model's current vectors of ``target.indices`` as float32 ``(n, d)``.
        model_label: names the model in error messages (a path, usually).

    Raises:
        BaseMismatchError: naming the first target whose sketch is off by more than the tolerance.
    """
    fp = patch.base.get(BaseKey.FINGERPRINT, {}) or {}
    tol = float(fp.get(FingerprintKey.TOLERANCE, SKETCH_TOLERANCE))
    size = int(fp.get(FingerprintKey.SIZE, SKETCH_SIZE))
    errors: dict[str, float] = {}
    for t in targets if targets is not None else patch.targets:
        if t.base_sketch is None:
            log.warning("target %s carries no base sketch; fingerprint not checked", t.name)
            continue
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
