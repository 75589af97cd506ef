"""The recipe layer's contracts: what a stage is assembled from, and the registries that name
its parts.

A stage = a data source (``DATA_SOURCES``: a :class:`DataSource` that builds the stage's
:class:`StageData`) + roles (the learner, the teachers it learns from) + a strategy (``STRATEGIES``:
a :class:`Strategy`) whose :class:`~kdforge.engine.step.TrainStep` is the only thing the engine sees.
Teachers' outputs come from a teacher source (``kdforge.recipes.teacher_sources``: a live model, the
cache of a frozen one, or a black box answering queries). Adding a strategy or a data source is one
file in ``recipes/`` that registers its class (``kdforge.recipes.catalog`` imports every module of the
package); the engine is untouched. ``kdforge list`` prints what is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError
from torch.utils.data import Dataset

from kdforge.config import JobConfig, ObjectiveConfig, StageConfig, format_validation_error
from kdforge.engine.step import TrainStep
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel
from kdforge.objectives.base import objective_params
from kdforge.objectives.composite import Term, WeightedLoss, bind_role
from kdforge.registry import Registry
from kdforge.tasks.base import Scores, Task

#: what a training batch may carry besides the model inputs: a data source's ``carries`` and a strategy's
#: ``needs`` are sets of these names (the value says what each means, for messages)
BATCH_CONTENTS = {
    "labels": "a label per example (`labels`)",
    "gold_labels": "the task's own labels (`labels`, not relabelled)",
    "soft_labels": "a teacher's class probabilities per example (`soft_labels`)",
}


class Scorer(Protocol):
    """How a stage's learner is scored on its selection split each epoch (a :class:`~kdforge.tasks.base.Task`
    is one)."""

    main_metric: str
    greater_is_better: bool

    def evaluate(self, adapter: Any, data: Dataset, collate_fn: Callable, batch_size: int, device: Any = "cpu",
                 ece_bins: int = 15, desc: str = "eval") -> Scores: ...


@dataclass
class StageData:
    """What a stage learns from, as its data source built it. The stage runner and the strategies read
    only this, never which source built it."""

    name: str  # in logs
    train: Dataset  # the training examples (dicts, as a Task's)
    collator: Callable[..., Callable[[list[dict]], dict]]  # collator(tokenizer=None, train=False) -> collate_fn
    fingerprint: str  # identifies ``train`` and its preprocessing (part of the teacher-output cache key)
    carries: frozenset[str]  # what its training batches carry (names of BATCH_CONTENTS)
    selection: Dataset | None = None  # scored each epoch to keep the best one; None: the stage is not scored
    selection_split: str = ""  # the selection split's name (logs)
    scorer: Scorer | None = None  # scores the learner on ``selection``
    num_labels: int | None = None  # outputs of the learner's head (replaced when they differ); None: unlabelled
    label_names: list[str] = field(default_factory=list)
    random_train_inputs: bool = False  # the training collator draws random augmentations
    mixup_alpha: float | None = None  # per-sample mixup of each training batch the source asks for (FS-BBT images)
    info: dict[str, Any] = field(default_factory=dict)  # what the source reports (counts, thresholds)

    # what train_model (recipes/stage.py) reads of the data it scores, as it reads a Task's
    @property
    def main_metric(self) -> str:
        return self.scorer.main_metric if self.scorer is not None else ""

    @property
    def greater_is_better(self) -> bool:
        return self.scorer.greater_is_better if self.scorer is not None else True

    def evaluate(self, adapter: Any, data: Dataset, collate_fn: Callable, batch_size: int, device: Any = "cpu",
                 ece_bins: int = 15, desc: str = "eval") -> Scores:
        if self.scorer is None:
            raise KDForgeError(f"the data of {self.name} is not scored (it has no labels)")
        return self.scorer.evaluate(adapter, data, collate_fn, batch_size, device, ece_bins, desc)


@dataclass
class StageContext:
    """Everything a strategy may use to build its step. ``train_data`` and ``collate`` may be
    replaced by the strategy (a cached teacher needs each example's index)."""

    config: JobConfig
    stage: StageConfig
    index: int
    data: StageData  # what the stage learns from
    learner_role: str
    learner: LoadedModel
    teachers: dict[str, LoadedModel]  # the roles this stage learns from, by name
    train_data: Dataset
    collate: Callable
    device: Any
    adapters: list[ModelAdapter] = field(default_factory=list)  # their hooks are removed after the stage
    task: Task | None = None  # the job's task (None from the Python API's Distiller)
    terms: Sequence[ObjectiveConfig | Term] | None = None  # the loss terms; default: the stage's objectives
    hook_paths: Sequence[str] = ()  # module paths every adapter of the stage captures besides its own (API)
    train_teachers: bool = False  # the teacher sources train with the learner (the API's online KD)

    def adapter(self, model: LoadedModel | Any, **kwargs) -> ModelAdapter:
        """A ModelAdapter over ``model`` that the stage runner cleans up after training."""
        if self.hook_paths:
            kwargs["hook_paths"] = [*self.hook_paths, *kwargs.get("hook_paths", [])]
        adapter = ModelAdapter(getattr(model, "model", model), **kwargs)
        self.adapters.append(adapter)
        return adapter

    @property
    def job_task(self) -> Task:
        """The job's task, for a strategy that reads it (its problem kind); the Distiller has none."""
        if self.task is None:
            raise KDForgeError(f"strategy {self.stage.strategy.name} reads the job's task, which a Distiller over "
                               "DataLoaders does not have; run it from a config (kdforge.distill)")
        return self.task

    def loss(self, teachers: list[str] | None = None, extra: Sequence[ObjectiveConfig] = ()) -> WeightedLoss:
        """The stage's loss terms (and ``extra`` ones), bound to ``teachers`` (default: the stage's teachers)."""
        terms = self.stage.objectives if self.terms is None else self.terms
        return WeightedLoss.from_config([*terms, *extra], list(self.teachers) if teachers is None else teachers)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _where(stage: StageConfig, index: int) -> str:
    return f"stage {stage.name!r} (stages.{index})"


def check_bindings(stage: StageConfig, teachers: list[str]) -> None:
    """Every teacher-reading term of ``stage`` can be bound to one of ``teachers`` (before training)."""
    for i, objective in enumerate(stage.objectives):
        cls, _ = objective_params(objective, i)
        bind_role(cls, objective.name, objective.teacher, teachers)


class Strategy:
    """Who learns from whom in a stage. Subclasses set ``Params`` (validated from the stage's
    ``strategy:`` mapping), say how many teacher roles they take and what their batches must carry,
    and implement :meth:`build` (and :meth:`check` for what only they need)."""

    Params: ClassVar[type[BaseModel]] = NoParams
    #: True when the stage's teacher roles are trained with the learner (online KD): they are then
    #: exported and reported as trained models of the run
    trains_teachers: ClassVar[bool] = False
    #: how many teacher roles the stage may have: (at least, at most; None: no limit)
    teacher_count: ClassVar[tuple[int, int | None]] = (0, None)
    #: what every training batch must carry (names of BATCH_CONTENTS), checked against the stage's data source
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: BaseModel):
        self.params = params

    def reads_teacher_internals(self) -> str | None:
        """What the strategy itself reads inside its teachers beyond their logits (a black box cannot give
        it), e.g. "their features"; None when logits suffice."""
        return None

    @classmethod
    def from_config(cls, stage: StageConfig, index: int) -> Strategy:
        try:
            params = cls.Params.model_validate(stage.strategy.params)
        except ValidationError as err:
            raise KDForgeError(format_validation_error(err, f"strategy {stage.strategy.name!r} "
                                                             f"(stages.{index}.strategy)")) from None
        return cls(params)

    def term_roles(self, config: JobConfig, stage: StageConfig) -> list[str]:
        """The roles the stage's loss terms may be bound to (default: the stage's teachers)."""
        return config.stage_teachers(stage)

    def check_roles(self, config: JobConfig, stage: StageConfig, index: int) -> None:
        """What every strategy needs of its roles: as many teacher roles as it takes, and every
        teacher-reading term bound to one of :meth:`term_roles`."""
        teachers, (least, most) = config.stage_teachers(stage), self.teacher_count
        if len(teachers) < least or (most is not None and len(teachers) > most):
            wanted = f"exactly {least}" if most == least else f"{least} or more" if most is None else \
                f"{least} to {most}"
            raise KDForgeError(f"{_where(stage, index)}: strategy {stage.strategy.name} needs {wanted} teacher "
                               f"role{'' if most == 1 else 's'} (got {', '.join(teachers) or 'none'}); list them in "
                               f"stages.{index}.teachers (teachers, or assistants declared under `assistants:`)")
        check_bindings(stage, self.term_roles(config, stage))

    def check_data(self, stage: StageConfig, index: int) -> None:
        """The stage's data source gives what every batch of this strategy must carry."""
        source = DATA_SOURCES.get(stage.data, f"stages.{index}.data")
        missing = sorted(self.needs - source.carries)
        if missing:
            givers = [name for name in DATA_SOURCES.names() if self.needs <= DATA_SOURCES.get(name).carries]
            raise KDForgeError(f"{_where(stage, index)}: strategy {stage.strategy.name} needs batches with "
                               f"{BATCH_CONTENTS[missing[0]]}, which `data: {stage.data}` does not give; set "
                               f"stages.{index}.data: {' or '.join(givers) or '(no registered source gives it)'}")

    def check_stage(self, config: JobConfig, stage: StageConfig, index: int) -> None:
        """Everything checked before any training: :meth:`check_roles`, :meth:`check_data`, then :meth:`check`."""
        self.check_roles(config, stage, index)
        self.check_data(stage, index)
        self.check(config, stage)

    def check(self, config: JobConfig, stage: StageConfig) -> None:
        """Fail before any training when the stage cannot work with this strategy (what only it needs)."""

    def build(self, ctx: StageContext) -> TrainStep:
        raise NotImplementedError


class DataSource:
    """Where a stage's examples come from (``stages[i].data``). Subclasses set ``Params`` (validated from
    the stage's key named like the source: ``data: corpus`` with ``corpus: {files: [...]}``), say what
    their batches carry, and implement :meth:`build`."""

    Params: ClassVar[type[BaseModel]] = NoParams
    #: what its training batches carry (names of BATCH_CONTENTS)
    carries: ClassVar[frozenset[str]] = frozenset()
    #: a learner trained on it is a model of the task (the task's classes, scored on the task): it may
    #: end a recipe, whose last learner is exported and evaluated on the task
    learns_task: ClassVar[bool] = False

    def __init__(self, params: BaseModel):
        self.params = params

    @classmethod
    def from_config(cls, stage: StageConfig, index: int) -> DataSource:
        try:
            params = cls.Params.model_validate(stage.data_params)
        except ValidationError as err:
            raise KDForgeError(format_validation_error(err, f"data source {stage.data!r} "
                                                             f"(stages.{index}.{stage.data})")) from None
        return cls(params)

    def check(self, config: JobConfig, stage: StageConfig, index: int) -> None:
        """Fail before any training when the stage cannot use this source."""

    def texts(self) -> list[str]:
        """Passages of its own (not the task's) that the learner trains on (GLMD counts their words)."""
        return []

    def input_lengths(self) -> dict[str, int]:
        """Token lengths it feeds text models, by parameter name (checked against the models' positions)."""
        return {}

    def build(self, stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig,
              device: Any) -> StageData:
        """The stage's data; ``teacher``: the stage's first teacher role (None without one)."""
        raise NotImplementedError


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
DATA_SOURCES: Registry[type[DataSource]] = Registry("data source")
