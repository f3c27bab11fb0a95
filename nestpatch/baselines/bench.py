"""``nestpatch bench``: run NeST and the baselines on one model, evaluate each the same way, write one table.

Flow (every step resumable; see :mod:`.jobs` for a method directory's layout)::

    BENCH_DIR/bench.json          the configuration and library versions of the run
    BENCH_DIR/data/shared.json    training sequences shared by the baselines (same as nestpatch train's)
    BENCH_DIR/base/               the untouched model evaluated (reference row)
    BENCH_DIR/<method>/           job.json, train.json, artifact/, train.jsonl, eval/, eval-utility/,
                                  folded.gguf (or folded/), result.json
    BENCH_DIR/speed.json          decode tokens/s of every folded model, interleaved rounds
    BENCH_DIR/results.json        the table as data (+ targets check)
    BENCH_DIR/results.md          the table for people (rendered from results.json)
    BENCH_DIR/asr_vs_params.png   ASR against trainable parameters (log x)

Each method runs in its own process by default (``isolate``), so its peak memory is its own.
A method whose ``result.json`` exists is skipped; if its settings differ from the new run's,
the bench stops and says so instead of mixing results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import InputError, TrainingError
from ..provenance import library_versions
from ..train.config import TrainConfig
from .options import DEFAULT_METHODS, DEFAULT_SUITES, EVAL_BACKENDS
from .jobs import (BASE, EvalSettings, FOLDED_GGUF, JOB_FILE, RESULT_FILE, Job, base_gguf, needs_refold, read_json, run_job,
                   write_json)
from .registry import get_method
from .speed import SPEED_FILE, speed_stage

log = logging.getLogger(__name__)

BENCH_FILE = "bench.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_FILE = "asr_vs_params.png"
DATA_CACHE = "data/shared.json"


@dataclass
class BenchConfig:
    """Settings of one bench run.

    Attributes:
        model: HF directory, ``.gguf`` file or named model (``smollm2``).
        out_dir: the bench directory.
        methods: registry names, in order.
        train_config: the shared NeST training configuration (data, template, targets, retain,
            seed, batch size...); ``model`` and ``out`` are set by the bench.
        method_options: per method, options on top of its defaults (``{"lora": {"rank": 16}}``).
        suites: evaluation suites (``harmful-heldout`` is the bench's own held-out split).
        limit: evaluate only the first N prompts of each suite.
        max_new_tokens, eval_batch_size: greedy decoding settings of the evaluation.
        utility_reply_tokens: length of the base answers the KL to the base is measured on.
        speed, speed_rounds, speed_tokens: decode tokens/s of the folded models.
        fold_precision: the changed tensors' types in a folded GGUF (``nestpatch apply --precision``).
        eval_backend: ``torch`` evaluates each trained model in float32; ``llama`` its folded GGUF in
            llama.cpp (the base must be a GGUF file).
        threads: CPU threads for torch and llama.cpp (None: their defaults).
        isolate: one process per method (exact peak memory); off runs everything in this process.
        include_base: evaluate the untouched model too (the reference row).
        progress: progress bars.
    """

    model: str
    out_dir: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    train_config: TrainConfig | None = None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    suites: list[str] = field(default_factory=lambda: list(DEFAULT_SUITES))
    limit: int | None = None
    max_new_tokens: int = 64
    eval_batch_size: int = 8
    utility_reply_tokens: int = 32
    speed: bool = True
    speed_rounds: int = 3
    speed_tokens: int = 64
    fold_precision: str = "keep"
    eval_backend: str = "torch"
    threads: int | None = None
    isolate: bool = True
    include_base: bool = True
    progress: bool = True
    log_level: int = logging.WARNING

    def validate(self) -> "BenchConfig":
        if not self.model:
            raise InputError("--model is required (an HF directory, a .gguf file, or smollm2)")
        if not self.methods:
            raise InputError("--methods: no method given")
        for m in self.methods:
            get_method(m)
        for m, opts in self.method_options.items():
            get_method(m).options(opts)  # unknown option names fail here, before any work
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be at least 1, got {self.limit}")
        if self.speed_rounds < 1 or self.speed_tokens < 1:
            raise InputError("--speed-rounds and --speed-tokens must be positive")
        if not self.suites:
            raise InputError("--suites: no suite given")
        if self.eval_backend not in EVAL_BACKENDS:
            raise InputError(f"--eval-backend {self.eval_backend!r}: expected one of {', '.join(EVAL_BACKENDS)}")
        from ..evaluate.suites import SUITES

        from .jobs import HELDOUT_SUITES

        for name in self.suites:  # before hours of training, not after
            if name not in SUITES and name not in HELDOUT_SUITES and not Path(name).exists():
                raise InputError(f"--suites: unknown suite {name!r}: not a file, and not one of "
                                 f"{', '.join(list(SUITES) + list(HELDOUT_SUITES))}")
            if name == "harmful-train":
                raise InputError("--suites: harmful-train needs a patch; every method has its own training set here")
        return self

    def shared_train_config(self) -> TrainConfig:
        """The training config every method shares: seed fixed (0 unless given) so reruns reproduce.

        A named model's recipe (:mod:`nestpatch.train.recipes`) is applied here, not only inside
        ``nestpatch train``: its data and step settings (prompts, steps, batch, sequence length,
        activation checkpointing) must be every method's, or the baselines would train on other
        sequences than NeST. Its ``lr`` is NeST's; each baseline keeps its own unless ``--lr`` sets it.
        """
        from ..train.recipes import apply_recipe

        tc = self.train_config or TrainConfig()
        over: dict[str, Any] = {"model": self.model, "out": str(Path(self.out_dir) / "nest" / "artifact" / "policy.nestpatch")}
        if tc.seed is None:
            over["seed"] = 0
        if self.threads:
            over["threads"] = int(self.threads)
        merged = tc.merged(over)
        return apply_recipe(merged)[0].resolved()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


# ------------------------------------------------------------------------------------------ running


def _job(cfg: BenchConfig, name: str, tc: TrainConfig) -> Job:
    ev = EvalSettings(limit=cfg.limit, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                      utility_reply_tokens=cfg.utility_reply_tokens, seed=int(tc.seed or 0), backend=cfg.eval_backend)
    opts = {} if name == BASE else get_method(name).options(cfg.method_options.get(name))
    return Job(method=name, model=cfg.model, out_dir=str(Path(cfg.out_dir) / name), train_config=tc.to_dict(), options=opts,
               suites=list(cfg.suites), eval=dataclasses.asdict(ev), data_cache=str(Path(cfg.out_dir) / DATA_CACHE),
               progress=cfg.progress, isolated=cfg.isolate, fold_precision=cfg.fold_precision, threads=cfg.threads)


def _check_identity(job: Job) -> None:
    """A finished method made with other settings is an error, not a silent mix of two runs."""
    d = job.dir
    if not (d / RESULT_FILE).exists() and not (d / "train.json").exists():
        return
    old = read_json(d / JOB_FILE)
    if old is None:
        return
    old_id, new_id = Job.from_dict(old).identity(), job.identity()
    for k in old_id:
        if json.dumps(old_id[k], sort_keys=True, default=str) != json.dumps(new_id[k], sort_keys=True, default=str):
            raise InputError(f"{d}: this method was run with other settings ({k} differs); delete {d} to redo it, "
                             "or use another bench directory")


def _run_isolated(spec: dict, spec_path: Path, label: str) -> None:
    write_json(spec_path, spec)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "nestpatch.baselines.worker", str(spec_path)], env=env)
    err = spec_path.with_suffix(".error")
    if proc.returncode == 2 and err.exists():
        raise InputError(f"{label}: {err.read_text(encoding='utf-8').strip()}")
    if proc.returncode != 0:
        raise TrainingError(f"{label}: its process failed (exit code {proc.returncode}); the traceback is above, "
                            f"finished stages are kept in {spec_path.parent} and a rerun resumes there")


def _same_setup(a: Job, b: Job) -> bool:
    keys = ("model", "train_config", "suites", "eval")
    da, db = a.identity(), b.identity()
    return all(json.dumps(da[k], sort_keys=True, default=str) == json.dumps(db[k], sort_keys=True, default=str) for k in keys)


def _with_earlier_methods(cfg: BenchConfig, tc: TrainConfig, results: dict[str, dict]) -> dict[str, dict]:
    """Add methods finished in this directory by earlier runs with the same setup (a table can be built in parts).

    Rows come in registry order after the base row.
    """
    from .registry import METHODS

    out = Path(cfg.out_dir)
    merged = dict(results)
    for name in METHODS:
        d = out / name
        if name in merged or not (d / RESULT_FILE).exists() or not (d / JOB_FILE).exists():
            continue
        old = Job.from_dict(read_json(d / JOB_FILE))
        if _same_setup(old, _job(cfg, name, tc)):
            merged[name] = read_json(d / RESULT_FILE)
        else:
            log.warning("%s: finished with another setup (model, data, suites or evaluation); left out of the table", d)
    order = [BASE] + list(METHODS)
    return {k: merged[k] for k in sorted(merged, key=lambda k: order.index(k) if k in order else len(order))}


def run_one(cfg: BenchConfig, job: Job) -> dict:
    """Run (or reuse) one job; returns its result."""
    _check_identity(job)
    job.dir.mkdir(parents=True, exist_ok=True)
    write_json(job.dir / JOB_FILE, job.to_dict())
    done = read_json(job.dir / RESULT_FILE)
    if done is not None and needs_refold(done.get("fold"), job):
        log.info("%s: folding again at precision %s (training and evaluation are reused)", job.method, job.fold_precision)
        done = None
    if done is not None:
        log.info("%s: finished earlier; reusing %s", job.method, job.dir / RESULT_FILE)
        return done
    t0 = time.perf_counter()
    if cfg.isolate:
        spec = {"kind": "job", "job": job.to_dict(), "log_level": cfg.log_level, "torch_threads": cfg.threads}
        _run_isolated(spec, job.dir / "worker.json", f"method {job.method}")
        result = read_json(job.dir / RESULT_FILE)
    else:
        result = run_job(job)
    log.info("%s: done in %.0f s", job.method, time.perf_counter() - t0)
    return result


def _earlier_speed(out: Path, results: dict[str, dict]) -> dict | None:
    """With ``--no-speed``: an earlier measurement, kept only for models folded before it was taken."""
    saved = read_json(out / SPEED_FILE)
    if not saved:
        return None
    when = (out / SPEED_FILE).stat().st_mtime
    keep = {n: v for n, v in saved.get("results", {}).items()
            if n == BASE or (n in results and (out / n / RESULT_FILE).exists() and (out / n / RESULT_FILE).stat().st_mtime <= when)}
    return {**saved, "results": keep}


def run_bench(cfg: BenchConfig) -> dict:
    """Run every method (resuming finished ones), measure speed, write the tables and the plot.

    Returns:
        The content of ``results.json``.

    Raises:
        InputError: bad settings, or a finished method whose settings differ.
        TrainingError: a method's process failed (finished stages are kept).
    """
    from .table import build_results, render_markdown, write_plot

    from ..assets import resolve_model

    cfg.validate()
    out = Path(cfg.out_dir)
    if not out.parent.exists():
        raise InputError(f"{out}: parent directory {out.parent} does not exist")
    # resolve the model once, before the bench directory exists: "-o smollm2 --model smollm2" must not
    # make the directory shadow the named model, and every job must load the very same file
    model_path = resolve_model(cfg.model).resolve()
    if not model_path.exists():
        raise InputError(f"{cfg.model}: no such model file or directory (or named model)")
    if model_path == out.resolve():
        raise InputError(f"{out}: the bench directory cannot be the model itself")
    if cfg.eval_backend == "llama":
        base_gguf(str(model_path))  # before any training
    cfg = dataclasses.replace(cfg, model=str(model_path))
    out.mkdir(exist_ok=True)
    tc = cfg.shared_train_config()
    names = ([BASE] if cfg.include_base else []) + list(cfg.methods)
    jobs = {name: _job(cfg, name, tc) for name in names}
    for job in jobs.values():  # before anything is written: a mismatch must not leave a half-updated directory
        _check_identity(job)
    write_json(out / BENCH_FILE, {"model": cfg.model, "methods": cfg.methods, "suites": cfg.suites, "limit": cfg.limit,
                                  "max_new_tokens": cfg.max_new_tokens, "eval_batch_size": cfg.eval_batch_size,
                                  "utility_reply_tokens": cfg.utility_reply_tokens, "eval_backend": cfg.eval_backend,
                                  "fold_precision": cfg.fold_precision,
                                  "method_options": {m: get_method(m).options(cfg.method_options.get(m)) for m in cfg.methods},
                                  "train_config": tc.to_dict(), "threads": cfg.threads, "isolate": cfg.isolate,
                                  "libraries": library_versions(), "machine": machine(),
                                  "command": " ".join(sys.argv) if sys.argv else None})
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for name, job in jobs.items():
        results[name] = run_one(cfg, job)
    results = _with_earlier_methods(cfg, tc, results)
    speed = None
    if cfg.speed:
        entries = {n: r["fold"] for n, r in results.items() if n != BASE and r.get("fold")}
        spec = {"kind": "speed", "bench_dir": str(out), "entries": entries, "base": cfg.model, "threads": cfg.threads,
                "rounds": cfg.speed_rounds, "new_tokens": cfg.speed_tokens, "log_level": cfg.log_level, "torch_threads": cfg.threads,
                "device": tc.device}
        if cfg.isolate:
            _run_isolated(spec, out / "speed.worker.json", "speed measurement")
            speed = read_json(out / SPEED_FILE)
        else:
            speed = speed_stage(out, entries, base=cfg.model, threads=cfg.threads, rounds=cfg.speed_rounds, new_tokens=cfg.speed_tokens,
                                device=tc.device)
    elif (out / SPEED_FILE).exists():
        speed = _earlier_speed(out, results)
    table = build_results(cfg, results, speed, bench=read_json(out / BENCH_FILE))
    table["wall_seconds_this_run"] = round(time.perf_counter() - t0, 1)
    write_json(out / RESULTS_JSON, table)
    with atomic_path(out / RESULTS_MD) as tmp:
        tmp.write_text(render_markdown(table), encoding="utf-8")
    write_plot(table, out / PLOT_FILE)
    return table


__all__ = ["BenchConfig", "run_bench", "speed_stage", "DEFAULT_METHODS", "DEFAULT_SUITES", "FOLDED_GGUF"]
