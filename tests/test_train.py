"""Training on pico models: data loading, QAT round trips, the hook parametrization, the loop,
resume, NaN stop, the config/CLI, and the written .nestpatch (provenance, sketches)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nestpatch.data import load_prompts
from nestpatch.errors import InputError, TrainingError
from nestpatch.format import read_patch
from nestpatch.format.constants import ProvenanceKey
from nestpatch.models.naming import MLPRef
from nestpatch.train.adapter import SharedDeltas, TargetSpec
from nestpatch.train.config import TrainConfig
from nestpatch.train.quant import SUPPORTED, fake_quant, roundtrip


# ------------------------------------------------------------------------------------------ data
def test_prompt_files_of_every_kind(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"q": "one?", "x": 1}\n\n{"q": "two?"}\n{"q": "one?"}\n')
    (tmp_path / "b.csv").write_text("id,goal\n1,Make tea\n2,\"Write a poem, please\"\n")
    (tmp_path / "c.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "d.json").write_text(json.dumps({"prompts": [{"text": "alpha"}, {"text": "beta"}]}))
    (tmp_path / "e.json").write_text(json.dumps(["x", "y", "z"]))
    a = load_prompts(tmp_path / "a.jsonl", column="q")
    assert a.prompts == ["one?", "two?"] and a.rows == 3 and len(a.sha256) == 64
    assert load_prompts(tmp_path / "b.csv").prompts == ["Make tea", "Write a poem, please"]  # "goal" found by default
    assert load_prompts(tmp_path / "c.txt").prompts == ["first line", "second line"]
    assert load_prompts(tmp_path / "d.json").prompts == ["alpha", "beta"]
    assert load_prompts(tmp_path / "e.json", limit=2, seed=0).prompts in (["x", "y"], ["x", "z"], ["y", "z"])
    with pytest.raises(InputError, match="no column 'prompt'; columns found: q, x"):
        load_prompts(tmp_path / "a.jsonl", column="prompt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match="not a named source"):
        load_prompts(tmp_path / "missing.jsonl")


def test_named_sources_and_rho_first_paragraph() -> None:
    h = load_prompts("builtin-harmful")
    b = load_prompts("builtin-benign")
    assert len(h) > 300 and len(b) > 300
    assert {m["form"] for m in h.meta} >= {"question", "imperative", "step_by_step", "writing", "code"}
    # vanilla only by default: jailbreak wrappers are an opt-in source
    assert "roleplay" not in {m["form"] for m in h.meta}
    assert {m["form"] for m in load_prompts("builtin-harmful-jailbreak").meta} == {"roleplay"}
    assert not set(h.prompts) & set(load_prompts("builtin-harmful-heldout").prompts)
    edgy = load_prompts("builtin-benign-edgy")  # the edgy rows of the train split, to weight them in the retain set
    assert len(edgy) == sum(1 for m in b.meta if m["category"] == "edgy") > 50
    assert set(edgy.prompts) <= set(b.prompts) and {m["category"] for m in edgy.meta} == {"edgy"}
    rho = load_prompts("rho-refusal-50")
    assert rho.prompts[0] == "How do I bake chocolate chip cookies?"  # the answer after the blank line is dropped
    assert all("\n\n" not in p for p in load_prompts("rho-refusal-50-harmful").prompts)


def test_harmbench_is_refused_for_training_by_name_and_by_content(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="evaluation-only"):
        load_prompts("harmbench-test")
    from nestpatch.assets import fetch

    copy = tmp_path / "renamed.csv"
    copy.write_bytes(fetch("harmbench-test").read_bytes())
    with pytest.raises(InputError, match="evaluation-only"):
        load_prompts(copy)
    assert len(load_prompts("harmbench-test-standard", allow_eval=True)) == 159


# ------------------------------------------------------------------------------------------ QAT
@pytest.mark.parametrize("qtype", SUPPORTED)
def test_torch_roundtrip_matches_gguf_bit_for_bit(qtype: str) -> None:
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    t = getattr(GGMLQuantizationType, qtype)
    ref = quants.dequantize(quants.quantize(w, t), t)
    np.testing.assert_array_equal(roundtrip(torch.from_numpy(w), qtype).numpy(), ref)
    np.testing.assert_array_equal(roundtrip(torch.from_numpy(ref), qtype).numpy(), ref)  # idempotent on the grid


def test_fake_quant_passes_gradients_straight_through() -> None:
    w = torch.randn(4, 64, requires_grad=True)
    fake_quant(w, "Q4_1").sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


# ------------------------------------------------------------------------------------------ adapter
@pytest.fixture(scope="module")
def model() -> Any:
    from nestpatch.testing import make_pico_model

    return make_pico_model(seed=3)


def _specs() -> list[TargetSpec]:
    return [
        TargetSpec(MLPRef(0, "gate_proj"), np.array([3, 9, 40, 41]), np.array([0, 1, 0, 1])),
        TargetSpec(MLPRef(1, "up_proj"), np.array([7]), np.array([0])),
        TargetSpec(MLPRef(1, "down_proj"), np.array([2, 33, 200]), np.array([1, 0, 1])),
    ]


def _effective_weight(lin: torch.nn.Linear) -> torch.Tensor:
    """The weight a hooked Linear acts with: its output on the identity, transposed."""
    eye = torch.eye(lin.in_features)
    with torch.no_grad():
        return lin(eye).T  # (out, in)


@pytest.mark.parametrize("qat", ["none", "Q4_1", "Q8_0"])
def test_only_selected_neurons_change_and_base_weights_stay_untouched(model: Any, qat: str) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    d = SharedDeltas(model, _specs(), qat=qat)
    with torch.no_grad():
        for p in d.deltas.values():
            p.copy_(torch.randn_like(p))
    d.attach()
    try:
        targets = {t.name: t for t in d.to_targets("F32")}
        for s in _specs():
            lin = model.get_submodule(s.name[: -len(".weight")])
            w = lin.weight.detach()
            eff = _effective_weight(lin)
            dense = torch.from_numpy(targets[s.name].dense_update())
            changed = (eff - w).abs() > 1e-6
            if qat == "none":
                torch.testing.assert_close(eff, w + dense, rtol=1e-5, atol=1e-5)
            else:  # what the fold will produce: the touched GGUF blocks re-encoded
                if s.axis == "row":
                    rows = torch.from_numpy(s.indices)
                    want = w.clone()
                    want[rows] = roundtrip(w[rows] + dense[rows], qat) - roundtrip(w[rows], qat) + w[rows]
                    torch.testing.assert_close(eff, want, rtol=1e-5, atol=1e-5)
            if s.axis == "row":
                assert set(torch.nonzero(changed.any(1)).flatten().tolist()) == set(s.indices.tolist())
            else:
                cols = set(torch.nonzero(changed.any(0)).flatten().tolist())
                if qat == "none":
                    assert cols == set(s.indices.tolist())
                else:  # re-encoding may move the other columns of a touched 32-block, never another block
                    assert {c // 32 for c in cols} <= {i // 32 for i in s.indices.tolist()}
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        with d.disabled():
            lin = model.get_submodule("model.layers.0.mlp.gate_proj")
            torch.testing.assert_close(_effective_weight(lin), lin.weight.detach())
    finally:
        d.detach()
    lin = model.get_submodule("model.layers.0.mlp.gate_proj")
    torch.testing.assert_close(_effective_weight(lin), lin.weight.detach())


# ------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def pico_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nestpatch.testing import make_pico_model, write_hf_dir

    return write_hf_dir(make_pico_model(seed=4), tmp_path_factory.mktemp("pico_train") / "hf")


def _cfg(pico_dir: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(model=str(pico_dir), out=str(out), max_prompts=16, detect_prompts=16, threshold=1.5, steps=8, batch_size=4,
                lr=0.5, warmup_steps=2, retain_answer_tokens=4, max_length=64, seed=123, threads=2, checkpoint_every=4,
                refusal_targets="template")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(pico_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from nestpatch.train.pipeline import train_policy

    out = tmp_path_factory.mktemp("run") / "policy.nestpatch"
    return train_policy(_cfg(pico_dir, out, keep_checkpoint=True))


def _refusal_ce(model: Any, tok: Any, prompts: list[str]) -> float:
    """Mean cross-entropy of a fixed refusal after each prompt (the harmful-target loss)."""
    from nestpatch.train.examples import Example, collate, prompt_ids, response_ids
    from nestpatch.train.losses import token_ce

    ex = [Example("harmful", p, prompt_ids(tok, p, 64), response_ids(tok, "I'm sorry, but I can't help with that request."))
          for p in prompts]
    b = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, logits_to_keep=b.keep).logits
    return float(token_ce(logits, b.labels))


def test_training_lowers_the_refusal_loss_and_writes_a_full_patch(trained: Any, pico_dir: Path) -> None:
    from nestpatch.models.loading import load_model

    log = [json.loads(line) for line in trained.paths.log.read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(math.isfinite(r["retain"]) and math.isfinite(r["refusal"]) for r in log)
    p = read_patch(trained.paths.patch)
    # the harmful-target loss on held-out harmful prompts, before and after folding the patch
    lm = load_model(pico_dir, device="cpu")
    prompts = load_prompts("builtin-harmful-heldout", limit=16, seed=0).prompts
    before = _refusal_ce(lm.model, lm.tokenizer, prompts)
    with torch.no_grad():
        for t in p.targets:
            lm.model.get_parameter(t.name).add_(torch.from_numpy(t.dense_update()))
    after = _refusal_ce(lm.model, lm.tokenizer, prompts)
    # 0.19 measured on the vanilla-only default sets (11.06 -> 10.87); the 0.2 margin was set on the
    # earlier sets with role-play rows, which moved the 16-prompt samples. A no-op patch gives 0.
    assert after < before - 0.1, (before, after)
    assert p.targets and all(t.base_sketch is not None for t in p.targets)
    assert {t.axis for t in p.targets} == {"row"}
    assert p.base["d_model"] == 64 and p.base["n_ff"] == 256 and p.base["architecture"] == "llama"
    prov = p.provenance
    assert prov[ProvenanceKey.SEED] == 123
    assert prov[ProvenanceKey.TRAINABLE_PARAMETERS] == p.trainable_parameters == sum(t.n_clusters * 64 for t in p.targets)
    roles = {d["role"] for d in prov[ProvenanceKey.DATA]}
    assert roles == {"harmful", "benign", "refusal-targets"}
    for d in prov[ProvenanceKey.DATA]:
        assert set(d) >= {"role", "source", "rows", "sha256"} and d["rows"] > 0 and len(d["sha256"]) == 64
    assert prov[ProvenanceKey.CONFIG]["seed"] == 123 and prov[ProvenanceKey.LIBRARIES]["torch"]
    det = prov[ProvenanceKey.DETECTION]
    assert det["selected"] == p.n_neurons and len(det["per_module"]) == 4
    assert TrainConfig.from_toml(trained.paths.config) == trained.config  # the resolved config reads back
    assert not trained.paths.patch.with_name("policy.nestpatch.tmp").exists()


def test_same_seed_same_patch_and_resume_continues_exactly(trained: Any, pico_dir: Path, tmp_path: Path) -> None:
    from nestpatch.train.pipeline import train_policy

    first = read_patch(trained.paths.patch)
    # the kept checkpoint holds step 4 (saved every 4 steps, not at the end): resume from it
    out = tmp_path / "policy.nestpatch"
    ckpt_src = trained.paths.ckpt
    import shutil

    shutil.copytree(ckpt_src, tmp_path / "policy.ckpt")
    resumed = train_policy(_cfg(pico_dir, out, resume=True, seed=None))
    assert resumed.resumed_from == 4 and resumed.config.seed == 123  # the seed comes from the checkpoint
    second = read_patch(out)
    for a, b in zip(first.targets, second.targets):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.deltas, b.deltas, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "policy.ckpt").exists()  # removed after success


def test_neurons_from_a_patch_keep_its_selection_and_reproduce_its_training(trained: Any, pico_dir: Path, tmp_path: Path) -> None:
    from nestpatch.train.pipeline import train_policy

    first = read_patch(trained.paths.patch)
    # same seed, neurons taken from the patch instead of detected: the very same patch, deltas included
    same = train_policy(_cfg(pico_dir, tmp_path / "same.nestpatch", neurons=str(trained.paths.patch)))
    again = read_patch(same.paths.patch)
    assert [t.name for t in again.targets] == [t.name for t in first.targets]
    for a, b in zip(first.targets, again.targets):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.clusters, b.clusters)
        np.testing.assert_allclose(a.deltas, b.deltas, rtol=1e-5, atol=1e-6)
    src = again.provenance[ProvenanceKey.DETECTION]["neurons_from"]
    assert src == {"path": "policy.nestpatch", "content_digest": first.content_digest, "seed": 123}
    assert again.provenance[ProvenanceKey.DETECTION]["selected"] == first.n_neurons
    # another seed on the same neurons: the selection stays, only training differs
    other = read_patch(train_policy(_cfg(pico_dir, tmp_path / "s7.nestpatch", seed=7, neurons=str(trained.paths.patch))).paths.patch)
    for a, b in zip(first.targets, other.targets):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.clusters, b.clusters)
    assert max(float(np.abs(a.deltas - b.deltas).max()) for a, b in zip(first.targets, other.targets)) > 1e-3


def test_cli_neurons_from_a_patch_of_another_model_is_refused(trained: Any, tmp_path: Path) -> None:
    from nestpatch.cli import cli
    from nestpatch.testing import make_pico_model, write_hf_dir

    other_dir = write_hf_dir(make_pico_model(seed=5), tmp_path / "other")
    out = tmp_path / "o.nestpatch"
    args = ["train", str(other_dir), "-o", str(out), "--steps", "1", "--quiet", "--max-prompts", "8"]
    r = CliRunner().invoke(cli, args + ["--neurons", str(trained.paths.patch)])
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {trained.paths.patch}: tensor ") and "does not match the patch's base model" in last
    assert not out.exists()
    r = CliRunner().invoke(cli, args + ["--neurons", str(tmp_path / "missing.nestpatch")])
    assert r.exit_code == 2 and "missing.nestpatch: no such patch (--neurons)" in r.output
    (tmp_path / "junk.nestpatch").write_bytes(b"not a patch")
    r = CliRunner().invoke(cli, args + ["--neurons", str(tmp_path / "junk.nestpatch")])
    assert r.exit_code == 2 and "junk.nestpatch" in r.output.strip().splitlines()[-1]


def test_consensus_detection_trains_and_records_its_subsamples(pico_dir: Path, tmp_path: Path) -> None:
    from nestpatch.train.pipeline import train_policy

    res = train_policy(_cfg(pico_dir, tmp_path / "c.nestpatch", detect_prompts=8, detect_resamples=4, detect_consensus=0.75,
                            steps=2))
    patch = read_patch(res.paths.patch)
    det = patch.provenance[ProvenanceKey.DETECTION]
    rec = det["consensus"]
    assert rec["resamples"] == 4 and rec["min_count"] == 3 and rec["prompts_per_resample"] == 8
    assert det["prompts"] == {"harmful": 16, "benign": 16}  # every training prompt pooled once
    assert det["selected"] == patch.n_neurons <= rec["selected_in_any"]
    # the new options leave the fingerprints of earlier checkpoints and bench caches alone at their defaults
    # (the value the code gave before they existed)
    plain = TrainConfig(model="smollm2", out="o.nestpatch", seed=1)
    assert plain.fingerprint() == "485580ccafb60ff5"
    assert TrainConfig(model="smollm2", out="o.nestpatch", seed=1, detect_resamples=2).fingerprint() != plain.fingerprint()


def test_detect_pool_sources_detects_on_more_prompts_than_training_uses(pico_dir: Path, tmp_path: Path) -> None:
    """--detect-pool sources: detection samples the sources, training keeps its --max-prompts sample."""
    from nestpatch.train.pipeline import train_policy

    runs = {pool: train_policy(_cfg(pico_dir, tmp_path / f"{pool}.nestpatch", max_prompts=12, detect_prompts=40,
                                    detect_pool=pool, steps=2))
            for pool in ("training", "sources")}
    seen = {pool: read_patch(r.paths.patch).provenance[ProvenanceKey.DETECTION]["prompts"] for pool, r in runs.items()}
    assert seen["training"] == {"harmful": 12, "benign": 12}
    assert seen["sources"] == {"harmful": 40, "benign": 40}
    assert runs["sources"].config.max_prompts == 12 and runs["sources"].config.detect_pool == "sources"
    # training reads the same prompt sample in both runs: only the neurons differ
    data = {pool: read_patch(r.paths.patch).provenance[ProvenanceKey.DATA] for pool, r in runs.items()}
    assert data["sources"] == data["training"]
    with pytest.raises(InputError, match="--detect-pool 'all' invalid"):
        TrainConfig(model="smollm2", out="o.nestpatch", detect_pool="all").validate()
    plain = TrainConfig(model="smollm2", out="o.nestpatch", seed=1)
    assert TrainConfig(model="smollm2", out="o.nestpatch", seed=1, detect_pool="sources").fingerprint() != plain.fingerprint()


def test_cluster_seed_moves_the_clusters_and_nothing_else(pico_dir: Path, tmp_path: Path) -> None:
    import dataclasses

    from nestpatch.models.loading import load_model
    from nestpatch.train.pipeline import load_training_prompts, merge_prompt_sets, select_neurons

    cfg = _cfg(pico_dir, tmp_path / "k.nestpatch", threshold=1.0).resolved()
    lm = load_model(str(pico_dir))
    h_sets, b_sets = load_training_prompts(cfg)
    harmful, benign = merge_prompt_sets(h_sets)[0], merge_prompt_sets(b_sets)[0]

    def selection(**kw: Any) -> dict[str, tuple[list[int], list[int]]]:
        specs = select_neurons(lm, dataclasses.replace(cfg, **kw), harmful, benign)[0]
        return {s.ref.hf_name: (s.indices.tolist(), s.clusters.tolist()) for s in specs}

    default = selection()
    assert selection(cluster_seed=cfg.seed) == default  # the default is --seed
    others = [selection(cluster_seed=s) for s in range(4)]
    for o in others:  # the same neurons in every module...
        assert {k: v[0] for k, v in o.items()} == {k: v[0] for k, v in default.items()}
    assert any(o != default for o in others)  # ...grouped differently by some k-means seeds
    assert sum(len(v[0]) for v in default.values()) > 10
    assert dataclasses.replace(cfg, cluster_seed=3).fingerprint() != cfg.fingerprint()


def test_nan_loss_stops_without_writing_a_patch(pico_dir: Path, tmp_path: Path) -> None:
    from nestpatch.train.pipeline import train_policy

    out = tmp_path / "nan.nestpatch"
    with pytest.raises(TrainingError, match="NaN or infinite at step"):
        train_policy(_cfg(pico_dir, out, lr=1e36, weight_decay=0.1, warmup_steps=0, max_grad_norm=0.0, steps=4, checkpoint_every=1))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no stray temp file
    assert (tmp_path / "nan.ckpt" / "state.safetensors").exists()  # the last good state is kept


# ------------------------------------------------------------------------------------------ config and CLI
def test_config_toml_round_trip_and_errors(tmp_path: Path) -> None:
    cfg = TrainConfig(model="m", out="o.nestpatch", layers=[1, 2], clusters=None, seed=5)
    f = tmp_path / "c.toml"
    f.write_text(cfg.to_toml())
    assert TrainConfig.from_toml(f) == cfg
    f.write_text('[train]\nmodel = "m"\nlearning_rate = 1\n')
    with pytest.raises(InputError, match="unknown option 'learning_rate'"):
        TrainConfig.from_toml(f)
    f.write_text('steps = "many"\n')
    with pytest.raises(InputError, match="'steps' must be an integer"):
        TrainConfig.from_toml(f)
    with pytest.raises(InputError, match="--lr must be positive"):
        TrainConfig(model="m", out="o", lr=0).validate()
    with pytest.raises(InputError, match="--detector 'x' invalid"):
        TrainConfig(model="m", out="o", detector="x").validate()
    assert TrainConfig(model="m", out="o").resolved().seed is not None  # drawn and recorded


def test_cli_train_with_config_file_and_flag_override(pico_dir: Path, tmp_path: Path) -> None:
    from nestpatch.cli import cli

    cfg = _cfg(pico_dir, tmp_path / "cli.nestpatch", steps=50)
    (tmp_path / "t.toml").write_text(cfg.to_toml())
    r = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "t.toml"), "--steps", "2", "--quiet",
                                 "--modules", "gate_proj,up_proj"])
    assert r.exit_code == 0, r.output
    assert "detection (mean_diff" in r.output and "trainable parameters" in r.output
    assert TrainConfig.from_toml(tmp_path / "cli.train.toml").steps == 2
    training = read_patch(tmp_path / "cli.nestpatch").provenance["training"]
    assert training["steps"] == 2
    # 2 steps x 4 rows draw 8 of the 16 prompts' sequences on each side: the run says it skipped half its data
    cover = training["coverage"]
    assert cover == {"harmful_sequences": 16, "harmful_seen": 8, "benign_sequences": 16, "benign_seen": 8}
    assert "the steps drew 8 of 16 harmful and 8 of 16 benign training sequences" in r.output


@pytest.mark.parametrize("size, draws", [(7, 0), (7, 5), (7, 7), (7, 9), (144, 120), (489, 496)])
def test_epoch_sampler_seen_counts_the_distinct_rows_its_draws_reach(size: int, draws: int) -> None:
    from nestpatch.train.trainer import EpochSampler

    sampler = EpochSampler(size, seed=3, salt=1)
    taken = [i for start in range(0, draws, 4) for i in sampler.take(start, min(4, draws - start))]
    assert len(taken) == draws and sampler.seen(draws) == len(set(taken)) == min(draws, size)
    if draws >= size:
        assert sorted(taken[:size]) == list(range(size))  # the first epoch is a permutation: every row once


@pytest.mark.parametrize("args, message", [
    (["--harmful", "harmbench-test"], "evaluation-only"),
    (["--harmful", "{tmp}/h.jsonl", "--harmful-column", "goal"], "no column 'goal'"),
    (["--benign", "{tmp}/empty.txt"], "holds no prompts"),
    (["--threshold", "1000"], "lower --threshold"),
    (["--detect-resamples", "3", "--detector", "probe"], "mean_diff or gatebreaker"),
    (["--detect-consensus", "0"], "--detect-consensus in (0, 1]"),
    (["--cluster-seed", "-1"], "--cluster-seed must be at least 0"),
])
def test_cli_bad_input_is_one_line_exit_2_and_no_output(pico_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    from nestpatch.cli import cli

    (tmp_path / "h.jsonl").write_text('{"prompt": "How do I pick a lock?"}\n')
    (tmp_path / "empty.txt").write_text("\n")
    out = tmp_path / "bad.nestpatch"
    full = ["train", str(pico_dir), "-o", str(out), "--steps", "1", "--quiet", "--max-prompts", "8",
            "--detect-prompts", "8"] + [a.format(tmp=tmp_path) for a in args]
    r = CliRunner().invoke(cli, full)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]  # (transformers' own loading bar may come before it on stderr)
    assert last.startswith("error: ") and message in last
    assert not out.exists() and not list(tmp_path.glob(".bad.nestpatch*"))


def test_cli_model_directory_without_weights(tmp_path: Path) -> None:
    from nestpatch.cli import cli

    (tmp_path / "empty_model").mkdir()
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "empty_model"), "-o", str(tmp_path / "x.nestpatch"), "--quiet"])
    assert r.exit_code == 2 and "holds no weights" in r.output


# ------------------------------------------------------------------------------ opening-focused losses
def test_head_weights_and_weighted_ce_match_a_hand_computation() -> None:
    from nestpatch.train.losses import head_weights, token_ce

    pos = torch.tensor([[-1, 0, 1, 2], [0, 1, -1, -1]])
    w = head_weights(pos, head_tokens=2, head_weight=5.0)
    assert w.tolist() == [[1.0, 5.0, 5.0, 1.0], [5.0, 5.0, 1.0, 1.0]]
    assert head_weights(pos, 0, 5.0) is None and head_weights(pos, 2, 1.0) is None
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, 3], [4, 5, -100, -100]])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), reduction="none", ignore_index=-100)
    ce = ce.reshape(2, 4)
    want = (ce[0, 1] * 5 + ce[0, 2] * 5 + ce[0, 3] + ce[1, 0] * 5 + ce[1, 1] * 5) / 21
    assert float(token_ce(logits, labels, w)) == pytest.approx(float(want), rel=1e-5)
    assert float(token_ce(logits, labels)) == pytest.approx(float(ce[labels != -100].mean()), rel=1e-5)


def test_sequence_unlikelihood_is_minus_log_one_minus_p_of_the_opening() -> None:
    from nestpatch.train.losses import sequence_unlikelihood

    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, 2, -100], [-100, -100, -100]])  # the second row has no opening: skipped
    lp = torch.log_softmax(logits, -1)
    p = math.exp(float(lp[0, 0, 1] + lp[0, 1, 2]))
    assert float(sequence_unlikelihood(logits, labels)) == pytest.approx(-math.log(1 - p), rel=1e-5)


def test_unlikelihood_gradient_pushes_a_likely_opening_down() -> None:
    """Where the opening is likely (what refusal training does to benign prompts), descent makes it unlikely."""
    from nestpatch.train.losses import sequence_unlikelihood

    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 1] = logits[0, 1, 2] = 4.0  # p(opening) ~ 0.9
    logits.requires_grad_(True)
    labels = torch.tensor([[1, 2]])
    opt = torch.optim.SGD([logits], lr=0.5)
    p0 = 1 - math.exp(-float(sequence_unlikelihood(logits.detach(), labels)))  # the loss is -log(1 - p)
    for _ in range(20):
        opt.zero_grad()
        sequence_unlikelihood(logits, labels).backward()
        opt.step()
    lp = torch.log_softmax(logits.detach(), -1)
    p = math.exp(float(lp[0, 0, 1] + lp[0, 1, 2]))
    assert p0 > 0.8 and p < 0.5, (p0, p)


def test_train_with_opening_losses_logs_them(pico_dir: Path, tmp_path: Path) -> None:
    from nestpatch.train.pipeline import train_policy

    res = train_policy(_cfg(pico_dir, tmp_path / "ul.nestpatch", benign_refusal_weight=2.0, head_tokens=2, head_weight=3.0,
                            steps=3, checkpoint_every=0))
    log = [json.loads(line) for line in res.paths.log.read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(r["benign_refusal"]) and r["benign_refusal"] >= 0 for r in log)
    assert all(r["total"] >= r["refusal"] for r in log)
    assert res.config.benign_refusal_weight == 2.0 and read_patch(res.paths.patch).provenance["config"]["head_tokens"] == 2
