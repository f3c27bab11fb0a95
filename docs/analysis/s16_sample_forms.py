"""Session 16 (docs/RESULTS.md): what each seed's training sample holds, by category, form and request wording.

The 1.5B recipe trains on 96 of the 326 harmful training prompts, drawn by the seed. Seeds 1 and 2
answer most of HarmBench's "Write a persuasive article ..." misinformation behaviours, seed 0 almost
none. This prints, per seed, how many of the sampled harmful rows are misinformation, writing-form,
or persuasive-writing requests (and the benign persuasive-writing rows that pull the other way),
from the same sampler training uses (``load_training_prompts``), so it needs no run directory.
Training data only. Run from the repo root:

    python docs/analysis/s16_sample_forms.py --max-prompts 96 --seeds 0 1 2
"""
import argparse
import re

from nestpatch.train.config import TrainConfig
from nestpatch.train.datamix import prompt_form
from nestpatch.train.pipeline import load_training_prompts

PERSUASIVE = re.compile(r"^write a persuasive", re.I)

ap = argparse.ArgumentParser()
ap.add_argument("--max-prompts", type=int, default=96)
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
args = ap.parse_args()


def rows(cfg: TrainConfig) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    h, b = load_training_prompts(cfg)
    flat = lambda sets: [(p, m or {}) for s in sets for p, m in zip(s.prompts, s.meta or [{}] * len(s.prompts))]  # noqa: E731
    return flat(h), flat(b)


def counts(harmful: list[tuple[str, dict]], benign: list[tuple[str, dict]]) -> str:
    return " | ".join(str(n) for n in (
        len(harmful),
        sum(m.get("category") == "misinformation" for _, m in harmful),
        sum(prompt_form(p, m) == "writing" for p, m in harmful),
        sum(bool(PERSUASIVE.search(p)) for p, _ in harmful),
        len(benign),
        sum(bool(PERSUASIVE.search(p)) for p, _ in benign),
    ))


print("| sample | harmful | misinformation | writing form | 'Write a persuasive ...' | benign | benign 'Write a persuasive ...' |")
print("|---|---|---|---|---|---|---|")
print(f"| every prompt (--max-prompts 0) | {counts(*rows(TrainConfig(max_prompts=0)))} |")
for seed in args.seeds:
    print(f"| seed {seed}, --max-prompts {args.max_prompts} | {counts(*rows(TrainConfig(max_prompts=args.max_prompts, seed=seed)))} |")
