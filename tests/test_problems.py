"""The problem kinds (kdforge.problems): each kind's loss, metric inputs, calibration and baseline by hand;
tasks and the config-time derivation ask them; and the worked example of docs/design.md (a new kind,
"multi_label") runs through a task, the evaluation and a distillation job."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.config import EvalConfig, TaskConfig
from kdforge.errors import KDForgeError
from kdforge.problems import PROBLEMS, Classification, LanguageModelling, Problem, Regression
from kdforge.tasks.base import TASKS, build_task, task_problem
from kdforge.tasks.text_base import TextTask, read_delimited

ROOT = Path(__file__).parent.parent
DESIGN = ROOT / "docs" / "design.md"


# --------------------------------------------------------------------------- the shipped kinds by hand


def test_the_registry_holds_the_shipped_kinds_under_their_names():
    assert {"classification", "regression", "language_modeling"} <= set(PROBLEMS.names())
    for name in ("classification", "regression", "language_modeling"):
        assert PROBLEMS.get(name)().name == name
    assert (Classification.objective, Regression.objective, LanguageModelling.objective) == \
        ("ce", "mse", "next_token_ce")
    assert (Classification.label_dtype, Regression.label_dtype) == (torch.long, torch.float)
    assert Classification().num_outputs(["a", "b", "c"]) == 3 and Regression().num_outputs([]) == 1
    with pytest.raises(KDForgeError, match="unknown problem kind 'ordinal'"):
        PROBLEMS.get("ordinal", "task.problem_type")


def test_classification_loss_is_the_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    # -log softmax: row 0 log(1 + e^-2) for class 0, row 1 log 2
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert Classification().loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)


def test_regression_loss_is_the_mean_squared_error_of_the_single_output():
    loss = Regression().loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((1 + 4) / 2)


def test_language_modelling_loss_scores_each_position_against_the_next_token():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = math.log(3)  # position 0 predicts token 1 with p = 3 / (3 + 3) = 1/2
    labels = torch.tensor([[2, 1, -100]])  # position 1's target is padding: not scored
    assert LanguageModelling().loss(logits, labels).item() == pytest.approx(math.log(2), rel=1e-6)


def test_metric_inputs_reduce_logits_to_what_the_metrics_score():
    predictions, labels = Classification().metric_inputs(np.array([[0.1, 0.9], [2.0, 1.0]]), np.array([[1], [1]]))
    assert predictions.tolist() == [1, 0] and labels.tolist() == [1, 1]
    assert Classification().metric_inputs(np.array([2, 0]), np.array([2, 1]))[0].tolist() == [2, 0]
    assert Regression().metric_inputs(np.array([[0.5], [1.5]]), np.array([1.0, 2.0]))[0].tolist() == [0.5, 1.5]
    with pytest.raises(ValueError, match=r"predictions of shape \(2, 2\) do not fit a regression task"):
        Regression().metric_inputs(np.zeros((2, 2)), np.zeros(2))


def test_classification_calibration_by_hand():
    """Softmax rows (3/4, 1/4), (1/4, 3/4), (9/10, 1/10), all labelled 0, 10 bins: the two 3/4 rows share
    bin (0.7, 0.8] with accuracy 1/2; the 9/10 row is alone and right. ECE = 2/3 |1/2 - 3/4| + 1/3 |1 - 9/10|."""
    logits = np.log(np.array([[3.0, 1.0], [1.0, 3.0], [9.0, 1.0]]))
    bins = Classification().calibration(logits, np.array([0, 0, 0]), 10)
    assert bins["ece"] == pytest.approx(2 / 3 * 0.25 + 1 / 3 * 0.1)
    assert bins["count"][7] == 2 and bins["accuracy"][7] == 0.5 and sum(bins["count"]) == 3
    assert Regression().calibration(np.zeros((3, 1)), np.zeros(3), 10) is None


def accuracy_of(logits, labels):
    predictions, labels = Classification().metric_inputs(logits, labels)
    return {"accuracy": float(np.mean(predictions == labels))}


def test_classification_baseline_by_hand():
    """Training labels 0, 0, 1: prior (2/3, 1/3), always class 0; on labels 0, 1, 1, 1 it is right once,
    every row in one bin: ECE = |1/4 - 2/3| = 5/12."""
    scores = Classification().baseline(accuracy_of, np.array([0, 0, 1]), np.array([0, 1, 1, 1]), 2, 15)
    assert scores.metrics == {"accuracy": 0.25}
    assert scores.ece == pytest.approx(5 / 12)
    assert scores.reliability["n_samples"] == 4
    with pytest.raises(ValueError, match="outside the task's 2 classes"):
        Classification().baseline(accuracy_of, np.array([0, 2]), np.array([0]), 2, 15)


def test_regression_baseline_is_the_training_mean_with_undefined_correlations():
    def metrics(predictions, labels):
        return {"pearson": float("nan"), "mse": float(np.mean((predictions - labels) ** 2))}

    scores = Regression().baseline(metrics, np.array([1.0, 2.0, 3.0, 6.0]), np.array([0.0, 5.0, 1.0]), 1, 15)
    assert scores.metrics == {"pearson": None, "mse": pytest.approx((9 + 4 + 4) / 3)}
    assert scores.ece is None and scores.reliability is None
    assert Regression.baseline_name == "training mean" and Classification.baseline_name == "majority class"


def test_language_modelling_has_no_baseline_and_is_scored_batch_by_batch():
    problem = LanguageModelling()
    assert problem.baseline_name is None and problem.streamed and problem.causal_lm and not problem.classes
    assert problem.baseline(accuracy_of, np.zeros(2), np.zeros(2), 0, 15) is None


# --------------------------------------------------------------------------- tasks ask their kind


def test_tasks_hand_out_their_kind_and_the_config_derives_the_same(tmp_path, sentiment_dir):
    csv_config = {"name": "csv", "train_file": str(sentiment_dir / "train.csv"),
                  "dev_file": str(sentiment_dir / "dev.csv")}
    for tree in ({"name": "glue/sst2"}, {"name": "glue/stsb"}, {"name": "digits"}, {**csv_config},
                 {**csv_config, "problem_type": "regression"}, {"name": "glue/sst2", "problem_type": "regression"}):
        config = TaskConfig.model_validate(tree)
        assert task_problem(config).name == build_task(config).problem.name, tree
    assert task_problem(TaskConfig(name="glue/stsb")).name == "regression"
    assert task_problem(TaskConfig(name="csv", problem_type="regression")).name == "regression"
    assert task_problem(TaskConfig(name="lm")).name == "language_modeling"


def kind_comparisons(src: Path) -> list[str]:
    """Lines outside ``problems/`` that compare a problem-kind name or key a table by it (lookups in
    ``PROBLEMS`` are fine)."""
    kinds = "|".join(PROBLEMS.names())
    compare = re.compile(rf"""(problem_type|problem\.name)\s*(==|!=|in\s)|(==|!=)\s*["']({kinds})["']"""
                         rf"""|["']({kinds})["']\s*(==|!=)|(?<!PROBLEMS)\.get\([\w.]*problem_type""")
    return [f"{path.relative_to(src)}:{i}: {line.strip()}"
            for path in sorted((src / "kdforge").rglob("*.py")) if "problems" not in path.parts
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if compare.search(line)]


def test_no_problem_kind_is_compared_outside_the_problem_home():
    found = kind_comparisons(ROOT / "src")
    assert not found, "ask task.problem instead:\n" + "\n".join(found)


# --------------------------------------------------------------------------- the worked example


@pytest.fixture(scope="module")
def multi_label() -> type[Problem]:
    """The docs' example, run exactly as docs/design.md shows it."""
    code = re.search(r"```python\n# multi_label.py\n(.*?)```", DESIGN.read_text(), re.S).group(1)
    if "multi_label" not in PROBLEMS:
        module = types.ModuleType("multi_label")
        sys.modules[module.__name__] = module
        exec(compile(code, "multi_label.py", "exec"), module.__dict__)
    return PROBLEMS.get("multi_label")


class Tags(TextTask):
    """Two tags per sentence of the synthetic sentiment files: is it positive, does it say "movie"."""

    problem_type = "multi_label"

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.label_names = ["positive", "movie"]

    def read_split(self, split: str) -> list[dict]:
        path = Path(self.config.train_file if split == "train" else self.config.dev_file)
        return [{"text_a": row["text"], "text_b": None,
                 "label": [float(row["label"] == "pos"), float("movie" in row["text"].split())]}
                for _, row in read_delimited(path, ",", quoting=csv.QUOTE_MINIMAL).records()]


@pytest.fixture(scope="module")
def tags_task_name(multi_label) -> str:
    if "toy/tags" not in TASKS:
        TASKS.register("toy/tags")(Tags)
    return "toy/tags"


def test_the_new_kind_by_hand(multi_label):
    problem = multi_label()
    logits, labels = np.array([[2.0, -1.0], [0.5, 3.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    assert problem.metric_inputs(logits, labels)[0].tolist() == [[1, 0], [1, 1]]
    sig = 1 / (1 + np.exp(-logits))
    expected = -np.mean(labels * np.log(sig) + (1 - labels) * np.log(1 - sig))
    assert problem.loss(torch.tensor(logits), torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-6)
    # 4 decisions, 1 bin: 3 right; mean confidence of max(p, 1 - p)
    bins = problem.calibration(logits, labels, 1)
    assert bins["ece"] == pytest.approx(abs(3 / 4 - np.maximum(sig, 1 - sig).mean()))
    # training labels all 1: frequencies clipped to 1 - 1e-6, both labels predicted on every row; 2 of 4 right
    scores = problem.baseline(lambda lo, la: {"accuracy": float(np.mean(np.all((lo > 0) == la, 1)))},
                              np.array([[1.0, 1.0], [1.0, 1.0]]), labels, 2, 10)
    assert scores.metrics == {"accuracy": 0.0} and scores.ece == pytest.approx(0.5, abs=1e-5)


def test_the_new_kind_through_a_task_and_the_evaluation(tags_task_name, sentiment_dir, tiny_teacher_dir, one_thread):
    from kdforge.evaluation.evaluate import pytorch_form, score_form
    from kdforge.evaluation.sanity import majority_baseline
    from kdforge.models.loading import load_model

    task = build_task(TaskConfig(name=tags_task_name, train_file=str(sentiment_dir / "train.csv"),
                                 dev_file=str(sentiment_dir / "dev.csv"), max_length=16))
    assert task.problem.name == "multi_label" and task.num_labels == 2
    loaded = load_model(str(tiny_teacher_dir), task)
    assert loaded.model.config.problem_type == "multi_label_classification"
    batch = task.collator(loaded.tokenizer)([task.split("train")[i] for i in range(4)])
    assert batch["labels"].dtype == torch.float and batch["labels"].shape == (4, 2)

    config = EvalConfig(batch_size=16)
    report = score_form(pytorch_form("teacher", loaded, task, config), task, task.split("dev"), config)
    assert 0 <= report.metrics["accuracy"] <= 1 and report.per_class is None
    assert report.reliability["n_samples"] == 2 * len(task.split("dev")) and 0 <= report.ece <= 1
    baseline = majority_baseline(task, task.split("train"), task.split("dev"), 15)
    assert set(baseline.metrics) == {"accuracy"} and baseline.reliability["n_samples"] == 2 * len(task.split("dev"))


@pytest.mark.slow
def test_the_new_kind_runs_a_distillation_job(tmp_path, job_tree, tags_task_name, tiny_teacher_dir):
    from kdforge import jobs
    from kdforge.config import validate_config
    from kdforge.roles.teachers import task_loss_config

    tree = {**job_tree, "task": {**job_tree["task"], "name": tags_task_name},
            "teacher": {"model": str(tiny_teacher_dir)}, "objectives": [{"name": "logit_mse"}],
            "train": {**job_tree["train"], "epochs": 1}}
    result = jobs.run_distill(validate_config(tree))
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["baseline"]["name"] == "label frequencies"
    assert saved["student"]["ece"] is not None and saved["student"].get("per_class") is None
    assert (result.run_dir / "report.html").is_file()
    with pytest.raises(KDForgeError, match="names no objective"):
        task_loss_config(build_task(validate_config(tree).task))
