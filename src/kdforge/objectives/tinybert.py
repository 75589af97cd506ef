"""TinyBERT's transformer-layer and prediction-layer distillation, as three selectable terms.

Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu (Findings of EMNLP 2020), "TinyBERT: Distilling BERT
for Natural Language Understanding", section 3.1. With a student of M layers and a teacher of N,
k = N / M (floor when N is not a multiple of M) and the uniform mapping g(m) = k * m:

* ``tinybert_hidden`` (eqs. 8, 9): L = sum_{j in map} MSE(H^S_j W, H^T_{g(j)}), over the hidden
  states with the embedding output as index 0 (student rep j -> teacher rep j*k, j = 0..M). The
  embeddings use their own projection W_e and the layers a shared W_h, as eqs. (8) and (9) write them;
  ``shared_projection: true`` uses one matrix for all, as the official code does (its ``fit_dense``).
* ``tinybert_attention`` (eq. 7): L = sum_{i in map} (1/h) sum_{a=1}^{h} MSE(A^S_{i,a}, A^T_{g(i),a})
  on the *unnormalised* attention scores A = Q K^T / sqrt(d_head) (before the softmax), student layer
  i (0-based) -> teacher layer i*k + k - 1 (the official code's map: the last layer of each block).
* ``tinybert_pred`` (eq. 10): L = CE(z^T / t, z^S / t) = -sum_c softmax(z^T/t)_c log softmax(z^S/t)_c,
  averaged over the batch, t = 1 in the paper's experiments; no T^2 factor.

MSE is the mean of the squared differences over every element (batch, tokens, features; for the
attention: batch, heads, query and key positions, which equals the paper's 1/h average of per-head
MSEs), and the per-layer terms are summed (lambda_m = 1), as in the official ``task_distill.py``.
As there, padding tokens are not excluded from the hidden-state MSE, and the attention scores at
masked key positions (which the official code sees as ~ -10000 and sets to 0) are set to 0 in both
student and teacher. Teacher outputs are always detached. The projections are created in ``setup``
(student width -> teacher width, initialised N(0, initializer_range^2) with zero bias, as BERT
initialises the official ``fit_dense``) so the optimizer trains them.

The attention scores are computed from forward hooks on every mapped layer's query and key
projections (BERT ``attention.self.query/key``, DistilBERT ``q_lin/k_lin``, LLaMA-style
``self_attn.q_proj/k_proj``, found by name under the layer stack), so the term works whatever
attention implementation runs (sdpa returns no maps). For rotary models the model's own
``rotary_emb`` and ``apply_rotary_pos_emb`` are applied, grouped key heads are repeated, and future
positions of causal attention count as masked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.student import layer_stack_path
from kdforge.objectives.base import OBJECTIVES, LogitObjective, Objective, TemperatureSetting
from kdforge.objectives.hint import (
    bert_linear,
    check_layer_map,
    encoder_size,
    feature_of,
    hidden_states_of,
)
from kdforge.objectives.logit import _class_logits

LayerMap = list[tuple[NonNegativeInt, NonNegativeInt]] | None
Pairs = Annotated[list[tuple[NonNegativeInt, NonNegativeInt]], Field(min_length=1)]


def block_size(n_student: int, n_teacher: int, objective: str) -> int:
    """k = N // M, the number of teacher layers per student layer."""
    if n_student < 1 or n_teacher < n_student:
        raise KDForgeError(f"objective {objective!r} maps {n_student} student layers onto {n_teacher} teacher "
                           "layers; the teacher needs at least as many layers, or give an explicit `layer_map`")
    return n_teacher // n_student


# ---------------------------------------------------------------------------------------------
# Hidden states (embedding output included)
# ---------------------------------------------------------------------------------------------


class TinyBERTHiddenParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer_map: Pairs | Literal["cka"] | None = Field(
        None, description="[[student, teacher], ...] hidden-state indices (0 = embedding output); default: "
        "j -> j * k for j = 0..M; cka: student layer j -> the j-th of M teacher layers chosen by CKA clustering "
        "(kdforge.objectives.hint_points) on the stage's first `cka_rows` training rows, embeddings 0 -> 0")
    cka_rows: PositiveInt = Field(512, description="layer_map cka: the training rows the CKA is computed on")
    shared_projection: bool = Field(False, description="one W for embeddings and layers (the official code's "
                                    "fit_dense) instead of the paper's W_e and W_h")


@OBJECTIVES.register("tinybert_hidden")
class TinyBERTHidden(Objective):
    """TinyBERT embedding + hidden-state distillation (Jiao et al., 2020, eqs. 8 and 9).

        L = MSE(E^S W_e, E^T) + sum_{j=1..M} MSE(H^S_j W_h, H^T_{j k})

    over the mapped hidden states (index 0 = embedding output; default map j -> j * k, k = N / M;
    ``layer_map: cka``: j -> the j-th of the M teacher layers that linear-CKA clustering picks, Kornblith et
    al. 2019, see kdforge.objectives.hint_points, on the stage's first ``cka_rows`` training rows).
    MSE averages over batch x tokens x teacher width; layer terms are summed; teacher detached.
    ``shared_projection: true`` uses W_h for the embeddings too (the official code's ``fit_dense``).
    """

    Params = TinyBERTHiddenParams
    requires = frozenset({"hidden_states"})

    def __init__(self, params: TinyBERTHiddenParams | None = None):
        super().__init__(params)
        self.layer_map: list[tuple[int, int]] | None = None
        self.proj_embeddings: nn.Linear | None = None
        self.proj_hidden: nn.Linear | None = None
        self.cka_points: list[int] | None = None
        self.calibration_rows = self.params.cka_rows if self.params.layer_map == "cka" else 0

    def calibrate(self, student, teacher, batches):
        """layer_map cka: the M teacher layers (hidden-state indices 1..N) that CKA clustering picks."""
        from kdforge.objectives.hint_points import hint_points_for

        m, _ = encoder_size(student, "student", "tinybert_hidden")
        n, _ = encoder_size(teacher, "teacher", "tinybert_hidden")
        block_size(m, n, "tinybert_hidden")  # one line when the teacher has fewer layers than the student
        self.cka_points = hint_points_for(teacher, batches, m)

    def setup(self, student, teacher):
        m, d_s = encoder_size(student, "student", "tinybert_hidden")
        n, d_t = encoder_size(teacher, "teacher", "tinybert_hidden")
        pairs = self.params.layer_map
        if pairs == "cka":
            if self.cka_points is None:
                raise KDForgeError("tinybert_hidden layer_map: cka chooses the teacher layers from training rows, "
                                   "which this strategy does not give its terms; give an explicit layer_map")
            pairs = [(0, 0), *((j + 1, t) for j, t in enumerate(self.cka_points))]
        elif pairs is None:
            k = block_size(m, n, "tinybert_hidden")
            pairs = [(j, j * k) for j in range(m + 1)]
        self.layer_map = check_layer_map(pairs, m, n, "hidden-state", "tinybert_hidden")
        std = float(getattr(student.config, "initializer_range", 0.02))
        self.proj_hidden = bert_linear(d_s, d_t, std)
        self.proj_embeddings = None if self.params.shared_projection else bert_linear(d_s, d_t, std)

    def forward(self, student, teacher, batch, progress):
        if self.layer_map is None or self.proj_hidden is None:
            raise RuntimeError("objective 'tinybert_hidden' was not set up: call setup(student, teacher) first")
        hs = hidden_states_of(student, "student", "tinybert_hidden")
        ht = hidden_states_of(teacher, "teacher", "tinybert_hidden")
        total = student.logits.new_zeros(())
        for j, t in self.layer_map:
            projection = self.proj_embeddings if j == 0 and self.proj_embeddings is not None else self.proj_hidden
            total = total + F.mse_loss(projection(hs[j]), ht[t].detach())
        return total


# ---------------------------------------------------------------------------------------------
# Attention scores (pre-softmax), from hooked query / key projections
# ---------------------------------------------------------------------------------------------

#: query projection name -> key projection name (BERT, DistilBERT, LLaMA-style)
QUERY_KEY_NAMES = {"query": "key", "q_lin": "k_lin", "q_proj": "k_proj"}


@dataclass
class AttentionSpec:
    """Where one layer's query and key projections are, and how its scores are formed."""

    query: str
    key: str
    heads: int
    scaling: float | None
    causal: bool
    rotary: nn.Module | None = None
    apply_rotary: Callable | None = None


def _rotary_module(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "rotary_emb":
            return module
    return None


def attention_specs(model: nn.Module, who: str = "model") -> list[AttentionSpec]:
    """One :class:`AttentionSpec` per transformer layer of ``model``, found by module name."""
    stack_path = layer_stack_path(model)
    stack = model.get_submodule(stack_path)
    heads = int(model.config.num_attention_heads)
    rotary = _rotary_module(model)
    specs = []
    for i, layer in enumerate(stack):
        found = None
        for name, _ in layer.named_modules():
            parent, _, last = name.rpartition(".")
            if last in QUERY_KEY_NAMES and "cross" not in name.lower():
                key = f"{parent}.{QUERY_KEY_NAMES[last]}" if parent else QUERY_KEY_NAMES[last]
                try:
                    layer.get_submodule(key)
                except AttributeError:
                    continue
                found = (parent, name, key)
                break
        if found is None:
            raise KDForgeError(f"tinybert_attention: cannot find the query/key projections of {who} layer {i} "
                               f"({type(layer).__name__}); supported names: attention.self.query/key, q_lin/k_lin, "
                               "self_attn.q_proj/k_proj")
        parent, query, key = found
        attention = layer.get_submodule(parent) if parent else layer
        scaling = getattr(attention, "scaling", None)
        apply_rotary = None
        if rotary is not None:
            apply_rotary = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
            if apply_rotary is None:
                raise KDForgeError(f"tinybert_attention: {type(model).__name__} uses rotary embeddings that kdforge "
                                   "cannot apply to hooked projections; use tinybert_hidden only for this model")
        specs.append(AttentionSpec(query=f"{stack_path}.{i}.{query}", key=f"{stack_path}.{i}.{key}", heads=heads,
                                   scaling=float(scaling) if isinstance(scaling, int | float) else None,
                                   causal=bool(getattr(attention, "is_causal", False)),
                                   rotary=rotary, apply_rotary=apply_rotary))
    return specs


def attention_scores(query: torch.Tensor, key: torch.Tensor, spec: AttentionSpec,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-softmax scores Q K^T * scaling, (N, heads, L, L), from projection outputs (N, L, heads * d)."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    n, length, width = query.shape
    d = width // spec.heads
    q = query.to(dtype).view(n, length, spec.heads, d).transpose(1, 2)
    kv_heads = key.shape[-1] // d
    k = key.to(dtype).view(n, key.shape[1], kv_heads, d).transpose(1, 2)
    if spec.rotary is not None and spec.apply_rotary is not None:
        if position_ids is None:
            position_ids = torch.arange(length, device=query.device).unsqueeze(0).expand(n, -1)
        cos, sin = spec.rotary(q, position_ids)
        q, k = spec.apply_rotary(q, k, cos.to(dtype), sin.to(dtype))
    if kv_heads != spec.heads:
        k = k.repeat_interleave(spec.heads // kv_heads, dim=1)
    scaling = spec.scaling if spec.scaling is not None else d**-0.5
    return torch.matmul(q, k.transpose(2, 3)) * scaling


def valid_entries(attention_mask: torch.Tensor | None, n: int, length: int, causal: bool,
                  device: torch.device) -> torch.Tensor:
    """(N, 1, L, L) booleans: True where the query may attend to the key (key not padding, not future)."""
    keys = (torch.ones(n, length, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device).bool())
    valid = keys[:, None, None, :].expand(n, 1, length, length)
    if causal:
        valid = valid & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return valid


class TinyBERTAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer_map: LayerMap = Field(None, min_length=1, description="[[student, teacher], ...] 0-based layer indices; "
                                "default: i -> i * k + k - 1")


@OBJECTIVES.register("tinybert_attention")
class TinyBERTAttention(Objective):
    """TinyBERT attention-based distillation (Jiao et al., 2020, eq. 7).

        L = sum_{i in map} (1/h) sum_a MSE(A^S_{i,a}, A^T_{g(i),a}),   A = Q K^T / sqrt(d_head)

    on the unnormalised (pre-softmax) scores; default map: student layer i -> teacher layer
    i * k + k - 1 (0-based, k = N / M). Scores at masked key positions are set to 0 in both models;
    MSE averages over batch x heads x L x L; layer terms are summed; the teacher is detached.
    Student and teacher need the same number of heads (the paper's setting).
    """

    Params = TinyBERTAttentionParams

    def __init__(self, params: TinyBERTAttentionParams | None = None):
        super().__init__(params)
        self.layer_map: list[tuple[int, int]] | None = None
        self.student_specs: list[AttentionSpec] = []
        self.teacher_specs: list[AttentionSpec] = []

    def setup(self, student, teacher):
        m, _ = encoder_size(student, "student", "tinybert_attention")
        n, _ = encoder_size(teacher, "teacher", "tinybert_attention")
        pairs = self.params.layer_map
        if pairs is None:
            k = block_size(m, n, "tinybert_attention")
            pairs = [(i, i * k + k - 1) for i in range(m)]
        self.layer_map = check_layer_map(pairs, m - 1, n - 1, "layer", "tinybert_attention")
        self.student_specs = attention_specs(student, "student")
        self.teacher_specs = attention_specs(teacher, "teacher")
        h_s, h_t = self.student_specs[0].heads, self.teacher_specs[0].heads
        if h_s != h_t:
            raise KDForgeError(f"tinybert_attention needs the same number of attention heads in student ({h_s}) and "
                               f"teacher ({h_t}); build the student with num_attention_heads: {h_t}")

    def hook_paths(self, student, teacher):
        if self.layer_map is None:
            self.setup(student, teacher)
        assert self.layer_map is not None
        s_paths = [p for i, _ in self.layer_map for p in (self.student_specs[i].query, self.student_specs[i].key)]
        t_paths = [p for _, t in self.layer_map for p in (self.teacher_specs[t].query, self.teacher_specs[t].key)]
        return list(dict.fromkeys(s_paths)), list(dict.fromkeys(t_paths))

    def scores(self, outputs, spec: AttentionSpec, who: str, position_ids=None) -> torch.Tensor:
        return attention_scores(feature_of(outputs, spec.query, who, "tinybert_attention"),
                                feature_of(outputs, spec.key, who, "tinybert_attention"), spec, position_ids)

    def forward(self, student, teacher, batch, progress):
        if self.layer_map is None:
            raise RuntimeError("objective 'tinybert_attention' was not set up: call setup(student, teacher) first")
        position_ids = batch.get("position_ids")
        total = student.logits.new_zeros(())
        for i, t in self.layer_map:
            s_spec, t_spec = self.student_specs[i], self.teacher_specs[t]
            a_s = self.scores(student, s_spec, "student", position_ids)
            with torch.no_grad():
                a_t = self.scores(teacher.detach(), t_spec, "teacher", position_ids)
            if a_s.shape != a_t.shape:
                raise KDForgeError(f"tinybert_attention: student scores {tuple(a_s.shape)} and teacher scores "
                                   f"{tuple(a_t.shape)} differ; student and teacher need the same tokenizer and heads")
            n, _, length, _ = a_s.shape
            valid = valid_entries(batch.get("attention_mask"), n, length, s_spec.causal or t_spec.causal, a_s.device)
            total = total + F.mse_loss(a_s.masked_fill(~valid, 0.0), a_t.masked_fill(~valid, 0.0))
        return total


# ---------------------------------------------------------------------------------------------
# Prediction layer
# ---------------------------------------------------------------------------------------------


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature,
                       reduction: str = "batchmean") -> torch.Tensor:
    """mean_i -sum_c softmax(z_t,i / T)_c log softmax(z_s,i / T)_c; teacher detached, no T^2.

    ``reduction="mean"`` also divides by the number of classes (the official code's ``.mean()``)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    ce = -(p_t * log_p_s).sum(-1)
    if reduction == "mean":
        ce = ce / student_logits.shape[-1]
    return ce.mean()


class TinyBERTPredParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: TemperatureSetting = Field(1.0, description="t; the paper sets t = 1")
    reduction: Literal["batchmean", "mean"] = Field(
        "batchmean", description="batchmean: the paper's CE per sample, batch mean; mean: the official code's "
        "mean over batch x classes (1/C smaller)")


@OBJECTIVES.register("tinybert_pred")
class TinyBERTPred(LogitObjective):
    """TinyBERT prediction-layer distillation (Jiao et al., 2020, eq. 10).

        L_pred = (1/N) sum_i -sum_c softmax(z^T_i / t)_c log softmax(z^S_i / t)_c

    Soft cross-entropy at temperature t (default 1, the paper's value), no T^2 factor, teacher
    detached, averaged over the batch. ``reduction: mean`` reproduces the official code's
    ``(-p_t * log p_s).mean()``, which also divides by the number of classes. Classification only
    (the paper uses MSE on the logits for regression: use ``logit_mse``).
    """

    Params = TinyBERTPredParams

    def logit_loss(self, student_logits, teacher_logits, labels, temperature, progress):
        if teacher_logits is None:
            raise KDForgeError("objective 'tinybert_pred' needs a teacher; add a `teacher` section to the config")
        return soft_cross_entropy(_class_logits(student_logits, "tinybert_pred"), teacher_logits, temperature,
                                  self.params.reduction)
