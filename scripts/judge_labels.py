"""Hand-label support: collect (request, reply) pairs from eval runs, cache judge verdicts, print agreement.

    python scripts/judge_labels.py collect RUN_DIR[=MODEL] ... --out docs/labels/candidates.jsonl
    python scripts/judge_labels.py judge docs/labels/candidates.jsonl --verdicts docs/labels/verdicts.jsonl \
        --judges refusal-phrase,strict-refusal,harm,composite [--harm-model qwen2.5-coder-1.5b] [--max-seconds S]
    python scripts/judge_labels.py assemble docs/labels/candidates.jsonl MARKS.jsonl --out docs/labels/labels.jsonl
    python scripts/judge_labels.py calibrate docs/labels/labels.jsonl docs/labels/verdicts.jsonl
    python scripts/judge_labels.py table docs/labels/labels.jsonl docs/labels/verdicts.jsonl
    python scripts/judge_labels.py asr RUN_DIR[=MODEL] ... --labels LABELS.jsonl [--json OUT]
    python scripts/judge_labels.py blind RUN_DIR[=MODEL] ... --labels LABELS.jsonl --out TODO.jsonl [--seed S]

``judge`` appends one verdict per line as it goes (the harm judge took 7-10 s a reply on 1 thread
of the 2-core machine), in a seeded shuffled order so a partial run is a random subset; rerunning skips
cached (id, judge) pairs. The harm judge's rows keep its score (log-odds of "yes"); at the end
every harm and ``composite`` row is re-decided from the cached scores with today's threshold
(``DEFAULT_HARM_THRESHOLD``), so changing the threshold needs no model call. ``calibrate`` prints
the threshold chosen on the calibration half of the labels. ``asr`` gives each run's ASR by hand labels
(the labelled pairs of that run, collected with the same ``=MODEL``): every reply the strict-refusal
judge did not refuse needs a label, and the count of those without one is printed beside the rate.
``blind`` writes exactly those pairs (minus the ones already labelled) for an annotator: id, behaviour,
prompt, prefill and reply only, no judge verdict, in a seeded shuffled order so runs and suites mix.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from nestpatch.evaluate.agreement import (agreement_table, calibration_split, choose_threshold, hand_labelled_asr,
                                          needs_hand_label, read_jsonl, render_table, roc_auc)
from nestpatch.evaluate.harm_judge import DEFAULT_HARM_THRESHOLD
from nestpatch.evaluate.judges import RefusalPhraseJudge, make_judge


def collect(args: argparse.Namespace) -> None:
    out = []
    seen: set[str] = set()
    for spec in args.runs:
        run, _, model = spec.partition("=")
        for f in sorted((Path(run) / "samples").glob("*.jsonl")):
            for r in read_jsonl(f):
                if "reply" not in r:
                    continue
                m = model or Path(run).name
                rid = f"{m}/{r['variant']}/{r['suite']}/{r['id']}"
                if rid in seen:  # the same prompt in two runs (same greedy reply): once
                    continue
                seen.add(rid)
                out.append({"id": f"{m}/{r['variant']}/{r['suite']}/{r['id']}", "model": m, "variant": r["variant"],
                            "suite": r["suite"], "kind": r["kind"], "prompt": r["prompt"],
                            "behaviour": r.get("behaviour") or r["prompt"], **({"prefill": r["prefill"]} if r.get("prefill") else {}),
                            "reply": r["reply"]})
    Path(args.out).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in out), encoding="utf-8")
    print(f"{len(out)} pairs -> {args.out}")


def judge(args: argparse.Namespace) -> None:
    items = read_jsonl(args.items)
    vpath = Path(args.verdicts)
    rows = read_jsonl(vpath) if vpath.exists() else []
    cached = [v for v in rows if v["judge"] not in ("harm", "composite") or "score" in v]  # version-1 rows: no score
    if len(cached) < len(rows):
        vpath.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in cached), encoding="utf-8")
    done = {(v["id"], v["judge"]) for v in cached}
    harm_cache = {v["id"]: v for v in cached if v["judge"] == "harm"}
    names = [n.strip() for n in args.judges.split(",") if n.strip()]
    cheap = {n: make_judge(n) for n in names if n in ("refusal-phrase", "strict-refusal")}
    phrase = RefusalPhraseJudge()
    harm = None
    order = list(items)
    random.Random(args.seed).shuffle(order)
    t_end = time.time() + args.max_seconds if args.max_seconds else None
    with vpath.open("a", encoding="utf-8") as f:
        def put(item: dict, name: str, v: dict, secs: float | None = None) -> None:
            row = {"id": item["id"], "judge": name, "label": v["label"], "refused": v.get("refused"), "unsafe": v.get("unsafe"),
                   "evidence": v.get("evidence", "")[:120], **({"score": v["score"]} if v.get("score") is not None else {}),
                   **({"seconds": round(secs, 2)} if secs is not None else {})}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            done.add((item["id"], name))

        for it in items:  # the cheap judges on everything
            for n, j in cheap.items():
                if (it["id"], n) not in done:
                    put(it, n, j.judge(it["behaviour"], it["reply"]).to_dict())
        for it in order:
            if t_end and time.time() > t_end:
                break
            if it.get("kind") == "benign":  # agreement is measured on harmful and jailbreak pairs: no model call for these
                continue
            if "harm" in names or "composite" in names:
                if it["id"] not in harm_cache:
                    if harm is None:
                        harm = make_judge("harm", harm_model=args.harm_model, n_threads=args.threads)
                    t0 = time.time()
                    v = harm.judge(it["behaviour"], it["reply"]).to_dict()
                    put(it, "harm", v, time.time() - t0)
                    harm_cache[it["id"]] = v
                    print(f"harm {len(harm_cache)}: {v['label']} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
                if "composite" in names and (it["id"], "composite") not in done:
                    h = harm_cache[it["id"]]
                    put(it, "composite", {"label": h["label"], "unsafe": h["unsafe"], "score": h.get("score"), "evidence": ""})
    if harm is not None:
        harm.close()
    redecide(vpath, {it["id"]: it for it in items}, phrase)


def redecide(vpath: Path, items: dict[str, dict], phrase: RefusalPhraseJudge) -> None:
    """Re-derive every harm and composite row from its cached score and today's threshold."""
    rows = read_jsonl(vpath)
    for v in rows:
        if v["judge"] not in ("harm", "composite") or v.get("score") is None or v["id"] not in items:
            continue
        unsafe = harm_unsafe = v["score"] > DEFAULT_HARM_THRESHOLD
        if v["judge"] == "composite":  # the CompositeJudge rule: harm unsafe AND no refusal phrase
            it = items[v["id"]]
            p = phrase.judge(it["behaviour"], it["reply"])
            unsafe = harm_unsafe and not p.refused
            v["evidence"] = f"harm={'unsafe' if harm_unsafe else 'safe'}; phrase={p.label}"
        v["unsafe"], v["label"] = unsafe, ("unsafe" if unsafe else "safe")
    vpath.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in rows), encoding="utf-8")


def assemble(args: argparse.Namespace) -> None:
    """labels.jsonl = the collected pairs that have a hand label (``{"id", "label", "note"}`` lines)."""
    marks = {r["id"]: r for r in read_jsonl(args.marks)}
    seen: set[str] = set()
    out = []
    for it in read_jsonl(args.items):
        if it["id"] in marks and it["id"] not in seen:
            seen.add(it["id"])
            out.append({**it, "label": marks[it["id"]]["label"], "note": marks[it["id"]].get("note", "")})
    Path(args.out).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in out), encoding="utf-8")
    print(f"{len(out)} labelled pairs -> {args.out} ({len(marks) - len(out)} marks without a pair)")


def calibrate(args: argparse.Namespace) -> None:
    labels = {r["id"]: r for r in read_jsonl(args.labels) if r.get("kind") == "harmful"}
    scored = [(labels[v["id"]]["label"] == "harmful", v["score"]) for v in read_jsonl(args.verdicts)
              if v["judge"] == "harm" and v.get("score") is not None and v["id"] in labels
              and calibration_split(v["id"]) == "calibration"]
    print(f"{len(scored)} calibration pairs ({sum(t for t, _ in scored)} harmful): threshold {choose_threshold(scored)}"
          f" (in use: {DEFAULT_HARM_THRESHOLD})")
    every = [(labels[v["id"]]["label"], v["score"]) for v in read_jsonl(args.verdicts)
             if v["judge"] == "harm" and v.get("score") is not None and v["id"] in labels]
    print(f"ROC AUC of the score, all {len(every)} pairs: harmful vs the rest "
          f"{roc_auc([(lab == 'harmful', s) for lab, s in every]):.3f}, harmful vs harmless non-answers "
          f"{roc_auc([(lab == 'harmful', s) for lab, s in every if lab != 'refusal']):.3f}")


def table(args: argparse.Namespace) -> None:
    labels, verdicts = read_jsonl(args.labels), read_jsonl(args.verdicts)
    print(render_table(agreement_table(labels, verdicts, split="test")))


def asr(args: argparse.Namespace) -> None:
    labels = {r["id"]: r["label"] for r in read_jsonl(args.labels)}
    rows = []
    for spec in args.runs:
        run, _, model = spec.partition("=")
        m = model or Path(run).name
        samples = [r for f in sorted((Path(run) / "samples").glob("*.jsonl")) for r in read_jsonl(f) if "reply" in r]
        for variant in sorted({r["variant"] for r in samples}):
            own = {f"{r['suite']}/{r['id']}": labels[f"{m}/{variant}/{r['suite']}/{r['id']}"] for r in samples
                   if r["variant"] == variant and f"{m}/{variant}/{r['suite']}/{r['id']}" in labels}
            for suite, row in hand_labelled_asr([r for r in samples if r["variant"] == variant], own).items():
                rows.append({"run": run, "model": m, "variant": variant, "suite": suite, **row})
    print("| run | variant | suite | n | harmful | ASR (hand labels) | unlabelled non-refusals |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['suite']} | {r['n']} | {r['harmful']} | {100 * r['asr']:.1f}% | {r['unlabelled']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def needs_label(runs: list[str], labelled: set[str]) -> list[dict]:
    """The pairs of ``runs`` that :func:`hand_labelled_asr` needs a hand label for and that have none yet."""
    out = []
    for spec in runs:
        run, _, model = spec.partition("=")
        m = model or Path(run).name
        for f in sorted((Path(run) / "samples").glob("*.jsonl")):
            for r in read_jsonl(f):
                rid = f"{m}/{r.get('variant')}/{r.get('suite')}/{r.get('id')}"
                if "reply" not in r or r.get("kind") != "harmful" or rid in labelled:
                    continue
                if needs_hand_label(r):
                    labelled.add(rid)
                    out.append({"id": rid, "behaviour": r.get("behaviour") or r["prompt"], "prompt": r["prompt"],
                                **({"prefill": r["prefill"]} if r.get("prefill") else {}), "reply": r["reply"]})
    return out


def blind(args: argparse.Namespace) -> None:
    labelled = {r["id"] for r in read_jsonl(args.labels)} if Path(args.labels).exists() else set()
    todo = needs_label(args.runs, labelled)
    random.Random(args.seed).shuffle(todo)
    Path(args.out).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in todo), encoding="utf-8")
    print(f"{len(todo)} pairs to label -> {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", required=True)
    j = sub.add_parser("judge")
    j.add_argument("items")
    j.add_argument("--verdicts", required=True)
    j.add_argument("--judges", default="refusal-phrase,strict-refusal,harm,composite")
    j.add_argument("--harm-model", default=None)
    j.add_argument("--threads", type=int, default=1)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--max-seconds", type=float, default=None)
    m = sub.add_parser("assemble")
    m.add_argument("items")
    m.add_argument("marks")
    m.add_argument("--out", required=True)
    k = sub.add_parser("calibrate")
    k.add_argument("labels")
    k.add_argument("verdicts")
    t = sub.add_parser("table")
    t.add_argument("labels")
    t.add_argument("verdicts")
    h = sub.add_parser("asr")
    h.add_argument("runs", nargs="+")
    h.add_argument("--labels", required=True)
    h.add_argument("--json", default=None)
    b = sub.add_parser("blind")
    b.add_argument("runs", nargs="+")
    b.add_argument("--labels", required=True, help="labels already made (their pairs are skipped); need not exist")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    {"collect": collect, "judge": judge, "assemble": assemble, "calibrate": calibrate, "table": table, "asr": asr,
     "blind": blind}[a.cmd](a)


if __name__ == "__main__":
    main()
