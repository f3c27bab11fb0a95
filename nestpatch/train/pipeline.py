"""``train_policy``: prompts -> detect -> cluster -> train shared deltas -> ``.nestpatch``.

Each stage is its own module; this one wires them, owns the outputs next to ``--out`` and the
provenance written into the patch. Resuming reuses the checkpoint's selection and training
sequences, so an interrupted run continues where it stopped instead of re-detecting.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..assets import sha256_file
from ..atomic import write_bytes_atomic
from ..cluster import cluster_modules
from ..data import PromptSet, eval_prompt_index, load_many, normalise
from ..data.sources import BUILTIN_DIR
from ..detect import detect, detect_consensus
from ..errors import InputError
from ..fingerprint import attach_sketches
from ..format import Patch, write_patch
from ..format.constants import PolicyKey, ProvenanceKey
from ..memory import peak_rss_mb
from ..models.loading import LoadedModel, load_model, torch_neuron_vectors
from ..provenance import file_digest, library_versions, text_digest
from .adapter import SharedDeltas, TargetSpec
from .answer_cache import AnswerCache
from .checkpoint import CheckpointDir
from .config import TrainConfig
from .datamix import balance
from .examples import Example, LlamaAnswers, generate_answers, prompt_ids, recovery_examples, response_ids
from .recipes import apply_recipe
from .refusals import own_refusals, refusal_judge, template_refusals
from .reuse import neurons_from_patch
from .trainer import Trainer, TrainSummary

log = logging.getLogger(__name__)

#: harmful prompts the base model answers first when ``refusal_targets = "auto"``
STYLE_SAMPLE = 32
#: share of refusals in that sample above which the model's own style is used
STYLE_MIN_SHARE = 0.25


@dataclass
class OutputPaths:
    """Where a run writes: the patch and, next to it, config, log and checkpoint directory."""

    patch: Path
    config: Path
    log: Path
    ckpt: Path

    @classmethod
    def for_output(cls, out: str | Path) -> "OutputPaths":
        p = Path(out)
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        return cls(p, p.with_name(stem + ".train.toml"), p.with_name(stem + ".train.jsonl"), p.with_name(stem + ".ckpt"))


@dataclass
class TrainResult:
    """Everything a caller (the CLI, a test, a benchmark) may want to report."""

    paths: OutputPaths
    patch: Patch
    config: TrainConfig
    detection: dict
    per_layer: dict[int, dict[str, int]]
    clusters: dict
    summary: TrainSummary
    timings: dict = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    resumed_from: int = 0


# ---------------------------------------------------------------------------------------------
def _check_output(paths: OutputPaths) -> None:
    parent = paths.patch.parent
    if not parent.exists():
        raise InputError(f"{paths.patch}: output directory {parent} does not exist")
    if paths.patch.suffix != ".nestpatch":
        log.warning("%s: output does not end in .nestpatch", paths.patch)


def merge_prompt_sets(sets: list[PromptSet]) -> tuple[list[str], list[str | None]]:
    """Prompts of several sources, de-duplicated across them, with each prompt's category (built-in sets have one)."""
    seen: set[str] = set()
    prompts, cats = [], []
    for s in sets:
        for p, m in zip(s.prompts, s.meta or [{}] * len(s.prompts)):
            if p not in seen:
                seen.add(p)
                prompts.append(p)
                cats.append((m or {}).get("category"))
    return prompts, cats


def load_training_prompts(cfg: TrainConfig) -> tuple[list[PromptSet], list[PromptSet]]:
    """Load and check the harmful and benign sets (no evaluation set, no overlap with HarmBench)."""
    limit = cfg.max_prompts or None
    balanced = cfg.balance_by != "none" and limit is not None
    harmful = load_many(cfg.harmful, columns=cfg.harmful_column, limit=None if balanced else limit, seed=int(cfg.seed or 0))
    benign = load_many(cfg.benign, columns=cfg.benign_column, limit=None if balanced else limit, seed=int(cfg.seed or 0))
    if balanced:
        harmful = balance(harmful, int(limit), cfg.balance_by, int(cfg.seed or 0))  # type: ignore[arg-type]
        benign = balance(benign, int(limit), cfg.balance_by, int(cfg.seed or 0) + 1)  # type: ignore[arg-type]
    evals = eval_prompt_index()
    for role, sets in (("harmful", harmful), ("benign", benign)):
        for s in sets:
            hits = [p for p in s.prompts if normalise(p) in evals]
            if hits:
                raise InputError(f"{s.source}: {len(hits)} {role} prompt(s) are HarmBench evaluation prompts "
                                 f"(first: {hits[0][:80]!r}); remove them: training on evaluation prompts voids every ASR figure")
    from ..data.overlap import check_no_overlap  # n-gram overlap with every evaluation set: fails loudly

    check_no_overlap([(s.source, s.prompts) for s in harmful + benign])
    h_prompts = set(merge_prompt_sets(harmful)[0])
    both = [p for p in merge_prompt_sets(benign)[0] if p in h_prompts]
    if both:
        raise InputError(f"{len(both)} prompt(s) are in both the harmful and the benign sets (first: {both[0][:80]!r})")
    return harmful, benign


def detection_pool(cfg: TrainConfig, harmful: list[str], benign: list[str]) -> tuple[list[str], list[str]]:
    """The prompts detection samples ``--detect-prompts`` from: the training prompts, or every prompt of the sources.

    Why: ``--max-prompts`` bounds the training sample because each training prompt costs a generated
    target; detection only runs forward passes. ``sources`` lets detection see more prompts than
    training without more targets: on Qwen2.5-Coder-1.5B, 160 + 160 prompts instead of 64 + 64 made
    two seeds' neuron sets share 62% of their neurons instead of 39-41% (docs/RESULTS.md, session 15;
    the patch's validation ASR did not improve). The same checks apply (no evaluation prompt).
    """
    if cfg.detect_pool != "sources" or not cfg.max_prompts:
        return harmful, benign
    h_sets, b_sets = load_training_prompts(dataclasses.replace(cfg, max_prompts=0))
    return merge_prompt_sets(h_sets)[0], merge_prompt_sets(b_sets)[0]


def _sample(items: list[Any], k: int, seed: int) -> list[Any]:
    if not k or k >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in keep]


class _Bars:
    """tqdm bars for the library's long loops (off when ``enabled`` is false); closed together."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bars = enabled, []

    def counter(self, desc: str, total: int, _scale: int = 1) -> Callable[[int], Any] | None:
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        self.bars.append(bar)
        return bar.update

    def steps(self, total: int, initial: int = 0) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def close(self) -> None:
        for b in self.bars:
            b.close()
        self.bars = []


# ---------------------------------------------------------------------------------------------
def select_neurons(lm: LoadedModel, cfg: TrainConfig, harmful: list[str], benign: list[str], bars: _Bars | None = None,
                   cache: dict | None = None) -> tuple[list[TargetSpec], dict, dict[int, dict[str, int]], dict]:
    """Detection then clustering; returns target specs, detection stats, per-layer counts, cluster stats.

    With ``cfg.neurons`` set, both come from that patch instead (:mod:`.reuse`).

    ``cache`` (a dict kept across calls on the same model) lets detection reuse pooled activations.
    """
    if cfg.neurons:
        return neurons_from_patch(lm, cfg.neurons)
    harmful, benign = detection_pool(cfg, harmful, benign)
    bars = bars or _Bars(False)
    seed = int(cfg.seed or 0)
    common = dict(modules=cfg.modules, layers=cfg.layers or None, detector=cfg.detector, threshold=cfg.threshold,
                  min_weight=cfg.min_weight, max_neurons_per_module=cfg.max_neurons_per_module, pool=cfg.pool,
                  batch_size=cfg.batch_size_detect, max_length=cfg.max_length, seed=seed, progress=bars.counter, cache=cache)
    if cfg.detect_resamples > 1:
        det = detect_consensus(lm.model, lm.tokenizer, harmful, benign, per_role=cfg.detect_prompts,
                               resamples=cfg.detect_resamples, consensus=cfg.detect_consensus, **common)
    else:
        dh, db = _sample(harmful, cfg.detect_prompts, seed), _sample(benign, cfg.detect_prompts, seed + 1)
        det = detect(lm.model, lm.tokenizer, dh, db, probe_epochs=cfg.probe_epochs, probe_lr=cfg.probe_lr,
                     probe_weight_decay=cfg.probe_weight_decay, probe_standardize=cfg.probe_standardize, **common)
    bars.close()
    kept = [m for m in det.modules if len(m.indices)]
    cluster_seed = seed if cfg.cluster_seed is None else int(cfg.cluster_seed)
    clusters = cluster_modules({m.name: m.profiles for m in kept}, k=cfg.clusters, k_min=cfg.k_min, k_max=cfg.k_max,
                               seed=cluster_seed)
    specs = [TargetSpec(m.ref, m.indices, clusters[m.name].labels) for m in kept]
    cstats = {m.name: {"k": clusters[m.name].k, "chosen_by": clusters[m.name].chosen_by,
                       **({"silhouette": round(clusters[m.name].silhouette, 4)} if not np.isnan(clusters[m.name].silhouette) else {})}
              for m in kept}
    return specs, det.stats(), det.per_layer(), cstats


def build_examples(lm: LoadedModel, cfg: TrainConfig, harmful: list[str], h_cats: list[str | None], benign: list[str],
                   bars: _Bars | None = None, answers: AnswerCache | None = None) -> tuple[list[Example], list[Example], dict]:
    """Refusal targets for harmful prompts and the base model's own answers for benign ones.

    ``answers``: base-model answers kept across trainings (a tune or sweep session passes one).
    """
    bars = bars or _Bars(False)
    llama = answer_decoder(lm, cfg)
    try:
        return _build_examples(lm, cfg, harmful, h_cats, benign, bars, llama, answers if answers is not None else AnswerCache())
    finally:
        if llama is not None:
            llama.close()


def answer_decoder(lm: LoadedModel, cfg: TrainConfig) -> LlamaAnswers | None:
    """llama.cpp on the model's GGUF for the base model's answers, when ``answer_backend`` picks it."""
    is_gguf = lm.source.is_file() and lm.source.suffix.lower() == ".gguf"
    backend = cfg.answer_backend
    if backend == "auto":
        backend = "llama" if is_gguf and importlib.util.find_spec("llama_cpp") is not None else "torch"
    if backend == "torch":
        return None
    if not is_gguf:
        raise InputError(f"{lm.source}: --answer-backend llama needs a .gguf model")
    log.info("base answers from llama.cpp on %s (batched)", lm.source.name)
    return LlamaAnswers(lm.source, threads=cfg.threads)


def _build_examples(lm: LoadedModel, cfg: TrainConfig, harmful: list[str], h_cats: list[str | None], benign: list[str],
                    bars: _Bars, llama: LlamaAnswers | None, cache: AnswerCache) -> tuple[list[Example], list[Example], dict]:
    tok, seed = lm.tokenizer, int(cfg.seed or 0)
    judge_name, judge = refusal_judge()
    decoder = "llama.cpp" if llama is not None else "torch"
    info: dict[str, Any] = {"refusal_targets": "template", "judge": judge_name, "answers_from": decoder}
    hits_before = cache.hits

    def answer(prompts: list[str], max_new_tokens: int, stage: str) -> list[list[int]]:
        def generate(missing: list[str]) -> list[list[int]]:
            return generate_answers(lm.model, tok, missing, max_new_tokens=max_new_tokens, batch_size=cfg.batch_size_detect,
                                    max_length=cfg.max_length, progress=bars.counter(stage, len(missing)), llama=llama)
        return cache.answers(prompts, decoder=decoder, max_new_tokens=max_new_tokens, max_length=cfg.max_length,
                             generate=generate)
    mode = cfg.refusal_targets
    own_ids: list[list[int]] | None = None
    if mode in ("auto", "own"):
        sample = harmful if mode == "own" else _sample(harmful, STYLE_SAMPLE, seed + 2)
        ids = answer(sample, 48, "refusal style")
        texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
        share = sum(judge(p, a) for p, a in zip(sample, texts)) / max(1, len(sample))
        info["base_refusal_share"] = round(share, 4)
        if mode == "own" or share >= STYLE_MIN_SHARE:
            if mode == "auto":  # the sample said yes: answer the other harmful prompts (greedy: the sample's answers stand)
                done = dict(zip(sample, ids))
                rest = [p for p in harmful if p not in done]
                more = answer(rest, 48, "own refusals")
                done.update(zip(rest, more))
                ids = [done[p] for p in harmful]
                texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
            targets, n_ref = own_refusals(harmful, texts, judge, seed)
            if not targets:
                raise InputError(f"{cfg.model}: the model refused none of {len(harmful)} harmful prompts, so it has no refusal "
                                 "style of its own; use --refusal-targets template")
            by_text = {t: i for t, i in zip(texts, ids)}
            own_ids = [by_text[t] for t in targets]
            info.update(refusal_targets="own", own_refusals=n_ref)
    h_examples = []
    if own_ids is None:
        texts = template_refusals(harmful, h_cats, seed)
        h_examples = [Example("harmful", p, prompt_ids(tok, p, cfg.max_length), response_ids(tok, t)) for p, t in zip(harmful, texts)]
    else:
        h_examples = [Example("harmful", p, prompt_ids(tok, p, cfg.max_length), r) for p, r in zip(harmful, own_ids)]
    recovery = recovery_examples(tok, h_examples, cfg.recovery_fraction, cfg.recovery_tokens, seed + 3)
    if recovery:
        h_examples += recovery
        info["recovery_examples"] = len(recovery)
    b_examples: list[Example] = []
    if cfg.retain_loss != "none":
        replies = answer(benign, cfg.retain_answer_tokens, "base answers")
        b_examples = [Example("benign", p, prompt_ids(tok, p, cfg.max_length), a) for p, a in zip(benign, replies) if a]
    if cache.hits > hits_before:
        info["answers_reused"] = cache.hits - hits_before
    bars.close()
    return h_examples, b_examples, info


def _resume_seed(cfg: TrainConfig, ckpt: CheckpointDir) -> TrainConfig:
    """On ``--resume`` without ``--seed``, continue with the checkpoint's seed."""
    if cfg.resume and cfg.seed is None and ckpt.exists():
        sel = ckpt.load_selection()
        if sel and "seed" in sel[1]:
            return cfg.merged({"seed": int(sel[1]["seed"])})
    return cfg


def train_policy(config: TrainConfig, *, progress: bool = False, explicit: set[str] | None = None) -> TrainResult:
    """Train a NeST policy and write it to ``config.out`` (plus config and log next to it).

    ``explicit``: the fields a flag or config key set (the CLI passes them); the model's recipe
    (:mod:`.recipes`) fills the others. Default: the fields that differ from the defaults.

    Raises:
        InputError, UnsupportedError: bad inputs (one line each; nothing is written).
        TrainingError: the loss became NaN (the last good checkpoint is kept).
    """
    import torch

    paths = OutputPaths.for_output(config.out or "policy.nestpatch")
    ckpt = CheckpointDir(paths.ckpt)
    config, recipe = apply_recipe(config, explicit)
    cfg = _resume_seed(config, ckpt).resolved()
    _check_output(paths)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed = int(cfg.seed)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t_all = time.time()
    bars = _Bars(progress)

    t = time.time()
    h_sets, b_sets = load_training_prompts(cfg)
    harmful, h_cats = merge_prompt_sets(h_sets)
    benign, _ = merge_prompt_sets(b_sets)
    lm = load_model(cfg.model, device=cfg.device, device_map=cfg.device_map)
    timings["load_s"] = round(time.time() - t, 2)
    log.info("model %s loaded; %d harmful and %d benign prompts", lm.source, len(harmful), len(benign))

    resumed = cfg.resume and ckpt.exists()
    if cfg.resume and not resumed:
        log.warning("--resume: no checkpoint in %s; starting from the beginning", ckpt.path)
    if not cfg.resume and ckpt.exists():
        log.warning("removing the stale checkpoint in %s (pass --resume to continue it)", ckpt.path)
        ckpt.remove()
    sel = ckpt.load_selection() if resumed else None
    if sel is not None:
        specs, sel_info = sel
        if sel_info.get("config") != cfg.fingerprint():
            raise InputError(f"{ckpt.path}: checkpoint was made with other settings (config {sel_info.get('config')} != "
                             f"{cfg.fingerprint()}); run without --resume to start again")
        det_stats, per_layer, cstats = sel_info["detection"], {int(k): v for k, v in sel_info["per_layer"].items()}, sel_info["clusters"]
    else:
        t = time.time()
        specs, det_stats, per_layer, cstats = select_neurons(lm, cfg, harmful, benign, bars)
        timings["detect_cluster_s"] = round(time.time() - t, 2)
        ckpt.save_selection(specs, {"config": cfg.fingerprint(), "seed": seed, "detection": det_stats,
                                    "per_layer": {str(k): v for k, v in per_layer.items()}, "clusters": cstats})
    ex = ckpt.load_examples() if resumed else None
    if ex is not None:
        h_ex, b_ex, ex_info = ex
    else:
        t = time.time()
        h_ex, b_ex, ex_info = build_examples(lm, cfg, harmful, h_cats, benign, bars)
        timings["targets_s"] = round(time.time() - t, 2)
        ckpt.save_examples(h_ex, b_ex, ex_info)

    deltas = SharedDeltas(lm.model, specs, qat=cfg.qat).attach()
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    trainer = Trainer(lm.model, deltas, h_ex, b_ex, cfg, pad_id=pad, log_path=paths.log, ckpt=ckpt,
                      progress=bars.steps if progress else None, ckpt_meta={"config": cfg.fingerprint(), "seed": seed})
    start = 0
    state = ckpt.load_state() if resumed else None
    if state is not None:
        start, d, adam, meta = state
        if meta.get("config") != cfg.fingerprint():
            raise InputError(f"{ckpt.path}: checkpoint state was made with other settings; run without --resume to start again")
        trainer.restore(d, adam)
        trainer.last_saved_step = start
        log.info("resuming at step %d of %d", start, cfg.steps)
    elif paths.log.exists():
        paths.log.unlink()  # a fresh run starts a fresh log
    t = time.time()
    summary = trainer.run(start)
    timings["train_s"] = round(time.time() - t, 2)

    patch = build_patch(lm, cfg, deltas, h_sets, b_sets, ex_info, det_stats, cstats, summary, timings, recipe)
    deltas.detach()
    write_patch(patch, paths.patch)
    write_bytes_atomic(paths.config, cfg.to_toml().encode("utf-8"))
    if not cfg.keep_checkpoint:
        ckpt.remove()
    timings["total_s"] = round(time.time() - t_all, 2)
    return TrainResult(paths, patch, cfg, det_stats, per_layer, cstats, summary, timings, peak_rss_mb(), start)


def _model_revision(source: Path) -> str:
    """``sha256:<hex>`` of a single-file model under 4 GB (pins the exact base), else empty."""
    try:
        if source.is_file() and source.stat().st_size < 4 << 30:
            return file_digest(source)
    except OSError:
        pass
    return ""


def build_patch(lm: LoadedModel, cfg: TrainConfig, deltas: SharedDeltas, h_sets: list[PromptSet], b_sets: list[PromptSet],
                ex_info: dict, det_stats: dict, cstats: dict, summary: TrainSummary, timings: dict,
                recipe: dict | None = None) -> Patch:
    """The ``.nestpatch`` content: targets, base description with sketches, policy, provenance."""
    base = dict(lm.description)
    base["revision"] = base.get("revision") or _model_revision(Path(lm.source))
    data = [s.provenance("harmful") for s in h_sets] + [s.provenance("benign") for s in b_sets]
    if ex_info.get("refusal_targets") == "template":
        ref = BUILTIN_DIR / "refusals.jsonl"
        data.append({"role": "refusal-targets", "source": "builtin-refusals", "rows": sum(1 for _ in open(ref, encoding="utf-8")),
                     "sha256": sha256_file(ref)})  # bare hex, as every data entry (compared with pinned asset hashes)
    tmpl = getattr(lm.tokenizer, "chat_template", None) or ""
    targets = deltas.to_targets(cfg.delta_dtype)
    prov = {
        ProvenanceKey.TOOL: "nestpatch train",
        ProvenanceKey.TOOL_VERSION: __version__,
        ProvenanceKey.CREATED: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        ProvenanceKey.CONFIG: cfg.to_dict(),
        ProvenanceKey.SEED: int(cfg.seed),  # type: ignore[arg-type]
        ProvenanceKey.DATA: data,
        ProvenanceKey.LIBRARIES: library_versions(),
        ProvenanceKey.TRAINABLE_PARAMETERS: deltas.trainable_parameters,
        ProvenanceKey.DETECTION: {**det_stats, "clusters": cstats},
        "training": {
            "steps": summary.steps, "resumed_at": summary.start_step, "first": summary.first, "final": summary.final,
            "coverage": summary.coverage,
            "targets": ex_info, "chat_template_sha256": text_digest(tmpl) if tmpl else None,
            "qat": cfg.qat, "recipe": recipe or {"name": cfg.recipe}, "timings_s": timings, "peak_rss_mb": round(peak_rss_mb(), 1),
            "device": str(next(iter(deltas.parameters())).device),
        },
    }
    patch = Patch(targets=targets, base=base, provenance=prov, policy={
        PolicyKey.NAME: cfg.policy_name, PolicyKey.VERSION: cfg.policy_version, PolicyKey.DESCRIPTION: cfg.policy_description})
    attach_sketches(patch, lambda t: torch_neuron_vectors(lm.model, t))
    return patch
