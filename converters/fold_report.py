"""What a fold did, per target: types, retention of the intended delta, size change.

Retention answers "how much of the patch survived re-encoding": with ``intended`` the float
delta and ``realized`` the difference between the re-encoded folded weights and the re-encoded
base weights, ``retention = <realized, intended> / <intended, intended>`` (1.0 = all of it) and
``rel_error = ||realized - intended|| / ||intended||``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np


def retention_stats(intended: np.ndarray, realized: np.ndarray) -> tuple[float, float]:
    """``(retention, rel_error)`` of a realized delta against the intended one (float64 sums)."""
    i = np.asarray(intended, dtype=np.float64).ravel()
    r = np.asarray(realized, dtype=np.float64).ravel()
    denom = float(i @ i)
    if denom == 0.0:
        return 1.0, 0.0
    return float(r @ i) / denom, float(np.linalg.norm(r - i)) / float(np.sqrt(denom))


@dataclass
class TargetFold:
    """One folded tensor."""

    name: str  # HF name of the target
    tensor: str  # name in the output file (GGUF or safetensors)
    type_in: str
    type_out: str
    retention: float
    rel_error: float
    bytes_in: int
    bytes_out: int
    blocks_touched: int = 0
    blocks_total: int = 0


@dataclass
class FoldReport:
    """Summary of one fold (JSON-serializable)."""

    model_in: str
    model_out: str
    patch_digest: str
    format: str  # "gguf" or "safetensors"
    precision: str = "keep"
    targets: list[TargetFold] = field(default_factory=list)
    seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def min_retention(self) -> float:
        return min((t.retention for t in self.targets), default=1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["min_retention"] = self.min_retention
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
