"""Circuit breakers baseline: representation rerouting (Zou et al. 2024), scaled to the model's depth.

What is trained: LoRA adapters on every linear layer (attention and MLP) of the early decoder
layers. What it optimizes, per step, on ``batch_size`` harmful and ``batch_size`` benign sequences:

- **rerouting** on harmful data (the harmful prompt followed by the base model's own compliant
  answer: the representations to break): ``mean ReLU(cos(h_lora, h_base))`` over tokens, at two
  target layers. Driving the cosine to zero or below sends harmful representations away from
  where the frozen model had them. The chat template's prefix (system prompt, user header) is
  left out: it reads nothing of the request, so its representations are those of every benign
  prompt too (SmolLM2's template inserts a 20-token system prompt).
- **retain** on benign data (the shared retain sequences): ``mean ||h_lora - h_base||_2`` over
  tokens, at every layer up to the second target.
- **schedule**: ``c_reroute = a (1 - t / 2T)``, ``c_retain = a t / 2T`` (the paper's), so weight
  shifts from rerouting to retain as training goes on.

Depth scaling: the paper's Llama-3-8B setting (32 layers) reads the hidden states at indices 10
and 20 and adapts layers 0-20; we read indices ``round(10 L / 32)`` and ``round(20 L / 32)`` and
adapt every layer below the second (for SmolLM2's 30 layers: hidden states 9 and 19, LoRA on
layers 0-18). Layers after the second target are never run during training (a hook stops the
forward pass there), which saves a third of the compute.

Three changes from the paper's letter, each an option (the paper's values in brackets); without
them the rerouting loss of SmolLM2-135M stayed at 0.9999 for a whole run (docs/RESULTS_baselines.md):

- **start** (``init_b_std``, [0]): with LoRA's ``B = 0`` the patched model *is* the base, where
  ``cos = 1`` is a maximum with zero gradient; in float32 nothing ever moves it (bf16 rounding
  noise is the only way out). ``B`` starts at ``N(0, init_b_std^2)`` instead.
- **rerouting space** (``space``, [raw]): SmolLM2's residual stream has two dimensions large for
  every token (the mean hidden state carries about three quarters of each token's norm), so the
  raw ``cos(h, h_base)`` stays near 1 unless the hidden state changes by about its whole norm.
  ``standardised`` takes the cosine of ``(h - mu) / sigma``, ``centred`` of ``h - mu``, with
  ``mu, sigma`` the frozen base's per-dimension mean and standard deviation at that layer over
  the benign retain tokens (template prefix left out). They are fixed before training, so the
  loss still compares one token's patched and frozen representation, as the paper's does.
- **retain scale** (``retain``, [absolute]): the cosine is scale-free, so its gradient is
  ``~1 / |h|``, while the L2 retain distance has a gradient of unit size however small the
  change. With SmolLM2's hidden norms (50-210 on layers 1-19) the retain term outweighed the
  rerouting term by orders of magnitude from the second step on and pulled every move back.
  ``relative`` divides each layer's distance by the base's mean token norm there, so both terms
  are dimensionless and the coefficient ``a`` means the same on any model.

The statistics are not part of the artifact: the folded model is base + LoRA, as before.

Note for readers of the table: rerouted models tend to answer harmful prompts with broken text
rather than a refusal; a refusal-phrase judge counts broken text as compliance, so this
method's ASR under that judge is an upper bound.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..errors import InputError, TrainingError
from ..memory import peak_rss_mb
from ..models.files import path_bytes
from ..models.loading import LoadedModel
from .common import ARTIFACT_DIR, TRAIN_LOG, MethodContext, TrainOutcome, loss_summary, timed
from .data import load_method_inputs
from .lora import lora_parameters, make_peft_model, merge_adapter, save_adapter

log = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The paper's reference depth and target hidden-state indices (Llama-3-8B).
REFERENCE_DEPTH, REFERENCE_TARGETS = 32, (10, 20)
#: Spaces the rerouting cosine can be taken in (see the module docstring).
SPACES = ("standardised", "centred", "raw")
#: How the retain distance is scaled: divided by the base's mean token norm at each layer, or as is (the paper's).
RETAINS = ("relative", "absolute")
DEFAULTS: dict[str, Any] = {"steps": None, "lr": 1e-4, "rank": 16, "alpha": 16.0, "coefficient": 10.0,
                            "modules": list(ALL_LINEAR), "target_layers": None, "warmup_steps": None,
                            "space": "standardised", "retain": "relative", "init_b_std": 1e-3, "stats_sequences": 64}


def target_layers(n_layers: int, given: Sequence[int] | None = None) -> tuple[int, int]:
    """The two hidden-state indices to reroute at (1..n_layers; index i is the output of decoder layer i-1)."""
    if given:
        if len(given) != 2 or not 1 <= given[0] < given[1] <= n_layers:
            raise InputError(f"circuit breakers: target layers must be two hidden-state indices 1 <= a < b <= {n_layers}, "
                             f"got {list(given)}")
        return int(given[0]), int(given[1])
    if n_layers < 2:
        raise InputError(f"circuit breakers need at least 2 decoder layers, the model has {n_layers}")
    a, b = (max(1, round(t * n_layers / REFERENCE_DEPTH)) for t in REFERENCE_TARGETS)
    b = min(n_layers, max(b, a + 1))
    a = min(a, b - 1)
    return a, b


def coefficients(step: int, total: int, a: float) -> tuple[float, float]:
    """``(c_reroute, c_retain)`` at 0-based ``step`` of ``total``."""
    frac = step / (2.0 * max(1, total))
    return a * (1.0 - frac), a * frac


class _Stop(Exception):
    """Raised by the last hook: the layers after the second target are not needed."""


@contextlib.contextmanager
def layer_outputs(layers: Sequence[Any], last: int) -> Iterator[dict[int, Any]]:
    """Collect outputs of decoder ``layers[0..last-1]`` (keyed by hidden-state index 1..last); stop after ``last``."""
    got: dict[int, Any] = {}
    handles = []

    def make(i: int) -> Any:
        def hook(_m: Any, _args: Any, out: Any) -> None:
            got[i + 1] = out[0] if isinstance(out, tuple) else out  # (B, T, d)
            if i + 1 == last:
                raise _Stop

        return hook

    for i in range(last):
        handles.append(layers[i].register_forward_hook(make(i)))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _decoder_layers(peft_model: Any) -> Any:
    backbone = peft_model.get_base_model().model
    if not hasattr(backbone, "layers"):
        raise InputError("circuit breakers: the model has no decoder layer list (model.layers)")
    return backbone


def hidden_states(peft_model: Any, batch: Any, last: int, *, autocast: bool) -> dict[int, Any]:
    """Hidden states 1..``last`` of ``batch`` (the forward pass stops after decoder layer ``last - 1``)."""
    import torch

    backbone = _decoder_layers(peft_model)
    dev = batch.input_ids.device
    with layer_outputs(backbone.layers, last) as got, torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
        try:
            backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
        except _Stop:
            pass
    return dict(got)


@dataclass
class BaseStats:
    """The frozen base's statistics that set the scale of both losses (fixed before training).

    Attributes:
        space: one of :data:`SPACES`: where the rerouting cosine is taken.
        mean: target hidden-state index -> ``(d,)`` mean over the benign retain tokens (empty for ``raw``).
        std: target hidden-state index -> ``(d,)`` standard deviation (empty unless ``standardised``).
        retain_scale: hidden-state index -> the number each layer's retain distance is divided by
            (the base's mean token norm there for ``relative`` retain; empty for ``absolute``).
    """

    space: str = "raw"
    mean: dict[int, Any] = field(default_factory=dict)
    std: dict[int, Any] = field(default_factory=dict)
    retain_scale: dict[int, float] = field(default_factory=dict)

    def apply(self, i: int, h: Any) -> Any:
        """``h (B, T, d)`` at hidden-state index ``i`` -> the representation the cosine reads, float32."""
        h = h.float()
        if i in self.mean:
            h = h - self.mean[i]
        if i in self.std:
            h = h / self.std[i]
        return h

    def summary(self) -> dict[str, Any]:
        """Numbers for the training record."""
        return {"space": self.space, "retain": "relative" if self.retain_scale else "absolute",
                **{f"mean_norm_{i}": round(float(m.norm()), 3) for i, m in self.mean.items()},
                **{f"std_min_max_{i}": [round(float(v.min()), 4), round(float(v.max()), 4)] for i, v in self.std.items()},
                **({"retain_scale": {str(i): round(v, 3) for i, v in self.retain_scale.items()}} if self.retain_scale else {})}


def fit_base_stats(pm: Any, examples: Sequence[Any], targets: tuple[int, int], *, space: str, retain: str, pad: int,
                   skip: int, batch_size: int, autocast: bool) -> BaseStats:
    """Per-dimension mean and std of the frozen base at ``targets``, and its mean token norm at every layer up to the second.

    Read on ``examples``' tokens (the benign retain sequences). Positions before ``skip`` (the
    template prefix, which holds the first token's outlier norms: 25,000 against about 200 on
    SmolLM2) are left out.
    """
    import torch

    from ..train.examples import collate

    if space not in SPACES:
        raise InputError(f"circuit breakers: space must be one of {', '.join(SPACES)}, got {space!r}")
    if retain not in RETAINS:
        raise InputError(f"circuit breakers: retain must be one of {', '.join(RETAINS)}, got {retain!r}")
    if space == "raw" and retain == "absolute":
        return BaseStats()
    if not examples:
        raise InputError("circuit breakers: no benign sequences to estimate the base's statistics from; "
                         "use space=raw and retain=absolute")
    dev = next(p.device for p in pm.parameters())
    sums: dict[int, Any] = {}
    sq: dict[int, Any] = {}
    norms: dict[int, float] = {}
    count = 0
    with torch.no_grad(), pm.disable_adapter():
        for k in range(0, len(examples), batch_size):
            b = collate(list(examples[k:k + batch_size]), pad, dev)
            got = hidden_states(pm, b, targets[1], autocast=autocast)
            m = b.attention_mask.bool() & (b.position_ids >= skip)  # (B, T)
            count += int(m.sum())
            for i, h in got.items():
                x = h.double()[m]  # (N, d)
                norms[i] = norms.get(i, 0.0) + float(x.norm(dim=-1).sum())
                if i in targets:
                    sums[i] = sums.get(i, 0) + x.sum(0)
                    sq[i] = sq.get(i, 0) + (x * x).sum(0)
    if count < 2:
        raise InputError("circuit breakers: the benign sequences have fewer than 2 tokens after the template prefix; "
                         "use space=raw and retain=absolute")
    out = BaseStats(space)
    if space != "raw":
        out.mean = {i: (sums[i] / count).float() for i in targets}  # (d,)
    if space == "standardised":
        for i in targets:
            var = (sq[i] / count - (sums[i] / count) ** 2).clamp(min=0.0)  # (d,)
            s_ = var.sqrt().float()
            out.std[i] = s_.clamp(min=1e-3 * float(s_.max()) + 1e-6)  # a dead dimension must not blow up
    if retain == "relative":
        out.retain_scale = {i: max(v / count, 1e-6) for i, v in sorted(norms.items())}
    return out


def reroute_loss(h: Any, h0: Any, mask: Any) -> Any:
    """``mean ReLU(cos(h, h0))`` over masked tokens. ``h, h0 (B, T, d)``, ``mask (B, T)`` bool."""
    import torch.nn.functional as F

    cos = F.cosine_similarity(h.float(), h0.float(), dim=-1)  # (B, T)
    return F.relu(cos)[mask].mean()


def retain_loss(h: Any, h0: Any, mask: Any) -> Any:
    """``mean ||h - h0||_2`` over masked tokens. ``h, h0 (B, T, d)``, ``mask (B, T)`` bool."""
    return (h.float() - h0.float()).norm(dim=-1)[mask].mean()  # (B, T) -> ()


@dataclass
class StepLosses:
    """``reroute`` (in the rerouting space) and ``retain`` carry gradients; ``raw_cos`` (the paper's cosine) is a detached float."""

    reroute: Any
    retain: Any
    raw_cos: float = float("nan")


def shared_prefix_length(tokenizer: Any, max_length: int) -> int:
    """Tokens the chat template puts before every user message (system prompt, user header).

    They read no part of the request (causal attention), so their representations are the same
    for harmful and benign prompts: rerouting them would fight the retain term for nothing.
    """
    from ..train.examples import prompt_ids

    a, b = prompt_ids(tokenizer, "alpha request", max_length), prompt_ids(tokenizer, "zulu question", max_length)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def step_losses(pm: Any, h_batch: Any, b_batch: Any, targets: tuple[int, int], *, autocast: bool, skip: int = 0,
                stats: BaseStats | None = None) -> StepLosses:
    """Rerouting loss on the harmful batch and retain loss on the benign batch, against the frozen base.

    Args:
        skip: positions at the start of every harmful sequence left out of the rerouting loss
            (the template prefix shared with benign prompts, see :func:`shared_prefix_length`).
        stats: the base's statistics: the rerouting space and the retain scale (see :class:`BaseStats`);
            None = the paper's raw cosine and absolute distance.
    """
    import torch

    last = targets[1]
    with torch.no_grad(), pm.disable_adapter():
        h0 = hidden_states(pm, h_batch, last, autocast=autocast)
        b0 = hidden_states(pm, b_batch, last, autocast=autocast)
    h = hidden_states(pm, h_batch, last, autocast=autocast)
    b = hidden_states(pm, b_batch, last, autocast=autocast)
    hm = h_batch.attention_mask.bool() & (h_batch.position_ids >= skip)  # (B, T): request, assistant header, answer
    bm = b_batch.attention_mask.bool()  # (B, T)
    st = stats or BaseStats()
    rr = torch.stack([reroute_loss(st.apply(i, h[i]), st.apply(i, h0[i]), hm) for i in targets]).mean()
    rt = torch.stack([retain_loss(b[i], b0[i], bm) / st.retain_scale.get(i, 1.0) for i in sorted(b)]).mean()
    with torch.no_grad():
        raw = float(torch.stack([reroute_loss(h[i], h0[i], hm) for i in targets]).mean()) if st.space != "raw" else float(rr)
    return StepLosses(rr, rt, raw)


def init_lora_b(params: dict[str, Any], std: float, seed: int) -> int:
    """Draw every LoRA ``B`` from ``N(0, std^2)`` under ``seed`` (PEFT starts them at 0); return how many were set."""
    import torch

    if std <= 0:
        return 0
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    n = 0
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
                n += 1
    return n


def train(ctx: MethodContext) -> TrainOutcome:
    """Reroute harmful representations with early-layer LoRA; write the adapter directory."""
    import torch

    from ..train.examples import collate
    from ..train.trainer import EpochSampler, lr_factor

    opts = ctx.options
    timings: dict[str, float] = {}
    # circuit breakers' own data adds the base's compliant answers to the shared sets
    cfg, lm, data = load_method_inputs(ctx, timings, harmful_answers=True)
    if not data.harmful_answers or not data.benign:
        raise InputError("circuit breakers need harmful answers and benign retain sequences; the base gave none")
    n_layers = int(lm.model.config.num_hidden_layers)
    targets = target_layers(n_layers, opts.get("target_layers"))
    adapted = list(range(targets[1]))  # decoder layers 0..b-1 shape hidden states 1..b
    seed = int(cfg.seed or 0)
    pm = make_peft_model(lm.model, rank=int(opts["rank"]), alpha=float(opts["alpha"]), modules=opts["modules"], layers=adapted,
                         seed=seed)
    params = lora_parameters(pm)
    init_lora_b(params, float(opts["init_b_std"]), seed)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    skip = shared_prefix_length(lm.tokenizer, cfg.max_length)
    dev = next(iter(params.values())).device
    with timed(timings, "base_stats_s"):
        n_stats = int(opts["stats_sequences"]) or len(data.benign)
        stats = fit_base_stats(pm, data.benign[:n_stats], targets, space=str(opts["space"]), retain=str(opts["retain"]), pad=pad,
                               skip=skip, batch_size=cfg.batch_size_detect, autocast=cfg.bf16)
    log.info("circuit breakers: rerouting in %s space at hidden states %s, %s retain", stats.space, list(targets), opts["retain"])
    hs, bs = EpochSampler(len(data.harmful_answers), seed, 1), EpochSampler(len(data.benign), seed, 2)
    a = float(opts["coefficient"])
    history: list[dict] = []
    log_path = ctx.out_dir / TRAIN_LOG
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="train (circuit breakers)", dynamic_ncols=True)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as logf:
        for step in range(cfg.steps):
            ts = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule)
            c_rr, c_rt = coefficients(step, cfg.steps, a)
            opt.zero_grad(set_to_none=True)
            acc = {"reroute": 0.0, "retain": 0.0, "total": 0.0, "cos_raw": 0.0}
            for m in range(cfg.grad_accum):
                micro = step * cfg.grad_accum + m
                hb = collate([data.harmful_answers[i] for i in hs.take(micro * cfg.batch_size, cfg.batch_size)], pad, dev)
                bb = collate([data.benign[i] for i in bs.take(micro * cfg.batch_size, cfg.batch_size)], pad, dev)
                losses = step_losses(pm, hb, bb, targets, autocast=cfg.bf16, skip=skip, stats=stats)
                total = c_rr * losses.reroute + c_rt * losses.retain
                if not bool(torch.isfinite(total)):
                    raise TrainingError(f"circuit breakers: loss became NaN or infinite at step {step + 1}; lower the learning rate")
                (total / cfg.grad_accum).backward()
                for k, v in (("reroute", losses.reroute), ("retain", losses.retain), ("total", total)):
                    acc[k] += float(v.detach()) / cfg.grad_accum
                acc["cos_raw"] += losses.raw_cos / cfg.grad_accum
            gn = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm or math.inf))
            opt.step()
            rec = {"step": step + 1, **{k: round(v, 6) for k, v in acc.items()}, "c_reroute": round(c_rr, 4),
                   "c_retain": round(c_rt, 4), "grad_norm": round(gn, 6), "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - ts, 3)}
            history.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if bar is not None:
                bar.set_postfix(reroute=f"{acc['reroute']:.3f}", retain=f"{acc['retain']:.3f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    timings["train_s"] = round(time.perf_counter() - t0, 3)
    peak = peak_rss_mb()
    art = save_adapter(pm, ctx.out_dir / ARTIFACT_DIR, base=str(cfg.model),
                       extra={"method": "cb", "target_hidden_states": list(targets), "adapted_layers": adapted,
                              "rank": opts["rank"], "coefficient": a, "steps": cfg.steps, "lr": cfg.lr,
                              "space": stats.space, "retain": opts["retain"], "init_b_std": opts["init_b_std"]})
    first, final = loss_summary(history, ("reroute", "retain", "total", "cos_raw"))
    return TrainOutcome(
        artifact=str(art), artifact_kind="peft-lora", artifact_bytes=path_bytes(art),
        trainable_parameters=int(sum(p.numel() for p in params.values())),
        train_seconds=round(timings["train_s"] + timings.get("harmful_answers_s", 0.0), 3), peak_rss_mb=round(peak, 1),
        loss_first=first, loss_final=final,
        scope=f"LoRA r={opts['rank']} on all linear layers of decoder layers 0-{adapted[-1]}; rerouting ({stats.space}) at "
              f"hidden states {targets[0]} and {targets[1]} of {n_layers}",
        timings=timings,
        details={"target_hidden_states": list(targets), "adapted_layers": [adapted[0], adapted[-1]], "rank": opts["rank"],
                 "rerouting_skips_prefix_tokens": skip, "base_stats": stats.summary(),
                 "init_b_std": opts["init_b_std"],
                 "coefficient": a, "steps": cfg.steps, "lr": cfg.lr, "harmful_answers": len(data.harmful_answers), "data": data.info},
    )


def load_merged(lm: LoadedModel, outcome: TrainOutcome) -> Any:
    """A copy of the base with the rerouting adapter merged in."""
    return merge_adapter(lm, outcome.artifact)
