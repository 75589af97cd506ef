"""Offline distillation (the default strategy): frozen teachers, one learner, the stage's loss.

    L = sum_k w_k(progress) * L_k(learner(x), teacher[role_k](x), x, progress)

Each term reads the role it is bound to (``teacher: t2``; the stage's only teacher by default),
so one strategy serves one teacher, several teachers with a term each, a teacher assistant
trained in an earlier stage (TAKD chains), and fine-tuning (no teacher, task loss only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.engine.step import TrainStep
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import objective_params
from kdforge.objectives.composite import WeightedLoss, bind_role
from kdforge.progress import Progress
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.teacher_sources import teacher_sources


class OfflineStep(TrainStep):
    """``learner`` trained with ``loss``; teachers by role from their sources (frozen unless
    ``train_teachers``: then they train with the learner, as in online KD)."""

    def __init__(self, learner: ModelAdapter, loss: WeightedLoss, teachers: Mapping[str, nn.Module] | None = None,
                 train_teachers: bool = False):
        super().__init__()
        self.learner = learner
        self.loss = loss
        self.online = nn.ModuleDict()
        teachers = dict(teachers or {})
        for role, source in teachers.items():
            if train_teachers:
                self.online[role] = source
            else:
                self.freeze(role, source)
        self.sources = teachers

    def teacher_outputs(self, batch: dict[str, Any], roles: list[str] | None = None) -> dict[str, Outputs]:
        return {role: self.sources[role](batch) for role in (self.loss.teacher_roles if roles is None else roles)}

    def forward(self, batch: dict[str, Any], progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(self.learner(batch), self.teacher_outputs(batch), batch, progress)


def learner_adapter(ctx: StageContext, loss: WeightedLoss, hook_paths: list[str], **options) -> ModelAdapter:
    """The learner's adapter with what the loss reads (hooks, hidden states, attentions); ``options``
    are further ModelAdapter settings (e.g. ``input_paths``)."""
    needs = loss.requires()
    return ctx.adapter(ctx.learner, hook_paths=hook_paths, hidden_states="hidden_states" in needs,
                       attentions="attentions" in needs, **options)


def check_bindings(stage, teachers: list[str]) -> None:
    """Every teacher-reading term of ``stage`` can be bound to one of ``teachers`` (before training)."""
    for i, objective in enumerate(stage.objectives):
        cls, _ = objective_params(objective, i)
        bind_role(cls, objective.name, objective.teacher, teachers)


@STRATEGIES.register("offline")
class Offline(Strategy):
    """Frozen teachers (live or cached), terms bound to roles."""

    def check(self, config, stage) -> None:
        check_bindings(stage, config.stage_teachers(stage))

    def build(self, ctx: StageContext) -> OfflineStep:
        loss = ctx.loss()
        student_paths, teacher_paths = loss.setup(ctx.learner.model, {r: m.model for r, m in ctx.teachers.items()})
        sources = teacher_sources(ctx, loss, teacher_paths)
        return OfflineStep(learner_adapter(ctx, loss, student_paths), loss, sources)
