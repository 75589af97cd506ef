"""The statistics a study decides by: intervals over seeds and the one rule that words a claim.

* A row's score over its seeds ``x_1..x_n``: mean, sample standard deviation ``s`` (``n - 1``) and
  the 95% Student-t interval of the mean, ``mean +- t_{0.975, n-1} * s / sqrt(n)``.
* A row against another (the baseline, or the two rows of a claim): the *paired* differences
  ``d_i = a_i - b_i`` over the seeds both rows ran (same seed = same data order and initial
  parts), with the same t interval on ``mean(d)``. Pairing removes the seed-to-seed variation the
  two rows share. With 3 seeds ``t_{0.975, 2} = 4.30``: a bootstrap over three values is degenerate,
  so the t interval is used throughout (its assumption, normal differences, is stated in the report).
* The rule (:func:`verdict`): a claim that A is higher (or lower) than B *holds* when the interval
  of the difference excludes 0 on the claimed side, is *contradicted* when it excludes 0 on the other
  side, and is *undecided at this budget* otherwise. For an undecided claim the report gives the
  smallest difference the study could have detected: the interval's half-width, i.e. the smallest
  ``|mean(d)|`` that would have excluded 0 with the spread observed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats

LEVEL = 0.95
HOLDS, CONTRADICTED, UNDECIDED = "holds", "contradicted", "undecided at this budget"
Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its sample standard deviation and 95% t interval
    (``low``/``high`` are None when ``n < 2``: no spread, no interval)."""

    mean: float
    std: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "low": self.low, "high": self.high, "n": self.n,
                "half_width": self.half_width}


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean, sample std and the two-sided ``level`` Student-t interval of the mean of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("t_interval needs at least one value")
    mean, n = statistics.fmean(values), len(values)
    if n < 2:
        return Interval(mean, None, None, None, n)
    std = statistics.stdev(values)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Interval | None:
    """The t interval of ``a[seed] - b[seed]`` over the seeds both hold (None when none is shared)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return t_interval([a[s] - b[s] for s in seeds])


def verdict(difference: Interval | None, direction: Direction = "higher") -> str:
    """holds / contradicted / undecided at this budget, by the interval of ``a - b`` (see the module)."""
    if difference is None or difference.low is None:
        return UNDECIDED
    if difference.low > 0:
        return HOLDS if direction == "higher" else CONTRADICTED
    if difference.high < 0:
        return HOLDS if direction == "lower" else CONTRADICTED
    return UNDECIDED
