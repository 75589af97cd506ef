"""Several teachers at once: their average (the common baseline) or CA-MKD.

``strategy: {name: multi_teacher, weighting: camkd}`` on a stage whose ``teachers`` are two or
more roles; the stage's own ``objectives`` (usually ``[{name: ce}]``) are added as they are.

* ``weighting: average``: ``kd_weight * (1/K) sum_k hinton_kd(student, teacher_k)`` -- one Hinton
  KD term bound to each teacher with weight ``kd_weight / K`` (so each teacher can be served from
  its own cache, at the term's temperature). This is CA-MKD's code's averaging baseline
  (batchmean KL x T^2 per teacher, mean over teachers).
* ``weighting: camkd``: Zhang, Chen & Wang (ICASSP 2022), :mod:`kdforge.objectives.camkd`:
  ``kd_weight * L_kd + feature_weight * L_feat`` (``L_feat`` from the second epoch), with per-sample
  teacher weights from each teacher's cross-entropy; defaults T 4, CE 1 / KD 1 / feature 50 when
  the stage's objectives are ``[ce]``. The teachers run live (their features and heads are read).
  Feature site: the input of ``pool`` for kdforge's CIFAR nets (the official site), the input of
  the classification head for other models (e.g. BERT's pooled output, with ``relu: false``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.objectives.camkd import DEFAULT_TEMPERATURE, DEFAULT_WEIGHTS, CAMKDLoss, feature_site, feature_term_active
from kdforge.objectives.composite import WeightedLoss
from kdforge.progress import Progress
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.offline import OfflineStep, stage_parts
from kdforge.recipes.teacher_sources import LiveTeacher


class MultiTeacherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighting: Literal["average", "camkd"] = "camkd"
    temperature: PositiveFloat = DEFAULT_TEMPERATURE
    kd_weight: float = Field(DEFAULT_WEIGHTS["kd"], ge=0)
    feature_weight: float = Field(DEFAULT_WEIGHTS["feature"], ge=0, description="camkd: the intermediate term")
    spatial: bool | None = Field(None, description="camkd: read feature maps before the pool (default: for "
                                 "models with `pool` and `fc`, as kdforge's CIFAR nets)")
    relu: bool = Field(True, description="camkd: the embedding's final ReLU (turn off for features that can be "
                       "negative, e.g. BERT's pooled output)")


class CAMKDStep(OfflineStep):
    """The stage's loss plus CA-MKD's weighted KD and intermediate terms over every teacher."""

    def __init__(self, learner, loss: WeightedLoss, teachers: dict, camkd: CAMKDLoss, sites: dict[str, str],
                 heads: dict[str, Any], kd_weight: float, feature_weight: float):
        super().__init__(learner, loss, teachers)
        self.camkd = camkd
        self.roles = list(teachers)
        self.sites, self.heads = sites, heads
        self.kd_weight, self.feature_weight = kd_weight, feature_weight

    def forward(self, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        student = self.learner(batch)
        teachers = self.teacher_outputs(batch, self.roles)
        total, terms = self.loss(student, teachers, batch, progress)
        with_feature = self.feature_weight > 0 and feature_term_active(progress.epoch_number)
        out = self.camkd(student.logits, student.features.get("input:" + self.sites["student"]),
                         [teachers[r].logits for r in self.roles],
                         [teachers[r].features["input:" + self.sites[r]] for r in self.roles] if with_feature else None,
                         [self.heads[r] for r in self.roles] if with_feature else None,
                         batch["labels"], with_feature)
        total = total + self.kd_weight * out["kd"] + self.feature_weight * out["feature"]
        terms.update({"camkd_kd": float(out["kd"].detach()), "camkd_feature": float(out["feature"].detach())})
        return total, terms

    def parts(self) -> dict:
        return {**super().parts(), "camkd": self.camkd}


@STRATEGIES.register("multi_teacher")
class MultiTeacher(Strategy):
    Params = MultiTeacherParams
    teacher_count = (2, None)

    def reads_teacher_internals(self) -> str | None:
        return "the features before their classifier (CA-MKD's intermediate term)" \
            if self.params.weighting == "camkd" else None

    def average_terms(self, roles: list[str]) -> list[ObjectiveConfig]:
        p = self.params
        return [ObjectiveConfig(name="hinton_kd", weight=p.kd_weight / len(roles), temperature=p.temperature,
                                teacher=role) for role in roles]

    def build(self, ctx: StageContext) -> OfflineStep:
        roles, p = list(ctx.teachers), self.params
        if p.weighting == "average":
            parts = stage_parts(ctx, ctx.loss(roles, extra=self.average_terms(roles)))
            return OfflineStep(parts.learner, parts.loss, parts.teachers)
        models = {"student": ctx.learner.model, **{r: m.model for r, m in ctx.teachers.items()}}
        spatial = {r: p.spatial if p.spatial is not None else hasattr(m, "pool") and hasattr(m, "fc")
                   for r, m in models.items()}
        if len(set(spatial.values())) > 1:
            raise KDForgeError("CA-MKD: the student and the teachers must all have feature maps (CIFAR nets) or all "
                               "not; set strategy.spatial: false to use the heads' inputs")
        sites, heads = {}, {}
        for role, model in models.items():
            sites[role], heads[role] = feature_site(model, spatial[role])
        parts = stage_parts(ctx, roles=[], input_paths=[sites["student"]])
        sources = {r: LiveTeacher(ctx.adapter(ctx.teachers[r], hook_paths=parts.teacher_paths.get(r, []),
                                              input_paths=[sites[r]], teacher=True)) for r in roles}
        dims = self.feature_dims(ctx, parts.learner, sources, sites)
        camkd = CAMKDLoss(dims["student"], [dims[r] for r in roles], p.temperature, relu=p.relu)
        return CAMKDStep(parts.learner, parts.loss, sources, camkd, sites, {r: heads[r] for r in roles}, p.kd_weight,
                         p.feature_weight)

    @staticmethod
    @torch.no_grad()
    def feature_dims(ctx: StageContext, learner, sources, sites) -> dict[str, int]:
        """Each model's feature width (channels), from one forward pass on two evaluation examples."""
        collate = ctx.data.collator(ctx.learner.tokenizer, train=False)
        batch = collate([ctx.data.train[i] for i in range(min(2, len(ctx.data.train)))])
        dims = {}
        for role, adapter in [("student", learner), *((r, s.adapter) for r, s in sources.items())]:
            was_training = adapter.training
            adapter.eval()
            dims[role] = int(adapter(batch).features["input:" + sites[role]].shape[1])
            adapter.train(was_training)
        return dims
