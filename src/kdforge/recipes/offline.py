"""Offline distillation (the default strategy): frozen teachers, one learner, the stage's loss.

    L = sum_k w_k(progress) * L_k(learner(x), teacher[role_k](x), x, progress)

Each term reads the role it is bound to (``teacher: t2``; the stage's only teacher by default),
so one strategy serves one teacher, several teachers with a term each, a teacher assistant
trained in an earlier stage (TAKD chains), and fine-tuning (no teacher, task loss only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdforge.engine.step import TrainStep
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.composite import WeightedLoss
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

    def parts(self) -> dict[str, nn.Module]:
        """The learner, the teachers that train with it, and the loss terms with parameters of their own."""
        return {**super().parts(), **self.online, **self.loss.parts()}


def learner_adapter(ctx: StageContext, loss: WeightedLoss, hook_paths: list[str], **options) -> ModelAdapter:
    """The learner's adapter with what the loss reads (hooks, hidden states, attentions); ``options``
    are further ModelAdapter settings (e.g. ``input_paths``)."""
    needs = loss.requires()
    return ctx.adapter(ctx.learner, hook_paths=hook_paths, hidden_states="hidden_states" in needs,
                       attentions="attentions" in needs, **options)


@dataclass
class StageParts:
    """What most strategies build first (:func:`stage_parts`)."""

    loss: WeightedLoss
    learner: ModelAdapter  # the learner's adapter, reading what the loss needs
    teachers: dict[str, nn.Module]  # a source of outputs for each teacher role, by role
    teacher_paths: dict[str, list[str]]  # the module paths the loss hooks on each teacher role


def stage_parts(ctx: StageContext, loss: WeightedLoss | None = None, *,
                setup_teachers: Mapping[str, nn.Module] | None = None, roles: Sequence[str] | None = None,
                temperatures: Mapping[str, float] | None = None, **learner_options) -> StageParts:
    """The stage's loss (``loss``, else :meth:`StageContext.loss`) sized to the learner and the teachers
    (``setup_teachers``: the modules its terms are set up with, by role; default: the stage's teachers),
    a source for each teacher role (``roles``; default: those the loss reads; ``[]``: none; ``temperatures``:
    the temperature the strategy itself reads a role at, see :func:`teacher_sources`) and the learner's
    adapter (``learner_options``: further ModelAdapter settings)."""
    loss = ctx.loss() if loss is None else loss
    if setup_teachers is None:
        setup_teachers = {role: model.model for role, model in ctx.teachers.items()}
    calibrate_terms(ctx, loss, setup_teachers)
    student_paths, teacher_paths = loss.setup(ctx.learner.model, setup_teachers)
    sources = teacher_sources(ctx, loss, teacher_paths, None if roles is None else list(roles), temperatures)
    return StageParts(loss, learner_adapter(ctx, loss, student_paths, **learner_options), sources, teacher_paths)


def calibrate_terms(ctx: StageContext, loss: WeightedLoss, teachers: Mapping[str, nn.Module]) -> None:
    """Give each term that calibrates (``Objective.calibration_rows``) the stage's first training rows, in the
    data's order, collated for its teacher without augmentation."""
    for objective, role in zip(loss.objectives, loss.roles, strict=True):
        if objective.calibration_rows <= 0:
            continue
        rows = min(objective.calibration_rows, len(ctx.data.train))
        tokenizer = ctx.teachers[role].tokenizer if role in ctx.teachers else ctx.learner.tokenizer
        collate = ctx.data.collator(tokenizer, train=False)
        size = ctx.config.eval.batch_size
        batches = [collate([ctx.data.train[i] for i in range(start, min(start + size, rows))])
                   for start in range(0, rows, size)]
        objective.calibrate(ctx.learner.model, teachers.get(role) if role is not None else None, batches)


@STRATEGIES.register("offline")
class Offline(Strategy):
    """Frozen teachers (live or cached), terms bound to roles."""

    def build(self, ctx: StageContext) -> OfflineStep:
        parts = stage_parts(ctx)
        return OfflineStep(parts.learner, parts.loss, parts.teachers, ctx.train_teachers)
