"""Tests of kdforge.evaluation (calibration, latency, size, report) and kdforge.io."""

from __future__ import annotations

import base64
import json
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

import kdforge.io as kio
from kdforge.evaluation import latency as latency_mod
from kdforge.evaluation.latency import image_inputs, measure_latency, model_latency, text_inputs
from kdforge.evaluation.model_report import (
    ModelReport,
    comparison_rows,
    comparison_summary,
    format_table,
)
from kdforge.evaluation.run_page import write_report
from kdforge.evaluation.size import count_parameters, dir_size_mb, size_on_disk_mb
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.models.outputs import Outputs
from kdforge.problems.calibration import expected_calibration_error, reliability_bins

# --------------------------------------------------------------------------- calibration

# 4 samples, 2 classes, 5 bins: (0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1]
TOY_PROBS = np.array([[0.90, 0.10],   # conf .90 -> bin 5, predicts 0, label 0: correct
                      [0.15, 0.85],   # conf .85 -> bin 5, predicts 1, label 0: wrong
                      [0.70, 0.30],   # conf .70 -> bin 4, predicts 0, label 0: correct
                      [0.35, 0.65]])  # conf .65 -> bin 4, predicts 1, label 1: correct
TOY_LABELS = np.array([0, 0, 0, 1])


def test_ece_hand_derived():
    # bin 5: acc = 1/2 = .5,  conf = (.90 + .85)/2 = .875, gap .375, weight 2/4 -> .1875
    # bin 4: acc = 2/2 = 1.0, conf = (.70 + .65)/2 = .675, gap .325, weight 2/4 -> .1625
    # ECE = .1875 + .1625 = .35
    assert expected_calibration_error(TOY_PROBS, TOY_LABELS, n_bins=5) == pytest.approx(0.35)
    # one bin: |overall acc - mean conf| = |3/4 - (.9 + .85 + .7 + .65)/4| = |.75 - .775| = .025
    assert expected_calibration_error(TOY_PROBS, TOY_LABELS, n_bins=1) == pytest.approx(0.025)


def test_reliability_from_confidence_matches_the_probability_rows():
    from kdforge.problems.calibration import reliability_from_confidence

    confidence = TOY_PROBS.max(axis=1)
    correct = TOY_PROBS.argmax(axis=1) == TOY_LABELS
    assert reliability_from_confidence(confidence, correct, 5) == reliability_bins(TOY_PROBS, TOY_LABELS, 5)
    assert reliability_from_confidence(confidence, correct, 5)["ece"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="one length"):
        reliability_from_confidence(confidence, correct[:2], 5)


def test_ece_perfect_calibration_is_zero():
    # 10 samples at confidence .8, 8 of them correct: acc(B) = conf(B) = .8
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(one_hot, np.array([0, 1, 2, 1])) == 0.0


def test_bin_edge_convention():
    # a confidence of exactly k/15 falls in bin k = ((k-1)/15, k/15]; just above it in bin k+1
    for k in range(1, 16):
        bins = reliability_bins(np.array([[k / 15, 0.0]]), np.array([0]), n_bins=15)
        assert bins["count"][k - 1] == 1 and sum(bins["count"]) == 1
        if k < 15:
            above = np.nextafter(k / 15, 1.0)
            assert reliability_bins(np.array([[above, 0.0]]), np.array([0]), n_bins=15)["count"][k] == 1


def test_reliability_bins_respect_n_bins_and_are_json():
    bins = reliability_bins(TOY_PROBS, TOY_LABELS, n_bins=5)
    assert bins["n_bins"] == 5 and bins["n_samples"] == 4
    assert bins["lower"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert bins["upper"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins["count"] == [0, 0, 0, 2, 2]
    assert bins["accuracy"][:3] == [None, None, None] and bins["confidence"][0] is None
    assert bins["accuracy"][3:] == pytest.approx([1.0, 0.5])
    assert bins["confidence"][3:] == pytest.approx([0.675, 0.875])
    assert bins["ece"] == pytest.approx(0.35)
    json.dumps(bins, allow_nan=False)  # strict JSON: no NaN
    for m in (1, 7, 15, 40):
        assert len(reliability_bins(TOY_PROBS, TOY_LABELS, n_bins=m)["count"]) == m


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(TOY_PROBS, np.array([0, 1]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(TOY_PROBS, TOY_LABELS, n_bins=0)


# --------------------------------------------------------------------------- latency


def test_latency_sleep_lower_bound_and_call_count():
    calls = []

    def forward(batch_size):
        calls.append(batch_size)
        assert torch.is_inference_mode_enabled()
        time.sleep(0.002)

    result = measure_latency(forward, batch_sizes=(1, 4), warmup=2, repeats=3)
    assert calls == [1] * 5 + [4] * 5  # 2 warm-up + 3 timed per batch size
    assert set(result["batch_sizes"]) == {"1", "4"}
    for bs, stats in result["batch_sizes"].items():
        assert stats["median_ms"] >= 2.0 and stats["mean_ms"] >= 2.0 and stats["p90_ms"] >= 2.0
        assert stats["per_sample_ms"] == pytest.approx(stats["median_ms"] / int(bs))
    assert json.loads(json.dumps(result)) == result


def test_latency_warmup_not_timed_exact_stats(monkeypatch):
    clock = [0.0]
    timed_ms = iter([1.0, 2.0, 3.0, 4.0, 10.0])
    calls = [0]

    def forward(batch_size):
        calls[0] += 1
        # the 2 warm-up calls take 100 s each on the fake clock; the timed ones 1, 2, 3, 4, 10 ms
        clock[0] += 100.0 if calls[0] <= 2 else next(timed_ms) / 1e3

    monkeypatch.setattr(latency_mod, "perf_counter", lambda: clock[0])
    stats = measure_latency(forward, batch_sizes=(2,), warmup=2, repeats=5)["batch_sizes"]["2"]
    assert calls[0] == 7
    assert stats["median_ms"] == pytest.approx(3.0)
    assert stats["mean_ms"] == pytest.approx(4.0)
    assert stats["p90_ms"] == pytest.approx(7.6)  # linear: 4 + 0.6 * (10 - 4)
    assert stats["per_sample_ms"] == pytest.approx(1.5)


def test_latency_threads_set_and_restored():
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    seen = []
    result = measure_latency(lambda bs: seen.append(torch.get_num_threads()), (1,), warmup=0, repeats=1,
                             threads=wanted)
    assert seen == [wanted] and result["threads"] == wanted
    assert torch.get_num_threads() == before

    def boom(batch_size):
        raise RuntimeError("fail")

    with pytest.raises(RuntimeError):
        measure_latency(boom, (1,), threads=wanted)
    assert torch.get_num_threads() == before


def test_input_helpers_and_model_latency():
    batch = text_inputs(30522, batch_size=2, seq_len=8)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape == (2, 8) and int(batch["input_ids"].min()) >= 1000
    assert torch.equal(batch["input_ids"], text_inputs(30522, 2, 8)["input_ids"])  # seeded
    assert batch["attention_mask"].eq(1).all() and batch["token_type_ids"].eq(0).all()

    class FakeTokenizer:
        model_input_names = ["input_ids", "attention_mask"]

        def __len__(self):
            return 50

    small = text_inputs(FakeTokenizer(), 3, 4)
    assert set(small) == {"input_ids", "attention_mask"} and int(small["input_ids"].max()) < 50
    assert image_inputs(2, (3, 8, 8)).shape == (2, 3, 8, 8)

    model = nn.Linear(3 * 8 * 8, 2)
    model.train()
    result = model_latency(model, lambda bs: image_inputs(bs, (3 * 8 * 8,)), batch_sizes=(1, 32),
                           warmup=1, repeats=2)
    assert set(result["batch_sizes"]) == {"1", "32"} and model.training

    class Kw(nn.Module):
        calls: list = []

        def forward(self, input_ids, attention_mask, token_type_ids):
            self.calls.append((input_ids.shape, attention_mask.shape, token_type_ids.shape))
            return input_ids.float().sum()

    kw = Kw()
    result = model_latency(kw, lambda bs: text_inputs(100, bs, 4), batch_sizes=(2,), warmup=0, repeats=3)
    assert kw.calls == [((2, 4), (2, 4), (2, 4))] * 3  # every input passed by keyword, every timed run
    assert result["batch_sizes"]["2"]["median_ms"] > 0


# --------------------------------------------------------------------------- size


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.head = nn.Linear(64, 1000, bias=False)
        self.head.weight = self.embed.weight


def test_count_parameters():
    assert count_parameters(nn.Linear(10, 5)) == 55
    assert count_parameters(Tied()) == 64_000
    alias = nn.Module()
    alias.a = nn.Linear(4, 4, bias=False)
    alias.b = nn.Linear(4, 4, bias=False)
    alias.b.weight = nn.Parameter(alias.a.weight.data)  # different Parameter, same memory
    assert count_parameters(alias) == 16
    frozen = nn.Linear(10, 5)
    frozen.bias.requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == 50


def test_size_on_disk(tmp_path):
    n = 1000 * 250 + 250
    size = size_on_disk_mb(nn.Linear(1000, 250))
    assert 4 * n / 1e6 <= size <= 4 * n / 1e6 + 0.01
    tied = size_on_disk_mb(Tied())
    assert 4 * 64_000 / 1e6 <= tied <= 4 * 64_000 / 1e6 + 0.01  # stored once
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 500_000)
    assert dir_size_mb(tmp_path) == pytest.approx(0.501)
    with pytest.raises(FileNotFoundError):
        dir_size_mb(tmp_path / "missing")


# --------------------------------------------------------------------------- report


def _latency(b1: float, b32: float) -> dict:
    return {"threads": 4, "warmup": 3, "repeats": 10, "batch_sizes": {
        "1": {"median_ms": b1, "p90_ms": b1, "mean_ms": b1, "per_sample_ms": b1},
        "32": {"median_ms": b32, "p90_ms": b32, "mean_ms": b32, "per_sample_ms": b32 / 32}}}


def _reports(reliability: bool = False) -> tuple[ModelReport, ModelReport]:
    rel_t = reliability_bins(TOY_PROBS, TOY_LABELS) if reliability else None
    rel_s = reliability_bins(TOY_PROBS[::-1], TOY_LABELS) if reliability else None
    teacher = ModelReport("bert-base", {"accuracy": 0.9, "f1": 0.88}, "accuracy", 0.05,
                          110_000_000, 440.0, _latency(20.0, 300.0), rel_t)
    student = ModelReport("bert-6L", {"accuracy": 0.882, "f1": 0.86}, "accuracy", 0.03,
                          66_000_000, 264.0, _latency(8.0, 100.0), rel_s)
    return teacher, student


def test_format_table_numbers():
    teacher, student = _reports()
    table = format_table(teacher, student)
    # retention: accuracy .882/.9 = 98.0 %, f1 .86/.88 = 97.7 %; params 66/110 = size 264/440 = 0.60;
    # speedup b1 20/8 = 2.50, b32 300/100 = 3.00
    ratio_line = next(line for line in table.splitlines() if line.startswith("student / teacher"))
    assert re.findall(r"[\d.]+[%x]", ratio_line) == ["98.0%", "97.7%", "0.60x", "0.60x", "2.50x", "3.00x"]
    header = table.splitlines()[0]
    assert [c.strip() for c in header.split("|")] == [
        "model", "accuracy", "f1", "ECE", "params (M)", "MB on disk", "latency b1 (ms)", "latency b32 (ms)"]
    assert "110.00" in table and "0.0500" in table and "threads: 4" in table
    lines = table.splitlines()[:5]
    assert len({len(line) for line in lines}) == 1  # aligned
    summary = comparison_summary(teacher, student)
    assert summary["speedup"] == pytest.approx({"1": 2.5, "32": 3.0})
    assert summary["retention_pct"]["accuracy"] == pytest.approx(98.0)


def test_report_regression_and_negative_metrics():
    teacher, student = _reports()
    teacher.metrics, student.metrics, teacher.main_metric = {"mcc": 0.5}, {"mcc": -0.1}, "mcc"
    teacher.ece = student.ece = None
    teacher_row, student_row, ratio_row = comparison_rows(teacher, student)
    assert teacher_row["ECE"] == student_row["ECE"] == "n/a"
    assert ratio_row["mcc"] == "-20.0%"  # plain ratio for metrics that can be negative
    teacher.metrics = {"mcc": 0.0}
    assert comparison_rows(teacher, student)[2]["mcc"] == "n/a"


def test_write_report(tmp_path):
    teacher, student = _reports(reliability=True)
    history = [{"epoch": 1, "step": 10, "loss": 0.71234, "eval_accuracy": 0.8},
               {"epoch": 2, "step": 20, "loss": 0.5, "eval_accuracy": 0.85}]
    paths = write_report(tmp_path / "run", teacher, student, "SST-2: bert-base -> bert-6L",
                         "task:\n  name: glue/sst2\n", history)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["reliability.png", "report.html", "report.md",
                                                      "score-latency.png", "training.png"]
    assert set(paths) == {"markdown", "html", "reliability", "score-latency", "training"}
    md = paths["markdown"].read_text()
    assert md.startswith("# SST-2: bert-base -> bert-6L")
    assert "| model | accuracy |" in md and "98.0%" in md and "```yaml\ntask:\n  name: glue/sst2\n```" in md
    assert "| epoch | step | loss | eval_accuracy |" in md and "0.7123" in md
    assert "![reliability diagram](reliability.png)" in md
    page = paths["html"].read_text()
    assert '<img src="data:image/png;base64,' in page and "<table>" in page and "98.0%" in page
    embedded = re.search(r'base64,([^"]+)" alt="reliability diagram"', page).group(1)
    assert base64.b64decode(embedded) == paths["reliability"].read_bytes()
    assert "bert-base -&gt; bert-6L" in page

    teacher.reliability = None
    paths = write_report(tmp_path / "run2", teacher, student, "t", "a: 1\n")
    assert set(paths) == {"markdown", "html", "score-latency"} and 'alt="reliability' not in paths["html"].read_text()
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == ["report.html", "report.md", "score-latency.png"]


def test_model_report_round_trip():
    teacher, _ = _reports(reliability=True)
    assert ModelReport.from_dict(json.loads(json.dumps(teacher.to_dict()))) == teacher


# --------------------------------------------------------------------------- io


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"accuracy": 0.9, "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"accuracy": 0.9, "n": 3}
    assert path.read_text().startswith('{\n  "accuracy"')  # indent=2

    class Boom:
        def tolist(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        atomic_write_json(path, {"ok": 1, "bad": Boom()})
    assert json.loads(path.read_text()) == {"accuracy": 0.9, "n": 3}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(kio.os, "replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "new content")
    assert json.loads(path.read_text()) == {"accuracy": 0.9, "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # temp file removed


def test_footer_says_a_model_was_not_timed():
    from kdforge.evaluation.model_report import ModelReport, footer_lines

    untimed = ModelReport("teacher", {"accuracy": 0.9}, "accuracy", 0.05, 0, 0.0, {})
    timed = ModelReport("student", {"accuracy": 0.8}, "accuracy", 0.06, 10, 1.0, {"threads": 1, "repeats": 3})
    assert "torch threads: teacher not timed, student 1 (median of 3 timed runs)" in footer_lines(untimed, timed)[0]


def test_an_ensemble_form_averages_its_members_probabilities():
    from kdforge.evaluation.evaluate import EnsembleAdapter

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, batch):
            return Outputs(logits=self.logits)

    a, b = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [0.0, 1.0, 0.0]]
    out = EnsembleAdapter([Fixed(a), Fixed(b)])({})
    mean = (torch.softmax(torch.tensor(a), -1) + torch.softmax(torch.tensor(b), -1)) / 2
    torch.testing.assert_close(torch.softmax(out.logits, -1), mean)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(2))  # the logits are log probabilities
    # sample 0: member a says class 0 (p 0.79), b class 2 (p 0.91): the ensemble picks 2
    assert out.logits.argmax(-1).tolist() == [2, 1]
