"""Controls for the distillation hypothesis: Hinton KD with the teacher's per-sample knowledge removed.

Is a gain of KD knowledge transfer, or the regularisation that any soft target gives? Yuan, Tay, Li,
Wang & Feng (CVPR 2020), "Revisiting Knowledge Distillation via Label Smoothing Regularization"
(Tf-KD), show that soft targets without a good teacher (a poorly trained teacher, or a hand-made
label-smoothing distribution) recover much of KD's gain; Müller, Kornblith & Hinton (NeurIPS 2019),
"When Does Label Smoothing Help?", show that label smoothing erases the similarity between classes
that a teacher's soft labels carry. Vats & Crandall (2021), "Controlling the Quality of Distillation in
Response-Based Network Compression" (arXiv:2112.10047), name the test the *distillation hypothesis*:
a gain that a student also gets from a target that carries no teacher knowledge is regularisation.

Each term here is ``hinton_kd`` (same temperature T, T^2 factor, reduction) with the teacher's
distribution ``p_t,i = softmax(z_t,i / T)`` replaced by a target that keeps part of it:

* ``permuted_kd``: the teacher's probability of the true class and the *multiset* of its other
  probabilities, but not which class gets which (the similarity information is destroyed, the
  confidence and the entropy of the target are kept);
* ``teacher_confidence_ls``: label smoothing at the teacher's mean confidence on the true class (no
  per-sample teacher information at all).

So a row with one of them differs from its ``hinton_kd`` row in the target only.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdforge.errors import KDForgeError
from kdforge.objectives.base import OBJECTIVES, LogitObjective, Objective, Temperature, TemperatureSetting
from kdforge.objectives.common import require, t_squared
from kdforge.objectives.logit import _class_logits
from kdforge.objectives.schedules import make_schedule


class ControlParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: TemperatureSetting = Field(4.0, description="T, as hinton_kd's (the target is read at T too)")
    reduction: Literal["batchmean", "mean"] = Field("batchmean", description="as hinton_kd's")


class PermutedParams(ControlParams):
    seed: int = Field(0, description="the permutations are drawn from (seed, example index)")


def soft_target_kd(student_logits: torch.Tensor, target: torch.Tensor, temperature: Temperature,
                   reduction: str) -> torch.Tensor:
    """T^2 * mean_i KL(target_i || softmax(z_s,i / T)) (``reduction: mean``: divided by C), as hinton_kd."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (torch.xlogy(target, target) - target * log_p_s).sum(-1)
    loss = (kl * t_squared(temperature)).mean()
    return loss / student_logits.shape[-1] if reduction == "mean" else loss


def non_target_permutations(index: torch.Tensor, classes: int, seed: int) -> torch.Tensor:
    """(N, C - 1) permutations of 0..C-2, one per example, drawn from ``numpy.random.default_rng([seed, i])``
    for example index i: the same example gets the same permutation in every epoch and every run."""
    rows = [np.random.default_rng([seed, int(i)]).permutation(classes - 1) for i in index.reshape(-1).tolist()]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def permute_non_target(logits: torch.Tensor, labels: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """``logits`` with each row's non-target entries permuted: with n_0 < ... < n_{C-2} the classes other
    than y_i and sigma_i = ``permutations[i]``, out[i, n_k] = logits[i, n_{sigma_i(k)}], out[i, y_i] kept.

    Softmax commutes with a permutation of its entries, so softmax(out / T) is softmax(logits / T) with
    its non-target probabilities permuted the same way, at every temperature T."""
    n, c = logits.shape
    order = torch.arange(c, device=logits.device).expand(n, c)
    is_target = order == labels.reshape(-1, 1).long()
    others = order[~is_target].reshape(n, c - 1)  # n_0 < ... < n_{C-2} per row
    source = others.gather(1, permutations.to(logits.device))
    out = logits.clone()
    out[~is_target] = logits.gather(1, source).reshape(-1)
    return out


@OBJECTIVES.register("permuted_kd")
class PermutedKD(Objective):
    """Hinton KD from a teacher whose soft labels are permuted among the non-target classes (a control of
    the distillation hypothesis: see the module docstring; Yuan et al. CVPR 2020, Müller et al. 2019).

    With y_i the gold class, p_t,i = softmax(z_t,i / T) and n_0 < ... < n_{C-2} the other classes,
    sigma_i a permutation of 0..C-2 fixed per example (drawn from ``seed`` and the example's index, so
    the same in every epoch):

        q_i[y_i] = p_t,i[y_i],     q_i[n_k] = p_t,i[n_{sigma_i(k)}]
        L = T^2 * (1/N) sum_i KL( q_i || softmax(z_s,i / T) )          (``reduction: mean``: / C)

    q_i keeps the teacher's probability of the true class and the multiset of its other probabilities
    (so its confidence and entropy), and loses which class is similar to which. With two classes the
    only permutation is the identity: the term refuses binary tasks. The teacher is detached; the
    example index comes with the batch (``index``: the stage's data is indexed for this term).
    """

    Params = PermutedParams
    needs_index = True

    def __init__(self, params: PermutedParams | None = None):
        super().__init__(params)
        self._temperature = make_schedule(self.params.temperature, "temperature")

    def forward(self, student, teacher, batch, progress):
        student_logits = _class_logits(student.logits, "permuted_kd")
        teacher_logits = require(None if teacher is None else teacher.logits, "permuted_kd", "a teacher").detach()
        labels = require(batch.get("labels"), "permuted_kd", "labels")
        classes = student_logits.shape[-1]
        if classes < 3:
            raise KDForgeError(f"objective 'permuted_kd' permutes the non-target classes, but the task has {classes}: "
                               "with one non-target class there is nothing to permute; drop this row on binary tasks")
        if "index" not in batch:
            raise KDForgeError("objective 'permuted_kd' needs each example's `index` in the batch (its permutation is "
                               "fixed per example); use a strategy that builds its teachers with "
                               "recipes.teacher_sources (offline, multi_teacher, ...)")
        temperature = float(self._temperature(progress))
        if temperature <= 0:
            raise KDForgeError(f"the temperature schedule of permuted_kd reached {temperature} at step "
                               f"{progress.step}; keep it above 0")
        permuted = permute_non_target(teacher_logits, labels, non_target_permutations(batch["index"], classes,
                                                                                      self.params.seed))
        target = F.softmax(permuted.float() / temperature, dim=-1)
        return soft_target_kd(student_logits, target, temperature, self.params.reduction)


@OBJECTIVES.register("teacher_confidence_ls")
class TeacherConfidenceLS(LogitObjective):
    """Label smoothing at the teacher's mean confidence, in hinton_kd's form (a control of the distillation
    hypothesis: see the module docstring; Yuan et al. CVPR 2020's Tf-KD_reg smooths with a hand-set
    confidence, Müller et al. 2019 study label smoothing itself).

    With c = the mean over the *batch* of the teacher's probability of the true class at temperature T,

        c   = detach( (1/N) sum_n softmax(z_t,n / T)[y_n] )
        u_i = c on y_i,  (1 - c) / (C - 1) on every other class
        L   = T^2 * (1/N) sum_i KL( u_i || softmax(z_s,i / T) )         (``reduction: mean``: / C)

    The target keeps the teacher's overall confidence and nothing per example: the batch mean (not a
    running mean over training, so no state to checkpoint, and the same at a resumed step) gives each
    example's own confidence a weight of 1/N. With two classes u_i is (c, 1 - c): defined, unlike
    ``permuted_kd``. The teacher is detached; only the student gets gradients.
    """

    Params = ControlParams

    def logit_loss(self, student_logits, teacher_logits, labels, temperature, progress):
        student_logits = _class_logits(student_logits, "teacher_confidence_ls")
        teacher_logits = require(teacher_logits, "teacher_confidence_ls", "a teacher").detach()
        labels = require(labels, "teacher_confidence_ls", "labels").reshape(-1, 1).long()
        p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)
        confidence = p_t.gather(1, labels).mean().detach()
        classes = student_logits.shape[-1]
        target = torch.full(student_logits.shape, 1.0, device=student_logits.device) * (1 - confidence) / (classes - 1)
        target = target.scatter(1, labels, confidence.expand(labels.shape[0], 1))
        return soft_target_kd(student_logits, target, temperature, self.params.reduction)
