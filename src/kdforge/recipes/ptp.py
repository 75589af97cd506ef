"""Pea-KD's Pretraining with Teacher's Predictions (PTP): Cho & Kang, "Pea-KD: Parameter-efficient
and Accurate Knowledge Distillation on BERT" (PLOS ONE 2022).

Every training example gets one of four labels from the teacher's prediction:

    0 confidently correct    argmax = gold and max prob >= t1
    1 unconfidently correct  argmax = gold and max prob <  t1
    2 confidently wrong      argmax != gold and max prob >= t2
    3 unconfidently wrong    argmax != gold and max prob <  t2

t1 / t2 default to the median confidence of the teacher's correct / wrong examples. The student
learns these labels with CE as an initialisation stage; its classifier is then re-initialised
and it is distilled on the real task.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdforge.config import PTPConfig
from kdforge.engine.predict import predict
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.problems.calibration import softmax
from kdforge.tasks.base import Task
from kdforge.tasks.metrics import accuracy

PTP_LABELS = ["confidently_correct", "unconfidently_correct", "confidently_wrong", "unconfidently_wrong"]


def ptp_labels(probs: np.ndarray, gold: np.ndarray, t1: float | None = None,
               t2: float | None = None) -> tuple[np.ndarray, float, float]:
    """The four PTP classes of each example, and the thresholds used."""
    pred, confidence = probs.argmax(-1), probs.max(-1)
    correct = pred == gold
    if t1 is None:
        t1 = float(np.median(confidence[correct])) if correct.any() else 1.0
    if t2 is None:
        t2 = float(np.median(confidence[~correct])) if (~correct).any() else 1.0
    labels = np.where(correct, np.where(confidence >= t1, 0, 1), np.where(confidence >= t2, 2, 3))
    return labels.astype(np.int64), t1, t2


class Relabelled(Dataset):
    """``data`` with each example's label replaced."""

    def __init__(self, data: Dataset, labels: np.ndarray):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.data[i], "label": int(self.labels[i])}


class PTPTask(Task):
    """The base task's splits labelled with the teacher's four PTP classes (metric: accuracy).
    Thresholds come from the training split and are reused for the evaluation split."""

    main_metric = "accuracy"

    def __init__(self, base: Task, teacher, config: PTPConfig, batch_size: int = 64, device="cpu"):
        if not base.problem.classes:
            raise KDForgeError(f"PTP needs a classification task; {base.name} is {base.problem_type}")
        super().__init__(base.config)
        self.base, self.modality, self.eval_split = base, base.modality, base.eval_split
        self.random_train_inputs = base.random_train_inputs
        self.label_names = list(PTP_LABELS)
        self.thresholds = (config.t1, config.t2)
        self._splits: dict[str, Relabelled] = {}
        for split in dict.fromkeys(("train", base.selection_split, base.eval_split)):
            data = base.split(split)
            logits, gold = predict(ModelAdapter(teacher.model), data, base.collator(teacher.tokenizer), batch_size,
                                   device, f"PTP labels ({split})")
            labels, t1, t2 = ptp_labels(softmax(logits.astype(np.float64)), gold, *self.thresholds)
            if split == "train":
                self.thresholds = (t1, t2)
                self.counts = np.bincount(labels, minlength=4).tolist()
            self._splits[split] = Relabelled(data, labels)

    def load_split(self, split: str) -> Dataset:
        return self._splits[split]

    def split(self, split: str) -> Dataset:
        return self._splits[split]  # the base task already applied its limits

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": accuracy(np.asarray(predictions).argmax(-1), labels)}

    def collator(self, tokenizer: Any = None, train: bool = False):
        return self.base.collator(tokenizer, train)

    def fingerprint(self) -> str:
        return f"{self.base.fingerprint()}-ptp-{self.thresholds[0]:.6f}-{self.thresholds[1]:.6f}"
