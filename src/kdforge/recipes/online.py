"""What every online strategy shares: the learner and teacher roles trained together in one stage.

Used by :mod:`kdforge.recipes.dml` (Deep Mutual Learning), :mod:`kdforge.recipes.bdkd_online` and
:mod:`kdforge.recipes.sokd`:

* ``stage_index(config, stage)``: the stage's position in the recipe (for config keys in messages);
* ``check_online_stage(config, stage, strategy)``: the checks an online strategy makes before training
  (live teachers, ``objectives: []``, a classification task, the recipe's last stage, no compressed
  vocabulary on a peer); returns the peer roles;
* ``trainable_peers(ctx)``: the stage's teacher roles as live, trainable sources with the task's head;
* ``PeerStep``: the train step holding the learner and its trainable peers, ``logits(batch)`` by role.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kdforge.config import JobConfig, StageConfig
from kdforge.engine.step import TrainStep
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.heads import head_size, replace_head
from kdforge.recipes.base import StageContext
from kdforge.recipes.teacher_sources import LiveTeacher
from kdforge.tasks.base import task_problem

log = logging.getLogger("kdforge")


def stage_index(config: JobConfig, stage: StageConfig) -> int:
    """The position of ``stage`` in the recipe (for config keys in messages)."""
    stages = config.all_stages()
    same = [i for i, s in enumerate(stages) if s is stage] or [i for i, s in enumerate(stages) if s == stage]
    return same[0] if same else 0


def check_online_stage(config: JobConfig, stage: StageConfig, strategy: str) -> list[str]:
    """The checks every online strategy (learner and teacher roles trained together) makes before
    training, besides those of every strategy (the number of peers: ``Strategy.teacher_count``; the
    task's labels: ``Strategy.needs``); returns the peer roles. Raises one KDForgeError line naming the
    config key to fix."""
    i = stage_index(config, stage)
    where = f"stage {stage.name!r} (stages.{i})"
    if stage.teacher_source == "cache":
        raise KDForgeError(f"{where}: strategy {strategy} trains its teacher roles with the learner, so their "
                           f"outputs cannot come from the teacher-output cache; set stages.{i}.teacher_source: "
                           "live (or auto)")
    peers = config.stage_teachers(stage)
    if stage.objectives:
        raise KDForgeError(f"{where}: strategy {strategy} defines its own loss and ignores `objectives`; set "
                           f"stages.{i}.objectives: [] (and its weights in stages.{i}.strategy)")
    problem = task_problem(config.task)
    if not problem.classes:
        raise KDForgeError(f"{where}: strategy {strategy} learns class distributions, but task {config.task.name} is "
                           f"a {problem.name} task; use a classification task or another strategy "
                           f"(stages.{i}.strategy)")
    if i != len(config.all_stages()) - 1:
        raise KDForgeError(f"{where}: strategy {strategy} must be the recipe's last stage (a finished earlier stage "
                           "keeps only its learner's snapshot, so a resumed run would lose the peers' training); "
                           "move it to the end of `stages`")
    compressed = [r for r in peers if r in config.assistants and config.assistants[r].vocab_fraction is not None]
    if compressed:
        raise KDForgeError(f"{where}: peer {compressed[0]!r} has a compressed vocabulary (assistants.{compressed[0]}."
                           f"vocab_fraction), which strategy {strategy} does not support for a peer; remove it")
    return peers


def trainable_peers(ctx: StageContext) -> dict[str, nn.Module]:
    """The stage's teacher roles as LIVE, TRAINABLE sources (never the cache): gradients on, a head
    of the task's size (replaced, as the stage runner does for the learner, when it differs)."""
    if not ctx.teachers:
        raise KDForgeError(f"stage {ctx.stage.name!r}: no teacher role to train with the learner; list one in "
                           f"stages.{ctx.index}.teachers")
    peers: dict[str, nn.Module] = {}
    for role, loaded in ctx.teachers.items():
        model = loaded.model
        if ctx.data.num_labels is not None and head_size(model) != ctx.data.num_labels:
            log.info("stage %s: peer %s gets a fresh %d-output head", ctx.stage.name, role, ctx.data.num_labels)
            replace_head(model, ctx.data.num_labels, ctx.data.label_names or None)
        model.requires_grad_(True)  # it may have been frozen as the teacher of an earlier stage
        peers[role] = LiveTeacher(ctx.adapter(model, teacher=True), trainable=True)
    log.info("stage %s: %s trained together with %s (live, not cached)", ctx.stage.name, ", ".join(peers),
             ctx.learner_role)
    return peers


class PeerStep(TrainStep):
    """The learner and its peers, all trainable: ``logits(batch)`` runs every model (the learner
    first, then the peers in the stage's order) and returns their logits by role (and :meth:`parts`:
    the models by role, for ``train.lr_by_role``)."""

    def __init__(self, learner_role: str, learner: ModelAdapter, peers: dict[str, nn.Module]):
        super().__init__()
        self.learner = learner
        self.learner_role = learner_role
        self.peers = nn.ModuleDict(peers)

    def parts(self) -> dict[str, nn.Module]:
        return {**super().parts(), **self.peers}

    def logits(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {self.learner_role: self.learner(batch).logits}
        out.update({role: peer(batch).logits for role, peer in self.peers.items()})
        first = out[self.learner_role]
        for role, z in out.items():
            if z.dim() != 2 or z.shape != first.shape or z.shape[-1] < 2:
                raise KDForgeError(f"{role} gives logits of shape {tuple(z.shape)} but {self.learner_role} gives "
                                   f"{tuple(first.shape)}; every model must score the task's classes (N, C), C >= 2")
        return out
