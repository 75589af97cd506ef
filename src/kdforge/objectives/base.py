"""The Objective contract: one loss term, selectable by name, composable by weighted sum.

    objective(student: Outputs, teacher: Outputs | None, batch: dict, progress: Progress) -> Tensor

Objectives are ``nn.Module`` so that terms owning parameters (a learnable temperature, a
projection) are trained by the student's optimizer, moved to the device and checkpointed
without any change to the engine. Each objective validates its own parameters with a nested
pydantic ``Params`` model (unknown or out-of-range values are config errors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, PositiveFloat, ValidationError
from torch import nn

from kdforge.config import ObjectiveConfig, check_finite, format_validation_error
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.schedules import make_schedule
from kdforge.progress import Progress
from kdforge.registry import Registry


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(nn.Module):
    """Base class of loss terms. Subclasses set ``Params`` and implement ``forward``."""

    Params: ClassVar[type[BaseModel]] = NoParams
    #: Does the term read a teacher's outputs? (False: CE on gold labels, self-distillation terms.)
    uses_teacher: ClassVar[bool] = True
    #: What the term needs from the models' forward: "hidden_states", "attentions".
    requires: ClassVar[frozenset[str]] = frozenset()
    #: May the term's weight be negative? Only a term whose docstring says what a negative weight
    #: means sets this; for every other term a negative weight maximises the loss (a config error).
    allows_negative_weight: ClassVar[bool] = False
    #: Does the term read each training example's position (``batch["index"]``, a per-example state)? The
    #: stage's data is then indexed (kdforge.recipes.teacher_sources.teacher_sources).
    needs_index: ClassVar[bool] = False

    def __init__(self, params: BaseModel | None = None):
        super().__init__()
        self.params = params if params is not None else self.Params()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once the models are known, before the optimizer is built: create parameters sized
        to the models here (a projection from the student's width to the teacher's)."""

    @property
    def teacher_temperature(self) -> float | None:
        """The temperature at which the term reads its teacher's logits when it is one fixed number (the
        teacher-output cache fits its top-k tail there); None: none known (no temperature, a schedule).
        Default: the term's ``temperature`` parameter."""
        value = getattr(self.params, "temperature", None)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    #: How many training rows :meth:`calibrate` wants to see (0: the term has no calibration).
    calibration_rows: int = 0

    def calibrate(self, student: nn.Module, teacher: nn.Module | None, batches: list[dict[str, Any]]) -> None:
        """Called before :meth:`setup` when ``calibration_rows`` > 0, with the first ``calibration_rows``
        training rows of the stage (in the data's order, so the same for every seed) as collated batches:
        choose what depends on the data (e.g. hint layers by CKA, kdforge.objectives.hint_points)."""

    def hook_paths(self, student: nn.Module, teacher: nn.Module | None) -> tuple[list[str], list[str]]:
        """Module paths whose outputs this term reads from ``Outputs.features``: (student, teacher)."""
        return [], []

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any],
                progress: Progress) -> torch.Tensor:
        raise NotImplementedError


Temperature = float | torch.Tensor

#: a logit term's ``temperature`` setting: a number, a schedule mapping
#: (``{schedule: linear, start: 8, end: 2}``, see schedules.py) or ``f(progress) -> float``
TemperatureSetting = PositiveFloat | dict[str, Any] | Callable[[Progress], float]


class LogitObjective(Objective):
    """A term computed from logits alone, at a temperature that may be a tensor.

    ``logit_loss`` takes the temperature as an argument so that a learned temperature (CTKD) can
    drive any logit term: a float, a scalar tensor, or one value per sample of shape (N, 1).
    ``forward`` calls it with the configured ``params.temperature`` (1.0 when the term has none).
    """

    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                   labels: torch.Tensor | None, temperature: Temperature, progress: Progress) -> torch.Tensor:
        raise NotImplementedError

    def __init__(self, params: BaseModel | None = None):
        super().__init__(params)
        self._temperature_schedule = make_schedule(getattr(self.params, "temperature", 1.0), "temperature")

    def temperature_at(self, progress: Progress) -> float:
        """The configured temperature now: constant, or following its schedule."""
        value = float(self._temperature_schedule(progress))
        if value <= 0:
            raise KDForgeError(f"the temperature schedule of {type(self).__name__} reached {value} at step "
                               f"{progress.step}; keep it above 0")
        return value

    def forward(self, student, teacher, batch, progress):
        return self.logit_loss(student.logits, None if teacher is None else teacher.logits, batch.get("labels"),
                               self.temperature_at(progress), progress)


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def objective_params(config: ObjectiveConfig, index: int = 0) -> tuple[type[Objective], BaseModel]:
    """The registered class of ``config`` and its validated parameters (nothing is built). The
    registry is full: importing this module ran ``kdforge/objectives/__init__.py`` first."""
    cls = OBJECTIVES.get(config.name, f"objectives.{index}.name")
    check_finite(config.params, f"objective {config.name!r}", ("objectives", index), free_form=True)
    try:
        return cls, cls.Params.model_validate(config.params)
    except ValidationError as err:
        raise KDForgeError(format_validation_error(err, f"objective {config.name!r} (objectives.{index})")) from None


def build_objective(config: ObjectiveConfig, index: int = 0) -> Objective:
    """Instantiate a registered objective, validating its parameters."""
    cls, params = objective_params(config, index)
    return cls(params)
