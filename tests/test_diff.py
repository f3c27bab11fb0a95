"""``nestpatch diff``: a hand-built pair whose every difference is known in advance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from nestpatch.audit.diff import adjusted_rand, diff_patches, render_diff
from nestpatch.cli import cli
from nestpatch.fingerprint import sketch
from nestpatch.format import Patch, Target, read_patch, write_patch

D = 16  # d_model of the toy base
F = 64  # n_ff
GATE0 = "model.layers.0.mlp.gate_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def _base_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {GATE0: rng.standard_normal((F, D)).astype(np.float32), UP0: rng.standard_normal((F, D)).astype(np.float32),
            DOWN1: rng.standard_normal((D, F)).astype(np.float32), UP1: rng.standard_normal((F, D)).astype(np.float32)}


def _target(name: str, idx: list[int], clusters: list[int], deltas: np.ndarray, w: np.ndarray) -> Target:
    axis = "col" if "down_proj" in name else "row"
    idx_a = np.array(idx, np.int32)
    vecs = w[idx_a, :] if axis == "row" else w[:, idx_a].T
    return Target(name=name, axis=axis, shape=tuple(w.shape), indices=idx_a, clusters=np.array(clusters, np.int32),
                  deltas=deltas.astype(np.float32), base_sketch=sketch(name, vecs))


def _base_meta(d_model: int = D) -> dict:
    return {"architecture": "llama", "n_layers": 2, "d_model": d_model, "n_ff": F, "name": "toy",
            "fingerprint": {"method": "rademacher-sketch-v1", "size": 8, "tolerance": 0.35}}


def _unit(i: int, scale: float = 1.0) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[i] = scale
    return v


def make_pair(base_seed_b: int = 0) -> tuple[Patch, Patch]:
    """Version A and version B of a policy, with these differences (all by construction):

    gate0: A {1,3,5,7} clusters [0,0,1,1]; B {3,5,7,9} clusters [0,0,1,1] ->
           +9 -1 =3 (3,5,7), common labels A [0,1,1] vs B [0,0,1] -> ARI -0.5
           (hand: contingency [[1,0],[1,1]], sum C(n_ij,2)=0, rows 0+1, cols 1+0 -> (0-1/3)/(1-1/3) = -0.5).
           deltas: B cluster 0 = 2 x A cluster 0 (cos 1, ratio 2), B cluster 1 = A cluster 1.
    up0:   same neurons {2,4,6,8,10,12}, partition relabelled (A [0,0,1,1,2,2], B [2,2,0,0,1,1]) -> ARI 1.0;
           deltas permuted along with the labels, so every neuron's update is unchanged: status "changed"
           (stored differently) but cosine 1, ratio 1, no movers.
    down1: only in A (removed target, 2 neurons).
    up1:   only in B (added target, 3 neurons).
    metadata: policy version 1.0 -> 1.1, one data source re-hashed, one added, config lr changed.
    """
    wa, wb = _base_weights(0), _base_weights(base_seed_b)
    a_gate = np.stack([_unit(0), _unit(1)])
    b_gate = np.stack([_unit(0, 2.0), _unit(1)])
    up_d = np.stack([_unit(2), _unit(3), _unit(4)])
    a = Patch(
        targets=[
            _target(GATE0, [1, 3, 5, 7], [0, 0, 1, 1], a_gate, wa[GATE0]),
            _target(UP0, [2, 4, 6, 8, 10, 12], [0, 0, 1, 1, 2, 2], up_d, wa[UP0]),
            _target(DOWN1, [0, 63], [0, 0], np.stack([_unit(5)]), wa[DOWN1]),
        ],
        base=_base_meta(), policy={"name": "safety", "version": "1.0", "description": "v1"},
        provenance={"seed": 0, "config": {"lr": 0.001, "cluster": {"k_max": 4}},
                    "data": [{"role": "harmful", "source": "h.jsonl", "rows": 10, "sha256": "aa" * 32},
                             {"role": "benign", "source": "b.jsonl", "rows": 10, "sha256": "bb" * 32}]},
    )
    b = Patch(
        targets=[
            _target(GATE0, [3, 5, 7, 9], [0, 0, 1, 1], b_gate, wb[GATE0]),
            _target(UP0, [2, 4, 6, 8, 10, 12], [2, 2, 0, 0, 1, 1], up_d[[1, 2, 0]], wb[UP0]),
            _target(UP1, [5, 6, 7], [0, 0, 0], np.stack([_unit(6, 3.0)]), wb[UP1]),
        ],
        base=_base_meta(), policy={"name": "safety", "version": "1.1", "description": "v1"},
        provenance={"seed": 0, "config": {"lr": 0.002, "cluster": {"k_max": 4}},
                    "data": [{"role": "harmful", "source": "h.jsonl", "rows": 12, "sha256": "cc" * 32},
                             {"role": "benign", "source": "b.jsonl", "rows": 10, "sha256": "bb" * 32},
                             {"role": "harmful", "source": "extra.jsonl", "rows": 5, "sha256": "dd" * 32}]},
    )
    return a, b


@pytest.fixture
def pair_files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = make_pair()
    return write_patch(a, tmp_path / "a.nestpatch"), write_patch(b, tmp_path / "b.nestpatch")


def test_adjusted_rand_by_hand() -> None:
    assert adjusted_rand(np.array([0, 1, 1]), np.array([0, 0, 1])) == pytest.approx(-0.5)
    assert adjusted_rand(np.array([0, 0, 1, 1]), np.array([5, 5, 2, 2])) == pytest.approx(1.0)
    assert adjusted_rand(np.array([0]), np.array([0])) is None


def test_hand_built_pair(pair_files: tuple[Path, Path]) -> None:
    pa, pb = pair_files
    r = diff_patches(read_patch(pa), read_patch(pb), labels=(str(pa), str(pb)))
    assert r["identical"] is False
    assert r["base"]["verdict"] == "same"
    t = {e["name"]: e for e in r["targets"]}
    g = t[GATE0]
    assert (g["added"], g["removed"], g["kept"]) == ([9], [1], 3)
    assert g["ari"] == pytest.approx(-0.5)
    assert g["cluster_matches"] == [
        {"a": 0, "b": 0, "shared": 1, "size_a": 2, "size_b": 2, "cosine": 1.0, "norm_ratio": 2.0},
        {"a": 1, "b": 1, "shared": 1, "size_a": 2, "size_b": 2, "cosine": 1.0, "norm_ratio": 1.0},
    ]  # A cluster 1 holds common 5 (->B0) and 7 (->B1): a tie, won by B1 whose delta is the same
    # common neurons 3, 5, 7: neuron 3 stays in cluster 0 (doubled), 5 moves to B's cluster 0
    # (unit 0 x2, orthogonal to its old unit 1), 7 keeps unit 1
    assert g["delta_cosine_mean"] == pytest.approx((1 + 0 + 1) / 3)
    assert g["norm_ratio_median"] == pytest.approx(2.0)  # ratios 2 (neuron 3), 2 (5), 1 (7)
    u = t[UP0]
    assert (u["added"], u["removed"], u["kept"], u["ari"]) == ([], [], 6, 1.0)
    assert u["status"] == "changed" and u["delta_cosine_mean"] == pytest.approx(1.0) and u["max_change"] == 0.0
    assert [m["b"] for m in u["cluster_matches"]] == [2, 0, 1]
    assert t[DOWN1]["status"] == "removed" and t[DOWN1]["removed"] == [0, 63]
    assert t[UP1]["status"] == "added" and t[UP1]["added"] == [5, 6, 7] and t[UP1]["clusters_b"] == 1
    s = r["summary"]
    assert (s["neurons_added"], s["neurons_removed"], s["neurons_kept"]) == (1 + 3, 1 + 2, 9)
    assert s["targets_added"] == [UP1] and s["targets_removed"] == [DOWN1]
    # largest movers: up1's added neurons (|delta| 3), then gate0's neuron 5 (|2 e0 - e1| = sqrt 5)
    movers = [(m["target"], m["neuron"], m["status"]) for m in r["movers"]]
    assert movers[:3] == [(UP1, 5, "added"), (UP1, 6, "added"), (UP1, 7, "added")]
    assert movers[3] == (GATE0, 5, "kept") and r["movers"][3]["change"] == pytest.approx(np.sqrt(5), rel=1e-6)
    assert all(m["target"] != UP0 for m in r["movers"])  # relabelled clusters are not movers
    m = r["metadata"]
    assert m["policy"] == [{"key": "policy.version", "a": "1.0", "b": "1.1", "change": "changed"}]
    assert m["config"] == [{"key": "config.lr", "a": 0.001, "b": 0.002, "change": "changed"}]
    assert [d["source"] for d in m["data"]["added"]] == ["extra.jsonl"]
    assert m["data"]["changed"][0]["source"] == "harmful:h.jsonl" and m["data"]["changed"][0]["fields"] == ["rows", "sha256"]
    assert m["base"] == [] and m["provenance"] == [] and m["signature"] is None
    json.dumps(r, allow_nan=False)  # machine output is strict JSON

    text = render_diff(r)
    assert text.splitlines()[0].startswith("A: ")  # same base: no warning first
    assert "policy.version: 1.0 -> 1.1" in text and "config.lr: 0.001 -> 0.002" in text
    assert "data added: harmful:extra.jsonl" in text and "data changed: harmful:h.jsonl: rows 10 -> 12" in text
    gate_line = next(line for line in text.splitlines() if "gate_proj" in line and "changed" in line)
    assert "+[9]" in gate_line and "-[1]" in gate_line and "-0.50" in gate_line
    assert text.splitlines()[-1] == "different"


def test_cli_identical_exit_0(pair_files: tuple[Path, Path], tmp_path: Path) -> None:
    pa, _ = pair_files
    copy = tmp_path / "copy.nestpatch"
    shutil.copy(pa, copy)
    r = CliRunner().invoke(cli, ["diff", str(pa), str(copy)])
    assert r.exit_code == 0, r.output
    assert "identical: same tensors and metadata" in r.output
    r = CliRunner().invoke(cli, ["diff", str(pa), str(copy), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["identical"] is True


def test_cli_different_exit_1_and_json(pair_files: tuple[Path, Path]) -> None:
    pa, pb = pair_files
    r = CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--json", "--top", "2"])
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert d["identical"] is False and len(d["movers"]) == 2 and d["summary"]["neurons_kept"] == 9


def test_signature_only_difference(pair_files: tuple[Path, Path], tmp_path: Path) -> None:
    from nestpatch.audit.signing import generate_keypair, sign_patch

    pa, _ = pair_files
    key, _, hexkey = generate_keypair(tmp_path / "k")
    signed = tmp_path / "signed.nestpatch"
    sign_patch(pa, key, out=signed)
    r = diff_patches(read_patch(pa), read_patch(signed))
    assert not r["identical"] and r["summary"]["tensors_identical"]
    assert r["metadata"]["signature"] == {"a": None, "b": hexkey}
    assert r["summary"]["neurons_added"] == 0 and all(e["status"] == "same" for e in r["targets"])


def test_different_base_models_said_first(tmp_path: Path) -> None:
    a, _ = make_pair()
    _, b = make_pair(base_seed_b=1)  # same sizes, other weights: the fingerprints disagree
    r = diff_patches(a, b)
    assert r["base"]["verdict"] == "different" and "fingerprints of common neurons disagree" in r["base"]["reason"]
    first = render_diff(r).splitlines()[0]
    assert first.startswith("WARNING: different base models")
    assert r["targets"] and r["summary"]["neurons_kept"] == 9  # still diffed
    b.base["d_model"] = 32
    first = render_diff(diff_patches(a, b)).splitlines()[0]
    assert first.startswith("WARNING: different base models: d_model 16 vs 32")
    b.base["d_model"] = a.base["d_model"]  # a file's shapes must agree with its own base (spec 3.2)
    b.base["n_layers"] = 99
    pa, pb = write_patch(a, tmp_path / "a.nestpatch"), write_patch(b, tmp_path / "b.nestpatch")
    res = CliRunner().invoke(cli, ["diff", str(pa), str(pb)])
    assert res.exit_code == 1 and res.output.startswith("WARNING: different base models")


def test_missing_file_is_a_user_error(pair_files: tuple[Path, Path], tmp_path: Path) -> None:
    pa, _ = pair_files
    r = CliRunner().invoke(cli, ["diff", str(pa), str(tmp_path / "nope.nestpatch")])
    assert r.exit_code == 2 and "nope.nestpatch: no such file" in r.output
    r = CliRunner().invoke(cli, ["diff", str(pa), str(pa), "--behaviour"])
    assert r.exit_code == 2 and "--behaviour needs --model" in r.output


# --------------------------------------------------------------------------- behaviour


def _blank_reply_patch(model: Any, tokenizer: Any, layer: int = 1, n: int = 32, k: float = 4.0) -> Patch:
    """A real patch that makes the model answer with blank lines (the judge counts that as a refusal).

    For neurons S of the last MLP: gate rows scaled by k and up rows set to k x the gate rows, so
    each neuron's activation silu(k g) * k g is >= 0 and large for half the tokens; the down columns
    of S then all add one shared vector along the embedding of "\\n\\n" (tied embeddings), which
    wins the argmax at every position.
    """
    from nestpatch.models.loading import describe_model

    def w(name: str) -> np.ndarray:
        return model.get_parameter(name).detach().float().numpy()

    s = np.arange(n, dtype=np.int32)
    g, u, d = (f"model.layers.{layer}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj"))
    nl = tokenizer.encode("\n\n")[0]
    e = w("model.embed_tokens.weight")[nl]

    def target(name: str, deltas: np.ndarray, clusters: np.ndarray) -> Target:
        axis = "col" if name == d else "row"
        vecs = w(name)[s, :] if axis == "row" else w(name)[:, s].T
        return Target(name=name, axis=axis, shape=tuple(w(name).shape), indices=s, clusters=clusters.astype(np.int32),
                      deltas=deltas.astype(np.float32), base_sketch=sketch(name, vecs))

    return Patch(targets=[
        target(g, (k - 1) * w(g)[s], np.arange(n)),
        target(u, k * w(g)[s] - w(u)[s], np.arange(n)),
        target(d, (3.0 * e / np.linalg.norm(e))[None, :], np.zeros(n)),
    ], base=describe_model(model, name="pico-llama"), policy={"name": "blank", "version": "2"})


def test_behaviour_diff_on_pico(tmp_path: Path, pico_model: Any, pico_hf_dir: Path) -> None:
    from nestpatch.testing import random_patch, smollm2_tokenizer

    pa = write_patch(random_patch(pico_model, seed=1, scale=0.01), tmp_path / "a.nestpatch")
    pb = write_patch(_blank_reply_patch(pico_model, smollm2_tokenizer()), tmp_path / "b.nestpatch")
    r = CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--json", "--behaviour", "--model", str(pico_hf_dir),
                                 "--suite", "harmbench,benign", "--limit", "2", "--max-new-tokens", "4",
                                 "--device", "cpu", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 1, r.output
    beh = json.loads(r.output[r.output.index("{"):])["behaviour"]
    assert beh["judge"] == "refusal-phrase"
    s = {x["suite"]: x for x in beh["suites"]}
    # A (tiny random deltas) babbles: every prompt "answered"; B answers blank lines: "refused"
    assert (s["harmbench"]["n"], s["harmbench"]["flips"], s["harmbench"]["to_safe"], s["harmbench"]["to_unsafe"]) == (2, 2, 2, 0)
    assert (s["harmbench"]["rate_a"], s["harmbench"]["rate_b"]) == (1.0, 0.0)
    assert (s["benign"]["flips"], s["benign"]["to_refused"], s["benign"]["rate_b"]) == (2, 2, 1.0)
    ex = s["benign"]["examples"][0]
    assert ex["a"] == "complied" and ex["b"] == "refused" and ex["reply_b"].strip() == "" and ex["reply_a"].strip()
    # the runs are kept where asked, with the per-sample records the flips were computed from
    assert (tmp_path / "runs" / "A" / "summary.json").is_file() and (tmp_path / "runs" / "B" / "summary.json").is_file()
    text = render_diff({**diff_patches(read_patch(pa), read_patch(pb)), "behaviour": beh})
    assert "suite harmbench (harmful): 2 of 2 verdicts flip (2 now refused, 0 now answered); asr A 1.000 -> B 0.000" in text
