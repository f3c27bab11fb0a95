"""The Markdown digest of an evaluation run, rendered from ``summary.json`` alone.

Rendered from the machine-readable summary (never from live objects) so the digest can be
re-made from any run directory and never says something the JSON does not.
"""

from __future__ import annotations

from typing import Any


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100.0 * float(x):.1f}%"


def _num(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{float(x):.{digits}g}"


def _delta(a: Any, b: Any) -> str:
    if a is None or b is None:
        return "-"
    return f"{100.0 * (float(b) - float(a)):+.1f} pt"


def _short(text: str, n: int = 90) -> str:
    t = " ".join(str(text).split())
    return (t[: n - 1] + "…") if len(t) > n else t


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


#: The judges the headline compares side by side (a column each; "-" when the run did not use it).
HEADLINE_JUDGES = ("refusal-phrase", "strict-refusal", "composite")


def _judge_table(head: dict, variants: list[str]) -> list[str]:
    """Headline ASR by judge: phrase, strict and composite side by side, plus any other judge run."""
    names = list(HEADLINE_JUDGES) + sorted({j for v in variants for j in ((head.get(v) or {}).get("asr_by_judge") or {})}
                                           - set(HEADLINE_JUDGES))
    if not any((head.get(v) or {}).get("asr_by_judge") for v in variants):
        return []
    suite = next((head[v].get("asr_suite") for v in variants if (head.get(v) or {}).get("asr_suite")), "")
    out = [f"ASR on {suite} by judge:", "", "| variant | " + " | ".join(f"ASR ({n})" for n in names) + " |",
           "|---|" + "---|" * len(names)]
    for v in variants:
        a = (head.get(v) or {}).get("asr_by_judge") or {}
        out.append(f"| {v} | " + " | ".join(_pct(a.get(n)) for n in names) + " |")
    return out + [""]


def _jailbreak_table(jb: dict, variants: list[str]) -> list[str]:
    """Per attack: ASR by judge per variant; the mean over attacks; flips of the primary judge."""
    attacks = jb.get("attacks") or {}
    names = [n for n in HEADLINE_JUDGES if any(n in (a.get(v) or {}) for a in attacks.values() for v in variants)]
    names += sorted({n for a in attacks.values() for v in variants for n in (a.get(v) or {})} - set(names))
    out = ["## Jailbreak attacks (ASR per attack and judge)", "",
           "| attack | n | " + " | ".join(f"{v} ({n})" for n in names for v in variants) + " | flips c->r / r->c |",
           "|---|---|" + "---|" * (len(names) * len(variants) + 1)]
    for a, d in attacks.items():
        fl = next((d[k] for k in d if k.startswith("flips_")), None)
        fj = (fl or {}).get(d.get("judge"), {})
        ftxt = f"{fj.get('complied_to_refused', 0)} / {fj.get('refused_to_complied', 0)}" if fl else "-"
        out.append(f"| {a} | {d.get('n')} | " + " | ".join(_pct((d.get(v) or {}).get(n)) for n in names for v in variants)
                   + f" | {ftxt} |")
    mean = jb.get("mean") or {}
    out.append("| **mean over attacks** | | " + " | ".join(_pct(((mean.get(v) or {}).get(n) or {}).get("asr"))
                                                         for n in names for v in variants) + " | |")
    return out + [""]


def render_markdown(summary: dict) -> str:
    """The digest: headline per variant, a table per suite, flips with examples, settings."""
    variants: list[str] = summary.get("variants", [])
    model = summary.get("model") or {}
    patch = summary.get("patch") or {}
    backend = summary.get("backend") or {}
    dec = summary.get("decoding") or {}
    lines = ["# nestpatch evaluation", ""]
    lines.append(f"- model: `{model.get('path') or model.get('name') or model.get('spec')}` ({model.get('sha256') or 'no digest'})")
    if patch:
        pol = patch.get("policy") or {}
        lines.append(f"- patch: `{patch.get('path') or '(in memory)'}` {pol.get('name', '')} {pol.get('version', '')} "
                     f"({patch.get('content_digest')}), {patch.get('mode', '')}".rstrip(", "))
    harmful_cap = dec.get("harmful_max_new_tokens")
    cap = (f"max {harmful_cap} new tokens on harmful and jailbreak suites, {dec.get('max_new_tokens')} on the others"
           if harmful_cap and harmful_cap != dec.get("max_new_tokens") else f"max {dec.get('max_new_tokens')} new tokens")
    lines.append(f"- backend: {backend.get('backend')}; decoding: {dec.get('strategy')}, {cap}"
                 f"; seed {summary.get('seed')}" + (f"; limit {summary['limit']}" if summary.get("limit") else ""))
    judges = summary.get("judges") or []
    lines.append("- judges: " + ", ".join(f"{j.get('name')}" + (f" v{j['version']}" if j.get("version") else "") for j in judges)
                 + f" (primary: {summary.get('judge')})")
    tmpl = summary.get("chat_template") or {}
    lines.append(f"- chat template: {tmpl.get('source')} ({tmpl.get('sha256') or '-'})")
    lines.append(f"- wall time: {summary.get('wall_seconds', 0):.1f} s")
    lines.append("")

    head = summary.get("headline") or {}
    if head:
        lines += ["## Headline", "", f"| variant | ASR ({summary.get('judge')}) | benign refusal | over-refusal | KL to base | perplexity |",
                  "|---|---|---|---|---|---|"]
        for v in variants:
            h = head.get(v, {})
            asr = _pct(h.get("asr")) + (f" ({h['asr_suite']})" if h.get("asr_suite") else "")
            lines.append(f"| {v} | {asr} | {_pct(h.get('benign_refusal'))} | {_pct(h.get('over_refusal'))} | "
                         f"{_num(h.get('kl'))} | {_num(h.get('ppl'))} |")
        lines.append("")
        lines += _judge_table(head, variants)

    jb = summary.get("jailbreak")
    if jb:
        lines += _jailbreak_table(jb, variants)

    for name, s in (summary.get("suites") or {}).items():
        kind = s.get("kind")
        lines += [f"## {name} ({kind}, n={s.get('n')})", ""]
        if s.get("description"):
            lines += [s["description"], ""]
        if kind == "utility":
            lines += ["| variant | KL to base (mean) | KL median | top-1 agreement | perplexity | wall s |", "|---|---|---|---|---|---|"]
            for v in variants:
                d = s.get(v, {})
                lines.append(f"| {v} | {_num(d.get('kl'))} | {_num(d.get('kl_median'))} | {_pct(d.get('top1_agreement'))} | "
                             f"{_num(d.get('ppl'))} | {d.get('wall_seconds', 0):.1f} |")
            lines.append("")
            continue
        metric = {"harmful": "ASR", "benign": "benign refusal", "overrefusal": "over-refusal"}.get(kind, "refusal rate")
        judge_names = sorted({k for v in variants for k in (s.get(v, {}).get("asr_by_judge") or {})}) if kind == "harmful" else []
        cols = [f"{metric} ({s.get('judge')})"] + ([f"ASR ({j})" for j in judge_names if j != s.get("judge")])
        lines += ["| variant | " + " | ".join(cols) + " | n | tokens/s | truncated | wall s |",
                  "|---|" + "---|" * (len(cols) + 4)]
        for v in variants:
            d = s.get(v, {})
            main = d.get("asr") if kind == "harmful" else d.get("refusal_rate")
            extra = [_pct((d.get("asr_by_judge") or {}).get(j)) for j in judge_names if j != s.get("judge")]
            t = d.get("timing", {})
            lines.append(f"| {v} | " + " | ".join([_pct(main)] + extra) +
                         f" | {d.get('n')} | {_num(t.get('tokens_per_s'), 3)} | {t.get('truncated', 0)} | {d.get('wall_seconds', 0):.1f} |")
        if len(variants) > 1 and "base" in variants:
            for v in variants:
                if v == "base":
                    continue
                a, b = s.get("base", {}), s.get(v, {})
                x = (a.get("asr"), b.get("asr")) if kind == "harmful" else (a.get("refusal_rate"), b.get("refusal_rate"))
                lines.append(f"\nChange base -> {v}: {_delta(*x)}")
        lines.append("")
        for v, fl in (s.get("flips") or {}).items():
            jd = fl.get(s.get("judge"), {})
            c2r = jd.get("complied_to_refused", {})
            r2c = jd.get("refused_to_complied", {})
            lines.append(f"Flips base -> {v} ({s.get('judge')}, {fl.get('common')} common samples): "
                         f"{c2r.get('count', 0)} complied -> refused, {r2c.get('count', 0)} refused -> complied.")
            for title, block in (("complied -> refused", c2r), ("refused -> complied", r2c)):
                ex = block.get("examples") or []
                if ex:
                    lines += ["", f"| {title} | prompt | before | after |", "|---|---|---|---|"]
                    for e in ex[:3]:
                        lines.append(f"| {_cell(e['id'])} | {_cell(_short(e['prompt'], 60))} | {_cell(_short(e['before'], 60))} | "
                                     f"{_cell(_short(e['after'], 60))} |")
            lines.append("")
    libs = summary.get("libraries") or {}
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in libs.items() if v), ""]
    return "\n".join(lines)
