"""Logit-level objectives: task losses and Hinton KD.

Reduction convention (shared by every KL-based term in kdforge): the KL divergence is summed
over classes and averaged over the batch ("batchmean"), which is the mathematical KL per sample.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdforge.errors import KDForgeError
from kdforge.objectives.base import OBJECTIVES, LogitObjective, Objective, Temperature, TemperatureSetting
from kdforge.objectives.common import t_squared
from kdforge.problems.kinds import next_token_targets


def _class_logits(logits: torch.Tensor, objective: str) -> torch.Tensor:
    if logits.shape[-1] < 2:
        raise KDForgeError(f"objective {objective!r} needs class logits but the model has one output "
                           "(a regression task); use objectives `mse` and `logit_mse` instead")
    return logits


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """mean_i T_i^2 KL(softmax(z_t,i / T_i) || softmax(z_s,i / T_i)); the teacher logits are detached.

    ``temperature``: a float, a scalar tensor or one value per sample (N, 1); a tensor temperature
    keeps its gradient, through the softmaxes and through T^2 (CTKD learns it)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (kl * t_squared(temperature)).mean()


@OBJECTIVES.register("ce")
class CrossEntropy(Objective):
    """Cross-entropy with the gold labels: -mean_i log softmax(z_s)_i[y_i]."""

    uses_teacher = False

    def forward(self, student, teacher, batch, progress):
        return F.cross_entropy(_class_logits(student.logits, "ce"), batch["labels"])


@OBJECTIVES.register("next_token_ce")
class NextTokenCrossEntropy(Objective):
    """Causal language-model loss: -1/M sum_j log p_s(x_{j+1} | x_{<=j}) over the M positions whose
    next token is real (``labels`` -100 at padding; task ``lm`` collates them). The student's
    loss without a teacher."""

    uses_teacher = False

    def forward(self, student, teacher, batch, progress):
        logits, targets = next_token_targets(student.logits, batch["labels"])
        return F.cross_entropy(logits.float(), targets)


@OBJECTIVES.register("mse")
class MeanSquaredError(Objective):
    """Regression task loss: mean_i (s_i - y_i)^2 on the single output (e.g. STS-B)."""

    uses_teacher = False

    def forward(self, student, teacher, batch, progress):
        return F.mse_loss(student.logits.view(-1), batch["labels"].float().view(-1))


class HintonParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: TemperatureSetting = 4.0
    reduction: Literal["batchmean", "mean"] = Field(
        "batchmean", description="batchmean: KL summed over classes, mean over samples (the KL per sample); "
        "mean: PyTorch KLDivLoss()'s default, the mean over all N x C elements (= batchmean / C), with which "
        "TAKD's published hyper-parameters were tuned")


@OBJECTIVES.register("hinton_kd")
class HintonKD(LogitObjective):
    """Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

        L_KD = T^2 * (1/N) sum_i KL( softmax(z_t,i / T) || softmax(z_s,i / T) )

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-target ones
    when T changes (the paper, section 2). Combine with ``ce`` by weights in the config, e.g.
    ``[{name: ce, weight: 0.5}, {name: hinton_kd, weight: 0.5, temperature: 4}]``.
    ``reduction: mean`` divides by the number of classes C, as ``nn.KLDivLoss()`` with its default
    reduction does (TAKD, Mirzadeh et al. 2020, tuned its weights with it).
    """

    Params = HintonParams

    def logit_loss(self, student_logits, teacher_logits, labels, temperature, progress):
        loss = kd_kl_loss(_class_logits(student_logits, "hinton_kd"), teacher_logits, temperature)
        return loss / student_logits.shape[-1] if self.params.reduction == "mean" else loss


@OBJECTIVES.register("logit_mse")
class LogitMSE(Objective):
    """Logit matching, mean_i ||z_s,i - z_t,i||^2 / C (Ba & Caruana 2014); the KD term for regression."""

    def forward(self, student, teacher, batch, progress):
        return F.mse_loss(student.logits, teacher.logits.detach())
