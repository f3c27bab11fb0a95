"""Helpers for tests and benchmarks: tiny real models in every format nestpatch reads.

Importing this package needs torch and transformers (the ``train`` extra); the format layer
never imports it.
"""

from .pico import (
    make_pico_model,
    random_patch,
    smollm2_tokenizer,
    write_gguf,
    write_hf_dir,
)

__all__ = ["make_pico_model", "random_patch", "smollm2_tokenizer", "write_gguf", "write_hf_dir"]
