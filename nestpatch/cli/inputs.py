"""The command-input layer: open a model and a patch, check the signature, guard the outputs, and
dispatch a fold or an export by file type, in one place. ``apply``, ``revert``, ``export-lora``,
``verify``, ``sign``, ``report``, ``keygen``, ``eval``, ``train`` and ``bench`` parse their flags
and call these.

The output guard is what keeps "inputs are never modified" true: every output a command will
write is resolved the way the writer will resolve it (a file output given as an existing
directory gets the input's file name appended *before* the check) and refused, with one line and
before any work, when it is an input (same path, a symlink or a hard link to it), lies inside an
input directory or contains an input, or lies in the asset cache. Replacing an existing output
needs ``--force``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..assets import ASSETS, asset_path, home, resolve_model
from ..errors import InputError, SignatureError
from ..format import read_patch
from ..format.patch import Patch

#: The magic of a GGUF file: how a model is told from a patch regardless of its suffix.
GGUF_MAGIC = b"GGUF"

PathLike = str | os.PathLike


def is_gguf(path: PathLike) -> bool:
    """A GGUF model file: a ``.gguf`` suffix (any case) or the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(p))


def _under(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_named_model(spec: str) -> bool:
    return spec in ASSETS and ASSETS[spec].kind == "model" and not Path(spec).exists()


def model_location(spec: str) -> Path:
    """Where model ``spec`` is (a named model's cache path, fetched or not) without fetching it."""
    return asset_path(spec) if is_named_model(spec) else Path(spec)


def in_cache(path: PathLike) -> bool:
    """Does ``path`` (after links) lie in the asset cache ``$NESTPATCH_HOME``?"""
    return _under(_real(path), _real(home()))


def file_output(out: PathLike, source: PathLike | None) -> Path:
    """The file a writer creates for ``out``: an existing directory gets ``source``'s name appended."""
    o = Path(out)
    if source is not None and o.is_dir() and not Path(source).is_dir():
        return o / Path(source).name
    return o


def guard_outputs(outputs: Iterable[PathLike | None], inputs: Iterable[PathLike | None], *, force: bool = False,
                  existing_ok: bool = False) -> None:
    """Refuse outputs that would overwrite an input or the cache, or replace a file without ``force``.

    Args:
        outputs: every path the command will write (after :func:`file_output`); ``None`` skipped.
        inputs: every path it reads (models, patches, keys, data); ``None`` skipped.
        force: an existing output may be replaced.
        existing_ok: an existing output is expected (a run directory resumed); skip the ``--force`` rule.

    Raises:
        InputError: one line naming the output and the input it would destroy.
    """
    ins: list[tuple[Path, Path]] = [(Path(i), _real(i)) for i in inputs if i is not None and str(i) != ""]
    cache = _real(home())
    for out in outputs:
        if out is None or str(out) == "":
            continue
        o = Path(out)
        ro = _real(o)
        if _under(ro, cache):
            raise InputError(f"{o}: output lies in the asset cache {home()}; cached models and data are read-only, "
                             f"choose an output elsewhere")
        for i, ri in ins:
            same = ro == ri
            if not same and o.exists() and i.exists():
                try:
                    same = os.path.samefile(o, i)
                except OSError:
                    same = False
            if same:
                how = "" if os.path.abspath(o) == os.path.abspath(i) else " (the same file under another name or link)"
                raise InputError(f"{o}: output is the input {i}{how}; inputs are never overwritten, choose another output")
            if i.is_dir() and _under(ro, ri):
                raise InputError(f"{o}: output lies inside the input directory {i}; choose an output outside it")
            if _under(ri, ro):
                raise InputError(f"{o}: output contains the input {i}; writing it would destroy the input")
        if (o.exists() or o.is_symlink()) and not (force or existing_ok):
            raise InputError(f"{o}: exists; pass --force to replace it")


def refuse_in_place_on_cache(spec: str, path: Path) -> None:
    """``--in-place`` on a named or cached model would rewrite every later run's base: refused."""
    if is_named_model(spec) or in_cache(path):
        raise InputError(f"{spec}: is a named/cached model (read-only); --in-place is refused, write a copy with -o OUT")


def open_model(spec: str) -> Path:
    """A model argument (path, or a named model fetched on demand) that must exist."""
    path = resolve_model(spec)
    if not path.exists():
        raise InputError(f"{path}: no such model file or directory")
    return path


def load_trusted_key(pubkey: PathLike | None) -> Any:
    """The trusted public key of ``--require-signature``, loaded before any other work (None: none)."""
    if pubkey is None:
        return None
    from ..audit.signing import load_public_key

    return load_public_key(pubkey)


def check_signature(patch_path: Path, trusted: Any) -> str | None:
    """Check ``patch_path``'s exact bytes against the trusted key; return the signed digest (None: no key)."""
    if trusted is None:
        return None
    from ..audit.signing import require_signature

    if not patch_path.is_file():
        raise InputError(f"{patch_path}: no such patch file")
    return require_signature(patch_path, trusted).content_digest


def open_patch(patch_path: PathLike, trusted: Any = None, *, signed: str | None = None) -> Patch:
    """Read a patch strictly; with a trusted key, refuse it unless it is signed by that key.

    Args:
        signed: a digest an earlier :func:`check_signature` returned (skips a second check).
    """
    path = Path(patch_path)
    if trusted is not None and signed is None:
        signed = check_signature(path, trusted)
    p = read_patch(path)
    if signed is not None and p.content_digest != signed:
        raise SignatureError(f"{path}: changed between the signature check and reading it; run again")
    return p


@dataclass
class FoldPlan:
    """Where a fold reads and writes, decided (and guarded) before any work."""

    model: Path
    target: Path
    in_place: bool


def plan_fold(model_spec: str, model_path: Path, patch_path: Path, out: str | None, *, in_place: bool, force: bool,
              extra_outputs: Sequence[PathLike | None] = (), extra_inputs: Sequence[PathLike | None] = ()) -> FoldPlan:
    """Decide a fold's output and run the guard: ``apply``'s whole safety check in one call."""
    if out is None and not in_place:
        raise InputError(f"{model_path}: no output given; pass -o OUT (or --in-place to replace the model)")
    if in_place:
        refuse_in_place_on_cache(model_spec, model_path)
        if out is not None and not (Path(out).exists() and os.path.samefile(out, model_path)):
            raise InputError(f"{out}: --in-place replaces {model_path}; do not give another output")
        guard_outputs(extra_outputs, [model_path, patch_path, *extra_inputs], force=force)
        return FoldPlan(model_path, model_path, True)
    target = file_output(out, model_path)
    guard_outputs([target, *extra_outputs], [model_path, patch_path, *extra_inputs], force=force)
    if model_path.is_dir() and target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is a file; the output of a model directory is a directory")
    return FoldPlan(model_path, target, False)


def fold(plan: FoldPlan, patch: Patch, *, precision: str = "keep", progress: bool = False) -> Any:
    """Fold ``patch`` into the planned model by file type; return the converter's FoldReport."""
    if is_gguf(plan.model):
        from ..converters.gguf_fold import fold_gguf

        return fold_gguf(plan.model, patch, plan.target, precision=precision, progress=progress)
    if precision not in ("keep", "auto"):
        raise InputError(f"{plan.model}: --precision {precision} applies to GGUF models; a safetensors fold keeps each tensor's dtype")
    from ..converters.safetensors_fold import fold_safetensors

    if plan.in_place:
        return fold_safetensors(plan.model, patch, None, progress=progress, in_place=True)
    return fold_safetensors(plan.model, patch, plan.target, progress=progress)


def revert(patched: Path, out: PathLike, *, force: bool, progress: bool = False) -> Path:
    """Restore the original of a folded model (GGUF or safetensors) into ``out``, guarded."""
    if not patched.exists():
        raise InputError(f"{patched}: no such file or directory")
    target = file_output(out, patched)
    guard_outputs([target], [patched], force=force)
    if is_gguf(patched):
        from ..converters.gguf_fold import revert_gguf

        return revert_gguf(patched, target)
    from ..converters.safetensors_fold import revert_safetensors

    return revert_safetensors(patched, target, progress=progress)


EXPORT_FORMATS = ("gguf", "peft")


#: The dense LoRA factors of an export may not exceed this (bytes); a real patch of a 1.5B model needs ~0.2 GB.
MAX_EXPORT_BYTES = 4 << 30


def export_lora(patch: Patch, fmt: str, out: PathLike, base: str | None) -> Path:
    """Export ``patch`` as a LoRA adapter of format ``fmt`` (the registry of export targets).

    The factors are dense ``(out, K)`` and ``(K, in)`` matrices whose size follows from the
    target shapes in the metadata, so their total is bounded before anything is allocated.
    """
    from ..converters.lora_export import export_gguf_lora, export_peft

    need = sum(4 * t.n_clusters * (t.shape[0] + t.shape[1]) for t in patch.targets)
    if need > MAX_EXPORT_BYTES:
        raise InputError(f"{out}: the LoRA factors of this patch would take {need / 2**30:.1f} GiB "
                         f"(limit {MAX_EXPORT_BYTES / 2**30:.0f} GiB); its target shapes are implausible")

    exporters = {"gguf": export_gguf_lora, "peft": export_peft}
    if fmt not in exporters:
        raise InputError(f"--format {fmt}: expected one of {', '.join(EXPORT_FORMATS)}")
    return exporters[fmt](patch, out, base=base)
