"""The Task contract: data splits, preprocessing into tensors, label space and official metrics.

A task yields raw examples as dicts:
  * text tasks:  ``{"text_a": str, "text_b": str | None, "label": int | float}``
  * image tasks: ``{"image": uint8 tensor (H, W, C), "label": int}``
and a collator turns a list of examples into a batch dict of tensors:
  * text:  tokenizer outputs (``input_ids``, ``attention_mask``, ...) + ``labels``
  * image: ``pixel_values`` (float, N x C x H x W, normalised) + ``labels``
Labels have the dtype of the task's problem kind (``long`` for classification, ``float`` for
regression): ``Task.problem_type`` names the kind, ``task.problem`` is its
:class:`kdforge.problems.Problem`, which everything that depends on the kind asks.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.problems import PROBLEMS, Problem, Scores
from kdforge.registry import Registry
from kdforge.tasks.validation import SPLIT as VALIDATION
from kdforge.tasks.validation import carve_indices, dataset_labels, validation_file


class ListDataset(Dataset):
    """A split held in memory as a list of example dicts."""

    def __init__(self, examples: Sequence[dict[str, Any]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


class Task(ABC):
    """One dataset with its label space and official metrics."""

    modality: Literal["text", "image"] = "text"
    problem_type: str = "classification"
    """The registered name of the task's problem kind (:data:`kdforge.problems.PROBLEMS`)."""
    main_metric: str = "accuracy"
    greater_is_better: bool = True  # of main_metric
    eval_split: str = "dev"
    #: True when the training collator draws random augmentations (teacher outputs then differ per epoch)
    random_train_inputs: bool = False
    in_channels: int = 3
    #: what a ``task.validation`` file holds; None: this task takes only a fraction of its training rows
    validation_file_format: str | None = None

    def __init__(self, config: TaskConfig):
        self.config = config
        self.label_names: list[str] = []
        self._carved: tuple[Dataset, Dataset] | None = None  # (train, validation) of a fraction
        self._validation_data: Dataset | None = None  # the rows of a validation file
        if isinstance(config.validation, str):  # fail before any training
            if self.validation_file_format is None:
                raise KDForgeError(f"task {config.name} takes `task.validation` as a fraction of its training "
                                   f"rows (e.g. 0.1), not a file ({config.validation!r})")
            self.validation_source()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def problem(self) -> Problem:
        """The task's problem kind: its loss, metric inputs, calibration, baseline (:mod:`kdforge.problems`)."""
        return PROBLEMS.get(self.problem_type, "task.problem_type")()

    @classmethod
    def problem_of(cls, config: TaskConfig) -> Problem:
        """The problem kind of the task this class builds from ``config``, known before building it (preflight)."""
        return PROBLEMS.get(cls.problem_type, "task.problem_type")()

    @property
    def num_labels(self) -> int:
        return self.problem.num_outputs(self.label_names)

    @abstractmethod
    def load_split(self, split: str) -> Dataset:
        """All examples of ``split`` ("train" or ``self.eval_split``), validated."""

    @abstractmethod
    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Official metrics. ``predictions``: logits (N, C) for classification, (N,) for regression."""

    @abstractmethod
    def collator(self, tokenizer: Any = None, train: bool = False) -> Callable[[list[dict]], dict]:
        """A DataLoader ``collate_fn`` for this task (augmentation only when ``train``)."""

    def evaluate(self, adapter: torch.nn.Module, data: Dataset, collate_fn: Callable, batch_size: int,
                 device: torch.device | str = "cpu", ece_bins: int = 15, desc: str = "eval") -> Scores:
        """Score the model behind ``adapter`` (a ModelAdapter) on ``data``: the model's logits of the
        whole split are collected, then :meth:`compute_metrics`; ECE over the softmax of the logits."""
        from kdforge.engine.predict import predict

        return self.scores(*predict(adapter, data, collate_fn, batch_size, device, desc), ece_bins)

    def scores(self, logits: np.ndarray, labels: np.ndarray, ece_bins: int = 15) -> Scores:
        """:meth:`compute_metrics` of a split's logits, and the ECE and reliability bins of the problem's
        calibration (of their softmax, for classification; none for regression)."""
        metrics = self.compute_metrics(logits, labels)
        bins = self.problem.calibration(logits, labels, ece_bins)
        return Scores(metrics) if bins is None else Scores(metrics, bins["ece"], bins)

    @property
    def selection_split(self) -> str:
        """The split on which the best epoch (ensemble weights, ...) is chosen: ``"validation"`` when
        ``task.validation`` is set, else the reported split ``eval_split``."""
        return VALIDATION if self.config.validation is not None else self.eval_split

    def split(self, split: str) -> Dataset:
        """``load_split`` limited to a fixed random sample when ``train_limit``/``eval_limit`` is set.

        With ``task.validation`` set, ``split("validation")`` gives the validation rows (see
        :mod:`kdforge.tasks.validation`): a fraction is carved from the sampled training rows, which
        ``split("train")`` then excludes; a file is read by :meth:`read_validation_file`."""
        if split == VALIDATION:
            return self._validation_split()
        if split == "train" and isinstance(self.config.validation, float):
            return self._carve()[0]
        return self._sampled(split)

    def validation_source(self) -> Path | str:
        """Where the rows of a ``task.validation`` string are, checked to exist (called while the task is built):
        by default the file :func:`~kdforge.tasks.validation.validation_file` finds; a task that also takes a
        split name there (``hf_dataset``) overrides it, and :meth:`read_validation_file` reads the source."""
        return validation_file(self.config)

    def read_validation_file(self, path: Path) -> Dataset:
        """The examples of a ``task.validation`` file (tasks with a ``validation_file_format``)."""
        raise KDForgeError(f"task {self.name} cannot read a validation file; give `task.validation` as a fraction")

    def describe_split(self, split: str) -> str:
        """The split and its size for reports, e.g. ``"dev (872 rows)"`` or ``"validation (90 rows carved
        from train)"``."""
        rows = len(self.split(split))
        if split != VALIDATION:
            file = getattr(self.config, f"{split}_file", None)  # a file the user named: say which
            return f"{split} ({Path(file).name}, {rows} rows)" if file else f"{split} ({rows} rows)"
        source = "carved from train" if isinstance(self.config.validation, float) else \
            f"from {Path(str(self.config.validation)).name}"
        return f"{split} ({rows} rows {source})"

    def _validation_split(self) -> Dataset:
        value = self.config.validation
        if value is None:
            raise KDForgeError(f"task {self.name} has no validation split; set `task.validation` to a fraction "
                               "of the training rows (e.g. 0.1) or a validation file")
        if isinstance(value, float):
            return self._carve()[1]
        if self._validation_data is None:
            source = self.validation_source()
            data = self.read_validation_file(source)
            if len(data) == 0:
                kind = "file" if isinstance(source, Path) else "split"
                raise KDForgeError(f"validation {kind} {source} holds no rows; fix `task.validation`")
            self._validation_data = data
        return self._validation_data

    def _carve(self) -> tuple[Dataset, Dataset]:
        """The sampled training rows split into (train, validation) by ``task.validation`` (a fraction)."""
        if self._carved is None:
            data = self._sampled("train")
            labels = dataset_labels(data) if self.problem.classes else None
            train, validation = carve_indices(len(data), float(self.config.validation), self.config.sample_seed,
                                              labels)
            self._carved = Subset(data, train.tolist()), Subset(data, validation.tolist())
        return self._carved

    def _sampled(self, split: str) -> Dataset:
        data = self.load_split(split)
        if len(data) == 0:
            raise KDForgeError(f"the {split!r} split of task {self.name} is empty; check `task.data_dir`")
        limit = self.config.train_limit if split == "train" else self.config.eval_limit
        if limit is None or limit >= len(data):
            return data
        rng = np.random.default_rng(self.config.sample_seed)
        keep = np.sort(rng.choice(len(data), size=limit, replace=False))
        return torch.utils.data.Subset(data, keep.tolist())

    def fingerprint(self) -> str:
        """Identifies the data and preprocessing (used to key caches). Settings added to TaskConfig
        later (``corpus``, ``validation``, the ``hf_dataset`` keys) are left out while unset, so existing caches
        and teachers stay valid."""
        settings = self.config.model_dump(mode="json")
        for late in ("corpus", "validation", "dataset", "train_split", "dev_split"):
            if settings.get(late) is None:
                settings.pop(late, None)
        blob = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


TASKS: Registry[type[Task]] = Registry("task")


def build_task(config: TaskConfig) -> Task:
    """The task ``config.name`` names. The registry is filled by the task modules, which the package
    ``kdforge.tasks`` imports (so it is full whenever this module has been imported)."""
    return TASKS.get(config.name, "task.name")(config)


def task_problem(config: TaskConfig) -> Problem:
    """The problem kind of the task ``config`` names, without building the task (no data is read)."""
    return TASKS.get(config.name, "task.name").problem_of(config)
