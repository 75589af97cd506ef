"""BD-KD online: Amara, Sepahvand, Meyer, Gross & Clark, "BD-KD: Balancing the Divergences for
Online Knowledge Distillation" (arXiv:2212.12965, 2022): a teacher and a student trained together,
each from the labels and from the other's (detached) predictions, the distillation terms mixing
the forward and the reverse KL sample by sample according to the two models' entropies.

With p_s = softmax(z_s / T), p_t = softmax(z_t / T), H the entropy, and the balance of the
offline objective ``bdkd`` (:mod:`kdforge.objectives.bdkd`, reused here, not re-implemented):

    w_F,i, w_R,i = (1, delta) if H(p_s,i) < H(p_t,i);  (delta, 1) if H(p_s,i) > H(p_t,i);  (1, 1) if equal
    BD(s <- t) = T^2 1/N sum_i [ w_F,i KL(p_t,i || p_s,i) + w_R,i KL(p_s,i || p_t,i) ]     (p_t detached)

Student:  L_S = ce_weight * CE(y, z_s) + kd_weight * BD(s <- t)
          exactly the offline ``bdkd`` objective on (student, teacher) logits.
Teacher:  L_T = teacher_ce_weight * CE(y, z_t) + teacher_kd_weight * BD(t <- s)
          the same balance in the other direction: the ``bdkd`` objective with the two models'
          roles swapped, the teacher in the learning slot and the DETACHED student as its target:

    w'_F,i, w'_R,i = (1, delta) if H(p_t,i) < H(p_s,i);  (delta, 1) if H(p_t,i) > H(p_s,i);  (1, 1) if equal
    BD(t <- s) = T^2 1/N sum_i [ w'_F,i KL(p_s,i || p_t,i) + w'_R,i KL(p_t,i || p_s,i) ]   (p_s detached)

    i.e. the teacher is pushed by the reverse-from-its-side KL(p_t || p_s) (weight delta) when it is
    the more confident of the two, and by KL(p_s || p_t) (weight delta) when it is the less
    confident. Since swapping the roles also swaps the entropy comparison, w'_F = w_R and
    w'_R = w_F on every sample: each KL direction carries the same weight in both losses, so
    BD(t <- s) and BD(s <- t) have the same VALUE and differ only in which model the gradient
    reaches (the other model's distribution is a constant in each).

Total loss: L = L_S + L_T, one backward pass; each model's gradient comes from its own loss only
(the other side is detached). Logged terms: ``ce:<role>`` and ``bdkd:<role>`` for both models.

Source and verification: the paper's full text could not be read here. Its abstract (v2) says the
method "adjust[s] the conventional online distillation loss on both the student and teacher
losses, employing sample-wise weighting of forward and reverse" KL; a third-party summary of the
paper (sciencestack.ai/paper/2212.12965) says the teacher objective "uses reverse KL as a
regularizer". The teacher-side rule above (the student's balanced rule with the roles swapped) is
this project's reading, not a quoted equation. The student's balance is the offline ``bdkd``
objective's as written; note that the ``bdkd`` loss of github.com/ghwang-s/abkd
(distillation_llm/distillm/losses.py, a third-party offline re-implementation) favours the
OPPOSITE directions (reverse KL when H(p_s) > H(p_t), forward KL when H(p_t) > H(p_s)): whichever
is right, this strategy follows ``kdforge.objectives.bdkd.balance_weights`` and changes with it.
Defaults: T = 4 and delta = 2, the offline objective's defaults (not verified against the paper),
all weights 1.

Roles, training and what is kept are as for :mod:`kdforge.recipes.dml`: exactly one teacher role
in the stage's ``teachers`` (a teacher or an assistant), trained with the learner as a live,
trainable module (never the cache), checkpointed by the engine (exact resume); the engine keeps
the learner's best epoch, the teacher keeps its LAST-epoch weights. The stage's ``objectives``
must be ``[]`` (the strategy defines its loss); classification tasks only; the recipe's last stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import nn

from kdforge.config import JobConfig, StageConfig
from kdforge.models.adapter import ModelAdapter
from kdforge.objectives.bdkd import BDKD, BDKDParams
from kdforge.progress import Progress
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.online import PeerStep, check_online_stage, trainable_peers


class BDKDOnlineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: PositiveFloat = Field(4.0, description="softmax temperature of the balanced KL terms (T^2 scaled)")
    delta: PositiveFloat = Field(2.0, description="weight of the favoured KL direction of each sample (the other: 1)")
    ce_weight: float = Field(1.0, ge=0, description="student: cross-entropy with the labels")
    kd_weight: float = Field(1.0, ge=0, description="student: balanced KL towards the teacher")
    teacher_ce_weight: float = Field(1.0, ge=0, description="teacher: cross-entropy with the labels")
    teacher_kd_weight: float = Field(1.0, ge=0, description="teacher: balanced KL towards the student")


def balanced_kl(objective: BDKD, learning: torch.Tensor, target: torch.Tensor, progress: Progress) -> torch.Tensor:
    """BD(learning <- target): the offline ``bdkd`` objective with ``learning`` in the student's slot
    and ``target`` (detached by the objective) in the teacher's."""
    return objective.logit_loss(learning.float(), target.float(), None, objective.temperature_at(progress), progress)


def bdkd_online_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, objective: BDKD,
                     params: BDKDOnlineParams, progress: Progress, roles: tuple[str, str] = ("student", "teacher")
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """L_S + L_T (see the module docstring) and the logged terms, from the two models' logits."""
    p = params
    ce_s, ce_t = F.cross_entropy(student.float(), labels), F.cross_entropy(teacher.float(), labels)
    kd_s = balanced_kl(objective, student, teacher, progress)
    kd_t = balanced_kl(objective, teacher, student, progress)
    total = p.ce_weight * ce_s + p.kd_weight * kd_s + p.teacher_ce_weight * ce_t + p.teacher_kd_weight * kd_t
    s, t = roles
    return total, {f"ce:{s}": float(ce_s.detach()), f"bdkd:{s}": float(kd_s.detach()),
                   f"ce:{t}": float(ce_t.detach()), f"bdkd:{t}": float(kd_t.detach())}


class BDKDOnlineStep(PeerStep):
    def __init__(self, learner_role: str, learner: ModelAdapter, peers: dict[str, nn.Module],
                 params: BDKDOnlineParams):
        super().__init__(learner_role, learner, peers)
        self.params = params
        self.teacher_role = next(iter(peers))
        self.balance = BDKD(BDKDParams(temperature=params.temperature, delta=params.delta))

    def forward(self, batch: dict[str, Any], progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(batch)
        return bdkd_online_loss(logits[self.learner_role], logits[self.teacher_role], batch["labels"], self.balance,
                                self.params, progress, (self.learner_role, self.teacher_role))


@STRATEGIES.register("bdkd_online")
class BDKDOnline(Strategy):
    """``strategy: {name: bdkd_online, temperature: 4, delta: 2}`` on a stage with one teacher role:
    the teacher and the learner trained together (see the module docstring)."""

    Params = BDKDOnlineParams
    trains_teachers = True
    teacher_count = (1, 1)
    needs = frozenset({"gold_labels"})  # both models learn the task's labels

    def check(self, config: JobConfig, stage: StageConfig) -> None:
        check_online_stage(config, stage, "bdkd_online")

    def build(self, ctx: StageContext) -> BDKDOnlineStep:
        return BDKDOnlineStep(ctx.learner_role, ctx.adapter(ctx.learner), trainable_peers(ctx), self.params)
