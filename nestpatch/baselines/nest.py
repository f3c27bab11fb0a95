"""NeST itself, behind the baselines' interface: ``nestpatch train`` as it ships.

Nothing is re-implemented here: :func:`nestpatch.train.train_policy` runs with the bench's
shared configuration (its own defaults unless the user changed them), and the ``.nestpatch``
it writes is the artifact. Its folded form is the base with the patch attached (the same float32
arithmetic as the converters' folds).

Train time counts detection, clustering and the optimizer loop; the refusal targets and the
base answers for the retain term (shared by every method) are reported apart.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

from ..memory import peak_rss_mb
from ..models.files import path_bytes
from ..models.loading import LoadedModel
from .common import ARTIFACT_DIR, TRAIN_LOG, MethodContext, TrainOutcome, loss_summary, read_jsonl

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"steps": None, "lr": None, "warmup_steps": None}
PATCH_FILE = "policy.nestpatch"


def train(ctx: MethodContext) -> TrainOutcome:
    from ..train.pipeline import OutputPaths, train_policy

    art_dir = ctx.out_dir / ARTIFACT_DIR
    art_dir.mkdir(parents=True, exist_ok=True)
    # keep the checkpoint: its training sequences become the baselines' shared data (no second build)
    cfg = ctx.config_for_method(out=str(art_dir / PATCH_FILE), resume=False, policy_name="nestpatch-bench", keep_checkpoint=True)
    result = train_policy(cfg, progress=ctx.progress)
    peak = peak_rss_mb()
    t = dict(result.timings)
    own = round(float(t.get("detect_cluster_s", 0.0)) + float(t.get("train_s", 0.0)), 3)
    paths = OutputPaths.for_output(cfg.out)
    _share_examples(paths.ckpt, ctx, result.patch.provenance.get("data") or [])
    if paths.log.exists():  # every method's step log sits at METHOD/train.jsonl
        shutil.copyfile(paths.log, ctx.out_dir / TRAIN_LOG)
    first, final = loss_summary(read_jsonl(paths.log), ("refusal", "retain", "total"))
    patch = result.patch
    det = result.detection
    return TrainOutcome(
        artifact=str(result.paths.patch), artifact_kind="nestpatch", artifact_bytes=path_bytes(result.paths.patch),
        trainable_parameters=int(patch.trainable_parameters), train_seconds=own, peak_rss_mb=round(max(peak, result.peak_rss_mb), 1),
        loss_first=first or dict(result.summary.first), loss_final=final or dict(result.summary.final),
        scope=f"NeST: {patch.n_neurons} neurons in {patch.n_clusters} clusters over {len(patch.targets)} MLP projections",
        timings={"load_s": t.get("load_s", 0.0), "shared_data_s": t.get("targets_s", 0.0),
                 "detect_cluster_s": t.get("detect_cluster_s", 0.0), "train_s": t.get("train_s", 0.0)},
        details={"steps": cfg.steps, "lr": cfg.lr, "neurons": patch.n_neurons, "clusters": patch.n_clusters,
                 "selected_fraction": det.get("fraction"), "seed": result.config.seed},
    )


def _share_examples(ckpt_path: Path, ctx: MethodContext, sources: list[dict]) -> None:
    """Write NeST's training sequences as the bench's shared data, then drop the checkpoint.

    They are what :func:`nestpatch.baselines.data.build_shared_data` would make (same functions,
    same settings, same seed), so the baselines reuse them instead of asking the base model again.
    """
    from ..train.checkpoint import CheckpointDir
    from .data import SharedData, cache_key, save_cache

    ck = CheckpointDir(ckpt_path)
    try:
        ex = ck.load_examples() if ck.exists() else None
        if ex is not None and ctx.data_cache is not None and not ctx.data_cache.exists():
            h, b, info = ex
            save_cache(ctx.data_cache, SharedData(list(h), list(b), dict(info), [d for d in sources if d.get("role") in ("harmful", "benign")]),
                       cache_key(ctx.train_config))
    finally:
        ck.remove()


def load_merged(lm: LoadedModel, outcome: TrainOutcome) -> Any:
    """A copy of the base with the patch attached (fingerprint checked)."""
    from nestpatch.format import read_patch
    from nestpatch.runtime.attach import attach

    model = copy.deepcopy(lm.model)
    attach(model, read_patch(Path(outcome.artifact)))
    return model
