"""Process memory: the peak RSS figure every report quotes, and glibc's heap kept from fragmenting.

Why the second: loading a GGUF model through transformers dequantizes every tensor into a large
temporary of its own size. glibc serves a freed large block's successors from the heap once its
*dynamic* mmap threshold has risen (it rises to the size of each freed mmapped block, up to 32 MB
on 64-bit), and a fragmented heap is not given back to the OS. Measured on Qwen2.5-Coder-1.5B
(docs/RESULTS.md, session 15): 14.1 GB resident after the load with glibc's defaults, 7.1 GB with
a fixed 128 KiB threshold; the default's RSS then grew by about 1 GB every 2 minutes of detection
and the OOM killer ended a training run at 21.3 GB. A fixed threshold serves every large block
from mmap, which returns it to the OS when freed. It costs time: each such block is fresh pages
(SmolLM2 on an idle 2-core machine: detection 1.4-1.6x and backward passes 1.3-1.4x as long), so
:func:`load_model` fixes it only for models whose weight files reach :data:`LARGE_MODEL_BYTES`,
where the memory decides whether a run fits at all.

Most of that cost is page faults: every fresh 4 KiB page of an mmapped block is zeroed by the kernel
on first touch (Qwen2.5-Coder-0.5B training: about 90,000 faults a second, half the CPU time in the
kernel). PyTorch can advise 2 MB transparent huge pages for its CPU tensors of 2 MB and more
(``THP_MEM_ALLOC_ENABLE``, ``madvise(MADV_HUGEPAGE)``): one fault per whole 2 MB page inside a block,
the block's unaligned ends still 4 KiB pages, and the blocks still go back to the OS when freed.
:func:`prefer_huge_pages` asks for it together with the fixed threshold (measured on that training:
3.6x fewer faults, 1.17x faster micro-batches, same peak RSS; docs/RESULTS.md, session 19).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys

log = logging.getLogger(__name__)

#: ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
#: Blocks at least this large come from mmap (glibc's initial threshold, kept fixed).
MMAP_THRESHOLD = 128 * 1024
#: The variable glibc itself reads at start-up; when the user set it, their value stands.
GLIBC_ENV = "MALLOC_MMAP_THRESHOLD_"
#: Weight files at least this large (Qwen2.5-Coder-0.5B's GGUF is 491 MB; SmolLM2's 98 MB) get the fixed threshold.
LARGE_MODEL_BYTES = 400 * 2**20

#: PyTorch's switch for huge-page-backed CPU tensors (c10's CPU allocator reads it at its first allocation).
TORCH_THP_ENV = "THP_MEM_ALLOC_ENABLE"

_decided = False  # the first call of fix_mmap_threshold / keep_glibc_default wins for the process


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / (1024.0 * 1024.0)


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; True when it was set.

    A no-op (False) off glibc (macOS, musl), when ``MALLOC_MMAP_THRESHOLD_`` is in the
    environment (glibc already applied the user's value), and after an earlier decision
    (this function or :func:`keep_glibc_default`). Call it before large allocations: blocks
    allocated before keep their place.
    """
    global _decided
    if _decided or GLIBC_ENV in os.environ or not sys.platform.startswith("linux"):
        return False
    _decided = True
    try:  # the process's own symbols: glibc is loaded, and no ldconfig subprocess runs (find_library would)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    log.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok


def keep_glibc_default() -> None:
    """Keep glibc's dynamic threshold for this process: later :func:`fix_mmap_threshold` calls do nothing."""
    global _decided
    _decided = True


def prefer_huge_pages() -> bool:
    """Ask PyTorch to back CPU tensors of 2 MB and more with transparent huge pages; True when this call asked.

    A no-op (False) off Linux and when ``THP_MEM_ALLOC_ENABLE`` is already in the environment (the
    user's value stands, ``0`` included). PyTorch reads the variable once, at its first CPU
    allocation, so this only takes effect when called before any tensor was made (as
    :func:`~nestpatch.models.loading.load_model` does before loading). The kernel decides whether
    huge pages are used (``/sys/kernel/mm/transparent_hugepage/enabled`` ``madvise`` or ``always``);
    with ``never`` the blocks stay 4 KiB pages, as before.
    """
    if TORCH_THP_ENV in os.environ or not sys.platform.startswith("linux"):
        return False
    os.environ[TORCH_THP_ENV] = "1"
    log.debug("%s=1: large CPU tensors on transparent huge pages", TORCH_THP_ENV)
    return True
