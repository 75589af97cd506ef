"""Every registered strategy and data source: importing this module fills the registries of
``recipes/base.py``. A new strategy file is added to the import list below.

:func:`check_stages` also refuses, before training, what a black-box teacher cannot do: be trained
(online strategies) or give an objective anything but its probabilities (hidden states, attention
maps, hooked features)."""

from __future__ import annotations

from kdforge.config import JobConfig, StageConfig
from kdforge.errors import KDForgeError
from kdforge.objectives.base import build_objective, objective_params
from kdforge.recipes import (  # noqa: F401
    amal,
    assistant_ensemble,
    bdkd_online,
    ces_kd,
    data_sources,
    dml,
    fsbbt,
    multi_teacher,
    offline,
    sokd,
)
from kdforge.recipes.base import DATA_SOURCES, STRATEGIES, Strategy
from kdforge.roles.base import capabilities


def strategy_for(stage: StageConfig, index: int) -> Strategy:
    """The stage's strategy with its parameters validated."""
    return STRATEGIES.get(stage.strategy.name, f"stages.{index}.strategy.name").from_config(stage, index)


def check_stages(config: JobConfig) -> None:
    """Every stage's data source, strategy, roles and terms, checked before anything trains."""
    for index, stage in enumerate(config.all_stages()):
        DATA_SOURCES.get(stage.data, f"stages.{index}.data")
        for i, objective in enumerate(stage.objectives):
            objective_params(objective, i)
        strategy = strategy_for(stage, index)
        strategy.check(config, stage)
        check_black_box_roles(config, stage, strategy)


def check_black_box_roles(config: JobConfig, stage: StageConfig, strategy: Strategy) -> None:
    """A black-box teacher of ``stage`` (no weights) is frozen, and objectives read of it only what its
    capabilities give: its probabilities (as logits)."""
    teachers = config.stage_teachers(stage)
    black = [r for r in teachers if not capabilities(config, r).weights]
    if not black:
        return
    if strategy.trains_teachers:
        raise KDForgeError(f"stage {stage.name!r}: strategy {stage.strategy.name} trains its teachers, but "
                           f"{black[0]!r} is a black box; use an offline strategy with it")
    for i, term in enumerate(stage.objectives):
        objective = build_objective(term, i)
        needs = {*objective.requires, *(["features"] if getattr(objective.params, "teacher_paths", None) else [])}
        role = next((r for r in black if r in ([term.teacher] if term.teacher else teachers)
                     and not capabilities(config, r).gives(needs)), None)
        if objective.uses_teacher and role is not None:
            raise KDForgeError(f"stage {stage.name!r}: objective {term.name!r} reads the hidden states, attention maps "
                               f"or module outputs of teacher {role!r}, a black box that shows only class "
                               "probabilities; bind it to another teacher or use a logit objective (hinton_kd...)")


def strategy_names() -> list[str]:
    return STRATEGIES.names()
