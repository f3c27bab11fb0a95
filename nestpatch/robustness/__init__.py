"""White-box attacks on safety updates: what it costs an attacker with the weights to remove them.

One module per attack (:mod:`.ablation`, :mod:`.pruning`, :mod:`.finetune`), the updates under
attack (:mod:`.updates`), the runner (:mod:`.runner`) and its renderings (:mod:`.render`).
"""

from .runner import RobustnessOptions, run_robustness
from .updates import SafetyUpdate, classify

__all__ = ["RobustnessOptions", "run_robustness", "SafetyUpdate", "classify"]
