"""One bench job: train a method, evaluate its folded form, fold it into the base's file format.

A job is plain JSON (``job.json`` in the method's directory) so it can run in a process of its
own (:mod:`nestpatch.baselines.worker`), which makes the peak memory figure the method's own.
Each stage writes its output atomically and is skipped when that output exists, so an
interrupted bench resumes where it stopped:

    METHOD/train.json        after training (artifact under METHOD/artifact/)
    METHOD/eval/             generation suites on the trained model (variant ``patched``)
    METHOD/eval-utility/     KL and perplexity, base vs trained
    METHOD/fold.json         after writing METHOD/folded.gguf (or METHOD/folded/ for HF bases)
    METHOD/result.json       everything above, for the table

With ``--eval-backend llama`` the fold comes first and both evaluations run on ``folded.gguf`` in
llama.cpp (the KL against the base GGUF), so the table describes the file a release ships; their
directories are ``eval-folded-PRECISION/`` and ``eval-utility-folded-PRECISION/``, one per fold.

The ``base`` job evaluates the untouched model on the generation suites (its KL is 0).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import InputError
from ..models.files import is_gguf
from ..train.config import TrainConfig
from .common import TRAIN_FILE, MethodContext, RssSampler, TrainOutcome, peak_rss_mb
from .registry import get_method

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
FOLD_FILE = "fold.json"
EVAL_DIR = "eval"
UTILITY_DIR = "eval-utility"
FOLDED_GGUF = "folded.gguf"
FOLDED_HF = "folded"
BASE = "base"
TRAINED = "patched"
HELDOUT_SUITE = "harmful-heldout"
#: The bench's own validation suites (held-out splits of the project's prompts, never trained on):
#: a baseline's settings (circuit breakers' learning rate) are chosen on these, never on test suites.
HELDOUT_SUITES = {
    HELDOUT_SUITE: ("harmful", "builtin-harmful-heldout", "nestpatch's harmful prompts, held-out split (not in any training set)"),
    "benign-heldout": ("benign", "builtin-benign-heldout", "nestpatch's benign prompts, held-out split (benign refusal on validation)"),
    "utility-heldout": ("utility", "builtin-benign-heldout", "KL to the base on the benign held-out prompts (no perplexity texts)"),
}
#: Settings that must match for a finished method to be reused on a rerun.
IDENTITY_KEYS = ("method", "model", "train_config", "options", "suites", "eval")


@dataclass
class EvalSettings:
    """Evaluation settings shared by every job of a bench."""

    limit: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 8
    utility_reply_tokens: int = 32
    seed: int = 0
    #: ``torch``: the trained model in float32 (the method as trained); ``llama``: its folded GGUF in
    #: llama.cpp, the file a release ships (the issue's targets are measured this way).
    backend: str = "torch"


@dataclass
class Job:
    """Everything one method's process needs (JSON-serializable)."""

    method: str
    model: str
    out_dir: str
    train_config: dict
    options: dict = field(default_factory=dict)
    suites: list[str] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    data_cache: str | None = None
    progress: bool = False
    fold: bool = True
    fold_precision: str = "keep"  # types of the changed tensors in folded.gguf (nestpatch apply's --precision)
    threads: int | None = None  # llama.cpp threads of the llama evaluation
    isolated: bool = False  # running in a process of its own: ru_maxrss is this method's peak

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def identity(self) -> dict:
        """The settings a finished method must share with a rerun.

        The training config goes through :class:`TrainConfig` first, so an option added since
        the method ran counts at its default instead of as a difference.
        """
        d = self.to_dict()
        d["train_config"] = TrainConfig.from_dict(d["train_config"], label=f"{self.out_dir}/{JOB_FILE}").to_dict()
        d["eval"] = asdict(EvalSettings(**{k: v for k, v in d["eval"].items() if k in EvalSettings.__dataclass_fields__}))
        return {k: d[k] for k in IDENTITY_KEYS}

    @property
    def dir(self) -> Path:
        return Path(self.out_dir)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise InputError(f"{path}: not valid JSON (delete it to redo that stage)") from None


# ------------------------------------------------------------------------------------------ suites


def heldout_suite(name: str = HELDOUT_SUITE) -> Any:
    """One of :data:`HELDOUT_SUITES`: a held-out split of the project's prompts as a suite."""
    from ..data import load_prompts
    from ..evaluate.suites import Sample, Suite

    kind, source, description = HELDOUT_SUITES[name]
    ps = load_prompts(source)
    prefix = "heldout" if name == HELDOUT_SUITE else name  # harmful-heldout's ids predate the others: kept for resume
    samples = [Sample(f"{prefix}:{i:05d}", p, (m or {}).get("category")) for i, (p, m) in enumerate(zip(ps.prompts, ps.meta))]
    return Suite(name, kind, samples, [{"source": ps.source, "path": str(ps.path), "sha256": ps.sha256, "rows": ps.rows,
                                        "prompts": len(ps.prompts)}], description=description)


def load_bench_suites(names: list[str]) -> tuple[list[Any], list[Any]]:
    """``(generation suites, utility suites)`` by name (the :data:`HELDOUT_SUITES` are the bench's own)."""
    from ..evaluate.suites import load_suite

    gen, util = [], []
    for n in names:
        s = heldout_suite(n) if n in HELDOUT_SUITES else load_suite(n)
        (util if s.kind == "utility" else gen).append(s)
    return gen, util


# ------------------------------------------------------------------------------------------ stages


def _options(job: Job) -> Any:
    from ..evaluate.runner import EvalOptions

    e = EvalSettings(**job.eval)
    return EvalOptions(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, limit=e.limit, seed=e.seed,
                       utility_reply_tokens=e.utility_reply_tokens, progress=job.progress, resume=True, n_threads=job.threads)


def _evaluate(lm: Any, suites: list[Any], variants: dict[str, Any], out: Path, job: Job) -> dict:
    from ..evaluate.runner import SUMMARY_FILE, evaluate_torch_model

    done = read_json(out / SUMMARY_FILE)
    if done is not None:
        return done
    opts = _options(job)
    opts.resume = (out / "run.json").exists()
    info = {"name": str(lm.source), "path": str(lm.source), "sha256": None, "method": job.method}
    return evaluate_torch_model(lm.model, suites, tokenizer=lm.tokenizer, out_dir=out, variants=variants, model_info=info,
                                options=opts)


def _evaluate_gguf(path: Path, suites: list[Any], out: Path, job: Job, reference: Path | None = None) -> dict:
    """The suites on a GGUF file in llama.cpp (variant ``base``; with ``reference``, that file is ``base``
    and ``path`` is ``patched``, for the KL and flips against it)."""
    from ..evaluate.runner import SUMMARY_FILE, run_suites

    done = read_json(out / SUMMARY_FILE)
    if done is not None:
        return done
    opts = _options(job)
    opts.resume = (out / "run.json").exists()
    opts.reference = str(reference) if reference is not None else None
    return run_suites(path, suites=suites, backend="llama", out_dir=out, options=opts)


def base_gguf(model: str) -> Path:
    """The base model (path or named model) as a GGUF file, which ``--eval-backend llama`` needs."""
    from ..assets import resolve_model

    path = resolve_model(model)
    if not (path.is_file() and is_gguf(path)):
        raise InputError(f"{model}: --eval-backend llama evaluates folded GGUF files, so the base must be a .gguf file")
    return path


def _cuda() -> Any:
    """``torch.cuda`` when a GPU is in use, else None (peak GPU memory is then recorded too)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch.cuda if torch.cuda.is_available() else None


def train_stage(job: Job) -> TrainOutcome:
    d = job.dir
    saved = read_json(d / TRAIN_FILE)
    if saved is not None:
        return TrainOutcome.from_dict(saved)
    m = get_method(job.method)
    ctx = MethodContext(method=m.name, train_config=TrainConfig.from_dict(job.train_config), options=m.options(job.options),
                        out_dir=d, data_cache=Path(job.data_cache) if job.data_cache else None, progress=job.progress)
    log.info("training %s", m.name)
    gpu = _cuda()
    if gpu is not None:
        gpu.reset_peak_memory_stats()
    with RssSampler() as rss:
        outcome = m.train(ctx)
    if gpu is not None:
        outcome.details["peak_gpu_mb"] = round(gpu.max_memory_allocated() / (1 << 20), 1)
    if not job.isolated:  # the process's own peak covers earlier work too: use the sampled peak of this block
        outcome.peak_rss_mb = round(rss.peak_mb, 1)
    outcome.details["peak_rss_source"] = "ru_maxrss of the method's own process" if job.isolated else "sampled every 50 ms in-process"
    write_json(d / TRAIN_FILE, outcome.to_dict())
    return outcome


def needs_refold(fold: dict | None, job: Job) -> bool:
    """A GGUF fold written at another precision than ``job`` asks for (folds from before the option are ``keep``)."""
    return bool(job.fold and fold and fold.get("kind") == "gguf" and fold.get("precision", "keep") != job.fold_precision)


def _fold(job: Job, lm: Any, merged: Any) -> dict:
    from .fold import fold_into_gguf, fold_into_hf_dir

    d = job.dir
    saved = read_json(d / FOLD_FILE)
    if saved is not None and not needs_refold(saved, job):
        return saved
    t0 = time.perf_counter()
    src = Path(lm.source)
    info: dict[str, Any]
    if src.is_file() and is_gguf(src):
        try:
            info = {"kind": "gguf", "path": str(d / FOLDED_GGUF), **fold_into_gguf(src, lm.model, merged, d / FOLDED_GGUF,
                                                                                 precision=job.fold_precision)}
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - unsupported GGUF layouts fall back to an HF directory
            log.warning("cannot fold into %s (%s); writing an HF directory instead", src, e)
            info = {"kind": "hf", "path": str(d / FOLDED_HF), "reason": str(e), **fold_into_hf_dir(merged, lm.tokenizer, d / FOLDED_HF)}
    else:
        info = {"kind": "hf", "path": str(d / FOLDED_HF), **fold_into_hf_dir(merged, lm.tokenizer, d / FOLDED_HF)}
    info["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(d / FOLD_FILE, info)
    return info


def _load_for_eval(job: Job) -> tuple[Any, list, list]:
    """The job's model on its training config's device, and its bench suites.

    One place for both, so the base and every method are evaluated on the same device and suites.

    Returns:
        ``(loaded_model, generation_suites, utility_suites)`` as :func:`load_bench_suites` splits them.
    """
    from ..models.loading import load_model

    cfg = TrainConfig.from_dict(job.train_config)
    lm = load_model(job.model, device=cfg.device)
    gen, util = load_bench_suites(job.suites)
    return lm, gen, util


def method_job(job: Job) -> dict:
    """Train (or reuse the training), evaluate and fold one method; write and return ``result.json``."""
    d = job.dir
    outcome = train_stage(job)
    gc.collect()  # the training model is gone before the evaluation model loads
    m = get_method(job.method)
    if EvalSettings(**job.eval).backend == "llama":
        return _method_job_llama(job, outcome, m)
    lm, gen, util = _load_for_eval(job)
    merged = m.load_merged(lm, outcome)
    t0 = time.perf_counter()
    summary = _evaluate(lm, gen, {TRAINED: lambda: contextlib.nullcontext(merged)}, d / EVAL_DIR, job) if gen else None
    usum = (_evaluate(lm, util, {BASE: contextlib.nullcontext, TRAINED: lambda: contextlib.nullcontext(merged)}, d / UTILITY_DIR, job)
            if util else None)
    eval_s = round(time.perf_counter() - t0, 3)
    fold = _fold(job, lm, merged) if job.fold else None
    return _write_method_result(job, m, outcome, _metrics(summary, usum, TRAINED), eval_s, fold)


def _write_method_result(job: Job, m: Any, outcome: TrainOutcome, metrics: dict, eval_s: float, fold: dict | None) -> dict:
    """One method's ``result.json`` (whichever backend measured it), written and returned."""
    result = {"method": m.name, "label": m.label, "description": m.description, "train": outcome.to_dict(),
              "eval": metrics, "eval_seconds": eval_s, "fold": fold, "job": job.identity(),
              "eval_peak_rss_mb": round(peak_rss_mb(), 1)}
    write_json(job.dir / RESULT_FILE, result)
    return result


def _method_job_llama(job: Job, outcome: TrainOutcome, m: Any) -> dict:
    """``--eval-backend llama``: fold first, then evaluate the folded GGUF in llama.cpp (KL against the base file)."""
    d = job.dir
    base_path = base_gguf(job.model)
    fold = read_json(d / FOLD_FILE)
    if fold is None or needs_refold(fold, job):
        lm, gen, util = _load_for_eval(job)
        fold = _fold(job, lm, m.load_merged(lm, outcome))
        del lm
        gc.collect()  # llama.cpp's copies of the models replace torch's
    else:
        gen, util = load_bench_suites(job.suites)
    if fold.get("kind") != "gguf":
        raise InputError(f"{base_path}: {job.method} could not be folded into this GGUF ({fold.get('reason')}); "
                         "evaluate it with --eval-backend torch")
    folded = Path(fold["path"])
    t0 = time.perf_counter()
    tag = f"-folded-{job.fold_precision}"  # one evaluation per folded file: a refold at another precision is measured anew
    summary = _evaluate_gguf(folded, gen, d / (EVAL_DIR + tag), job) if gen else None
    usum = _evaluate_gguf(folded, util, d / (UTILITY_DIR + tag), job, reference=base_path) if util else None
    eval_s = round(time.perf_counter() - t0, 3)
    return _write_method_result(job, m, outcome, _metrics(summary, usum, TRAINED, generation_variant=BASE), eval_s, fold)


def base_job(job: Job) -> dict:
    """Evaluate the untouched model on the generation suites; write and return ``result.json``."""
    d = job.dir
    if EvalSettings(**job.eval).backend == "llama":
        gen, _ = load_bench_suites(job.suites)
        t0 = time.perf_counter()
        summary = _evaluate_gguf(base_gguf(job.model), gen, d / EVAL_DIR, job) if gen else None
    else:
        lm, gen, _ = _load_for_eval(job)
        t0 = time.perf_counter()
        summary = _evaluate(lm, gen, {BASE: contextlib.nullcontext}, d / EVAL_DIR, job) if gen else None
    metrics = _metrics(summary, None, BASE)
    metrics["kl"] = 0.0  # the reference itself
    result = {"method": BASE, "label": "Base (no training)", "description": "the model as given", "train": None,
              "eval": metrics, "eval_seconds": round(time.perf_counter() - t0, 3), "fold": None, "job": job.identity(),
              "eval_peak_rss_mb": round(peak_rss_mb(), 1)}
    write_json(d / RESULT_FILE, result)
    return result


def _metrics(summary: dict | None, usum: dict | None, variant: str, generation_variant: str | None = None) -> dict:
    """The table's evaluation figures from evaluation summaries.

    ``variant`` names the trained model in both; ``generation_variant`` overrides it in ``summary``
    (a folded GGUF evaluated on its own is that run's only variant, ``base``).
    """
    out: dict[str, Any] = {"asr": {}, "n": {}, "judge": None}
    if summary is not None:
        out["judge"] = summary.get("judge")
        for name, s in summary["suites"].items():
            v = s.get(generation_variant or variant, {})
            if s["kind"] == "harmful":
                out["asr"][name] = v.get("asr")
            elif s["kind"] == "benign":
                out["benign_refusal"] = v.get("benign_refusal")
            elif s["kind"] == "overrefusal":
                out["over_refusal"] = v.get("over_refusal")
            out["n"][name] = v.get("n")
        out["libraries"] = summary.get("libraries")
        out["decoding"] = summary.get("decoding")
    if usum is not None:
        h = usum.get("headline", {}).get(variant, {})
        out["kl"] = h.get("kl")
        out["ppl"] = h.get("ppl")
        out["top1_agreement"] = h.get("top1_agreement")
        base_h = usum.get("headline", {}).get(BASE, {})
        out["ppl_base"] = base_h.get("ppl")
        for name, s in usum["suites"].items():
            out["n"][name] = s.get("n")
    return out


def run_job(job: Job) -> dict:
    """Run ``job`` in this process; a finished job's ``result.json`` is returned as it is."""
    job.dir.mkdir(parents=True, exist_ok=True)
    done = read_json(job.dir / RESULT_FILE)
    if done is not None and not needs_refold(done.get("fold"), job):
        return done
    return base_job(job) if job.method == BASE else method_job(job)
