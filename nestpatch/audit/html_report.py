"""One self-contained HTML report of a patch (``nestpatch report``).

Sign-off readers want pictures: where the patch sits in the model (neurons per layer and
module), how it is grouped (cluster sizes), how strong it is (delta norms per cluster), whether
it survived folding (retention per target, from fold reports), what it did (ASR and over-refusal
before and after, from evaluation runs), and where it came from (provenance table).

The page embeds every figure as a base64 PNG and loads nothing (no scripts, no fonts, no
network; a Content-Security-Policy forbids it), so it can be mailed or archived as one file.
The PNGs and the report data as JSON are also written next to it.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..atomic import write_bytes_atomic
from ..errors import InputError
from ..format.constants import BaseKey, PolicyKey, ProvenanceKey, SignatureKey
from ..format.patch import Patch
from ..format.reader import read_patch
from ..models.naming import layer_and_module
from . import figures
from .evalruns import EvalRun, eval_rows, load_eval_run

log = logging.getLogger(__name__)


@dataclass
class ReportOutput:
    """What :func:`write_report` wrote."""

    html: Path
    pngs: list[Path] = field(default_factory=list)
    data: Path | None = None


# --------------------------------------------------------------------------- data


def _per_target(p: Patch) -> list[dict]:
    out = []
    for t in p.targets:
        layer, module = layer_and_module(t.name)
        sizes = np.bincount(np.asarray(t.clusters, np.int64), minlength=t.n_clusters)  # (K,)
        norms = np.linalg.norm(np.asarray(t.deltas, np.float32), axis=1)  # (K,)
        out.append({
            "name": t.name, "layer": layer, "module": module, "axis": t.axis, "neurons": t.n_neurons,
            "clusters": t.n_clusters, "cluster_sizes": [int(s) for s in sizes],
            "delta_norms": [round(float(n), 6) for n in norms], "parameters": t.trainable_parameters,
            "delta_dtype": t.delta_dtype,
        })
    out.sort(key=lambda e: (e["layer"] == "other", int(e["layer"]) if e["layer"].isdigit() else 0,
                            figures._MODULE_ORDER.index(e["module"]) if e["module"] in figures._MODULE_ORDER else 9))
    return out


def load_fold_report(path: str | os.PathLike) -> dict:
    """Read a FoldReport JSON (``converters.fold_report.FoldReport.to_json``) for the retention figure."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: no such fold report") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{p}: fold report is not valid JSON") from None
    if not isinstance(d, dict) or not isinstance(d.get("targets"), list):
        raise InputError(f"{p}: not a fold report (expected a JSON object with a 'targets' list, as written by fold --report)")
    targets = []
    for t in d["targets"]:
        if not isinstance(t, dict) or "name" not in t or "retention" not in t:
            raise InputError(f"{p}: fold report target entries need 'name' and 'retention'")
        targets.append({k: t.get(k) for k in ("name", "tensor", "type_in", "type_out", "retention", "rel_error")})
    label = f"{d.get('format', '?')}"
    if d.get("precision") and d.get("precision") != "keep":
        label += f" ({d['precision']})"
    label += f": {Path(str(d.get('model_out', p.stem))).name}"
    def nums(key: str) -> list[float]:
        return [float(t[key]) for t in targets if isinstance(t.get(key), (int, float)) and not isinstance(t.get(key), bool)]

    return {"label": label, "path": str(p), "patch_digest": d.get("patch_digest"), "targets": targets,
            "min_retention": min(nums("retention"), default=None), "max_rel_error": max(nums("rel_error"), default=None)}


def retention_text(f: dict) -> str:
    """Min retention with 4 decimals and the worst relative error: 0.996 must not read as 1.00."""
    text = f"{f['min_retention']:.4f}"
    if f.get("max_rel_error") is not None:
        text += f" (max rel. error {f['max_rel_error']:.3g})"
    return text


def provenance_rows(p: Patch) -> list[tuple[str, str]]:
    """(field, value) rows of the provenance table, in reading order."""
    rows: list[tuple[str, str]] = []
    pol, base, prov = p.policy or {}, p.base or {}, p.provenance or {}
    rows.append(("policy", f"{pol.get(PolicyKey.NAME, '?')} {pol.get(PolicyKey.VERSION, '')}".strip()))
    if pol.get(PolicyKey.DESCRIPTION):
        rows.append(("policy description", str(pol[PolicyKey.DESCRIPTION])))
    rows.append(("base model", f"{base.get(BaseKey.NAME, '?')} ({base.get(BaseKey.ARCHITECTURE, '?')}, "
                               f"{base.get(BaseKey.N_LAYERS, '?')} layers, d_model {base.get(BaseKey.D_MODEL, '?')}, "
                               f"n_ff {base.get(BaseKey.N_FF, '?')})"))
    if base.get(BaseKey.REVISION):
        rows.append(("base revision", str(base[BaseKey.REVISION])))
    rows.append(("content digest", str(p.content_digest)))
    sig = p.signature or {}
    rows.append(("signature", f"ed25519 by {sig.get(SignatureKey.PUBLIC_KEY)} (check with nestpatch verify-signature)"
                 if sig else "unsigned"))
    for key in (ProvenanceKey.TOOL, ProvenanceKey.TOOL_VERSION, ProvenanceKey.CREATED, ProvenanceKey.SEED,
                ProvenanceKey.TRAINABLE_PARAMETERS):
        if key in prov:
            rows.append((key.replace("_", " "), str(prov[key])))
    for d in prov.get(ProvenanceKey.DATA) or []:
        if isinstance(d, dict):
            rows.append((f"data ({d.get('role', '?')})",
                         f"{d.get('source', '?')}: {d.get('rows', '?')} rows, sha256 {d.get('sha256', '?')}"))
    libs = prov.get(ProvenanceKey.LIBRARIES) or {}
    if isinstance(libs, dict) and libs:
        rows.append(("libraries", ", ".join(f"{k} {v}" for k, v in sorted(libs.items()))))
    cfg = prov.get(ProvenanceKey.CONFIG) or {}
    if isinstance(cfg, dict):
        from .diff import _flatten

        for k, v in sorted(_flatten(cfg, "config").items()):
            rows.append((k, json.dumps(v) if not isinstance(v, str) else v))
    return rows


def report_data(p: Patch, patch_path: str, *, folds: Sequence[dict] = (), runs: Sequence[EvalRun] = (),
                robustness: Sequence[dict] = ()) -> dict:
    """Everything the report shows, as JSON-able data (also written as ``<stem>.json``)."""
    per_target = _per_target(p)
    return {
        "patch": patch_path,
        "policy": p.policy,
        "base": {k: v for k, v in p.base.items()},
        "content_digest": p.content_digest,
        "signed": p.signature is not None,
        "totals": {"targets": len(p.targets), "neurons": p.n_neurons, "clusters": p.n_clusters,
                   "trainable_parameters": p.trainable_parameters},
        "targets": per_target,
        "folds": list(folds),
        "evaluation": eval_rows(runs),
        "eval_runs": [r.summary_info() for r in runs],
        "provenance": provenance_rows(p),
        "robustness": list(robustness),
    }


# --------------------------------------------------------------------------- HTML


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes, alt: str, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], num_cols: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = "".join(f'<td class="num">{_e(v)}</td>' if i in num_cols else f"<td>{_e(v)}</td>" for i, v in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_html(data: dict, figs: dict[str, bytes]) -> str:
    """The report page from :func:`report_data` and the figures' PNG bytes."""
    pol = data["policy"] or {}
    tot = data["totals"]
    title = f"nestpatch report: {pol.get('name', Path(data['patch']).name)} {pol.get('version', '')}".strip()
    base = data["base"]
    subtitle = (f"{Path(data['patch']).name} for {base.get('name', '?')} ({base.get('architecture', '?')}), "
                f"digest {data['content_digest']}")
    cards = [("targets", tot["targets"]), ("neurons", tot["neurons"]), ("clusters", tot["clusters"]),
             ("trainable parameters", f"{tot['trainable_parameters']:,}"), ("signature", "signed" if data["signed"] else "unsigned")]
    folds = data["folds"]
    if folds:
        cards.append(("min retention", ", ".join(retention_text(f) for f in folds if f["min_retention"] is not None)))
    cards_html = "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards)

    sec: list[str] = []
    sec.append("<h2>Where the patch sits</h2>")
    sec.append(_img(figs["neurons"], "heatmap of patched neurons per layer and module",
                    "Neurons per layer and module: each cell counts the neurons (rows of gate/up, columns of down) the patch updates."))
    sec.append(_table(["layer", "module", "axis", "neurons", "clusters", "cluster sizes", "parameters", "stored as"],
                      [(t["layer"], t["module"], t["axis"], t["neurons"], t["clusters"],
                        " ".join(map(str, t["cluster_sizes"])), t["parameters"], t["delta_dtype"]) for t in data["targets"]],
                      num_cols=(3, 4, 6)))
    sec.append("<h2>Clusters and deltas</h2>")
    sec.append(_img(figs["clusters"], "stacked bars of cluster sizes per target",
                    "Cluster sizes: one bar per target, one segment per cluster; all neurons of a cluster share one delta."))
    sec.append(_img(figs["delta_norms"], "delta norm per cluster",
                    "Delta norm per cluster (L2 norm of the shared update vector); dot area grows with the cluster size."))
    sec.append("<h2>After folding</h2>")
    if folds:
        sec.append(_img(figs["retention"], "retention per target after folding",
                        "Retention = <realized, intended> / <intended, intended> per target: 1.0 means the whole delta survived re-encoding."))
        rows = [(f["label"], t["name"], t.get("type_in"), t.get("type_out"), f"{t['retention']:.4f}",
                 "-" if t.get("rel_error") is None else f"{t['rel_error']:.4f}") for f in folds for t in f["targets"]]
        sec.append(_table(["fold", "target", "type in", "type out", "retention", "relative error"], rows, num_cols=(4, 5)))
    else:
        sec.append('<p class="note">No fold report given (pass <code>--fold-report FOLD.json</code> from a fold to show retention).</p>')
    sec.append("<h2>Behaviour before and after</h2>")
    ev = data["evaluation"]
    if ev:
        sec.append(_img(figs["eval"], "bar chart of attack success rate and over-refusal before and after the patch",
                        "Per suite: the base model (before) and the patched model (after). Lower is better for both."))
        sec.append(_table(["run", "suite", "metric", "before", "after", "n", "judge"],
                          [(r["run"], r["suite"], r["metric"], _fmt_rate(r["before"]), _fmt_rate(r["after"]),
                            r.get("n") or "-", r.get("judge") or "-") for r in ev], num_cols=(3, 4, 5)))
    else:
        sec.append('<p class="note">No evaluation run given (pass <code>--eval RUN_DIR</code> from <code>nestpatch eval</code>).</p>')
    if data.get("robustness"):
        from ..robustness.render import plot_file, table_rows

        sec.append("<h2>Robustness to white-box attacks</h2>")
        for i, r in enumerate(data["robustness"]):
            suite = r["primary_suite"]
            sec.append(f'<p class="note">{_e(r.get("run_dir", ""))}: ASR on {_e(suite)} after each attack '
                       f'(cost to remove = smallest attack strength that brings the update back to the base ASR).</p>')
            sec.append(_table(*table_rows(r, suite)))
            if f"robustness{i}" in figs:
                sec.append(_img(figs[f"robustness{i}"], f"ASR vs attack strength ({plot_file(suite)})",
                                "ASR vs attack strength, one line per safety update; dashed: the base model's ASR."))
    sec.append("<h2>Provenance</h2>")
    sec.append(_table(["field", "value"], data["provenance"]))
    tpl = Template(resources.files("nestpatch.audit").joinpath("templates/report.html").read_text(encoding="utf-8"))
    return tpl.substitute(title=_e(title), subtitle=_e(subtitle), cards=cards_html, sections="\n".join(sec),
                          version=_e(__version__), patch_path=_e(data["patch"]))


# --------------------------------------------------------------------------- entry point


#: Every figure a report can have; the PNGs are named ``<stem>-<figure>.png``.
FIGURES = ("neurons", "clusters", "delta_norms", "retention", "eval")


def report_outputs(out_html: str | os.PathLike) -> list[Path]:
    """Every file a report writes besides the page itself (so the CLI can guard them first)."""
    out = Path(out_html)
    return [out.with_name(f"{out.stem}-{name}.png") for name in FIGURES] + [out.with_name(f"{out.stem}.json")]


def make_figures(data: dict) -> dict[str, bytes]:
    """Render every figure the data supports: name -> PNG bytes."""
    targets = data["targets"]
    figs = {
        "neurons": figures.neurons_heatmap(targets, data["base"].get(BaseKey.N_LAYERS)),
        "clusters": figures.cluster_sizes(targets),
        "delta_norms": figures.delta_norms(targets),
    }
    if data["folds"]:
        figs["retention"] = figures.retention(data["folds"])
    if data["evaluation"]:
        figs["eval"] = figures.eval_bars(data["evaluation"])
    if data.get("robustness"):
        from ..robustness.render import plot_png

        for i, r in enumerate(data["robustness"]):
            figs[f"robustness{i}"] = plot_png(r, r["primary_suite"])
    return figs


def write_report(patch_path: str | os.PathLike, out_html: str | os.PathLike, *,
                 eval_dirs: Sequence[str | os.PathLike] = (), fold_reports: Sequence[str | os.PathLike] = (),
                 robustness_dirs: Sequence[str | os.PathLike] = ()) -> ReportOutput:
    """Write ``out_html`` plus ``<stem>-<figure>.png`` and ``<stem>.json`` next to it.

    Every input is read and every figure rendered before anything is written; each file is
    written atomically and the HTML last, so a report that exists is complete.
    """
    out = Path(out_html)
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"{out}: report output must end in .html")
    p = read_patch(patch_path)
    folds = [load_fold_report(f) for f in fold_reports]
    for f in folds:
        if f["patch_digest"] and p.content_digest and f["patch_digest"] != p.content_digest:
            log.warning("%s: fold report is for patch %s, not %s", f["path"], f["patch_digest"], p.content_digest)
    runs = [load_eval_run(d) for d in eval_dirs]
    from ..robustness.render import load_results

    rob = [{**load_results(d), "run_dir": str(d)} for d in robustness_dirs]
    data = report_data(p, str(patch_path), folds=folds, runs=runs, robustness=rob)
    figs = make_figures(data)
    page = render_html(data, figs)
    res = ReportOutput(html=out)
    for name, png in figs.items():
        res.pngs.append(write_bytes_atomic(out.with_name(f"{out.stem}-{name}.png"), png))
    res.data = write_bytes_atomic(out.with_name(f"{out.stem}.json"),
                                  json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8"))
    write_bytes_atomic(out, page.encode("utf-8"))
    log.info("wrote %s (%d figures)", out, len(figs))
    return res
