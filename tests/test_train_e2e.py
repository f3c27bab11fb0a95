"""End to end on the real SmolLM2-135M-Instruct (slow): a small training budget must already make
the model refuse more HarmBench test prompts than the unpatched base (refusal-phrase judge, greedy).

The budget is deliberately tiny (tens of seconds of training on 2 cores); docs/RESULTS.md has the
full-budget figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_patched_smollm2_refuses_more_harmbench_prompts(tmp_path: Path, smollm2_gguf: Path) -> None:
    import torch

    from nestpatch.data import load_prompts
    from nestpatch.evaluate.judges import make_judge
    from nestpatch.format import read_patch
    from nestpatch.models.loading import load_model
    from nestpatch.train.config import TrainConfig
    from nestpatch.train.examples import generate_answers
    from nestpatch.train.pipeline import train_policy

    out = tmp_path / "smollm2.nestpatch"
    cfg = TrainConfig(model=str(smollm2_gguf), out=str(out), seed=0, threads=2, max_prompts=48, detect_prompts=32,
                      threshold=2.5, steps=12, batch_size=4, lr=0.1, warmup_steps=2, retain_weight=1.0,
                      retain_answer_tokens=8, max_length=96, refusal_targets="template", checkpoint_every=0)
    result = train_policy(cfg)
    patch = read_patch(out)
    assert patch.n_neurons > 0 and patch.trainable_parameters == patch.n_clusters * 576

    judge = make_judge("refusal-phrase")
    prompts = load_prompts("harmbench-test-standard", allow_eval=True, limit=10, seed=0).prompts
    lm = load_model(smollm2_gguf, device="cpu")

    def refusals() -> int:
        ids = generate_answers(lm.model, lm.tokenizer, prompts, max_new_tokens=24, batch_size=10)
        return sum(judge.judge(p, lm.tokenizer.decode(i, skip_special_tokens=True)).refused for p, i in zip(prompts, ids))

    base = refusals()
    with torch.no_grad():  # fold the patch into the in-memory weights (float32)
        for t in patch.targets:
            lm.model.get_parameter(t.name).add_(torch.from_numpy(t.dense_update()))
    patched = refusals()
    assert patched > base, (base, patched, result.summary.final)
