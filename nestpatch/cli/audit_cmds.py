"""Audit commands: ``diff``, ``verify``, ``keygen``, ``sign``, ``verify-signature``, ``report``.

Exit codes follow the tools people already script against: ``diff`` exits 0 when identical and
1 when different; ``verify`` and ``verify-signature`` exit 0 on success and 1 on a failed check;
bad input (missing files, unreadable keys) exits 2 through the group's error handler.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import inputs
from ..errors import InputError
from ..format import read_patch
from .options import force_option, json_option, model_argument, output_option, print_json
from .terminal import deep_escape, echo, escape


def _passphrase(env: str | None) -> bytes | None:
    if not env:
        return None

    val = os.environ.get(env)
    if val is None:
        raise InputError(f"environment variable {env} (named by --passphrase-env) is not set")
    return val.encode("utf-8")


@click.command("diff")
@click.argument("patch_a", type=click.Path(dir_okay=False))
@click.argument("patch_b", type=click.Path(dir_okay=False))
@json_option("Print the full comparison as JSON.")
@click.option("--top", default=10, show_default=True, help="How many of the largest per-neuron movers to list.")
@click.option("--behaviour", "--behavior", "behaviour", is_flag=True,
              help="Also run both patches on --model over --suite and list the prompts whose verdict flips.")
@click.option("--model", "model", default=None, help="Model for --behaviour (HF dir, .gguf or a named model).")
@click.option("--suite", "suites", multiple=True, help="Prompt suite(s) for --behaviour (repeatable; see nestpatch fetch --list).")
@click.option("--limit", type=int, default=None, help="--behaviour: at most this many prompts per suite.")
@click.option("--backend", type=click.Choice(["torch", "llama"]), default="torch", show_default=True,
              help="--behaviour: run through transformers (torch) or llama.cpp (a .gguf model).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="--behaviour: reply length cap.")
@click.option("--device", default="auto", show_default=True, help="--behaviour: torch device.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
              help="--behaviour: keep both evaluation runs here (A/ and B/) instead of a temporary directory.")
def diff_cmd(patch_a: str, patch_b: str, as_json: bool, top: int, behaviour: bool, model: str | None,
             suites: tuple[str, ...], limit: int | None, backend: str, max_new_tokens: int, device: str,
             runs_dir: str | None) -> None:
    """Compare two patches: neurons, clusters, deltas and metadata. Exit 0 if identical, 1 if not."""
    from ..audit.diff import diff_patches, render_diff

    if behaviour and (not model or not suites):
        raise InputError("--behaviour needs --model M and at least one --suite S")
    a, b = read_patch(patch_a), read_patch(patch_b)
    result = diff_patches(a, b, labels=(patch_a, patch_b), top=top)
    if behaviour:
        from ..evaluate.behaviour import behaviour_diff

        names = [x for s in suites for x in s.split(",") if x]
        result["behaviour"] = behaviour_diff(patch_a, patch_b, model=model, suites=names, limit=limit, device=device,
                                             backend=backend, runs_dir=runs_dir, max_new_tokens=max_new_tokens)
        if any(s["flips"] for s in result["behaviour"]["suites"]):
            result["identical"] = False
    echo(json.dumps(result, indent=2, sort_keys=True) if as_json else render_diff(deep_escape(result)))
    sys.exit(0 if result["identical"] else 1)


@click.command("keygen")
@output_option("out", required=True, help="Private key path; the public key goes to OUT.pub.", dir_okay=False)
@click.option("--passphrase-env", default=None, metavar="VAR", help="Encrypt the private key with the passphrase in $VAR.")
@force_option("Replace existing key files.")
@json_option()
def keygen_cmd(out: str, passphrase_env: str | None, force: bool, as_json: bool) -> None:
    """Create an ed25519 key pair for signing patches (OUT, mode 0600, and OUT.pub)."""
    from ..audit.signing import generate_keypair

    inputs.guard_outputs([out, out + ".pub"], [], force=force)
    priv, pub, hexkey = generate_keypair(out, passphrase=_passphrase(passphrase_env), force=force)
    if as_json:
        print_json({"private_key": str(priv), "public_key": str(pub), "key_id": hexkey})
    else:
        echo(f"private key {escape(priv)} (keep it secret)\npublic key  {escape(pub)}\nkey id      {hexkey}")


@click.command("sign")
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False), help="Private key (from nestpatch keygen).")
@output_option("out", help="Write the signed patch here instead of rewriting PATCH in place (atomically).", dir_okay=False)
@click.option("--passphrase-env", default=None, metavar="VAR", help="Passphrase of an encrypted key, read from $VAR.")
@force_option("Replace an existing OUT.")
@json_option()
def sign_cmd(patch: str, key: str, out: str | None, passphrase_env: str | None, force: bool, as_json: bool) -> None:
    """Sign PATCH with an ed25519 key; the signature is stored inside the patch."""
    from ..audit.signing import sign_patch

    if out is not None:
        inputs.guard_outputs([out], [patch, key], force=force)
    else:  # signing in place rewrites PATCH (atomically); the key and the cache stay untouched
        inputs.guard_outputs([patch], [key], existing_ok=True)
    sig = sign_patch(patch, key, out=out, passphrase=_passphrase(passphrase_env))
    if as_json:
        print_json({"out": out or patch, "in_place": out is None, **sig})
    else:
        echo(f"{escape(out or patch)}: signed by {escape(sig['public_key'])}")


@click.command("verify-signature")
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--pubkey", required=True, type=click.Path(dir_okay=False), help="Trusted public key (PEM, OpenSSH or hex).")
@json_option("Print the result as JSON.")
def verify_signature_cmd(patch: str, pubkey: str, as_json: bool) -> None:
    """Check that PATCH is signed by PUBKEY and unchanged since. Exit 0 if good, 1 if not."""
    from ..audit.signing import signature_status

    res = signature_status(patch, pubkey)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2, sort_keys=True))
    else:
        echo(f"{escape(patch)}: {'OK' if res.ok else 'FAILED'}: {escape(res.reason)}", err=not res.ok)
    sys.exit(0 if res.ok else 1)


@click.command("verify")
@model_argument()
@click.option("--patch", "patch", required=True, type=click.Path(dir_okay=False), help="The patch MODEL should contain.")
@click.option("--base", "base", default=None, type=str,
              help="The original model (a path or a named model such as smollm2); without it only the fold provenance "
                   "recorded in MODEL is checked.")
@click.option("--exact", is_flag=True, help="Quantized tensors must be byte-identical to a re-run fold too (no re-encoding tolerance).")
@json_option("Print the result as JSON.")
def verify_cmd(model: str, patch: str, base: str | None, exact: bool, as_json: bool) -> None:
    """Is MODEL exactly BASE with PATCH folded in? Exit 0 if so, 1 with the differing tensors if not."""
    from ..audit.verify import render_verify, verify_model

    model_path = inputs.open_model(model)
    base_path = inputs.open_model(base) if base else None
    res = verify_model(model_path, patch, base=base_path, exact=exact)
    echo(json.dumps(res.to_dict(), indent=2, sort_keys=True) if as_json else render_verify(res))
    sys.exit(0 if res.ok else 1)


@click.command("report")
@click.argument("patch", type=click.Path(dir_okay=False))
@output_option("out", required=True, help="Output HTML file (PNGs go next to it).", dir_okay=False)
@click.option("--eval", "eval_dirs", multiple=True, type=click.Path(), help="An evaluation run directory (repeatable).")
@click.option("--fold-report", "fold_reports", multiple=True, type=click.Path(dir_okay=False),
              help="A fold report JSON (repeatable): adds retention per target.")
@click.option("--robustness", "robustness_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A `nestpatch robustness` run directory (repeatable): adds ASR after each attack.")
@force_option("Replace an existing report (OUT and its PNG/JSON files).")
@json_option()
def report_cmd(patch: str, out: str, eval_dirs: tuple[str, ...], fold_reports: tuple[str, ...],
               robustness_dirs: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Write one self-contained HTML report of PATCH, with PNG figures alongside."""
    from ..audit.html_report import report_outputs, write_report

    ins = [patch, *eval_dirs, *fold_reports, *robustness_dirs]
    inputs.guard_outputs([out], ins, force=force)
    inputs.guard_outputs(report_outputs(out), ins, force=True)  # companions: replaced with the page
    res = write_report(patch, out, eval_dirs=eval_dirs, fold_reports=fold_reports, robustness_dirs=robustness_dirs)
    if as_json:
        print_json({"html": str(res.html), "figures": [str(p) for p in res.pngs]})
    else:
        echo(f"wrote {escape(res.html)} ({len(res.pngs)} figures: {', '.join(escape(p.name) for p in res.pngs)})")


def register(group: click.Group) -> None:
    for cmd in (diff_cmd, verify_cmd, keygen_cmd, sign_cmd, verify_signature_cmd, report_cmd):
        group.add_command(cmd)
