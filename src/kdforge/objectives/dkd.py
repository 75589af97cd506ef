"""Decoupled Knowledge Distillation (DKD).

Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat

from kdforge.objectives.base import OBJECTIVES, LogitObjective, Progress, Temperature, TemperatureSetting
from kdforge.objectives.common import require, t_squared
from kdforge.objectives.logit import _class_logits

log = logging.getLogger("kdforge")


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: Temperature) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD_i, NCKD_i, b_t_i) at temperature T, without the T^2 factor; teacher detached.

    TCKD_i = KL(b_t || b_s), b = (p[y], 1 - p[y]) the binary target / all-other probabilities of
    p = softmax(z / T); NCKD_i = KL(p^_t || p^_s), p^ = softmax over the C - 1 non-target logits
    (the target column removed before the softmax); b_t_i = the teacher's p_t[y] at T.
    Everything is computed from log-softmaxes, so a saturated target probability never takes log(0).
    """
    n, c = student_logits.shape
    z_s = student_logits / temperature
    z_t = teacher_logits.detach() / temperature
    target = labels.reshape(-1, 1).long()
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, target, True)

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        log_target = z.gather(1, target) - log_z
        log_other = torch.logsumexp(z.masked_fill(is_target, float("-inf")), dim=-1, keepdim=True) - log_z
        return torch.cat([log_target, log_other], dim=-1)

    log_b_s, log_b_t = binary_log_probs(z_s), binary_log_probs(z_t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1)
    log_q_s = F.log_softmax(z_s[~is_target].reshape(n, c - 1), dim=-1)
    log_q_t = F.log_softmax(z_t[~is_target].reshape(n, c - 1), dim=-1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1)
    return tckd, nckd, log_b_t[:, 0].exp()


class DKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: NonNegativeFloat = Field(1.0, description="weight of TCKD")
    beta: NonNegativeFloat = Field(8.0, description="weight of NCKD")
    temperature: TemperatureSetting = 4.0
    warmup: NonNegativeFloat = Field(20.0, description="epochs of linear warm-up, min(epoch / warmup, 1) with the "
                                     "1-based epoch; 0 = none")


@OBJECTIVES.register("dkd")
class DKD(LogitObjective):
    """Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".

    With p = softmax(z / T), target class y, b = (p_y, 1 - p_y) and p^ = softmax of the C - 1
    non-target logits / T (the target column removed before the softmax):

        TCKD = T^2 / N * sum_i KL(b_t,i || b_s,i)
        NCKD = T^2 / N * sum_i KL(p^_t,i || p^_s,i)
        L_dkd = min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

    Reduction: both KLs are summed over their classes and over the batch, then divided by N (the
    official code's ``kl_div(..., size_average=False) * T**2 / N``); T^2 multiplies each sample's KL
    (a per-sample temperature of shape (N, 1) scales its own sample). ``epoch`` is the 1-based epoch
    (``progress.epoch_number``) as in the official trainer, so the first epoch is weighted 1/20.
    The teacher's logits are detached. With KD = sum_i KL(p_t,i || p_s,i) the paper's decomposition
    KD_i = TCKD_i + (1 - p_t,i[y]) NCKD_i holds per sample (``dkd_parts`` returns the three pieces).

    Two classes: p^ holds one class, so NCKD = 0, and b = p, so TCKD = KD's KL: DKD is then alpha x KD
    at the same temperature (the decoupling needs C >= 3; a warning says so once). On binary GLUE tasks
    a DKD row measures KD again, with DKD's warm-up and weights.

    Defaults (alpha 1, beta 8, T 4, warm-up 20 epochs) are the official code's (mdistiller) default
    DKD config, used for the CIFAR-100 ResNet32x4 -> ResNet8x4 pair; the ImageNet configs use
    alpha 1, beta 0.5, T 1, warm-up 1 (beta is tuned per teacher-student pair in the paper).

    The cross-entropy of the paper's loss (weight 1) is not part of this term: add the ``ce``
    objective. The paper's loss is ``[{name: ce, weight: 1}, {name: dkd, alpha: 1, beta: 8, temperature: 4}]``.

    Non-target masking: the official code removes the target from the non-target softmax by
    subtracting 1000 from its logit / T (``softmax(z / T - 1000 * gt_mask)``), which leaves the
    target a probability of exactly 0 in floating point unless its logit / T exceeds the largest
    non-target one by more than ~900. We drop the target column instead (the same value wherever
    the official constant underflows, and exact beyond that), and compute the binary TCKD
    probabilities in log space (logsumexp of the non-target logits) rather than ``log`` of a summed
    softmax, so a saturated p_y never produces log(0) = -inf.
    """

    Params = DKDParams

    def warmup_factor(self, progress: Progress) -> float:
        warmup = self.params.warmup
        return 1.0 if warmup == 0 else min(progress.epoch_number / warmup, 1.0)

    def logit_loss(self, student_logits, teacher_logits, labels, temperature, progress):
        student_logits = _class_logits(student_logits, "dkd")
        teacher_logits = require(teacher_logits, "dkd", "a teacher")
        labels = require(labels, "dkd", "labels")
        if student_logits.shape[-1] == 2 and not getattr(self, "_said_binary", False):
            self._said_binary = True
            log.warning("dkd: with two classes DKD equals alpha x KD (its non-target term NCKD is empty); it "
                        "decouples nothing on this task")
        tckd, nckd, _ = dkd_parts(student_logits, teacher_logits, labels, temperature)
        t2 = t_squared(temperature)
        loss = self.params.alpha * (tckd * t2).mean() + self.params.beta * (nckd * t2).mean()
        return self.warmup_factor(progress) * loss
