"""The recipe layer's contracts: what a stage is assembled from, and the registries that name
its parts.

A stage = a data source (``DATA_SOURCES``: task, ptp, corpus, fsbbt) + roles (the learner, the
teachers it learns from) + a strategy (``STRATEGIES``: offline, multi_teacher, assistant_ensemble, ces_kd,
dml, bdkd_online, sokd, amal, soft_labels) whose :class:`~kdforge.engine.step.TrainStep` is the only thing
the engine sees. Teachers' outputs come from a teacher source (``kdforge.recipes.teacher_sources``: a
live model, the cache of a frozen one, or a black box answering queries). Adding a strategy is one
file in ``recipes/`` that registers a :class:`Strategy` subclass, plus its import in
``recipes/catalog.py``; the engine is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch.utils.data import Dataset

from kdforge.config import JobConfig, StageConfig, format_validation_error
from kdforge.engine.step import TrainStep
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel
from kdforge.objectives.composite import WeightedLoss
from kdforge.registry import Registry
from kdforge.tasks.base import Task


@dataclass
class StageContext:
    """Everything a strategy may use to build its step. ``train_data`` and ``collate`` may be
    replaced by the strategy (a cached teacher needs each example's index)."""

    config: JobConfig
    stage: StageConfig
    index: int
    data: Task  # the stage's data source
    learner_role: str
    learner: LoadedModel
    teachers: dict[str, LoadedModel]  # the roles this stage learns from, by name
    train_data: Dataset
    collate: Callable
    device: Any
    adapters: list[ModelAdapter] = field(default_factory=list)  # their hooks are removed after the stage

    def adapter(self, model: LoadedModel | Any, **kwargs) -> ModelAdapter:
        """A ModelAdapter over ``model`` that the stage runner cleans up after training."""
        adapter = ModelAdapter(getattr(model, "model", model), **kwargs)
        self.adapters.append(adapter)
        return adapter

    def loss(self, teachers: list[str] | None = None) -> WeightedLoss:
        """The stage's configured objectives, bound to ``teachers`` (default: the stage's teachers)."""
        return WeightedLoss.from_config(self.stage.objectives, list(self.teachers) if teachers is None else teachers)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy:
    """Who learns from whom in a stage. Subclasses set ``Params`` (validated from the stage's
    ``strategy:`` mapping) and implement :meth:`build`."""

    Params: ClassVar[type[BaseModel]] = NoParams
    #: True when the stage's teacher roles are trained with the learner (online KD): they are then
    #: exported and reported as trained models of the run
    trains_teachers: ClassVar[bool] = False

    def __init__(self, params: BaseModel):
        self.params = params

    @classmethod
    def from_config(cls, stage: StageConfig, index: int) -> Strategy:
        try:
            params = cls.Params.model_validate(stage.strategy.params)
        except ValidationError as err:
            raise KDForgeError(format_validation_error(err, f"strategy {stage.strategy.name!r} "
                                                             f"(stages.{index}.strategy)")) from None
        return cls(params)

    def check(self, config: JobConfig, stage: StageConfig) -> None:
        """Fail before any training when the stage cannot work with this strategy."""

    def build(self, ctx: StageContext) -> TrainStep:
        raise NotImplementedError


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")

#: data sources: f(stage, task, teacher, config, device) -> Task (the data the stage learns from)
DATA_SOURCES: Registry[Callable[..., Task]] = Registry("data source")

