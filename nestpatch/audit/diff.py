"""What changed between two patches: neurons, clusters, deltas, metadata (``nestpatch diff``).

Reviewers of a policy update ask four questions, answered in this order: is it even the same base
model; which neurons were added, dropped or kept per layer and module; did the kept neurons stay in
the same groups (adjusted Rand index over the common neurons: 1 = same partition up to renaming,
~0 = unrelated) and did their updates keep direction and size (cosine, norm ratio); and what
changed in the paperwork (policy, data sources and their hashes, config, base description).

The result is a plain JSON-able dict (``--json``); :func:`render_diff` renders it for humans.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import UnsupportedError
from ..fingerprint import relative_error, tolerance
from ..format.constants import BaseKey, ProvenanceKey, SignatureKey
from ..format.patch import Patch, Target
from ..format.writer import compute_digest
from ..models.naming import parse_hf_name

log = logging.getLogger(__name__)

#: Base description keys that decide "same architecture and sizes".
_SHAPE_KEYS = (BaseKey.ARCHITECTURE, BaseKey.N_LAYERS, BaseKey.D_MODEL, BaseKey.N_FF)
_EPS = 1e-12


def _layer_module(name: str) -> tuple[str, str]:
    try:
        ref = parse_hf_name(name)
        return str(ref.layer), ref.module
    except UnsupportedError:
        return "other", name


def _sort_key(entry: dict) -> tuple:
    layer = entry["layer"]
    return (not layer.isdigit(), int(layer) if layer.isdigit() else 0, entry["module"], entry["name"])


def adjusted_rand(labels_a: np.ndarray, labels_b: np.ndarray) -> float | None:
    """Adjusted Rand index of two labelings of the same neurons; ``None`` under two neurons.

    Two single-cluster labelings are the same partition: sklearn returns 1.0 for them, kept.
    """
    if len(labels_a) < 2:
        return None
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels_a), np.asarray(labels_b)))


def _cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``(n, d)`` arrays -> ``(n,)`` (0 where a row is zero)."""
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dot = np.einsum("nd,nd->n", x, y)
    return np.where((nx > _EPS) & (ny > _EPS), dot / np.maximum(nx * ny, _EPS), 0.0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > _EPS, num / np.maximum(den, _EPS), np.inf)


def _finite(x: float) -> float | None:
    """JSON has no inf/nan: report them as null."""
    return float(x) if np.isfinite(x) else None


def _cluster_matches(ca: np.ndarray, cb: np.ndarray, ta: Target, tb: Target) -> list[dict]:
    """Match each A cluster to the B cluster most of its common neurons went to; compare deltas.

    A tie (neurons split evenly) goes to the B cluster whose delta points the same way.

    Args:
        ca, cb: cluster ids of the common neurons in A and B, ``(m,)``.
    """
    out = []
    da = np.asarray(ta.deltas, np.float32)  # (K_a, d)
    db = np.asarray(tb.deltas, np.float32)  # (K_b, d)
    table = np.zeros((ta.n_clusters, tb.n_clusters), np.int64)  # contingency over common neurons
    np.add.at(table, (ca, cb), 1)
    for i in range(ta.n_clusters):
        if table[i].sum() == 0:
            continue
        tied = np.flatnonzero(table[i] == table[i].max())  # ties go to the most similar delta
        cos_all = _cosine(np.repeat(da[i : i + 1], tied.size, axis=0), db[tied])
        j = int(tied[int(np.argmax(cos_all))])
        cos = float(cos_all[int(np.argmax(cos_all))])
        ratio = float(_ratio(np.linalg.norm(db[j : j + 1], axis=1), np.linalg.norm(da[i : i + 1], axis=1))[0])
        out.append({
            "a": i, "b": j, "shared": int(table[i, j]), "size_a": int((ta.clusters == i).sum()),
            "size_b": int((tb.clusters == j).sum()), "cosine": round(cos, 6), "norm_ratio": _finite(round(ratio, 6)),
        })
    return out


def _target_entry(name: str, ta: Target | None, tb: Target | None) -> tuple[dict, list[dict]]:
    """Diff one target; returns its entry and its per-neuron movers."""
    layer, module = _layer_module(name)
    e: dict[str, Any] = {"name": name, "layer": layer, "module": module}
    movers: list[dict] = []
    if ta is None or tb is None:
        t = ta if tb is None else tb
        assert t is not None
        side = "removed" if tb is None else "added"
        idx = [int(i) for i in t.indices]
        e.update({
            "status": side, "axis": t.axis, "neurons_a": t.n_neurons if ta else 0, "neurons_b": t.n_neurons if tb else 0,
            "added": idx if side == "added" else [], "removed": idx if side == "removed" else [], "kept": 0,
            "clusters_a": ta.n_clusters if ta else 0, "clusters_b": tb.n_clusters if tb else 0,
            "ari": None, "delta_cosine_mean": None, "norm_ratio_median": None, "cluster_matches": [],
        })
        norms = np.linalg.norm(t.neuron_deltas(), axis=1)  # (n,)
        for i, n in zip(idx, norms):
            movers.append({"target": name, "neuron": i, "status": side, "change": float(n), "relative": None,
                           "cosine": None, "norm_ratio": 0.0 if side == "removed" else None})
        return e, movers

    ia, ib = np.asarray(ta.indices, np.int64), np.asarray(tb.indices, np.int64)
    common, pa, pb = np.intersect1d(ia, ib, assume_unique=True, return_indices=True)
    added = np.setdiff1d(ib, ia, assume_unique=True)
    removed = np.setdiff1d(ia, ib, assume_unique=True)
    e.update({
        "axis": ta.axis, "neurons_a": ta.n_neurons, "neurons_b": tb.n_neurons,
        "added": [int(i) for i in added], "removed": [int(i) for i in removed], "kept": int(common.size),
        "clusters_a": ta.n_clusters, "clusters_b": tb.n_clusters,
    })
    if ta.shape != tb.shape or ta.axis != tb.axis:
        e.update({"status": "incompatible", "shape_a": list(ta.shape), "shape_b": list(tb.shape),
                  "ari": None, "delta_cosine_mean": None, "norm_ratio_median": None, "cluster_matches": []})
        return e, movers
    ca, cb = np.asarray(ta.clusters, np.int64)[pa], np.asarray(tb.clusters, np.int64)[pb]
    nda, ndb = ta.neuron_deltas(), tb.neuron_deltas()  # (n_a, d), (n_b, d)
    xa, xb = nda[pa], ndb[pb]  # (m, d) each: the common neurons' effective updates
    cos = _cosine(xa, xb)  # (m,)
    na, nb = np.linalg.norm(xa, axis=1), np.linalg.norm(xb, axis=1)
    ratio = _ratio(nb, na)
    change = np.linalg.norm(xb - xa, axis=1)
    same = (added.size == 0 and removed.size == 0 and np.array_equal(ca, cb)
            and np.array_equal(np.asarray(ta.deltas), np.asarray(tb.deltas))
            and ((ta.scales is None and tb.scales is None)
                 or (ta.scales is not None and tb.scales is not None and np.array_equal(ta.scales, tb.scales)))
            and ta.delta_dtype == tb.delta_dtype)
    e.update({
        "status": "same" if same else "changed",
        "ari": None if common.size < 2 else round(adjusted_rand(ca, cb), 6),
        "delta_cosine_mean": round(float(cos.mean()), 6) if common.size else None,
        "norm_ratio_median": _finite(round(float(np.median(ratio)), 6)) if common.size else None,
        "max_change": round(float(change.max()), 6) if common.size else None,
        "cluster_matches": _cluster_matches(ca, cb, ta, tb) if common.size else [],
    })
    if ta.delta_dtype != tb.delta_dtype:
        e["delta_dtype"] = [ta.delta_dtype, tb.delta_dtype]
    for k, i in enumerate(common):
        movers.append({"target": name, "neuron": int(i), "status": "kept", "change": float(change[k]),
                       "relative": _finite(float(change[k] / na[k]) if na[k] > _EPS else np.inf),
                       "cosine": float(cos[k]), "norm_ratio": _finite(float(ratio[k]))})
    for i, n in zip(added, np.linalg.norm(ndb[np.isin(ib, added)], axis=1)):
        movers.append({"target": name, "neuron": int(i), "status": "added", "change": float(n), "relative": None,
                       "cosine": None, "norm_ratio": None})
    for i, n in zip(removed, np.linalg.norm(nda[np.isin(ia, removed)], axis=1)):
        movers.append({"target": name, "neuron": int(i), "status": "removed", "change": float(n), "relative": None,
                       "cosine": None, "norm_ratio": 0.0})
    return e, movers


# --------------------------------------------------------------------------- metadata


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d} if prefix else {}


def _dict_diff(a: Any, b: Any, prefix: str) -> list[dict]:
    fa = _flatten(a, prefix) if a else {}
    fb = _flatten(b, prefix) if b else {}
    out = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, _MISSING), fb.get(k, _MISSING)
        if va != vb:
            out.append({"key": k, "a": None if va is _MISSING else va, "b": None if vb is _MISSING else vb,
                        "change": "added" if va is _MISSING else "removed" if vb is _MISSING else "changed"})
    return out


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _data_key(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    return f"{d.get('role', '')}:{d.get('source', '')}"


def _data_diff(a: list | None, b: list | None) -> dict:
    """Training data sources matched by (role, source); hashes and row counts compared."""
    ma = {_data_key(d): d for d in (a or [])}
    mb = {_data_key(d): d for d in (b or [])}
    changed = []
    for k in sorted(set(ma) & set(mb)):
        if ma[k] != mb[k]:
            da, db = ma[k], mb[k]
            fields = sorted(f for f in set(da) | set(db) if da.get(f) != db.get(f)) if isinstance(da, dict) and isinstance(db, dict) else []
            changed.append({"source": k, "fields": fields, "a": da, "b": db})
    return {
        "added": [mb[k] for k in sorted(set(mb) - set(ma))],
        "removed": [ma[k] for k in sorted(set(ma) - set(mb))],
        "changed": changed,
    }


def _metadata_diff(a: Patch, b: Patch) -> dict:
    pa, pb = a.provenance or {}, b.provenance or {}
    other_a = {k: v for k, v in pa.items() if k not in (ProvenanceKey.CONFIG, ProvenanceKey.DATA)}
    other_b = {k: v for k, v in pb.items() if k not in (ProvenanceKey.CONFIG, ProvenanceKey.DATA)}
    sa, sb = a.signature or {}, b.signature or {}
    sig = None
    if bool(sa) != bool(sb) or sa.get(SignatureKey.PUBLIC_KEY) != sb.get(SignatureKey.PUBLIC_KEY):
        sig = {"a": sa.get(SignatureKey.PUBLIC_KEY) if sa else None, "b": sb.get(SignatureKey.PUBLIC_KEY) if sb else None}
    return {
        "policy": _dict_diff(a.policy, b.policy, "policy"),
        "base": _dict_diff(a.base, b.base, "base"),
        "data": _data_diff(pa.get(ProvenanceKey.DATA), pb.get(ProvenanceKey.DATA)),
        "config": _dict_diff(pa.get(ProvenanceKey.CONFIG), pb.get(ProvenanceKey.CONFIG), "config"),
        "provenance": _dict_diff(other_a, other_b, "provenance"),
        "evaluation": _dict_diff(a.evaluation, b.evaluation, "evaluation"),
        "signature": sig,
    }


def _metadata_changed(m: dict) -> bool:
    d = m["data"]
    return bool(m["policy"] or m["base"] or d["added"] or d["removed"] or d["changed"] or m["config"]
                or m["provenance"] or m["evaluation"] or m["signature"])


# --------------------------------------------------------------------------- base model


def _base_verdict(a: Patch, b: Patch) -> dict:
    """Same base model? Sizes first, then the fingerprints of neurons both patches touch."""
    diffs = []
    for k in _SHAPE_KEYS:
        va, vb = a.base.get(k), b.base.get(k)
        if va is not None and vb is not None and str(va) != str(vb):
            diffs.append({"key": k, "a": va, "b": vb})
    names = [a.base.get(BaseKey.NAME), b.base.get(BaseKey.NAME)]
    tol = tolerance(a)
    errors: dict[str, float] = {}
    tb_by_name = {t.name: t for t in b.targets}
    fp_changes = []
    for ta in a.targets:
        tb = tb_by_name.get(ta.name)
        if tb is not None and (ta.base_sketch is None) != (tb.base_sketch is None):
            fp_changes.append({"target": ta.name, "change": "removed" if tb.base_sketch is None else "added"})
        if tb is None or ta.base_sketch is None or tb.base_sketch is None or ta.shape != tb.shape:
            continue
        sa, sb = np.asarray(ta.base_sketch, np.float32), np.asarray(tb.base_sketch, np.float32)
        if sa.shape[1] != sb.shape[1]:
            continue
        _, pa, pb = np.intersect1d(ta.indices, tb.indices, assume_unique=True, return_indices=True)
        if pa.size:
            errors[ta.name] = round(relative_error(sa[pa], sb[pb]), 6)
    worst = max(errors.values(), default=None)
    if diffs:
        verdict = "different"
        reason = "different base models: " + ", ".join(f"{d['key']} {d['a']} vs {d['b']}" for d in diffs)
    elif worst is not None and worst > tol:
        verdict = "different"
        name = max(errors, key=lambda k: errors[k])
        reason = (f"different base models: fingerprints of common neurons disagree "
                  f"({name}: relative error {worst:.3f} > tolerance {tol})")
    elif worst is not None:
        verdict = "same"
        reason = f"same base model (fingerprints of common neurons agree, worst relative error {worst:.3g})"
        if names[0] != names[1]:
            reason += f"; named {names[0]!r} vs {names[1]!r}"
    elif names[0] != names[1]:
        verdict = "unknown"
        reason = f"base models named {names[0]!r} vs {names[1]!r} and no common neurons to compare fingerprints"
    else:
        verdict = "same"
        reason = "same base description (no common neurons to compare fingerprints)"
    fa, fb = a.base.get(BaseKey.FINGERPRINT), b.base.get(BaseKey.FINGERPRINT)
    if fa != fb:
        fp_changes.append({"target": "base.fingerprint", "change": "removed" if fb is None else "added" if fa is None else "changed"})
    return {"verdict": verdict, "reason": reason, "differences": diffs, "fingerprint_error": errors, "tolerance": tol,
            "fingerprint_changes": fp_changes}


# --------------------------------------------------------------------------- entry point


def _side(p: Patch, digest: str, label: str) -> dict:
    return {"label": label, "content_digest": digest, "policy": p.policy, "base_name": p.base.get(BaseKey.NAME),
            "targets": len(p.targets), "neurons": p.n_neurons, "clusters": p.n_clusters,
            "trainable_parameters": p.trainable_parameters, "signed": p.signature is not None}


def diff_patches(a: Patch, b: Patch, *, labels: tuple[str, str] = ("A", "B"), top: int = 10) -> dict:
    """Compare two patches.

    Args:
        labels: how A and B are named in the output (their paths, usually).
        top: how many of the largest movers to list.

    Returns:
        A JSON-able dict; ``result["identical"]`` is true only when the tensors and every metadata
        field are equal (a signature added to an otherwise equal patch counts as a difference).
    """
    da, db = compute_digest(a), compute_digest(b)
    ta_map, tb_map = {t.name: t for t in a.targets}, {t.name: t for t in b.targets}
    entries, movers = [], []
    for name in sorted(set(ta_map) | set(tb_map)):
        e, m = _target_entry(name, ta_map.get(name), tb_map.get(name))
        entries.append(e)
        movers.extend(m)
    entries.sort(key=_sort_key)
    movers = [mv for mv in movers if mv["change"] > 0.0]
    movers.sort(key=lambda mv: (-mv["change"], mv["target"], mv["neuron"]))
    for mv in movers:
        mv["change"] = round(mv["change"], 6)
    meta = _metadata_diff(a, b)
    tensors_identical = da == db
    summary = {
        "tensors_identical": tensors_identical,
        "targets_added": [e["name"] for e in entries if e["status"] == "added"],
        "targets_removed": [e["name"] for e in entries if e["status"] == "removed"],
        "targets_changed": [e["name"] for e in entries if e["status"] in ("changed", "incompatible")],
        "neurons_added": sum(len(e["added"]) for e in entries),
        "neurons_removed": sum(len(e["removed"]) for e in entries),
        "neurons_kept": sum(e["kept"] for e in entries),
        "metadata_changed": _metadata_changed(meta),
    }
    return {
        "identical": tensors_identical and not summary["metadata_changed"],
        "a": _side(a, da, labels[0]),
        "b": _side(b, db, labels[1]),
        "base": _base_verdict(a, b),
        "summary": summary,
        "targets": entries,
        "movers": movers[:top],
        "metadata": meta,
    }


# --------------------------------------------------------------------------- human rendering


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _short(v: Any, width: int = 60) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= width else s[: width - 3] + "..."


def _idx_list(idx: list[int], limit: int = 12) -> str:
    if not idx:
        return ""
    s = ",".join(str(i) for i in idx[:limit])
    return s + (f",... ({len(idx)})" if len(idx) > limit else "")


def render_diff(r: dict) -> str:
    """Human rendering of :func:`diff_patches` (what ``nestpatch diff`` prints by default)."""
    lines: list[str] = []
    base = r["base"]
    if base["verdict"] != "same":
        lines.append(f"WARNING: {base['reason']}; the diff below compares them anyway")
    fpc = base.get("fingerprint_changes") or []
    gone = [c["target"] for c in fpc if c["change"] == "removed"]
    if gone:
        lines.append(f"WARNING: B drops the base fingerprint of {len(gone)} target(s) ({', '.join(gone[:4])}"
                     f"{', ...' if len(gone) > 4 else ''}): B can no longer be checked against its base model")
    for side in ("a", "b"):
        s = r[side]
        pol = s["policy"] or {}
        lines.append(f"{side.upper()}: {s['label']}  policy {pol.get('name', '?')} {pol.get('version', '')}  "
                     f"({s['targets']} targets, {s['neurons']} neurons, {s['clusters']} clusters)  {s['content_digest']}"
                     + ("  [signed]" if s["signed"] else ""))
    if r["identical"]:
        lines.append("identical: same tensors and metadata")
        return "\n".join(lines)
    if base["verdict"] == "same":
        lines.append(f"base: {base['reason']}")
    other = [f"{c['target']} {c['change']}" for c in fpc if c["change"] != "removed"]
    if other:
        lines.append(f"fingerprints: {'; '.join(other[:6])}{'; ...' if len(other) > 6 else ''}")
    sm = r["summary"]
    lines.append(f"tensors: {'identical' if sm['tensors_identical'] else 'differ'}; "
                 f"neurons +{sm['neurons_added']} -{sm['neurons_removed']} ={sm['neurons_kept']}; "
                 f"targets +{len(sm['targets_added'])} -{len(sm['targets_removed'])} ~{len(sm['targets_changed'])}")
    if not sm["tensors_identical"]:
        lines.append("  layer  module      status   n_A  n_B    +    -    =  K_A  K_B    ARI  cos   ratio  added / removed")
        for e in r["targets"]:
            if e["status"] == "same":
                continue
            ar = f"+[{_idx_list(e['added'])}]" if e["added"] else ""
            rr = f"-[{_idx_list(e['removed'])}]" if e["removed"] else ""
            lines.append(
                f"  {e['layer']:>5}  {e['module']:<10} {e['status']:<8} {e['neurons_a']:>4} {e['neurons_b']:>4} "
                f"{len(e['added']):>4} {len(e['removed']):>4} {e['kept']:>4} {e['clusters_a']:>4} {e['clusters_b']:>4} "
                f"{_fmt(e['ari']):>6} {_fmt(e['delta_cosine_mean']):>4} {_fmt(e['norm_ratio_median']):>6}  {ar} {rr}".rstrip())
        n_same = sum(1 for e in r["targets"] if e["status"] == "same")
        if n_same:
            lines.append(f"  ({n_same} target(s) unchanged)")
        if r["movers"]:
            lines.append("largest movers (|delta_B - delta_A| per neuron):")
            for mv in r["movers"]:
                layer, module = _layer_module(mv["target"])
                extra = (f"cos {_fmt(mv['cosine'])}  ratio {_fmt(mv['norm_ratio'])}" if mv["status"] == "kept"
                         else mv["status"])
                lines.append(f"  layer {layer:>3} {module:<10} neuron {mv['neuron']:>6}  change {mv['change']:.4g}  {extra}")
    meta = r["metadata"]
    if sm["metadata_changed"]:
        lines.append("metadata:")
        for section in ("policy", "base", "config", "provenance", "evaluation"):
            for d in meta[section]:
                lines.append(f"  {d['key']}: {_short(d['a'])} -> {_short(d['b'])}")
        data = meta["data"]
        for d in data["added"]:
            lines.append(f"  data added: {_data_key(d)} (sha256 {str(d.get('sha256', '?'))[:12]}, {d.get('rows', '?')} rows)")
        for d in data["removed"]:
            lines.append(f"  data removed: {_data_key(d)} (sha256 {str(d.get('sha256', '?'))[:12]}, {d.get('rows', '?')} rows)")
        for d in data["changed"]:
            fields = ", ".join(f"{f} {_short(d['a'].get(f), 16)} -> {_short(d['b'].get(f), 16)}" for f in d["fields"])
            lines.append(f"  data changed: {d['source']}: {fields}")
        if meta["signature"]:
            s = meta["signature"]
            lines.append(f"  signature: {(s['a'] or 'unsigned')[:16]} -> {(s['b'] or 'unsigned')[:16]}")
    beh = r.get("behaviour")
    if beh:
        lines.extend(render_behaviour(beh))
    lines.append("different")
    return "\n".join(lines)


def render_behaviour(beh: dict) -> list[str]:
    """Lines for the ``--behaviour`` part (verdict flips between A and B)."""
    lines = [f"behaviour on {beh.get('model', '?')} ({beh.get('backend', '?')}, judge {beh.get('judge', '?')}):"]
    for s in beh.get("suites", []):
        if s["kind"] == "harmful":
            what = f"{s['to_safe']} now refused, {s['to_unsafe']} now answered"
        else:
            what = f"{s['to_refused']} now refused, {s['to_complied']} now answered"
        lines.append(f"  suite {s['suite']} ({s['kind']}): {s['flips']} of {s['n']} verdicts flip ({what}); "
                     f"{s['metric']} A {_fmt(s.get('rate_a'), '.3f')} -> B {_fmt(s.get('rate_b'), '.3f')}")
        for f in s.get("examples", []):
            lines.append(f"    [{f['a']} -> {f['b']}] {f['id']}: {_short(f['prompt'], 90)}")
    return lines
