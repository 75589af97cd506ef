"""kdforge.evaluation.sanity: the majority/mean baseline, per-class scores and sanity warnings,
all checked against values worked out by hand."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from kdforge.config import TaskConfig
from kdforge.evaluation.model_report import ModelReport
from kdforge.evaluation.sanity import majority_baseline, per_class_report, sanity_warnings
from kdforge.problems import Regression
from kdforge.tasks.base import build_task
from kdforge.tasks.vision import ImageArrayDataset
from tests.helpers import write_csv


def csv_task(tmp_path, train: list[str], dev: list[str], **settings):
    write_csv(tmp_path / "train.csv", [(f"row {i}", label) for i, label in enumerate(train)])
    write_csv(tmp_path / "dev.csv", [(f"row {i}", label) for i, label in enumerate(dev)])
    return build_task(TaskConfig(name="csv", train_file=str(tmp_path / "train.csv"),
                                 dev_file=str(tmp_path / "dev.csv"), **settings))


@pytest.fixture
def three_class(tmp_path):
    """Labels sorted: neg = 0, neu = 1, pos = 2. Train prior (0.3, 0.1, 0.6): majority pos.
    Dev: 2 pos of 5 rows."""
    return csv_task(tmp_path, ["pos"] * 6 + ["neg"] * 3 + ["neu"],
                    ["pos", "neg", "pos", "neu", "neg"])


def test_majority_baseline_classification_by_hand(three_class):
    task = three_class
    assert task.label_names == ["neg", "neu", "pos"]
    scores = majority_baseline(task, task.split("train"), task.split("dev"), ece_bins=15)
    # always `pos`: right on 2 of 5 dev rows; every row has confidence max prior = 0.6
    assert scores.metrics == {"accuracy": pytest.approx(0.4)}
    assert scores.ece == pytest.approx(abs(0.4 - 0.6))
    bins = scores.reliability
    assert bins["n_samples"] == 5
    # 0.6 = 9/15 lies in bin (8/15, 9/15], the ninth bin
    assert bins["count"] == [0] * 8 + [5] + [0] * 6
    assert bins["accuracy"][8] == pytest.approx(0.4) and bins["confidence"][8] == pytest.approx(0.6)
    json.dumps(bins, allow_nan=False)


def test_majority_baseline_uses_training_labels_and_breaks_ties_low(tmp_path):
    # train: 2 neg, 2 pos (a tie -> class 0 = neg); dev is all pos, so the dev majority would score 1.0
    task = csv_task(tmp_path, ["neg", "pos", "pos", "neg"], ["pos", "pos", "pos"])
    scores = majority_baseline(task, task.split("train"), task.split("dev"), ece_bins=10)
    assert scores.metrics["accuracy"] == 0.0
    assert scores.ece == pytest.approx(0.5)  # |0 - 0.5|


def test_majority_baseline_reads_image_datasets_and_subsets(three_class):
    # labels of an image dataset (and a Subset of it) are read from its label array
    images = torch.zeros(6, 2, 2, 3, dtype=torch.uint8).numpy()
    train = ImageArrayDataset(images, np.array([1, 1, 1, 0, 2, 2]))
    dev = Subset(ImageArrayDataset(images, np.array([0, 1, 2, 1, 0, 0])), [0, 1, 3])  # labels 0, 1, 1
    scores = majority_baseline(three_class, train, dev, ece_bins=4)
    assert scores.metrics["accuracy"] == pytest.approx(2 / 3)  # majority class 1 (prior 0.5)
    assert scores.ece == pytest.approx(abs(2 / 3 - 0.5))


def test_majority_baseline_regression_mean_and_undefined_correlations(tmp_path):
    task = csv_task(tmp_path, ["1", "2", "3", "6"], ["0", "5", "1"], problem_type="regression")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about a constant input
        scores = majority_baseline(task, task.split("train"), task.split("dev"))
    assert scores.metrics == {"pearson": None, "spearman": None}
    assert scores.ece is None and scores.reliability is None
    json.dumps(scores.metrics, allow_nan=False)


class ScipyRegression:
    """A regression task scoring with scipy directly: NaN and a ConstantInputWarning for a constant."""

    problem = Regression()
    num_labels = 1

    def compute_metrics(self, predictions, labels):
        from scipy import stats

        predictions = np.asarray(predictions, float)
        return {"pearson": float(stats.pearsonr(predictions, labels).statistic),
                "mse": float(np.mean((predictions - labels) ** 2))}


def test_majority_baseline_regression_silences_nan_metrics():
    train = [{"label": v} for v in (1.0, 2.0, 3.0, 6.0)]  # mean 3
    dev = [{"label": v} for v in (0.0, 5.0, 1.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = majority_baseline(ScipyRegression(), train, dev)
    assert scores.metrics["pearson"] is None
    assert scores.metrics["mse"] == pytest.approx((9 + 4 + 4) / 3)


def test_majority_baseline_not_applicable_to_language_modelling(tmp_path):
    (tmp_path / "corpus.txt").write_text("one line\nanother line\n")
    task = build_task(TaskConfig(name="lm", corpus={"files": [str(tmp_path / "corpus.txt")]}))
    assert majority_baseline(task, [], []) is None


def test_per_class_report_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 1])  # class 2 never predicted
    logits = np.eye(3)[predicted] * 2.0 - 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division=0: no warning for class 2's precision
        report = per_class_report(logits, labels, ["a", "b", "c"])
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["labels"] == ["a", "b", "c"] and report["n_rows"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert report["predicted_counts"] == [2, 4, 0]
    a, b, c = (report["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((0.5, 1.0, 2 / 3, 2))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert report["macro_avg"]["f1"] == pytest.approx((0.8 + 2 / 3) / 3)
    assert report["weighted_avg"]["f1"] == pytest.approx((3 * 0.8 + 2 * 2 / 3) / 6)
    assert isinstance(report["per_class"]["a"]["support"], int)


def test_per_class_report_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        per_class_report(np.zeros((4, 2)), np.zeros(4), ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels must have shape"):
        per_class_report(np.zeros((4, 2)), np.zeros(3), ["a", "b"])


def test_sanity_warnings_baseline_and_one_class():
    reports = {"teacher": {"accuracy": 0.6838}, "student": ModelReport(
        name="student", metrics={"accuracy": 0.8}, main_metric="accuracy", ece=0.1, params=1, size_mb=1.0,
        latency={}).to_dict()}
    lines = sanity_warnings(reports, 0.6838, "accuracy", True, {"teacher": [0, 408], "student": [200, 208]},
                            split="dev")
    assert lines == [
        "teacher: accuracy 0.6838 is no better than the majority-class baseline 0.6838 on dev — it has not "
        "learned the task; train longer or check the data",
        "teacher predicts `1` for all 408 rows on dev",
    ]
    named = sanity_warnings({}, None, "accuracy", True, {"student": [12, 0, 0]}, label_names=["neg", "pos", "x"])
    assert named == ["student predicts `neg` for all 12 rows"]


def test_sanity_warnings_direction_nan_and_no_baseline():
    # lower is better: 10.0 >= 9.0 is no better; 8.0 is better
    lines = sanity_warnings({"teacher": {"perplexity": 10.0}, "student": {"perplexity": 8.0}}, 9.0,
                            "perplexity", False, None)
    assert len(lines) == 1 and lines[0].startswith("teacher: perplexity 10.0000 is no better than")
    # higher is better: just above the baseline passes, below fails
    assert sanity_warnings({"s": {"f1": 0.51}}, 0.5, "f1", True, None) == []
    assert len(sanity_warnings({"s": {"f1": 0.49}}, 0.5, "f1", True, None)) == 1
    nan = sanity_warnings({"student": {"accuracy": math.nan}}, 0.5, "accuracy", True, None)
    assert len(nan) == 1 and nan[0].startswith("student: accuracy is nan, not a number")
    # no baseline, a missing metric, a one-class task: nothing to say
    assert sanity_warnings({"t": {"accuracy": 0.1}, "u": {}}, None, "accuracy", True, {"t": [5]}) == []


def test_a_constant_model_is_flagged_end_to_end(three_class):
    """A 'model' that outputs the training log-prior for every row scores exactly the baseline."""
    task = three_class
    dev = task.split("dev")
    baseline = majority_baseline(task, task.split("train"), dev)
    labels = np.array([row["label"] for row in dev])
    logits = np.tile(np.log([0.3, 0.1, 0.6]), (len(labels), 1))
    report = per_class_report(logits, labels, task.label_names)
    lines = sanity_warnings({"student": {"metrics": task.compute_metrics(logits, labels)}},
                            baseline.metrics[task.main_metric], task.main_metric, task.greater_is_better,
                            {"student": report["predicted_counts"]}, split="dev", label_names=task.label_names)
    assert lines == [
        "student: accuracy 0.4000 is no better than the majority-class baseline 0.4000 on dev — it has not "
        "learned the task; train longer or check the data",
        "student predicts `pos` for all 5 rows on dev",
    ]
