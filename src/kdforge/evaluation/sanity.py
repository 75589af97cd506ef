"""Is this run sane? A trivial baseline on the reported split, per-class scores and warnings.

* :func:`majority_baseline` scores the model that ignores its input: for classification it always
  predicts the most frequent class of the *training* labels, with the training class prior
  ``pi_c = n_c / n`` as its probability row for every example, so its ECE is defined (Guo et al.,
  2017, see :mod:`kdforge.evaluation.calibration`): every row has confidence ``max_c pi_c`` and is
  right exactly when its label is the majority class ``a``, so all rows fall in one bin and

      accuracy = mean_i 1[y_i == a],      ECE = |accuracy - max_c pi_c|.

  For regression it predicts the training mean ``mean_i y_i`` for every row. A constant prediction
  has no correlation with anything (Pearson ``cov(p, y) / (std(p) std(y))`` divides by
  ``std(p) = 0``), so the baseline's ``pearson``/``spearman`` (and any metric that comes out
  non-finite) are reported as ``None`` ("undefined"), never NaN and without warnings.
  (:mod:`kdforge.tasks.metrics` scores a *model's* constant predictions as 0.0 correlation instead,
  so that best-epoch comparisons work; a caller that wants a correlation floor for a model can
  compare against 0.0.)
* :func:`per_class_report` gives precision, recall, F1 and support per class (scikit-learn's
  ``classification_report``), the confusion matrix and how often each class is predicted.
* :func:`sanity_warnings` turns those into one-line warnings: a model no better than the baseline,
  a model that predicts one class for every row, a main metric that is not a finite number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdforge.evaluation.calibration import reliability_bins
from kdforge.tasks.base import Scores, Task
from kdforge.tasks.validation import dataset_labels

#: metrics that are correlations, undefined for a constant prediction
CORRELATION_METRICS = frozenset({"pearson", "spearman"})


def majority_baseline(task: Task, train_data: Dataset, eval_data: Dataset, ece_bins: int = 15) -> Scores | None:
    """The scores of the input-blind baseline on ``eval_data`` (the split the report shows).

    Classification: the majority class of ``train_data``'s labels (the lowest class id on a tie), with
    the training prior as probabilities: ``metrics`` from ``task.compute_metrics(log(prior) rows)``,
    ``ece`` and ``reliability`` from :func:`reliability_bins` of the prior rows with ``ece_bins`` bins.
    Regression: the training mean for every row; correlation metrics are ``None`` (undefined for a
    constant), ``ece``/``reliability`` are ``None``. Language modelling: ``None`` (not applicable)."""
    if task.problem_type == "language_modeling":
        return None
    train_labels = dataset_labels(train_data)
    eval_labels = dataset_labels(eval_data)
    if train_labels.size == 0 or eval_labels.size == 0:
        raise ValueError("majority_baseline needs at least one training and one evaluation row")
    n = len(eval_labels)
    if task.problem_type == "regression":
        predictions = np.full(n, float(np.mean(train_labels.astype(np.float64))))
        return Scores(_quiet_metrics(task, predictions, eval_labels))

    classes = task.num_labels
    counts = np.bincount(train_labels.astype(np.int64), minlength=classes)
    if len(counts) > classes:
        raise ValueError(f"training label {len(counts) - 1} is outside the task's {classes} classes")
    prior = counts / counts.sum()
    probs = np.tile(prior, (n, 1))
    with np.errstate(divide="ignore"):  # log(0) = -inf for classes absent from training: never predicted
        logits = np.log(probs)
    metrics = _quiet_metrics(task, logits, eval_labels)
    bins = reliability_bins(probs, eval_labels.astype(np.int64), ece_bins)
    return Scores(metrics, bins["ece"], bins)


def _quiet_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """``task.compute_metrics`` of a constant prediction, warnings silenced; correlations and
    non-finite values become ``None``."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        metrics = task.compute_metrics(predictions, labels)
    constant = task.problem_type == "regression"
    return {name: None if (constant and name in CORRELATION_METRICS) or not _finite(value) else float(value)
            for name, value in metrics.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def per_class_report(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """Per-class scores of the argmax predictions of ``logits`` (N, C) against ``labels`` (N,).

    Returns plain JSON values::

        {"labels": [C names], "n_rows": N, "accuracy": float,
         "per_class": {name: {"precision", "recall", "f1", "support"}},
         "macro_avg": {...}, "weighted_avg": {...},      # same four keys
         "confusion_matrix": [[C ints] x C],             # rows: true class, columns: predicted class
         "predicted_counts": [C ints]}                    # rows predicted as each class

    Precision, recall and F1 are scikit-learn's ``classification_report`` over the classes
    ``0..C-1`` with ``zero_division=0`` (a class never predicted has precision 0, not a warning);
    its ``f1-score`` is renamed ``f1``."""
    from sklearn.metrics import classification_report, confusion_matrix

    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    classes = len(label_names)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] != classes:
        raise ValueError(f"logits must be (N, {classes}) for {classes} label names, got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {labels.shape}")
    if len(set(label_names)) != classes:
        raise ValueError(f"label names must be distinct, got {label_names}")
    ids = list(range(classes))
    predictions = logits.argmax(axis=1)
    table = classification_report(labels, predictions, labels=ids, output_dict=True, zero_division=0)

    def scores(entry: Mapping[str, Any]) -> dict[str, float | int]:
        return {"precision": float(entry["precision"]), "recall": float(entry["recall"]),
                "f1": float(entry["f1-score"]), "support": int(entry["support"])}

    return {
        "labels": [str(name) for name in label_names],
        "n_rows": int(len(labels)),
        "accuracy": float(np.mean(predictions == labels)),
        "per_class": {str(name): scores(table[str(i)]) for i, name in enumerate(label_names)},
        "macro_avg": scores(table["macro avg"]),
        "weighted_avg": scores(table["weighted avg"]),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).astype(int).tolist(),
        "predicted_counts": np.bincount(predictions, minlength=classes).astype(int).tolist(),
    }


def _main_value(report: Any, metric: str) -> Any:
    """The ``metric`` of a report: a ``ModelReport`` (or its ``to_dict()``) or a plain metrics dict."""
    metrics = report.get("metrics", report) if isinstance(report, Mapping) else getattr(report, "metrics", {})
    return metrics.get(metric)


def sanity_warnings(reports: dict[str, dict], baseline_main: float | None, main_metric: str, greater_is_better: bool,
                    predicted_counts: dict[str, list[int]] | None, *, split: str | None = None,
                    label_names: Sequence[str] | None = None) -> list[str]:
    """One line per problem found, for every model named in ``reports`` (then ``predicted_counts``).

    ``reports``: model name -> ``ModelReport.to_dict()`` (its ``metrics`` are read) or a plain metrics
    dict. ``baseline_main``: the baseline's ``main_metric`` (:func:`majority_baseline`), or ``None``
    to skip that check. ``predicted_counts``: model name -> rows predicted per class
    (``per_class_report(...)["predicted_counts"]``). ``split`` names the split in the message and
    ``label_names`` the class (else its id). The problems:

    * the main metric is NaN or infinite: ``"student: accuracy is nan, not a number — ..."``;
    * no better than the baseline (``value <= baseline`` when greater is better, ``>=`` otherwise):
      ``"teacher: accuracy 0.6838 is no better than the majority-class baseline 0.6838 on dev — ..."``;
    * one class predicted for every row (2+ classes): ``"teacher predicts `1` for all 408 rows on dev"``.
    A model whose main metric is missing (or ``None``) is only checked for the one-class problem."""
    lines: list[str] = []
    counts = predicted_counts or {}
    where = f" on {split}" if split else ""
    for name in [*reports, *(n for n in counts if n not in reports)]:
        value = _main_value(reports[name], main_metric) if name in reports else None
        if value is not None and not _finite(value):
            lines.append(f"{name}: {main_metric} is {value}, not a number — training diverged or the metric is "
                         "undefined; lower train.lr or check the data")
        elif value is not None and baseline_main is not None and _finite(baseline_main):
            worse = value <= baseline_main if greater_is_better else value >= baseline_main
            if worse:
                lines.append(f"{name}: {main_metric} {value:.4f} is no better than the majority-class baseline "
                             f"{baseline_main:.4f}{where} — it has not learned the task; train longer or check "
                             "the data")
        per_class = [int(c) for c in counts.get(name) or []]
        used = [i for i, c in enumerate(per_class) if c > 0]
        if len(per_class) >= 2 and len(used) == 1:
            i = used[0]
            label = label_names[i] if label_names is not None and i < len(label_names) else str(i)
            lines.append(f"{name} predicts `{label}` for all {per_class[i]} rows{where}")
    return lines
