"""Invariants of a patch. Both the reader (on every file) and the writer (before writing) run them."""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .constants import AXES, DELTA_DTYPES, MAX_DIM, MAX_LAYERS
from .patch import Patch, Target

#: A sketch has S projections plus the norm; S is capped so no file can size a large allocation.
MAX_SKETCH_COLUMNS = 65


def canonical_target_name(name: str) -> str:
    """The weight a target name addresses: ``layers.0.mlp.up_proj.weight`` and
    ``model.layers.0.mlp.up_proj.weight`` are one weight, so uniqueness is checked on this."""
    from ..errors import UnsupportedError
    from ..models.naming import parse_hf_name

    try:
        return parse_hf_name(name).hf_name
    except UnsupportedError:
        return name


def validate_target(t: Target, where: str = "") -> None:
    """Raise :class:`FormatError` naming the target and the broken invariant."""
    w = f"{where}target {t.name!r}"
    if t.axis not in AXES:
        raise FormatError(f"{w}: axis {t.axis!r} invalid, expected one of {AXES}")
    if len(t.shape) != 2 or not all(isinstance(s, int) and 0 < s <= MAX_DIM for s in t.shape):
        raise FormatError(f"{w}: shape {t.shape!r} invalid, expected two positive ints")
    if t.delta_dtype not in DELTA_DTYPES:
        raise FormatError(f"{w}: delta dtype {t.delta_dtype!r} invalid, expected one of {DELTA_DTYPES}")
    idx, cl, d = np.asarray(t.indices), np.asarray(t.clusters), np.asarray(t.deltas)
    n = idx.shape[0] if idx.ndim == 1 else -1
    if idx.ndim != 1 or n == 0:
        raise FormatError(f"{w}: indices must be a non-empty 1-D array, found shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer) or not np.issubdtype(cl.dtype, np.integer):
        raise FormatError(f"{w}: indices and clusters must be integers, found {idx.dtype} and {cl.dtype}")
    if n > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise FormatError(f"{w}: indices must be sorted and unique")
    if int(idx[0]) < 0 or int(idx[-1]) >= t.n_neuron_axis:
        raise FormatError(f"{w}: indices must lie in [0, {t.n_neuron_axis}), found [{int(idx.min())}, {int(idx.max())}]")
    if cl.shape != (n,):
        raise FormatError(f"{w}: clusters shape {cl.shape} does not match {n} neurons")
    if d.ndim != 2 or d.shape[1] != t.vector_len or d.shape[0] == 0:
        raise FormatError(f"{w}: deltas shape {d.shape} invalid, expected (K>0, {t.vector_len}) for axis {t.axis}")
    k = d.shape[0]
    if int(cl.min()) < 0 or int(cl.max()) >= k:
        raise FormatError(f"{w}: cluster ids must lie in [0, {k}), found [{int(cl.min())}, {int(cl.max())}]")
    counts = np.bincount(cl.astype(np.int64), minlength=k)
    if (counts == 0).any():
        raise FormatError(f"{w}: cluster {int(np.argmin(counts))} has no neurons")
    if not np.isfinite(d).all():
        raise FormatError(f"{w}: deltas contain NaN or infinite values")
    if t.scales is not None:
        s = np.asarray(t.scales)
        if s.shape != (n,):
            raise FormatError(f"{w}: scales shape {s.shape} does not match {n} neurons")
        if not np.isfinite(s).all():
            raise FormatError(f"{w}: scales contain NaN or infinite values")
    if t.base_sketch is not None:
        sk = np.asarray(t.base_sketch)
        if sk.ndim != 2 or sk.shape[0] != n or not 2 <= sk.shape[1] <= MAX_SKETCH_COLUMNS:
            raise FormatError(f"{w}: base_sketch shape {sk.shape} invalid, expected ({n}, S+1) with 1 <= S <= {MAX_SKETCH_COLUMNS - 1}")
        if not np.isfinite(sk).all():
            raise FormatError(f"{w}: base_sketch contains NaN or infinite values")


def validate_patch(p: Patch, where: str = "") -> None:
    """Validate every target and the cross-target invariants (unique names, non-empty)."""
    if not p.targets:
        raise FormatError(f"{where}patch has no targets")
    seen: dict[str, str] = {}
    for t in p.targets:
        canon = canonical_target_name(t.name)
        if canon in seen:
            what = "appears twice" if seen[canon] == t.name else f"and {seen[canon]!r} address the same weight {canon}"
            raise FormatError(f"{where}target {t.name!r} {what}")
        seen[canon] = t.name
        validate_target(t, where)
    check_against_base(p, where)


def check_against_base(p: Patch, where: str = "") -> None:
    """MUSTs that tie targets to ``base``: each addresses one MLP weight, with its module's axis, a
    layer below ``n_layers`` and the shape ``d_model``/``n_ff`` give; sketches have ``size + 1`` columns."""
    from ..errors import UnsupportedError
    from ..models.naming import parse_hf_name

    base = p.base if isinstance(p.base, dict) else {}
    d_model, n_ff, n_layers = base.get("d_model"), base.get("n_ff"), base.get("n_layers")
    for t in p.targets:
        try:
            ref = parse_hf_name(t.name)
        except UnsupportedError as e:  # a fused/MoE or non-MLP name: unsupported, refused the same way
            raise UnsupportedError(f"{where}target {t.name!r}: {e}") from None
        if t.axis != ref.axis:
            raise FormatError(f"{where}target {t.name!r}: axis {t.axis!r}, but {ref.module} holds its neurons on axis {ref.axis!r}")
        if isinstance(n_layers, int) and ref.layer >= n_layers:
            raise FormatError(f"{where}target {t.name!r}: layer {ref.layer} >= base.n_layers {n_layers}")
        if ref.layer >= MAX_LAYERS:
            raise FormatError(f"{where}target {t.name!r}: layer {ref.layer} is beyond the {MAX_LAYERS} layers a model may have")
        if isinstance(d_model, int) and isinstance(n_ff, int):
            want = (n_ff, d_model) if ref.module in ("gate_proj", "up_proj") else (d_model, n_ff)
            if tuple(t.shape) != want:
                raise FormatError(f"{where}target {t.name!r}: shape {list(t.shape)} does not match base "
                                  f"d_model {d_model} / n_ff {n_ff} (expected {list(want)})")
    fp = base.get("fingerprint")
    size = fp.get("size") if isinstance(fp, dict) else None
    if isinstance(size, int):
        for t in p.targets:
            if t.base_sketch is not None and np.asarray(t.base_sketch).shape[1] != size + 1:
                raise FormatError(f"{where}target {t.name!r}: base_sketch has {np.asarray(t.base_sketch).shape[1]} "
                                  f"columns, base.fingerprint.size {size} needs {size + 1}")
