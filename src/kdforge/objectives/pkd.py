"""Patient Knowledge Distillation: the patience loss on intermediate [CLS] representations.

Sun, Cheng, Gan & Liu (EMNLP 2019), "Patient Knowledge Distillation for BERT Model Compression",
eq. (3):

    L_PT = sum_i sum_{j=1}^{M'} || h_s^{i,j} / ||h_s^{i,j}||_2 - h_t^{i,I_pt(j)} / ||h_t^{i,I_pt(j)}||_2 ||_2^2

h^{i,j}: the [CLS] vector (position 0) of sample i at the output of layer j. The last student layer
is not in the sum (its [CLS] feeds the classifier, whose output is already distilled by the KD term):
for an M-layer student from an N-layer teacher (k = N / M, floor), PKD-Skip maps student layer
j = 1..M-1 to teacher layer j*k (6 from 12: {2, 4, 6, 8, 10}) and PKD-Last to teacher layer
N - M + j (6 from 12: {7, 8, 9, 10, 11}). Layers are 1-based here: they are hidden-state indices
(``hidden_states[j]`` is the output of layer j; 0 is the embedding output).

Reduction: the official code (``src/KD_loss.py: patience_loss``) takes ``F.mse_loss`` of the
normalised (batch, layers, hidden) stacks, i.e. the mean over batch, mapped layers *and* hidden
units: L = (1 / (N_batch * M' * d)) sum_i sum_j ||...||^2. That is the default (``reduction:
mean``) because the paper's beta (100-1000; Pea-KD uses 100) was tuned with it. ``reduction: sum``
is eq. (3) per sample: summed over layers and hidden units, averaged over the batch (M' * d times
larger). Teacher detached; no temperature.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from kdforge.errors import KDForgeError
from kdforge.objectives.base import OBJECTIVES, Objective
from kdforge.objectives.hint import bert_linear, check_layer_map, encoder_size, hidden_states_of


def pkd_layer_map(n_student: int, n_teacher: int, strategy: str) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based, the student's last layer excluded."""
    if n_student < 2:
        raise KDForgeError(f"pkd needs a student with at least 2 layers (its last layer is not in the patience "
                           f"loss), but it has {n_student}; give an explicit `layer_map`")
    if n_teacher < n_student:
        raise KDForgeError(f"pkd maps {n_student} student layers onto a {n_teacher}-layer teacher; the teacher "
                           "needs at least as many layers, or give an explicit `layer_map`")
    if strategy == "skip":
        k = n_teacher // n_student
        return [(j, j * k) for j in range(1, n_student)]
    return [(j, n_teacher - n_student + j) for j in range(1, n_student)]


def patience_loss(student_cls: list[torch.Tensor], teacher_cls: list[torch.Tensor],
                  reduction: str = "mean") -> torch.Tensor:
    """Normalised [CLS] distances of (N, d) pairs; see the module docstring for the reductions."""
    s = F.normalize(torch.stack(student_cls, dim=1), p=2, dim=-1)
    t = F.normalize(torch.stack([c.detach() for c in teacher_cls], dim=1), p=2, dim=-1)
    squared = (s - t).pow(2)  # (N, M', d)
    if reduction == "mean":
        return squared.mean()
    return squared.sum(dim=(1, 2)).mean()


class PKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["skip", "last"] = Field("skip", description="PKD-Skip (every k-th teacher layer) or PKD-Last")
    layer_map: list[tuple[NonNegativeInt, NonNegativeInt]] | None = Field(
        None, min_length=1, description="[[student, teacher], ...] 1-based layers (hidden-state indices)")
    projection: bool = Field(False, description="learn a linear map student width -> teacher width (not in the "
                             "paper, whose student and teacher share the hidden size)")
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="mean: the official code's mean over batch x layers x hidden; sum: eq. (3) per sample")


@OBJECTIVES.register("pkd")
class PatientKD(Objective):
    """PKD patience loss (Sun et al., EMNLP 2019, eq. 3), weighted by beta in the config.

        L_PT = mean_{i, j, c} ( h_s^{i,j}/||h_s^{i,j}||_2 - h_t^{i,I(j)}/||h_t^{i,I(j)}||_2 )_c^2

    on the [CLS] (position 0) outputs of the mapped layers; PKD-Skip by default (student layer j ->
    teacher layer j*k, j = 1..M-1, the last layer excluded as in the paper), PKD-Last with
    ``strategy: last``, or an explicit ``layer_map``. ``reduction: mean`` (default) is the official
    code's F.mse_loss over (batch, layers, hidden), the scale the paper's beta (100-1000) was tuned
    for; ``reduction: sum`` is eq. (3): summed over layers and hidden units, batch mean. The teacher
    is detached. Student and teacher must have the same hidden size unless ``projection: true``.
    Combine e.g. ``[{name: hinton_kd, ...}, {name: pkd, weight: 100}]`` (Pea-KD's beta).
    """

    Params = PKDParams
    requires = frozenset({"hidden_states"})

    def __init__(self, params: PKDParams | None = None):
        super().__init__(params)
        self.layer_map: list[tuple[int, int]] | None = None
        self.projection = None

    def setup(self, student, teacher):
        m, d_s = encoder_size(student, "student", "pkd")
        n, d_t = encoder_size(teacher, "teacher", "pkd")
        if d_s != d_t and not self.params.projection:
            raise KDForgeError(f"pkd compares normalised hidden states, which needs equal widths, but the student's is "
                               f"{d_s} and the teacher's {d_t}; set `projection: true` on the pkd objective")
        pairs = self.params.layer_map or pkd_layer_map(m, n, self.params.strategy)
        self.layer_map = check_layer_map(pairs, m, n, "hidden-state (1-based layer)", "pkd")
        if self.params.projection:
            self.projection = bert_linear(d_s, d_t, float(getattr(student.config, "initializer_range", 0.02)))

    def forward(self, student, teacher, batch, progress):
        if self.layer_map is None:
            raise RuntimeError("objective 'pkd' was not set up: call setup(student, teacher) first")
        hs = hidden_states_of(student, "student", "pkd")
        ht = hidden_states_of(teacher, "teacher", "pkd")
        s_cls = [hs[j][:, 0] for j, _ in self.layer_map]
        if self.projection is not None:
            s_cls = [self.projection(c) for c in s_cls]
        return patience_loss(s_cls, [ht[t][:, 0] for _, t in self.layer_map], self.params.reduction)
