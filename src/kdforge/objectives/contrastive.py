"""Contrastive KD: InfoNCE between the student's and the teacher's sentence embeddings."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.objectives.base import OBJECTIVES, Objective
from kdforge.objectives.relation import LayersOrPaths, compute_dtype, full_precision, representations

#: attributes naming a module's output width, tried in this order
_WIDTH_ATTRIBUTES = ("out_features", "embedding_dim", "hidden_size", "out_channels", "num_features")


def _module_width(module: nn.Module) -> int | None:
    for name in _WIDTH_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)  # LayerNorm
    return int(shape[-1]) if shape else None


def infer_width(model: nn.Module | None, layers: list[int], paths: list[str], side: str) -> int:
    """Width of the concatenated pooled representation of one side, read from the model."""
    fix = f"set `{side}_dim` to the width of the {side}'s (concatenated) representation"
    if model is None:
        raise KDForgeError(f"objective 'contrastive_kd' cannot size its projection without the {side} model; {fix}")
    if paths:
        total = 0
        for path in paths:
            try:
                width = _module_width(model.get_submodule(path))
            except AttributeError:
                raise KDForgeError(f"objective 'contrastive_kd': module path {path!r} not found in the {side} "
                                   f"({type(model).__name__}); check {side}_paths") from None
            if width is None:
                raise KDForgeError(f"objective 'contrastive_kd' cannot read the output width of {side} module "
                                   f"{path!r}; {fix}")
            total += width
        return total
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise KDForgeError(f"objective 'contrastive_kd' cannot read the {side}'s hidden size from its config; {fix}")
    return hidden * len(layers)


def info_nce(q: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor | float,
             exclude: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i -log( exp(s <q_i, keys_i>) / sum_j exp(s <q_i, keys_j>) ).

    ``q`` (N, d) and ``keys`` (N + M, d) are unit vectors; the positive of row i is ``keys[i]``.
    ``exclude`` (N, N + M) bool marks negatives left out of the denominator."""
    logits = scale * (q @ keys.t())
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


class ContrastiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student_layers: list[int] = [-1]
    teacher_layers: list[int] = [-1]
    student_paths: list[str] = []
    teacher_paths: list[str] = []
    pooling: Literal["cls", "mean"] = "cls"
    projection: Literal["shared", "student", "none"] = "shared"
    proj_dim: PositiveInt = 128
    student_dim: PositiveInt | None = None
    teacher_dim: PositiveInt | None = None
    queue_size: NonNegativeInt = 100
    temperature: PositiveFloat = 0.07
    learn_temperature: bool = True
    max_scale: PositiveFloat = 100.0
    negatives: Literal["all", "other_labels"] = "all"

    @model_validator(mode="after")
    def _check(self) -> ContrastiveParams:
        if not (self.student_paths or self.student_layers) or not (self.teacher_paths or self.teacher_layers):
            raise ValueError("student_layers/teacher_layers (or *_paths) must not be empty")
        if 1.0 / self.temperature > self.max_scale * (1 + 1e-9):
            raise ValueError(f"temperature {self.temperature} starts the logit scale at {1 / self.temperature:.4g}, "
                             f"above max_scale {self.max_scale}; raise temperature to at least 1/max_scale")
        return self


@OBJECTIVES.register("contrastive_kd")
class ContrastiveKD(LayersOrPaths, Objective):
    """Contrastive KD (InfoNCE with a queue of teacher embeddings and a learnable logit scale).

    Formulation of CoDIR: Sun, Gan, Cheng, Fang, Wang & Liu (2020), "Contrastive Distillation on
    Intermediate Representations for Language Model Compression", EMNLP -- the student's
    representation of a sentence must pick the teacher's representation of the *same* sentence
    out of the teacher's representations of other sentences (negatives kept in a memory) -- with
    the negatives kept MoCo-style in a FIFO queue (He et al. 2020, "Momentum Contrast for
    Unsupervised Visual Representation Learning", CVPR) and the temperature learned as CLIP's
    logit scale (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision", ICML).

        x_s = concat_l pool(student layer l),   x_t = concat_l pool(teacher layer l)   (detached)
        q_i = normalize(P_s x_s,i),   k_i = normalize(P_t x_t,i)                        (unit L2 norm)
        s   = exp(log_scale)
        L   = (1/N) sum_i -log( exp(s <q_i, k_i>) / sum_{j in batch U queue} exp(s <q_i, k_j>) )

    Reduction: mean over the N samples of the batch. No T^2 (this is not a softened KL). The
    teacher representations are detached (in the batch and in the queue); gradients reach the
    student, the projections and the logit scale.

    Projection (created in ``setup(student, teacher)``, sized from ``config.hidden_size`` times
    the number of layers, or from hooked modules' widths, or ``student_dim`` / ``teacher_dim``):
    ``shared`` (default) -- two linear heads into ``proj_dim`` dimensions, P_t trained too (CoDIR's
    code: linear embeddings of both sides into 128 dims, then L2 normalisation); ``student`` -- one
    linear head from the student width to the teacher width, P_t = identity; ``none`` -- both
    identity (equal widths).

    Queue: a registered buffer (so it is checkpointed) of the last ``queue_size`` teacher
    representations x_t, *before* the teacher head: they pass through the current P_t at every
    step, so they never go stale. Empty slots are not negatives. After the loss, in training mode
    only, the current batch's x_t is enqueued FIFO (no grad), overwriting the oldest entries.
    Under DDP, PyTorch re-broadcasts buffers from rank 0 at each forward, so the queue holds rank
    0's batches. ``negatives: other_labels`` drops negatives (in the batch and in the queue) that
    share the anchor's gold label, as CoDIR samples its fine-tuning negatives from other classes.

    Logit scale (CLIP): ``log_scale`` is a parameter initialised to log(1 / temperature) and
    clamped (before use, in place) so that s <= ``max_scale`` = 100 (CLIP's clip); frozen with
    ``learn_temperature: false``.

    Defaults: temperature 0.07 (CoDIR's official code, ``nce_t = 0.07``; also CLIP's
    initialisation); ``queue_size`` 100 (the number of negatives per positive in CoDIR's official
    GLUE fine-tuning script, ``--nce_k 100``); ``proj_dim`` 128 (its ``--crd_feat_dim``); ``cls``
    pooling (its representation is the first token of each layer). CoDIR's script concatenates
    the first token of every student layer and of every second teacher layer (a 6-layer student
    of a 12-layer teacher: ``student_layers: [1, 2, 3, 4, 5, 6]``, ``teacher_layers: [1, 3, 5, 7,
    9, 11]``); the default here is the last layer only. The paper states the objective as this
    softmax over one positive and K teacher negatives at temperature tau; its released code
    estimates it with CRD's NCE loss over a dataset-sized memory bank instead.

    Caveat: if ``queue_size`` approaches the number of training sentences, a sentence's own
    teacher embedding from an earlier visit can sit in the queue as a (false) negative; keep the
    queue well below the dataset size.
    """

    Params = ContrastiveParams

    def __init__(self, params: BaseModel | None = None):
        super().__init__(params)
        p = self.params
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / p.temperature)), requires_grad=p.learn_temperature)
        self.student_proj: nn.Module | None = None
        self.teacher_proj: nn.Module | None = None
        self.register_buffer("queue", torch.zeros(0, 0))
        self.register_buffer("queue_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))


    def setup(self, student: nn.Module | None, teacher: nn.Module | None) -> None:
        p = self.params
        d_s = p.student_dim or infer_width(student, p.student_layers, p.student_paths, "student")
        d_t = p.teacher_dim or infer_width(teacher, p.teacher_layers, p.teacher_paths, "teacher")
        device, dtype = self.log_scale.device, self.log_scale.dtype
        if p.projection == "shared":
            self.student_proj = nn.Linear(d_s, p.proj_dim, device=device, dtype=dtype)
            self.teacher_proj = nn.Linear(d_t, p.proj_dim, device=device, dtype=dtype)
        elif p.projection == "student":
            self.student_proj = nn.Linear(d_s, d_t, device=device, dtype=dtype)
            self.teacher_proj = nn.Identity()
        else:
            if d_s != d_t:
                raise KDForgeError(f"objective 'contrastive_kd': projection `none` needs equal widths but the "
                                   f"student's representation has {d_s} and the teacher's {d_t}; use projection "
                                   "`shared` or `student`")
            self.student_proj, self.teacher_proj = nn.Identity(), nn.Identity()
        self.queue = torch.zeros(p.queue_size, d_t, device=device, dtype=dtype)
        self.queue_labels = torch.full((p.queue_size,), -1, dtype=torch.long, device=device)
        self.queue_ptr.zero_()
        self.queue_count.zero_()

    def _embed(self, outputs, side: str, batch, width: int) -> torch.Tensor:
        p = self.params
        layers, paths = (p.student_layers, p.student_paths) if side == "student" else (p.teacher_layers,
                                                                                           p.teacher_paths)
        x = torch.cat(representations(outputs, layers, paths, side, "contrastive_kd", batch, p.pooling), -1)
        if x.shape[-1] != width:
            raise KDForgeError(f"objective 'contrastive_kd': the {side}'s representation has width {x.shape[-1]} but "
                               f"the projection was sized for {width}; set `{side}_dim: {x.shape[-1]}`")
        return x if side == "student" else x.detach()

    def forward(self, student, teacher, batch, progress):
        p = self.params
        if self.student_proj is None or self.teacher_proj is None:
            raise KDForgeError("objective 'contrastive_kd' was not set up; call setup(student, teacher) before "
                               "training (the engine and kdforge.Distiller do)")
        d_t = self.queue.shape[1]
        d_s = self.student_proj.in_features if isinstance(self.student_proj, nn.Linear) else d_t
        x_s = self._embed(student, "student", batch, d_s)
        x_t = self._embed(teacher, "teacher", batch, d_t)
        param_dtype = self.log_scale.dtype
        dtype = compute_dtype(x_s)
        q = F.normalize(self.student_proj(x_s.to(param_dtype)).to(dtype), dim=-1)
        count = int(self.queue_count)
        bank = self.queue[:count].clone()  # a snapshot: the in-place enqueue below must not touch the graph
        keys = F.normalize(self.teacher_proj(torch.cat([x_t.to(param_dtype), bank])).to(dtype), dim=-1)
        with torch.no_grad():
            self.log_scale.clamp_(max=math.log(p.max_scale))
        scale = self.log_scale.exp().to(dtype)
        labels = batch.get("labels")
        exclude = None
        if p.negatives == "other_labels":
            if labels is None or labels.dtype.is_floating_point:
                raise KDForgeError("objective 'contrastive_kd' with negatives `other_labels` needs class labels in "
                                   "the batch; use negatives `all` for unlabeled or regression data")
            labels = labels.reshape(-1)
            key_labels = torch.cat([labels, self.queue_labels[:count]])
            exclude = labels[:, None] == key_labels[None, :]
            exclude[:, : labels.shape[0]].fill_diagonal_(False)  # the positive always stays
        with full_precision(q.device):
            loss = info_nce(q, keys, scale, exclude)
        if self.training:
            self._enqueue(x_t, labels)
        return loss

    @torch.no_grad()
    def _enqueue(self, x_t: torch.Tensor, labels: torch.Tensor | None) -> None:
        """FIFO: write the batch over the oldest slots (only the newest ``queue_size`` if the batch is larger)."""
        size = self.queue.shape[0]
        if size == 0:
            return
        n_batch = x_t.shape[0]
        x_t = x_t.detach()[-size:]
        n = x_t.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue[slots] = x_t.to(self.queue.dtype)
        if labels is not None and not labels.dtype.is_floating_point and labels.numel() == n_batch:
            self.queue_labels[slots] = labels.reshape(-1)[-size:].to(self.queue_labels.device)
        else:
            self.queue_labels[slots] = -1
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_count.copy_(torch.clamp(self.queue_count + n, max=size))
