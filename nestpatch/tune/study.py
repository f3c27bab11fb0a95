"""``nestpatch tune``: a multi-objective Optuna search for the recipe of one model.

Each trial samples TrainConfig overrides from the :mod:`~nestpatch.tune.space`, trains a patch
on the loaded model (:class:`~nestpatch.tune.session.TrainSession`: model, activations,
selections and training sequences cached across trials) and measures it on the validation sets
(:mod:`~nestpatch.tune.validation`). Objectives, all minimised: ASR, benign refusal, KL to base.

The output directory holds everything, so a second call with the same directory resumes:

    study.journal      Optuna's journal storage (finished trials are never rerun)
    trials.jsonl       one line per finished trial: params, metrics, timings, or the error
    trials/NNNN.*      each trial's patch, resolved train.toml and training log (first seed)
    trials/NNNN-sK.*   the same for seed K when trials train several seeds (``--seeds``)
    base.json          the base model's validation figures (measured once)
    pareto.md          the Pareto front as a table (plus the base), the chosen trial marked
    pareto.png         ASR vs benign refusal of every trial, the front coloured by KL
    train.toml         the chosen trial's config, usable with ``nestpatch train --config``

The chosen trial is the front's minimum of ``asr + benign_refusal + kl`` (all three are rates or
nats on comparable scales at the targets; ties go to the lower trial number). With ``--seeds N``
every trial trains and validates N seeds and its objectives are their means (:func:`pool_seeds`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_bytes_atomic
from ..errors import InputError, NestpatchError
from ..format import write_patch
from ..train.config import TrainConfig
from ..train.recipes import apply_recipe
from .options import SAMPLERS, TuneOptions, ValidationOptions  # noqa: F401  (re-exported: the study's API)
from .session import TrainSession
from .space import SearchSpace, load_space
from .validation import Validator, validation_sets

log = logging.getLogger(__name__)

OBJECTIVES = ("asr", "benign_refusal", "kl")
STUDY_NAME = "nestpatch-tune"


@dataclass
class TuneResult:
    """What the CLI prints."""

    out: Path
    finished: int
    ran_now: int
    front: list[dict] = field(default_factory=list)
    chosen: dict | None = None
    base: dict = field(default_factory=dict)


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)]


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def open_study(out: Path, opts: TuneOptions) -> tuple[Any, Any]:
    """The study in ``out/study.journal`` (created or resumed) and its storage."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    # resumed studies reseed the sampler past the trials already drawn, so no earlier trial is drawn again
    probe = optuna.load_study(study_name=STUDY_NAME, storage=storage) if _exists(storage) else None
    done = len(probe.get_trials(deepcopy=False)) if probe is not None else 0
    seed = opts.seed + 7919 * done
    if opts.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, opts.population))
    elif opts.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, opts.population))
    else:
        raise InputError(f"--sampler {opts.sampler!r} invalid; expected one of {', '.join(SAMPLERS)}")
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, directions=["minimize"] * 3,
                                load_if_exists=True)
    for t in study.get_trials(deepcopy=False):  # one process per directory: a RUNNING trial is a killed run's
        if t.state == TrialState.RUNNING:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            log.warning("trial %d was interrupted; marked failed", t.number)
    return study, storage


def _exists(storage: Any) -> bool:
    return any(s.study_name == STUDY_NAME for s in storage.get_all_studies())


def objective_sum(metrics: dict) -> float:
    """``asr + benign_refusal + kl``: how ``tune`` picks its trial and ``select`` its patch (all three are to be small)."""
    return sum(float(metrics[k]) for k in OBJECTIVES)


def choose(front: list[dict]) -> dict | None:
    """The front's trial with the smallest :func:`objective_sum` (lowest number on ties)."""
    if not front:
        return None
    return min(front, key=lambda r: (objective_sum(r["metrics"]), r["trial"]))


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * float(x):.1f}%" if pct else (f"{x:.4f}" if isinstance(x, float) else str(x))


def pareto_table(front: list[dict], chosen: dict | None, base: dict, params: list[str], sets: list[str]) -> str:
    """Markdown table of the front (and the base model) with validation figures and each trial's parameters.

    When trials train several seeds (``--seeds``) their figures are means, and the worst seed's ASR
    and benign refusal and the ASR spread get columns of their own.
    """
    seeded = any("asr_worst" in r["metrics"] for r in front)
    worst = ["ASR worst seed", "ASR spread", "benign refusal worst seed"] if seeded else []
    head = ["trial", "ASR", "benign refusal", "KL"] + worst + sets + ["neurons", "params", "train s"] + params
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base:
        lines.append("| base | " + " | ".join([_fmt(base.get("asr"), True), _fmt(base.get("benign_refusal"), True), "0"]
                                                + ["-"] * len(worst) + [_fmt(base.get(s), True) for s in sets]
                                                + ["-"] * (3 + len(params))) + " |")
    for r in sorted(front, key=lambda r: r["metrics"]["asr"]):
        m = r["metrics"]
        mark = f"**{r['trial']}** (chosen)" if chosen is not None and r["trial"] == chosen["trial"] else str(r["trial"])
        cells = [mark, _fmt(m["asr"], True), _fmt(m["benign_refusal"], True), _fmt(float(m["kl"]))]
        if seeded:
            cells += [_fmt(m.get("asr_worst"), True), _fmt(m.get("asr_spread"), True), _fmt(m.get("benign_refusal_worst"), True)]
        cells += [_fmt(m.get(s), True) for s in sets]
        cells += [str(r.get("neurons", "-")), str(r.get("trainable_parameters", "-")), f"{r.get('timings', {}).get('train_s', 0):.0f}"]
        shown = {p: r.get("config", {}).get(p) if not isinstance(r.get("config", {}).get(p, []), list) else r["params"].get(p)
                 for p in params}  # the value trained with (k_min is clamped to k_max), list fields as sampled
        cells += [f"{v:.4g}" if isinstance(v, float) else _fmt(v) for v in shown.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(path: Path, records: list[dict], front: list[dict], chosen: dict | None, base: dict) -> bool:
    """ASR vs benign refusal, every trial in grey, the front coloured by KL; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (nestpatch[audit]); no %s", path.name)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ok = [r for r in records if "metrics" in r]
    ax.scatter([100 * r["metrics"]["benign_refusal"] for r in ok], [100 * r["metrics"]["asr"] for r in ok], c="0.8", s=18,
               label="trials")
    if front:
        sc = ax.scatter([100 * r["metrics"]["benign_refusal"] for r in front], [100 * r["metrics"]["asr"] for r in front],
                        c=[float(r["metrics"]["kl"]) for r in front], cmap="viridis", s=46, edgecolors="k", label="Pareto front")
        fig.colorbar(sc, ax=ax, label="KL to base (nats)")
        for r in front:
            ax.annotate(str(r["trial"]), (100 * r["metrics"]["benign_refusal"], 100 * r["metrics"]["asr"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if chosen is not None:
        ax.scatter([100 * chosen["metrics"]["benign_refusal"]], [100 * chosen["metrics"]["asr"]], marker="o", s=160,
                   facecolors="none", edgecolors="r", label="chosen")
    if base:
        ax.scatter([100 * base["benign_refusal"]], [100 * base["asr"]], marker="*", s=140, c="r", label="base model")
    ax.set_xlabel("benign refusal on validation (%)")
    ax.set_ylabel("ASR on validation (%)")
    ax.set_title("nestpatch tune: validation trade-off")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def read_records(path: Path) -> list[dict]:
    """The trials.jsonl lines (the last line of a trial wins)."""
    if not path.exists():
        return []
    by: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            by[int(r["trial"])] = r
    return [by[k] for k in sorted(by)]


def write_outputs(out: Path, study: Any, space: SearchSpace, base: dict, base_cfg: TrainConfig,
                  seeds: list[int] | None = None) -> tuple[list[dict], dict | None]:
    """pareto.md, pareto.png and train.toml from the study's finished trials (``seeds``: each trial's training seeds)."""
    seeds = seeds or [int(base_cfg.seed or 0)]
    records = {r["trial"]: r for r in read_records(out / "trials.jsonl")}
    front = [records[t.number] for t in study.best_trials if t.number in records and "metrics" in records[t.number]] \
        if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) else []
    chosen = choose(front)
    sets = [k for k in (base or {}) if k not in OBJECTIVES and k not in ("seconds", "prefill_asr")]  # refusal rate per set
    params = sorted(space.searched)
    write_bytes_atomic(out / "pareto.md", (
        f"# nestpatch tune: Pareto front ({len(front)} of {len(records)} trials)\n\n"
        "Validation sets only (HarmBench validation, held-out built-in splits, built-in edgy held-out). "
        "Objectives minimised: ASR, benign refusal (benign + edgy), KL to base. Chosen: min ASR + benign refusal + KL."
        + (f" Each trial's figures are the means over seeds {seeds}; neurons, params and train s are seed {seeds[0]}'s."
           if len(seeds) > 1 else "") + "\n\n"
        + pareto_table(front, chosen, base, params, sets)).encode("utf-8"))
    pareto_plot(out / "pareto.png", list(records.values()), front, chosen, base)
    if chosen is not None:
        cfg = TrainConfig.from_dict(chosen["config"], f"trial {chosen['trial']}")
        cfg = dataclasses.replace(cfg, out=str(out / "tuned.nestpatch"), resume=False)
        m = chosen["metrics"]
        over = f" (means over seeds {seeds}; worst seed ASR {m['asr_worst']:.4f})" if "asr_worst" in m else ""
        head = (f"# chosen by nestpatch tune: trial {chosen['trial']} of {out}\n"
                f"# validation: ASR {m['asr']:.4f}, benign refusal {m['benign_refusal']:.4f}, KL {float(m['kl']):.5f}{over}\n")
        write_bytes_atomic(out / "train.toml", (head + cfg.to_toml()).encode("utf-8"))
    return front, chosen


def trial_seeds(opts: TuneOptions) -> list[int]:
    """The training seeds of every trial: ``--seed`` and the ``--seeds - 1`` after it."""
    return [opts.seed + i for i in range(opts.seeds)]


def pool_seeds(per_seed: list[dict]) -> dict:
    """One trial's metrics over its seeds: each figure's mean, and for the objectives the worst seed and the spread.

    Why the mean is the objective: on every model measured here one recipe's seeds differ by up to
    19 points of HarmBench ASR (docs/RESULTS.md), so a one-seed trial ranks luck as much as the
    recipe. The worst seed and the spread (max - min) are kept for the front and the report.
    """
    if len(per_seed) == 1:
        return dict(per_seed[0])
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        vals = [float(m[key]) for m in per_seed if key in m and m[key] is not None and not math.isnan(float(m[key]))]
        out[key] = round(sum(vals) / len(vals), 5) if vals else float("nan")
    out["seconds"] = round(sum(float(m.get("seconds", 0.0)) for m in per_seed), 1)
    for key in OBJECTIVES:
        vals = [float(m[key]) for m in per_seed if not math.isnan(float(m[key]))]
        if vals:
            worst = max(vals)
            out[f"{key}_worst"], out[f"{key}_spread"] = round(worst, 5), round(worst - min(vals), 5)
    return out


def check_llama_model(path: str | Path) -> None:
    """Validation in llama.cpp folds each patch into the model's GGUF: refuse any other model before it is loaded."""
    from ..models.files import is_gguf

    if not (Path(path).is_file() and is_gguf(path)):
        raise InputError(f"{path}: --backend llama validates in llama.cpp and needs a GGUF model (a .gguf file or a named model)")


#: TuneOptions fields that decide what a trial's metrics mean: a resumed study must keep them.
MEASURE_FIELDS = ("backend", "tokens", "limit", "seed", "seeds", "kl_prompts", "kl_tokens", "prefill_validation")


def check_measures(out: Path, opts: TuneOptions) -> None:
    """Record the validation settings of a new study; refuse to resume one measured otherwise.

    Why: trials measured with another backend, reply length or sample are not comparable, and a
    front built from both would rank them as if they were.
    """
    path = out / "validation.json"
    now = {k: getattr(opts, k) for k in MEASURE_FIELDS}
    if not path.exists():
        write_bytes_atomic(path, json.dumps(now, indent=2).encode("utf-8"))
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in MEASURE_FIELDS if before.get(k, now[k]) != now[k]]
    if changed:
        raise InputError(f"{out}: the study was validated otherwise ({'; '.join(changed)}); resume it with the same "
                         f"settings or use another directory")


def make_validator(sets: list, opts: ValidationOptions, *, source: str | Path, lm: Any = None, threads: int = 0) -> Validator:
    """The validator ``opts.backend`` names: on the GGUF file ``source`` (llama) or the loaded model ``lm`` (torch).

    The caller checks first that ``source`` is a GGUF for llama (:func:`check_llama_model`).
    """
    measures = {"tokens": opts.tokens, "kl_prompts": opts.kl_prompts, "kl_tokens": opts.kl_tokens}
    if opts.backend == "llama":
        return Validator.on_llama(source, sets, batch_size=opts.batch_size, n_threads=threads or None, **measures)
    if lm is None:
        raise ValueError("torch validation needs the loaded model")
    return Validator.on_torch(lm.model, lm.tokenizer, sets, batch_size=opts.batch_size, **measures)


def run_tune(model: str, out: str | Path, opts: TuneOptions, base_cfg: TrainConfig | None = None,
             progress: Callable[[str], None] | None = None) -> TuneResult:
    """Run (or resume) a study in ``out`` until it has ``opts.trials`` finished trials or ``opts.timeout`` passes.

    Args:
        base_cfg: fixed settings for every trial (``--config``); the space's samples override them.
        progress: called with one line per finished trial.
    """
    import optuna

    out = Path(out)
    if not out.parent.exists():
        raise InputError(f"{out}: parent directory {out.parent} does not exist")
    if opts.trials < 1:
        raise InputError(f"--trials must be at least 1, got {opts.trials}")
    if opts.seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {opts.seeds}")
    (out / "trials").mkdir(parents=True, exist_ok=True)
    base_cfg = dataclasses.replace(base_cfg or TrainConfig(), model=model, seed=opts.seed, resume=False,
                                   out=str(out / "trials" / "base.nestpatch"))
    base_cfg, _ = apply_recipe(base_cfg)  # a named model's recipe is the starting point, as in `train` (fixed settings win)
    base_cfg.resolved()  # bad fixed settings fail now, not at trial 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if opts.backend == "llama":
        from ..assets import resolve_model

        check_llama_model(resolve_model(model))
    check_measures(out, opts)
    session = TrainSession(model, device=base_cfg.device, device_map=base_cfg.device_map, cache_dir=out / "cache")
    n_layers = int(session.lm.model.config.num_hidden_layers)
    space = SearchSpace(load_space(opts.space), n_layers)
    base_cfg = base_cfg.merged(space.fixed)
    sets = validation_sets(opts.limit, opts.seed, prefill=opts.prefill_validation)
    validator = make_validator(sets, opts, source=session.lm.source, lm=session.lm, threads=base_cfg.threads)
    base_path = out / "base.json"
    if base_path.exists():
        base = json.loads(base_path.read_text(encoding="utf-8"))
    else:
        base = validator.measure(None)
        write_bytes_atomic(base_path, json.dumps(base, indent=2).encode("utf-8"))
    if progress:
        progress("base: " + ", ".join(f"{k} {v}" for k, v in base.items()))

    study, _ = open_study(out, opts)
    if opts.enqueue_defaults and not study.get_trials(deepcopy=False):
        study.enqueue_trial(space.params_of(base_cfg), skip_if_exists=True)
    jsonl = out / "trials.jsonl"
    seeds = trial_seeds(opts)

    def objective(trial: Any) -> tuple[float, float, float]:
        t0 = time.time()
        n = trial.number
        rec: dict[str, Any] = {"trial": n, "params": dict(trial.params)}
        try:
            overrides = space.sample(trial)
            rec["params"] = dict(trial.params)
            runs, per_seed = [], []
            for seed in seeds:
                # the first seed's files keep the plain name: train.toml (seed = --seed) reproduces that patch
                stem = out / "trials" / (f"{n:04d}" if seed == opts.seed else f"{n:04d}-s{seed}")
                cfg = base_cfg.merged({**overrides, "seed": seed, "out": str(stem) + ".nestpatch"})
                run = session.train(cfg, log_path=str(stem) + ".train.jsonl")
                write_patch(run.patch, Path(str(stem) + ".nestpatch"))
                write_bytes_atomic(Path(str(stem) + ".train.toml"), run.config.to_toml().encode("utf-8"))
                runs.append(run)
                per_seed.append(validator.measure(run.patch))
            run = runs[0]
            metrics = pool_seeds(per_seed)
            rec.update(metrics=metrics, neurons=run.neurons, trainable_parameters=run.patch.trainable_parameters,
                       clusters=run.patch.n_clusters, config=run.config.to_dict(), timings=run.timings,
                       final_loss=run.summary.final, seconds=round(time.time() - t0, 1))
            if len(runs) > 1:
                rec.update(seeds=seeds, per_seed=per_seed, neurons_per_seed=[r.neurons for r in runs])
        except NestpatchError as e:
            rec.update(error=str(e), seconds=round(time.time() - t0, 1))
            _append_jsonl(jsonl, rec)
            if progress:
                progress(f"trial {n}: failed: {e}")
            raise
        _append_jsonl(jsonl, rec)
        if progress:
            m = rec["metrics"]
            worst = f" (worst seed {m['asr_worst']:.3f}, spread {m['asr_spread']:.3f})" if "asr_worst" in m else ""
            progress(f"trial {n}: ASR {m['asr']:.3f}{worst}, benign refusal {m['benign_refusal']:.3f}, KL {m['kl']:.4f} "
                     f"({rec['neurons']} neurons, {rec['seconds']:.0f} s) {rec['params']}")
        kl = float(metrics["kl"])
        return float(metrics["asr"]), float(metrics["benign_refusal"]), 0.0 if math.isnan(kl) else kl

    before = len(_finished(study))
    todo = max(0, opts.trials - before)
    if todo:
        # the front, plot and chosen config are rewritten after every trial: an interrupted study still has them
        study.optimize(objective, n_trials=todo, timeout=opts.timeout, catch=(NestpatchError,), gc_after_trial=True,
                       callbacks=[lambda st, _t: write_outputs(out, st, space, base, base_cfg, seeds)])
    finished = len(_finished(study))
    front, chosen = write_outputs(out, study, space, base, base_cfg, seeds)
    return TuneResult(out, finished, finished - before, front, chosen, base)
