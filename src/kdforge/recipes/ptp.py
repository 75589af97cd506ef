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
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from kdforge.config import JobConfig, StageConfig
from kdforge.engine.predict import predict
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel
from kdforge.problems.calibration import softmax
from kdforge.recipes.base import DATA_SOURCES, DataSource, StageData
from kdforge.tasks.base import Scores, Task
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


class PTPParams(BaseModel):
    """``ptp:``: thresholds on the teacher's max probability for correct (t1) and wrong (t2) predictions;
    default: the median confidence of each group."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    t1: float | None = Field(None, gt=0, le=1)
    t2: float | None = Field(None, gt=0, le=1)


class PTPScorer:
    """Accuracy on the PTP labels (a learner of this stage is scored on its selection split by it)."""

    main_metric, greater_is_better = "accuracy", True

    def evaluate(self, adapter, data: Dataset, collate_fn, batch_size: int, device="cpu", ece_bins: int = 15,
                 desc: str = "eval") -> Scores:
        logits, labels = predict(adapter, data, collate_fn, batch_size, device, desc)
        return Scores({"accuracy": accuracy(np.asarray(logits).argmax(-1), labels)})


@DATA_SOURCES.register("ptp")
class PTP(DataSource):
    """``data: ptp``: the task's splits labelled with the stage's first teacher's four PTP classes, scored
    by accuracy. Thresholds come from the training split and are reused for the other splits."""

    Params = PTPParams
    carries = frozenset({"labels"})

    def check(self, config: JobConfig, stage: StageConfig, index: int) -> None:
        if not config.stage_teachers(stage):
            raise KDForgeError(f"stages.{index}: `data: ptp` labels the examples with the stage's first teacher, "
                               f"and it has none; list one in stages.{index}.teachers")

    def build(self, stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig,
              device) -> StageData:
        if not task.problem.classes:
            raise KDForgeError(f"PTP needs a classification task; {task.name} is {task.problem_type}")
        thresholds = (self.params.t1, self.params.t2)
        splits: dict[str, Relabelled] = {}
        counts: list[int] = []
        for split in dict.fromkeys(("train", task.selection_split, task.eval_split)):
            data = task.split(split)
            logits, gold = predict(ModelAdapter(teacher.model), data, task.collator(teacher.tokenizer),
                                   config.eval.batch_size, device, f"PTP labels ({split})")
            labels, t1, t2 = ptp_labels(softmax(logits.astype(np.float64)), gold, *thresholds)
            if split == "train":
                thresholds = (t1, t2)
                counts = np.bincount(labels, minlength=4).tolist()
            splits[split] = Relabelled(data, labels)
        return StageData(task.name, splits["train"], task.collator,
                         f"{task.fingerprint()}-ptp-{thresholds[0]:.6f}-{thresholds[1]:.6f}", self.carries,
                         selection=splits[task.selection_split], selection_split=task.selection_split,
                         scorer=PTPScorer(), num_labels=len(PTP_LABELS), label_names=list(PTP_LABELS),
                         random_train_inputs=task.random_train_inputs,
                         info={"thresholds": thresholds, "counts": counts})
