"""``kdforge study`` end to end on tiny models: one teacher shared by every run, the report's numbers
recomputed from the runs, a resumed study that trains nothing again, two worker processes on one
SQLite study, a killed worker whose run is run again, and bad input refused before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from kdforge import api
from kdforge.cli import main
from kdforge.study.stats import paired_difference, verdict

pytestmark = pytest.mark.slow


@pytest.fixture
def study_tree(job_tree, tmp_path) -> dict:
    job_tree["train"].update(trackers=[], epochs=1)
    job_tree["eval"].update(latency_batch_sizes=[1], latency_repeats=1)
    return {"base": job_tree, "rows": {"ce only": {"objectives": [{"name": "ce"}]}, "kd": {}},
            "seeds": [0, 1], "baseline": "ce only", "heartbeat_s": 1,
            "claims": [{"a": "kd", "b": "ce only", "paper": 1.0, "source": "a paper"}],
            "teacher_published": {"value": 0.9, "source": "a model card"},
            "output_dir": str(tmp_path / "study")}


def stored(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder.resolve() / 'study.db'}")


def finetunings(folder: Path) -> list[Path]:
    return sorted(folder.glob("teachers/*/finetune.json"))


def test_study_end_to_end(study_tree, one_thread, tmp_path):
    study_tree["publish_dir"] = str(tmp_path / "published")
    result = api.study(study_tree)
    folder = result.folder
    for name in ("study.md", "study.json", "study.html"):  # the report, also where it is published
        assert (tmp_path / "published" / name).read_bytes() == (folder / name).read_bytes()
    assert len(result.summaries) == 4
    assert len(finetunings(folder)) == 1  # one teacher, fine-tuned once for the 4 runs
    shared = finetunings(folder)[0].parent / "model"
    for summary in result.summaries.values():
        saved = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
        assert saved["teacher"] == {**saved["teacher"], "model": str(shared), "finetune": None}
        assert not (Path(summary["run_dir"]) / "teacher").exists()  # no run fine-tuned a teacher of its own
    # every run's teacher is the same model: the same score
    assert len({s["teacher"]["accuracy"] for s in result.summaries.values()}) == 1
    report = json.loads((folder / "study.json").read_text())
    assert report["complete"] and report["teachers"][0]["score"] == next(iter(result.summaries.values()))[
        "teacher"]["accuracy"]
    teacher = next(iter(result.summaries.values()))["teacher"]  # its similarity information, from its metrics.json
    assert 0 <= teacher["non_target_mass"] <= 1 and teacher["non_target_entropy"] is None  # two classes
    assert report["teacher_predictors"] == [] and "grids" not in report  # one teacher, no axes
    shared_folder = Path(next(iter(result.summaries.values()))["run_dir"]).parents[2] / "teachers"
    name = report["teachers"][0]["teacher"]  # as a reader knows it, with its shared folder
    assert name.startswith("teacher: ") and "fine-tuned" in name and any(
        f"(folder {p.name})" in name for p in shared_folder.iterdir())
    by_row = {r: {s["seed"]: s["value"] for s in result.summaries.values() if s["row"] == r} for r in ("kd", "ce only")}
    diff = paired_difference(by_row["kd"], by_row["ce only"])
    [claim] = report["claims"]
    assert claim["difference"]["mean"] == pytest.approx(diff.mean) and claim["verdict"] == verdict(diff)
    kd_row = next(r for r in report["rows"] if r["row"] == "kd")
    assert kd_row["difference"]["low"] == pytest.approx(diff.low) and kd_row["differs_in"] == ["objectives"]
    md = (folder / "study.md").read_text()
    assert "Teachers" in md and "Claims" in md and f"{100 * diff.mean:+.2f} pts" in md
    assert "0.9000 (a model card)" in md
    assert "the paper reports +1.00 pts (a paper)" in md
    assert (folder / "study.html").read_text().startswith("<!DOCTYPE html>")
    # resumed: nothing is trained again, nothing changes
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("runs/**/metrics.json")}
    trials = len(stored(folder).trials)
    again = api.study(study_tree)
    assert len(stored(folder).trials) == trials and again.summaries == result.summaries
    assert {p: p.stat().st_mtime_ns for p in folder.glob("runs/**/metrics.json")} == stamps


def test_a_new_seed_extends_the_study(study_tree, one_thread):
    study_tree["seeds"] = [0]
    api.study(study_tree)
    folder = Path(study_tree["output_dir"])
    study_tree["seeds"] = [0, 1]
    result = api.study(study_tree)
    assert len(result.summaries) == 4 and len(finetunings(folder)) == 1
    done = [t for t in stored(folder).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4  # the seed-0 runs were not run again


def test_bad_row_refused_before_training(study_tree, tmp_path, capsys):
    study_tree["rows"]["kd"] = {"objectives": [{"name": "hinton_kd", "temperature": -1}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_tree))
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "kd" in err and "temperature" in err
    assert not (Path(study_tree["output_dir"]) / "teachers").exists()


def worker_processes(config: Path, count: int, extra=()) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "kdforge.cli", "study", str(config), *extra], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(count)]


def two_workers_run_every_run_once(study_tree: dict, path: Path, load_study) -> None:
    """Start the study, then two ``--join`` workers: every run is run once, by one of the two processes."""
    path.write_text(yaml.safe_dump(study_tree))
    assert main(["study", str(path), "--report-only"]) == 0  # starts the study (runs nothing): workers join it
    workers = worker_processes(path, 2, ["--join"])
    errors = [w.communicate(timeout=900)[1].decode()[-800:] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n---\n".join(errors)
    complete = [t for t in load_study().trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["run"] for t in complete) == sorted(
        f"{row} / seed {s}" for row in ("ce only", "kd") for s in (0, 1, 2))  # every run once, none twice
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both processes ran runs


def test_two_workers_share_one_sqlite_study(study_tree, tmp_path):
    study_tree["seeds"] = [0, 1, 2]
    folder, path = Path(study_tree["output_dir"]), tmp_path / "study.yaml"
    two_workers_run_every_run_once(study_tree, path, lambda: stored(folder))
    assert len(finetunings(folder)) == 1
    assert main(["study", str(path)]) == 0  # nothing left: only the report
    assert len(stored(folder).trials) == len(stored(folder).trials) and (folder / "study.html").is_file()


def test_killed_worker_run_is_run_again(study_tree, tmp_path):
    study_tree["base"]["train"]["epochs"] = 4  # runs of a few seconds, so the kill lands inside one
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_tree))
    folder = Path(study_tree["output_dir"])
    [worker] = worker_processes(path, 1)
    deadline, killed = time.monotonic() + 600, None
    while killed is None and time.monotonic() < deadline and worker.poll() is None:
        if (folder / "study.db").is_file():
            try:
                trials = stored(folder).trials
            except Exception:  # noqa: BLE001  (the study is being created)
                trials = []
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            busy = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            if done and busy:
                time.sleep(1.0)
                worker.send_signal(signal.SIGKILL)
                killed = busy[0]
        time.sleep(0.1)
    worker.wait(timeout=60)
    assert killed is not None, f"the study ended before it was killed mid-run: {worker.stderr.read().decode()}"
    done_before = {t.user_attrs["run"] for t in stored(folder).trials if t.state == optuna.trial.TrialState.COMPLETE}
    time.sleep(2.5)  # longer than the grace period (2 heartbeats): the killed run is stale
    assert main(["study", str(path)]) == 0
    trials = stored(folder).trials
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL  # only the running run was lost
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and killed.user_attrs["run"] in {t.user_attrs["run"] for t in complete}
    assert all(sum(t.user_attrs["run"] == run for t in complete) == 1 for run in done_before)  # none redone
