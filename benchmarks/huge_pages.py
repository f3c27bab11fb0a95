"""Training micro-batches with and without huge-page-backed tensors, in alternating child processes.

Why: a large model's training runs with glibc's mmap threshold fixed (``nestpatch.memory``), so
every large temporary is fresh memory whose 4 KiB pages the kernel faults in and zeroes one by one;
on a 2-core CPU half the training's CPU time went to the kernel. ``load_model`` now also asks
PyTorch for transparent huge pages (``THP_MEM_ALLOC_ENABLE``). PyTorch reads that once per
process, so the two settings run as separate processes (``benchmarks/train_precision.py``, float32
only), alternated so that other load hits both alike. Each child's CPU time in user and kernel
space and its page faults come from ``getrusage``; its peak RSS it reports itself.

    python benchmarks/huge_pages.py --model qwen2.5-coder-0.5b --threads 2 --rounds 2 --repeats 2

Prints one JSON line per child, then the medians per setting and the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {"4k-pages": "0", "huge-pages": "1"}


def run_child(args: argparse.Namespace, thp: str) -> dict:
    """One ``train_precision.py`` process with ``THP_MEM_ALLOC_ENABLE=thp``: its medians, CPU times and faults."""
    script = Path(__file__).with_name("train_precision.py")
    cmd = [sys.executable, str(script), "--model", args.model, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--batch-size", str(args.batch_size), "--retain-loss", args.retain_loss, "--precisions", "float32"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "THP_MEM_ALLOC_ENABLE": thp}).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    last = json.loads(out.strip().splitlines()[-1])
    return {"micro_batch_s": last["median_s"]["float32"], "peak_rss_mb": last["peak_rss_mb"],
            "user_s": round(after.ru_utime - before.ru_utime, 1), "sys_s": round(after.ru_stime - before.ru_stime, 1),
            "minor_faults": after.ru_minflt - before.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="child processes per setting (alternated)")
    ap.add_argument("--repeats", type=int, default=2, help="timed micro-batches per child")
    ap.add_argument("--batch-size", type=int, default=6, help="harmful and benign rows a micro-batch (the 0.5B recipe's 6)")
    ap.add_argument("--retain-loss", choices=("kl", "ce"), default="ce", help="the recipes' ce by default")
    args = ap.parse_args()

    rows: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            row = run_child(args, SETTINGS[name])
            rows[name].append(row)
            print(json.dumps({"round": r, "setting": name, **row}), flush=True)
    med = {k: {m: round(statistics.median(x[m] for x in v), 2) for m in v[0]} for k, v in rows.items()}
    print(json.dumps({"median": med, "speedup": round(med["4k-pages"]["micro_batch_s"] / med["huge-pages"]["micro_batch_s"], 2),
                      "sys_ratio": round(med["4k-pages"]["sys_s"] / max(med["huge-pages"]["sys_s"], 1e-9), 2)}), flush=True)


if __name__ == "__main__":
    main()
