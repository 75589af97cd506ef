"""The Task contract: data splits, preprocessing into tensors, label space and official metrics.

A task yields raw examples as dicts:
  * text tasks:  ``{"text_a": str, "text_b": str | None, "label": int | float}``
  * image tasks: ``{"image": uint8 tensor (H, W, C), "label": int}``
and a collator turns a list of examples into a batch dict of tensors:
  * text:  tokenizer outputs (``input_ids``, ``attention_mask``, ...) + ``labels``
  * image: ``pixel_values`` (float, N x C x H x W, normalised) + ``labels``
Labels are ``long`` for classification and ``float`` for regression.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.registry import Registry


class ListDataset(Dataset):
    """A split held in memory as a list of example dicts."""

    def __init__(self, examples: Sequence[dict[str, Any]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


@dataclass
class Scores:
    """A model's scores on an evaluation split: official metrics, expected calibration error and
    the reliability-diagram bins (both None for regression)."""

    metrics: dict[str, float]
    ece: float | None = None
    reliability: dict | None = None


class Task(ABC):
    """One dataset with its label space and official metrics."""

    modality: Literal["text", "image"] = "text"
    problem_type: Literal["classification", "regression", "language_modeling"] = "classification"
    main_metric: str = "accuracy"
    greater_is_better: bool = True  # of main_metric
    eval_split: str = "dev"
    #: True when the training collator draws random augmentations (teacher outputs then differ per epoch)
    random_train_inputs: bool = False
    in_channels: int = 3

    def __init__(self, config: TaskConfig):
        self.config = config
        self.label_names: list[str] = []

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.label_names)

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
        from kdforge.evaluation.calibration import reliability_bins, softmax

        logits, labels = predict(adapter, data, collate_fn, batch_size, device, desc)
        metrics = self.compute_metrics(logits, labels)
        if self.problem_type == "regression":
            return Scores(metrics)
        bins = reliability_bins(softmax(logits.astype(np.float64)), labels, ece_bins)
        return Scores(metrics, bins["ece"], bins)

    def split(self, split: str) -> Dataset:
        """``load_split`` limited to a fixed random sample when ``train_limit``/``eval_limit`` is set."""
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
        later (``corpus``) are left out while unset, so existing caches and teachers stay valid."""
        settings = self.config.model_dump(mode="json")
        if settings.get("corpus") is None:
            settings.pop("corpus", None)
        blob = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


TASKS: Registry[Callable[[TaskConfig], Task]] = Registry("task")


def build_task(config: TaskConfig) -> Task:
    # importing the modules fills the registry
    from kdforge.tasks import language_model, text, vision  # noqa: F401

    return TASKS.get(config.name, "task.name")(config)
