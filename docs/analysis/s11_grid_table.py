"""Session 11 (docs/RESULTS.md): Print the neurons-seed x training-seed grid (HarmBench-validation ASR, benign refusal, KL) from the
session-10 diagonal rows and session-11 grid rows."""
import json
rows = {}
for f in ("runs/s10/smol_val_full128.jsonl", "runs/s11/grid_val.jsonl"):
    for line in open(f):
        r = json.loads(line)
        m = r["model"]
        if m.startswith("runs/s8/sweep/s"):
            n = t = int(m[-11])
        elif m.startswith("runs/s11/grid/n"):
            n, t = int(m.split("/n")[-1][0]), int(m.split("-t")[-1][0])
        else:
            continue
        rows[(n, t)] = r
for key, name in (("hb-val", "HarmBench-validation ASR"), ("benign_refusal", "benign refusal"), ("kl", "KL")):
    print(f"\n{name}: rows = neurons from seed, columns = training seed")
    print("| neurons \\ training | t0 | t1 | t2 |\n|---|---|---|---|")
    for n in range(3):
        cells = []
        for t in range(3):
            r = rows.get((n, t))
            if r is None:
                cells.append("-")
            elif key == "hb-val":
                cells.append(f"{100 * (1 - r[key]):.1f}%")
            elif key == "kl":
                cells.append(f"{r[key]:.3f}")
            else:
                cells.append(f"{100 * r[key]:.1f}%")
        print(f"| n{n} | " + " | ".join(cells) + " |")

# two-way decomposition of the 3 x 3 cells (one cell each: the interaction is the residual)
import numpy as np  # noqa: E402
for _key, name, f in (("hb-val", "HarmBench-validation ASR", lambda r: 100 * (1 - r["hb-val"])),
                     ("benign_refusal", "benign refusal", lambda r: 100 * r["benign_refusal"])):
    x = np.array([[f(rows[(n, t)]) for t in range(3)] for n in range(3)])
    g = x.mean()
    ss_tot = ((x - g) ** 2).sum()
    ss_n = 3 * ((x.mean(1) - g) ** 2).sum()
    ss_t = 3 * ((x.mean(0) - g) ** 2).sum()
    print(f"\n{name}: mean {g:.1f}; neuron-seed row means {np.round(x.mean(1), 1)}, training-seed column means {np.round(x.mean(0), 1)}")
    print(f"  share of the variance: neurons {ss_n / ss_tot:.0%}, training {ss_t / ss_tot:.0%}, interaction/residual {(ss_tot - ss_n - ss_t) / ss_tot:.0%}")
