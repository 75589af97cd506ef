"""GLMD word-prediction distillation: the student learns the teacher's word distribution at every position.

Tan, Tam, Wang, Gong, Zhao, Zhang & Tang (Findings of ACL 2023), "Are Intermediate Layers and Labels
Really Necessary? A General Language Model Distillation Method" (GLMD; arXiv:2306.06625; official
code: the ``logitsdistil`` student of github.com/aitsc/GLMKD). Vocabulary compression, the other half
of GLMD, lives in :mod:`kdforge.models.vocab`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.vocab import kept_ids_of, restrict_teacher_logits
from kdforge.objectives.base import OBJECTIVES, LogitObjective, Temperature
from kdforge.objectives.common import require, t_squared
from kdforge.objectives.logit import _class_logits

Reduction = Literal["tokens", "positions"]


def word_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: Temperature,
                 mask: torch.Tensor | None = None, kept_ids: torch.Tensor | None = None,
                 reduction: Reduction = "tokens") -> torch.Tensor:
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)) per position, reduced over the non-padding positions.

    ``student_logits`` (N, L, V_s); ``teacher_logits`` (N, L, V_t), detached here and restricted to
    ``kept_ids`` (V_s teacher ids, in student-id order) when given, else V_t must equal V_s;
    ``mask`` (N, L), nonzero at the positions that count (``attention_mask``; None: all count);
    ``temperature`` a float, a scalar tensor or one value per sample (N, 1) (its gradient flows,
    through the softmaxes and T^2). ``reduction``: ``tokens`` divides the sum by the number of counted
    positions, ``positions`` by N * L (the official GLMD code: padding counts as zero)."""
    s_logits = student_logits
    t_logits = teacher_logits.detach()
    if s_logits.dim() != 3:
        raise KDForgeError(f"objective 'word_kd' needs vocabulary logits of shape (batch, length, vocab) from a "
                           f"language-model head (AutoModelForCausalLM / AutoModelForMaskedLM), got shape "
                           f"{tuple(s_logits.shape)}; for sequence classification use `hinton_kd`")
    if kept_ids is not None:
        t_logits = restrict_teacher_logits(t_logits, kept_ids.to(t_logits.device))
    if t_logits.shape != s_logits.shape:
        raise KDForgeError(f"objective 'word_kd': teacher logits {tuple(t_logits.shape)} do not match the student's "
                           f"{tuple(s_logits.shape)}; teacher and student must see the same tokens, and a student "
                           "with a smaller vocabulary must be compressed with "
                           "kdforge.models.vocab.compress_vocabulary (it sets `student.kdforge_vocab_map`)")
    n, length, vocab = s_logits.shape
    if mask is None:
        rows = torch.ones(n * length, dtype=torch.bool, device=s_logits.device)
    else:
        if tuple(mask.shape) != (n, length):
            raise KDForgeError(f"objective 'word_kd': attention_mask {tuple(mask.shape)} does not match the logits' "
                               f"(batch, length) = {(n, length)}")
        rows = mask.reshape(-1).to(s_logits.device) != 0
    if s_logits.dtype in (torch.float16, torch.bfloat16):  # a 50k-way softmax at T = 15 needs float32
        s_logits, t_logits = s_logits.float(), t_logits.float()
    s_rows = s_logits.reshape(-1, vocab)[rows]
    t_rows = t_logits.reshape(-1, vocab)[rows]
    tau: Temperature = temperature
    if torch.is_tensor(temperature) and temperature.numel() > 1:
        if temperature.numel() != n:
            raise KDForgeError(f"objective 'word_kd': a per-sample temperature needs {n} values (one per sequence), "
                               f"got shape {tuple(temperature.shape)}")
        tau = temperature.reshape(n, 1).expand(n, length).reshape(-1)[rows].unsqueeze(-1)  # (M, 1)
    log_p_s = F.log_softmax(s_rows / tau, dim=-1)
    log_p_t = F.log_softmax(t_rows / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t_squared(tau)  # (M,)
    denominator = rows.sum().clamp(min=1) if reduction == "tokens" else n * length
    return kl.sum() / denominator


class WordKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: PositiveFloat = Field(15.0, description="T of both softmaxes (GLMD: --distill_temperature=15)")
    reduction: Reduction = Field("tokens", description="`tokens`: mean over the non-padding positions; "
                                 "`positions`: sum over them / (batch * length), as the official GLMD code")


@OBJECTIVES.register("word_kd")
class WordKD(LogitObjective):
    """GLMD word-prediction distillation. Tan, Tam, Wang, Gong, Zhao, Zhang & Tang (Findings of ACL
    2023), "Are Intermediate Layers and Labels Really Necessary? A General Language Model Distillation
    Method".

    At every position j of every sequence i that is not padding (``batch["attention_mask"]`` nonzero),
    with V the student's vocabulary and z the per-position logits over it:

        p_t,ij = softmax(z_t,ij[K] / T)     (K: the kept teacher ids; all ids when the vocabularies match)
        p_s,ij = softmax(z_s,ij / T)
        L = T^2 * sum_ij mask_ij KL(p_t,ij || p_s,ij) / sum_ij mask_ij            (reduction: tokens)
        L = T^2 * sum_ij mask_ij KL(p_t,ij || p_s,ij) / (N * L_max)               (reduction: positions)

    KL is summed over the vocabulary. T^2 multiplies the KL (per sample for an (N, 1) temperature),
    as in the official code (``kl_div(s / T, t / T) * T ** 2``). The teacher's logits are detached;
    no gradient reaches the teacher. Only logits are read: no hidden states and no gold labels
    (``batch["labels"]`` is ignored), so teacher and student may differ in width, depth and
    structure, as long as both predict words over the same (or, after compression, a kept subset of
    the same) vocabulary: ``AutoModelForCausalLM`` or ``AutoModelForMaskedLM`` logits (N, L, V).

    Vocabulary compression: when the student carries the kept teacher ids (V_s teacher ids in student-id
    order, stored by :func:`kdforge.models.vocab.compress_vocabulary` in ``student.config.kdforge_vocab``
    and the ``student.kdforge_vocab_map`` buffer; :func:`kdforge.models.vocab.kept_ids_of`), :meth:`setup`
    picks them up and the teacher's logits are restricted to them before the softmax, so the teacher's
    distribution is renormalised over the kept words (the official ``--distill_logit_mask_map --unmap_vocab_output``).

    Decisions where the paper is silent:

    * Positions: every non-padding position counts, for masked LMs (all tokens, not just the masked
      ones) and for causal LMs, where each position predicts the next token; the last real position
      counts too: it needs no label and the teacher's distribution there is as well defined as
      anywhere else (GLMD distils the word distribution at every position; its code masks padding
      only).
    * Reduction: ``tokens`` (default) averages over the non-padding positions, so a batch's loss does
      not depend on how much padding it carries. The official code zeroes the padded positions'
      logits (uniform teacher and student there, KL = 0) and then averages over all N * L positions;
      ``reduction: positions`` reproduces that number exactly. The two agree on unpadded batches
      (GLMD pre-trains on packed, full-length sequences).

    Defaults: T = 15, the official GLMD commands of both word-prediction stages, task-agnostic
    (pre-training corpus) and task-specific (task data): ``--student_model=logitsdistil
    --distill_temperature=15``. The official task-specific command then runs a follow-up pass that
    distils the task predictions at T = 1 without word prediction (``--again_1__distill_ft_soft
    --again_1__distill_temperature=1``: ``hinton_kd`` with ``temperature: 1``).

    Called through :meth:`logit_loss` without a batch (as CTKD does), every position counts.
    """

    Params = WordKDParams

    def __init__(self, params: BaseModel | None = None):
        super().__init__(params)
        self.register_buffer("kept_ids", None, persistent=False)

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        kept = kept_ids_of(student)
        if kept is None:
            self.kept_ids = None
            return
        kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1)
        if kept.numel() == 0 or int(kept.min()) < 0 or torch.unique(kept).numel() != kept.numel():
            raise KDForgeError("objective 'word_kd': `student.kdforge_vocab_map` must list distinct, non-negative "
                               "teacher ids (one per student id); rebuild it with "
                               "kdforge.models.vocab.compress_vocabulary")
        teacher_vocab = _vocab_size(teacher)
        if teacher_vocab is not None and int(kept.max()) >= teacher_vocab:
            raise KDForgeError(f"objective 'word_kd': the student's vocabulary map names teacher id {int(kept.max())} "
                               f"but the teacher has {teacher_vocab} words; compress the student against this "
                               "teacher's vocabulary")
        self.kept_ids = kept

    def logit_loss(self, student_logits, teacher_logits, labels, temperature, progress, mask=None):
        student_logits = _class_logits(student_logits, "word_kd")
        teacher_logits = require(teacher_logits, "word_kd", "a teacher")
        return word_kd_loss(student_logits, teacher_logits, temperature, mask=mask, kept_ids=self.kept_ids,
                            reduction=self.params.reduction)

    def forward(self, student, teacher, batch, progress):
        return self.logit_loss(student.logits, teacher.logits, None, self.params.temperature, progress,
                               mask=batch.get("attention_mask"))


def _vocab_size(model: nn.Module | None) -> int | None:
    """The number of words a language model scores (its output layer's rows), if it can be told."""
    if model is None:
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    weight = getattr(out, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None
