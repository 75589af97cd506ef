"""CA-MKD and the averaging baseline: the math of learning from several teachers.

Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022.

With K >= 2 teachers, a batch of N samples with labels y, student logits z_s and teacher logits z_k:

* **Teacher weights from confidence** (paper eq. 2-3): each teacher's cross-entropy with the true
  label, ``CE_kn = -log softmax(z_k,n)[y_n]`` (no temperature), and

      w_kn = (1 - softmax_k(CE_kn)) / (K - 1)          (softmax over the K teachers, per sample)

  so a teacher that is more confident in the right class gets more weight and ``sum_k w_kn = 1``.
* **Weighted KD** (eq. 4): the per-sample, T^2-scaled KL of each teacher,
  ``KL_kn = T^2 * sum_c p_k,nc (log p_k,nc - log p_s,nc)`` with ``p = softmax(z / T)``, and

      L_kd = sum_{k,n} w_kn KL_kn / (N K)

  (the official reduction: a mean over teachers *and* samples, although the weights already sum
  to 1 over teachers; with equal weights this is ``1/K`` times the averaging baseline's value).
* **Intermediate term** (eq. 5-7): the student's last feature ``f_s`` goes through one embedding
  per teacher, ``e_k = ReLU(BN(Conv1x1_k(f_s)))``; teacher k's own head (global average pool +
  its final Linear) classifies ``e_k``; the same rule turns those cross-entropies into weights
  ``v_kn = (1 - softmax_k(CE(head_k(e_k,n), y_n))) / (K - 1)``, and

      L_feat = sum_{k,n} v_kn MSE_kn / (N K),   MSE_kn = mean over the elements of (e_k,n - f_k,n)^2

  ``v`` is NOT detached in the official code: gradients reach the embeddings and the student through
  the weights too. The term is left out in the first epoch.
* **Total** (official ``train_distill_multi_teacher``): ``1 * CE(z_s, y) + 1 * L_kd + 50 * L_feat``
  (``L_feat`` from the second epoch on), T = 4: :data:`DEFAULT_WEIGHTS`, :data:`DEFAULT_TEMPERATURE`.
* **Averaging baseline** (``AVERAGE_LOSS`` in that code): ``L_avg = (1/K) sum_k T^2 KL_k`` with each
  KL summed over classes and averaged over the batch ("batchmean"), i.e. Hinton KD averaged over
  teachers: :func:`average_kd`.

Conventions of the official implementation (github.com/Rorozhl/CA-MKD, commit acc8c2b, read with
the search tool; paraphrased, no code copied; line numbers counted in that copy):

=========================  ==================================================================================
convention                 official code
=========================  ==================================================================================
teacher CE                 ``CrossEntropyLoss(reduction='none')`` on raw teacher logits -> (N,) per teacher,
                           stacked to (K, N) (helper/loops.py l.221-223, CAMKD branch)
weights                    ``(1 - softmax(CE, dim=0)) / (K - 1)``: softmax over teachers of +CE, shape (K, N)
                           (helper/loops.py l.224; distiller_zoo/CAMKD.py l.24)
detach                     KD weights: teacher logits come from ``torch.no_grad()`` (loops.py l.189-194), so
                           constants. Feature weights: computed from the embedded student feature and
                           never detached (CAMKD.py l.21-24), so they carry gradients
KL per sample              ``KLDivLoss(reduction='none')(log_softmax(z_s/T), softmax(z_t/T)) * T^2`` summed
                           over classes -> (N,) (distiller_zoo/KD.py l.14-17, ``is_ca=True``)
weighted KD reduction      ``sum(w * KL) / (N * K)`` over the (K, N) grid (loops.py l.225-229)
averaging baseline         per teacher ``KLDivLoss(reduction='batchmean') * T^2`` (KD.py l.19), then the
                           mean over teachers (loops.py l.200-203)
feature layer              ``feat[-2]`` of the CIFAR nets: the last feature map right before the global
                           average pool, after the final ReLU (resnet, wrn ``forward``; loops.py l.288)
embedding                  ``Embed`` with ``convs=False`` (the default; scripts/run.sh passes no --convs):
                           Conv2d 1x1 (bias) -> BatchNorm2d -> ReLU, one per teacher, student channels ->
                           teacher channels; trained with the student (models/util.py ``Embed``,
                           ``CalWeight``; train_student.py ``trainable_list``)
spatial match              the student map is adaptive-average-pooled to the teacher's size when larger,
                           bilinearly interpolated when smaller (models/util.py ``CalWeight.forward``)
teacher head on student    ``distill_seq()[-1]`` of the teacher = avgpool + flatten + fc, applied to the
                           embedded student map (models/util.py ``CalWeight.forward``; models/resnet.py,
                           models/wrn.py ``distill_seq``)
feature weights            the same ``(1 - softmax_K(CE)) / (K - 1)`` rule on the head's CE with the labels
                           (CAMKD.py l.21-24)
MSE reduction              ``MSELoss(reduction='none')``, reshaped to (N, -1) and averaged per sample ->
                           (N,) per teacher, then ``sum(v * MSE) / (N * K)`` (CAMKD.py l.15, 27-32)
teacher features           taken under ``no_grad`` and detached (loops.py l.189-194)
first epoch                epochs count from 1; ``epoch == 1`` -> ``gamma*CE + alpha*KD`` only, later epochs add
                           ``beta * L_feat`` (loops.py l.304-307)
defaults                   ``--kd_T 4``; CA-MKD run: ``-r 1 -a 1 -b 50`` = CE 1, KD 1, feature 50
                           (train_student.py arguments; scripts/run.sh, CAMKD line); student CE is
                           ``CrossEntropyLoss()`` (mean over the batch)
=========================  ==================================================================================

Where kdforge differs, on purpose:

* Features may also be (N, D) vectors (the input of a classification head, e.g. a BERT classifier's
  pooled output); they are treated as (N, D, 1, 1) maps, so the embedding is Linear + BN + ReLU and
  the MSE averages over D. :func:`feature_site` gives the official site for kdforge's CIFAR nets
  (the input of ``pool``, head = pool + flatten + fc) and the head's input for any other classifier.
* The official ``CalWeight`` reassigns the resized student map inside its loop over teachers, so
  teacher k > 0 sees the map already resized for teacher k - 1. Here every teacher's resize starts
  from the student's own map (identical whenever the teachers' maps share a spatial size, as in
  all of the paper's CIFAR settings).
* ``relu=False`` on :class:`CAMKDLoss` drops the embedding's ReLU, for teacher features that can be
  negative (BERT's tanh-pooled output), which a ReLU output could never match. Default: official.
* The official loop skips the last, incomplete batch of an epoch; that is the data loader's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KDForgeError
from kdforge.models.heads import head_path

#: the official defaults: ``--kd_T 4``
DEFAULT_TEMPERATURE = 4.0
#: loss weights of the official CA-MKD run (``-r 1 -a 1 -b 50``): student CE, weighted KD, feature term
DEFAULT_WEIGHTS = {"ce": 1.0, "kd": 1.0, "feature": 50.0}
#: the first epoch (counted from 1, as ``Progress.epoch_number``) that includes the feature term
FEATURE_TERM_START_EPOCH = 2


def feature_term_active(epoch_number: int) -> bool:
    """Whether the intermediate term is on in epoch ``epoch_number`` (counted from 1): not in the first."""
    return epoch_number >= FEATURE_TERM_START_EPOCH


def _check_teachers(teacher_logits: Sequence[Tensor], labels: Tensor) -> int:
    k = len(teacher_logits)
    if k < 2:
        raise KDForgeError(f"CA-MKD needs at least 2 teachers (got {k}); list them under `teachers:` in the "
                           "config, or use hinton_kd for a single teacher")
    first = teacher_logits[0]
    if first.dim() != 2 or first.shape[-1] < 2:
        raise KDForgeError(f"CA-MKD needs (N, C) class logits with C >= 2 (got shape {tuple(first.shape)}); "
                           "it weighs teachers by their cross-entropy, so it needs a classification task")
    for i, logits in enumerate(teacher_logits):
        if logits.shape != first.shape:
            raise KDForgeError(f"teacher {i} gives logits of shape {tuple(logits.shape)}, teacher 0 "
                               f"{tuple(first.shape)}: all teachers under `teachers:` must share the label space")
    if labels.shape != (first.shape[0],) or labels.dtype.is_floating_point:
        raise KDForgeError(f"CA-MKD needs one integer class label per sample ({first.shape[0]}), got "
                           f"{labels.dtype} of shape {tuple(labels.shape)}")
    return k


def confidence_weights(logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """``(1 - softmax_k(CE_kn)) / (K - 1)`` of shape (K, N), from one (N, C) logits tensor per teacher.

    ``CE_kn`` is the unreduced cross-entropy of ``logits[k]`` with ``labels``; the softmax runs over
    the K teachers of each sample, so every column sums to 1. Gradients flow through ``logits``."""
    k = _check_teachers(logits, labels)
    ce = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits])
    return (1.0 - torch.softmax(ce, dim=0)) / (k - 1)


def camkd_teacher_weights(teacher_logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """CA-MKD's per-sample teacher weights for the KD term, shape (K, N), detached.

    ``w_kn = (1 - softmax_k(CE(z_k,n, y_n))) / (K - 1)``; each column sums to 1. The official code
    computes them from teacher logits taken under ``no_grad``, so they are constants."""
    return confidence_weights([z.detach() for z in teacher_logits], labels)


def per_sample_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` summed over classes, per sample: shape (N,).

    The teacher logits are detached."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature ** 2


def _check_student_logits(student_logits: Tensor, teacher_logits: Sequence[Tensor]) -> None:
    if teacher_logits and student_logits.shape != teacher_logits[0].shape:
        raise KDForgeError(f"student logits have shape {tuple(student_logits.shape)} but the teachers' "
                           f"{tuple(teacher_logits[0].shape)}: the student needs the teachers' label space")


def camkd_kd(student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor,
             temperature: float = DEFAULT_TEMPERATURE) -> tuple[Tensor, Tensor]:
    """CA-MKD's weighted KD: ``sum_{k,n} w_kn KL_kn / (N K)`` and the weights ``w`` (K, N).

    ``KL_kn`` is :func:`per_sample_kd`; ``w`` is :func:`camkd_teacher_weights`."""
    weights = camkd_teacher_weights(teacher_logits, labels)
    _check_student_logits(student_logits, teacher_logits)
    kl = torch.stack([per_sample_kd(student_logits, z, temperature) for z in teacher_logits])
    return (weights * kl).sum() / kl.numel(), weights


def average_kd(student_logits: Tensor, teacher_logits: Sequence[Tensor],
               temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """The averaging baseline: ``(1/K) sum_k mean_n KL_kn``, Hinton KD (T^2-scaled, summed over
    classes, averaged over the batch) averaged with equal weights over the K >= 1 teachers."""
    if not teacher_logits:
        raise KDForgeError("average_kd needs at least one teacher; list them under `teachers:` in the config")
    _check_student_logits(student_logits, teacher_logits)
    for i, z in enumerate(teacher_logits):
        if z.shape != student_logits.shape:
            raise KDForgeError(f"teacher {i} gives logits of shape {tuple(z.shape)}, the student "
                               f"{tuple(student_logits.shape)}: all models must share the label space")
    return torch.stack([per_sample_kd(student_logits, z, temperature).mean() for z in teacher_logits]).mean()


def camkd_feature(embedded: Sequence[Tensor], teacher_features: Sequence[Tensor], head_logits: Sequence[Tensor],
                  labels: Tensor) -> tuple[Tensor, Tensor]:
    """CA-MKD's intermediate term from already embedded student features: ``sum_{k,n} v_kn MSE_kn / (N K)``.

    ``embedded[k]``: the student feature through embedding k, shaped like ``teacher_features[k]``;
    ``head_logits[k]``: teacher k's head applied to ``embedded[k]``; ``v`` = :func:`confidence_weights`
    of those logits, not detached (as in the official code). ``MSE_kn`` averages the squared error
    over all elements of sample n. The teacher features are detached. Returns (loss, v)."""
    weights = confidence_weights(head_logits, labels)
    n, k = labels.shape[0], len(embedded)
    mse = torch.stack([(e - f.detach()).pow(2).reshape(n, -1).mean(-1)
                       for e, f in zip(embedded, teacher_features, strict=True)])
    return (weights * mse).sum() / (n * k), weights


class CAMKDEmbedding(nn.Module):
    """The official per-teacher embedding: Conv2d 1x1 (with bias) -> BatchNorm2d -> ReLU, from the
    student's channels to the teacher's. An (N, D) vector is embedded as an (N, D, 1, 1) map (the 1x1
    conv is then a Linear layer) and returned as an (N, D_teacher) vector."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return self.act(self.bn(self.conv(x[:, :, None, None])))[:, :, 0, 0]
        return self.act(self.bn(self.conv(x)))


def match_spatial(student_map: Tensor, size: tuple[int, int]) -> Tensor:
    """The official resize of the student's map to a teacher's (H, W): adaptive average pooling when
    the student's map is at least as tall, bilinear interpolation when it is smaller."""
    if tuple(student_map.shape[-2:]) == tuple(size):
        return student_map
    if student_map.shape[-2] >= size[0]:
        return F.adaptive_avg_pool2d(student_map, size)
    return F.interpolate(student_map, size=size, mode="bilinear", align_corners=False)


class CAMKDLoss(nn.Module):
    """CA-MKD's two distillation terms, unweighted; owns the per-teacher embeddings (train them
    with the student: their parameters belong in the student's optimizer).

    ``student_dim``: channels (or width) of the student feature; ``teacher_dims``: one per teacher.
    ``relu``: keep the official ReLU at the end of each embedding (turn off for teacher features
    that can be negative). ``detach_feature_weights``: stop gradients through the feature term's
    weights (the official code does not).

    Combine as ``w_ce * CE + w_kd * terms["kd"] + w_feat * terms["feature"]`` with
    :data:`DEFAULT_WEIGHTS`, passing ``with_feature_term=feature_term_active(progress.epoch_number)``.
    """

    def __init__(self, student_dim: int, teacher_dims: Sequence[int], temperature: float = DEFAULT_TEMPERATURE,
                 relu: bool = True, detach_feature_weights: bool = False):
        super().__init__()
        if len(teacher_dims) < 2:
            raise KDForgeError(f"CA-MKD needs at least 2 teachers (got {len(teacher_dims)}); list them under "
                               "`teachers:` in the config, or use hinton_kd for a single teacher")
        if temperature <= 0:
            raise KDForgeError(f"CA-MKD temperature must be > 0 (got {temperature})")
        self.student_dim = int(student_dim)
        self.teacher_dims = [int(d) for d in teacher_dims]
        self.temperature = float(temperature)
        self.detach_feature_weights = detach_feature_weights
        self.embeddings = nn.ModuleList(CAMKDEmbedding(self.student_dim, d, relu=relu) for d in self.teacher_dims)

    def _check_features(self, student_feature: Tensor, teacher_features: Sequence[Tensor],
                        teacher_heads: Sequence[Callable[[Tensor], Tensor]]) -> None:
        k = len(self.embeddings)
        if len(teacher_features) != k or len(teacher_heads) != k:
            raise KDForgeError(f"CA-MKD was built for {k} teachers but got {len(teacher_features)} teacher features "
                               f"and {len(teacher_heads)} heads; give one feature and one head per teacher")
        if student_feature.dim() not in (2, 4) or student_feature.shape[1] != self.student_dim:
            raise KDForgeError(f"CA-MKD expects a student feature (N, {self.student_dim}) or (N, {self.student_dim}, "
                               f"H, W), got {tuple(student_feature.shape)}; check the student's feature site")
        for i, (f, d) in enumerate(zip(teacher_features, self.teacher_dims, strict=True)):
            if f.dim() != student_feature.dim() or f.shape[1] != d:
                raise KDForgeError(f"teacher {i}'s feature has shape {tuple(f.shape)}, expected (N, {d}"
                                   f"{', H, W' if student_feature.dim() == 4 else ''}) like the student's; "
                                   "take student and teacher features at the same kind of site")

    def embed(self, student_feature: Tensor, teacher_features: Sequence[Tensor]) -> list[Tensor]:
        """The student feature through each teacher's embedding (maps resized to that teacher's first)."""
        out = []
        for emb, f_t in zip(self.embeddings, teacher_features, strict=True):
            f_s = student_feature if student_feature.dim() == 2 else match_spatial(student_feature, f_t.shape[-2:])
            out.append(emb(f_s))
        return out

    def forward(self, student_logits: Tensor, student_feature: Tensor | None, teacher_logits: Sequence[Tensor],
                teacher_features: Sequence[Tensor] | None, teacher_heads: Sequence[Callable[[Tensor], Tensor]] | None,
                labels: Tensor, with_feature_term: bool) -> dict[str, Tensor]:
        """``{"kd": L_kd, "feature": L_feat, "kd_weights": w (K, N)}``, plus ``"feature_weights"``
        (v, (K, N), detached for logging) when ``with_feature_term``; otherwise ``feature`` is a zero
        tensor and the feature arguments are not read (they may be None)."""
        k = len(self.embeddings)
        if len(teacher_logits) != k:
            raise KDForgeError(f"CA-MKD was built for {k} teachers but got logits from {len(teacher_logits)}")
        kd, kd_weights = camkd_kd(student_logits, teacher_logits, labels, self.temperature)
        terms = {"kd": kd, "kd_weights": kd_weights}
        if not with_feature_term:
            terms["feature"] = student_logits.new_zeros(())
            return terms
        if student_feature is None or teacher_features is None or teacher_heads is None:
            raise KDForgeError("CA-MKD's feature term needs the student feature, the teachers' features and heads")
        self._check_features(student_feature, teacher_features, teacher_heads)
        embedded = self.embed(student_feature, teacher_features)
        head_logits = [head(e) for head, e in zip(teacher_heads, embedded, strict=True)]
        if self.detach_feature_weights:
            head_logits = [z.detach() for z in head_logits]
        feature, weights = camkd_feature(embedded, teacher_features, head_logits, labels)
        terms["feature"] = feature
        terms["feature_weights"] = weights.detach()
        return terms


def feature_site(model: nn.Module, spatial: bool = False) -> tuple[str, Callable[[Tensor], Tensor]]:
    """Where to read a model's CA-MKD feature and the head that classifies it: ``(path, head)``.

    Read the feature as the *input* of module ``path`` (``ModelAdapter(..., input_paths=[path])``,
    ``outputs.features["input:" + path]``).

    * ``spatial=False``: the input of the classification head (:func:`kdforge.models.heads.head_path`:
      ``fc`` of the CIFAR nets, ``classifier`` of a BERT classifier), an (N, D) vector; head = that Linear.
    * ``spatial=True`` (the official site; kdforge's CIFAR nets, which have ``pool`` and ``fc``): the
      input of ``pool``, the (N, C, H, W) map after the last activation; head = pool -> flatten -> fc.
    """
    if spatial:
        pool, fc = getattr(model, "pool", None), getattr(model, "fc", None)
        if not isinstance(pool, nn.Module) or not isinstance(fc, nn.Linear):
            raise KDForgeError(f"{type(model).__name__} has no `pool` and `fc` modules, so it has no spatial "
                               "CA-MKD feature site; use the head's input (spatial: false)")

        def pooled_head(x: Tensor) -> Tensor:
            return fc(torch.flatten(pool(x), 1))

        return "pool", pooled_head
    path = head_path(model)
    return path, model.get_submodule(path)
