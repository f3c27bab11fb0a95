"""Speed changes of the training loop give the same losses and gradients as the plain path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from nestpatch.models.naming import MLPRef
from nestpatch.train.adapter import SharedDeltas, TargetSpec
from nestpatch.train.config import TrainConfig
from nestpatch.train.examples import Example
from nestpatch.train.trainer import Trainer, sparse_head_ok


@pytest.fixture(scope="module")
def model() -> Any:
    from nestpatch.testing import make_pico_model

    return make_pico_model(seed=0)


def _examples(n: int, kind: str, rng: np.random.Generator) -> list[Example]:
    out = []
    for i in range(n):  # responses of different lengths: most of the kept window is unlabelled for short rows
        prompt = rng.integers(10, 40000, size=int(rng.integers(5, 12))).tolist()
        resp = rng.integers(10, 40000, size=int(rng.integers(2, 14))).tolist()
        out.append(Example(kind, f"p{i}", prompt, resp))
    return out


def _losses_and_grads(tr: Trainer, deltas: SharedDeltas) -> tuple[dict[str, float], list[torch.Tensor]]:
    """One micro-batch of 4 harmful + 4 benign rows: its losses and the deltas' gradients."""
    for p in deltas.parameters():
        p.grad = None
    losses = tr.micro_step([0, 1, 2, 3], [0, 1, 2, 3])
    losses["total"].backward()
    return {k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in deltas.parameters()]


@pytest.mark.parametrize("retain", ["ce", "kl"])
def test_sparse_head_gives_the_same_losses_and_gradients(model: Any, retain: str) -> None:
    assert sparse_head_ok(model)
    specs = [TargetSpec(MLPRef(0, "gate_proj"), np.array([3, 9, 40]), np.array([0, 1, 0])),
             TargetSpec(MLPRef(1, "down_proj"), np.array([2, 33, 200]), np.array([1, 0, 1]))]
    deltas = SharedDeltas(model, specs).attach()
    try:
        with torch.no_grad():
            for p in deltas.parameters():
                p.normal_(0, 0.05)
        rng = np.random.default_rng(0)
        h, b = _examples(4, "harmful", rng), _examples(4, "benign", rng)
        cfg = TrainConfig(model="pico", out="x.nestpatch", batch_size=4, retain_loss=retain, benign_refusal_weight=0.5, seed=0)
        tr = Trainer(model, deltas, h, b, cfg, pad_id=2)
        results = []
        for sparse in (False, True):
            tr.sparse_head = sparse
            results.append(_losses_and_grads(tr, deltas))
        (l0, g0), (l1, g1) = results
        assert l0.keys() == l1.keys() and {"refusal", "retain", "benign_refusal"} <= set(l0)
        for k in l0:
            assert l1[k] == pytest.approx(l0[k], rel=1e-5, abs=1e-6), k
        for a, c in zip(g0, g1):  # the two paths sum in other orders across threads: tolerance relative to the gradient's scale
            torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()))
        assert any(float(g.abs().sum()) > 0 for g in g0)
    finally:
        deltas.detach()


def test_activation_checkpointing_gives_the_same_losses_and_gradients_and_unwraps(model: Any) -> None:
    """One micro-batch with and without checkpointed decoder layers: the same losses and gradients; forwards come back."""
    from nestpatch.train.trainer import checkpointed_layers

    specs = [TargetSpec(MLPRef(0, "up_proj"), np.array([5, 17, 90, 130]), np.array([0, 1, 1, 0])),
             TargetSpec(MLPRef(1, "gate_proj"), np.array([1, 64]), np.array([0, 0]))]
    deltas = SharedDeltas(model, specs).attach()
    layers = model.get_decoder().layers
    try:
        with torch.no_grad():
            for p in deltas.parameters():
                p.normal_(0, 0.05)
        rng = np.random.default_rng(1)
        h, b = _examples(4, "harmful", rng), _examples(4, "benign", rng)
        tr = Trainer(model, deltas, h, b, TrainConfig(model="pico", out="x.nestpatch", batch_size=4, seed=0), pad_id=2)
        results = []
        for ckpt in (False, True):
            with checkpointed_layers(model, ckpt) as n:
                assert n == (len(layers) if ckpt else 0)
                assert all(("forward" in vars(layer)) == ckpt for layer in layers)
                results.append(_losses_and_grads(tr, deltas))
        (l0, g0), (l1, g1) = results
        for k in l0:
            assert l1[k] == pytest.approx(l0[k], rel=1e-5, abs=1e-6), k
        for a, c in zip(g0, g1):
            torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()))
        assert all(float(g.abs().sum()) > 0 for g in g0)
        assert all("forward" not in vars(layer) for layer in layers)  # unwrapped on exit
    finally:
        deltas.detach()
