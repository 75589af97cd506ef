"""The Problem contract: what one kind of problem (classification, regression, ...) knows, whatever the
data and the model.

A :class:`Problem` is registered by name in :data:`PROBLEMS`; a task names its kind in
``Task.problem_type`` and hands out the object as ``task.problem``. Everything that depends on the
kind asks that object (its loss, the predictions its metrics score, its calibration, its trivial
baseline, what it requires of a model) instead of comparing the name. This package sits below
``tasks/`` and ``evaluation/``: it imports neither.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdforge.errors import KDForgeError
from kdforge.registry import Registry

MetricsFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]
"""A task's ``compute_metrics(predictions, labels)``."""


@dataclass
class Scores:
    """A model's scores on an evaluation split: official metrics, expected calibration error and
    the reliability-diagram bins (both None where the problem has no calibration, e.g. regression)."""

    metrics: dict[str, float]
    ece: float | None = None
    reliability: dict | None = None


class Problem:
    """One kind of problem. The defaults describe a model with one output per label and no calibration;
    a kind overrides what differs. Instances hold no state (``task.problem`` makes a fresh one)."""

    name: str = ""
    """The registered name (``Task.problem_type``), set by :data:`PROBLEMS`."""
    objective: str | None = None
    """The registered objective that trains a model on the labels alone (a teacher's fine-tuning)."""
    label_dtype: torch.dtype = torch.long
    """dtype of a batch's ``labels``."""
    metrics: tuple[str, ...] = ("accuracy",)
    """Default official metrics of a task of this kind (the first is the main one)."""
    classes: bool = False
    """Labels are ids of exclusive classes and the logits one softmax over them: soft targets, black-box
    teachers, PTP, per-class scores and a stratified validation split need this."""
    causal_lm: bool = False
    """The model is a causal language model scored on its next tokens (no classification head)."""
    streamed: bool = False
    """A split's predictions are too many to gather (a language model's tokens): the task scores a model
    batch by batch (``Task.evaluate``) instead of from the split's logits."""
    baseline_name: str | None = None
    """What the trivial baseline of :meth:`baseline` is called in reports; None: no baseline."""
    hf_problem_type: str | None = None
    """``config.problem_type`` of a transformers sequence-classification model for this kind."""
    pipeline_tag: str | None = None
    """Hugging Face pipeline tag of a model card; None: classification of the task's modality."""

    def num_outputs(self, label_names: list[str]) -> int:
        """Outputs of the model's head for a task with these label names."""
        return len(label_names)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss of a batch (its mean), in float32."""
        raise KDForgeError(f"problem kind {self.name!r} has no task loss")

    def metric_inputs(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The split's logits and labels as the metric functions take them (predictions, labels).
        Raises ValueError when the logits do not fit this kind."""
        return np.asarray(logits), np.asarray(labels)

    def calibration(self, logits: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, Any] | None:
        """The reliability bins (with their ``ece``, :mod:`kdforge.problems.calibration`) of a split's
        logits, or None where calibration is not defined."""
        return None

    def baseline(self, compute_metrics: MetricsFn, train_labels: np.ndarray, eval_labels: np.ndarray,
                 num_labels: int, n_bins: int) -> Scores | None:
        """The scores on ``eval_labels`` of the input-blind model fitted to ``train_labels`` (both
        non-empty), named :attr:`baseline_name`; None where there is none."""
        return None


class ProblemRegistry(Registry[type[Problem]]):
    """:class:`Registry` of problem classes; registering sets the class's ``name``."""

    def register(self, name: str) -> Callable[[type[Problem]], type[Problem]]:
        add = super().register(name)

        def named(cls: type[Problem]) -> type[Problem]:
            cls.name = name
            return add(cls)

        return named


PROBLEMS = ProblemRegistry("problem kind")
"""Problem kind name -> class, filled by :mod:`kdforge.problems.kinds` (and by whoever adds a kind)."""


def finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def quiet_metrics(compute_metrics: MetricsFn, predictions: np.ndarray, labels: np.ndarray,
                  undefined: Collection[str] = ()) -> dict[str, float | None]:
    """``compute_metrics`` of a constant prediction, warnings silenced; the ``undefined`` metrics and
    non-finite values become ``None``."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        metrics = compute_metrics(predictions, labels)
    return {name: None if name in undefined or not finite(value) else float(value)
            for name, value in metrics.items()}
