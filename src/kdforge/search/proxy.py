"""The proxy task every search candidate learns from: a fixed subset of the task's training rows.

KD-NAS (Trivedi et al., 2023) and AutoKD (Eyono et al., 2021) rank candidates after a short
distillation on a small subset of the training data. :class:`ProxyTask` is the job's task with
``split("train")`` cut to ``rows`` examples drawn once with ``seed`` (the same for every trial and
worker); the validation split it scores on is the task's own (carved from the training rows, never
the reported dev/test split).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from kdforge.tasks.base import Task


class ProxyTask:
    """``task`` with its training split limited to a fixed random subset of ``rows`` examples; every
    other attribute is the task's (a thin delegate, so the stage runner sees an ordinary task)."""

    def __init__(self, task: Task, rows: int, seed: int):
        self.task, self.rows, self.seed = task, rows, seed
        self._train: Dataset | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def split(self, split: str) -> Dataset:
        if split != "train":
            return self.task.split(split)
        if self._train is None:
            full = self.task.split("train")
            if self.rows >= len(full):
                self._train = full
            else:
                keep = np.sort(np.random.default_rng(self.seed).choice(len(full), size=self.rows, replace=False))
                self._train = Subset(full, keep.tolist())
        return self._train

    def fingerprint(self) -> str:
        return f"{self.task.fingerprint()}+proxy:{self.rows}:{self.seed}"
