"""Deep Mutual Learning: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning" (CVPR 2018).

K >= 2 models learn the task together, each from the labels and from the others' predictions.
With z_k the logits of model k, p_k = softmax(z_k / T) and y the gold labels, model k minimises

    L_k = CE(y, z_k) + kl_weight * T^2 * 1/(K-1) sum_{l != k} KL(p_l || p_k)        (paper: T = 1)

where every p_l on the target side is DETACHED (a constant for model k), so model k's parameters
get gradient from L_k only. The paper alternates the updates (model 1 steps on L_1, then model 2
on L_2 with model 1's new predictions, ...); here the K losses are summed and minimised with one
backward pass and one optimizer step on all models at once,

    L = sum_k L_k,

the simultaneous version that is the common implementation (one forward of each model per batch).
Because of the detaching, dL/dtheta_k = dL_k/dtheta_k exactly (``tests/test_online_kd.py``).
Reduction: cross-entropy averaged over the batch, each KL summed over classes and averaged over
the batch (``kd_kl_loss``); T^2 keeps the KL's gradient scale when T != 1 (it is 1 at the paper's T).
Logged terms: ``ce:<role>`` and ``kl:<role>`` for every model (the KL term unweighted).

Roles: ``strategy: {name: dml}`` on a stage; the models are the stage's ``learner`` and every role
of its ``teachers:`` list (pre-trained teachers, with or without ``finetune``, or ``assistants``
built like the student, e.g. ``assistants: {peer: {layers: [0, 1]}}`` or
``{model: vision:resnet8}``); the peers may differ in architecture and size. Unlike the offline
strategy, the teacher roles are TRAINED: the step holds them as trainable modules (never
frozen), so the engine's optimizer updates them and its checkpoints hold them (exact resume).
They always run live, never from the teacher-output cache (``teacher_source: cache`` is refused).
The job's models are trained in place, so the report scores every role after training.

What is kept: the engine evaluates and keeps the best epoch of ``step.learner`` only (the stage's
``learner``, exported as the student); the other models keep their LAST-epoch weights.

The loss is the strategy's own: the stage must say ``objectives: []`` (a listed objective would
be ignored, so it is refused rather than silently dropped). Classification tasks only (the loss
is on class distributions): regression and language-modelling tasks are refused, as are stages
on other data than the task's (``data: ptp`` or ``corpus``). The stage must be the recipe's last:
an earlier stage leaves a snapshot of its learner only, so a resumed recipe would lose the
peers' training. Text and vision models alike (the ModelAdapter gives both logits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import nn

from kdforge.config import JobConfig, StageConfig
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.objectives.logit import kd_kl_loss
from kdforge.progress import Progress
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.online import PeerStep, check_online_stage, trainable_peers


def dml_terms(logits: dict[str, torch.Tensor], labels: torch.Tensor, temperature: float
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per model k: (CE(y, z_k), T^2 1/(K-1) sum_{l != k} KL(p_l || p_k)) with every p_l detached."""
    if len(logits) < 2:
        raise KDForgeError(f"deep mutual learning needs 2 or more models, got {len(logits)}")
    k_minus_1 = len(logits) - 1
    terms = {}
    for role, z in logits.items():
        z = z.float()
        ce = F.cross_entropy(z, labels)
        kl = sum(kd_kl_loss(z, other.float(), temperature) for r, other in logits.items() if r != role) / k_minus_1
        terms[role] = (ce, kl)
    return terms


def dml_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, temperature: float = 1.0,
             kl_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L = sum_k [CE(y, z_k) + kl_weight * T^2 1/(K-1) sum_{l != k} KL(p_l || p_k)] and the logged terms."""
    total, logged = 0.0, {}
    for role, (ce, kl) in dml_terms(logits, labels, temperature).items():
        total = total + ce + kl_weight * kl
        logged[f"ce:{role}"], logged[f"kl:{role}"] = float(ce.detach()), float(kl.detach())
    return total, logged


class DMLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: PositiveFloat = Field(1.0, description="softmax temperature of the KL terms (paper: 1); "
                                       "the KL is scaled by T^2")
    kl_weight: float = Field(1.0, ge=0, description="weight of each model's mimicry (KL) term")


class DMLStep(PeerStep):
    def __init__(self, learner_role: str, learner: ModelAdapter, peers: dict[str, nn.Module], temperature: float,
                 kl_weight: float):
        super().__init__(learner_role, learner, peers)
        self.temperature, self.kl_weight = temperature, kl_weight

    def forward(self, batch: dict[str, Any], progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        return dml_loss(self.logits(batch), batch["labels"], self.temperature, self.kl_weight)


@STRATEGIES.register("dml")
class DeepMutualLearning(Strategy):
    """``strategy: {name: dml, temperature: 1, kl_weight: 1}``: the stage's learner and its
    ``teachers`` roles learn from the labels and from one another (see the module docstring)."""

    Params = DMLParams
    trains_teachers = True
    teacher_count = (1, None)
    needs = frozenset({"gold_labels"})  # every model learns the task's labels

    def check(self, config: JobConfig, stage: StageConfig) -> None:
        check_online_stage(config, stage, "dml")

    def build(self, ctx: StageContext) -> DMLStep:
        p = self.params
        return DMLStep(ctx.learner_role, ctx.adapter(ctx.learner), trainable_peers(ctx), p.temperature, p.kl_weight)
