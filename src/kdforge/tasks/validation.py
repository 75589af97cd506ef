"""A validation split that is not the reported split (``task.validation``).

Choosing the best epoch (or ensemble weights, architectures) on the split that the report shows
lets the choice fit that split's noise, so the reported score is optimistically biased; the usual
remedy is a held-out validation set drawn from the training data (Hastie, Tibshirani & Friedman,
*The Elements of Statistical Learning*, 2nd ed., sec. 7.2: train / validation / test).

``task.validation`` is either

* a fraction ``f`` in (0, 1): of the ``n`` training rows in use (after ``task.train_limit``
  sampling), ``ceil(f * n)`` rows become the validation split and are removed from ``train``.
  The rows are drawn by ``sklearn.model_selection.train_test_split`` with ``random_state =
  task.sample_seed``, stratified by label for classification when stratification is possible (every
  class has at least 2 rows and both parts have at least one row per class), else uniformly; or
* a file in the task's training-file format, read whole; the training rows are then unchanged.

This module holds the parts that do not depend on a task: the carving, the labels of a dataset and
where a validation file lives. :class:`kdforge.tasks.base.Task` wires them into ``split``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError

log = logging.getLogger(__name__)

SPLIT = "validation"
"""The name under which ``Task.split`` serves the validation rows."""


def validation_size(fraction: float, rows: int) -> int:
    """``ceil(fraction * rows)`` validation rows (as scikit-learn rounds ``test_size``), robust to
    floating-point error (0.1 * 30 is 3.0000000000000004, which must give 3, not 4)."""
    return math.ceil(round(fraction * rows, 9))


def dataset_labels(data: Dataset) -> np.ndarray:
    """The label of every row of ``data``, in order. Reads the label array of an image dataset (and of
    subsets of it) without touching the images; other datasets are indexed row by row."""
    if isinstance(data, Subset):
        return dataset_labels(data.dataset)[np.asarray(data.indices, dtype=np.int64)]
    labels = getattr(data, "labels", None)
    if isinstance(labels, np.ndarray) and len(labels) == len(data):
        return labels
    examples = getattr(data, "examples", None)
    rows = examples if isinstance(examples, list) else (data[i] for i in range(len(data)))
    return np.asarray([row["label"] for row in rows])


def _stratifiable(labels: np.ndarray, n_validation: int, n_train: int) -> bool:
    """scikit-learn's stratified split needs 2+ rows per class and one row per class in each part."""
    counts = np.unique(labels, return_counts=True)[1]
    return counts.min() >= 2 and min(n_validation, n_train) >= len(counts)


def carve_indices(n_rows: int, fraction: float, seed: int,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices ``(train, validation)`` of a reproducible split of ``n_rows`` rows, the
    validation part holding ``validation_size(fraction, n_rows)`` rows; stratified by ``labels`` when
    given and possible (see the module docstring)."""
    from sklearn.model_selection import train_test_split

    n_validation = validation_size(fraction, n_rows)
    n_train = n_rows - n_validation
    if n_train < 1 or n_validation < 1:
        part = "training" if n_train < 1 else "validation"
        raise KDForgeError(f"`task.validation: {fraction}` of the {n_rows} training rows leaves no {part} row; "
                           f"use a {'smaller' if n_train < 1 else 'larger'} fraction or more training rows "
                           "(task.train_limit)")
    stratify = labels if labels is not None and _stratifiable(labels, n_validation, n_train) else None
    if labels is not None and stratify is None:
        log.info("task.validation: too few rows per class to stratify; %d validation rows drawn uniformly",
                 n_validation)
    train, validation = train_test_split(np.arange(n_rows), test_size=n_validation, random_state=seed,
                                         stratify=stratify)
    return np.sort(train), np.sort(validation)


def data_path(config: TaskConfig, value: str) -> Path:
    """A path the task config names (``task.train_file``, ``task.validation``...): relative paths are taken
    inside ``task.data_dir`` when it is set."""
    path = Path(value).expanduser()
    if not path.is_absolute() and config.data_dir:
        path = Path(config.data_dir).expanduser() / path
    return path


def validation_file(config: TaskConfig) -> Path:
    """The configured validation file, checked to exist (relative paths inside ``task.data_dir`` when it is
    set, as for ``task.train_file``)."""
    assert isinstance(config.validation, str)
    path = data_path(config, config.validation)
    if not path.is_file():
        raise KDForgeError(f"validation file {path} not found; fix `task.validation` (a file in the training "
                           "file's format, or a fraction such as 0.1)")
    return path
