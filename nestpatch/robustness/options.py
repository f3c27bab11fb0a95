"""The settings of a robustness run (:class:`RobustnessOptions`, :class:`FinetuneConfig`), in a module without torch.

``nestpatch robustness`` generates its flags from the fields (:func:`nestpatch.cli.options.dataclass_options`):
each field's ``metadata`` holds the flag's help text, spelling and range; the fine-tuning attack's
fields are the ``--ft-*`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

ATTACKS = ("ablation", "pruning", "finetune")  # the built-in attacks (the registry: runner.register_attack)


def _f(default: Any, help: str = "", **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class FinetuneConfig:
    """Settings of the fine-tuning attack.

    Attributes:
        steps: step counts at which the attacked model is handed to ``on_checkpoint`` (sorted).
        rank, alpha: LoRA rank and scale (rank 8 as in the published attack).
        lr: AdamW learning rate.
        batch_size: pairs per step (sampled with replacement-free epochs under ``seed``).
        max_length: tokens per (prompt + answer) sequence, longer ones are cut at the end.
    """

    steps: tuple[int, ...] = _f((10, 50, 100), "LoRA fine-tuning step counts evaluated.", metavar="N,N,...")
    rank: int = _f(8, "Fine-tuning attack LoRA rank.", min=1)
    alpha: float = _f(16.0, "LoRA scale.", cli=False)
    lr: float = _f(2e-4, "Fine-tuning attack learning rate.")
    batch_size: int = _f(4, "Harmful pairs per fine-tuning step.", min=1)
    max_length: int = _f(192, "Tokens per (prompt + answer) sequence.", cli=False)
    seed: int = _f(0, "Seed of the pair order (the CLI uses --seed).", cli=False)

    def __post_init__(self) -> None:
        self.steps = tuple(sorted({int(s) for s in self.steps}))
        if not self.steps or self.steps[0] < 1:
            raise InputError(f"fine-tune steps must be positive integers, got {self.steps}")
        if self.batch_size < 1 or self.rank < 1:
            raise InputError("fine-tune batch size and rank must be at least 1")


@dataclass
class RobustnessOptions:
    """Settings of a robustness run (one place for the CLI, the API and ``results.json``).

    Attributes:
        suites: eval suites run after each attack (harmful suites give the ASR); e.g.
            ``harmbench``, ``jailbreak:prefill`` once that suite exists.
        limit: samples per suite; max_new_tokens, batch_size, judges: as in ``nestpatch eval``.
        attacks: which attacks to run (``ablation``, ``pruning``, ``finetune``).
        prune_counts: numbers of neurons pruned (strengths of the pruning attack).
        finetune: the fine-tuning attack's settings (LoRA rank, steps, lr).
        attack_pairs: harmful (request, answer) pairs generated for the fine-tuning attack.
        answer_tokens: length cap of those answers.
        answer_model: the complying model that writes them (default: the base MODEL).
        direction_prompts: harmful and harmless training prompts each, for the refusal
            direction and for the pruning detector (built-in training sources).
        val_prompts: HarmBench *validation* and built-in held-out benign prompts each, to choose
            the ablation layer.
        kl_max: KL ceiling of the ablation layer choice (Arditi et al. use 0.1).
        threads: torch CPU threads (the CLI sets them for its process; ``None``: torch's default).
        attack_base: attack the base model too (else it is only evaluated, as the reference).
        resume: read back finished evaluation points.
    """

    suites: tuple[str, ...] = _f(("harmbench",), "Comma-separated eval suites run after each attack (harmful suites give the "
                                                 "ASR), e.g. harmbench,jailbreak:prefill.")
    limit: int | None = _f(40, "Samples per suite.", min=1)
    max_new_tokens: int = _f(64, "Reply length of the evaluations.", min=1, max=8192)
    batch_size: int = _f(8, "Generation batch.", min=1, max=512)
    judges: tuple[str, ...] = _f(("refusal-phrase",), "Comma-separated judge names.", flag="--judge")
    attacks: tuple[str, ...] = _f(ATTACKS, "Attacks to run.")
    prune_counts: tuple[int, ...] = _f((50, 200, 800), "Numbers of neurons pruned.", flag="--prune", metavar="N,N,...")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"prefix": "ft_"})
    attack_pairs: int = _f(64, "Harmful (request, answer) pairs generated for the fine-tuning attack (kept under the run "
                               "directory).", min=2)
    answer_tokens: int = _f(96, "Length cap of those answers.", cli=False)
    answer_model: str | None = _f(None, "Complying model that writes the answers (default: MODEL itself).", show_default=False)
    direction_prompts: int = _f(64, "Harmful and harmless training prompts each, for the refusal direction and the pruning "
                                    "detector.", min=2)
    val_prompts: int = _f(32, "HarmBench validation and held-out benign prompts each, to choose the ablation layer.", min=2)
    kl_max: float = _f(0.1, "KL ceiling of the ablation layer choice.")
    seed: int = _f(0, "Seed of the run (also the fine-tuning attack's).")
    device: str = _f("auto", "torch: auto|cpu|cuda|mps.")
    threads: int | None = _f(None, "torch CPU threads.", min=1, show_default=False)
    attack_base: bool = _f(True, "Attack the base model too; without, the base is only evaluated (the reference ASR).",
                           flag="--base-attacks/--no-base-attacks")
    resume: bool = _f(False, "Continue a run, reading back finished evaluation points.", flag="--resume")
    progress: bool = _f(True, "Progress bars on stderr.", cli=False)  # the shared --progress/--no-progress

    def __post_init__(self) -> None:
        from .runner import get_attack  # the attack registry (the runner's functions)

        self.suites = tuple(self.suites)
        self.attacks = tuple(self.attacks)
        for a in self.attacks:
            get_attack(a)  # an unknown name: one error listing the registered attacks
        self.prune_counts = tuple(sorted({int(k) for k in self.prune_counts}))
        if any(k < 1 for k in self.prune_counts):
            raise InputError(f"prune counts must be positive, got {self.prune_counts}")
        if not self.suites:
            raise InputError("give at least one eval suite")
        for name in ("direction_prompts", "val_prompts", "attack_pairs"):
            if getattr(self, name) < 2:
                raise InputError(f"{name} must be at least 2, got {getattr(self, name)}")
