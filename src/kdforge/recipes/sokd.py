"""SOKD: Liu, Liu & Huang, "Semi-Online Knowledge Distillation" (BMVC 2021; arXiv 2111.11747).

A pre-trained teacher T stays FROZEN; a trainable *knowledge bridge module* (KBM) B sits on top of
the teacher's last-but-one stage and learns online, with the student S, as a peer (DML), while also
following the teacher (KD). The student learns only from the bridge:

    student:  L_S = w_ce CE(z_S, y) + w_kd KD(z_B -> z_S)
    bridge:   L_B = w_bce CE(z_B, y) + w_bt KD(z_T -> z_B) + w_bs KD(z_S -> z_B)
    loss   =  L_S + L_B            (one backward; the engine's optimizer updates S and B)

with KD(z_t -> z_s) = T^2 KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes and averaged
over the batch ("batchmean", :func:`kdforge.objectives.logit.kd_kl_loss`), T = 4, every weight 1.
Which side is detached (the target side of every KD term):

    kd_bridge          KD(z_B -> z_S)   z_B detached: the student's loss sends no gradient into B
    bridge_kd_teacher  KD(z_T -> z_B)   z_T detached (the teacher is frozen, run without gradients)
    bridge_kd_student  KD(z_S -> z_B)   z_S detached: the bridge's loss sends no gradient into S
    bridge_ce          CE(z_B, y)       B only

The bridge's input is the DETACHED output of the teacher's stage before the last one, so no loss
reaches the teacher. :func:`knowledge_bridge` builds B from the teacher:

* kdforge's CIFAR nets (:mod:`kdforge.models.vision_nets`: resnet*, wrn_*, small_cnn): a deep copy of
  ``layer3`` and ``post_act`` (WRN's final BN-ReLU, the identity otherwise), global average pooling
  and a NEW linear head (He-uniform weight, zero bias); input: the output of ``layer2`` (a forward hook
  on the teacher).
* BERT-style sequence classifiers (``base_model.encoder.layer`` + ``base_model.pooler`` + a linear
  ``classifier``, e.g. BertForSequenceClassification): a deep copy of the last encoder layer, of the
  pooler (dense + tanh on [CLS]) and of the dropout, and a NEW linear classifier (normal(0,
  initializer_range) weight, zero bias); input: ``hidden_states[-2]`` (the input of the last layer)
  with the batch's attention mask.

Config: a stage ``{objectives: [{name: ce}], strategy: {name: sokd}}`` with exactly one teacher, run
live. The stage's objectives are the student's own terms (normally just ``ce``, whose weight is the
paper's lambda_ce) and may not read a teacher; the strategy adds the rest. Logged terms: ``ce``
(the stage's), ``kd_bridge``, ``bridge_ce``, ``bridge_kd_teacher``, ``bridge_kd_student``. The bridge
is a module of the step: trained by the engine's optimizer (the same learning rate and schedule as
the student) and checkpointed with it, so resume is exact; it is not exported.

Checked against the authors' code (github.com/swlzq/Semi-Online-KD, ``trainer/sokd.py``,
``models/wrn.py``, ``configs/sokd.yaml``): bridge input = the detached output of ``block2`` of a
WRN teacher; bridge = copies of ``block3``, the final BN and the fc; SoftTarget T = 4 (batchmean
KL x T^2); loss = CE_B + KD(T->B) + KD(S->B) + CE_S + KD(B->S), all lambdas 1, one backward; CIFAR-100,
WRN-40-2 -> WRN-40-1, SGD lr 0.1 for both (momentum 0.9, wd 5e-4), 200 epochs. Where kdforge differs:

1. The authors' copies are taken when the network is constructed, before the teacher checkpoint is
   loaded, and their modules never run while the teacher is pre-trained, so their bridge starts
   from a random initialisation: kdforge's default, ``bridge_init: random`` (the copied modules
   re-initialised as the net's own construction does: He-normal convolutions, BatchNorm 1 / 0 with
   fresh running statistics; BERT's normal(0, initializer_range) linear weights, LayerNorm 1 / 0).
   ``bridge_init: teacher`` is our variant: the bridge's stage (and pooler) start as an exact copy of
   the trained teacher's, only the head new.
2. The authors run the frozen teacher in train mode (batch statistics in its BatchNorm layers);
   kdforge keeps every frozen model in eval mode (running statistics, no dropout).
3. The authors give the bridge its own learning rate (``lr_auxiliary``, 0.1 in the published config,
   equal to the student's); kdforge trains it with the stage's optimizer settings.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import nn

from kdforge.config import JobConfig, StageConfig
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.models.vision_nets import init_weights
from kdforge.objectives.base import objective_params
from kdforge.objectives.composite import WeightedLoss
from kdforge.objectives.logit import kd_kl_loss
from kdforge.progress import Progress
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.offline import OfflineStep, stage_parts
from kdforge.recipes.online import stage_index
from kdforge.recipes.teacher_sources import LiveTeacher

SUPPORTED = ("kdforge's CIFAR nets (stem, layer1..layer3, post_act, pool, fc: resnet*, wrn_*, small_cnn) and "
             "BERT-style sequence classifiers (base_model.encoder.layer + pooler + linear `classifier`, e.g. "
             "BertForSequenceClassification)")
VISION_PARTS = ("stem", "layer1", "layer2", "layer3", "post_act", "pool", "fc")


def sokd_terms(student_logits: torch.Tensor, bridge_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """SOKD's four terms besides the student's CE (see the module docstring), unweighted:

    kd_bridge = KD(z_B -> z_S) (z_B detached), bridge_ce = CE(z_B, y), bridge_kd_teacher = KD(z_T -> z_B),
    bridge_kd_student = KD(z_S -> z_B) (z_S detached); KD = T^2 KL, batchmean."""
    return {
        "kd_bridge": kd_kl_loss(student_logits, bridge_logits.detach(), temperature),
        "bridge_ce": F.cross_entropy(bridge_logits, labels),
        "bridge_kd_teacher": kd_kl_loss(bridge_logits, teacher_logits.detach(), temperature),
        "bridge_kd_student": kd_kl_loss(bridge_logits, student_logits.detach(), temperature),
    }


# ----------------------------------------------------------------------------------- the bridge


class KnowledgeBridge(nn.Module):
    """The teacher's last stage (copied) + a new head; reads its input from the teacher's Outputs."""

    hook_paths: list[str] = []  # teacher modules whose outputs the bridge reads (forward hooks)
    hidden_states: bool = False  # whether it reads the teacher's hidden states
    num_classes: int

    def take_input(self, teacher: Outputs) -> torch.Tensor:
        """The bridge's input from the teacher's outputs, detached (no gradient reaches the teacher)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class VisionBridge(KnowledgeBridge):
    """A kdforge CIFAR net's ``layer3`` and ``post_act`` (copies), global average pooling, a new linear head."""

    site = "layer2"

    def __init__(self, stage: nn.Module, post_act: nn.Module, in_features: int, num_classes: int):
        super().__init__()
        self.hook_paths = [self.site]
        self.num_classes = num_classes
        self.stage, self.post_act = stage, post_act
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.fc.bias)  # as vision_nets' init: default (He-uniform) weight, zero bias

    def take_input(self, teacher: Outputs) -> torch.Tensor:
        return teacher.features[self.site].detach()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.post_act(self.stage(x))), 1))


class TextBridge(KnowledgeBridge):
    """A BERT-style model's last encoder layer, pooler and dropout (copies) and a new linear classifier."""

    hidden_states = True

    def __init__(self, layer: nn.Module, pooler: nn.Module, dropout: nn.Module, config, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.layer, self.pooler, self.dropout = layer, pooler, dropout
        self.config = config  # the layer's own (copied) config: its attention implementation builds the mask
        self.classifier = nn.Linear(config.hidden_size, num_classes)
        nn.init.normal_(self.classifier.weight, std=getattr(config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def take_input(self, teacher: Outputs) -> torch.Tensor:
        return teacher.hidden_states[-2].detach()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask)
        h = self.layer(x, mask)
        h = h[0] if isinstance(h, tuple) else h
        return self.classifier(self.dropout(self.pooler(h)))


def _unsupported(model: nn.Module, why: str) -> KDForgeError:
    return KDForgeError(f"sokd cannot build a knowledge bridge from a {type(model).__name__} teacher ({why}); "
                        f"supported: {SUPPORTED}")


def reinitialise(module: nn.Module, initializer_range: float | None) -> None:
    """Fresh weights for every layer of ``module`` as the net's own construction draws them: a kdforge
    CIFAR net's (:func:`kdforge.models.vision_nets.init_weights`: He-normal convolutions, BatchNorm 1 / 0,
    zero linear biases) with reset running statistics; with ``initializer_range`` (BERT-style), linear
    weights normal(0, initializer_range), zero biases, LayerNorm 1 / 0."""
    if initializer_range is None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        init_weights(module)
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def knowledge_bridge(teacher_model: nn.Module, init: str = "random") -> KnowledgeBridge:
    """SOKD's knowledge bridge module for ``teacher_model``: its last stage (trainable, the teacher
    untouched), freshly initialised (``init="random"``, the authors' code) or a copy of the trained
    teacher's (``"teacher"``), and a freshly initialised head with as many outputs as the teacher's."""
    if all(hasattr(teacher_model, name) for name in VISION_PARTS):
        fc = teacher_model.fc
        if not isinstance(fc, nn.Linear):
            raise _unsupported(teacher_model, "its `fc` is not a linear layer")
        stage, post_act = copy.deepcopy((teacher_model.layer3, teacher_model.post_act))
        if init == "random":
            reinitialise(stage, None)
            reinitialise(post_act, None)
        bridge: KnowledgeBridge = VisionBridge(stage, post_act, fc.in_features, fc.out_features)
    else:
        base = getattr(teacher_model, "base_model", None)
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        pooler = getattr(base, "pooler", None)
        classifier = getattr(teacher_model, "classifier", None)
        config = getattr(teacher_model, "config", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or pooler is None:
            raise _unsupported(teacher_model, "no base_model.encoder.layer stack with a pooler")
        if not isinstance(classifier, nn.Linear) or getattr(config, "is_decoder", False):
            raise _unsupported(teacher_model, "no linear `classifier` on a bidirectional encoder")
        dropout = getattr(teacher_model, "dropout", None) or nn.Identity()
        layer, pooler, dropout, config = copy.deepcopy((layers[-1], pooler, dropout, config))  # one shared config
        if init == "random":
            for part in (layer, pooler):
                reinitialise(part, getattr(config, "initializer_range", 0.02))
        bridge = TextBridge(layer, pooler, dropout, config, classifier.out_features)
    bridge.requires_grad_(True)  # the copies of a frozen teacher's modules train
    bridge.train()
    return bridge


# ----------------------------------------------------------------------------------- the strategy


class SOKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: PositiveFloat = 4.0
    bridge_init: Literal["random", "teacher"] = Field(
        "random", description="the bridge's copy of the teacher's last stage starts freshly initialised (random: "
        "the authors' code) or as the trained teacher's (teacher: kdforge's variant)")
    kd_weight: float = Field(1.0, ge=0, description="the student's KD from the bridge (its CE: the stage's `ce`)")
    bridge_ce_weight: float = Field(1.0, ge=0, description="the bridge's cross-entropy with the labels")
    bridge_kd_teacher_weight: float = Field(1.0, ge=0, description="the bridge's KD from the frozen teacher")
    bridge_kd_student_weight: float = Field(1.0, ge=0, description="the bridge's KD from the student")


class SOKDStep(OfflineStep):
    """The student (``learner``) with the stage's terms + KD from the bridge; the bridge (trainable,
    checkpointed) with CE + KD from the frozen teacher + KD from the student."""

    def __init__(self, learner, loss: WeightedLoss, role: str, teacher: nn.Module, bridge: KnowledgeBridge,
                 params: SOKDParams):
        super().__init__(learner, loss, {role: teacher})
        self.role, self.bridge, self.params = role, bridge, params

    def losses(self, batch: dict, progress: Progress) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(student loss, bridge loss, logged terms): the two parts share no gradient path."""
        p = self.params
        student = self.learner(batch)
        teacher = self.sources[self.role](batch)
        student_loss, terms = self.loss(student, {}, batch, progress)
        bridge_logits = self.bridge(self.bridge.take_input(teacher), batch.get("attention_mask"))
        t = sokd_terms(student.logits, bridge_logits, teacher.logits, batch["labels"], p.temperature)
        student_loss = student_loss + p.kd_weight * t["kd_bridge"]
        bridge_loss = (p.bridge_ce_weight * t["bridge_ce"] + p.bridge_kd_teacher_weight * t["bridge_kd_teacher"]
                       + p.bridge_kd_student_weight * t["bridge_kd_student"])
        terms.update({name: float(value.detach()) for name, value in t.items()})
        return student_loss, bridge_loss, terms

    def forward(self, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        student_loss, bridge_loss, terms = self.losses(batch, progress)
        return student_loss + bridge_loss, terms

    def parts(self) -> dict[str, nn.Module]:
        return {**super().parts(), "bridge": self.bridge}


@STRATEGIES.register("sokd")
class SOKD(Strategy):
    """``strategy: {name: sokd}``: one frozen live teacher, a trainable knowledge bridge, the student."""

    Params = SOKDParams
    teacher_count = (1, 1)

    def reads_teacher_internals(self) -> str | None:
        return "the output of its last stage but one, the knowledge bridge's input"
    needs = frozenset({"gold_labels"})

    def check(self, config: JobConfig, stage: StageConfig) -> None:
        n = stage_index(config, stage)
        where = f"stage {stage.name!r}: strategy sokd"
        if stage.teacher_source == "cache":
            raise KDForgeError(f"{where} runs the teacher live (its bridge reads the teacher's intermediate "
                               f"features every step); set stages.{n}.teacher_source: live or auto, not cache")
        for i, objective in enumerate(stage.objectives):
            cls, _ = objective_params(objective, i)
            if cls.uses_teacher:
                raise KDForgeError(f"{where}: stages.{n}.objectives.{i} ({objective.name}) reads a teacher, but the "
                                   "student learns from the knowledge bridge only (strategy.kd_weight); keep "
                                   "teacher-free terms, e.g. objectives: [{name: ce}]")

    def build(self, ctx: StageContext) -> SOKDStep:
        (role, teacher), = ctx.teachers.items()
        if not ctx.job_task.problem.classes:
            raise KDForgeError(f"stage {ctx.stage.name!r}: strategy sokd needs a classification task (got "
                               f"{ctx.job_task.problem_type})")
        bridge = knowledge_bridge(teacher.model, self.params.bridge_init)
        if bridge.num_classes != ctx.data.num_labels:
            raise KDForgeError(f"stage {ctx.stage.name!r}: the teacher {role!r} has {bridge.num_classes} outputs but "
                               f"the task has {ctx.data.num_labels} labels; fine-tune the teacher on this task")
        parts = stage_parts(ctx, setup_teachers={}, roles=[])
        source = LiveTeacher(ctx.adapter(teacher, hook_paths=bridge.hook_paths, hidden_states=bridge.hidden_states,
                                         teacher=True))
        return SOKDStep(parts.learner, parts.loss, role, source, bridge, self.params)
