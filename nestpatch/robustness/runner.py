"""``nestpatch robustness``: run every white-box attack against every safety update, evaluate each.

For each safety update (the base, the patch, baselines) the runner folds the update into a copy
of the base, evaluates it as is, then after each attack at each strength, with the same suites,
judges and decoding as ``nestpatch eval`` (each evaluation is an ordinary eval run directory
under ``RUNDIR/evals/<update>/<attack>-<strength>``). Everything the attacks need that an
attacker would generate (the complying answers of the fine-tuning attack) is written only under
``RUNDIR/attack_data``.

Results: ``results.json`` (every point, the chosen ablation layers, the pruning order and the
fine-tuning losses, the cost to remove), ``results.md``, one plot per suite and ``samples.jsonl``
(every judged reply, tagged with update, attack and strength). With ``resume`` a finished
evaluation point is read back instead of run again.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..atomic import atomic_path
from ..errors import InputError
from .options import ATTACKS, FinetuneConfig, RobustnessOptions  # noqa: F401  (their home; re-exported here)
from .updates import BASE, SafetyUpdate

log = logging.getLogger(__name__)

SCHEMA = "nestpatch.robustness/1"
SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "attack_data/harmful_pairs.jsonl"
#: The evaluation variant name inside each eval run directory.
VARIANT = "model"
NONE = "none"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")


@dataclass
class _Prompts:
    harmful: list[str]
    harmless: list[str]
    val_harmful: list[str]
    val_harmless: list[str]
    sources: dict


def _load_prompts(opts: RobustnessOptions) -> _Prompts:
    """Training sources for directions and detection; HarmBench *validation* for layer choice (never test)."""
    from ..data.sources import load_prompts

    n, v = opts.direction_prompts, opts.val_prompts
    sets = {"harmful": load_prompts("builtin-harmful", limit=n, seed=opts.seed),
            "harmless": load_prompts("builtin-benign", limit=n, seed=opts.seed),
            "val_harmful": load_prompts("harmbench-val", limit=v, seed=opts.seed, allow_eval=True),
            "val_harmless": load_prompts("builtin-benign-heldout", limit=v, seed=opts.seed)}
    return _Prompts(*(s.prompts for s in sets.values()), {k: s.provenance(k) for k, s in sets.items()})


class _Evaluator:
    """Runs the suites on a model for one (update, attack, strength) point; keeps the points."""

    def __init__(self, out: Path, tokenizer: Any, opts: RobustnessOptions, model_info: dict) -> None:
        from ..evaluate.runner import EvalOptions

        self.out, self.tok, self.opts, self.model_info = out, tokenizer, opts, model_info
        self.eval_opts = EvalOptions(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, limit=opts.limit,
                                     seed=opts.seed, judges=opts.judges, progress=False)
        self.points: list[dict] = []

    def dir(self, update: str, attack: str, strength: int) -> Path:
        return self.out / "evals" / update / f"{attack}-{strength}"

    def done(self, update: str, attack: str, strength: int) -> dict | None:
        from ..evaluate.runner import SUMMARY_FILE

        f = self.dir(update, attack, strength) / SUMMARY_FILE
        if self.opts.resume and f.exists():
            return json.loads(f.read_text(encoding="utf-8"))
        return None

    def record(self, update: str, attack: str, strength: int, summary: dict, extra: dict | None = None) -> dict:
        asr, n = {}, {}
        for name, s in summary["suites"].items():
            if s.get("kind") == "harmful" and VARIANT in s:
                asr[name] = s[VARIANT].get("asr")
                n[name] = s[VARIANT].get("n")
        p = {"update": update, "attack": attack, "strength": strength, "asr": asr, "n": n,
             "judge": summary.get("judge"), "eval_dir": str(self.dir(update, attack, strength).relative_to(self.out)),
             **(extra or {})}
        self.points.append(p)
        log.info("%s / %s %s: ASR %s", update, attack, strength, asr)
        return p

    def __call__(self, model: Any, update: str, attack: str, strength: int, extra: dict | None = None) -> dict:
        from ..evaluate.runner import evaluate_torch_model

        old = self.done(update, attack, strength)
        if old is not None:
            return self.record(update, attack, strength, old, extra)
        d = self.dir(update, attack, strength)
        if d.exists():  # an unfinished point: start it again
            shutil.rmtree(d)
        d.parent.mkdir(parents=True, exist_ok=True)
        summary = evaluate_torch_model(model, list(self.opts.suites), tokenizer=self.tok, out_dir=d,
                                       variants={VARIANT: contextlib.nullcontext},
                                       model_info={**self.model_info, "update": update, "attack": attack, "strength": strength},
                                       options=self.eval_opts)
        if not any(s.get("kind") == "harmful" for s in summary["suites"].values()):
            raise InputError(f"none of the suites {', '.join(self.opts.suites)} is a harmful suite: no ASR to report")
        return self.record(update, attack, strength, summary, extra)


def attack_pairs(out: Path, model: Any, tokenizer: Any, opts: RobustnessOptions) -> list[dict]:
    """The fine-tuning attack's (request, answer) pairs: read back, or generated and written under ``out``."""
    from ..data.sources import load_prompts
    from .finetune import complying_answers

    f = out / PAIRS_FILE
    if f.exists():
        return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = load_prompts("builtin-harmful", limit=opts.attack_pairs, seed=opts.seed + 1).prompts
    pairs = complying_answers(model, tokenizer, prompts, max_new_tokens=opts.answer_tokens, batch_size=opts.batch_size)
    if len(pairs) < 2:
        raise InputError("the answer model gave fewer than 2 non-empty answers: no data for the fine-tuning attack")
    _write_jsonl(f, pairs)
    return pairs


def cost_to_remove(points: Sequence[dict], update: str, attack: str, suite: str, reference: float | None) -> int | None:
    """Smallest strength of ``attack`` at which ``update``'s ASR on ``suite`` reaches ``reference`` (None: never)."""
    if reference is None:
        return None
    for p in sorted((p for p in points if p["update"] == update and p["attack"] == attack), key=lambda p: p["strength"]):
        a = p["asr"].get(suite)
        if a is not None and a >= reference - 1e-9:
            return int(p["strength"])
    return None


@dataclass
class AttackRun:
    """What one attack on one update gets: the loaded model (copy it before changing it), the update,
    the settings, the prompts, the fine-tuning pairs, the evaluator and the run directory."""

    model: Any
    update: SafetyUpdate
    tokenizer: Any
    opts: RobustnessOptions
    prompts: _Prompts
    pairs: list[dict] | None
    ev: _Evaluator
    out: Path

    def info_file(self, attack: str) -> Path:
        return self.out / "attacks" / self.update.name / f"{attack}.json"


#: ``attack(run) -> (details for results.json, evaluation points done)``.
Attack = Callable[[AttackRun], tuple[dict, int]]


def _ablation(r: AttackRun) -> tuple[dict, int]:
    from .ablation import choose_direction, orthogonalize

    name, info_f, p = r.update.name, r.info_file("ablation"), r.prompts
    if r.ev.done(name, "ablation", 1) is not None and info_f.exists():
        details = json.loads(info_f.read_text(encoding="utf-8"))
        r.ev(None, name, "ablation", 1, {"layer": details["layer"]})
        return details, 1
    res = choose_direction(r.model, r.tokenizer, p.harmful, p.harmless, p.val_harmful, p.val_harmless,
                           kl_max=r.opts.kl_max, batch_size=r.opts.batch_size)
    details = res.info()
    _write_json(info_f, details)
    m = copy.deepcopy(r.model)
    orthogonalize(m, res.direction)
    r.ev(m, name, "ablation", 1, {"layer": res.layer})
    return details, 1


def _pruning(r: AttackRun) -> tuple[dict, int]:
    from .pruning import prune, rank_neurons

    name, info_f, counts = r.update.name, r.info_file("pruning"), r.opts.prune_counts
    if all(r.ev.done(name, "pruning", k) is not None for k in counts) and info_f.exists():
        details = json.loads(info_f.read_text(encoding="utf-8"))
        for k in counts:
            r.ev(None, name, "pruning", k)
        return details, len(counts)
    rk = rank_neurons(r.model, r.tokenizer, r.prompts.harmful, r.prompts.harmless, patch=r.update.patch, batch_size=r.opts.batch_size)
    top = max(counts)
    details = {**rk.info, "order": [{"layer": lay, "index": i, "tier": t, "score": round(s, 4)} for (lay, i), t, s
                                    in zip(rk.neurons[:top], rk.tiers[:top], rk.scores[:top])]}
    _write_json(info_f, details)
    for k in counts:
        m = copy.deepcopy(r.model)
        n = prune(m, rk.top(k))
        r.ev(m, name, "pruning", k, {"pruned": n, "patched_pruned": sum(1 for t in rk.tiers[:k] if t == "patched")})
        del m
    return details, len(counts)


def _finetune(r: AttackRun) -> tuple[dict, int]:
    from .finetune import finetune_attack

    name, info_f, steps = r.update.name, r.info_file("finetune"), r.opts.finetune.steps
    if all(r.ev.done(name, "finetune", s) is not None for s in steps) and info_f.exists():
        details = json.loads(info_f.read_text(encoding="utf-8"))
        for s in steps:
            r.ev(None, name, "finetune", s)
        return details, len(steps)
    assert r.pairs is not None
    m = copy.deepcopy(r.model)
    hist = finetune_attack(m, r.tokenizer, r.pairs, r.opts.finetune, on_checkpoint=lambda s, pm: r.ev(pm, name, "finetune", s))
    details = {"config": asdict(r.opts.finetune), "pairs": len(r.pairs), "loss": hist}
    _write_json(info_f, details)
    return details, len(steps)


#: The attack registry, in the order attacks run; :func:`register_attack` adds one.
_ATTACKS: dict[str, Attack] = {"ablation": _ablation, "pruning": _pruning, "finetune": _finetune}


def register_attack(name: str, attack: Attack) -> None:
    """Add (or replace) an attack under ``name``; ``RobustnessOptions(attacks=...)`` then accepts it."""
    _ATTACKS[name] = attack


def get_attack(name: str) -> Attack:
    """The attack registered as ``name``; an unknown name is one error listing the known ones."""
    if name not in _ATTACKS:
        raise InputError(f"unknown attack {name!r}; known: {', '.join(_ATTACKS)}")
    return _ATTACKS[name]


def known_attacks() -> tuple[str, ...]:
    return tuple(_ATTACKS)


def _attack_update(model_u: Any, upd: SafetyUpdate, tok: Any, opts: RobustnessOptions, prompts: _Prompts,
                   pairs: list[dict] | None, ev: _Evaluator, out: Path, tick: Callable[[int], None]) -> dict:
    """All attacks on one update, in registry order; returns per-attack details for ``results.json``."""
    details: dict[str, Any] = {}
    ev(model_u, upd.name, NONE, 0)
    tick(1)
    if upd.name == BASE and not opts.attack_base:
        return details
    run = AttackRun(model_u, upd, tok, opts, prompts, pairs, ev, out)
    for name in known_attacks():
        if name in opts.attacks:
            details[name], points = get_attack(name)(run)
            tick(points)
    return details


def collect_samples(out: Path, points: Sequence[dict]) -> list[dict]:
    """Every judged reply of every point, tagged with its update, attack and strength."""
    from ..evaluate.records import read_records
    from ..evaluate.runner import SAMPLES_DIR

    rows = []
    for p in points:
        for f in sorted((out / p["eval_dir"] / SAMPLES_DIR).glob(f"*.{VARIANT}.jsonl")):
            suite = f.name[: -len(f".{VARIANT}.jsonl")]
            for r in read_records(f):
                rows.append({"update": p["update"], "attack": p["attack"], "strength": p["strength"], "suite": suite, **r})
    return rows


def run_robustness(model_spec: str | os.PathLike, updates: Sequence[SafetyUpdate], out_dir: str | os.PathLike,
                   options: RobustnessOptions | None = None) -> dict:
    """Attack every update, evaluate every point, write the run directory; return ``results.json``'s content.

    ``updates`` need not name the base: it is always attacked first, as the reference ASR.
    """
    from tqdm.auto import tqdm

    from ..models.loading import load_model
    from .render import write_outputs
    from .updates import materialize

    opts = options or RobustnessOptions()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not opts.resume and not (out / "config.json").exists():
        raise InputError(f"{out}: exists and is not empty; choose a new directory")
    if (out / "config.json").exists() and not opts.resume:
        raise InputError(f"{out}: holds an earlier robustness run; pass --resume to continue it, or choose another directory")
    names = [u.name for u in updates]
    if len(set(names)) != len(names) or BASE in names:
        raise InputError(f"safety update names must be unique and not {BASE!r}; got {', '.join(names)}")
    all_updates = [SafetyUpdate(BASE, "base")] + list(updates)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(model_spec, device=opts.device)
    prompts = _load_prompts(opts)
    model_info = {"spec": str(model_spec), "path": str(lm.source), "sha256": None, "description": lm.description}
    config = {"schema": SCHEMA, "created": _now(), "model": model_info, "updates": [u.info() for u in all_updates],
              "options": asdict(opts), "prompts": prompts.sources}
    _write_json(out / "config.json", config)
    pairs = None
    if "finetune" in opts.attacks:
        answer = load_model(opts.answer_model, device=opts.device) if opts.answer_model else lm
        pairs = attack_pairs(out, answer.model, answer.tokenizer, opts)
    ev = _Evaluator(out, lm.tokenizer, opts, model_info)
    per_update = 1 + ("ablation" in opts.attacks) + len(opts.prune_counts) * ("pruning" in opts.attacks) + \
        len(opts.finetune.steps) * ("finetune" in opts.attacks)
    details = {}
    total = per_update * len(all_updates) - (0 if opts.attack_base else per_update - 1)
    with tqdm(total=total, desc="robustness points", disable=not opts.progress) as bar:
        for upd in all_updates:
            model_u = materialize(lm, upd)
            details[upd.name] = _attack_update(model_u, upd, lm.tokenizer, opts, prompts, pairs, ev, out, bar.update)
            del model_u
    primary = next(iter(ev.points[0]["asr"]))
    ref = {s: next(p["asr"][s] for p in ev.points if p["update"] == BASE and p["attack"] == NONE) for s in ev.points[0]["asr"]}
    costs = {u.name: {s: {a: cost_to_remove(ev.points, u.name, a, s, ref[s]) for a in ("ablation", "pruning", "finetune")
                          if a in opts.attacks} for s in ref} for u in all_updates}
    results = {**config, "finished": _now(), "primary_suite": primary, "reference_asr": ref, "points": ev.points,
               "attacks": details, "cost_to_remove": costs,
               "attack_data": {"pairs_file": PAIRS_FILE if pairs is not None else None, "pairs": len(pairs or [])}}
    _write_jsonl(out / SAMPLES_FILE, collect_samples(out, ev.points))
    write_outputs(out, results)
    return results
