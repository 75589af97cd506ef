"""``kdforge search`` end to end on tiny models: KD-NAS and AutoKD from the API and the CLI, the
reward recorded per trial, the best candidate distilled and reported, a killed search resumed, and
two worker processes sharing one study in SQLite and in a real PostgreSQL."""

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
from kdforge.config import validate_config
from kdforge.errors import KDForgeError

pytestmark = pytest.mark.slow

SPACE = {"layers": [1, 2], "hidden_size": [16, 32], "head_dim": [16], "intermediate_size": [32, 64],
         "temperature": [], "kd_weight": []}


@pytest.fixture
def search_tree(job_tree, tmp_path) -> dict:
    tree = dict(job_tree)
    tree.pop("student")
    tree["train"] = {**tree["train"], "trackers": []}
    tree["search"] = {"method": "kdnas", "trials": 4, "proxy_rows": 64, "proxy_epochs": 1, "space": SPACE,
                      "latency_repeats": 2, "final_top": 1, "heartbeat_s": 10}
    tree["output_dir"] = str(tmp_path / "search")
    return tree


def write_config(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def stored_study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder.resolve() / 'study.db'}")


def test_kdnas_search_end_to_end(search_tree, one_thread):
    result = api.search(search_tree)
    complete = [r for r in result.trials if r["state"] == "COMPLETE"]
    assert len(complete) == 4
    for r in complete:  # reward = score x (latency / target)^w, target = teacher latency / 3
        assert r["reward"] == pytest.approx(r["score"] * (r["latency_ratio"] * 3.0) ** -0.07)
        assert r["values"] == [pytest.approx(r["reward"])]
        assert set(r["choices"]) == {"layers", "hidden_size", "head_dim", "intermediate_size"}
    best = result.best[0]
    top = max(complete, key=lambda r: r["reward"])
    assert best["trial"] == top["number"]
    final = validate_config(yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text()))
    choices = top["choices"]
    assert final.student.config["hidden_size"] == choices["hidden_size"]
    assert len(final.student.layers) == choices["layers"]
    assert best["student"]["params"] == top["params"]  # the final student is the searched candidate
    # ... distilled with the terms the proxy ranked it with: the job's and KD-NAS's hidden-state term
    assert [o.name for o in final.objectives] == [o["name"] for o in search_tree["objectives"]] + ["tinybert_hidden"]
    assert (Path(best["run_dir"]) / "report.html").is_file()
    html = (result.folder / "report.html").read_text()
    assert "Every candidate" in html and "data:image/png;base64" in html and "kdforge distill" in html
    assert (result.folder / "search-pareto.png").is_file() and (result.folder / "search-progress.png").is_file()
    saved = json.loads((result.folder / "trials.json").read_text())
    assert [t["number"] for t in saved["trials"]] == [0, 1, 2, 3]


def test_autokd_pareto_from_cli(search_tree, tmp_path, one_thread, capsys):
    search_tree["search"].update(method="autokd", objective="pareto", trials=3, final_top=0,
                                 space={**SPACE, "temperature": [1.0, 4.0], "kd_weight": [0.5, 0.9]})
    config = write_config(search_tree, tmp_path / "search.yaml")
    assert main(["search", str(config)]) == 0
    study = stored_study(Path(search_tree["output_dir"]))
    assert len(study.trials) == 3 and all(len(t.values) == 2 for t in study.trials)
    for t in study.trials:  # AutoKD's loss: (1 - a) CE + a KD_T
        logit_terms = t.user_attrs["overrides"]["objectives"]
        assert logit_terms[1] == {"name": "hinton_kd", "weight": t.params["kd_weight"],
                                  "temperature": t.params["temperature"]}
    assert "Every candidate" in (Path(search_tree["output_dir"]) / "report.md").read_text()


@pytest.mark.parametrize("change, says", [({"objective": "pareto"}, "search.objective"),  # with kdnas
                                          ({"space": {"layers": [0]}}, "search.space.layers"),
                                          ({"space": {"blocks": [1]}}, "search.space.blocks")])  # a CNN dimension
def test_bad_search_settings_are_one_line_before_training(search_tree, tmp_path, capsys, change, says):
    search_tree["search"].update(change)
    config = write_config(search_tree, tmp_path / "bad.yaml")
    assert main(["search", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err
    assert not (Path(search_tree["output_dir"]) / "teacher").exists()  # refused before the teacher's fine-tuning


def run_worker_processes(config: Path, count: int, extra=()) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "kdforge.cli", "search", str(config), *extra], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(count)]


def check_two_workers(tree: dict, config: Path, storage_kwargs: dict) -> None:
    optuna.create_study(**storage_kwargs, direction="maximize")  # started first: the workers join it
    workers = run_worker_processes(config, 2, ["--join"])
    errors = [w.communicate(timeout=600)[1].decode()[-800:] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n---\n".join(errors)
    study = optuna.load_study(**storage_kwargs)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert tree["search"]["trials"] <= len(finished) <= tree["search"]["trials"] + 1
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both processes ran trials


def test_two_workers_share_one_sqlite_study(search_tree, tmp_path):
    search_tree["search"].update(method="random", trials=6, final_top=0)
    config = write_config(search_tree, tmp_path / "search.yaml")
    folder = Path(search_tree["output_dir"])
    folder.mkdir(parents=True)
    check_two_workers(search_tree, config, {"study_name": "search",
                                            "storage": f"sqlite:///{folder.resolve() / 'study.db'}"})
    assert main(["search", str(config)]) == 0  # the budget is spent: only the report is written
    assert len(stored_study(folder).trials) <= 7 and (folder / "report.html").is_file()


def test_killed_search_resumes_where_it_stopped(search_tree, tmp_path):
    # trials of a few seconds each, so the kill lands inside one
    search_tree["search"].update(method="kdnas", trials=4, final_top=0, proxy_rows=256, proxy_epochs=3,
                                 heartbeat_s=1)
    config = write_config(search_tree, tmp_path / "search.yaml")
    folder = Path(search_tree["output_dir"])
    [worker] = run_worker_processes(config, 1)
    deadline = time.monotonic() + 300
    running = None
    while running is None and time.monotonic() < deadline and worker.poll() is None:  # kill it in its 2nd trial
        if (folder / "study.db").is_file():
            try:
                trials = stored_study(folder).trials
            except Exception:  # noqa: BLE001  (the study is being created)
                trials = []
            training = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and "speedup" in t.user_attrs]
            if training and any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
                worker.send_signal(signal.SIGKILL)  # the candidate is chosen and timed: it is training now
                running = training[0]
        time.sleep(0.1)
    worker.wait(timeout=60)
    assert running is not None, f"the search ended before it was killed mid-trial: {worker.stderr.read().decode()}"
    running = stored_study(folder).trials[running.number]  # as the kill left it (every choice made by then)
    done_before = [t.number for t in stored_study(folder).trials if t.state == optuna.trial.TrialState.COMPLETE]
    time.sleep(2.5)  # longer than the grace period (2 heartbeats): the killed trial is stale
    assert main(["search", str(config)]) == 0
    trials = stored_study(folder).trials
    by_number = {t.number: t for t in trials}
    assert by_number[running.number].state == optuna.trial.TrialState.FAIL  # only the running trial was lost
    assert all(by_number[n].state == optuna.trial.TrialState.COMPLETE for n in done_before)
    retried = [t for t in trials if running.number in t.system_attrs.get("retry_history", [])]
    assert len(retried) == 1 and retried[0].params == running.params  # the lost candidate was run again
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4
    assert f"complete (rerun of #{running.number})" in (folder / "trials.md").read_text()


def test_resnet_search_on_digits(tmp_path, one_thread):
    """A CNN teacher gets the ResNet space: candidates are parametric CIFAR ResNets, fresh, without the
    hidden-state term, and the best is distilled into a loadable vision student."""
    tree = {"task": {"name": "digits", "train_limit": 400, "eval_limit": 100},
            "teacher": {"model": "vision:small_cnn", "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 64}},
            "objectives": [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}],
            "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3, "device": "cpu", "trackers": []},
            "eval": {"latency_batch_sizes": [1, 8], "latency_repeats": 2, "latency_warmup": 1},
            "search": {"method": "random", "trials": 2, "proxy_rows": 128, "proxy_epochs": 1, "final_top": 1,
                       "latency_repeats": 2, "space": {"blocks": [1], "width": [4, 8], "temperature": [],
                                                       "kd_weight": []}},
            "output_dir": str(tmp_path / "digits-search")}
    result = api.search(tree)
    complete = [r for r in result.trials if r["state"] == "COMPLETE"]
    assert len(complete) == 2 and {r["choices"]["width"] for r in complete} <= {4, 8}
    for r in complete:
        assert r["overrides"]["student"] == {"model": f"vision:resnet8_w{r['choices']['width']}"}
    best = result.best[0]
    assert best["student"]["params"] == max(complete, key=lambda r: r["reward"])["params"]
    assert (Path(best["run_dir"]) / "student").is_dir()


def test_proxy_task_is_a_fixed_subset_of_the_training_rows(job_tree):
    from kdforge.search.proxy import ProxyTask
    from kdforge.tasks.base import build_task

    task = build_task(validate_config({**job_tree, "task": {**job_tree["task"], "validation": 0.25}}).task)
    first, again = ProxyTask(task, 50, seed=3), ProxyTask(task, 50, seed=3)
    train = [task.split("train")[i]["text_a"] for i in range(len(task.split("train")))]
    rows = [first.split("train")[i]["text_a"] for i in range(50)]
    assert len(first.split("train")) == 50 and set(rows) <= set(train)
    assert rows == [again.split("train")[i]["text_a"] for i in range(50)]  # every trial, every worker: the same
    assert len(first.split("validation")) == len(task.split("validation"))  # scored on the whole validation split
    assert first.fingerprint() != task.fingerprint() != ProxyTask(task, 50, seed=4).fingerprint()
    assert len(ProxyTask(task, 10_000, seed=3).split("train")) == len(train)  # more rows than there are: all


def test_best_so_far_counts_complete_trials_only():
    from kdforge.search.report import best_so_far

    records = [{"number": 1, "state": "PRUNED"}, {"number": 0, "state": "COMPLETE", "reward": 0.5},
               {"number": 2, "state": "COMPLETE", "reward": 0.4}, {"number": 3, "state": "FAIL"},
               {"number": 4, "state": "COMPLETE", "reward": 0.7}]
    assert best_so_far(records) == [(0, 0.5), (1, 0.5), (2, 0.5), (3, 0.5), (4, 0.7)]


@pytest.mark.parametrize("storage, says", [("study.db", "is not a database URL"),
                                           ("postgresql://nobody@127.0.0.1:1/none", "cannot open the search storage")])
def test_bad_storage_is_one_line(search_tree, tmp_path, capsys, storage, says):
    config = write_config(search_tree, tmp_path / "search.yaml")
    assert main(["search", str(config), "--storage", storage]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "search.storage" in err[0]


def test_pruning_stops_a_candidate_early_but_never_after_its_last_epoch():
    from types import SimpleNamespace

    from kdforge.search.trial import ReportEpochs

    class Trial:  # a pruner that always says stop
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    trial = Trial()
    trainer = SimpleNamespace(config=SimpleNamespace(epochs=2), state=SimpleNamespace(history=[]))
    callback = ReportEpochs(trial, "accuracy", lambda score: 2 * score, prune=True)
    callback(trainer)  # no epoch finished yet: nothing reported
    trainer.state.history.append({"epoch": 1, "accuracy": 0.25})
    with pytest.raises(optuna.TrialPruned):
        callback(trainer)
    assert trial.reports == [(1, 0.5)]
    trainer.state.history.append({"epoch": 2, "accuracy": 0.4})
    callback(trainer)  # the last epoch: reported, not pruned
    callback(trainer)  # called again after the same epoch (every step): reported once
    assert trial.reports == [(1, 0.5), (2, 0.8)]


def test_autokd_needs_three_rungs_and_the_report_counts_each(tmp_path):
    from kdforge.search.report import rung_counts

    def job(**search):
        return {"task": {"name": "glue/sst2"}, "teacher": {"model": "x"}, "search": {"method": "autokd", **search}}

    with pytest.raises(KDForgeError, match=r"search.proxy_epochs 2: AutoKD's successive halving needs at least 3"):
        validate_config(job(proxy_epochs=2))
    validate_config(job(proxy_epochs=4))
    validate_config(job(objective="pareto", proxy_epochs=2))  # no pruning: no rungs
    records = [{"state": "PRUNED", "epochs": 1}, {"state": "PRUNED", "epochs": 1}, {"state": "PRUNED", "epochs": 2},
               {"state": "COMPLETE", "epochs": 4}, {"state": "RUNNING", "epochs": 3}, {"state": "FAIL", "epochs": 0}]
    assert rung_counts(records, 4) == [(1, 4), (2, 2), (4, 1)]
    assert rung_counts(records, 6) == [(1, 4), (2, 2), (4, 1), (6, 0)]


def test_candidates_can_be_timed_in_the_form_that_ships(search_tree, one_thread, monkeypatch):
    """search.latency_form: onnx_int8 exports and quantizes every candidate in its trial and times that."""
    import kdforge.deploy.quantize as quantize

    made = []
    real = quantize.quantize_int8
    monkeypatch.setattr(quantize, "quantize_int8", lambda src, dst: made.append(dst) or real(src, dst))
    search_tree["search"].update(method="random", trials=2, final_top=0, latency_form="onnx_int8")
    result = api.search(search_tree)
    complete = [r for r in result.trials if r["state"] == "COMPLETE"]
    assert len(complete) == 2 and len(made) == 2 and all(p.name == "candidate.int8.onnx" for p in made)
    assert all(r["latency_form"] == "onnx_int8" and r["latency_ms"] > 0 for r in complete)
    assert "ONNX int8 export" in (result.folder / "report.md").read_text()
