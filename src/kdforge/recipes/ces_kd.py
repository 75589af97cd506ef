"""CES-KD: Amara, Ziaeefard, Meyer, Gross & Clark, "CES-KD: Curriculum-based Expert Selection for
Guided Knowledge Distillation" (ICPR 2022; arXiv 2209.07606).

A pool of E experts ordered by capacity, index 0 the smallest assistant ... E-1 the (largest)
teacher, each frozen. Every training sample is taught by exactly one expert, chosen by the sample's
difficulty: the paper's hypothesis is that a student learns easy (hard) samples better and faster
from a lower (higher) capacity teacher, and the split moves over training (a curriculum).

The paper's full text was not retrievable here, so its exact difficulty measure and pacing are not
reproduced; the two choices below are ours, stated and motivated:

Difficulty (sample_difficulty): the cross-entropy of the gold label under the largest teacher,
    d_i = -log softmax(z_teacher,i)[y_i]   (temperature 1),
computed once from the frozen teacher's logits (its cache) and the labels. It ranks samples exactly
as the teacher's confidence in the true class does (the "transfer teacher" scoring of curriculum
learning, Hacohen & Weinshall 2019), and the largest teacher is the pool's most reliable judge.

Schedule (assign_experts): with u_i = #{j : d_j < d_i} / N the difficulty quantile of sample i
(0 for the easiest; equal difficulties share a quantile, hence an expert) and p in [0, 1] the
training progress,
    level_i(p) = E u_i + (2p - 1)(E - 1),     expert_i(p) = clip(floor(level_i(p)), 0, E - 1).
Equivalently, expert k teaches the samples whose quantile lies in [c_k(p), c_{k+1}(p)) with sliding
cut points c_k(p) = (k - (2p - 1)(E - 1)) / E clipped to [0, 1]. At p = 1/2 the data is split into E
equal difficulty strata (easiest to the smallest assistant, hardest to the teacher); the cut points
slide down linearly with progress, so a sample's expert only grows during training: at p = 0 every
sample is taught by the smallest assistant, at p = 1 by the teacher. At every p a harder sample is
never taught by a smaller expert than an easier one. Parameter-free by design, like TAKD's chain
(small teacher first, large teacher last), but handed over sample by sample, easy samples last.

Loss (per_sample_kd): the Hinton KD term with each sample reading its own expert,
    L = 1/N sum_i T^2 KL(softmax(z_{a_i, i} / T) || softmax(z_s,i / T)),
with kdforge's "batchmean" reduction (summed over classes, averaged over the batch), i.e. exactly
``kd_kl_loss(student, gathered expert logits, T)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

from kdforge.engine.predict import predict
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.progress import Progress
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.offline import OfflineStep, stage_parts
from kdforge.recipes.teacher_sources import index_examples

# Slack on floor(level): a level that is an integer up to rounding error belongs to the larger expert.
_FLOOR_SLACK = 1e-9


def sample_difficulty(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d_i = -log softmax(z_i)[y_i] (cross-entropy of the gold label, temperature 1), shape (N,).

    ``teacher_logits`` (N, C): the largest teacher's logits (expert E-1), e.g. from its cache;
    ``labels`` (N,) class indices. Larger = harder. Computed in float32 or float64, no gradient."""
    if teacher_logits.dim() != 2 or teacher_logits.shape[-1] < 2:
        raise KDForgeError(f"CES-KD needs (N, C) class logits with C >= 2 from the teacher, got shape "
                           f"{tuple(teacher_logits.shape)}; it applies to classification tasks only")
    labels = torch.as_tensor(labels, device=teacher_logits.device).reshape(-1).long()
    if labels.numel() != teacher_logits.shape[0]:
        raise KDForgeError(f"{labels.numel()} labels for {teacher_logits.shape[0]} teacher predictions; the "
                           "teacher's cache must cover the same examples as the training split")
    n_classes = teacher_logits.shape[-1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise KDForgeError(f"labels must lie in [0, {n_classes}) for CES-KD's difficulty, found "
                           f"{int(labels.min())}..{int(labels.max())}; check the task's label column")
    z = teacher_logits.detach()
    z = z if z.dtype == torch.float64 else z.float()
    return F.cross_entropy(z, labels, reduction="none")


def difficulty_quantile(difficulty: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """u_i = #{j : r_j < d_i} / |r| with r = ``reference`` (default: ``difficulty`` itself), in [0, 1]."""
    d = torch.as_tensor(difficulty).reshape(-1).to(torch.float64)
    r = d if reference is None else torch.as_tensor(reference).reshape(-1).to(torch.float64).to(d.device)
    if r.numel() == 0:
        raise KDForgeError("CES-KD needs the training split's difficulties to rank samples; the reference is empty")
    if not (torch.isfinite(d).all() and torch.isfinite(r).all()):
        raise KDForgeError("CES-KD difficulties must be finite; the teacher's cached logits contain inf or NaN "
                           "(rebuild the teacher cache)")
    ranks = torch.searchsorted(torch.sort(r).values, d, right=False)
    return ranks.to(torch.float64) / r.numel()


def assign_experts(difficulty: torch.Tensor, n_experts: int, progress_fraction: float,
                   reference: torch.Tensor | None = None) -> torch.Tensor:
    """The expert teaching each sample, (N,) long in [0, n_experts): 0 = smallest assistant,
    n_experts - 1 = largest teacher.

    expert_i = clip(floor(E u_i + (2p - 1)(E - 1)), 0, E - 1), u_i the difficulty quantile of sample i
    (see the module docstring), p = ``progress_fraction`` in [0, 1] (``Progress.fraction``). Quantiles
    are taken within ``difficulty`` itself, or against ``reference`` (the whole training split's
    difficulties) when a batch is assigned on its own, so a batch gets the same experts as in the
    full-split assignment."""
    if not isinstance(n_experts, int) or n_experts < 1:
        raise KDForgeError(f"CES-KD needs at least one expert, got n_experts={n_experts!r}; list the teacher and "
                           "its assistants")
    p = float(progress_fraction)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise KDForgeError(f"progress_fraction must lie in [0, 1], got {progress_fraction!r}")
    d = torch.as_tensor(difficulty)
    u = difficulty_quantile(d, reference)
    level = n_experts * u + (2.0 * p - 1.0) * (n_experts - 1)
    experts = torch.floor(level + _FLOOR_SLACK).clamp(0, n_experts - 1).long()
    return experts.to(d.device)


def per_sample_kd_terms(student_logits: torch.Tensor, expert_logits: list[torch.Tensor], assignment: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """(N,) T^2 KL(softmax(z_{a_i, i} / T) || softmax(z_s,i / T)); the expert logits are detached."""
    if len(expert_logits) == 0:
        raise KDForgeError("CES-KD needs at least one expert's logits")
    if not temperature > 0:
        raise KDForgeError(f"CES-KD temperature must be > 0, got {temperature}; set the KD term's `temperature`")
    for k, z in enumerate(expert_logits):
        if z.shape != student_logits.shape:
            raise KDForgeError(f"expert {k} gives logits of shape {tuple(z.shape)} but the student gives "
                               f"{tuple(student_logits.shape)}; every expert must score the batch over the "
                               "student's labels")
    a = torch.as_tensor(assignment, device=student_logits.device).reshape(-1).long()
    n = student_logits.shape[0]
    if a.numel() != n:
        raise KDForgeError(f"{a.numel()} expert assignments for a batch of {n}; assign every sample of the batch")
    if n and (a.min() < 0 or a.max() >= len(expert_logits)):
        raise KDForgeError(f"expert assignment out of range [0, {len(expert_logits)}): found "
                           f"{int(a.min())}..{int(a.max())}; assign with n_experts equal to the number of experts")
    stacked = torch.stack([z.detach().to(student_logits.dtype) for z in expert_logits])  # (E, N, C)
    teacher = stacked[a, torch.arange(n, device=student_logits.device)]  # (N, C)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2


def per_sample_kd(student_logits: torch.Tensor, expert_logits: list[torch.Tensor], assignment: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """1/N sum_i T^2 KL(softmax(z_{a_i, i} / T) || softmax(z_s,i / T)), a scalar ("batchmean").

    ``student_logits`` (N, C); ``expert_logits``: E tensors (N, C), index 0 the smallest assistant;
    ``assignment`` (N,) expert index per sample (assign_experts). Each sample reads only its expert;
    the mean runs over all N samples whatever their expert, so the term's scale does not depend on
    how the batch is split between experts. Gradient flows to the student only."""
    return per_sample_kd_terms(student_logits, expert_logits, assignment, temperature).mean()


# ----------------------------------------------------------------------------------- the strategy


class CESKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: PositiveFloat = 4.0
    kd_weight: float = Field(1.0, ge=0)


class CESKDStep(OfflineStep):
    """The stage's loss plus ``kd_weight * per_sample_kd`` with each sample's expert chosen by
    ``assign_experts`` from its difficulty and the training progress."""

    def __init__(self, learner, loss, sources: dict, experts: list[str], difficulty: torch.Tensor,
                 temperature: float, kd_weight: float):
        super().__init__(learner, loss, sources)
        self.experts = experts
        self.register_buffer("difficulty", difficulty)
        self.temperature, self.kd_weight = temperature, kd_weight

    def forward(self, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        student = self.learner(batch)
        outputs = self.teacher_outputs(batch, list(dict.fromkeys([*self.experts, *self.loss.teacher_roles])))
        total, terms = self.loss(student, outputs, batch, progress)
        assignment = assign_experts(self.difficulty[batch["index"]], len(self.experts), progress.fraction,
                                    reference=self.difficulty)
        kd = per_sample_kd(student.logits, [outputs[r].logits for r in self.experts], assignment, self.temperature)
        terms.update({"ces_kd": float(kd.detach()), "ces_kd_mean_expert": float(assignment.float().mean())})
        return total + self.kd_weight * kd, terms


@STRATEGIES.register("ces_kd")
class CESKD(Strategy):
    """``strategy: {name: ces_kd}``: the stage's ``teachers`` are the expert pool, listed from the
    smallest assistant to the largest teacher (which also judges each sample's difficulty)."""

    Params = CESKDParams
    teacher_count = (2, None)

    def check(self, config, stage) -> None:
        if stage.teachers is None:
            raise KDForgeError(f"stage {stage.name!r}: ces_kd needs `teachers:` listing 2 or more experts from the "
                               "smallest assistant to the largest teacher")

    def build(self, ctx: StageContext) -> CESKDStep:
        experts = list(ctx.teachers)
        largest = ctx.teachers[experts[-1]]
        logits, labels = predict(ModelAdapter(largest.model), ctx.train_data, ctx.data.collator(largest.tokenizer),
                                 ctx.config.eval.batch_size, ctx.device, f"difficulty ({experts[-1]})")
        difficulty = sample_difficulty(torch.as_tensor(logits), torch.as_tensor(labels))
        loss, p = ctx.loss(), self.params
        parts = stage_parts(ctx, loss, roles=list(dict.fromkeys([*experts, *loss.teacher_roles])),
                            temperatures=dict.fromkeys(experts, p.temperature))  # each expert is read at T
        index_examples(ctx)
        return CESKDStep(parts.learner, parts.loss, parts.teachers, experts, difficulty, p.temperature, p.kd_weight)
