"""ASR of an earlier `nestpatch eval` run's replies under other judges, without generating them again.

Why: a run made before a judge existed (or without it, to save time) already holds every reply in
``RUN/samples/SUITE.VARIANT.jsonl``; judging those replies gives the figure the run would have
reported with that judge, at the judge's cost only (the composite judge calls its model only on
replies without a refusal phrase). Harmful and jailbreak suites only (ASR); a refusal judge's ASR is
the share not refused, a safety judge's the share judged unsafe among those it gave a verdict on
(``nestpatch.evaluate.runner.summarize_generation``, the code `nestpatch eval` reports with; judges
read the plain request a jailbreak wraps, as there).

    python scripts/rejudge.py runs/q05lr-eval --judge composite --suite harmbench --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a `nestpatch eval` output directory")
    ap.add_argument("--judge", default="composite", help="comma-separated judge names (as `eval --judge`)")
    ap.add_argument("--suite", default="", help="only these suites (comma-separated; default: every harmful one)")
    ap.add_argument("--threads", type=int, default=0, help="threads of a model judge (0 = llama.cpp's default)")
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args()

    from nestpatch.atomic import write_bytes_atomic
    from nestpatch.evaluate.judges import make_judge
    from nestpatch.evaluate.records import read_records
    from nestpatch.evaluate.runner import summarize_generation

    files = sorted((Path(args.run) / "samples").glob("*.jsonl"))
    if not files:
        sys.exit(f"{args.run}: no samples/*.jsonl (not a `nestpatch eval` run directory)")
    wanted = {s for s in args.suite.split(",") if s}
    run_json = Path(args.run) / "run.json"
    limit = json.loads(run_json.read_text(encoding="utf-8")).get("limit") if run_json.is_file() else None
    judges = [make_judge(n, n_threads=args.threads or None) for n in args.judge.split(",") if n]
    rows = []
    try:
        for f in files:
            recs = read_records(f)
            if not recs or recs[0].get("kind") != "harmful" or (wanted and recs[0]["suite"] not in wanted):
                continue
            for r in recs:  # as the runner judges: the plain request a jailbreak wraps, the model's own text
                r["verdicts"].update({j.name: j.judge(r.get("behaviour") or r["prompt"], r["reply"]).to_dict() for j in judges})
            asr = summarize_generation(recs, "harmful", judges)["asr_by_judge"]
            for j in judges:
                rows.append({"suite": recs[0]["suite"], "variant": recs[0]["variant"], "n": len(recs), "judge": j.name,
                             "asr": asr[j.name], "limit": limit})
                print(f"{recs[0]['suite']:<28} {recs[0]['variant']:<8} n={len(recs):<4} {j.name:<16} ASR {100 * asr[j.name]:.1f}%",
                      flush=True)
    finally:
        for j in judges:
            close = getattr(j, "close", None)
            if close:
                close()
    if args.json:
        write_bytes_atomic(args.json, (json.dumps(rows, indent=1) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main()
