"""Relation (Gram-matrix) distillation: match the teacher's similarity structure, not its vectors."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator

from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import OBJECTIVES, Objective

Pooling = Literal["cls", "mean", "flatten"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 activations (mixed precision), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def full_precision(device: torch.device):
    """Autocast off: similarities and Gram matrices are computed in float32 (or float64) under mixed precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def pool(x: torch.Tensor, pooling: str, mask: torch.Tensor | None, objective: str) -> torch.Tensor:
    """One vector per sample from a (N, d), (N, L, d) or (N, C, H, W...) tensor, in float32 at least."""
    x = x.to(compute_dtype(x))
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        raise KDForgeError(f"objective {objective!r} got a representation of shape {tuple(x.shape)}; it needs "
                           "one row per sample, (N, d) or (N, L, d)")
    sequence_mask = mask if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]) else None
    if pooling == "flatten":
        if sequence_mask is not None:
            x = x * sequence_mask.unsqueeze(-1).to(x.dtype)
        return x.reshape(x.shape[0], -1)
    if pooling == "cls":
        if x.dim() != 3:
            raise KDForgeError(f"objective {objective!r}: pooling `cls` needs (N, L, d) token representations, got "
                               f"shape {tuple(x.shape)}; use pooling `mean` or `flatten`")
        return x[:, 0]
    if x.dim() > 3:  # channels-first feature map: global average pooling over the spatial dims
        return x.flatten(2).mean(-1)
    if sequence_mask is None:
        return x.mean(1)
    m = sequence_mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def representations(outputs: Outputs, layers: list[int], paths: list[str], side: str, objective: str,
                    batch: dict[str, Any], pooling: str) -> list[torch.Tensor]:
    """The pooled representations of one side: hooked ``paths`` if given, else ``hidden_states[layers]``."""
    mask = batch.get("attention_mask")
    if paths:
        missing = [p for p in paths if p not in outputs.features]
        if missing:
            raise KDForgeError(f"objective {objective!r}: no captured output for {side}_paths {missing}; "
                               "check the module paths (they must be hooked in the " + side + ")")
        tensors = [outputs.features[p] for p in paths]
    else:
        hidden = outputs.hidden_states
        if hidden is None:
            raise KDForgeError(f"objective {objective!r} needs the {side}'s hidden states, which this model does not "
                               f"return; give hooked module paths with `{side}_paths`")
        n = len(hidden)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise KDForgeError(f"objective {objective!r}: {side}_layers {bad} out of range; the {side} has {n} "
                               f"hidden states (0 = embedding output, 1..{n - 1} = layers, -1 = last)")
        tensors = [hidden[i] for i in layers]
        absent = [i for i, h in zip(layers, tensors, strict=True) if h is None]
        if absent:  # a teacher-output cache keeps only the hidden states it was asked for
            raise KDForgeError(f"objective {objective!r}: the {side}'s hidden states {absent} are not available (not "
                               f"kept by the teacher cache); add them to `teacher_cache.hidden_states`")
    return [pool(t, pooling, mask, objective) for t in tensors]


def gram(f: torch.Tensor, normalize: str) -> torch.Tensor:
    """Gram matrix of the rows of ``f`` (..., K, d) -> (..., K, K).

    ``gram_rows``: rows of F F^T scaled to unit L2 norm (SP); ``features``: cosine similarities."""
    if normalize == "features":
        f = F.normalize(f, dim=-1)
        return f @ f.transpose(-1, -2)
    return F.normalize(f @ f.transpose(-1, -2), dim=-1)


def samples_relation_loss(f_s: torch.Tensor, f_t: torch.Tensor, normalize: str = "gram_rows") -> torch.Tensor:
    """(1/N^2) ||G_s - G_t||_F^2 between the N x N Gram matrices of (N, d_s) and (N, d_t); teacher detached."""
    f_s = f_s.reshape(f_s.shape[0], -1)
    f_t = f_t.detach().reshape(f_t.shape[0], -1)
    dtype = compute_dtype(f_s)
    diff = gram(f_s.to(dtype), normalize) - gram(f_t.to(dtype), normalize)
    return diff.pow(2).sum() / f_s.shape[0] ** 2


def layers_relation_loss(f_s: torch.Tensor, f_t: torch.Tensor, normalize: str = "features") -> torch.Tensor:
    """mean_i (1/K^2) ||G_s,i - G_t,i||_F^2 for (N, K, d_s) and (N, K, d_t) groups; teacher detached."""
    f_t = f_t.detach()
    dtype = compute_dtype(f_s)
    diff = gram(f_s.to(dtype), normalize) - gram(f_t.to(dtype), normalize)
    k = f_s.shape[1]
    return diff.pow(2).sum((-1, -2)).mean() / k**2


class RelationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    over: Literal["samples", "layers"] = "samples"
    student_layers: list[int] = [-1]
    teacher_layers: list[int] = [-1]
    student_paths: list[str] = []
    teacher_paths: list[str] = []
    pooling: Pooling = "cls"
    #: None: the convention of `over` (samples: gram_rows, as SP; layers: features, cosine)
    normalize: Literal["gram_rows", "features"] | None = None

    @model_validator(mode="after")
    def _groups_match(self) -> RelationParams:
        s = len(self.student_paths or self.student_layers)
        t = len(self.teacher_paths or self.teacher_layers)
        if s == 0 or t == 0:
            raise ValueError("student_layers/teacher_layers (or *_paths) must not be empty")
        if s != t:
            raise ValueError(f"the student has {s} representations and the teacher {t}; give as many of each "
                             "(student_layers/teacher_layers or student_paths/teacher_paths)")
        if self.over == "layers" and s < 2:
            raise ValueError("over: layers relates at least 2 representations per sample; list 2 or more "
                             "student_layers and teacher_layers (or *_paths)")
        return self


class LayersOrPaths:
    """For terms whose Params name hidden-state layers or hooked module paths on each side: they
    need hidden states unless both sides give paths, and they hook the paths given."""

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        p = self.params
        return frozenset({"hidden_states"}) if not (p.student_paths and p.teacher_paths) else frozenset()

    def hook_paths(self, student, teacher):
        return list(self.params.student_paths), list(self.params.teacher_paths)


@OBJECTIVES.register("relation")
class Relation(LayersOrPaths, Objective):
    """Relation / Gram-matrix distillation.

    Name ``relation``. A Gram matrix of a group of representations depends only on their inner
    products, so teacher and student may differ in width (and a student that is an orthogonal
    rotation of the teacher scores zero).

    ``over: samples`` -- similarity-preserving KD, Tung & Mori (2019), "Similarity-Preserving
    Knowledge Distillation", ICCV. For each (student, teacher) pair of representations, with
    F (N x d) the batch's representations (one row per sample):

        G = F F^T  (N x N),   G~[i, :] = G[i, :] / ||G[i, :]||_2       (row-wise L2 normalisation)
        L = sum_pairs (1 / N^2) ||G~_s - G~_t||_F^2

    exactly the paper's L_SP (section 3; ``normalize: gram_rows``, the default for ``samples``); the
    sum runs over the configured (student, teacher) layer pairs, as the paper's sum over its pairs I.
    The paper weights the term by gamma = 3000 in its CIFAR-10 experiments: that is this term's
    ``weight`` in the config (e.g. ``{name: relation, weight: 3000}``), not a parameter here.

    ``over: layers`` -- the relation *across* representations of the same sample: for each sample
    i, stack its K pooled representations (K layers, or K hooked modules, e.g. the modalities of a
    multimodal model projected to one width) into F_i (K x d) and compare the K x K cosine Gram
    matrices (``normalize: features``, the default for ``layers``):

        G_i = F^_i F^_i^T,  F^_i[k] = F_i[k] / ||F_i[k]||_2
        L = (1 / N) sum_i (1 / K^2) ||G_s,i - G_t,i||_F^2

    This is the pair-wise "layer transforming relation" of Park, Kim & Yang (2021), "Distilling
    Linguistic Context for Language Model Compression" (CKD), EMNLP, applied to pooled sentence
    representations and with SP's squared-Frobenius / size^2 reduction; CKD itself relates every
    token's representations and adds a triple-wise (angle) term, which this term does not.

    ``normalize`` may be set explicitly to use the other normalisation with either grouping
    (``gram_rows``: G~ = row-normalised F F^T; ``features``: G = F^ F^^T with unit rows of F).

    Representations: ``student_layers`` / ``teacher_layers`` index ``Outputs.hidden_states``
    (0 = embedding output, i = layer i, -1 = last; default the last), or ``student_paths`` /
    ``teacher_paths`` name hooked modules (read from ``Outputs.features``), which take precedence
    on their side. Each tensor is pooled to one vector per sample (``pooling``):
    ``cls`` = position 0 of a (N, L, d) sequence; ``mean`` = mean over the valid positions
    (``batch["attention_mask"]`` when its shape matches; over H, W for a (N, C, H, W) map);
    ``flatten`` = the whole tensor as one vector, as SP does with convolutional activation maps
    (padding positions zeroed with the attention mask). (N, d) tensors are used as they are.

    No temperature, so no T^2. The teacher's representations are detached; the loss is a float
    scalar, reduced as above.
    """

    Params = RelationParams


    def forward(self, student, teacher, batch, progress):
        p = self.params
        s = representations(student, p.student_layers, p.student_paths, "student", "relation", batch, p.pooling)
        t = representations(teacher, p.teacher_layers, p.teacher_paths, "teacher", "relation", batch, p.pooling)
        if p.over == "samples":
            normalize = p.normalize or "gram_rows"
            with full_precision(s[0].device):
                return sum(samples_relation_loss(fs, ft, normalize) for fs, ft in zip(s, t, strict=True))
        for side, group in (("student", s), ("teacher", t)):
            widths = {f.shape[-1] for f in group}
            if len(widths) > 1:
                raise KDForgeError(f"objective 'relation' (over: layers): the {side}'s representations have different "
                                   f"widths {sorted(widths)}; relate representations of one width (project them first)")
        with full_precision(s[0].device):
            return layers_relation_loss(torch.stack(s, 1), torch.stack(t, 1), p.normalize or "features")
