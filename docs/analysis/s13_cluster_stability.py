"""Session 13 (docs/RESULTS.md): how much of "the neuron set" is the clustering?

Session 11's 3 x 3 cross put 57% of SmolLM2's validation ASR variance on "the neurons", which
there meant detection *and* clustering. This script takes them apart without training:

1. it re-runs the default recipe's detection for each seed (the same prompt samples, the same
   detector), checks that it gives that seed's patch exactly (neurons and cluster labels);
2. it re-clusters each seed's neurons with other k-means seeds (same profiles): how much the
   clustering seed alone moves the labels;
3. it re-clusters them on the profiles of another seed's detection prompts: how much the prompt
   sample moves the clusters of a fixed neuron set.

Agreement is the adjusted Rand index (ARI: 1 = the same partition, about 0 = chance), averaged
over modules and weighted by their neuron counts. Run from the repo root (about 2 min, 1 thread):

    python docs/analysis/s13_cluster_stability.py runs/s8/sweep/s0 runs/s8/sweep/s1 runs/s8/sweep/s2
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from nestpatch.cluster import cluster_modules
from nestpatch.detect import _labelled_activations, detect
from nestpatch.format import read_patch
from nestpatch.models.loading import load_model
from nestpatch.train.config import TrainConfig
from nestpatch.train.pipeline import _sample, load_training_prompts, merge_prompt_sets
from nestpatch.train.recipes import apply_recipe


def config(seed: int) -> TrainConfig:
    cfg, _ = apply_recipe(TrainConfig(model="smollm2", out="x.nestpatch", seed=seed), set())
    return cfg.resolved()


def weighted_ari(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """ARI per module, weighted by neurons; modules with one neuron count as agreeing."""
    num = den = 0.0
    for name, la in a.items():
        n = len(la)
        ari = 1.0 if n < 2 else float(adjusted_rand_score(la, b[name]))
        num += n * ari
        den += n
    return num / den


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    seeds = []
    for p in paths:
        patch = read_patch(p if p.endswith(".nestpatch") else p + ".nestpatch")
        seeds.append((int(patch.provenance["seed"]), patch))
    lm = load_model("smollm2")
    cache: dict = {}
    runs = {}
    for seed, patch in seeds:
        cfg = config(seed)
        h_sets, b_sets = load_training_prompts(cfg)
        harmful, benign = merge_prompt_sets(h_sets)[0], merge_prompt_sets(b_sets)[0]
        dh, db = _sample(harmful, cfg.detect_prompts, seed), _sample(benign, cfg.detect_prompts, seed + 1)
        det = detect(lm.model, lm.tokenizer, dh, db, modules=cfg.modules, layers=cfg.layers or None, detector=cfg.detector,
                     threshold=cfg.threshold, min_weight=cfg.min_weight, max_neurons_per_module=cfg.max_neurons_per_module,
                     pool=cfg.pool, batch_size=cfg.batch_size_detect, max_length=cfg.max_length, seed=seed, cache=cache)
        kept = {m.name: m for m in det.modules if len(m.indices)}
        clusters = cluster_modules({n: m.profiles for n, m in kept.items()}, k=cfg.clusters, k_min=cfg.k_min, k_max=cfg.k_max,
                                   seed=seed)
        stored = {t.name: (np.asarray(t.indices), np.asarray(t.clusters)) for t in patch.targets}
        same = set(stored) == set(kept) and all(np.array_equal(stored[n][0], kept[n].indices)
                                                and np.array_equal(stored[n][1], clusters[n].labels) for n in kept)
        print(f"seed {seed}: {det.total_selected} neurons, {sum(c.k for c in clusters.values())} clusters; "
              f"reproduces the patch: {same}")
        runs[seed] = dict(cfg=cfg, dh=dh, db=db, kept=kept, labels={n: c.labels for n, c in clusters.items()},
                          ks={n: c.k for n, c in clusters.items()})

    print("\n1. k-means seed only (same neurons, same profiles): ARI against the patch's clustering")
    for seed, r in runs.items():
        cfg = r["cfg"]
        aris, ks = [], []
        for other in range(10):
            if other == seed:
                continue
            c = cluster_modules({n: m.profiles for n, m in r["kept"].items()}, k=cfg.clusters, k_min=cfg.k_min,
                                k_max=cfg.k_max, seed=other)
            aris.append(weighted_ari(r["labels"], {n: x.labels for n, x in c.items()}))
            ks.append(sum(x.k for x in c.values()))
        print(f"  neurons of seed {seed}: ARI mean {np.mean(aris):.3f} (min {min(aris):.3f}) over 9 k-means seeds; "
              f"clusters {sum(r['ks'].values())} -> {min(ks)}-{max(ks)}")

    print("\n2. profiles from another seed's detection prompts (same neurons, same k-means seed)")
    for seed, r in runs.items():
        cfg = r["cfg"]
        for other, o in runs.items():
            if other == seed:
                continue
            refs, _, acts = _labelled_activations(lm.model, lm.tokenizer, o["dh"], o["db"], modules=cfg.modules,
                                                  layers=cfg.layers or None, pool=cfg.pool, max_length=cfg.max_length,
                                                  batch_size=cfg.batch_size_detect, progress=None, cache=cache)
            prof = {n: acts[n][:, m.indices] for n, m in r["kept"].items()}
            c = cluster_modules(prof, k=cfg.clusters, k_min=cfg.k_min, k_max=cfg.k_max, seed=seed)
            ari = weighted_ari(r["labels"], {n: x.labels for n, x in c.items()})
            print(f"  neurons of seed {seed}, prompts of seed {other}: ARI {ari:.3f}; "
                  f"clusters {sum(r['ks'].values())} -> {sum(x.k for x in c.values())}")


if __name__ == "__main__":
    main(sys.argv[1:])
