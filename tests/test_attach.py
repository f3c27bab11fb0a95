"""attach/detach on live torch models: exact restore, swap, fingerprint refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestpatch.errors import BaseMismatchError, InputError
from nestpatch.format import read_patch, write_patch
from nestpatch.runtime.attach import attach, attached_patches
from nestpatch.testing.pico import make_pico_model, random_patch


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attach_matches_dense_update_and_detach_is_bit_exact(dtype):
    model = make_pico_model(seed=0).to(dtype)
    patch = random_patch(make_pico_model(seed=0), seed=1, scale=0.3)
    before = _state(model)
    handle = attach(model, patch)
    assert handle.attached and attached_patches(model) == [handle]
    for t in patch.targets:
        w = model.get_parameter(t.name)
        expected = (before[t.name].float() + torch.from_numpy(t.dense_update())).to(dtype)
        assert torch.equal(w, expected), t.name  # float32 arithmetic, then one cast
        assert not torch.equal(w, before[t.name])
    untouched = [k for k in before if k not in {t.name for t in patch.targets}]
    for k in untouched:
        assert torch.equal(model.state_dict()[k], before[k])
    handle.detach()
    handle.detach()  # idempotent
    assert not handle.attached and attached_patches(model) == []
    _assert_bit_equal(_state(model), before)


def test_context_manager_and_logits_change():
    model = make_pico_model(seed=0)
    patch = random_patch(model, seed=2, scale=1.0)
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        base = model(ids).logits
        with attach(model, patch) as h:
            patched = model(ids).logits
            assert h.attached
        again = model(ids).logits
    assert torch.equal(base, again)
    assert float((patched - base).abs().max()) > 1e-3


def test_swap_two_patches_without_reload(tmp_path):
    model = make_pico_model(seed=0)
    before = _state(model)
    pa = random_patch(model, seed=3)
    pb = read_patch(write_patch(random_patch(model, seed=4, modules=("down_proj",)), tmp_path / "b.nestpatch"))
    ha = attach(model, pa)
    after_a = _state(model)
    hb = ha.swap(pb)
    assert not ha.attached and hb.attached
    for t in pb.targets:  # b on top of the ORIGINAL weights, not on top of a
        expected = before[t.name] + torch.from_numpy(t.dense_update())
        assert torch.equal(model.get_parameter(t.name), expected)
    for t in pa.targets:
        if t.name not in {u.name for u in pb.targets}:
            assert torch.equal(model.get_parameter(t.name), before[t.name])
    hc = hb.swap(pa)
    _assert_bit_equal(_state(model), after_a)
    hc.detach()
    _assert_bit_equal(_state(model), before)


def test_stacked_patches_detach_lifo():
    model = make_pico_model(seed=0)
    before = _state(model)
    h1 = attach(model, random_patch(model, seed=5))
    h2 = attach(model, random_patch(model, seed=6), verify_base=False)  # overlapping neurons
    with pytest.raises(RuntimeError, match="reverse order"):
        h1.detach()
    h2.detach()
    h1.detach()
    _assert_bit_equal(_state(model), before)


def test_patch_for_another_model_is_refused_and_model_untouched():
    model = make_pico_model(seed=0)
    other = make_pico_model(seed=7)
    before = _state(other)
    patch = random_patch(model, seed=8)
    with pytest.raises(BaseMismatchError, match="does not match the patch's base model"):
        attach(other, patch)
    _assert_bit_equal(_state(other), before)
    assert attached_patches(other) == []
    attach(other, patch, verify_base=False).detach()  # the check can be skipped on purpose


def test_shape_mismatch_is_refused():
    patch = random_patch(make_pico_model(seed=0), seed=9)
    wider = make_pico_model(seed=0, intermediate_size=128)
    with pytest.raises(BaseMismatchError, match="n_ff|shape"):
        attach(wider, patch)


def test_require_signature(tmp_path):
    pytest.importorskip("cryptography")
    from nestpatch.audit.signing import generate_keypair, sign_patch
    from nestpatch.errors import SignatureError

    model = make_pico_model(seed=0)
    before = _state(model)
    path = write_patch(random_patch(model, seed=10), tmp_path / "p.nestpatch")
    key, pub, _ = generate_keypair(tmp_path / "k")
    with pytest.raises(SignatureError, match="not signed"):
        attach(model, read_patch(path), require_signature=pub)
    sign_patch(path, key)
    signed = read_patch(path)
    attach(model, signed, require_signature=pub).detach()
    other_key, other_pub, _ = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="another key"):
        attach(model, signed, require_signature=other_pub)
    _assert_bit_equal(_state(model), before)
    seen = []
    attach(model, signed, require_signature=seen.append).detach()  # a checking callable
    assert seen == [signed]


def test_non_finite_result_rolls_back():
    model = make_pico_model(seed=0)
    before = _state(model)
    patch = random_patch(model, seed=11)
    patch.targets[-1].deltas = np.full_like(patch.targets[-1].deltas, np.inf)
    with pytest.raises(InputError, match="non-finite"):
        attach(model, patch, verify_base=False)
    _assert_bit_equal(_state(model), before)
    assert attached_patches(model) == []
