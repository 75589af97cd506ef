"""Is this run sane? A trivial baseline on the reported split, per-class scores and warnings.

* :func:`majority_baseline` scores the model that ignores its input, as the task's problem kind
  defines it (:meth:`kdforge.problems.Problem.baseline`): for classification the most frequent class
  of the *training* labels with the training class prior as its probability row (so its ECE is
  defined), for regression the training mean (its correlations reported as ``None``, "undefined");
  see :mod:`kdforge.problems.kinds`.
* :func:`per_class_report` gives precision, recall, F1 and support per class (scikit-learn's
  ``classification_report``), the confusion matrix and how often each class is predicted.
* :func:`sanity_warnings` turns those into one-line warnings: a model no better than the baseline,
  a model that predicts one class for every row, a main metric that is not a finite number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdforge.problems.base import finite
from kdforge.tasks.base import Scores, Task
from kdforge.tasks.validation import dataset_labels


def majority_baseline(task: Task, train_data: Dataset, eval_data: Dataset, ece_bins: int = 15) -> Scores | None:
    """The scores of the input-blind baseline of the task's problem kind on ``eval_data`` (the split the
    report shows), fitted to ``train_data``'s labels, calibrated with ``ece_bins`` bins
    (:meth:`kdforge.problems.Problem.baseline`). Classification: the majority class (the lowest class id
    on a tie) with the training prior as probabilities. Regression: the training mean for every row;
    correlation metrics are ``None`` (undefined for a constant), ``ece``/``reliability`` are ``None``.
    ``None`` for a kind without a baseline (language modelling)."""
    problem = task.problem
    if problem.baseline_name is None:
        return None
    train_labels = dataset_labels(train_data)
    eval_labels = dataset_labels(eval_data)
    if train_labels.size == 0 or eval_labels.size == 0:
        raise ValueError("majority_baseline needs at least one training and one evaluation row")
    return problem.baseline(task.compute_metrics, train_labels, eval_labels, task.num_labels, ece_bins)


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
        if value is not None and not finite(value):
            lines.append(f"{name}: {main_metric} is {value}, not a number — training diverged or the metric is "
                         "undefined; lower train.lr or check the data")
        elif value is not None and baseline_main is not None and finite(baseline_main):
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
