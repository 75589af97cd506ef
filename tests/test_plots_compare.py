"""Report charts (training curves, restricted reliability diagram, score vs latency with its Pareto
front) and the ``compare`` page over run folders."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import yaml

from kdforge.errors import KDForgeError
from kdforge.evaluation.compare import compare_runs, config_differences, flatten
from kdforge.evaluation.plots import (
    data_range,
    pareto_front,
    reliability_png,
    score_latency_png,
    split_history_keys,
    training_curves_png,
)
from kdforge.problems.calibration import reliability_bins

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must follow the signature."""
    assert data.startswith(PNG_MAGIC)
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------- Pareto front

POINTS = [
    {"name": "A", "score": 0.80, "latency_ms": 10.0},
    {"name": "B", "score": 0.70, "latency_ms": 5.0},
    {"name": "C", "score": 0.85, "latency_ms": 20.0},
    {"name": "D", "score": 0.75, "latency_ms": 12.0},   # A is faster and better
    {"name": "E", "score": 0.70, "latency_ms": 5.0},    # identical to B: neither dominates the other
    {"name": "F", "score": 0.85, "latency_ms": 30.0},   # C scores the same, faster
    {"name": "G", "score": 0.99, "latency_ms": None},   # not measured: never on the front
]


def test_pareto_front_by_hand():
    # Non-dominated when higher is better: B, E (fastest), A (better than B), C (best); ordered by latency.
    assert pareto_front(POINTS) == [1, 4, 0, 2]
    # When lower scores are better, B/E are fastest and lowest: they dominate every other point.
    assert pareto_front(POINTS, greater_is_better=False) == [1, 4]
    assert pareto_front([]) == []
    assert pareto_front([{"score": 0.5, "latency_ms": 3.0}]) == [0]


# --------------------------------------------------------------------------- training curves


def test_split_history_keys_separates_loss_terms_from_metrics():
    history = [
        {"epoch": 1, "step": 10, "loss": 0.5, "ce": 0.3, "hinton_kd": 0.2, "accuracy": 0.8, "f1": 0.7},
        {"epoch": 2, "step": 20, "loss": 0.4, "ce": 0.25, "attention": 0.1, "f1": 0.75, "accuracy": 0.82,
         "note": "text", "flag": True, "missing": None},
    ]
    losses, metrics = split_history_keys(history, ("f1", "accuracy"))
    assert losses == ["loss", "ce", "hinton_kd", "attention"]
    assert metrics == ["accuracy", "f1"]
    # Without eval metrics every numeric key but epoch/step is a loss term.
    assert split_history_keys(history[:1], ()) == (["loss", "ce", "hinton_kd", "accuracy", "f1"], [])


def test_training_curves_png():
    assert training_curves_png({}, ["accuracy"]) is None
    assert training_curves_png({"teacher fine-tune": []}, ["accuracy"]) is None
    histories = {
        "teacher fine-tune": [{"epoch": e, "step": 10 * e, "loss": 1.0 / e, "accuracy": 0.5 + 0.1 * e}
                              for e in (1, 2, 3)],
        "stage distill": [{"epoch": 1, "step": 7, "loss": 0.9, "ce": 0.5, "hinton_kd": 0.4}],
        "empty": [],
    }
    width, height = png_size(training_curves_png(histories, ["accuracy"]))
    one_row = png_size(training_curves_png({"stage distill": histories["stage distill"]}, ["accuracy"]))
    assert width == one_row[0] and height > 1.5 * one_row[1]  # one panel row per phase that logged an epoch


# --------------------------------------------------------------------------- reliability


def test_data_range_starts_at_the_lowest_non_empty_bin():
    # Confidences 0.55, 0.9, 0.7: with 15 bins ((m-1)/15, m/15], 0.55 * 15 = 8.25 falls in bin 9 = (8/15, 9/15].
    probs = np.array([[0.55, 0.45], [0.9, 0.1], [0.3, 0.7]])
    bins = reliability_bins(probs, np.array([0, 0, 0]), n_bins=15)
    lo, hi = data_range(bins)
    assert lo == pytest.approx(8 / 15) and hi == 1.0
    hand = {"lower": [0.0, 0.25, 0.5, 0.75], "upper": [0.25, 0.5, 0.75, 1.0], "count": [0, 0, 3, 1]}
    assert data_range(hand) == (0.5, 1.0)
    assert data_range({**hand, "count": [0, 0, 0, 0]}) == (0.0, 1.0)


def test_reliability_png_is_a_png():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 3, 200)
    data = reliability_png({"teacher": reliability_bins(probs, labels), "student": reliability_bins(probs, labels)})
    assert png_size(data)[0] > 100
    with pytest.raises(ValueError):
        reliability_png({})


# --------------------------------------------------------------------------- score vs latency


def test_score_latency_png():
    points = [{**p, "low_ms": p["latency_ms"] * 0.9, "high_ms": p["latency_ms"] * 1.3} if p["latency_ms"] else p
              for p in POINTS]
    assert png_size(score_latency_png(points, "accuracy", 1))[0] > 100
    assert score_latency_png(points[:1], "perplexity", 32, greater_is_better=False).startswith(PNG_MAGIC)
    with pytest.raises(ValueError):
        score_latency_png([POINTS[-1]], "accuracy", 1)


# --------------------------------------------------------------------------- compare


def model_report(name: str, score: float, params: int, size_mb: float, b1: float, b32: float,
                 ece: float | None = 0.05) -> dict:
    return {"name": name, "metrics": {"accuracy": score}, "main_metric": "accuracy", "ece": ece,
            "params": params, "size_mb": size_mb,
            "latency": {"threads": 2, "repeats": 3, "batch_sizes": {
                "1": {"median_ms": b1, "p90_ms": b1 * 1.2}, "32": {"median_ms": b32, "p90_ms": b32 * 1.1}}},
            "reliability": None}


def write_run(folder, task: str, student: dict, teacher: dict, config: dict, exports: dict | None = None):
    folder.mkdir(parents=True)
    metrics = {"task": task, "teacher": teacher, "student": student}
    if exports:
        metrics["exports"] = exports
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


CONFIG_A = {"task": {"name": "sst2", "max_length": 128}, "student": {"model": "tiny"},
            "objectives": [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}],
            "train": {"epochs": 3, "lr": 0.001}, "output_dir": "runs/run-a"}
CONFIG_B = {"task": {"name": "sst2", "max_length": 128}, "student": {"model": "tiny", "layers": [0, 2]},
            "objectives": [{"name": "ce", "weight": 0.5}],
            "train": {"epochs": 3, "lr": 0.002}, "output_dir": "runs/run-b"}


def two_runs(tmp_path):
    teacher = model_report("teacher", 0.95, 110_000_000, 438.0, 40.0, 900.0)
    a = write_run(tmp_path / "run-a", "sst2", model_report("student", 0.90, 4_400_000, 17.6, 3.0, 60.0, 0.0312),
                  teacher, CONFIG_A,
                  exports={"student onnx int8": model_report("student onnx int8", 0.89, 4_400_000, 4.4, 1.5, 20.0)})
    b = write_run(tmp_path / "run-b", "sst2", model_report("student", 0.76, 14_500_000, 58.0, 8.25, 150.0, 0.0841),
                  teacher, CONFIG_B)
    return a, b


def md_table(markdown: str, heading: str) -> list[list[str]]:
    """Rows (header first, alignment row dropped) of the first table after ``## heading``."""
    section = markdown.split(f"## {heading}\n\n", 1)[1]
    lines = section.split("\n\n", 1)[0].splitlines()
    return [[c.strip() for c in line.strip().strip("|").split("|")] for i, line in enumerate(lines) if i != 1]


def test_flatten_and_config_differences():
    assert flatten({"a": {"b": 1}, "c": [2, {"d": None}], "e": {}, "f": [1, 2]}) == {
        "a.b": 1, "c.0": 2, "c.1.d": None, "e": {}, "f": [1, 2]}
    diffs = dict(config_differences([CONFIG_A, CONFIG_B]))
    assert diffs == {
        "student.layers": ["(absent)", "[0, 2]"],
        "objectives.1.name": ["hinton_kd", "(absent)"],
        "objectives.1.weight": ["0.5", "(absent)"],
        "objectives.1.temperature": ["4.0", "(absent)"],
        "train.lr": ["0.001", "0.002"],
    }
    assert config_differences([CONFIG_A, dict(CONFIG_A, output_dir="elsewhere")]) == []


def test_compare_runs_page(tmp_path):
    a, b = two_runs(tmp_path)
    paths = compare_runs([a, b], tmp_path / "out")
    assert set(paths) == {"markdown", "html", "plot"}
    markdown = paths["markdown"].read_text()
    table = md_table(markdown, "Runs")
    assert table[0] == ["run", "task", "student accuracy", "teacher accuracy", "retention accuracy", "student ECE",
                        "student params (M)", "student MB on disk", "student b1 (ms)", "student b32 (ms)",
                        "student onnx int8 b1 (ms)", "student onnx int8 b32 (ms)"]
    # retention 100 * 0.90 / 0.95 = 94.74 %, 100 * 0.76 / 0.95 = 80.0 %; params in millions.
    assert table[1] == ["run-a", "sst2", "0.9000", "0.9500", "94.7%", "0.0312", "4.40", "17.60", "3.00", "60.00",
                        "1.50", "20.00"]
    assert table[2] == ["run-b", "sst2", "0.7600", "0.9500", "80.0%", "0.0841", "14.50", "58.00", "8.25", "150.00",
                        "n/a", "n/a"]
    diff = md_table(markdown, "Config differences")
    assert diff[0] == ["config key", "run-a", "run-b"]
    assert [row[0] for row in diff[1:]] == ["student.layers", "objectives.1.name", "objectives.1.weight",
                                            "objectives.1.temperature", "train.lr"]
    assert diff[-1] == ["train.lr", "0.001", "0.002"]
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    for cell in ("94.7%", "80.0%", "objectives.1.temperature", "student onnx int8 b32 (ms)", "run-b"):
        assert f"<td>{cell}</td>" in page or f"<th>{cell}</th>" in page
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC) and "score_latency.png" in markdown


def test_compare_runs_errors(tmp_path):
    a, b = two_runs(tmp_path)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(KDForgeError, match=r"unfinished.*kdforge distill.*kdforge eval") as err:
        compare_runs([a, tmp_path / "unfinished"], tmp_path / "out")
    assert "\n" not in str(err.value)
    (b / "metrics.json").write_text('{"task": "sst2", "teacher": {')  # truncated
    with pytest.raises(KDForgeError, match=r"run-b.*not valid JSON.*kdforge distill.*kdforge eval"):
        compare_runs([a, b], tmp_path / "out")
    cola = write_run(tmp_path / "run-c", "cola", model_report("student", 0.5, 1, 1.0, 1.0, 1.0),
                     model_report("teacher", 0.6, 2, 2.0, 2.0, 2.0), CONFIG_A)
    with pytest.raises(KDForgeError, match=r"different tasks.*run-a \(sst2\).*run-c \(cola\)"):
        compare_runs([a, cola], tmp_path / "out")
    assert not (tmp_path / "out" / "compare.html").exists()


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, captured at the moment they are turned into PNG bytes."""
    from kdforge.evaluation import plots

    figures = []
    real = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or real(fig))
    return figures


def test_the_reliability_diagram_draws_each_bins_accuracy_and_count(drawn):
    hand = {"lower": [0.0, 0.25, 0.5, 0.75], "upper": [0.25, 0.5, 0.75, 1.0], "count": [0, 0, 3, 1],
            "accuracy": [None, None, 2 / 3, 1.0], "ece": 0.1}
    reliability_png({"teacher": hand})
    top, bottom = drawn[0].axes
    bars = [(round(p.get_x(), 6), round(p.get_height(), 6)) for p in top.patches]
    assert bars == [(0.5, round(2 / 3, 6)), (0.75, 1.0)]  # the bins below the data range are cut off
    assert [round(p.get_height()) for p in bottom.patches] == [3, 1]
    assert top.get_xlim() == (0.5, 1.0) and "teacher (ECE 0.1000)" in [t.get_text() for t in top.get_legend().texts]


def test_the_score_latency_chart_draws_every_measured_point_and_joins_the_front(drawn):
    score_latency_png(POINTS, "accuracy", 1)
    ax = drawn[0].axes[0]
    plotted = {tuple(np.round(c.get_offsets()[0], 6)) for c in ax.collections if len(c.get_offsets())}
    assert plotted == {(p["latency_ms"], p["score"]) for p in POINTS if p["latency_ms"]}  # G (no latency) left out
    step = next(line for line in ax.lines if line.get_label() == "Pareto front")
    front = sorted(zip(step.get_xdata(), step.get_ydata(), strict=True))
    assert front[0] == (5.0, 0.70) and front[-1] == (20.0, 0.85) and (10.0, 0.80) in front
    assert (12.0, 0.75) not in front and (30.0, 0.85) not in front  # dominated by A and by C
