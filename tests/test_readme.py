"""The README's "Your own data" examples run as written, on small generated files (only the model sizes
and epochs are shrunk to test size)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import kdforge
from tests.helpers import sentiment_rows, write_csv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

README = Path(__file__).parents[1] / "README.md"


def own_data_section() -> str:
    return README.read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]


def own_data_blocks() -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", own_data_section(), re.S)]


def test_the_readme_has_a_text_a_hf_dataset_and_an_image_example():
    text, hf, images = own_data_blocks()
    assert text["task"]["name"] == "csv" and hf["task"]["name"] == "hf_dataset"
    assert images["task"]["name"] == "image_folder"


def test_the_text_example_runs(tmp_path, monkeypatch, tiny_teacher_dir):
    tree = own_data_blocks()[0]
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    write_csv(Path(tree["task"]["train_file"]), sentiment_rows(120, seed=1))
    write_csv(Path(tree["task"]["dev_file"]), sentiment_rows(40, seed=2))
    tree["teacher"].update(model=str(tiny_teacher_dir), finetune={"epochs": 1, "lr": 3e-3, "batch_size": 16})
    tree["student"]["layers"] = [0, 3]  # the tiny teacher has 4 layers
    tree["train"].update(epochs=1, batch_size=16, lr=3e-3, trackers=[])
    tree["eval"] = {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0}
    result = kdforge.distill(tree)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["reported_on"] == "dev (dev.csv, 40 rows)" and saved["selected_on"].startswith("validation")
    assert saved["student"]["per_class"]["labels"] == ["neg", "pos"]


def test_the_hf_dataset_example_runs(tmp_path, monkeypatch, tiny_teacher_dir):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    tree = own_data_blocks()[1]
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    write_csv(Path("data/train.csv"), sentiment_rows(120, seed=1))
    write_csv(Path("data/dev.csv"), sentiment_rows(40, seed=2))
    (code,) = re.findall(r"```python\n(.*?)```", own_data_section(), re.S)
    exec(code, {})  # writes the dataset the config names
    tree["teacher"].update(model=str(tiny_teacher_dir), finetune={"epochs": 1, "lr": 3e-3, "batch_size": 16})
    tree["student"]["layers"] = [0, 3]
    tree["train"].update(epochs=1, batch_size=16, lr=3e-3, trackers=[])
    tree["eval"] = {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0}
    result = kdforge.distill(tree)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["reported_on"] == "dev (split 'validation' of data/my-hf, 40 rows)"
    assert saved["selected_on"].startswith("validation (12 rows carved from train)")
    assert saved["student"]["per_class"]["labels"] == ["neg", "pos"]


def test_the_image_example_runs(tmp_path, monkeypatch):
    tree = own_data_blocks()[2]
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for label, colour in (("red", 0), ("blue", 2)):
            folder = Path(tree["task"]["data_dir"]) / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
                pixels[..., colour] += 180
                Image.fromarray(pixels).save(folder / f"{i}.png")
    tree["teacher"]["finetune"].update(epochs=1, batch_size=16)
    tree["train"].update(epochs=1, batch_size=16, trackers=[])
    tree["eval"] = {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0}
    result = kdforge.distill(tree)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["student"]["per_class"]["labels"] == ["blue", "red"] and saved["reported_on"].startswith("val")


def api_blocks() -> list[str]:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_api_config_example_names_a_config_and_overrides_that_load(monkeypatch):
    from kdforge.config import load_config

    loaded = []
    monkeypatch.setattr(kdforge, "distill", lambda path, overrides: loaded.append(load_config(
        Path(__file__).parents[1] / path, overrides)) or type("Result", (), {"table": ""})())
    exec(api_blocks()[0], {})
    assert loaded[0].task.name == "glue/sst2" and loaded[0].train.epochs == 2


def test_the_api_distiller_example_runs_on_your_own_modules(tmp_path, monkeypatch):
    """The README's Distiller block, run as written on scikit-learn's digits and two small MLPs."""
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    train, val, test = torch.utils.data.random_split(data, [1200, 200, 397], torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    kdforge.Distiller(None, teacher, objectives=["ce"], output_dir=tmp_path / "t").fit(
        DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=128), epochs=10, lr=3e-3)
    student = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    monkeypatch.chdir(tmp_path)
    names = {"kdforge": kdforge, "teacher": teacher, "student": student,
             "train_loader": DataLoader(train, batch_size=64, shuffle=True),
             "val_loader": DataLoader(val, batch_size=128), "test_loader": DataLoader(test, batch_size=128)}
    exec(api_blocks()[1], names)
    assert names["report"].student.metrics["accuracy"] > 0.8
    assert (tmp_path / "runs/api/report/report.html").is_file()
    assert (tmp_path / "my-student/model.safetensors").is_file()
