"""``nestpatch apply``, ``nestpatch revert`` and ``nestpatch export-lora``: thin wrappers over converters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..assets import resolve_model
from ..atomic import write_bytes_atomic
from ..errors import InputError, SignatureError, UnsupportedError
from ..format import FILE_EXTENSION, read_patch
from ..models.naming import parse_hf_name

PRECISIONS = ("keep", "auto", "q8_0", "f16")


def default_patch(model: Path) -> Path:
    """The patch beside ``model``: same stem, else the only ``.nestpatch`` in the model's folder.

    Raises:
        InputError: none found, or several and none with the model's stem.
    """
    folder = model if model.is_dir() else model.parent
    stem = model.name if model.is_dir() else model.stem
    same_stem = [model.parent / f"{stem}{FILE_EXTENSION}"]
    if model.is_dir():
        same_stem.append(model / f"{stem}{FILE_EXTENSION}")
    for cand in same_stem:
        if cand.is_file():
            return cand
    found = sorted(folder.glob(f"*{FILE_EXTENSION}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{model}: no PATCH given and no {FILE_EXTENSION} file beside it "
                         f"(looked for {same_stem[0].name} and any *{FILE_EXTENSION} in {folder}); pass PATCH")
    raise InputError(f"{model}: no PATCH given and {len(found)} {FILE_EXTENSION} files in {folder} "
                     f"({', '.join(p.name for p in found[:4])}); pass PATCH")


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def _short(name: str) -> str:
    try:
        ref = parse_hf_name(name)
        return f"L{ref.layer}.{ref.module}"
    except UnsupportedError:
        return name


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def render_report(d: dict) -> str:
    """Human table of a fold report (``FoldReport.to_dict()``): retention and size per target, totals."""
    lines = [f"{d['model_in']} + patch {str(d['patch_digest'])[:19]} -> {d['model_out']}  "
             f"({d['format']}, precision {d['precision']}, {d['seconds']:.1f} s)",
             f"  {'target':<18} {'type':<13} {'retention':>9} {'rel.err':>8} {'blocks':>11} {'size in':>10} {'size out':>10}"]
    for t in d["targets"]:
        types = t["type_in"] if t["type_in"] == t["type_out"] else f"{t['type_in']}->{t['type_out']}"
        blocks = f"{t['blocks_touched']}/{t['blocks_total']}"
        lines.append(f"  {_short(t['name']):<18} {types:<13} {t['retention']:>9.4f} {t['rel_error']:>8.4f} {blocks:>11} "
                     f"{_size(t['bytes_in']):>10} {_size(t['bytes_out']):>10}")
    tin = sum(t["bytes_in"] for t in d["targets"])
    tout = sum(t["bytes_out"] for t in d["targets"])
    lines.append(f"  {'targets total':<18} {'':<13} {d['min_retention']:>9.4f} {'(min)':>8} {'':>11} {_size(tin):>10} {_size(tout):>10}")
    change = d["bytes_out"] - d["bytes_in"]
    pct = 100.0 * change / d["bytes_in"] if d["bytes_in"] else 0.0
    lines.append(f"  model size {_size(d['bytes_in'])} -> {_size(d['bytes_out'])} ({'+' if change >= 0 else ''}{_size(change)}, {pct:+.2f}%)")
    return "\n".join(lines)


def _require_signature(patch_path: Path, trusted: object) -> str:
    """Check ``patch_path``'s exact bytes against the trusted key; return the signed content digest.

    Raises:
        InputError: no such patch file.
        SignatureError: unsigned, signed by another key, or changed since signing (names the file).
    """
    from ..audit.signing import require_signature

    if not patch_path.is_file():
        raise InputError(f"{patch_path}: no such patch file")
    return require_signature(patch_path, trusted).content_digest


@click.command("apply")
@click.argument("model", type=str)
@click.argument("patch", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(), help="Output model (file for GGUF/.safetensors, directory for an HF dir).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="keep", show_default=True,
              help="GGUF: keep each touched tensor's type, 'auto' upcast where retention is low, or store touched tensors as q8_0/f16.")
@click.option("--in-place", is_flag=True, help="Replace MODEL itself (atomically) instead of writing OUT.")
@click.option("--report-json", type=click.Path(dir_okay=False), help="Also write the fold report as JSON here.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@click.option("--require-signature", "pubkey", type=click.Path(dir_okay=False), default=None,
              help="Refuse PATCH unless it carries a valid ed25519 signature by this public key (PEM, OpenSSH or hex).")
def apply_cmd(model: str, patch: str | None, out: str | None, precision: str, in_place: bool,
              report_json: str | None, progress: bool | None, pubkey: str | None) -> None:
    """Fold PATCH into MODEL (a .gguf file, an HF directory, a .safetensors file, or 'smollm2').

    PATCH defaults to the .nestpatch beside MODEL (same stem, or the only one there). The base
    fingerprint (and with --require-signature the patch's signature) is checked before anything
    is written; the output appears atomically.
    """
    trusted = None
    if pubkey is not None:
        from ..audit.signing import load_public_key

        trusted = load_public_key(pubkey)  # a missing or bad key file fails before any other work
    signed = _require_signature(Path(patch), trusted) if patch and trusted is not None else None  # before MODEL is fetched
    model_path = resolve_model(model)
    if not model_path.exists():
        raise InputError(f"{model_path}: no such model file or directory")
    patch_path = Path(patch) if patch else default_patch(model_path)
    if out is None and not in_place:
        raise InputError(f"{model_path}: no output given; pass -o OUT (or --in-place to replace the model)")
    if in_place and out is not None and not (Path(out).exists() and os.path.samefile(out, model_path)):
        raise InputError(f"{out}: --in-place replaces {model_path}; do not give another output")
    if not in_place and Path(out).exists() and os.path.samefile(out, model_path):
        raise InputError(f"{out}: output is the input model; choose another output or pass --in-place")
    if trusted is not None and signed is None:
        signed = _require_signature(patch_path, trusted)
    p = read_patch(patch_path)
    if signed is not None and p.content_digest != signed:
        raise SignatureError(f"{patch_path}: changed between the signature check and reading it; run again")
    show = sys.stderr.isatty() if progress is None else progress
    if _is_gguf(model_path):
        from ..converters.gguf_fold import fold_gguf

        target = model_path if in_place else Path(out)
        if target.is_dir():
            target = target / model_path.name
        report = fold_gguf(model_path, p, target, precision=precision, progress=show)
    else:
        if precision not in ("keep", "auto"):
            raise InputError(f"{model_path}: --precision {precision} applies to GGUF models; a safetensors fold keeps each tensor's dtype")
        from ..converters.safetensors_fold import fold_safetensors

        report = fold_safetensors(model_path, p, out, progress=show, in_place=in_place)
    d = report.to_dict()
    click.echo(render_report(d))
    if report_json:
        write_bytes_atomic(report_json, (report.to_json() + "\n").encode("utf-8"))


@click.command("revert")
@click.argument("patched", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write the restored original.")
def revert_cmd(patched: str, out: str) -> None:
    """Restore the original model from a folded PATCHED model, byte for byte."""
    path = Path(patched)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if _is_gguf(path):
        from ..converters.gguf_fold import revert_gguf

        target = Path(out) / path.name if Path(out).is_dir() else Path(out)
        if target.exists() and os.path.samefile(target, path):
            raise InputError(f"{target}: output is the folded model itself; choose another output")
        result = revert_gguf(path, target)
    else:
        from ..converters.safetensors_fold import revert_safetensors

        result = revert_safetensors(path, Path(out), progress=sys.stderr.isatty())
    click.echo(f"restored the original model of {path} -> {result}")


@click.command("export-lora")
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(("gguf", "peft")), required=True,
              help="gguf: llama.cpp adapter file; peft: PEFT adapter directory.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Adapter file (gguf) or directory (peft).")
@click.option("--base", type=str, help="Base model (GGUF, HF dir, or 'smollm2'): checked against the patch and recorded.")
def export_lora_cmd(patch: str, fmt: str, out: str, base: str | None) -> None:
    """Export PATCH as an exact LoRA adapter (rank = clusters per target)."""
    from ..converters.lora_export import export_gguf_lora, export_peft, max_rank

    p = read_patch(patch)
    path = export_gguf_lora(p, out, base=base) if fmt == "gguf" else export_peft(p, out, base=base)
    click.echo(f"{path}: {fmt} LoRA adapter, {len(p.targets)} modules, max rank {max_rank(p)}")


def register(group: click.Group) -> None:
    group.add_command(apply_cmd)
    group.add_command(revert_cmd)
    group.add_command(export_lora_cmd)
