"""Small helpers shared by the objectives: required inputs, T^2."""

from __future__ import annotations

import torch

from kdforge.errors import KDForgeError
from kdforge.objectives.base import Temperature


def t_squared(temperature: Temperature) -> torch.Tensor | float:
    """T^2 per sample ((N,) for an (N, 1) temperature), keeping a tensor temperature's gradient."""
    return temperature.reshape(-1) ** 2 if torch.is_tensor(temperature) else temperature**2


def require(value: torch.Tensor | None, objective: str, what: str) -> torch.Tensor:
    """``value``, or a one-line error saying the term needs ``what`` ("labels" or "a teacher")."""
    if value is None:
        fix = ("give the batch gold `labels`" if what == "labels"
               else "configure a `teacher` (this term reads its logits)")
        raise KDForgeError(f"objective {objective!r} needs {what}; {fix}")
    return value
