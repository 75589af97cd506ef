"""The run folder: every path inside a run built in one place (kdforge.run_folder), a finished run
never lost while another replaces it, and what marks a run finished. Files only: nothing trains."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.run_folder import REPORT_IMAGES, Results, RunFolder, TeacherFolder

SRC = Path(__file__).resolve().parents[1] / "src" / "kdforge"

#: names that only a run folder's layout uses: a string literal equal to one of them is a path being built
RUN_NAMES = {"config.yaml", "train.log", "metrics.json", "finetune.json", "student-compact", "checkpoints",
             "evaluations", "mlruns", ".previous-run", "teacher.onnx", "student.onnx", "student.int8.onnx",
             "latency.json", "latency.md", "report.md", "report.html", *REPORT_IMAGES}
#: a search folder (not a run folder) has a report of its own
ELSEWHERE = {"search/report.py": {"report.md", "report.html"}}


def test_every_path_of_the_layout(tmp_path):
    run = RunFolder(tmp_path)
    got = {
        "config": run.config_file, "log": run.train_log, "metrics": run.metrics, "student": run.student,
        "compact": run.student_compact, "teacher": run.teacher("teacher").root,
        "teacher model": run.teacher("teacher").model, "teacher record": run.teacher("teacher").record,
        "named teacher": run.teacher("t2").model, "assistant": run.model("ta"), "student model": run.model("student"),
        "exports": run.exports, "marker": run.stage_marker("kd"), "snapshot": run.stage_snapshot("kd"),
        "fsbbt": run.fsbbt_set("kd"), "checkpoints": run.checkpoints("kd"), "tensorboard": run.tracker("tensorboard"),
        "mlflow": run.tracker("mlflow"), "wandb": run.tracker("wandb"), "report": run.report_md,
        "html": run.report_html, "reliability": run.image("reliability.png"), "previous": run.previous_run,
    }
    expected = {
        "config": "config.yaml", "log": "train.log", "metrics": "metrics.json", "student": "student",
        "compact": "student-compact", "teacher": "teacher", "teacher model": "teacher/model",
        "teacher record": "teacher/finetune.json", "named teacher": "teachers/t2/model", "assistant": "models/ta",
        "student model": "student", "exports": "exports", "marker": "stages/kd.json", "snapshot": "stages/kd.pt",
        "fsbbt": "stages/kd-fsbbt.npz", "checkpoints": "checkpoints/kd", "tensorboard": "tensorboard",
        "mlflow": "mlruns", "wandb": "wandb", "report": "report.md", "html": "report.html",
        "reliability": "reliability.png", "previous": ".previous-run",
    }
    assert {k: p.relative_to(tmp_path).as_posix() for k, p in got.items()} == expected
    assert {k: p.relative_to(tmp_path).as_posix() for k, p in run.onnx_files().items()} == {
        "teacher onnx fp32": "exports/teacher.onnx", "student onnx fp32": "exports/student.onnx",
        "student onnx int8": "exports/student.int8.onnx"}
    evaluation, latency = run.new_evaluation(), run.new_latency()
    assert evaluation.root.parent == tmp_path / "evaluations" and latency.root.parent == tmp_path / "latency"
    assert evaluation.metrics == evaluation.root / "metrics.json" and latency.latency_json.name == "latency.json"
    evaluation.root.mkdir(parents=True)
    assert run.new_evaluation().root.name == f"{evaluation.root.name}-2"  # an old evaluation is never reused
    assert TeacherFolder(tmp_path / "shared").record == tmp_path / "shared" / "finetune.json"


def test_no_other_module_builds_a_path_inside_a_run():
    """Each name of the layout is a string literal only in run_folder.py (docstrings and messages aside)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        if name == "run_folder.py":
            continue
        allowed = ELSEWHERE.get(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in RUN_NAMES - allowed:
                found.append(f"{name}:{node.lineno} {node.value!r}")
    assert not found, "paths inside a run built outside RunFolder: " + ", ".join(found)


def test_latency_measurements_oldest_first(tmp_path):
    run = RunFolder(tmp_path)
    for stamp in ("2024-02-01T00-00-00Z", "2024-01-01T00-00-00Z", "2024-03-01T00-00-00Z"):
        folder = tmp_path / "latency" / stamp
        folder.mkdir(parents=True)
        if stamp != "2024-03-01T00-00-00Z":  # a measurement killed before its latency.json is not one
            (folder / "latency.json").write_text("{}")
    assert [r.root.name for r in run.latency_measurements()] == ["2024-01-01T00-00-00Z", "2024-02-01T00-00-00Z"]


def finished_run(root: Path, tag: str) -> dict[str, str]:
    """Write a fake finished run's results (and a fine-tuned teacher) into ``root``; returns them by name."""
    files = {"config.yaml": tag, "student/config.json": tag, "exports/student.onnx": tag, "report.md": tag,
             "reliability.png": tag, "stages/kd.json": tag, "evaluations/d/metrics.json": tag,
             "metrics.json": tag}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def contents(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_finished_is_marked_by_metrics_json_alone(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not run.finished and not Results(tmp_path / "nothing").finished
    files = finished_run(run.root, "old")
    run.metrics.unlink()
    assert not run.finished  # every other result written, but not metrics.json: not finished
    run.metrics.write_text(files["metrics.json"])
    assert run.finished


def test_a_finished_run_is_refused_without_overwrite(tmp_path):
    run = RunFolder(tmp_path / "run")
    finished_run(run.root, "old")
    with pytest.raises(KDForgeError, match="already holds a finished run; pass --overwrite"):
        run.prepare(resume=False, overwrite=False)
    run.prepare(resume=True, overwrite=False)  # resuming it changes nothing
    assert contents(run.root)["metrics.json"] == "old" and not run.previous_run.exists()


def test_overwrite_keeps_the_old_results_until_the_new_ones_are_complete(tmp_path):
    run = RunFolder(tmp_path / "run")
    old = finished_run(run.root, "old")
    (run.teacher("teacher").model).mkdir(parents=True)
    (run.teacher("teacher").record).write_text("teacher")  # a fine-tuned teacher is not a result: it stays
    run.prepare(resume=False, overwrite=True)
    assert contents(run.previous_run) == old
    assert not run.finished and [*contents(run.root)] == [*(f".previous-run/{n}" for n in sorted(old)),
                                                           "teacher/finetune.json"]
    finished_run(run.root, "new")  # the new run writes everything, metrics.json last
    config = validate_config({"task": {"name": "digits"}, "teacher": {"model": "vision:resnet8"},
                              "output_dir": str(run.root)})
    run.checkpoints("distill").mkdir(parents=True)
    assert run.cleanup_pending(config)
    run.finish(config)
    assert not run.previous_run.exists() and not run.checkpoints("distill").exists()
    assert not run.cleanup_pending(config)
    assert {k: v for k, v in contents(run.root).items() if v == "new"} == {k: "new" for k in old}


def test_a_failed_overwrite_moves_the_old_results_back(tmp_path):
    run = RunFolder(tmp_path / "run")
    old = finished_run(run.root, "old")
    run.prepare(resume=False, overwrite=True)
    (run.root / "config.yaml").write_text("new")  # partial results of the new run
    run.student.mkdir()
    (run.student / "partial.bin").write_text("new")
    assert run.restore_previous()
    assert contents(run.root) == old and not run.previous_run.exists()
    assert not run.restore_previous()  # nothing set aside any more


def test_a_new_run_that_wrote_its_metrics_is_not_undone(tmp_path):
    run = RunFolder(tmp_path / "run")
    finished_run(run.root, "old")
    run.prepare(resume=False, overwrite=True)
    run.metrics.write_text("new")
    assert not run.restore_previous() and run.previous_run.is_dir()


def test_a_kill_while_setting_aside_is_undone_at_the_next_start(tmp_path):
    run = RunFolder(tmp_path / "run")
    old = finished_run(run.root, "old")
    staging = run.root / ".previous-run.tmp"
    staging.mkdir()
    for name in ("config.yaml", "report.md"):  # killed after moving two results
        (run.root / name).rename(staging / name)
    with pytest.raises(KDForgeError, match="already holds a finished run"):
        run.prepare(resume=False, overwrite=False)
    assert contents(run.root) == old and not staging.exists()


def test_open_finished_reads_the_run_from_its_folder_or_its_config(tmp_path):
    run = RunFolder(tmp_path / "run")
    tree = {"task": {"name": "digits"}, "teacher": {"model": "vision:resnet8"}, "output_dir": str(run.root)}
    run.root.mkdir()
    run.config_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(KDForgeError, match="student does not exist; run `kdforge distill` first"):
        RunFolder.open_finished(run.root)
    run.student.mkdir()
    for target in (run.root, run.config_file):
        config, opened = RunFolder.open_finished(target)
        assert opened.root == run.root and config.task.name == "digits"
