"""The report's figures (matplotlib, Agg backend): each function returns PNG bytes.

Why PNG bytes rather than files: the report embeds each figure as base64 (the HTML must stand
alone, no network) and also writes it next to the HTML; one rendering serves both.
Figures take the report's plain data (dicts and lists), never a Patch, so they can be
re-rendered from the JSON the report also writes.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

_DPI = 100
_MODULE_ORDER = ("gate_proj", "up_proj", "down_proj")


def _plt():
    """pyplot on the non-interactive Agg backend (headless machines, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # metadata Software=None: no version string in the PNG, so the bytes depend only on the data
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def _width(n: int, per: float = 0.28, lo: float = 6.0, hi: float = 22.0) -> float:
    return float(min(hi, max(lo, 1.5 + per * n)))


def _name_key(name: str) -> tuple:
    """Sort HF tensor names by layer, then gate/up/down order."""
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), 10**9)
    mod = next((m for m in _MODULE_ORDER if m in name), "")
    return (layer, _MODULE_ORDER.index(mod) if mod else 9, name)


def _target_label(t: dict) -> str:
    mod = t["module"].replace("_proj", "")
    return f"L{t['layer']} {mod}" if t["layer"] != "other" else t["name"][-24:]


def neurons_heatmap(per_target: Sequence[dict], n_layers: int | None) -> bytes:
    """Neurons per layer (x) and module (y), counts written in the cells."""
    plt = _plt()
    layers = sorted({int(t["layer"]) for t in per_target if t["layer"] != "other"})
    n = max(n_layers or 0, (layers[-1] + 1) if layers else 1)
    modules = [m for m in _MODULE_ORDER if any(t["module"] == m for t in per_target)] or list(_MODULE_ORDER)
    grid = np.zeros((len(modules), n), np.int64)  # (modules, layers)
    for t in per_target:
        if t["layer"] != "other" and t["module"] in modules:
            grid[modules.index(t["module"]), int(t["layer"])] += t["neurons"]
    fig, ax = plt.subplots(figsize=(_width(n, 0.4), 1.2 + 0.55 * len(modules)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=max(1, int(grid.max())))
    ax.set_yticks(range(len(modules)), modules)
    step = 1 if n <= 32 else 2
    ax.set_xticks(range(0, n, step), [str(i) for i in range(0, n, step)])
    ax.set_xlabel("layer")
    ax.set_title(f"Patched neurons per layer and module (total {int(grid.sum())})")
    if n <= 40:
        vmax = grid.max() or 1
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=10 if n <= 12 else 7, color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="neurons")
    return _png(fig)


def cluster_sizes(per_target: Sequence[dict]) -> bytes:
    """One stacked bar per target: each segment is one cluster, its height the cluster's size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(_width(len(per_target)), 3.6))
    cmap = plt.get_cmap("tab10")
    for x, t in enumerate(per_target):
        bottom = 0
        for c, size in enumerate(t["cluster_sizes"]):
            ax.bar(x, size, bottom=bottom, color=cmap(c % 10), edgecolor="white", linewidth=0.5, width=0.8)
            bottom += size
    ax.set_xticks(range(len(per_target)), [_target_label(t) for t in per_target], rotation=90, fontsize=7)
    ax.set_ylabel("neurons (one segment per cluster)")
    ax.set_title("Cluster sizes per target")
    ax.set_xlim(-0.6, len(per_target) - 0.4)
    return _png(fig)


def delta_norms(per_target: Sequence[dict]) -> bytes:
    """L2 norm of each cluster's shared delta, one column of dots per target."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(_width(len(per_target)), 3.6))
    xs, ys, sizes = [], [], []
    for x, t in enumerate(per_target):
        for norm, size in zip(t["delta_norms"], t["cluster_sizes"]):
            xs.append(x)
            ys.append(norm)
            sizes.append(12 + 6 * size)
    ax.scatter(xs, ys, s=sizes, alpha=0.6, color="tab:red", edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(per_target)), [_target_label(t) for t in per_target], rotation=90, fontsize=7)
    ax.set_ylabel("||delta|| (dot area ~ cluster size)")
    ax.set_title("Delta norm per cluster")
    ax.set_xlim(-0.6, len(per_target) - 0.4)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def retention(folds: Sequence[dict]) -> bytes:
    """Share of each target's delta that survived the fold's re-encoding, grouped by fold."""
    plt = _plt()
    names = sorted({t["name"] for f in folds for t in f["targets"]}, key=_name_key)
    fig, ax = plt.subplots(figsize=(_width(len(names) * max(1, len(folds)), 0.2), 3.6))
    width = 0.8 / max(1, len(folds))
    for k, f in enumerate(folds):
        by = {t["name"]: t for t in f["targets"]}
        vals = [by[n]["retention"] if n in by else np.nan for n in names]
        xs = np.arange(len(names)) + (k - (len(folds) - 1) / 2) * width
        ax.bar(xs, vals, width=width, label=f["label"])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    labels = []
    for n in names:
        parts = n.split(".")
        labels.append(f"L{parts[2]} {parts[4].replace('_proj', '')}" if len(parts) >= 5 and parts[2].isdigit() else n[-20:])
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("retention (1 = all of the delta)")
    ax.set_title("Retention of each target's delta after folding")
    top = max([1.0] + [t["retention"] for f in folds for t in f["targets"] if t["retention"] is not None])
    ax.set_ylim(min(0.0, min((t["retention"] for f in folds for t in f["targets"]), default=0.0)), top * 1.25)
    ax.legend(fontsize=8, loc="upper right", ncol=max(1, len(folds)))
    return _png(fig)


def eval_bars(rows: Sequence[dict]) -> bytes:
    """ASR and over-refusal before/after per suite: one panel per metric, bars base vs patched.

    Args:
        rows: ``{"suite", "metric", "before", "after", "run"}`` (rates in [0, 1], None if absent).
    """
    plt = _plt()
    metrics = [m for m in ("asr", "over_refusal", "benign_refusal") if any(r["metric"] == m for r in rows)]
    metrics += sorted({r["metric"] for r in rows} - set(metrics))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6.0, 4.2 * len(metrics)), 3.8), squeeze=False)
    titles = {"asr": "Attack success rate (harmful)", "over_refusal": "Over-refusal (benign but edgy)",
              "benign_refusal": "Refusal on benign prompts"}
    for ax, metric in zip(axes[0], metrics):
        sel = [r for r in rows if r["metric"] == metric]
        labels = [r["suite"] if len({x["run"] for x in sel}) == 1 else f"{r['suite']}\n({r['run']})" for r in sel]
        x = np.arange(len(sel))
        before = [np.nan if r["before"] is None else r["before"] for r in sel]
        after = [np.nan if r["after"] is None else r["after"] for r in sel]
        b1 = ax.bar(x - 0.2, before, width=0.4, label="before (base)", color="tab:gray")
        b2 = ax.bar(x + 0.2, after, width=0.4, label="after (patched)", color="tab:blue")
        for bars in (b1, b2):
            for rect in bars:
                h = rect.get_height()
                if np.isfinite(h):
                    ax.text(rect.get_x() + rect.get_width() / 2, h + 0.01, f"{h:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(titles.get(metric, metric), fontsize=10)
        ax.legend(fontsize=7)
    return _png(fig)
