"""Is MODEL exactly BASE with PATCH folded in? (``nestpatch verify``)

With ``--base`` the fold is re-run (the converters' own ``fold_gguf`` / ``fold_safetensors``) into
a temporary location and MODEL is compared with it tensor by tensor: raw bytes first; for the
tensors that differ, decoded values locate the neurons and say how they differ:

* ``touched_outside``: values changed where the patch changes nothing (another tensor, or
  neurons the patch does not list);
* ``missing_delta``: a patched neuron (or tensor) still holds the base model's values;
* ``unexpected_values``: a patched neuron holds values that are neither;
* ``missing`` / ``unexpected_tensor`` / ``type_changed``: the tensor list or types differ;
* ``metadata`` / ``provenance``: model metadata differs, or names another patch.

Float tensors must match bit for bit. Quantized tensors the patch touches may be re-encoded by
another build or implementation, so they pass when every value is within one quantization step
of the re-run fold's and MODEL is as close to the intended float result (base + delta) as our own
re-encoding is (``QUANT_SLACK`` times its error); ``exact=True`` (``--exact``) demands the bytes.

Without ``--base`` only what MODEL itself records can be checked: the fold provenance keys
(patch digest, policy, touched tensors) and, per target, that removing the patch's deltas from
MODEL gives back neurons matching the patch's base fingerprint (a coarse check of the deltas).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


import numpy as np

from ..errors import InputError
from ..fingerprint import relative_error, sketch, sketch_size, tolerance
from ..format.constants import AXIS_ROW, PolicyKey
from ..format.patch import Patch, Target
from ..format.reader import read_patch
from ..provenance import patch_digest
from ..models.files import ModelFile, neuron_vectors, open_model

log = logging.getLogger(__name__)

#: A quantized touched tensor whose bytes differ from the re-run fold passes when every value is
#: within one quantization step of the re-run fold's and ``err(MODEL) <= QUANT_SLACK * err(refold)``
#: with err = ||values - (base + delta)||: as close to the intended result as a re-encoding.
QUANT_SLACK = 1.25
#: A patched neuron counts as "missing its delta" when it moved less than this share of the delta.
MISSING_SHARE = 0.05
#: Without --base: a target "misses its delta" when MODEL matches the base fingerprint this much
#: better than base + delta, and the latter's error is above re-encoding noise.
MISSING_RATIO = 0.5
MIN_FINGERPRINT_ERROR = 0.02
#: Metadata keys allowed to differ between MODEL and the re-run fold (they name the tool, not the weights).
_VOLATILE_KEYS = ("nestpatch.tool_version",)
_LIST_LIMIT = 12


@dataclass
class Finding:
    """One way MODEL differs from what it should be."""

    tensor: str
    problem: str
    detail: str


@dataclass
class VerifyResult:
    model: str
    patch: str
    base: str | None
    mode: str  # "refold" (with --base) or "provenance"
    format: str = ""
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tensors_compared: int = 0
    tensors_identical: int = 0
    within_tolerance: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _fmt_idx(idx: np.ndarray | list[int]) -> str:
    idx = [int(i) for i in idx]
    s = ",".join(str(i) for i in idx[:_LIST_LIMIT])
    return s + (f",... ({len(idx)} in all)" if len(idx) > _LIST_LIMIT else "")


# --------------------------------------------------------------------------- refold


def _refold(base: str, patch: Patch, model: ModelFile, tmp: Path) -> Path:
    """Re-run the fold of ``patch`` into ``base`` the way MODEL was folded; return the output path."""
    from ..converters.provenance import FoldKey

    if model.format == "gguf":
        from ..converters.gguf_fold import fold_gguf

        precision = str(model.metadata().get(FoldKey.PRECISION) or "keep")
        out = tmp / "expected.gguf"
        fold_gguf(base, patch, out, precision=precision, progress=False)
        return out
    from ..converters.safetensors_fold import fold_safetensors

    out = tmp / (Path(base).name if Path(base).is_file() else "expected")
    fold_safetensors(base, patch, out, progress=False)
    return out


def _targets_by_tensor(p: Patch, m: ModelFile) -> dict[str, Target]:
    out = {}
    for t in p.targets:
        name = m.target_tensor(t.name)
        if name is not None:
            out[name] = t
    return out


def _classify_neurons(name: str, t: Target, mv: np.ndarray, ev: np.ndarray, bv: np.ndarray, bad: np.ndarray) -> list[Finding]:
    """Findings for neurons flagged ``bad`` in a touched tensor.

    Args:
        mv, ev, bv: MODEL, expected and base neuron vectors, ``(N, d)`` over the whole neuron axis.
        bad: ``(N,)`` bool, neurons where MODEL is off.
    """
    out: list[Finding] = []
    in_patch = np.zeros(bad.shape[0], bool)
    in_patch[np.asarray(t.indices, np.int64)] = True
    outside = np.flatnonzero(bad & ~in_patch)
    if outside.size:
        dev = np.abs(mv[outside] - bv[outside]).max()
        out.append(Finding(name, "touched_outside",
                           f"neurons {_fmt_idx(outside)} changed but the patch does not touch them (max |diff| {dev:.3g})"))
    inside = np.flatnonzero(bad & in_patch)
    if inside.size:
        moved = np.linalg.norm(mv[inside] - bv[inside], axis=1)  # (k,)
        wanted = np.linalg.norm(ev[inside] - bv[inside], axis=1)  # (k,)
        missing = inside[moved <= MISSING_SHARE * np.maximum(wanted, 1e-30)]
        wrong = np.setdiff1d(inside, missing)
        if missing.size:
            out.append(Finding(name, "missing_delta", f"patched neurons {_fmt_idx(missing)} still hold the base values"))
        if wrong.size:
            dev = np.abs(mv[wrong] - ev[wrong]).max()
            out.append(Finding(name, "unexpected_values",
                               f"patched neurons {_fmt_idx(wrong)} differ from base + delta (max |diff| {dev:.3g})"))
    return out


def _compare_tensor(name: str, m: ModelFile, e: ModelFile, b: ModelFile, t: Target | None, res: VerifyResult,
                    exact: bool = False) -> None:
    info_m, info_e = m.tensors[name], e.tensors[name]
    if (info_m.type, info_m.shape) != (info_e.type, info_e.shape):
        res.findings.append(Finding(name, "type_changed", f"expected {info_e.type} {list(info_e.shape)}, found {info_m.type} {list(info_m.shape)}"))
        return
    if np.array_equal(m.raw(name), e.raw(name)):
        res.tensors_identical += 1
        return
    M, E = m.floats(name), e.floats(name)
    if t is None:
        # the fold leaves this tensor alone: any change is a change where the patch touches nothing
        diff = np.abs(M - E)
        rows = np.flatnonzero(diff.reshape(diff.shape[0], -1).max(axis=1) > 0) if diff.ndim >= 1 else np.array([0])
        where = f"rows {_fmt_idx(rows)}" if diff.ndim >= 2 else "values"
        if not rows.size:
            where = "encoded bytes (same decoded values)"
        res.findings.append(Finding(name, "touched_outside",
                                    f"the patch does not touch this tensor but its {where} differ (max |diff| {float(diff.max()):.3g})"))
        return
    B = b.floats(name) if name in b.tensors else E
    if name in b.tensors and np.array_equal(m.raw(name), b.raw(name)):
        res.findings.append(Finding(name, "missing_delta", "tensor is byte-identical to the base: the patch was not folded into it"))
        return
    dev = np.abs(M - E)  # (rows, row_len): the stored layout, quant blocks run along the last axis
    if info_m.quantized:
        # the fold re-encodes only blocks holding a patched neuron: any other block must be byte-identical,
        # whatever the re-encoding tolerance says about the touched ones
        outside_el = (dev > 0) & ~_touched_blocks(t, M.shape, info_m.type)
        if outside_el.any():
            bad_out = neuron_vectors(outside_el, t.axis, np.arange(t.n_neuron_axis)).any(axis=1)
            mv, ev, bv = (neuron_vectors(x, t.axis, np.arange(t.n_neuron_axis)) for x in (M, E, B))
            res.findings.extend(_classify_neurons(name, t, mv, ev, bv, bad_out))
            dev = np.where(outside_el, 0.0, dev)
            if not dev.any():
                return
        step = block_steps(E, info_m.type)  # (rows, row_len): one quantization step of each element's block
        excess = dev / np.maximum(step, 1e-30)
        intended = B + t.dense_update()  # what the fold aims at, before re-encoding
        err_m, err_e = float(np.linalg.norm(M - intended)), float(np.linalg.norm(E - intended))
        if not exact and excess.max() <= 1.0 + 1e-3 and err_m <= QUANT_SLACK * err_e + 1e-6 * float(np.linalg.norm(intended)):
            res.within_tolerance.append(name)
            res.notes.append(f"{name}: {info_m.type} bytes differ from the re-run fold, values within one quantization "
                             f"step and as close to base + delta (error {err_m:.4g} vs {err_e:.4g}): within the re-encoding tolerance")
            return
        bad_el = dev > 0 if exact else excess > 1.0 + 1e-3
    else:
        bad_el = dev > 0
    mv, ev, bv = (neuron_vectors(x, t.axis, np.arange(t.n_neuron_axis)) for x in (M, E, B))  # (N, d) each
    bad = neuron_vectors(bad_el, t.axis, np.arange(t.n_neuron_axis)).any(axis=1)  # (N,)
    found = _classify_neurons(name, t, mv, ev, bv, bad)
    if not found:  # bytes differ but no value is off by a step: spread re-encoding differences
        found = [Finding(name, "unexpected_values", f"{info_m.type} encoding differs from the re-run fold and is further "
                                                    f"from base + delta (error {err_m:.4g} vs {err_e:.4g})"
                         if info_m.quantized else "encoded bytes differ (same decoded values)")]
    res.findings.extend(found)


def _touched_blocks(t: Target, shape: tuple[int, ...], qtype: str) -> np.ndarray:
    """``shape`` bool: elements whose quantization block holds an element of a patched neuron."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    touched = np.zeros(shape, bool)
    idx = np.asarray(t.indices, np.int64)
    if t.axis == AXIS_ROW:
        touched[idx, :] = True
    else:
        touched[:, idx] = True
    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    rows, row_len = shape[0], int(np.prod(shape[1:]))
    if block <= 1 or row_len % block:
        return touched
    per_block = touched.reshape(rows, row_len // block, block).any(axis=2, keepdims=True)
    return np.broadcast_to(per_block, (rows, row_len // block, block)).reshape(shape)


#: Quantization levels per element (block of ``_SUB_BLOCK`` values) of each GGML type.
_LEVELS = {"Q4_0": 16, "Q4_1": 16, "Q5_0": 32, "Q5_1": 32, "Q8_0": 256, "Q8_1": 256, "Q2_K": 4, "Q3_K": 8,
           "Q4_K": 16, "Q5_K": 32, "Q6_K": 64, "Q8_K": 256, "IQ4_NL": 16, "IQ4_XS": 16}
_SUB_BLOCK = {"Q2_K": 16, "Q3_K": 16, "Q6_K": 16}


def block_steps(values: np.ndarray, qtype: str) -> np.ndarray:
    """Estimated quantization step of each element's block: (max - min) / (levels - 1) of the block.

    A conforming re-encoder of the same float values lands within about one step of any other;
    a changed byte (a nibble's high bit, a block scale) moves values by several steps.

    Args:
        values: decoded tensor ``(rows, row_len)``; blocks are consecutive values along a row.
    """
    levels = _LEVELS.get(qtype, 16)
    bs = _SUB_BLOCK.get(qtype, 32)
    rows, n = values.shape[0], values.shape[-1]
    if n % bs:
        bs = n  # odd row lengths: treat the row as one block (coarser, still a bound)
    blocks = values.reshape(rows, n // bs, bs)  # (rows, blocks, bs)
    step = (blocks.max(axis=2) - blocks.min(axis=2)) / (levels - 1)  # (rows, blocks)
    return np.repeat(step, bs, axis=1).reshape(values.shape)


def _compare_metadata(m: ModelFile, e: ModelFile, res: VerifyResult) -> None:
    mm, em = m.metadata(), e.metadata()
    for key in sorted(set(mm) | set(em)):
        if key in _VOLATILE_KEYS or mm.get(key) == em.get(key):
            continue
        if key not in mm:
            if key.startswith("nestpatch."):
                res.notes.append(f"MODEL does not record {key} (folded without provenance?)")
            else:
                res.findings.append(Finding(key, "metadata", "key missing from MODEL"))
        elif key not in em:
            res.findings.append(Finding(key, "metadata", "key present in MODEL but not in a fold of the patch"))
        else:
            a, b = str(mm[key]), str(em[key])
            res.findings.append(Finding(key, "provenance" if key.startswith("nestpatch.") else "metadata",
                                        f"expected {b[:80]!r}, found {a[:80]!r}"))


def verify_against_base(model_path: str | os.PathLike, patch: Patch, base_path: str | os.PathLike,
                        res: VerifyResult, exact: bool = False) -> None:
    m = open_model(model_path)
    b = open_model(base_path)
    try:
        if m.format != b.format:
            raise InputError(f"{model_path}: is {m.format} but --base {base_path} is {b.format}; verify compares a fold with its own base format")
        res.format = m.format
        with tempfile.TemporaryDirectory(prefix="nestpatch-verify-") as tmpdir:
            e = open_model(_refold(str(base_path), patch, m, Path(tmpdir)))
            try:
                targets = _targets_by_tensor(patch, e)
                for name in sorted(set(e.tensors) | set(m.tensors)):
                    if name not in m.tensors:
                        res.findings.append(Finding(name, "missing", "tensor is missing from MODEL"))
                        continue
                    if name not in e.tensors:
                        res.findings.append(Finding(name, "unexpected_tensor", "MODEL has a tensor the base does not"))
                        continue
                    res.tensors_compared += 1
                    _compare_tensor(name, m, e, b, targets.get(name), res, exact)
                _compare_metadata(m, e, res)
            finally:
                e.close()
    finally:
        m.close()
        b.close()


# --------------------------------------------------------------------------- provenance only


def verify_provenance(model_path: str | os.PathLike, patch: Patch, res: VerifyResult) -> None:
    from ..converters.provenance import FoldKey

    m = open_model(model_path)
    try:
        res.format = m.format
        meta = m.metadata()
        digest = patch_digest(patch)
        recorded = meta.get(FoldKey.PATCH_DIGEST)
        if not recorded:
            res.findings.append(Finding(FoldKey.PATCH_DIGEST, "provenance", "MODEL records no folded patch (not a nestpatch fold)"))
        elif str(recorded) != digest:
            res.findings.append(Finding(FoldKey.PATCH_DIGEST, "provenance",
                                        f"MODEL records patch {recorded}, not this patch ({digest}); "
                                        f"policy {meta.get(FoldKey.POLICY_NAME)!r} {meta.get(FoldKey.POLICY_VERSION)!r}"))
        for key, want in ((FoldKey.POLICY_NAME, patch.policy.get(PolicyKey.NAME, "")),
                          (FoldKey.POLICY_VERSION, patch.policy.get(PolicyKey.VERSION, ""))):
            if recorded and key in meta and str(meta[key]) != str(want):
                res.findings.append(Finding(key, "provenance", f"expected {str(want)!r}, found {str(meta[key])!r}"))
        targets = _targets_by_tensor(patch, m)
        for t in patch.targets:
            if m.target_tensor(t.name) is None:
                res.findings.append(Finding(t.name, "missing", "MODEL has no tensor for this patch target"))
        if FoldKey.TARGETS in meta:
            try:
                listed = set(json.loads(str(meta[FoldKey.TARGETS])))
            except json.JSONDecodeError:
                listed = set()
                res.findings.append(Finding(FoldKey.TARGETS, "provenance", "not a JSON list"))
            for name in sorted(set(targets) - listed):
                res.findings.append(Finding(name, "provenance", "the patch targets this tensor but MODEL does not record folding it"))
            for name in sorted(listed - set(targets)):
                res.findings.append(Finding(name, "provenance", "MODEL records folding this tensor but the patch does not target it"))
        _residual_fingerprints(m, patch, targets, res)
        res.notes.append("without --base only the recorded provenance and the neurons' fingerprints are checked; "
                         "pass --base BASE for a tensor-by-tensor check")
    finally:
        m.close()


def _residual_fingerprints(m: ModelFile, patch: Patch, targets: dict[str, Target], res: VerifyResult) -> None:
    """MODEL's neurons minus the deltas should match the patch's base sketch (within its tolerance)."""
    tol = tolerance(patch)
    for name, t in sorted(targets.items()):
        if t.base_sketch is None:
            continue
        size = sketch_size(t)
        res.tensors_compared += 1
        vec = neuron_vectors(m.floats(name), t.axis, np.asarray(t.indices, np.int64))  # (n, d)
        ref = np.asarray(t.base_sketch, np.float32)
        with_delta = relative_error(ref, sketch(t.name, vec - t.neuron_deltas(), size))
        without = relative_error(ref, sketch(t.name, vec, size))
        # Folded: MODEL - delta is the base (error ~ re-encoding noise) and MODEL alone is off by
        # about |delta|/|base|. Not folded: the other way round. The margin keeps re-encoding noise
        # from flipping the verdict when a delta is tiny.
        if without < MISSING_RATIO * with_delta and with_delta > MIN_FINGERPRINT_ERROR:
            res.findings.append(Finding(name, "missing_delta",
                                        f"patched neurons match the base fingerprint (error {without:.3f}) "
                                        f"better than base + delta ({with_delta:.3f})"))
        elif with_delta > tol:
            res.findings.append(Finding(name, "unexpected_values",
                                        f"patched neurons minus the deltas do not match the base fingerprint (error {with_delta:.3f} > {tol})"))


# --------------------------------------------------------------------------- entry point


def verify_model(model: str | os.PathLike, patch: str | os.PathLike, *, base: str | os.PathLike | None = None,
                 exact: bool = False) -> VerifyResult:
    """Check that ``model`` is ``base`` with ``patch`` folded in (or, without base, its recorded provenance).

    Args:
        exact: quantized tensors must be byte-identical to the re-run fold too (no re-encoding tolerance).

    Returns:
        A :class:`VerifyResult`; ``result.ok`` is False with one :class:`Finding` per problem.

    Raises:
        InputError / FormatError / BaseMismatchError: unreadable inputs, or a BASE the patch was
            not made for (the fold refuses it), as one-line user errors.
    """
    p = read_patch(patch)
    res = VerifyResult(model=str(model), patch=str(patch), base=None if base is None else str(base),
                       mode="refold" if base is not None else "provenance")
    if base is not None:
        verify_against_base(model, p, base, res, exact)
    else:
        verify_provenance(model, p, res)
    return res


def render_verify(res: VerifyResult) -> str:
    """Human rendering: verdict first, then one line per finding."""
    head = (f"{res.model}: {'OK' if res.ok else 'FAILED'}: "
            + (f"{'is' if res.ok else 'is not'} {res.base} with {res.patch} folded in" if res.mode == "refold"
               else f"provenance {'matches' if res.ok else 'does not match'} {res.patch}"))
    lines = [head]
    if res.mode == "refold":
        lines.append(f"  {res.tensors_compared} tensors compared ({res.format}): {res.tensors_identical} byte-identical, "
                     f"{len(res.within_tolerance)} within re-encoding tolerance, "
                     f"{len({f.tensor for f in res.findings if f.problem not in ('metadata', 'provenance')})} differ")
    for f in res.findings:
        lines.append(f"  {f.problem:<18} {f.tensor}: {f.detail}")
    for n in res.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


__all__ = ["Finding", "VerifyResult", "verify_model", "render_verify", "QUANT_SLACK"]
