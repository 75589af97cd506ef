"""task.validation: a selection split carved reproducibly from the training rows (or read from a file),
never trained on, and named in the report beside the reported split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import kdforge.tasks.language_model  # noqa: F401  (registers the tasks)
import kdforge.tasks.text  # noqa: F401
import kdforge.tasks.vision  # noqa: F401
from kdforge.config import TaskConfig, validate_config
from kdforge.errors import KDForgeError
from kdforge.evaluation.model_report import ModelReport, format_table, selection_line
from kdforge.evaluation.run_page import write_report
from kdforge.tasks.base import TASKS, Task
from kdforge.tasks.validation import carve_indices, validation_size
from tests.test_vision import cifar_members, write_zip


def build(name: str, **fields) -> Task:
    return TASKS.get(name)(TaskConfig(name=name, **fields))


def error(fn, *args, **kwargs) -> str:
    """The one-line message of the KDForgeError raised by ``fn(*args, **kwargs)``."""
    with pytest.raises(KDForgeError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def write_csv(path: Path, labels: list[str]) -> Path:
    """A csv whose row i reads ``row i`` with label ``labels[i]`` (texts identify rows)."""
    path.write_text("text,label\n" + "".join(f"row {i},{y}\n" for i, y in enumerate(labels)))
    return path


def texts(data) -> list[str]:
    return [data[i]["text_a"] for i in range(len(data))]


def csv_task(tmp_path: Path, labels: list[str], **fields) -> Task:
    train = write_csv(tmp_path / "train.csv", labels)
    dev = write_csv(tmp_path / "dev.csv", labels[:4])
    return build("csv", train_file=str(train), dev_file=str(dev), **fields)


LABELS_80_20 = ["a"] * 80 + ["b"] * 20


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, ""])
def test_config_rejects_non_fractions(value):
    tree = {"task": {"name": "glue/sst2", "validation": value}, "teacher": {"model": "x"}}
    message = error(validate_config, tree)
    assert "task.validation" in message


def test_config_accepts_a_fraction_or_a_path():
    assert TaskConfig(name="csv", validation=0.1).validation == 0.1
    assert TaskConfig(name="csv", validation="val.csv").validation == "val.csv"
    assert TaskConfig(name="csv").validation is None


# --------------------------------------------------------------------------- fingerprints

# computed before task.validation existed: caches and fine-tuned teachers of earlier runs stay valid
PINNED = [({"name": "glue/sst2"}, "577770ed7c976ca2"),
          ({"name": "glue/mrpc", "train_limit": 200, "eval_limit": 50, "sample_seed": 3}, "37c9db0c28bfda8f"),
          ({"name": "digits", "train_limit": 300}, "292a7dc21814d960")]


@pytest.mark.parametrize(("fields", "expected"), PINNED)
def test_fingerprint_unchanged_when_validation_is_unset(fields, expected):
    assert build(**fields).fingerprint() == expected


def test_fingerprint_changes_with_validation():
    prints = {build("glue/sst2", validation=v).fingerprint() for v in (None, 0.1, 0.2)}
    assert len(prints) == 3


# --------------------------------------------------------------------------- carving


def test_size_is_the_ceiling_of_fraction_times_rows():
    assert validation_size(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert validation_size(0.1, 31) == 4 and validation_size(0.25, 10) == 3 and validation_size(0.5, 1) == 1


def test_carve_indices_partition_the_rows():
    train, validation = carve_indices(50, 0.2, seed=0)
    assert len(validation) == 10 and len(train) == 40
    assert sorted([*train, *validation]) == list(range(50))
    assert list(train) == sorted(train)


def test_carved_rows_are_reproducible_disjoint_and_sized(tmp_path):
    task = csv_task(tmp_path, LABELS_80_20, validation=0.25)
    train, validation = texts(task.split("train")), texts(task.split("validation"))
    assert (len(train), len(validation)) == (75, 25)
    assert not set(train) & set(validation)
    assert sorted(train + validation, key=lambda t: int(t.split()[1])) == [f"row {i}" for i in range(100)]
    again = csv_task(tmp_path, LABELS_80_20, validation=0.25)  # a fresh task: the same rows
    assert texts(again.split("validation")) == validation and texts(again.split("train")) == train
    other = csv_task(tmp_path, LABELS_80_20, validation=0.25, sample_seed=1)
    assert texts(other.split("validation")) != validation  # the seed draws the rows


@pytest.mark.parametrize("seed", range(5))  # a uniform draw would hit 20/5 only about 1 time in 5
def test_classification_is_stratified(tmp_path, seed):
    task = csv_task(tmp_path, LABELS_80_20, validation=0.25, sample_seed=seed)
    names = task.label_names
    # 25 validation rows keep the 80/20 label shares exactly: 20 a, 5 b; train keeps 60 a, 15 b
    assert Counter(names[e["label"]] for e in task.split("validation")) == {"a": 20, "b": 5}
    assert Counter(names[e["label"]] for e in task.split("train")) == {"a": 60, "b": 15}


def test_too_few_rows_per_class_falls_back_to_a_uniform_draw(tmp_path):
    task = csv_task(tmp_path, ["a"] * 9 + ["b"], validation=0.2)  # class b has one row
    train, validation = texts(task.split("train")), texts(task.split("validation"))
    assert (len(train), len(validation)) == (8, 2) and not set(train) & set(validation)


def test_regression_is_carved_without_stratification(tmp_path):
    task = csv_task(tmp_path, [str(i / 10) for i in range(20)], validation=0.3, problem_type="regression")
    train, validation = texts(task.split("train")), texts(task.split("validation"))
    assert (len(train), len(validation)) == (14, 6) and not set(train) & set(validation)


def test_carved_after_train_limit(tmp_path):
    sampled = set(texts(csv_task(tmp_path, LABELS_80_20, train_limit=40).split("train")))
    task = csv_task(tmp_path, LABELS_80_20, train_limit=40, validation=0.25)
    train, validation = texts(task.split("train")), texts(task.split("validation"))
    # the 40 sampled rows are split 30 / 10; nothing outside the sample is used
    assert (len(train), len(validation)) == (30, 10)
    assert set(train) | set(validation) == sampled and not set(train) & set(validation)


def test_eval_split_is_untouched_and_selection_split(tmp_path):
    plain = csv_task(tmp_path, LABELS_80_20)
    task = csv_task(tmp_path, LABELS_80_20, validation=0.1)
    assert texts(task.split("dev")) == texts(plain.split("dev"))
    assert (plain.selection_split, task.selection_split) == ("dev", "validation")
    assert task.describe_split("validation") == "validation (10 rows carved from train)"
    assert task.describe_split("dev") == "dev (dev.csv, 4 rows)"  # the file the user named


def test_digits_validation_is_stratified_and_disjoint():
    task = build("digits", validation=0.1)
    assert task.selection_split == "validation"
    train, validation = task.split("train"), task.split("validation")
    # digits' train split has 1437 images; ceil(143.7) = 144 of them are carved off
    assert (len(train), len(validation)) == (1293, 144)
    assert train.dataset is validation.dataset
    assert not set(train.indices) & set(validation.indices)
    assert sorted([*train.indices, *validation.indices]) == list(range(1437))
    labels = build("digits").split("train").labels
    shares = np.bincount(labels, minlength=10) / len(labels)
    counts = np.bincount([validation[i]["label"] for i in range(len(validation))], minlength=10)
    assert np.all(np.abs(counts - 144 * shares) < 1)  # each class within one row of its share


def test_cifar10_validation_is_carved_from_train(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    zip_path = write_zip(tmp_path / "cifar10-jpeg.zip", cifar_members(train=4, test=2))  # 3 classes
    task = build("cifar10", data_dir=str(zip_path), validation=0.25)
    assert (task.eval_split, task.selection_split) == ("test", "validation")
    train, validation = task.split("train"), task.split("validation")
    assert (len(train), len(validation)) == (9, 3) and not set(train.indices) & set(validation.indices)
    assert sorted(validation[i]["label"] for i in range(3)) == [0, 1, 2]  # stratified: one per class
    assert len(task.split("test")) == 6


def test_lm_fraction_and_file(tmp_path):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(f"passage number {i}" for i in range(20)))
    task = build("lm", corpus={"files": [str(corpus)]}, validation=0.2)
    train = [e["text_a"] for e in task.split("train")]
    validation = [e["text_a"] for e in task.split("validation")]
    assert (len(train), len(validation)) == (16, 4) and not set(train) & set(validation)
    (tmp_path / "val.txt").write_text("held out one\n\nheld out two\nheld out one\n")
    task = build("lm", corpus={"files": [str(corpus)]}, validation=str(tmp_path / "val.txt"))
    assert [e["text_a"] for e in task.split("validation")] == ["held out one", "held out two"]
    assert len(task.split("train")) == 20


# --------------------------------------------------------------------------- files


def glue_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "SST-2"
    folder.mkdir()
    rows = "".join(f"train sentence {i}\t{i % 2}\n" for i in range(6))
    (folder / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (folder / "dev.tsv").write_text("sentence\tlabel\ndev one\t1\n")
    (folder / "held.tsv").write_text("sentence\tlabel\nheld a\t0\nheld b\t1\n")
    return folder


def test_glue_validation_file(tmp_path):
    folder = glue_folder(tmp_path)
    for value in ("held.tsv", str(folder / "held.tsv")):  # relative paths are inside task.data_dir
        task = build("glue/sst2", data_dir=str(folder), validation=value)
        assert [(e["text_a"], e["label"]) for e in task.split("validation")] == [("held a", 0), ("held b", 1)]
        assert len(task.split("train")) == 6  # a file leaves the training rows as they are
        assert task.selection_split == "validation"
        assert task.describe_split("validation") == "validation (2 rows from held.tsv)"


def test_jsonl_validation_file(tmp_path):
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text('{"text": "v", "label": "pos"}\n')
    task = build("jsonl", data_dir=str(tmp_path), train_file="train.jsonl", dev_file="train.jsonl",
                 validation="val.jsonl")
    assert list(task.split("validation")) == [{"text_a": "v", "text_b": None, "label": 1}]
    (tmp_path / "bad.jsonl").write_text('{"text": "v", "label": "maybe"}\n')
    task = build("jsonl", data_dir=str(tmp_path), train_file="train.jsonl", dev_file="train.jsonl",
                 validation="bad.jsonl")
    assert "'maybe'" in error(task.split, "validation")


# --------------------------------------------------------------------------- errors


def test_fraction_leaving_no_training_row(tmp_path):
    task = csv_task(tmp_path, ["a", "b", "a"], validation=0.9)  # ceil(2.7) = 3 of 3 rows
    message = error(task.split, "train")
    assert "task.validation" in message and "no training row" in message


def test_fraction_leaving_no_validation_row(tmp_path):
    task = csv_task(tmp_path, ["a", "b", "a"], validation=1e-12)
    message = error(task.split, "validation")
    assert "task.validation" in message and "no validation row" in message


def test_missing_file_fails_at_construction(tmp_path):
    folder = glue_folder(tmp_path)
    message = error(build, "glue/sst2", data_dir=str(folder), validation="nope.tsv")
    assert "task.validation" in message and "nope.tsv" in message


def test_empty_file(tmp_path):
    folder = glue_folder(tmp_path)
    (folder / "empty.tsv").write_text("sentence\tlabel\n")
    task = build("glue/sst2", data_dir=str(folder), validation="empty.tsv")
    assert "task.validation" in error(task.split, "validation")


def test_image_tasks_take_only_fractions():
    assert "task.validation" in error(build, "digits", validation="val.csv")


def test_no_validation_split_configured(tmp_path):
    assert "task.validation" in error(csv_task(tmp_path, LABELS_80_20).split, "validation")


# --------------------------------------------------------------------------- report


def test_selection_line():
    line = selection_line("validation (10 rows carved from train)", "dev (872 rows)")
    assert line == "best epoch selected on: validation (10 rows carved from train); reported on: dev (872 rows)"
    assert "optimistic" in selection_line("dev (872 rows)", "dev (872 rows)")
    assert selection_line(None, "dev (872 rows)") == "reported on: dev (872 rows)"
    assert selection_line() is None


def test_report_names_the_selection_and_reported_splits(tmp_path):
    latency = {"threads": 1, "repeats": 3, "batch_sizes": {"1": {"median_ms": 2.0}}}
    teacher = ModelReport("teacher", {"accuracy": 0.9}, "accuracy", 0.05, 1000, 1.0, latency)
    student = ModelReport("student", {"accuracy": 0.8}, "accuracy", 0.04, 500, 0.5, latency)
    line = "best epoch selected on: validation (10 rows carved from train); reported on: dev (4 rows)"
    assert "selected on" not in format_table(teacher, student)  # the old call is unchanged
    table = format_table(teacher, student, selected_on="validation (10 rows carved from train)",
                         reported_on="dev (4 rows)")
    assert table.splitlines()[-1] == line
    paths = write_report(tmp_path / "run", teacher, student, "t", "a: 1\n",
                         selected_on="validation (10 rows carved from train)", reported_on="dev (4 rows)")
    assert f"\n{line}\n" in paths["markdown"].read_text() and f"<p>{line}</p>" in paths["html"].read_text()
