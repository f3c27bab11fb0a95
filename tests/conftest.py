"""Shared fixtures: pico models in real formats, built once per test session.

Nothing here reaches a model hub: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE are set before any test
imports transformers. ``NESTPATCH_HOME`` is left as the user's, so the SmolLM2 asset and the
extracted pico tokenizer are reused from the cache instead of being fetched again.

Fixtures:
    pico_model        random 2-layer Llama (d_model 64, n_ff 256, vocab 49152), seed 0
    pico_model_other  same shapes, seed 1 (a "different model" for fingerprint tests)
    pico_model_k      d_model 256 (rows of 256: K-quants), seed 2
    pico_hf_dir       pico_model as a float32 single-file HF directory (with tokenizer)
    pico_gguf         factory ``pico_gguf(qtype="F32", model=None) -> Path``, cached per (qtype, model);
                      model None means pico_model, or pico_model_k for K-quants
    pico_patch        random_patch(pico_model)
    pico_patch_k      random_patch(pico_model_k)
    smollm2_gguf      path of the real SmolLM2-135M-Instruct Q4_1 GGUF
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402

_K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


@pytest.fixture(scope="session")
def pico_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pico")


@pytest.fixture(scope="session")
def pico_model() -> Any:
    from nestpatch.testing import make_pico_model

    return make_pico_model(seed=0)


@pytest.fixture(scope="session")
def pico_model_other() -> Any:
    from nestpatch.testing import make_pico_model

    return make_pico_model(seed=1)


@pytest.fixture(scope="session")
def pico_model_k() -> Any:
    from nestpatch.testing import make_pico_model

    return make_pico_model(seed=2, hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="session")
def pico_hf_dir(pico_model: Any, pico_dir: Path) -> Path:
    from nestpatch.testing import write_hf_dir

    return write_hf_dir(pico_model, pico_dir / "hf_f32")


@pytest.fixture(scope="session")
def pico_gguf(pico_model: Any, pico_dir: Path, request: pytest.FixtureRequest) -> Callable[..., Path]:
    from nestpatch.testing import write_gguf

    cache: dict[tuple[str, int], Path] = {}

    def make(qtype: str = "F32", model: Any = None) -> Path:
        q = qtype.upper()
        if model is None:
            model = request.getfixturevalue("pico_model_k") if q in _K_TYPES else pico_model
        key = (q, id(model))
        if key not in cache:
            hidden = int(model.config.hidden_size)
            cache[key] = write_gguf(model, pico_dir / f"pico_{hidden}_{id(model):x}_{q}.gguf", qtype=q)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def pico_patch(pico_model: Any) -> Any:
    from nestpatch.testing import random_patch

    return random_patch(pico_model, seed=0)


@pytest.fixture(scope="session")
def pico_patch_k(pico_model_k: Any) -> Any:
    from nestpatch.testing import random_patch

    return random_patch(pico_model_k, seed=2)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from nestpatch.assets import fetch

    return fetch("smollm2")
