"""Weighted ensemble of teacher assistants: Ganta, Das Gupta & Sheng, "Knowledge Distillation via
Weighted Ensemble of Teaching Assistants" (ICKG 2021; arXiv 2206.12005, 2022).

Several assistants of decreasing size are each distilled from the teacher; the student then learns
from one target, their weighted ensemble. For K assistants with logits z_1..z_K and weights w on the
simplex (w_k >= 0, sum_k w_k = 1):

    p_ens(T) = sum_k w_k softmax(z_k / T)                                  (ensemble_probs)

The weights are found by differential evolution (DE) so that the ensemble scores best on a validation
split (fit_ensemble_weights): DE searches raw weights in [0, 1]^K, each candidate is L1-normalised
to the simplex (w / sum(w); all zeros -> uniform), and DE maximises score(p_ens, labels), by default
the accuracy of argmax p_ens. This is the weighted-average-ensemble recipe the paper builds on
(bounds [0, 1] per member, L1 normalisation, objective 1 - accuracy); the paper's full text was not
retrievable here, so the bounds, normalisation and objective follow that recipe, not a quoted line.

The student's KD term reads the ensemble as teacher logits (ensemble_logits): T log p_ens(T). Any
Hinton-KD term at the same temperature then sees exactly the ensemble distribution, because for a
distribution p (sum_c p_c = 1)

    softmax(T log p / T)_c = exp(log p_c) / sum_j exp(log p_j) = p_c / sum_j p_j = p_c.

The identity holds at the temperature T the logits were built with only: at another temperature T'
the KD term would see p^(T/T') renormalised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from scipy.optimize import differential_evolution
from torch import nn

from kdforge.engine.predict import predict
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.offline import OfflineStep, stage_parts
from kdforge.recipes.teacher_sources import bound_temperature

log = logging.getLogger("kdforge")

Score = Callable[[np.ndarray, np.ndarray], float]

# Relative slack allowed on sum(w) = 1 for weights given by hand (e.g. rounded in a config file).
_SUM_TOLERANCE = 1e-3


def accuracy_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label (the default DE objective)."""
    return float((probs.argmax(-1) == labels).mean())


def normalise_weights(raw: np.ndarray) -> np.ndarray:
    """raw / sum(raw) for raw >= 0; the uniform weights when every raw weight is 0."""
    raw = np.clip(np.asarray(raw, dtype=np.float64), 0.0, None)
    total = raw.sum()
    if total <= 0.0:
        return np.full(raw.shape, 1.0 / raw.size)
    return raw / total


def _check_logits(logits: Sequence[torch.Tensor]) -> None:
    if len(logits) == 0:
        raise KDForgeError("the assistant ensemble needs at least one assistant; list the assistants' roles "
                           "under the stage's `assistants`")
    shape = tuple(logits[0].shape)
    if len(shape) != 2 or shape[-1] < 2:
        raise KDForgeError(f"assistant logits must be (N, C) class logits with C >= 2, got shape {shape}; "
                           "the weighted assistant ensemble is for classification tasks")
    for k, z in enumerate(logits):
        if tuple(z.shape) != shape:
            raise KDForgeError(f"assistant {k} gives logits of shape {tuple(z.shape)} but assistant 0 gives "
                               f"{shape}; every assistant must score the same examples over the same labels")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise KDForgeError(f"ensemble temperature must be > 0, got {temperature}; set the KD term's `temperature`")


def _weights_tensor(weights: Sequence[float] | torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != k:
        raise KDForgeError(f"{w.numel()} ensemble weights for {k} assistants; give one weight per assistant")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise KDForgeError(f"ensemble weights must be finite and >= 0, got {w.tolist()}; "
                           "use the weights that fit_ensemble_weights returns")
    total = float(w.sum())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise KDForgeError(f"ensemble weights must sum to 1, got sum {total:.6g} ({w.tolist()}); "
                           "normalise them or use the weights that fit_ensemble_weights returns")
    return w / w.sum()


def _member_log_probs(logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """(K, N, C) log softmax(z_k / T), computed in at least float32 (caches may hold float16)."""
    dtype = torch.float64 if any(z.dtype == torch.float64 for z in logits) else torch.float32
    return torch.stack([F.log_softmax(z.to(dtype) / temperature, dim=-1) for z in logits])


def ensemble_probs(logits: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """p_ens = sum_k w_k softmax(z_k / T), shape (N, C); rows sum to 1.

    ``logits``: K tensors (N, C), one per assistant. ``weights``: K values >= 0 summing to 1 (within
    1e-3, then renormalised exactly). Computed in float32 (float64 if any input is float64)."""
    _check_logits(logits)
    _check_temperature(temperature)
    log_p = _member_log_probs(logits, temperature)
    w = _weights_tensor(weights, len(logits), log_p)
    return torch.einsum("k,knc->nc", w, log_p.exp())


def ensemble_logits(logits: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """T log p_ens: teacher logits whose softmax at temperature T is exactly the ensemble p_ens.

    softmax(T log p / T) = p / sum(p) = p since p sums to 1 (see the module docstring). log p_ens is
    computed as logsumexp_k(log w_k + log softmax(z_k / T)), finite for finite logits even where a
    member's probability underflows (a zero weight contributes log 0 = -inf, which logsumexp drops)."""
    _check_logits(logits)
    _check_temperature(temperature)
    log_p = _member_log_probs(logits, temperature)
    w = _weights_tensor(weights, len(logits), log_p)
    log_ens = torch.logsumexp(torch.log(w)[:, None, None] + log_p, dim=0)
    return temperature * log_ens


def _member_probs_numpy(logits: Sequence[np.ndarray | torch.Tensor], temperature: float) -> np.ndarray:
    tensors = [torch.as_tensor(np.asarray(z) if not torch.is_tensor(z) else z).detach().cpu().to(torch.float64)
               for z in logits]
    _check_logits(tensors)
    _check_temperature(temperature)
    return _member_log_probs(tensors, temperature).exp().numpy()


def _labels_numpy(labels: np.ndarray | torch.Tensor | Sequence[int], n: int, n_classes: int) -> np.ndarray:
    y = (labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)).reshape(-1)
    if y.shape[0] != n:
        raise KDForgeError(f"{y.shape[0]} validation labels for {n} assistant predictions; the assistants "
                           "must be run over the same validation split the labels come from")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise KDForgeError(f"validation labels must lie in [0, {n_classes}), found {y.min()}..{y.max()}; "
                           "check the task's label column")
    return y.astype(np.int64)


def ensemble_score(logits: Sequence[np.ndarray | torch.Tensor], labels: np.ndarray | torch.Tensor,
                   weights: Sequence[float] | np.ndarray, score: Score | None = None,
                   temperature: float = 1.0) -> float:
    """score(sum_k w_k softmax(z_k / T), labels) for the given weights (default score: accuracy).

    Reports e.g. the uniform weights' or a single assistant's validation score next to the DE weights'."""
    probs = _member_probs_numpy(logits, temperature)
    y = _labels_numpy(labels, probs.shape[1], probs.shape[2])
    w = _weights_tensor(np.asarray(weights, dtype=np.float64), probs.shape[0], torch.zeros((), dtype=torch.float64))
    return float((score or accuracy_score)(np.tensordot(w.numpy(), probs, axes=1), y))


def fit_ensemble_weights(logits: Sequence[np.ndarray | torch.Tensor], labels: np.ndarray | torch.Tensor,
                         score: Score | None = None, temperature: float = 1.0, seed: int = 0,
                         maxiter: int = 50) -> np.ndarray:
    """Ensemble weights w (K,), w >= 0, sum w = 1, maximising score(sum_k w_k softmax(z_k / T), labels).

    ``logits``: K arrays (N, C), the assistants' logits on a validation split (not the reported split);
    ``labels`` (N,). ``score(probs (N, C), labels (N,)) -> float``, larger is better; default: accuracy
    of the argmax (the paper's criterion). ``temperature``: 1 scores the assistants' ordinary
    predictions; pass the KD term's T to select the weights on the very distribution the student reads
    (argmax of a weighted sum of softmaxes depends on T).

    Differential evolution (scipy, strategy best1bin, mutation (0.5, 1), recombination 0.7) over raw
    weights in [0, 1]^K, each candidate L1-normalised (all zeros -> uniform), minimising -score.
    Population: max(5, 15 K) members; the first are the uniform weights and the K one-hot weights (each
    assistant alone), the rest uniform random in [0, 1]^K from ``seed``. DE's selection is greedy (a
    member is only replaced by a better trial), so the result never scores below the uniform ensemble
    or the best single assistant on this split. ``polish`` is off: accuracy is piecewise constant, so a
    gradient polish (L-BFGS-B) cannot improve it. ``tol`` 1e-7 (stop once the population's scores
    agree), ``workers`` 1 and the seeded generator make the result deterministic for a seed.
    """
    probs = _member_probs_numpy(logits, temperature)  # (K, N, C)
    k = probs.shape[0]
    y = _labels_numpy(labels, probs.shape[1], probs.shape[2])
    if y.size == 0:
        raise KDForgeError("the validation split is empty; ensemble weights need validation examples "
                           "(set `task.validation`)")
    if maxiter < 1:
        raise KDForgeError(f"maxiter must be >= 1, got {maxiter}")
    metric = score or accuracy_score
    if k == 1:
        return np.ones(1)

    def objective(raw: np.ndarray) -> float:
        return -float(metric(np.tensordot(normalise_weights(raw), probs, axes=1), y))

    rng = np.random.default_rng(seed)
    size = max(5, 15 * k)
    init = np.vstack([np.full((1, k), 0.5), np.eye(k), rng.uniform(0.0, 1.0, size=(size - 1 - k, k))])
    result = differential_evolution(objective, bounds=[(0.0, 1.0)] * k, init=init, maxiter=maxiter, tol=1e-7,
                                    polish=False, workers=1, updating="immediate", rng=rng)
    return normalise_weights(result.x)


# ----------------------------------------------------------------------------------- the strategy


class EnsembleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    maxiter: PositiveInt = Field(50, description="differential evolution generations")


class EnsembleTeacher(nn.Module):
    """A teacher role whose logits are T log p_ens of its members' outputs (see the module docstring)."""

    def __init__(self, members: dict[str, nn.Module], weights: Sequence[float], temperature: float):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))
        self.temperature = temperature

    def forward(self, batch: dict) -> Outputs:
        logits = [member(batch).logits for member in self.members.values()]
        return Outputs(logits=ensemble_logits(logits, self.weights, self.temperature))


@STRATEGIES.register("assistant_ensemble")
class AssistantEnsemble(Strategy):
    """``strategy: {name: assistant_ensemble}``: the stage's teachers (assistants, and the teacher if
    listed) combined into one role, ``ensemble``, with weights fitted by differential evolution on the
    validation split (``task.validation``; the reported split when there is none, with a warning). The
    stage's teacher-reading terms learn from ``ensemble`` at their temperature (one shared value)."""

    Params = EnsembleParams
    ROLE = "ensemble"
    teacher_count = (2, None)
    needs = frozenset({"labels"})  # the weights are fitted on the labels of the selection split

    def term_roles(self, config, stage) -> list[str]:
        return [self.ROLE]  # the stage's terms learn from the ensemble

    def build(self, ctx: StageContext) -> OfflineStep:
        loss = ctx.loss([self.ROLE])
        temperature = bound_temperature(loss, self.ROLE)
        members = list(ctx.teachers)
        split, data = ctx.data.selection_split, ctx.data.selection
        if ctx.task is not None and split == ctx.task.eval_split:
            log.warning("assistant_ensemble: no validation split (task.validation), so the ensemble weights are "
                        "chosen on the reported split %s and its score is optimistic", split)
        logits, labels = [], None
        for role in members:
            teacher = ctx.teachers[role]
            z, labels = predict(ModelAdapter(teacher.model), data, ctx.data.collator(teacher.tokenizer),
                                ctx.config.eval.batch_size, ctx.device, f"{role} on {split}")
            logits.append(z)
        p = self.params
        weights = fit_ensemble_weights(logits, labels, temperature=temperature, seed=p.seed, maxiter=p.maxiter)
        uniform = ensemble_score(logits, labels, np.full(len(members), 1 / len(members)), temperature=temperature)
        best = ensemble_score(logits, labels, weights, temperature=temperature)
        log.info("assistant_ensemble on %s: weights %s (accuracy %.4f; uniform %.4f; alone: %s)", split,
                 ", ".join(f"{r} {w:.3f}" for r, w in zip(members, weights, strict=True)), best, uniform,
                 ", ".join(f"{r} {ensemble_score([z], labels, [1.0], temperature=temperature):.4f}"
                           for r, z in zip(members, logits, strict=True)))
        parts = stage_parts(ctx, loss, setup_teachers={self.ROLE: ctx.teachers[members[-1]].model}, roles=members,
                            temperatures=dict.fromkeys(members, temperature))  # the members are read at T
        ensemble = EnsembleTeacher(parts.teachers, weights.tolist(), temperature)
        return OfflineStep(parts.learner, parts.loss, {self.ROLE: ensemble})
