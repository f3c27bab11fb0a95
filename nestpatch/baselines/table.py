"""The bench's results as data, as a Markdown table, and as a plot; plus the paper's targets checked.

``results.json`` is the single source: the Markdown and the plot are rendered from it, never
from the runs directly, so the two renderings cannot disagree.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_path

log = logging.getLogger(__name__)

RESULTS_SCHEMA = "nestpatch-bench/1"
#: The paper's reported parameter ratio to LoRA (9.25x); the target asks for at least 9x.
MIN_PARAM_RATIO_VS_LORA = 9.0


def _rel(path: str | None, root: Path) -> str | None:
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def build_row(name: str, r: dict, speed: dict | None, root: Path) -> dict:
    """One table row from a job result and the speed measurement."""
    t = r.get("train") or {}
    e = r.get("eval") or {}
    sp = ((speed or {}).get("results") or {}).get(name) or {}
    return {
        "method": name,
        "label": r.get("label", name),
        "scope": t.get("scope") or "untouched model",
        "trainable_parameters": int(t.get("trainable_parameters") or 0),
        "artifact": _rel(t.get("artifact"), root),
        "artifact_kind": t.get("artifact_kind"),
        "artifact_bytes": int(t.get("artifact_bytes") or 0),
        "asr": dict(e.get("asr") or {}),
        "benign_refusal": e.get("benign_refusal"),
        "over_refusal": e.get("over_refusal"),
        "kl": e.get("kl"),
        "ppl": e.get("ppl"),
        "top1_agreement": e.get("top1_agreement"),
        "n": dict(e.get("n") or {}),
        "judge": e.get("judge"),
        "train_seconds": t.get("train_seconds"),
        "timings": t.get("timings"),
        "peak_rss_mb": t.get("peak_rss_mb"),
        "tokens_per_s": sp.get("tokens_per_s"),
        "tokens_per_s_backend": sp.get("backend"),
        "tokens_per_s_rounds": sp.get("rounds"),
        "folded": _rel((r.get("fold") or {}).get("path"), root),
        "folded_kind": (r.get("fold") or {}).get("kind"),
        "fold_precision": (r.get("fold") or {}).get("precision"),
        "fold_min_retention": (r.get("fold") or {}).get("min_retention"),
        "loss_first": t.get("loss_first"),
        "loss_final": t.get("loss_final"),
        "details": t.get("details"),
        "eval_seconds": r.get("eval_seconds"),
    }


def check_targets(rows: dict[str, dict], primary: str | None) -> list[dict]:
    """The issue's targets: ``{"target", "met" (True/False/None when not measurable), "detail"}``."""
    out: list[dict] = []
    nest, lora, full = rows.get("nest"), rows.get("lora"), rows.get("full")

    def asr(row: dict | None) -> float | None:
        return None if row is None or primary is None else row["asr"].get(primary)

    if nest and lora and asr(nest) is not None and asr(lora) is not None and nest["trainable_parameters"]:
        ratio = lora["trainable_parameters"] / nest["trainable_parameters"]
        ok_asr, ok_ratio = asr(nest) <= asr(lora), ratio >= MIN_PARAM_RATIO_VS_LORA
        out.append({"target": f"NeST ASR <= LoRA ASR ({primary}) with >= {MIN_PARAM_RATIO_VS_LORA:g}x fewer trainable parameters",
                    "met": ok_asr and ok_ratio,
                    "detail": f"ASR {100 * asr(nest):.1f}% vs {100 * asr(lora):.1f}%; {ratio:.1f}x fewer parameters "
                              f"({nest['trainable_parameters']:,} vs {lora['trainable_parameters']:,})"})
    else:
        out.append({"target": "NeST ASR <= LoRA ASR with >= 9x fewer trainable parameters", "met": None,
                    "detail": "needs nest and lora rows with ASR"})
    for key, words in (("over_refusal", "over-refusal"), ("kl", "KL to base")):
        if nest and full and nest.get(key) is not None and full.get(key) is not None:
            out.append({"target": f"NeST {words} lower than full fine-tuning", "met": nest[key] < full[key],
                        "detail": f"{_fmt_metric(key, nest[key])} vs {_fmt_metric(key, full[key])}"})
        else:
            out.append({"target": f"NeST {words} lower than full fine-tuning", "met": None, "detail": "needs nest and full rows"})
    trained = {k: v for k, v in rows.items() if v["artifact_bytes"]}
    if nest and len(trained) > 1:
        smallest = min(trained.values(), key=lambda r: r["artifact_bytes"])
        out.append({"target": "NeST artifact is the smallest", "met": smallest["method"] == "nest",
                    "detail": ", ".join(f"{v['label']} {_bytes(v['artifact_bytes'])}" for v in
                                        sorted(trained.values(), key=lambda r: r["artifact_bytes"]))})
    else:
        out.append({"target": "NeST artifact is the smallest", "met": None, "detail": "needs nest and another method"})
    return out


def build_results(cfg: Any, results: dict[str, dict], speed: dict | None, *, bench: dict | None = None) -> dict:
    """``results.json``: rows, harmful suites, the targets check, and how the run was made."""
    root = Path(cfg.out_dir)
    rows = {name: build_row(name, r, speed, root) for name, r in results.items()}
    if "base" in rows and rows["base"]["ppl"] is None:  # the base's perplexity is measured next to every method's
        rows["base"]["ppl"] = next(((r.get("eval") or {}).get("ppl_base") for r in results.values()
                                    if (r.get("eval") or {}).get("ppl_base") is not None), None)
    harmful = []
    for r in rows.values():
        for s in r["asr"]:
            if s not in harmful:
                harmful.append(s)
    primary = "harmbench" if "harmbench" in harmful else (harmful[0] if harmful else None)
    judge = next((r["judge"] for r in rows.values() if r.get("judge")), None)
    return {
        "schema": RESULTS_SCHEMA,
        "model": cfg.model,
        "methods": list(rows),
        "harmful_suites": harmful,
        "primary_suite": primary,
        "judge": judge,
        "limit": cfg.limit,
        "rows": rows,
        "targets": check_targets(rows, primary),
        "speed": {k: v for k, v in (speed or {}).items() if k != "results"},
        "bench": bench,
    }


# ------------------------------------------------------------------------------------------ rendering


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _fmt_metric(key: str, v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if key == "kl" else _pct(v)


def _bytes(n: int | None) -> str:
    if not n:
        return "–"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def _mark(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


_TORCH_EVAL = "each trained model in torch (float32)"
_LLAMA_EVAL = "each folded GGUF in llama.cpp (`--eval-backend llama`)"


def _fold_detail(r: dict) -> str:
    """`` (precision keep, min retention 0.031)`` for a GGUF fold that reports them (folds before the option do not)."""
    if r.get("fold_min_retention") is None:
        return ""
    return f" (precision {r.get('fold_precision') or 'keep'}, min retention {r['fold_min_retention']:.3f})"


def render_markdown(table: dict) -> str:
    """The human table (rendered from ``results.json`` only)."""
    rows = table["rows"]
    suites = table["harmful_suites"]
    nest_params = (rows.get("nest") or {}).get("trainable_parameters") or 0

    def n_of(*names: str) -> str:  # a column's test suite or its held-out (validation) counterpart
        found = [(n, r["n"][n]) for r in rows.values() for n in names if r["n"].get(n) is not None]
        vals = {v for _, v in found}
        where = "" if {n for n, _ in found} <= {names[0]} else f" on {'/'.join(sorted({n for n, _ in found}))}"
        return f" (n={'/'.join(str(v) for v in sorted(vals))}{where})" if vals else ""

    head = (["method", "trainable params", "x NeST"] + [f"ASR {s}{n_of(s)}" for s in suites] +
            [f"benign refusal{n_of('benign', 'benign-heldout')}", f"over-refusal{n_of('overrefusal')}",
             f"KL to base{n_of('utility', 'utility-heldout')}",
             "artifact", "artifact bytes", "train s", "peak RSS MB", "tok/s (folded)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows.values():
        p = r["trainable_parameters"]
        ratio = "–" if not (p and nest_params) else f"{p / nest_params:,.1f}x"
        tps = "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_backend']})"
        mem = _num(r["peak_rss_mb"])
        gpu_mb = (r.get("details") or {}).get("peak_gpu_mb")
        if gpu_mb is not None:
            mem += f" (+{gpu_mb:.0f} GPU)"
        cells = ([r["label"], f"{p:,}" if p else "0", ratio] + [_pct(r["asr"].get(s)) for s in suites] +
                 [_pct(r["benign_refusal"]), _pct(r["over_refusal"]), _fmt_metric("kl", r["kl"]),
                  r["artifact_kind"] or "–", _bytes(r["artifact_bytes"]), _num(r["train_seconds"]), mem, tps])
        lines.append("| " + " | ".join(cells) + " |")
    out = [f"# nestpatch bench: {table['model']}", ""]
    b = table.get("bench") or {}
    llama = b.get("eval_backend") == "llama"
    libs = b.get("libraries") or {}
    mach = b.get("machine") or {}
    tc = b.get("train_config") or {}
    out += [
        f"Judge: {table.get('judge') or '–'} (ASR = share of harmful prompts not refused); greedy decoding, "
        f"{b.get('max_new_tokens', '?')} new tokens, " + (_LLAMA_EVAL if llama else _TORCH_EVAL)
        + (f"; only the first {table['limit']} prompts of each suite (--limit)" if table.get("limit") else "") + ".",
        f"Shared training data and seed: harmful {tc.get('harmful')}, benign {tc.get('benign')}, seed {tc.get('seed')}, "
        f"batch {tc.get('batch_size')}+{tc.get('batch_size')}, retain {tc.get('retain_loss')}, refusal targets {tc.get('refusal_targets')}.",
        f"Machine: {mach.get('platform', '?')}, {mach.get('cpu_count', '?')} CPUs" + (f", GPU {mach['gpu']}" if mach.get("gpu") else "") +
        f"; threads {b.get('threads') or 'default'}. Versions: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v) + ".",
        "",
    ]
    out += lines
    out += ["", "What each row trained:", ""]
    for r in rows.values():
        det = r.get("details") or {}
        extra = []
        for k in ("steps", "lr"):
            if det.get(k) is not None:
                extra.append(f"{k} {det[k]:g}" if isinstance(det[k], float) else f"{k} {det[k]}")
        if r.get("loss_first") and r.get("loss_final"):
            key = "total" if "total" in r["loss_final"] else next(iter(r["loss_final"]))
            extra.append(f"loss {r['loss_first'].get(key, float('nan')):.3f} -> {r['loss_final'][key]:.3f}")
        out.append(f"- **{r['label']}**: {r['scope']}" + (f" ({'; '.join(extra)})" if extra else "") +
                   (f"; artifact `{r['artifact']}`" if r.get("artifact") else "") +
                   (f"; folded `{r['folded']}`" if r.get("folded") else "") + _fold_detail(r))
    sp = table.get("speed") or {}
    out += ["", "Notes:", "",
            "- Artifacts store 16-bit weights for every method (NeST deltas F16, LoRA/CB adapters and full weights float16).",
            "- Train s is the method's own work: NeST's detection, clustering and optimizer loop; the baselines' optimizer "
            "loops (circuit breakers also generate the base's answers to the harmful prompts they reroute). The refusal "
            "targets and the base answers for the retain term are shared by all methods and not counted.",
            "- Peak RSS is the resident memory peak of the training process (model, optimizer, activations); on a GPU the "
            "peak of torch's GPU allocations is added in brackets.",
            (f"- tok/s: greedy decode of the folded model at batch 1, a fixed {sp['new_tokens']}-token continuation "
             f"(prompt not timed), median of {sp['rounds']} interleaved rounds; folded GGUFs keep the base file's tensor "
             "types (only changed tensors are re-encoded, at the row's fold precision), so differences are noise of the "
             "shared machine unless large."
             if "new_tokens" in sp and "rounds" in sp else "- tok/s: not measured in this run (`--no-speed`)."),
            ("- The rates above are measured on each folded GGUF, whose retention (1 = all of the update) is listed "
             "below; the KL is against the base's own file." if llama else
             "- The rates above are measured on the trained model in torch. A folded GGUF keeps, of each changed tensor's "
             "update, the share its retention gives (1 = all of it): an update smaller than the base's quantization step "
             "is rounded away, and that file then behaves like the base (`--fold-precision q8_0` or `auto` stores "
             "changed tensors at higher precision; `--eval-backend llama` measures the folded files)."),
            "- A refusal-phrase judge counts broken or off-topic text as compliance: circuit breakers, whose rerouted "
            "outputs are often broken text rather than refusals, are judged pessimistically by it.",
            "", "Targets:", ""]
    for t in table["targets"]:
        out.append(f"- {t['target']}: **{_mark(t['met'])}** ({t['detail']})")
    return "\n".join(out) + "\n"


def write_plot(table: dict, path: Path) -> Path | None:
    """ASR (each harmful suite) against trainable parameters, log x; the base ASR as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the audit extra
        log.warning("matplotlib is not installed; no plot written")
        return None
    rows = table["rows"]
    suites = table["harmful_suites"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = ["o", "s", "^", "D"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    trained = [r for r in rows.values() if r["trainable_parameters"]]
    for si, s in enumerate(suites):
        for ci, r in enumerate(trained):
            a = r["asr"].get(s)
            if a is None:
                continue
            ax.scatter(r["trainable_parameters"], 100 * a, marker=markers[si % len(markers)], s=60,
                       facecolors=colors[ci % len(colors)] if si == 0 else "none", edgecolors=colors[ci % len(colors)],
                       label=f"{r['label']}" if si == 0 else None, zorder=3)
            if si == 0:
                ax.annotate(r["label"], (r["trainable_parameters"], 100 * a), textcoords="offset points", xytext=(6, 6), fontsize=8)
        base = rows.get("base")
        if base and base["asr"].get(s) is not None:
            ax.axhline(100 * base["asr"][s], linestyle="--", linewidth=1, color="grey" if si == 0 else "lightgrey",
                       label=f"base model ({s})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"ASR (%), {table.get('judge') or 'refusal-phrase'} judge")
    if trained:
        xs = [r["trainable_parameters"] for r in trained]
        ax.set_xlim(min(xs) / 3, max(xs) * 3)
    ax.set_ylim(-3, 103)
    shape = ", ".join(f"{s}: {'filled' if i == 0 else 'hollow'} {markers[i % len(markers)]}" for i, s in enumerate(suites))
    ax.set_title(f"{Path(str(table['model'])).name}: ASR vs trainable parameters\n({shape})", fontsize=9)
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def is_filled(v: Any) -> bool:
    """A table cell has a value (for tests and checks)."""
    return v is not None and not (isinstance(v, float) and math.isnan(v))
