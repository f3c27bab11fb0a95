"""nestpatch.memory: a fixed mmap threshold gives freed large blocks back to the OS (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A 16 MB block freed raises glibc's dynamic threshold to 16 MB; then 200 temporaries of 2 MB, each
# followed by a small block that stays, as a model load's dequantized tensors and what it keeps.
_FRAGMENT = """
import sys
import numpy as np
from nestpatch.memory import fix_mmap_threshold
print(int(fix_mmap_threshold()) if sys.argv[1] == "fixed" else -1)
a = np.ones(2 << 20); del a
keep, big = [], []
for i in range(200):
    big.append(np.ones(1 << 18)); keep.append(np.ones(64))
del big
print(int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20)
"""


def _run(mode: str, threshold: str | None = None) -> tuple[int, int]:
    """(whether fix_mmap_threshold set it: 1/0, or -1 when not called; RSS in MB after the temporaries are freed)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], check=True, capture_output=True, text=True, env=env).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_fixed_mmap_threshold_returns_freed_temporaries_to_the_os() -> None:
    (_, default_mb), (was_set, fixed_mb) = _run("default"), _run("fixed")
    assert was_set == 1
    # 400 MB of freed temporaries stay resident under glibc's dynamic threshold, not under a fixed one
    assert default_mb - fixed_mb > 300, (default_mb, fixed_mb)
    # a user's own MALLOC_MMAP_THRESHOLD_ is left to glibc: nothing is set, and glibc's fixed value works the same
    was_set, user_mb = _run("fixed", threshold="131072")
    assert was_set == 0 and user_mb < default_mb - 300


_LOAD = """
import sys
import nestpatch.models.loading as loading
from nestpatch.memory import fix_mmap_threshold
from nestpatch.testing import make_pico_model, write_hf_dir
d = write_hf_dir(make_pico_model(seed=0), sys.argv[1])
loading.LARGE_MODEL_BYTES = int(sys.argv[2])
loading.load_model(str(d))
print(int(fix_mmap_threshold()))  # 1: the load left the choice open; 0: the load already fixed it
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_load_model_fixes_the_threshold_only_for_large_weights(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}

    def after_load(limit: int) -> str:
        return subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / f"m{limit}"), str(limit)], check=True,
                              capture_output=True, text=True, env=env).stdout.split()[-1]

    assert after_load(1 << 40) == "1"  # a small model keeps glibc's faster default
    assert after_load(0) == "0"  # weights at the limit: fixed during the load


_FAULTS = """
import resource, sys
import nestpatch.models.loading as loading
loading.LARGE_MODEL_BYTES = int(sys.argv[2])
lm = loading.load_model(sys.argv[1])  # the process's first tensors: PyTorch reads THP_MEM_ALLOC_ENABLE now
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [torch.ones(2 << 20) for _ in range(8)]  # 8 MB each, touched: 16,384 fresh 4 KiB pages in all
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_available() -> bool:
    try:
        return "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _thp_available(), reason="transparent huge pages (Linux, not 'never')")
def test_load_model_backs_a_large_models_tensors_with_huge_pages(tmp_path) -> None:
    from nestpatch.testing import make_pico_model, write_hf_dir

    d = write_hf_dir(make_pico_model(seed=0), tmp_path / "pico")  # written here: the child's first tensors are the load's
    base_env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE")}

    def faults(limit: int, **env: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _FAULTS, str(d), str(limit)], check=True, capture_output=True,
                                  text=True, env={**base_env, **env}).stdout.split()[-1])

    pages = 8 * (8 << 20) // 4096
    # a large model: every whole 2 MB page inside a block is one fault instead of 512 (PyTorch does not align the
    # blocks, so the unaligned ends of each 8 MB block, about 2 MB, stay small pages: measured 4,142 of 16,384)
    assert faults(0) < pages // 2
    assert faults(0, THP_MEM_ALLOC_ENABLE="0") > pages * 3 // 4  # the user's own value stands: a fault a page
    assert faults(1 << 40) > pages * 3 // 4  # a small model keeps the default allocator
