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
