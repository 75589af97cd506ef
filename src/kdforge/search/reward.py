"""Multi-objective reward of a candidate student: task score traded against latency.

MnasNet (Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile", CVPR 2019,
eq. 2) scores a model ``m`` as

    reward(m) = ACC(m) * (LAT(m) / T) ** w,     w = alpha if LAT(m) <= T else beta

with ``T`` the target latency. KD-NAS (Trivedi et al., "Neural Architecture Search for Effective
Teacher-Student Knowledge Transfer in Language Models", 2023) rewards its controller with the same
accuracy x latency product. Two settings of (alpha, beta) are given in MnasNet:

* soft constraint, :func:`mnas_reward`: ``alpha = beta = w = -0.07``. The latency factor is a smooth
  power law: a student 2x slower than the target keeps ``2 ** -0.07 = 0.953`` of its score (about
  5 % is lost), one 2x faster gains about 5 %. MnasNet picks ``w`` so that "2x latency ~ 5 % accuracy".
  ``w = 0`` ignores latency; a more negative ``w`` (e.g. -0.15) trades more accuracy for speed.
* hard constraint, :func:`hard_reward`: ``alpha = 0, beta = -1``. Students within the target keep
  their score unchanged (no bonus for being faster); slower ones are penalised in proportion,
  ``score * T / LAT``.

Latency only enters as the ratio ``LAT / T``, so latencies in milliseconds, seconds, or as ratios
to a reference model (e.g. the teacher, with ``T = 1 / target_speedup``) give the same reward, as
long as latency and target use the same unit.
"""

from __future__ import annotations

import math

from kdforge.errors import KDForgeError

__all__ = ["hard_reward", "mnas_reward"]


def _check(score: float, latency: float, target: float) -> None:
    if not math.isfinite(score) or score < 0:
        raise KDForgeError(
            f"the search reward multiplies the task score by a latency factor, so the score must be a finite "
            f"number >= 0, got {score!r}; search on an accuracy-like metric where higher is better"
        )
    if not math.isfinite(latency) or latency <= 0:
        raise KDForgeError(
            f"the measured student latency must be a finite number > 0, got {latency!r}; "
            "check the latency measurement of the candidate"
        )
    if not math.isfinite(target) or target <= 0:
        raise KDForgeError(
            f"the target latency must be a finite number > 0, got {target!r}; set search.target_speedup to a number > 0"
        )


def mnas_reward(score: float, latency: float, target: float, w: float = -0.07) -> float:
    """MnasNet soft-constraint reward ``score * (latency / target) ** w`` (Tan et al. 2019, eq. 2).

    Args:
        score: task score of the candidate, higher is better and >= 0 (accuracy, F1, ...).
        latency: measured latency of the candidate (> 0), in the same unit as ``target``.
        target: target latency (> 0).
        w: latency exponent, <= 0 (``search.reward_weight``). -0.07 (MnasNet): 2x slower costs
            about 5 % of the reward; 0 ignores latency.

    Returns:
        The reward: equal to ``score`` at ``latency == target``, above it for faster candidates,
        below it for slower ones.
    """
    _check(score, latency, target)
    if not math.isfinite(w) or w > 0:
        raise KDForgeError(
            f"search.reward_weight must be a finite number <= 0 (MnasNet uses -0.07; 0 ignores latency), got {w!r}"
        )
    return float(score) * (float(latency) / float(target)) ** float(w)


def hard_reward(score: float, latency: float, target: float) -> float:
    """MnasNet hard-constraint reward (Tan et al. 2019, eq. 2 with ``alpha = 0``, ``beta = -1``).

    ``score`` if ``latency <= target`` else ``score * (latency / target) ** -1 = score * target / latency``.
    Candidates within the target are ranked by score alone; slower ones lose reward in proportion.
    """
    _check(score, latency, target)
    if latency <= target:
        return float(score)
    return float(score) * float(target) / float(latency)
