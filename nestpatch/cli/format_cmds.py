"""``nestpatch inspect`` and ``nestpatch validate``."""

from __future__ import annotations

import json
from collections import defaultdict

import click

from ..format import read_patch
from ..format.constants import Doc
from ..format.patch import Patch
from ..models.naming import layer_and_module
from .options import json_option, print_json
from .terminal import deep_escape, echo, escape


def patch_summary(p: Patch) -> dict:
    """Machine-readable summary of a patch (what ``inspect --json`` prints)."""
    per_layer: dict[str, dict] = defaultdict(dict)
    for t in p.targets:
        layer, module = layer_and_module(t.name)
        per_layer[layer][module] = {"neurons": t.n_neurons, "clusters": t.n_clusters}
    return {
        "targets": len(p.targets),
        "neurons": p.n_neurons,
        "clusters": p.n_clusters,
        "trainable_parameters": p.trainable_parameters,
        "delta_dtypes": sorted({t.delta_dtype for t in p.targets}),
        "per_layer": dict(per_layer),
        "content_digest": p.content_digest,
        Doc.BASE: {k: v for k, v in p.base.items()},
        Doc.POLICY: p.policy,
        Doc.PROVENANCE: p.provenance,
        Doc.EVALUATION: p.evaluation,
        "signed": p.signature is not None,
    }


def render_summary(path: str, s: dict) -> str:
    """Human rendering of :func:`patch_summary`."""
    pol = s[Doc.POLICY]
    base = s[Doc.BASE]
    lines = [
        f"{path}",
        f"  policy     {pol.get('name', '?')} {pol.get('version', '')}  {pol.get('description', '')}".rstrip(),
        f"  base       {base.get('name', '?')} ({base.get('architecture', '?')}, {base.get('n_layers', '?')} layers, "
        f"d_model {base.get('d_model', '?')}, n_ff {base.get('n_ff', '?')})",
        f"  size       {s['targets']} targets, {s['neurons']} neurons, {s['clusters']} clusters, "
        f"{s['trainable_parameters']:,} parameters ({', '.join(s['delta_dtypes'])})",
        f"  digest     {s['content_digest']}" + ("  [signed]" if s["signed"] else ""),
        "  layer  module      neurons  clusters",
    ]
    for layer in sorted(s["per_layer"], key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x)):
        for module, v in sorted(s["per_layer"][layer].items()):
            lines.append(f"  {layer:>5}  {module:<10} {v['neurons']:>8} {v['clusters']:>9}")
    prov = s[Doc.PROVENANCE]
    if prov:
        lines.append("  provenance")
        for key in ("tool", "tool_version", "created", "seed", "trainable_parameters"):
            if key in prov:
                lines.append(f"    {key:<22}{prov[key]}")
        for d in prov.get("data", []) or []:
            lines.append(f"    data  {d.get('role', '')}: {d.get('source', '')} ({d.get('rows', '?')} rows, sha256 {str(d.get('sha256', ''))[:12]})")
    ev = s[Doc.EVALUATION]
    if ev:
        lines.append("  evaluation " + json.dumps(ev, sort_keys=True)[:300])
    return "\n".join(lines)


@click.command("inspect")
@click.argument("patch", type=click.Path(dir_okay=False))
@json_option("Print the summary as JSON.")
def inspect_cmd(patch: str, as_json: bool) -> None:
    """Summarise PATCH: targets per layer, neurons, clusters, parameters, policy, provenance."""
    p = read_patch(patch)
    s = patch_summary(p)
    echo(json.dumps(s, indent=2, sort_keys=True) if as_json else render_summary(escape(patch), deep_escape(s)))


@click.command("validate")
@click.argument("patches", nargs=-1, required=True, type=click.Path(dir_okay=False))
@json_option()
def validate_cmd(patches: tuple[str, ...], as_json: bool) -> None:
    """Check every invariant of each PATCH (structure, ranges, finiteness, digest, version).

    The first invalid patch stops the check with one ``error:`` line (exit 2).
    """
    rows = []
    for path in patches:
        p = read_patch(path)
        rows.append({"path": path, "ok": True, "targets": len(p.targets), "neurons": p.n_neurons, "content_digest": p.content_digest})
        if not as_json:
            echo(f"{escape(path)}: ok ({len(p.targets)} targets, {p.n_neurons} neurons, {escape(p.content_digest)})")
    if as_json:
        print_json({"patches": rows})


def register(group: click.Group) -> None:
    group.add_command(inspect_cmd)
    group.add_command(validate_cmd)
