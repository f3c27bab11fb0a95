"""The settings of an evaluation run (:class:`EvalOptions`), in a module without torch.

``nestpatch eval`` generates its flags from the fields (:func:`nestpatch.cli.options.dataclass_options`):
each field's ``metadata`` holds the flag's help text, spelling, range and choices, and
``cli_default`` where the command's default differs from the library's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..converters.precision import PRECISIONS
from ..errors import InputError
from .suites import FILE_KINDS

BACKENDS = ("torch", "llama")
PATCH_MODES = ("fold", "lora")
DTYPES = ("float32", "bfloat16", "float16")


def _f(default: Any, help: str = "", **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class EvalOptions:
    """Settings of an evaluation run (one place for the CLI, the API and ``run.json``).

    Attributes:
        max_new_tokens: reply length cap (greedy decoding) of benign and over-refusal suites.
        harmful_max_new_tokens: the cap of harmful and jailbreak suites (``None``: max_new_tokens;
            the CLI's default is 128: replies that open with a refusal and pivot late are missed at 64).
        harm_model: GGUF path or model asset of the ``harm``/``composite`` judges
            (default ``qwen2.5-coder-1.5b``).
        harm_threshold: the harm judge's log-odds threshold (``None``: calibrated for the default
            model, 0 for another).
        batch_size: prompts per generation batch (torch) or sequences in flight (llama.cpp; 1 = one at a time).
        limit: only the first N samples of each suite (quick looks).
        seed: recorded, and seeds torch (decoding is greedy, so results do not depend on it).
        judges: judge names from the registry, the first refusal judge is the primary one.
        judge_model: a local classifier model file: adds the ``model`` judge.
        judge_format: its prompt format (``auto``, ``llama-guard-3`` or a template file).
        utility_reply_tokens: length of the reference answers the KL is measured on.
        resume: continue a run in ``out_dir``, skipping samples already written.
        progress: show progress bars (stderr).
        compare: evaluate with and without the patch (``base`` and ``patched``).
        device, dtype: torch loading.
        patch_mode, precision: llama.cpp: fold the patch into a cached GGUF, or run it as LoRA.
        n_threads, n_ctx: llama.cpp settings (threads default to all cores).
        column, file_kind: for suites given as prompt files.
        require_signature: a public key: refuse an unsigned or badly signed patch.
        reference: a GGUF of the same architecture that MODEL is compared against (llama backend,
            no patch): MODEL runs as ``patched`` and the reference as ``base``, so KL and flips
            measure a model fine-tuned or folded elsewhere (a LoRA or full fine-tuning baseline)
            exactly as they measure a patch.
    """

    max_new_tokens: int = _f(64, "Reply length of benign and over-refusal suites.", min=1, max=8192)
    harmful_max_new_tokens: int | None = _f(None, "Reply length of harmful and jailbreak suites (late pivots from a refusal "
                                                  "need room).", min=1, max=8192, cli_default=128)
    harm_model: str | None = _f(None, "GGUF path or model asset of the harm/composite judges [default: qwen2.5-coder-1.5b].",
                                show_default=False)
    harm_threshold: float | None = _f(None, "Harm judge: unsafe when log P(yes) - log P(no) exceeds this [default: calibrated "
                                            "on the hand labels for the default model, else 0].", show_default=False)
    batch_size: int = _f(8, "torch: prompts per generation batch; llama: sequences decoded together (1 = one at a time).",
                         min=1, max=512)
    limit: int | None = _f(None, "Only the first N samples of each suite.", min=1, show_default=False)
    seed: int = _f(0, "Recorded, and seeds torch (decoding is greedy).")
    judges: tuple[str, ...] = _f(("refusal-phrase",), "Comma-separated judges: refusal-phrase, strict-refusal, harm, composite "
                                                      "(harm AND no refusal phrase).",
                                 flag="--judge", cli_default=("refusal-phrase", "strict-refusal"))
    judge_model: str | None = _f(None, "A local safety classifier GGUF (e.g. Llama Guard): adds the model judge.", path="file",
                                 show_default=False)
    judge_format: str = _f("auto", "Its prompt format: auto, llama-guard-3, or a template file.")
    utility_reply_tokens: int = _f(32, "Length of the reference answers the KL is measured on.", cli=False)
    resume: bool = _f(False, "Continue the run in the directory, skipping finished samples.", flag="--resume")
    progress: bool = _f(True, "Progress bars on stderr.", cli=False)  # the shared --progress/--no-progress
    compare: bool = _f(False, "Run with and without the patch and report the flips.", flag="--compare")
    device: str = _f("auto", "torch: auto|cpu|cuda|mps.")
    dtype: str = _f("float32", "torch: the dtype the model is loaded in.", choices=DTYPES)
    patch_mode: str = _f("fold", "llama: fold the patch into a cached GGUF copy, or run it as a LoRA adapter.",
                         choices=PATCH_MODES)
    precision: str = _f("keep", "llama fold precision of touched tensors.", choices=PRECISIONS)
    n_threads: int | None = _f(None, "llama.cpp threads (default: all cores).", flag="--threads", min=1, show_default=False)
    n_ctx: int = _f(2048, "llama.cpp context length.", cli=False)
    column: str | None = _f(None, "Prompt column of suite files.", show_default=False)
    file_kind: str = _f("harmful", "What suite files hold.", choices=FILE_KINDS)
    require_signature: Any = _f(None, "Refuse a patch not signed with this public key.", flag="--require-signature",
                                path="file", exists=True, show_default=False)
    reference: str | None = _f(None, "llama: compare MODEL with this GGUF of the same architecture (its base): MODEL runs as "
                                     "'patched', the reference as 'base' (KL, flips). Not with --patch.", flag="--reference",
                               path="file", exists=True, show_default=False)

    def __post_init__(self) -> None:
        if self.harmful_max_new_tokens is None:
            self.harmful_max_new_tokens = self.max_new_tokens
        if self.max_new_tokens < 1 or self.harmful_max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}/{self.harmful_max_new_tokens}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1, got {self.limit}")
        self.judges = tuple(self.judges)
