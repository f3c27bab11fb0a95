"""Helpers for tests and benchmarks: tiny real models in every format nestpatch reads.

Importing it needs numpy only; the functions that build torch models import torch and
transformers (the ``train`` extra) when called. The format layer never imports this package.
"""

from .gguf_patches import random_patch_gguf
from .pico import (
    make_pico_model,
    random_patch,
    smollm2_tokenizer,
    write_gguf,
    write_hf_dir,
)

__all__ = ["random_patch_gguf", "make_pico_model", "random_patch", "smollm2_tokenizer", "write_gguf", "write_hf_dir"]
