"""Hugging Face ``datasets`` data: the ``hf_dataset`` task (save_to_disk folders, data files read by
``load_dataset``, ClassLabel labels, one-line errors, fingerprints) and DataLoaders over a ``Dataset`` in the
:class:`kdforge.Distiller` API. Local files only: the Hub is switched off for every test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import kdforge
from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.tasks.base import TASKS, Task, build_task
from tests.helpers import sentiment_rows, tiny_bert, write_csv

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def offline_datasets(monkeypatch, tmp_path):
    """No Hub access, and load_dataset's cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def csv_files(folder: Path, train: int = 40, dev: int = 16) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return (write_csv(folder / "train.csv", sentiment_rows(train, seed=1)),
            write_csv(folder / "dev.csv", sentiment_rows(dev, seed=2)))


def saved_dict(folder: Path, train_csv: Path, dev_csv: Path, class_label: bool = False) -> Path:
    """The CSV files as a DatasetDict (train, validation) written by save_to_disk to ``folder``."""
    data = datasets.load_dataset("csv", data_files={"train": str(train_csv), "validation": str(dev_csv)})
    if class_label:
        data = data.class_encode_column("label")
    data.save_to_disk(str(folder))
    return folder


def hf_task(**keys) -> Task:
    return build_task(TaskConfig(name="hf_dataset", **keys))


def examples(task, split: str) -> list[dict]:
    data = task.split(split)
    return [data[i] for i in range(len(data))]


def test_hf_dataset_is_registered():
    assert "hf_dataset" in TASKS.names()


def test_a_saved_dataset_dict_gives_the_csv_tasks_rows(tmp_path):
    train_csv, dev_csv = csv_files(tmp_path / "csv")
    saved = saved_dict(tmp_path / "saved", train_csv, dev_csv)
    task = hf_task(dataset=str(saved))
    csv = build_task(TaskConfig(name="csv", train_file=str(train_csv), dev_file=str(dev_csv)))
    assert task.label_names == csv.label_names == ["neg", "pos"]
    assert examples(task, "train") == examples(csv, "train") and len(task.split("train")) == 40
    assert examples(task, "dev") == examples(csv, "dev") and len(task.split("dev")) == 16
    assert task.describe_split("dev") == f"dev (split 'validation' of {saved}, 16 rows)"


def test_data_files_through_load_dataset_and_a_single_saved_dataset(tmp_path):
    train_csv, dev_csv = csv_files(tmp_path)
    datasets.Dataset.from_csv(str(dev_csv)).to_parquet(str(tmp_path / "dev.parquet"))
    datasets.Dataset.from_csv(str(train_csv)).save_to_disk(str(tmp_path / "train-saved"))
    csv = build_task(TaskConfig(name="csv", train_file=str(train_csv), dev_file=str(dev_csv)))
    from_files = hf_task(train_file=str(train_csv), dev_file="dev.parquet", data_dir=str(tmp_path))
    single = hf_task(dataset=str(tmp_path / "train-saved"), dev_file=str(tmp_path / "dev.parquet"))
    for task in (from_files, single):
        assert examples(task, "train") == examples(csv, "train") and examples(task, "dev") == examples(csv, "dev")


def test_a_class_label_column_gives_its_names_in_order(tmp_path):
    train_csv, dev_csv = csv_files(tmp_path)
    names = ["pos", "neg", "neutral"]  # not sorted, and one class never seen
    data = datasets.load_dataset("csv", data_files={"train": str(train_csv), "dev": str(dev_csv)})
    data.cast_column("label", datasets.ClassLabel(names=names)).save_to_disk(str(tmp_path / "saved"))
    task = hf_task(dataset=str(tmp_path / "saved"))
    assert task.label_names == names and task.num_labels == 3
    raw = [row[1] for row in sentiment_rows(40, seed=1)]
    assert [example["label"] for example in examples(task, "train")] == [names.index(label) for label in raw]
    # task.label_names still decides the label space (the class names are looked up in it)
    renamed = hf_task(dataset=str(tmp_path / "saved"), label_names=["neg", "pos", "neutral"])
    assert [example["label"] for example in examples(renamed, "train")] == [int(label == "pos") for label in raw]


def test_validation_may_name_a_split(tmp_path):
    train_csv, dev_csv = csv_files(tmp_path)
    data = datasets.load_dataset("csv", data_files={"train": str(train_csv), "validation": str(dev_csv),
                                                    "test": str(dev_csv)})
    data.save_to_disk(str(tmp_path / "saved"))
    task = hf_task(dataset=str(tmp_path / "saved"), dev_split="test", validation="validation")
    assert len(task.split("validation")) == 16 and len(task.split("train")) == 40  # train whole: not carved
    assert task.selection_split == "validation"
    assert task.describe_split("validation") == "validation (16 rows from validation)"


def test_errors_are_one_line(tmp_path, monkeypatch):
    train_csv, dev_csv = csv_files(tmp_path)
    saved = saved_dict(tmp_path / "saved", train_csv, dev_csv)
    cases = [
        (dict(dataset=str(tmp_path / "nope")), f"dataset folder {tmp_path / 'nope'} not found; fix `task.dataset`"),
        (dict(dataset=str(tmp_path)), "is not a folder written by datasets' save_to_disk"),
        (dict(dataset=str(saved), dev_split="test"),
         "split 'test' not found in " + str(saved) + " (splits: train, validation); set `task.dev_split`"),
        (dict(dataset=str(saved), train_split="training"), "(splits: train, validation); set `task.train_split`"),
        (dict(dataset=str(saved), text_columns=["sentence"]),
         "column 'sentence' not found in split 'train' of " + str(saved) + " (columns: 'text', 'label'); "
         "fix `task.text_columns`"),
        (dict(dataset=str(saved), label_column="y"), "(columns: 'text', 'label'); fix `task.label_column`"),
        (dict(dataset=str(saved), validation="held-out"),
         "`task.validation: held-out` names no split of " + str(saved) + " (splits: train, validation)"),
        (dict(train_file=str(saved), dev_file=str(dev_csv)), "holds several splits (train, validation); give it as "
         "`task.dataset`"),
        (dict(train_file=str(tmp_path / "missing.csv"), dev_file=str(dev_csv)), "missing.csv not found; fix "
         "`task.train_file`"),
        (dict(), "set `task.dataset`"),
    ]
    for keys, message in cases:
        with pytest.raises(KDForgeError) as err:
            task = hf_task(**keys)
            task.split("dev")
        assert message in str(err.value) and "\n" not in str(err.value), keys
    (tmp_path / "train.txt").write_text("text,label\n")
    (tmp_path / "broken.json").write_text('{"text": "good", "label": "pos"}\n{"text": \n')
    features = datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=["neg", "pos"]))
    datasets.Dataset.from_dict({"text": ["good", "awful"], "label": [1, -1]}, features=features).save_to_disk(
        str(tmp_path / "unlabelled"))
    cases = [
        (dict(train_file=str(tmp_path / "train.txt"), dev_file=str(dev_csv)),
         "train.txt with datasets: give a .csv, .tsv, .json, .jsonl, .parquet, .arrow file"),
        (dict(train_file=str(tmp_path / "broken.json"), dev_file=str(dev_csv)),
         "broken.json with load_dataset('json'): "),
        (dict(train_file=str(tmp_path / "unlabelled"), dev_file=str(dev_csv)),
         f"row 1 of {tmp_path / 'unlabelled'}: label '-1' is outside the label space [neg, pos]"),
    ]
    for keys, message in cases:
        with pytest.raises(KDForgeError) as err:
            hf_task(**keys).split("train")
        assert message in str(err.value) and "\n" not in str(err.value), keys
    datasets.Dataset.from_csv(str(train_csv)).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(KDForgeError, match=r"no 'validation' or 'dev' split in .* \(splits: train\); set "
                                           r"`task.dev_split` to one of them or give the rows as `task.dev_file`"):
        hf_task(dataset=str(tmp_path / "single")).split("dev")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(KDForgeError, match=r'the `datasets` package, which is not installed; pip install '
                                           r'"kdforge\[hf\]"'):
        hf_task(dataset=str(saved))


def test_the_fingerprint_follows_the_data(tmp_path):
    train_csv, dev_csv = csv_files(tmp_path / "a")
    saved = saved_dict(tmp_path / "saved", train_csv, dev_csv)
    first = hf_task(dataset=str(saved)).fingerprint()
    assert hf_task(dataset=str(saved)).fingerprint() == first  # stable: caches are reused
    assert hf_task(dataset=str(saved), max_length=32).fingerprint() != first  # the config counts too
    write_csv(train_csv, sentiment_rows(40, seed=3))
    saved_dict(saved, train_csv, dev_csv)  # new training rows saved over the old ones
    assert hf_task(dataset=str(saved)).fingerprint() != first
    files = hf_task(train_file=str(train_csv), dev_file=str(dev_csv))
    before = files.fingerprint()
    write_csv(dev_csv, sentiment_rows(16, seed=4))  # a data file changed in place
    assert hf_task(train_file=str(train_csv), dev_file=str(dev_csv)).fingerprint() != before


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_distill_from_a_saved_dataset_matches_the_csv_run(tmp_path, job_tree, sentiment_dir):
    """The same job on the CSV files and on them saved as a DatasetDict: the same rows, so the same run."""
    saved = saved_dict(tmp_path / "saved", sentiment_dir / "train.csv", sentiment_dir / "dev.csv", class_label=True)
    runs = {}
    for name, task in (("csv", {}), ("hf", {"name": "hf_dataset", "dataset": str(saved), "train_file": None,
                                            "dev_file": None})):
        tree = json.loads(json.dumps(job_tree))
        tree["task"].update(task)
        tree["output_dir"] = str(tmp_path / name)
        result = kdforge.distill(tree)
        runs[name] = result, json.loads((result.run_dir / "metrics.json").read_text())
    (csv, csv_saved), (hf, hf_saved) = runs["csv"], runs["hf"]
    assert hf.teacher.metrics["accuracy"] >= 0.85 and hf.student.metrics["accuracy"] >= 0.75  # learned
    assert hf_saved["reported_on"] == f"dev (split 'validation' of {saved}, 64 rows)"
    assert csv_saved["reported_on"] == "dev (dev.csv, 64 rows)"
    assert hf_saved["student"]["per_class"]["labels"] == ["neg", "pos"]
    assert hf_saved["student"]["per_class"] == csv_saved["student"]["per_class"]  # same rows, same predictions
    assert hf.teacher.metrics == pytest.approx(csv.teacher.metrics)
    assert hf.student.metrics == pytest.approx(csv.student.metrics)


# --------------------------------------------------------------------------- the Distiller API


def tokenized(tokenizer, n: int, seed: int):
    rows = sentiment_rows(n, seed)
    data = datasets.Dataset.from_dict({"text": [text for text, _ in rows],
                                       "label": [int(label == "pos") for _, label in rows]})
    return data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=16), batched=True,
                    remove_columns=["text"])


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_distiller_learns_from_loaders_over_a_dataset(tmp_path, tokenizer_dir):
    """A DataLoader over a tokenized ``Dataset``: padded by DataCollatorWithPadding (which returns a
    BatchEncoding), or in the torch format with its ``label`` column (taken as ``labels``)."""
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train, dev = tokenized(tokenizer, 256, 1), tokenized(tokenizer, 64, 2)
    collate = DataCollatorWithPadding(tokenizer)
    padded = DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)
    padded_dev = DataLoader(dev, batch_size=32, collate_fn=collate)
    torch.manual_seed(0)
    teacher = tiny_bert(len(tokenizer))
    kdforge.Distiller(None, teacher, objectives=["ce"], output_dir=tmp_path / "t").fit(
        padded, padded_dev, epochs=3, lr=3e-3, device="cpu")

    def fixed_length(data):
        return data.map(lambda b: tokenizer.pad(b, padding="max_length", max_length=16), batched=True).with_format(
            "torch")

    torch_train = DataLoader(fixed_length(train), batch_size=16, shuffle=True)
    torch_dev = DataLoader(fixed_length(dev), batch_size=32)
    assert "label" in next(iter(torch_dev)) and "labels" not in next(iter(torch_dev))
    student = tiny_bert(len(tokenizer), layers=2, seed=1)
    distiller = kdforge.Distiller(teacher, student, objectives=[
        {"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0}],
        output_dir=tmp_path / "s")
    before = distiller.evaluate(torch_dev)["accuracy"]
    distiller.fit(torch_train, torch_dev, epochs=3, lr=3e-3, device="cpu")
    teacher_accuracy = kdforge.Distiller(None, teacher, objectives=["ce"]).evaluate(padded_dev)["accuracy"]
    assert teacher_accuracy > 0.9
    assert before < 0.7 and distiller.evaluate(torch_dev)["accuracy"] > 0.9
    assert distiller.evaluate(padded_dev)["accuracy"] == distiller.evaluate(torch_dev)["accuracy"]
