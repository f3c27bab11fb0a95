"""The optimisation loop: AdamW on the shared deltas, refusal CE + retain term, checkpoints, NaN stop.

Each micro-batch holds ``batch_size`` harmful and ``batch_size`` benign sequences in one forward
pass. Which examples a step sees is a pure function of ``(seed, step)`` (per-epoch permutations
seeded by the epoch number), so a resumed run sees exactly the batches the interrupted one would
have seen; with no dropout in eval mode, the whole run is deterministic under ``--seed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import TrainingError
from .adapter import SharedDeltas
from .checkpoint import CheckpointDir, restore_optimizer
from .config import TrainConfig
from .examples import Batch, Example, collate
from .losses import head_weights, sequence_unlikelihood, token_ce, token_kl

log = logging.getLogger(__name__)


@contextlib.contextmanager
def checkpointed_layers(model: Any, enabled: bool = True) -> Iterator[int]:
    """Activation checkpointing of every decoder layer while the block runs; yields the number of layers wrapped.

    Why: on a CPU with a 0.5B model, the activations a backward pass keeps (about 100 KB per token
    and layer: attention projections, four MLP intermediates of ``n_ff``, the patch's hook outputs)
    were most of training's peak memory. A checkpointed layer keeps only its input and runs its
    forward again during backward (about a third more compute). The recomputation runs the same
    kernels on the same inputs, so losses and gradients are unchanged; the patch's forward hooks
    fire again inside it, as they must. Done here with ``torch.utils.checkpoint`` (non-reentrant)
    rather than a transformers switch, whose name and behaviour change across versions; layers
    are found as ``model.get_decoder().layers``.
    """
    layers = getattr(model.get_decoder(), "layers", None) if enabled else None
    if layers is None:
        if enabled:
            log.warning("activation checkpointing: no decoder layers found; training without it")
        yield 0
        return
    from torch.utils.checkpoint import checkpoint

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpointed

    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


class EpochSampler:
    """Indices ``[start, start + n)`` of an endless stream of seeded per-epoch permutations of ``range(size)``."""

    def __init__(self, size: int, seed: int, salt: int) -> None:
        self.size, self.seed, self.salt = size, seed, salt
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.size)}
        return self._perms[epoch]

    def take(self, start: int, n: int) -> list[int]:
        return [int(self._perm(k // self.size)[k % self.size]) for k in range(start, start + n)]

    def seen(self, draws: int) -> int:
        """How many distinct indices the first ``draws`` draws hold: each epoch is a permutation, so ``min(draws, size)``."""
        return min(max(0, draws), self.size)


#: Causal LMs whose logits are exactly ``lm_head(final hidden state)`` (no soft-capping or scaling after the head).
_PLAIN_HEAD = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "smollm3")


def sparse_head_ok(model: Any) -> bool:
    """Whether the LM head may run on the labelled positions alone (see :meth:`Trainer._forward_keep`)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) in _PLAIN_HEAD and hasattr(model, "get_decoder")
            and model.get_output_embeddings() is not None)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up, then cosine or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@dataclass
class TrainSummary:
    """What the loop did."""

    steps: int
    start_step: int
    final: dict = field(default_factory=dict)  # mean losses over the last 10 steps
    first: dict = field(default_factory=dict)  # losses of the first step run
    wall_s: float = 0.0
    coverage: dict = field(default_factory=dict)  # see Trainer.coverage


class Trainer:
    """Runs the loop for ``cfg.steps`` optimizer steps.

    Args:
        model: the frozen causal LM (hooks of ``deltas`` attached).
        deltas: the trainable shared deltas.
        harmful, benign: training sequences (refusal targets / base answers).
        log_path: JSONL file, one line per step (appended, so a resumed run continues it).
        ckpt: checkpoint directory or ``None``.
        progress: callable ``(total, initial) -> tqdm-like`` or ``None``.
    """

    def __init__(self, model: Any, deltas: SharedDeltas, harmful: Sequence[Example], benign: Sequence[Example], cfg: TrainConfig,
                 *, pad_id: int, log_path: Path | None = None, ckpt: CheckpointDir | None = None,
                 progress: Callable[..., Any] | None = None, ckpt_meta: dict | None = None) -> None:
        self.model, self.deltas, self.cfg = model, deltas, cfg
        self.harmful, self.benign = list(harmful), list(benign)
        self.pad_id, self.log_path, self.ckpt, self.progress = pad_id, log_path, ckpt, progress
        self.ckpt_meta = ckpt_meta or {}
        self.names = [s.name for s in deltas.specs]
        self.params = [deltas.deltas[k] for k in deltas.deltas.keys()]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.device = model.get_input_embeddings().weight.device  # where inputs go (device_map may spread the layers)
        seed = int(cfg.seed or 0)
        self.h_sampler = EpochSampler(len(self.harmful), seed, 1)
        self.b_sampler = EpochSampler(len(self.benign), seed, 2) if self.benign else None
        self.last_saved_step: int | None = None
        self.sparse_head = sparse_head_ok(model)

    def coverage(self) -> dict[str, int]:
        """How many of the training sequences the ``steps x grad_accum x batch_size`` draws ever reach.

        Why: which rare harmful requests a run trains on was left to the seed when the steps drew
        less than one epoch (docs/RESULTS.md, session 16: on Qwen2.5-Coder-1.5B, refusing persuasive
        misinformation went with the steps having drawn the few persuasive-writing rows). The figure
        goes into the patch's provenance and the log, so a run that skips part of its data says so.
        """
        draws = self.cfg.steps * self.cfg.grad_accum * self.cfg.batch_size
        return {"harmful_sequences": len(self.harmful), "harmful_seen": self.h_sampler.seen(draws),
                "benign_sequences": len(self.benign), "benign_seen": self.b_sampler.seen(draws) if self.b_sampler else 0}

    # -- one micro-batch ------------------------------------------------------------------------
    def _forward_keep(self, b: Batch, rows: slice = slice(None)) -> torch.Tensor:
        """Logits of the last ``L`` positions, ``(B, L, V)``; with :attr:`sparse_head` only at labelled positions.

        Why sparse: every loss reads ``logits[labels != -100]`` only, and ``L`` is the longest
        response of the batch, so most of the window is padding for the other rows. On a 152k
        vocabulary (Qwen2.5) the head is a quarter of a training step; running it on the labelled
        positions alone gives the same losses and gradients (other positions stay zero, which no
        loss reads).
        """
        ids, mask, pos, labels = b.input_ids[rows], b.attention_mask[rows], b.position_ids[rows], b.labels[rows]
        if not self.sparse_head:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=b.keep)
            return out.logits  # (B, L, V)
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                          use_cache=False).last_hidden_state[:, -b.keep:]  # (B, L, d)
        sel = labels != -100  # (B, L)
        head = self.model.get_output_embeddings()
        picked = head(hidden[sel])  # (N, V)
        logits = picked.new_zeros(*sel.shape, picked.shape[-1])  # (B, L, V)
        return logits.index_put((sel,), picked)

    def micro_step(self, h_idx: list[int], b_idx: list[int]) -> dict[str, torch.Tensor]:
        """Forward + losses for one micro-batch: harmful rows, benign rows, then (with the unlikelihood
        term on) each benign prompt followed by the opening of a harmful row's refusal target."""
        cfg = self.cfg
        harm = [self.harmful[i] for i in h_idx]
        ben = [self.benign[i] for i in b_idx]
        neg: list[Example] = []
        if cfg.benign_refusal_weight > 0 and harm:
            neg = [Example("benign-refusal", b.prompt, b.prompt_ids, harm[i % len(harm)].response_ids[:cfg.benign_refusal_tokens])
                   for i, b in enumerate(ben)]
        batch = collate(harm + ben + neg, self.pad_id, self.device)
        nh, nb = len(harm), len(ben)
        w = head_weights(batch.response_pos, cfg.head_tokens, cfg.head_weight)
        ac = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        with ac:
            logits = self._forward_keep(batch)
        refusal = token_ce(logits[:nh], batch.labels[:nh], None if w is None else w[:nh])
        losses = {"refusal": refusal}
        total = refusal
        if ben and cfg.retain_loss != "none":
            lb, labels_b = logits[nh:nh + nb], batch.labels[nh:nh + nb]
            wb = None if w is None else w[nh:nh + nb]
            if cfg.retain_loss == "ce":
                retain = token_ce(lb, labels_b, wb)
            else:
                sl = slice(nh, nh + nb)
                with torch.no_grad(), self.deltas.disabled(), ac:
                    base = self._forward_keep(batch, sl)
                retain = token_kl(lb, base, labels_b != -100, wb)
            losses["retain"] = retain
            total = total + cfg.retain_weight * retain
        if neg:
            unlikely = sequence_unlikelihood(logits[nh + nb:], batch.labels[nh + nb:])
            losses["benign_refusal"] = unlikely
            total = total + cfg.benign_refusal_weight * unlikely
        losses["total"] = total
        return losses

    # -- the loop -------------------------------------------------------------------------------
    def run(self, start_step: int = 0) -> TrainSummary:
        cfg = self.cfg
        cover = self.coverage()
        if cover["harmful_seen"] < cover["harmful_sequences"]:
            per_epoch = math.ceil(cover["harmful_sequences"] / (cfg.batch_size * cfg.grad_accum))
            log.info("the %d steps draw %d of the %d harmful training sequences (%d steps see every one)",
                     cfg.steps, cover["harmful_seen"], cover["harmful_sequences"], per_epoch)
        bar = self.progress(total=cfg.steps, initial=start_step) if self.progress else None
        history: list[dict] = []
        t0 = time.time()
        first: dict = {}
        logf = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(checkpointed_layers(self.model, cfg.activation_checkpointing))
            for step in range(start_step, cfg.steps):
                ts = time.time()
                for g in self.opt.param_groups:  # a pure function of the step: a resumed run continues the schedule exactly
                    g["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule)
                self.opt.zero_grad(set_to_none=True)
                acc: dict[str, float] = {}
                for m in range(cfg.grad_accum):
                    micro = step * cfg.grad_accum + m
                    h_idx = self.h_sampler.take(micro * cfg.batch_size, cfg.batch_size)
                    b_idx = self.b_sampler.take(micro * cfg.batch_size, cfg.batch_size) if self.b_sampler else []
                    losses = self.micro_step(h_idx, b_idx)
                    total = losses["total"]
                    if not bool(torch.isfinite(total)):
                        self._stop_nan(step, "loss")
                    (total / cfg.grad_accum).backward()
                    for k, v in losses.items():
                        acc[k] = acc.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                grad_norm = self._clip()
                if not math.isfinite(grad_norm):
                    self._stop_nan(step, "gradient")
                self.opt.step()
                if not all(bool(torch.isfinite(p).all()) for p in self.params):
                    self._stop_nan(step, "a delta")
                rec = {"step": step + 1, **{k: round(v, 6) for k, v in acc.items()}, "grad_norm": round(grad_norm, 6),
                       "lr": self.opt.param_groups[0]["lr"], "seconds": round(time.time() - ts, 3),
                       "delta_rms": round(self._delta_rms(), 6)}
                history.append(rec)
                if not first:
                    first = rec
                if logf:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                if bar is not None:
                    bar.set_postfix(refusal=f"{acc['refusal']:.3f}", retain=f"{acc.get('retain', 0.0):.3f}")
                    bar.update(1)
                if self.ckpt and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    self.save(step + 1)
        finally:
            stack.close()
            if logf:
                logf.close()
            if bar is not None:
                bar.close()
        tail = history[-10:]
        final = {k: round(float(np.mean([r[k] for r in tail])), 6) for k in ("refusal", "retain", "benign_refusal", "total")
                 if tail and k in tail[0]}
        return TrainSummary(steps=cfg.steps, start_step=start_step, final=final, first=first, wall_s=time.time() - t0,
                            coverage=cover)

    def _clip(self) -> float:
        if self.cfg.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None])))

    def _delta_rms(self) -> float:
        with torch.no_grad():
            tot = sum(float((p.double() ** 2).sum()) for p in self.params)
            n = sum(p.numel() for p in self.params)
        return math.sqrt(tot / max(1, n))

    def _stop_nan(self, step: int, what: str) -> None:
        where = (f"the last good checkpoint (step {self.last_saved_step}) is kept in {self.ckpt.path}; resume with --resume and a lower --lr"
                 if self.ckpt and self.last_saved_step is not None else "no checkpoint was saved yet; lower --lr and start again")
        raise TrainingError(f"{what} became NaN or infinite at step {step + 1}; stopped, no patch written; {where}")

    def save(self, step: int) -> None:
        """Checkpoint the deltas and optimizer after ``step`` steps."""
        if not self.ckpt:
            return
        self.ckpt.save_state(step, self.deltas.state_tensors(), self.opt, self.names, self.ckpt_meta)
        self.last_saved_step = step
        log.info("checkpoint at step %d in %s", step, self.ckpt.path)

    def restore(self, deltas: dict[str, torch.Tensor], adam: dict[str, dict[str, torch.Tensor]]) -> None:
        self.deltas.load_state_tensors(deltas)
        restore_optimizer(self.opt, self.params, self.names, adam)
