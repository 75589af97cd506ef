"""The problem kinds kdforge ships: classification, regression and causal language modelling."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdforge.errors import KDForgeError
from kdforge.problems.base import PROBLEMS, MetricsFn, Problem, Scores, quiet_metrics
from kdforge.problems.calibration import reliability_bins, softmax

IGNORE = -100
"""Label of the positions that predict nothing (padding of a language model's batch)."""

CORRELATION_METRICS = frozenset({"pearson", "spearman"})
"""Metrics that are correlations, undefined for a constant prediction."""


def _one_per_row(predictions: np.ndarray, kind: str) -> np.ndarray:
    if predictions.ndim != 1:
        raise ValueError(f"predictions of shape {predictions.shape} do not fit a {kind} task")
    return predictions


@PROBLEMS.register("classification")
class Classification(Problem):
    """One of C exclusive classes per row: logits (N, C), labels class ids (N,).

    Trivial baseline ("majority class"): the model that ignores its input, always predicting the most
    frequent class ``a`` of the *training* labels (the lowest id on a tie) with the training prior
    ``pi_c = n_c / n`` as its probability row, so its ECE is defined (Guo et al., 2017, see
    :mod:`kdforge.problems.calibration`): every row has confidence ``max_c pi_c`` and is right exactly
    when its label is ``a``, so all rows fall in one bin and

        accuracy = mean_i 1[y_i == a],      ECE = |accuracy - max_c pi_c|.
    """

    objective = "ce"
    classes = True
    baseline_name = "majority class"
    hf_problem_type = "single_label_classification"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy ``-mean_i log softmax(z_i)[y_i]``."""
        return F.cross_entropy(logits.float(), labels)

    def metric_inputs(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class ids: the argmax of (N, C) logits (1-D predictions are taken as class ids)."""
        predictions = np.asarray(logits)
        if predictions.ndim == 2:
            predictions = predictions.argmax(axis=-1)
        return _one_per_row(predictions, self.name), np.asarray(labels).reshape(-1)

    def calibration(self, logits: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, Any]:
        """Reliability bins of the softmax of the logits, computed in float64."""
        return reliability_bins(softmax(np.asarray(logits).astype(np.float64)), labels, n_bins)

    def baseline(self, compute_metrics: MetricsFn, train_labels: np.ndarray, eval_labels: np.ndarray,
                 num_labels: int, n_bins: int) -> Scores:
        """Metrics from ``compute_metrics(log(prior) rows)``; ECE and bins of the prior rows."""
        counts = np.bincount(train_labels.astype(np.int64), minlength=num_labels)
        if len(counts) > num_labels:
            raise ValueError(f"training label {len(counts) - 1} is outside the task's {num_labels} classes")
        prior = counts / counts.sum()
        probs = np.tile(prior, (len(eval_labels), 1))
        with np.errstate(divide="ignore"):  # log(0) = -inf for classes absent from training: never predicted
            logits = np.log(probs)
        metrics = quiet_metrics(compute_metrics, logits, eval_labels)
        bins = reliability_bins(probs, eval_labels.astype(np.int64), n_bins)
        return Scores(metrics, bins["ece"], bins)


@PROBLEMS.register("regression")
class Regression(Problem):
    """One real-valued score per row: logits (N, 1), labels floats (N,); no calibration.

    Trivial baseline ("training mean"): the training mean ``mean_i y_i`` for every row. A constant
    prediction has no correlation with anything (Pearson ``cov(p, y) / (std(p) std(y))`` divides by
    ``std(p) = 0``), so the baseline's ``pearson``/``spearman`` (and any metric that comes out
    non-finite) are ``None`` ("undefined"), never NaN and without warnings. (:mod:`kdforge.tasks.metrics`
    scores a *model's* constant predictions as 0.0 correlation instead, so that best-epoch comparisons
    work.)"""

    objective = "mse"
    label_dtype = torch.float
    metrics = ("pearson", "spearman")
    baseline_name = "training mean"
    hf_problem_type = "regression"

    def num_outputs(self, label_names: list[str]) -> int:
        return 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean squared error ``mean_i (z_i - y_i)^2`` of the single output."""
        return F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1))

    def metric_inputs(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores: (N,) or the column of (N, 1)."""
        predictions = np.asarray(logits)
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        return _one_per_row(predictions, self.name), np.asarray(labels).reshape(-1)

    def baseline(self, compute_metrics: MetricsFn, train_labels: np.ndarray, eval_labels: np.ndarray,
                 num_labels: int, n_bins: int) -> Scores:
        predictions = np.full(len(eval_labels), float(np.mean(train_labels.astype(np.float64))))
        return Scores(quiet_metrics(compute_metrics, predictions, eval_labels, CORRELATION_METRICS))


def next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (M, V) logits that predict a token and their (M,) targets: position j against label j + 1,
    positions whose target is -100 dropped."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise KDForgeError(f"next-token prediction needs logits (batch, length, vocab) and labels (batch, length), "
                           f"got {tuple(logits.shape)} and {tuple(labels.shape)}; use a causal LM with task `lm`")
    rows = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    keep = targets != IGNORE
    return rows[keep], targets[keep]


@PROBLEMS.register("language_modeling")
class LanguageModelling(Problem):
    """Next-token prediction: logits (N, L, V), labels the input ids (N, L) with padding -100; position j
    predicts token j + 1 (:func:`next_token_targets`). Scored batch by batch (``streamed``); no trivial
    baseline. The task (``kdforge.tasks.language_model``) computes its metrics and token-level ECE."""

    objective = "next_token_ce"
    metrics = ("perplexity", "cross_entropy", "accuracy")
    causal_lm = True
    streamed = True
    pipeline_tag = "text-generation"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next tokens, ``-1/M sum_j log p(x_{j+1} | x_{<=j})``."""
        rows, targets = next_token_targets(logits, labels)
        return F.cross_entropy(rows.float(), targets)
