"""Every registered strategy and data source: :func:`load_recipes` imports every module of
``kdforge.recipes``, so a new strategy or data source is one file there that registers its class (the
registries of ``recipes/base.py`` are then the only lists of them).

:func:`check_stages` checks every stage before training: its data source and strategy with their
parameters, the roles and terms every strategy needs (:meth:`Strategy.check_stage`), and what a
black-box teacher cannot do: be trained (online strategies) or give an objective anything but its
probabilities (hidden states, attention maps, hooked features)."""

from __future__ import annotations

import functools
import importlib
import pkgutil

import kdforge.recipes
from kdforge.config import JobConfig, StageConfig
from kdforge.errors import KDForgeError
from kdforge.objectives.base import build_objective, objective_params
from kdforge.recipes.base import DATA_SOURCES, STRATEGIES, DataSource, Strategy
from kdforge.roles.base import capabilities


@functools.cache
def load_recipes() -> None:
    """Import every module of ``kdforge.recipes`` (each registers its strategies and data sources)."""
    for module in pkgutil.iter_modules(kdforge.recipes.__path__):
        importlib.import_module(f"kdforge.recipes.{module.name}")


def strategy_for(stage: StageConfig, index: int) -> Strategy:
    """The stage's strategy with its parameters validated."""
    load_recipes()
    return STRATEGIES.get(stage.strategy.name, f"stages.{index}.strategy.name").from_config(stage, index)


def data_source_for(stage: StageConfig, index: int) -> DataSource:
    """The stage's data source with its parameters validated."""
    load_recipes()
    return DATA_SOURCES.get(stage.data, f"stages.{index}.data").from_config(stage, index)


def check_stages(config: JobConfig) -> None:
    """Every stage's data source, strategy, roles and terms, checked before anything trains."""
    stages = config.all_stages()
    for index, stage in enumerate(stages):
        source = data_source_for(stage, index)
        if stage is stages[-1] and not source.learns_task:
            ends = [name for name in DATA_SOURCES.names() if DATA_SOURCES.get(name).learns_task]
            raise KDForgeError(f"the last stage must learn the task itself (`data: {' or '.join(ends)}`), not "
                               f"`data: {stage.data}`: the student is exported and evaluated on the task after it")
        if stage.augment is not None and "gold_labels" not in source.carries:
            raise KDForgeError(f"stages.{index}.augment: the TinyBERT augmentation makes variants of labelled task "
                               f"examples that keep their labels; `data: {stage.data}` does not give the task's own "
                               "labels (use it with `data: task`)")
        source.check(config, stage, index)
        for i, objective in enumerate(stage.objectives):
            objective_params(objective, i)
        strategy = strategy_for(stage, index)
        strategy.check_stage(config, stage, index)
        check_black_box_roles(config, stage, strategy)
        check_taught_before_teaching(config, stages, index, strategy)


def check_taught_before_teaching(config: JobConfig, stages: list[StageConfig], index: int, strategy: Strategy) -> None:
    """An assistant teaches stage ``index`` only after the stage that trains it (unless this stage's
    strategy trains it with the learner, online): learning from it earlier would learn from an untrained net."""
    stage = stages[index]
    if strategy.trains_teachers:
        return
    bound = [o.teacher for o in stage.objectives if o.teacher]
    for role in dict.fromkeys([*config.stage_teachers(stage), *bound]):
        later = next((j for j, s in enumerate(stages) if s.learner == role and j > index), None)
        if role in config.assistants and later is not None and not any(
                s.learner == role for s in stages[:index]):
            raise KDForgeError(f"stage {stage.name!r} (stages.{index}) learns from assistant {role!r}, which stage "
                               f"{stages[later].name!r} (stages.{later}) trains only afterwards; order the stages so "
                               "that a role is taught before it teaches")


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
    inside = strategy.reads_teacher_internals()
    if inside:
        raise KDForgeError(f"stage {stage.name!r}: strategy {stage.strategy.name} reads {inside} of each teacher, but "
                           f"{black[0]!r} is a black box (class probabilities only); use it with a strategy that "
                           "reads only its logits (the strategy's options may allow it: `kdforge list`)")
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
    load_recipes()
    return STRATEGIES.names()


def data_source_names() -> list[str]:
    load_recipes()
    return DATA_SOURCES.names()
