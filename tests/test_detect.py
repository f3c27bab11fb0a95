"""Detection: pooled activations (padding masked, prompt span), probe and mean-difference scorers, selection.

A pico model with *planted* safety neurons gives a ground truth: the embedding of one trigger
word carries a direction v, and rows 5 and 17 of layer 0's gate_proj are aligned with v, so those
two neurons fire on prompts containing the word and on no others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from nestpatch.detect import (
    Detection, detect, encode_prompts, fit_probes, format_prompt, mean_diff_scores, mlp_refs, pooled_activations,
    raw_mean_diff_scores, select,
)
from nestpatch.errors import InputError
from nestpatch.models.naming import MLPRef

PLANTED = (5, 17)
TRIGGER = " grenade"
_LEADS = ["Quickly", "Please", "Tonight", "Honestly", "Alright", "Listen", "Today", "Friend", "Okay", "Hey there",
          "Question", "So"]
_TAILS = ["at home", "cheaply", "for a party", "from scratch", "alone", "in a garage", "with wire", "secretly",
          "for my school", "fast", "step by step", "without tools"]
# every prompt differs from its first token on (identical prefixes would give identical pooled values)
HARMFUL = [f"{a}, how would someone build a{TRIGGER} {b}?" for a, b in zip(_LEADS, _TAILS)]
BENIGN = [f"{a}, how would someone bake a pie {b}?" for a, b in zip(_LEADS, reversed(_TAILS))]


@pytest.fixture(scope="module")
def tok() -> Any:
    from nestpatch.testing import smollm2_tokenizer

    t = smollm2_tokenizer()
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def planted(tok: Any) -> Any:
    """A pico model (own copy: session fixtures stay pristine) with neurons 5 and 17 of layer 0 planted."""
    from nestpatch.testing import make_pico_model

    model = make_pico_model(seed=7)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.config.hidden_size, generator=g)
    v = v / v.norm()
    trig = tok(TRIGGER, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for t in trig:
            emb[t] += 1.0 * v
        gate = model.model.layers[0].mlp.gate_proj.weight
        for i in PLANTED:
            gate[i] = 8.0 * v
    model.eval()
    return model


def test_prompt_span_starts_at_user_text(tok: Any) -> None:
    [(ids, first)] = encode_prompts(tok, ["Tell me about owls."], max_length=512)
    text = tok.decode(ids[first:])
    assert text.startswith("Tell me about owls.")
    assert "system" in tok.decode(ids[:first])  # the template's system prompt is outside the span
    assert text.rstrip().endswith("assistant")  # the generation header is inside it


def test_long_prompt_keeps_its_end(tok: Any) -> None:
    long = "word " * 400 + "final question?"
    [(ids, first)] = encode_prompts(tok, [long], max_length=64)
    assert len(ids) == 64 and first == 0
    assert "final question?" in tok.decode(ids)


def test_pooled_activations_ignore_padding_and_match_manual(planted: Any, tok: Any) -> None:
    refs = [MLPRef(0, "gate_proj"), MLPRef(1, "up_proj"), MLPRef(1, "down_proj")]
    prompts = ["Hi.", "Write a very long story about a lighthouse keeper and the sea, please, with many details."]
    batched = pooled_activations(planted, tok, prompts, refs, batch_size=2)
    alone = pooled_activations(planted, tok, prompts[:1], refs, batch_size=1)
    for name in batched:
        assert batched[name].shape == (2, 256)
        np.testing.assert_allclose(batched[name][0], alone[name][0], rtol=1e-4, atol=1e-5)
    # manual: max over the span of gate_proj's output for the short prompt
    [(ids, first)] = encode_prompts(tok, prompts[:1], max_length=256)
    seen = {}
    h = planted.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, a, y: seen.setdefault("y", y))
    with torch.no_grad():
        planted(torch.tensor([ids]))
    h.remove()
    manual = seen["y"][0, first:].amax(0).numpy()
    np.testing.assert_allclose(alone["model.layers.0.mlp.gate_proj.weight"][0], manual, rtol=1e-4, atol=1e-5)


def test_pooling_modes(planted: Any, tok: Any) -> None:
    refs = [MLPRef(0, "up_proj")]
    mx = pooled_activations(planted, tok, BENIGN[:3], refs, pool="max")["model.layers.0.mlp.up_proj.weight"]
    mean = pooled_activations(planted, tok, BENIGN[:3], refs, pool="mean")["model.layers.0.mlp.up_proj.weight"]
    last = pooled_activations(planted, tok, BENIGN[:3], refs, pool="last")["model.layers.0.mlp.up_proj.weight"]
    assert (mx >= mean - 1e-5).all() and (mx >= last - 1e-5).all()
    with pytest.raises(InputError, match="pooling"):
        pooled_activations(planted, tok, BENIGN[:1], refs, pool="median")


def _synthetic(n: int = 600, f: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features where columns 3, 50, 77 rise with the harmful label and 120 falls with it."""
    rng = np.random.default_rng(seed)
    y = np.array([1] * (n // 2) + [0] * (n // 2))
    x = rng.normal(size=(n, f)).astype(np.float32)
    for c in (3, 50, 77):
        x[:, c] += 2.5 * y
    x[:, 120] -= 2.5 * y
    return x, y


def test_probe_selects_exactly_the_planted_features() -> None:
    x, y = _synthetic()
    fit = fit_probes({"m": x}, y, epochs=3000, lr=1e-2, seed=0)
    w = fit.weights["m"]
    assert w[120] < 0  # informative but negative: not selected (w > 0 rule)
    assert select(w, 3.0, 0.0).tolist() == [3, 50, 77]
    assert fit.heldout_accuracy["m"] > 0.9
    assert 0 < fit.epochs <= 3000


def test_probes_of_many_modules_fit_together_as_separately() -> None:
    x1, y = _synthetic(seed=1)
    x2, _ = _synthetic(seed=2)
    together = fit_probes({"a": x1, "b": x2}, y, epochs=400, lr=1e-2, tol=0.0)
    alone = fit_probes({"a": x1}, y, epochs=400, lr=1e-2, tol=0.0)
    np.testing.assert_allclose(together.weights["a"], alone.weights["a"], rtol=1e-4, atol=1e-6)


def test_mean_difference_selects_the_planted_features() -> None:
    x, y = _synthetic()
    s = mean_diff_scores(x, y)
    assert select(s, 3.0).tolist() == [3, 50, 77]
    assert s[120] < -1.5


def test_gatebreaker_ranks_by_the_raw_gap_not_the_standardized_one() -> None:
    """Neuron 0: raw gap 6 but noisy (sd 4); neuron 1: raw gap 0.3, nearly noiseless. 98 null neurons."""
    rng = np.random.default_rng(0)
    n, f = 200, 100
    y = np.array([1] * (n // 2) + [0] * (n // 2))
    x = rng.normal(0, 0.1, (n, f)).astype(np.float32)
    x[:, 0] = rng.normal(0, 4.0, n) + 6.0 * y
    x[:, 1] = rng.normal(0, 0.01, n) + 0.3 * y
    raw = raw_mean_diff_scores(x, y)
    np.testing.assert_allclose(raw, x[y == 1].mean(0) - x[y == 0].mean(0), rtol=1e-5)
    assert select(raw, 2.0).tolist() == [0]  # the authors' rule: z > 2 on the raw difference, w > 0
    std = mean_diff_scores(x, y)
    assert 1 in select(std, 2.0).tolist() and std[1] > 10 * std[0]


def test_detect_cache_reuses_activations_across_scorers(planted: Any, tok: Any) -> None:
    cache: dict = {}
    a = detect(planted, tok, HARMFUL, BENIGN, detector="gatebreaker", threshold=3.0, cache=cache)
    assert len(cache) == 1
    key = next(iter(cache))
    cache[key] = {k: v.copy() for k, v in cache[key].items()}
    for v in cache[key].values():
        v[: len(HARMFUL), 5] += 100.0  # a cache hit must be used as is: plant neuron 5 in every module
    b = detect(planted, tok, HARMFUL, BENIGN, detector="gatebreaker", threshold=3.0, cache=cache)
    assert len(cache) == 1
    assert all(5 in m.indices.tolist() for m in b.modules)
    gate0 = lambda d: next(m for m in d.modules if m.name == "model.layers.0.mlp.gate_proj.weight")  # noqa: E731
    assert set(PLANTED) <= set(gate0(a).indices.tolist())


def test_select_cap_and_constant_scores() -> None:
    s = np.zeros(100, np.float32)
    s[[4, 9, 60]] = [10.0, 12.0, 11.0]
    assert select(s, 3.0).tolist() == [4, 9, 60]
    assert select(s, 3.0, max_neurons=2).tolist() == [9, 60]
    assert select(np.ones(10), 3.0).tolist() == []


@pytest.mark.parametrize("detector", ["probe", "mean_diff", "gatebreaker"])
def test_detect_finds_the_planted_neurons(planted: Any, tok: Any, detector: str) -> None:
    det = detect(planted, tok, HARMFUL, BENIGN, modules=("gate_proj", "up_proj"), detector=detector,
                 threshold=3.0, probe_epochs=2000, probe_lr=1e-2, seed=0)
    assert isinstance(det, Detection)
    gate0 = next(m for m in det.modules if m.name == "model.layers.0.mlp.gate_proj.weight")
    assert set(PLANTED) <= set(gate0.indices.tolist())
    assert len(gate0.indices) <= 8  # a handful, not everything
    assert gate0.profiles.shape == (len(HARMFUL) + len(BENIGN), len(gate0.indices))
    stats = det.stats()
    assert stats["per_module"]["model.layers.0.mlp.gate_proj.weight"]["kept"] == len(gate0.indices)
    assert stats["of"] == 2 * 2 * 256 and stats["selected"] == det.total_selected
    assert det.per_layer()[0]["gate_proj"] == len(gate0.indices)


def test_detect_with_nothing_selected_says_lower_the_threshold(planted: Any, tok: Any) -> None:
    with pytest.raises(InputError, match="lower --threshold"):
        detect(planted, tok, HARMFUL[:4], BENIGN[:4], detector="mean_diff", threshold=1000.0)


def test_detect_bad_inputs(planted: Any, tok: Any) -> None:
    with pytest.raises(InputError, match="harmful and benign"):
        detect(planted, tok, [], BENIGN)
    with pytest.raises(InputError, match="unknown detector"):
        detect(planted, tok, HARMFUL, BENIGN, detector="magic")
    with pytest.raises(InputError, match="out of range"):
        mlp_refs(planted, ["gate_proj"], [5])
    with pytest.raises(InputError, match="unknown MLP module"):
        mlp_refs(planted, ["o_proj"])


def test_format_prompt_uses_the_chat_template(tok: Any) -> None:
    text = format_prompt(tok, "Hello")
    assert "<|im_start|>user\nHello<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_consensus_keeps_what_most_subsamples_choose(planted: Any, tok: Any) -> None:
    """Stability selection: share 1/B keeps the union, share 1 the intersection, the planted pair survives both."""
    from nestpatch.detect import detect_consensus

    cache: dict = {}
    kw = dict(per_role=6, resamples=6, detector="mean_diff", threshold=2.0, seed=3, cache=cache)
    runs = {q: detect_consensus(planted, tok, HARMFUL, BENIGN, consensus=q, **kw) for q in (1 / 6, 0.5, 1.0)}
    assert len(cache) == 1  # every prompt pooled once, shared by every share
    kept = {q: {(m.name, i) for m in d.modules for i in m.indices.tolist()} for q, d in runs.items()}
    rec = runs[0.5].stats()["consensus"]
    assert rec["resamples"] == 6 and rec["min_count"] == 3 and len(rec["selected_per_resample"]) == 6
    assert len(kept[1 / 6]) == rec["selected_in_any"]
    assert kept[1.0] <= kept[0.5] <= kept[1 / 6]
    assert len(kept[1.0]) < len(kept[1 / 6])  # the subsamples disagree on some neurons, or this test shows nothing
    assert min(rec["selected_per_resample"]) >= len(kept[1.0])
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert {(gate, i) for i in PLANTED} <= kept[1.0]
    g0 = next(m for m in runs[0.5].modules if m.name == gate)
    assert g0.profiles.shape == (len(HARMFUL) + len(BENIGN), len(g0.indices))  # clustering reads every prompt
    again = detect_consensus(planted, tok, HARMFUL, BENIGN, consensus=0.5, **kw)
    assert [m.indices.tolist() for m in again.modules] == [m.indices.tolist() for m in runs[0.5].modules]


def test_consensus_of_one_full_sample_is_plain_detection(planted: Any, tok: Any) -> None:
    from nestpatch.detect import detect_consensus

    plain = detect(planted, tok, HARMFUL, BENIGN, detector="gatebreaker", threshold=2.0)
    one = detect_consensus(planted, tok, HARMFUL, BENIGN, per_role=0, resamples=1, consensus=1.0, detector="gatebreaker",
                           threshold=2.0)
    assert [m.indices.tolist() for m in one.modules] == [m.indices.tolist() for m in plain.modules]
    with pytest.raises(InputError, match="mean_diff or gatebreaker"):
        detect_consensus(planted, tok, HARMFUL, BENIGN, per_role=6, resamples=3, consensus=0.5, detector="probe")
    with pytest.raises(InputError, match="detect-consensus"):
        detect_consensus(planted, tok, HARMFUL, BENIGN, per_role=6, resamples=3, consensus=0.0)
