"""Schedules for loss weights and temperatures, as functions of training progress in [0, 1].

A config value is either a number (constant) or a mapping:
    {schedule: linear, start: 0.0, end: 1.0}          start + (end - start) * p
    {schedule: cosine, start: 1.0, end: 0.0}          end + (start - end) * (1 + cos(pi p)) / 2
    {schedule: step, values: [1.0, 0.5], milestones: [0.5]}   values[k] once p >= milestones[k-1]
Any Python callable ``f(progress: Progress) -> float`` is accepted from the API.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdforge.config import format_validation_error
from kdforge.errors import KDForgeError
from kdforge.progress import Progress


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schedule: Literal["constant", "linear", "cosine", "step"]
    value: float | None = None
    start: float | None = None
    end: float | None = None
    values: list[float] = Field(default_factory=list)
    milestones: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> _Spec:
        if self.schedule == "constant" and self.value is None:
            raise ValueError("constant schedule needs `value`")
        if self.schedule in ("linear", "cosine") and (self.start is None or self.end is None):
            raise ValueError(f"{self.schedule} schedule needs `start` and `end`")
        if self.schedule == "step" and len(self.values) != len(self.milestones) + 1:
            raise ValueError("step schedule needs len(values) == len(milestones) + 1")
        return self


Schedule = Callable[[Progress], float]


def make_schedule(spec: float | int | dict[str, Any] | Schedule, where: str = "weight") -> Schedule:
    """Turn a number, a schedule mapping or a callable into ``f(progress) -> float``."""
    if callable(spec):
        return spec
    if isinstance(spec, int | float):
        value = float(spec)
        return lambda progress: value
    try:
        s = _Spec.model_validate(spec)
    except ValidationError as err:
        raise KDForgeError(format_validation_error(err, where)) from None
    if s.schedule == "constant":
        return lambda progress: s.value
    if s.schedule == "linear":
        return lambda progress: s.start + (s.end - s.start) * progress.fraction
    if s.schedule == "cosine":
        return lambda progress: s.end + (s.start - s.end) * (1 + math.cos(math.pi * progress.fraction)) / 2
    return lambda progress: s.values[bisect.bisect_right(s.milestones, progress.fraction)]
