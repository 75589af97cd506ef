"""Every registered strategy and data source: importing this module fills the registries of
``recipes/base.py``. A new strategy file is added to the import list below."""

from __future__ import annotations

from kdforge.config import JobConfig, StageConfig
from kdforge.objectives.base import objective_params
from kdforge.recipes import (  # noqa: F401
    amal,
    assistant_ensemble,
    bdkd_online,
    ces_kd,
    data_sources,
    dml,
    multi_teacher,
    offline,
    sokd,
)
from kdforge.recipes.base import DATA_SOURCES, STRATEGIES, Strategy


def strategy_for(stage: StageConfig, index: int) -> Strategy:
    """The stage's strategy with its parameters validated."""
    return STRATEGIES.get(stage.strategy.name, f"stages.{index}.strategy.name").from_config(stage, index)


def check_stages(config: JobConfig) -> None:
    """Every stage's data source, strategy, roles and terms, checked before anything trains."""
    for index, stage in enumerate(config.all_stages()):
        DATA_SOURCES.get(stage.data, f"stages.{index}.data")
        for i, objective in enumerate(stage.objectives):
            objective_params(objective, i)
        strategy_for(stage, index).check(config, stage)


def strategy_names() -> list[str]:
    return STRATEGIES.names()
