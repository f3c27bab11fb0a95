"""``nestpatch apply``, ``nestpatch revert`` and ``nestpatch export-lora``: thin wrappers over converters."""

from __future__ import annotations

from pathlib import Path

import click

from . import inputs
from ..atomic import write_bytes_atomic
from ..converters.precision import PRECISIONS
from ..errors import InputError, UnsupportedError
from ..format import FILE_EXTENSION
from ..models.naming import parse_hf_name
from .options import force_option, json_option, model_argument, output_option, print_json, progress_option
from .terminal import deep_escape, echo, escape


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


SKIP_BASE_HELP = ("Apply a patch that carries no base fingerprint (its base model cannot be checked). "
                  "Without this flag such a patch is refused.")


@click.command("apply")
@model_argument()
@click.argument("patch", required=False, type=click.Path(dir_okay=False))
@output_option("out", help="Output model (file for GGUF/.safetensors, directory for an HF dir).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="keep", show_default=True,
              help="GGUF: keep each touched tensor's type, 'auto' upcast where retention is low, or store touched tensors as q8_0/f16.")
@click.option("--in-place", is_flag=True, help="Replace MODEL itself (atomically) instead of writing OUT. Refused on named/cached models.")
@force_option()
@click.option("--report-json", type=click.Path(dir_okay=False), help="Also write the fold report as JSON here.")
@progress_option
@json_option("Print the fold report as JSON instead of the table.")
@click.option("--require-signature", "pubkey", type=click.Path(dir_okay=False), default=None,
              help="Refuse PATCH unless it carries a valid ed25519 signature by this public key (PEM, OpenSSH or hex).")
@click.option("--skip-base-check", is_flag=True, help=SKIP_BASE_HELP)
def apply_cmd(model: str, patch: str | None, out: str | None, precision: str, in_place: bool, force: bool,
              report_json: str | None, progress: bool, as_json: bool, pubkey: str | None, skip_base_check: bool) -> None:
    """Fold PATCH into MODEL (a .gguf file, an HF directory, a .safetensors file, or 'smollm2').

    PATCH defaults to the .nestpatch beside MODEL (same stem, or the only one there). Outputs are
    checked first (never an input, never the model cache; --force to replace one), then the
    signature (--require-signature) and the base fingerprint; the output appears atomically.
    """
    from ..fingerprint import base_check_skipped

    trusted = inputs.load_trusted_key(pubkey)  # a missing or bad key file fails before any other work
    where = inputs.model_location(model)  # a named model's cache path, not fetched yet
    if in_place:
        inputs.refuse_in_place_on_cache(model, where)
    early = [report_json] + ([inputs.file_output(out, where)] if out and not in_place else [])
    inputs.guard_outputs(early, [where, patch, pubkey], force=force)  # before any fetch or read
    signed = inputs.check_signature(Path(patch), trusted) if patch else None
    model_path = inputs.open_model(model)
    patch_path = Path(patch) if patch else default_patch(model_path)
    plan = inputs.plan_fold(model, model_path, patch_path, out, in_place=in_place, force=force,
                            extra_outputs=[report_json], extra_inputs=[pubkey])
    p = inputs.open_patch(patch_path, trusted, signed=signed)
    with base_check_skipped(skip_base_check):
        report = inputs.fold(plan, p, precision=precision, progress=progress)
    d = report.to_dict()
    if report_json:
        write_bytes_atomic(report_json, (report.to_json() + "\n").encode("utf-8"))
    if as_json:
        print_json(d)
    else:
        echo(render_report(deep_escape(d)))


@click.command("revert")
@click.argument("patched", type=click.Path())
@output_option("out", required=True, help="Where to write the restored original.")
@force_option()
@progress_option
@json_option()
def revert_cmd(patched: str, out: str, force: bool, progress: bool, as_json: bool) -> None:
    """Restore the original model from a folded PATCHED model, byte for byte."""
    result = inputs.revert(Path(patched), out, force=force, progress=progress)
    if as_json:
        print_json({"patched": patched, "out": str(result)})
    else:
        echo(f"restored the original model of {escape(patched)} -> {escape(result)}")


@click.command("export-lora")
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(inputs.EXPORT_FORMATS), required=True,
              help="gguf: llama.cpp adapter file; peft: PEFT adapter directory.")
@output_option("out", required=True, help="Adapter file (gguf) or directory (peft).")
@click.option("--base", type=str, help="Base model (GGUF, HF dir, or 'smollm2'): checked against the patch and recorded.")
@force_option()
@click.option("--skip-base-check", is_flag=True, help=SKIP_BASE_HELP)
@json_option()
def export_lora_cmd(patch: str, fmt: str, out: str, base: str | None, force: bool, skip_base_check: bool, as_json: bool) -> None:
    """Export PATCH as an exact LoRA adapter (rank = clusters per target)."""
    from ..converters.lora_export import max_rank
    from ..fingerprint import base_check_skipped

    inputs.guard_outputs([out], [patch, inputs.model_location(base) if base else None], force=force)
    p = inputs.open_patch(patch)
    with base_check_skipped(skip_base_check):
        path = inputs.export_lora(p, fmt, out, base)
    if as_json:
        print_json({"out": str(path), "format": fmt, "modules": len(p.targets), "max_rank": max_rank(p),
                    "patch_digest": p.content_digest})
    else:
        echo(f"{escape(path)}: {fmt} LoRA adapter, {len(p.targets)} modules, max rank {max_rank(p)}")


def register(group: click.Group) -> None:
    group.add_command(apply_cmd)
    group.add_command(revert_cmd)
    group.add_command(export_lora_cmd)
