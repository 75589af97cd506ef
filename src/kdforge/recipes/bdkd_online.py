"""BD-KD online: Amara, Sepahvand, Meyer, Gross & Clark, "BD-KD: Balancing the Divergences for
Online Knowledge Distillation" (arXiv:2212.12965, 2022): a teacher and a student trained together,
each from the labels and from the other's (detached) predictions; the student's distillation term
mixes the forward and the reverse KL sample by sample according to the two models' entropies, the
teacher's is a reverse-KL regulariser.

With p_s = softmax(z_s / T), p_t = softmax(z_t / T), H the entropy, and the balance of the
offline objective ``bdkd`` (:mod:`kdforge.objectives.bdkd`, reused here, not re-implemented):

    w_F,i, w_R,i = (delta, 1) if H(p_s,i) < H(p_t,i);  (1, delta) if H(p_s,i) > H(p_t,i);  (1, 1) if equal
    BD(s <- t) = T^2 1/N sum_i [ w_F,i KL(p_t,i || p_s,i) + w_R,i KL(p_s,i || p_t,i) ]     (p_t detached)

Student:  L_S = ce_weight * CE(y, z_s) + kd_weight * BD(s <- t)
          exactly the offline ``bdkd`` objective on (student, teacher) logits.
Teacher (``teacher_rule: reverse``, the default):
          L_T = teacher_ce_weight * CE(y, z_t) + teacher_kd_weight * T^2 1/N sum_i KL(p_t,i || p_s,i)
          (p_s detached): the KL with the teacher's own distribution first, the reverse of the
          KL(p_s || p_t) a teacher learning from the student would minimise as plain KD (DML), i.e.
          a mode-seeking regulariser towards the student's predictions.
Teacher (``teacher_rule: balanced``, kdforge's variant): the student's balance with the roles
          swapped, the teacher in the learning slot and the detached student as its target:
          BD(t <- s) = T^2 1/N sum_i [ w'_F,i KL(p_s,i || p_t,i) + w'_R,i KL(p_t,i || p_s,i) ] with the
          entropy comparison swapped too, so w'_F = w_R and w'_R = w_F: the same VALUE as BD(s <- t),
          the gradient reaching the teacher.

Total loss: L = L_S + L_T, one backward pass; each model's gradient comes from its own loss only
(the other side is detached). Logged terms: ``ce:<role>`` and ``bdkd:<role>`` for both models.

Sources: the paper's method section could not be read here. Its abstract (v2) says the method
"adjust[s] the conventional online distillation loss on both the student and teacher losses,
employing sample-wise weighting of forward and reverse" KL; a third-party summary
(sciencestack.ai/paper/2212.12965) says the student's weighting is "guided by the entropy gap between
teacher and student predictions, while the teacher objective uses reverse KL as a regularizer"; the
student's balance follows the third-party re-implementation named in :mod:`kdforge.objectives.bdkd`.
The default teacher rule is our reading of that summary (which KL is "reverse" from the teacher's side
is not stated there); no equation is quoted. Defaults: T = 4 and delta = 2 (ours), all weights 1.

Roles, training and what is kept are as for :mod:`kdforge.recipes.dml`: exactly one teacher role
in the stage's ``teachers`` (a teacher or an assistant), trained with the learner as a live,
trainable module (never the cache), checkpointed by the engine (exact resume); the engine keeps
the learner's best epoch, the teacher keeps its LAST-epoch weights. The stage's ``objectives``
must be ``[]`` (the strategy defines its loss); classification tasks only; the recipe's last stage.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import nn

from kdforge.config import JobConfig, StageConfig
from kdforge.models.adapter import ModelAdapter
from kdforge.objectives.bdkd import BDKD, BDKDParams, tempered_log_probs
from kdforge.objectives.common import t_squared
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
    teacher_kd_weight: float = Field(1.0, ge=0, description="teacher: its KL term towards the student")
    teacher_rule: Literal["reverse", "balanced"] = Field(
        "reverse", description="the teacher's KL term: reverse = T^2 KL(p_t || p_s), a regulariser (the paper, "
        "as summarised); balanced = the student's balance with the roles swapped (kdforge's variant)")


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
    if p.teacher_rule == "balanced":
        kd_t = balanced_kl(objective, teacher, student, progress)
    else:  # T^2 KL(p_t || p_s), the student detached: the objective's reverse-KL piece on swapped slots
        temperature = objective.temperature_at(progress)
        log_p_t, log_p_s = tempered_log_probs(teacher.float(), student.float(), temperature)
        kd_t = ((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t_squared(temperature)).mean()
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
