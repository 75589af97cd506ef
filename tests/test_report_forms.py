"""What the report says (issue 24), on files alone: a run's newest measurements (every later evaluation and
latency measurement laid over the training run's results) in the printed table and in ``kdforge compare``,
and latency timed at the run's own ``task.max_length`` with the length printed. Nothing trains here; the
end-to-end paths (export, bench-latency, the run's report, the demo) are in tests/test_deploy_report.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from kdforge.config import EvalConfig, TaskConfig
from kdforge.evaluation.compare import compare_runs, load_run
from kdforge.evaluation.latest import latest_measurements
from kdforge.evaluation.model_report import ModelReport, describe_timing, format_table
from kdforge.evaluation.run_report import result_table

INT8 = "student onnx int8"


def report(name: str, score: float, ms: float, size_mb: float = 4.0, seq_len: int = 16) -> dict:
    """A ``metrics.json`` model report timed at batch sizes 1 and 4."""
    latency = {"threads": 1, "warmup": 1, "repeats": 3, "interleaved": True, "inputs": {"seq_len": seq_len},
               "batch_sizes": {str(bs): {"median_ms": ms * bs, "p90_ms": ms * bs * 1.1} for bs in (1, 4)}}
    return ModelReport(name, {"accuracy": score}, "accuracy", 0.05, 1_000_000, size_mb, latency).to_dict()


def timing(speedups: dict[str, float], noisy: list[str] = ()) -> dict:
    """An interleaved measurement's summary: each form's speedup over the teacher at b1 and b4."""
    return {"reference": "teacher", "noisy": bool(noisy), "noisy_reasons": list(noisy),
            "speedup": {name: {str(bs): {"ratio": r, "low": r - 0.5, "high": r + 0.5} for bs in (1, 4)}
                        for name, r in speedups.items()}}


def provenance(date: str, cpu: str) -> dict:
    return {"date": date, "cpu": cpu, "logical_cpus": 2, "command": "kdforge distill c.yaml"}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def measured_run(tmp_path) -> tuple[Path, dict]:
    """A finished run trained without ONNX, then: a bench-latency, an export with int8, an export killed
    before its metrics.json, and a newer bench-latency (on another CPU, noisy)."""
    run = tmp_path / "run"
    saved = {"task": "csv", "teacher": report("teacher", 0.90, 10.0), "student": report("student", 0.88, 4.0),
             "exports": {}, "baseline": None, "warnings": [], "reported_on": "dev (64 rows)",
             "latency": timing({"student": 2.5}), "provenance": provenance("2025-01-01T00:00:00+00:00", "CPU-A")}
    write_json(run / "metrics.json", saved)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "csv", "max_length": 16}}))
    write_json(run / "latency/2025-01-01T12-00-00Z/latency.json",
               {"models": {"teacher": report("teacher", 0, 9.0)["latency"], "student": report("s", 0, 3.0)["latency"]},
                **timing({"student": 3.0}), "provenance": provenance("2025-01-01T12:00:00+00:00", "CPU-A")})
    write_json(run / "evaluations/2025-01-02T00-00-00Z/metrics.json",
               {**copy.deepcopy(saved), "teacher": report("teacher", 0.90, 11.0),
                "student": report("student", 0.88, 4.4),
                "exports": {INT8: report(INT8, 0.87, 1.0, size_mb=1.2)},
                "latency": timing({"student": 2.5, INT8: 11.0}),
                "provenance": provenance("2025-01-02T00:00:00+00:00", "CPU-B")})
    killed = run / "evaluations/2025-01-03T00-00-00Z"
    killed.mkdir(parents=True)
    (killed / "report.md").write_text("# an evaluation killed before its metrics.json")
    write_json(run / "latency/2025-01-04T00-00-00Z/latency.json",
               {"models": {name: report(name, 0, ms)["latency"] for name, ms in
                           (("teacher", 12.0), ("student", 4.0), (INT8, 0.8), ("student onnx fp32", 2.0))},
                **timing({"student": 3.0, INT8: 15.0, "student onnx fp32": 6.0}, ["machine load 5.0 on 2 CPUs"]),
                "provenance": provenance("2025-01-04T00:00:00+00:00", "CPU-C")})
    return run, saved


def test_each_form_takes_its_newest_score_and_latency(measured_run):
    run, saved = measured_run
    before = copy.deepcopy(saved)
    latest = latest_measurements(saved, run)
    assert saved == before  # the run's own results are not changed
    assert latest["measured_again"] == ["latency/2025-01-01T12-00-00Z", "evaluations/2025-01-02T00-00-00Z",
                                        "latency/2025-01-04T00-00-00Z"]  # oldest first; the killed one is none
    int8 = latest["exports"][INT8]
    assert int8["metrics"]["accuracy"] == 0.87 and int8["size_mb"] == 1.2  # scored by the export
    assert int8["latency"]["batch_sizes"]["1"]["median_ms"] == 0.8  # timed by the newer bench-latency
    assert "student onnx fp32" not in latest["exports"]  # timed, but never scored: not a form of the run
    measured = latest["measured"][INT8]
    assert (measured["score"]["where"], measured["latency"]["where"]) == ("evaluations/2025-01-02T00-00-00Z",
                                                                          "latency/2025-01-04T00-00-00Z")
    assert measured["latency"]["cpu"] == "CPU-C"
    assert latest["latency"]["speedup"][INT8]["1"]["ratio"] == 15.0  # the speedup of the measurement that timed it
    assert latest["latency"]["noisy"] and "machine load 5.0 on 2 CPUs" in latest["latency"]["noisy_reasons"][0]
    assert latest["latency_from"] == "latency/2025-01-04T00-00-00Z"


def test_the_printed_table_has_every_form_with_where_it_was_measured(measured_run):
    run, saved = measured_run
    table = result_table(latest_measurements(saved, run))
    row = next(line for line in table.splitlines() if line.startswith(f"{INT8} "))
    cells = [c.strip() for c in row.split("|")]
    assert cells == [INT8, "0.8700", "0.0500", "1.00", "1.20", "0.80", "3.20"]  # score, ECE, params, MB, b1, b4
    speedup = next(line for line in table.splitlines() if line.startswith(INT8) and "x [" in line)
    assert "15.00x [14.50-15.50]" in speedup
    assert ("score from evaluations/2025-01-02T00-00-00Z (2025-01-02T00:00:00+00:00); latency from "
            "latency/2025-01-04T00-00-00Z (2025-01-04T00:00:00+00:00) on CPU-C (2 logical CPUs)") in table
    assert "2025-01-03" not in table
    assert table.splitlines()[-1].startswith("WARNING: latency noisy: machine load 5.0 on 2 CPUs")
    # nothing measured after training: the table of the run's own results
    empty = run.parent / "untouched"
    write_json(empty / "metrics.json", saved)
    assert result_table(latest_measurements(saved, empty)) == result_table(saved)


def test_compare_uses_each_runs_newest_forms(measured_run, tmp_path):
    run, _ = measured_run
    metrics, _ = load_run(run)
    assert metrics["exports"][INT8]["metrics"]["accuracy"] == 0.87
    markdown = compare_runs([run], tmp_path / "cmp")["markdown"].read_text()
    header, _, row = markdown.split("## Runs\n\n", 1)[1].splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")], strict=True))
    assert cells[f"{INT8} b1 (ms)"] == "0.80" and cells["student b1 (ms)"] == "4.00"
    assert "evaluations/2025-01-02T00-00-00Z" in markdown and "latency/2025-01-04T00-00-00Z" in markdown
    assert "Latency timed at sequence length 16 tokens, batch sizes 1 and 4." in markdown


def test_compare_warns_when_runs_were_timed_on_other_lengths(measured_run, tmp_path):
    run, saved = measured_run
    other = tmp_path / "other"
    write_json(other / "metrics.json", {**saved, "student": report("student", 0.8, 6.0, seq_len=64)})
    (other / "config.yaml").write_text((run / "config.yaml").read_text())
    markdown = compare_runs([run, other], tmp_path / "cmp")["markdown"].read_text()
    assert ("**Warning: the runs were timed on different inputs (run: sequence length 16 tokens, batch sizes 1 "
            "and 4; other: sequence length 64 tokens, batch sizes 1 and 4)") in markdown


def test_a_broken_later_measurement_is_one_error_line(measured_run):
    from kdforge.errors import KDForgeError

    run, saved = measured_run
    (run / "latency/2025-01-04T00-00-00Z/latency.json").write_text('{"models": ')
    with pytest.raises(KDForgeError, match=r"latency\.json.*delete .*2025-01-04T00-00-00Z") as err:
        latest_measurements(saved, run)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- latency at the run's length


def test_latency_is_timed_at_the_tasks_max_length_unless_set():
    task = TaskConfig(name="csv", max_length=32)
    assert EvalConfig().latency_seq_len is None and EvalConfig().timed_seq_len(task) == 32
    assert EvalConfig(latency_seq_len=8).timed_seq_len(task) == 8  # an explicit value wins


def test_the_timed_inputs_are_said():
    text = report("student", 0.9, 2.0, seq_len=32)["latency"]
    assert describe_timing(text) == "sequence length 32 tokens, batch sizes 1 and 4"
    image = {**text, "inputs": {"image_shape": [3, 32, 32]}, "batch_sizes": {"1": {"median_ms": 1.0}}}
    assert describe_timing(image) == "images 3x32x32, batch size 1"
    assert describe_timing({**text, "inputs": None}) == "batch sizes 1 and 4"  # an older measurement
    assert describe_timing({}) is None
    table = format_table(ModelReport.from_dict(report("teacher", 0.9, 5.0, seq_len=32)),
                         ModelReport.from_dict(report("student", 0.9, 2.0, seq_len=32)))
    assert "sequence length 32 tokens, batch sizes 1 and 4" in table.splitlines()[5]


def test_the_latency_input_has_the_tasks_length(job_tree, tiny_teacher_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdforge.config import validate_config
    from kdforge.evaluation.evaluate import input_maker
    from kdforge.models.loading import LoadedModel
    from kdforge.tasks.base import build_task

    del job_tree["eval"]["latency_seq_len"]
    job_tree["task"]["max_length"] = 12
    config = validate_config(job_tree)
    loaded = LoadedModel(AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir),
                         AutoTokenizer.from_pretrained(tiny_teacher_dir))
    make, inputs = input_maker(loaded, build_task(config.task), config.eval)
    assert inputs == {"seq_len": 12} and tuple(make(3)["input_ids"].shape) == (3, 12)
    config.eval.latency_seq_len = 20
    make, inputs = input_maker(loaded, build_task(config.task), config.eval)
    assert inputs == {"seq_len": 20} and tuple(make(2)["input_ids"].shape) == (2, 20)


def test_the_run_report_shows_the_similarity_information_of_each_classifier(tmp_path):
    from kdforge.evaluation.run_page import write_report

    teacher, student = (ModelReport.from_dict(report(name, 0.9, 2.0)) for name in ("teacher", "student"))
    write_report(tmp_path, teacher, student, "t", "")
    assert "Similarity information" not in (tmp_path / "report.md").read_text()  # two classes: nothing measured
    teacher.similarity = {"non_target_entropy": 0.6123, "confusion_rank_correlation": 0.4, "non_target_mass": 0.1}
    student.similarity = {"non_target_entropy": 0.8, "confusion_rank_correlation": None, "non_target_mass": 0.2}
    write_report(tmp_path, teacher, student, "t", "")
    text = (tmp_path / "report.md").read_text()
    assert "## Similarity information in the responses" in text
    assert "| teacher | 0.6123 | 0.4000 | 0.1000 |" in text and "| student | 0.8000 | n/a | 0.2000 |" in text


def test_the_newest_int8_record_goes_with_the_evaluation_that_made_it(measured_run, tmp_path):
    from kdforge.evaluation.run_report import write_run_report

    run, saved = measured_run
    static = {"mode": "static", "calibration": {"rows": 256, "split": "train", "seed": 0}}
    evaluation = run / "evaluations/2025-01-02T00-00-00Z/metrics.json"
    write_json(evaluation, {**json.loads(evaluation.read_text()), "int8": static})
    latest = latest_measurements({**saved, "int8": {"mode": "dynamic"}}, run)
    assert latest["int8"] == static
    assert "student onnx int8: static int8, calibrated on 256 train rows (seed 0)" in result_table(latest)
    write_run_report(tmp_path, {**saved, "int8": {"mode": "dynamic"}}, "", {}, True, latest)
    newest = (tmp_path / "report.md").read_text().split("## Teacher vs student")[0]
    assert "static int8, calibrated on 256 train rows" in newest  # the newest section says how it was made


def test_a_noisy_page_names_the_command_that_measures_again(tmp_path):
    from kdforge.evaluation.run_page import Findings, write_report

    teacher, student = (ModelReport.from_dict(report(name, 0.9, 2.0)) for name in ("teacher", "student"))
    noisy = {**timing({"student": 2.0}, ["machine load 5.0 on 2 CPUs"]), "models": {}}
    write_report(tmp_path, teacher, student, "t", "", findings=Findings(latency=noisy))
    assert "`kdforge bench-latency RUN_DIR`" in (tmp_path / "report.md").read_text()
    write_report(tmp_path, teacher, student, "t", "",
                 findings=Findings(latency=noisy, remeasure="Distiller.report(...)"))
    text = (tmp_path / "report.md").read_text()
    assert "machine load 5.0 on 2 CPUs" in text and "`Distiller.report(...)`" in text and "bench-latency" not in text
