"""When has a teacher learned? The floor its score must reach for a table built on it to be evidence.

Defaults by the task's main metric (the trivial predictor is the majority class / the training mean):

==============  ==========================================================
accuracy        10 points above the majority class (CIFAR-10: at least 0.85)
f1              5 points above the majority class (which predicts the positive class)
mcc             at least 0.20 (the trivial predictor scores 0)
pearson         at least 0.50 (a constant has no correlation)
spearman        at least 0.50
==============  ==========================================================

A study's ``teacher_floor`` replaces the rule with one absolute number.
"""

from __future__ import annotations

from dataclasses import dataclass

ABOVE_BASELINE = {"accuracy": 0.10, "f1": 0.05}
ABSOLUTE = {"mcc": 0.20, "pearson": 0.50, "spearman": 0.50}
TASK_ABSOLUTE = {"cifar10": 0.85}


@dataclass(frozen=True)
class Floor:
    value: float | None  # None: no rule for this metric (nothing is claimed about the teacher)
    rule: str

    def clears(self, score: float | None) -> bool | None:
        if self.value is None or score is None:
            return None
        return score >= self.value


def teacher_floor(task: str, metric: str, baseline: float | None, explicit: float | None = None) -> Floor:
    """The floor of a teacher scored ``metric`` on ``task`` whose trivial predictor scores ``baseline``."""
    if explicit is not None:
        return Floor(explicit, f"{explicit:.4f} (the study's teacher_floor)")
    candidates = []
    if metric in ABOVE_BASELINE and baseline is not None:
        gap = ABOVE_BASELINE[metric]
        candidates.append((baseline + gap, f"majority class {baseline:.4f} + {gap:.2f}"))
    if metric in ABSOLUTE:
        candidates.append((ABSOLUTE[metric], f"{metric} >= {ABSOLUTE[metric]:.2f}"))
    if task in TASK_ABSOLUTE and metric == "accuracy":
        candidates.append((TASK_ABSOLUTE[task], f"{task} accuracy >= {TASK_ABSOLUTE[task]:.2f}"))
    if not candidates:
        return Floor(None, f"no floor for {metric}")
    value, rule = max(candidates)
    return Floor(value, rule)
