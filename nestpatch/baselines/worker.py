"""Process entry point of one bench job: ``python -m nestpatch.baselines.worker SPEC.json``.

The bench starts one process per method so that each method's peak memory is its own
(``ru_maxrss`` never goes down within a process). SPEC is a job (:class:`~.jobs.Job`) or a speed
measurement (``{"kind": "speed", ...}``). Exit codes: 0 done, 2 a user error (its one-line
message is in ``SPEC.error``), anything else a bug (traceback on stderr).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..errors import NestpatchError


def run_spec(spec: dict) -> dict:
    """Run a job or speed spec in this process and return its result."""
    if spec.get("kind") == "speed":
        from .speed import speed_stage

        return speed_stage(Path(spec["bench_dir"]), spec["entries"], base=spec["base"], threads=spec.get("threads"),
                           rounds=int(spec["rounds"]), new_tokens=int(spec["new_tokens"]), device=spec.get("device", "cpu"))
    from .jobs import Job, run_job

    return run_job(Job.from_dict(spec["job"]))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m nestpatch.baselines.worker SPEC.json\n")
        return 64
    path = Path(args[0])
    spec = json.loads(path.read_text(encoding="utf-8"))
    logging.basicConfig(level=int(spec.get("log_level", logging.WARNING)), format="%(levelname)s %(name)s: %(message)s")
    threads = spec.get("torch_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    err = path.with_suffix(".error")
    err.unlink(missing_ok=True)
    try:
        run_spec(spec)
    except NestpatchError as e:
        err.write_text(str(e), encoding="utf-8")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
