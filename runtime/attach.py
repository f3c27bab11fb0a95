"""Attach a patch to a live torch model, and detach it again bit for bit.

Why not fold a copy: a live model can then serve "with" and "without" the patch (for chat
comparisons, evaluation with ``--compare``, or swapping policy versions) without reloading.
Why save original rows instead of subtracting the delta on detach: ``(w + d) - d != w`` in
float16/bfloat16 (and even in float32), so only copying the saved values back is exact.

Arithmetic is float32 (the deltas are added to an fp32 copy of the touched rows, then cast
back to the weight's dtype), as in the converters' folds, so an attached model matches a
folded safetensors model of the same dtype.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from nestpatch.errors import BaseMismatchError, InputError, UnsupportedError
from nestpatch.fingerprint import check_base, check_description
from nestpatch.format.constants import AXIS_ROW
from nestpatch.format.patch import Patch, Target
from nestpatch.models.files import describe_hf_config
from nestpatch.models.loading import parameter_vectors
from nestpatch.models.naming import parse_hf_name

log = logging.getLogger(__name__)

#: Attribute on the model that lists attached handles (innermost last), so detaches stay LIFO.
_STACK_ATTR = "_nestpatch_attached"

#: Prefixes under which a causal LM may hold its decoder layers (plain, multimodal wrappers).
_LAYER_PREFIXES = ("model.layers.", "model.language_model.layers.", "language_model.model.layers.", "layers.")

SignatureCheck = Callable[[Patch], Any]


def resolve_parameter(model: Any, name: str) -> Any:
    """The model's parameter for a patch target name, trying the layer prefixes models use.

    Patches name weights as plain decoder models do (``model.layers.N.mlp.up_proj.weight``);
    a multimodal wrapper nests the same weight under ``model.language_model.layers.N...``.

    Raises:
        UnsupportedError: no parameter of the model matches.
    """
    try:
        return model.get_parameter(name)
    except AttributeError:
        pass
    ref = parse_hf_name(name)
    tail = f"{ref.layer}.mlp.{ref.module}.weight"
    for prefix in _LAYER_PREFIXES:
        try:
            return model.get_parameter(prefix + tail)
        except AttributeError:
            continue
    raise UnsupportedError(f"model has no tensor {name} (nor {tail} under {', '.join(_LAYER_PREFIXES)})")


def _model_label(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


def verify_signature(patch: Patch | str | os.PathLike, public_key: Any) -> None:
    """Refuse an unsigned patch or one whose signature does not verify with ``public_key``.

    Args:
        patch: the patch, or better its file (the check then covers the file's exact bytes).
        public_key: a callable ``(patch) -> None`` that raises on failure, or a public key (a file
            path, PEM/OpenSSH/hex text or bytes) for ``nestpatch.audit.signing.require_signature``.

    Raises:
        SignatureError: unsigned, signed by another key, or changed since signing.
    """
    if callable(public_key):
        public_key(patch)
        return
    try:
        from nestpatch.audit.signing import require_signature
    except ImportError:
        raise UnsupportedError("signature verification is not available (nestpatch.audit.signing is missing)") from None
    require_signature(patch, public_key)


@dataclass
class _Saved:
    """What one target changed: the parameter, the indices, and the exact original values."""

    target: Target
    param: Any  # torch.nn.Parameter
    index: Any  # torch.LongTensor (n,) on the parameter's device
    original: Any  # torch.Tensor: (n, d) rows, or (d, n) columns, in the parameter's dtype
    written: Any = None  # the values written, to notice foreign writes before restoring


@dataclass
class AttachHandle:
    """An attached patch. ``detach()`` (or leaving the ``with`` block) restores the model exactly."""

    model: Any
    patch: Patch
    fingerprint_errors: dict[str, float] = field(default_factory=dict)
    _saved: list[_Saved] = field(default_factory=list, repr=False)
    _attached: bool = True

    @property
    def attached(self) -> bool:
        return self._attached

    def detach(self) -> None:
        """Copy the saved original rows/columns back. Idempotent.

        Raises:
            RuntimeError: another patch attached later is still attached (detach in LIFO order).
        """
        if not self._attached:
            return
        import torch

        stack = getattr(self.model, _STACK_ATTR, [])
        if stack and stack[-1] is not self:
            raise RuntimeError("detach patches in reverse order of attaching: a patch attached later is still attached")
        with torch.no_grad():
            for s in reversed(self._saved):
                current = _read(s.param, s.index, s.target.axis)
                if s.written is not None and not torch.equal(current, s.written):
                    log.warning("tensor %s was modified while the patch was attached; restoring the original anyway", s.target.name)
                _write(s.param, s.index, s.target.axis, s.original)
        self._saved.clear()
        self._attached = False
        if stack:
            stack.pop()

    def swap(self, patch: Patch, **kwargs: Any) -> "AttachHandle":
        """Detach this patch and attach ``patch`` to the same model (no reload). Returns the new handle."""
        self.detach()
        return attach(self.model, patch, **kwargs)

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def _read(param: Any, index: Any, axis: str) -> Any:
    return param.index_select(0, index) if axis == AXIS_ROW else param.index_select(1, index)


def _write(param: Any, index: Any, axis: str, values: Any) -> None:
    param.data.index_copy_(0 if axis == AXIS_ROW else 1, index, values)


def attach(model: Any, patch: Patch, *, verify_base: bool = True, require_signature: Any = None) -> AttachHandle:
    """Add ``patch``'s deltas to ``model``'s weights in place; return a handle that undoes it.

    Args:
        model: a transformers causal LM (any model whose MLP weights the patch names).
        patch: the patch to attach.
        verify_base: check the base fingerprint first, refusing a patch made for another model.
        require_signature: a public key (or a checking callable): refuse an unsigned patch or a
            bad signature.

    Returns:
        An :class:`AttachHandle`; use ``handle.detach()`` or ``with attach(...):``.

    Raises:
        BaseMismatchError: the patch was made for another model (sizes or fingerprint).
        UnsupportedError: the model lacks a tensor the patch names.
    """
    import torch

    if require_signature is not None:
        verify_signature(patch, require_signature)
    label = _model_label(model)
    params = {t.name: resolve_parameter(model, t.name) for t in patch.targets}
    for t in patch.targets:
        p = params[t.name]
        if tuple(p.shape) != tuple(t.shape):
            raise BaseMismatchError(f"{label}: tensor {t.name}: model shape {tuple(p.shape)} != patch shape {tuple(t.shape)}")
        if p.device.type == "meta":
            raise UnsupportedError(f"{label}: tensor {t.name} is offloaded (meta device); attach needs the weights in memory")
    errors = check_model_base(model, patch, label, params) if verify_base else {}

    handle = AttachHandle(model=model, patch=patch, fingerprint_errors=errors)
    try:
        with torch.no_grad():
            for t in patch.targets:
                p = params[t.name]
                idx = torch.as_tensor(np.asarray(t.indices, dtype=np.int64), device=p.device)
                original = _read(p, idx, t.axis).clone()  # (n, d) rows or (d, n) columns
                delta = torch.from_numpy(t.neuron_deltas()).to(p.device)  # (n, d) float32
                if t.axis != AXIS_ROW:
                    delta = delta.T  # (d, n)
                new = (original.float() + delta).to(p.dtype)
                if not bool(torch.isfinite(new).all()):
                    raise InputError(f"{label}: tensor {t.name}: attaching the patch gives non-finite weights")
                handle._saved.append(_Saved(t, p, idx, original))
                _write(p, idx, t.axis, new)
                handle._saved[-1].written = new
    except BaseException:
        handle._attached = True
        _restore_partial(handle)
        raise
    stack = getattr(model, _STACK_ATTR, None)
    if stack is None:
        stack = []
        try:
            object.__setattr__(model, _STACK_ATTR, stack)
        except AttributeError:  # pragma: no cover - exotic models without a __dict__
            pass
    stack.append(handle)
    log.info("attached patch %s (%d targets, %d neurons) to %s", patch.content_digest, len(patch.targets), patch.n_neurons, label)
    return handle


def _restore_partial(handle: AttachHandle) -> None:
    """Undo the targets written so far when attaching fails half-way."""
    import torch

    with torch.no_grad():
        for s in reversed(handle._saved):
            _write(s.param, s.index, s.target.axis, s.original)
    handle._saved.clear()
    handle._attached = False


def check_model_base(model: Any, patch: Patch, label: str | None = None, params: dict[str, Any] | None = None) -> dict[str, float]:
    """Refuse a live torch model the patch was not made for (sizes, then fingerprint); return the error per target.

    Raises:
        BaseMismatchError: the patch was made for another model.
        UnsupportedError: the model lacks a tensor the patch names.
    """
    label = label or _model_label(model)
    params = params if params is not None else {t.name: resolve_parameter(model, t.name) for t in patch.targets}
    check_description(patch, describe_hf_config(getattr(model, "config", None)), label)
    return check_base(patch, lambda t: parameter_vectors(params[t.name], t), label)


def swap(handle: AttachHandle, patch: Patch, **kwargs: Any) -> AttachHandle:
    """Replace the attached patch of ``handle`` by ``patch`` on the same model (no reload)."""
    return handle.swap(patch, **kwargs)


def attached_patches(model: Any) -> list[AttachHandle]:
    """Handles attached to ``model``, innermost last."""
    return list(getattr(model, _STACK_ATTR, []))
