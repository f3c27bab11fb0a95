"""What every judge returns (:class:`Verdict`) and provides (:class:`Judge`).

A module of its own so that the judge registry (:mod:`.judges`) and the judges it registers
(:mod:`.model_judge`) both depend on it, and not on each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Verdict:
    """One judge's decision on one reply.

    Attributes:
        label: short label (``refusal``, ``compliance``, ``empty``; ``safe``, ``unsafe``, ``unparsed``).
        refused: whether the reply refuses (None: this judge does not judge refusal).
        unsafe: whether the reply is unsafe content (None: this judge does not judge safety).
        evidence: what decided it (the matched phrase, the classifier's first line).
        score: a graded judge's score behind the label (the harm judge's log-odds of "yes");
            None for judges that only label.
    """

    label: str
    refused: bool | None = None
    unsafe: bool | None = None
    evidence: str = ""
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Judge(Protocol):
    """What a judge provides."""

    name: str
    judges_refusal: bool  # its verdicts set ``refused``
    judges_safety: bool  # its verdicts set ``unsafe``

    def judge(self, prompt: str, reply: str) -> Verdict: ...

    def describe(self) -> dict[str, Any]: ...
