"""Runs that never lose a finished result, stop at the first non-finite loss, agree across processes
and survive a kill at any point (issue 9).

The job runs are the `job_tree` job cut down (64 training rows: 4 steps an epoch, 2 epochs, a
checkpoint every 3 steps and at each epoch's end), about two seconds each on a CPU."""

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdforge import cli, jobs
from kdforge.config import TrainConfig, validate_config
from kdforge.engine import checkpoint as ckpt
from kdforge.engine.step import TrainStep
from kdforge.engine.trainer import Trainer
from kdforge.errors import KDForgeError
from tests.helpers import Killed, kill_at

ROOT = Path(__file__).resolve().parents[1]



def messages(records) -> list[str]:
    return [r.getMessage() for r in records]


def tiny_tree(job_tree, tmp_path, name="run", **train) -> dict:
    tree = json.loads(json.dumps(job_tree))
    tree["teacher"] = {"model": job_tree["teacher"]["model"]}  # used as is: no fine-tuning
    tree["task"].update(train_limit=64, eval_limit=32)
    tree["train"].update(epochs=2, checkpoint_every=3, **train)
    tree["eval"].update(latency_batch_sizes=[1], latency_repeats=1, latency_warmup=0)
    tree["teacher_cache"] = {"folder": str(tmp_path / "cache")}
    tree["output_dir"] = str(tmp_path / name)
    return tree


def tiny_job(job_tree, tmp_path, name="run", **train):
    return validate_config(tiny_tree(job_tree, tmp_path, name, **train))


def results(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a run's results (not its log or scalars)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.relative_to(run_dir).parts[0] in
            ("config.yaml", "metrics.json", "report.md", "report.html", "reliability.png", "student")}


def history(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "metrics.json").read_text())["history"]]


def no_training(*args, **kwargs):
    raise AssertionError("an epoch was trained again")


# -- data loss -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_overwrite_keeps_the_finished_run_until_the_new_one_has_written_its_results(tmp_path, job_tree,
                                                                                 monkeypatch, kdlog):
    run = tmp_path / "run"
    jobs.run_distill(tiny_job(job_tree, tmp_path))
    finished = results(run)
    assert {"metrics.json", "report.md", "student/config.json"} <= set(finished)

    # a mistyped teacher path is refused before anything is touched
    tree = tiny_tree(job_tree, tmp_path)
    tree["teacher"]["model"] = str(tmp_path / "no-such-teacher")
    with pytest.raises(KDForgeError, match="no-such-teacher"):
        jobs.run_distill(validate_config(tree), overwrite=True)
    assert results(run) == finished

    # a failure after validation (a teacher that cannot be loaded, a run that crashes in training):
    # the finished run is moved back, the new run's partial files are removed
    def unloadable(*args, **kwargs):
        raise KDForgeError("teacher.model: cannot load the weights")

    with monkeypatch.context() as patch:
        patch.setattr(jobs, "load_models", unloadable)
        with pytest.raises(KDForgeError, match="cannot load"):
            jobs.run_distill(tiny_job(job_tree, tmp_path, seed=1), overwrite=True)
    assert results(run) == finished and not (run / ".previous-run").exists()

    def crash(trainer):
        if trainer.state.step == 5:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        jobs.run_distill(tiny_job(job_tree, tmp_path, seed=1), overwrite=True, callbacks=[crash])
    assert results(run) == finished and not (run / ".previous-run").exists()
    assert not (run / "checkpoints").exists()  # the failed run's partial files are gone
    assert any("moved back" in m for m in messages(kdlog))

    # interrupted (Ctrl-C, kill): the finished run waits in .previous-run while --resume continues the new one
    def interrupt(trainer):
        if trainer.state.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jobs.run_distill(tiny_job(job_tree, tmp_path, seed=1), overwrite=True, callbacks=[interrupt])
    assert results(run / ".previous-run") == finished and not (run / "metrics.json").exists()
    new = jobs.run_distill(tiny_job(job_tree, tmp_path, seed=1), resume=True)
    assert not (run / ".previous-run").exists() and not (run / "checkpoints").exists()
    assert json.loads((run / "metrics.json").read_text())["student"]["metrics"] == new.student.metrics
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 1
    assert results(run)["metrics.json"] != finished["metrics.json"]


@pytest.mark.slow
def test_resume_on_a_finished_run_says_so_and_changes_nothing(tmp_path, job_tree, monkeypatch, kdlog):
    run = tmp_path / "run"
    first = jobs.run_distill(tiny_job(job_tree, tmp_path))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    monkeypatch.setattr(Trainer, "fit", no_training)
    kdlog.clear()
    again = jobs.run_distill(tiny_job(job_tree, tmp_path), resume=True)
    assert again.student.metrics == first.student.metrics and again.teacher.metrics == first.teacher.metrics
    assert again.table == first.table
    finished = [m for m in messages(kdlog) if "finished" in m]
    assert len(finished) == 1 and str(run) in finished[0]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before


def two_stages(job_tree, tmp_path, name):
    tree = tiny_tree(job_tree, tmp_path, name)
    tree["stages"] = [{"name": "warm", "objectives": [{"name": "ce"}], "train": {"epochs": 1}},
                      {"name": "kd", "objectives": [{"name": "ce", "weight": 0.5},
                                                    {"name": "hinton_kd", "weight": 0.5}]}]
    return validate_config(tree)


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
def test_a_kill_between_training_and_export_resumes_without_training_again(tmp_path, job_tree, monkeypatch,
                                                                          kdlog, stages):
    job = (lambda name, **train: tiny_job(job_tree, tmp_path, name, **train)) if stages == 1 else \
        (lambda name, **train: two_stages(job_tree, tmp_path, name))
    reference = jobs.run_distill(job("ref"))
    names = ["distill"] if stages == 1 else ["warm", "kd"]
    assert not (tmp_path / "ref/checkpoints").exists()  # removed once the run is complete

    real_export = jobs.export_model

    def killed_export(*args, **kwargs):
        monkeypatch.setattr(jobs, "export_model", real_export)  # once
        raise Killed

    monkeypatch.setattr(jobs, "export_model", killed_export)
    with pytest.raises(Killed):
        jobs.run_distill(job("run"))
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    for name in names:  # every stage's checkpoints stay until the run's outputs are complete
        assert (run / "checkpoints" / name / "last" / "meta.json").is_file(), name
    last = json.loads((run / "checkpoints" / names[-1] / "last" / "meta.json").read_text())["trainer"]
    assert last["step"] == 8 and last["epoch"] == 2  # the checkpoint says training finished

    monkeypatch.setattr(Trainer, "_run_epoch", no_training)  # the resumed run takes no optimizer step
    kdlog.clear()
    resumed = jobs.run_distill(job("run"), resume=True)
    assert resumed.student.metrics == reference.student.metrics
    assert history(run) == pytest.approx(history(tmp_path / "ref"), abs=1e-6)
    if stages == 1:
        assert any("nothing left to train" in m for m in messages(kdlog))
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_keep_checkpoint_keeps_them_after_the_run(tmp_path, job_tree):
    jobs.run_distill(tiny_job(job_tree, tmp_path, keep_checkpoint=True))
    assert (tmp_path / "run/checkpoints/distill/last/meta.json").is_file()


@pytest.mark.parametrize("change, words", [
    ({"objectives": [{"name": "ce"}, {"name": "hinton_kd", "temperatur": 2.0}]}, "temperatur"),
    ({"stages": [{"name": "kd", "objectives": [{"name": "ce"}], "strategy": {"name": "no_such_strategy"}}]},
     "no_such_strategy"),
    ({"teacher": {"model": "/no/such/teacher"}}, "/no/such/teacher"),
])
def test_a_run_refused_by_validation_leaves_no_output_folder(tmp_path, job_tree, capsys, change, words):
    tree = dict(tiny_tree(job_tree, tmp_path), **change)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert cli.main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not Path(tree["output_dir"]).exists()


# -- non-finite loss -------------------------------------------------------------------------------------------------


class Regression(TrainStep):
    """Linear regression whose loss is multiplied by ``weight``; the weight turns nan at micro-batch
    ``nan_at`` (counted from 1 by forward calls) when it is set."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.learner = torch.nn.Linear(4, 1)
        self.nan_at, self.forwards = nan_at, 0

    def forward(self, batch, progress):
        self.forwards += 1
        mse = ((self.learner(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        weight = float("nan") if self.nan_at is not None and self.forwards >= self.nan_at else 1.0
        return weight * mse, {"mse": float(mse.detach()), "weight": weight}


def regression_rows(n: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def regression_collate(examples):
    return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}


def fit_regression(folder: Path, step: TrainStep, resume: bool = False, **settings) -> Trainer:
    """8 steps an epoch, 2 epochs, a checkpoint every 2 steps."""
    config = TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 0.05, "seed": 0, "device": "cpu",
                            "checkpoint_every": 2, "select_best": False, **settings})
    trainer = Trainer(step, regression_rows(), regression_collate, config, folder)
    trainer.fit(resume=resume)
    return trainer


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, kdlog):
    reference = fit_regression(tmp_path / "ref", Regression())
    step = Regression(nan_at=7)
    with pytest.raises(KDForgeError) as err:
        fit_regression(tmp_path / "run", step)
    message = str(err.value)
    assert "\n" not in message and "non-finite" in message and "step 7 " in message
    assert "mse" in message and "weight nan" in message  # the loss terms
    assert "train.lr" in message and "temperature" in message and "weight" in message  # likely causes
    assert step.forwards == 7  # stopped at once
    last = tmp_path / "run/checkpoints/train/last"
    assert json.loads((last / "meta.json").read_text())["trainer"]["step"] == 6
    state = ckpt.load(last / "state.pt")
    assert all(torch.isfinite(v).all() for v in state["module"].values())
    assert "checkpoints/train/last" in message and "step 6" in message

    kdlog.clear()
    resumed = fit_regression(tmp_path / "run", Regression(), resume=True)
    assert any("resumed from" in m and "step 6" in m for m in messages(kdlog))
    assert resumed.state.step == 16
    assert torch.allclose(resumed.unwrapped.learner.weight, reference.unwrapped.learner.weight, atol=1e-6)


def test_a_nan_loss_in_an_accumulated_micro_batch_is_caught_before_its_backward(tmp_path):
    step = Regression(nan_at=9)  # the first micro-batch of optimizer step 5 (2 micro-batches a step)
    with pytest.raises(KDForgeError, match=r"step 5 \(epoch 2, micro-batch 1 of 8\)"):
        fit_regression(tmp_path, step, grad_accum=2, checkpoint_every=1)
    assert step.forwards == 9
    assert json.loads((tmp_path / "checkpoints/train/last/meta.json").read_text())["trainer"]["step"] == 4


class BlowsUp(Regression):
    """The loss stays finite but an update leaves an infinite weight after optimizer step 4."""

    def after_step(self, progress):
        if progress.step == 4:
            with torch.no_grad():
                self.learner.weight[0, 0] = float("inf")


def test_non_finite_weights_are_never_written_to_a_checkpoint(tmp_path):
    with pytest.raises(KDForgeError, match="non-finite.*learner.weight"):
        fit_regression(tmp_path, BlowsUp())
    last = tmp_path / "checkpoints/train/last"
    assert json.loads((last / "meta.json").read_text())["trainer"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt.load(last / "state.pt")["module"].values())


# -- several processes ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_agree_on_the_score_and_the_best_epoch_and_log_once(tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(ROOT / "tests" / "reliability_runs_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["scores"]) == 3
    assert ranks[0]["scores"] == ranks[1]["scores"]  # one number for the whole split, on every process
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"] and ranks[0]["best"] == ranks[1]["best"]
    assert ranks[0]["best"] == min(ranks[0]["scores"])
    assert ranks[0]["weight"] == ranks[1]["weight"]  # the same epoch kept everywhere
    for text in (proc.stderr, (tmp_path / "train.log").read_text()):
        for epoch in (1, 2, 3):
            assert text.count(f"train epoch {epoch}/3:") == 1, text
        assert text.count("processes: 2") == 1


# -- fault injection -----------------------------------------------------------------------------------------------

CHECKPOINT_STEPS = [3, 4, 6, 8]  # checkpoint_every 3, and each epoch's end (4 steps an epoch, 8 in all)


def last_checkpoint_step(run_dir: Path) -> int:
    for name in ("last", "previous"):
        meta = run_dir / "checkpoints" / "distill" / name / "meta.json"
        if meta.is_file():
            return json.loads(meta.read_text())["trainer"]["step"]
    return 0


def inject(monkeypatch, fault: tuple) -> None:
    kind, function, n = fault
    real = getattr(ckpt, function) if kind == "checkpoint" else jobs.export_model
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) < n:
            return real(*args, **kwargs)
        if function == "publish_checkpoint" and Path(args[0]).exists():  # killed between its two renames
            folder, previous = Path(args[0]), ckpt.previous_dir(Path(args[0]))
            shutil.rmtree(previous, ignore_errors=True)
            folder.rename(previous)  # `last` is gone, the new checkpoint still in staging
        raise Killed

    monkeypatch.setattr(ckpt if kind == "checkpoint" else jobs, function, failing)


@pytest.mark.slow
def test_kills_at_seeded_random_points_always_resume_to_the_uninterrupted_metrics(tmp_path, job_tree,
                                                                                  monkeypatch):
    reference = jobs.run_distill(tiny_job(job_tree, tmp_path, "ref"))
    run = tmp_path / "run"
    rng = random.Random(2024)
    kinds = ["step", "checkpoint", "step", "checkpoint", "export"]
    for attempt, kind in enumerate(kinds):
        done = last_checkpoint_step(run)
        callbacks = []
        with monkeypatch.context() as patch:
            if kind == "step":  # mid-epoch or at an epoch's end, after the step's checkpoint
                at = rng.randint(done + 1, 7)  # (a later fault needs a checkpoint write ahead)

                callbacks = [kill_at(at)]
            elif kind == "checkpoint":  # inside the n-th checkpoint write still to come
                function = rng.choice(["save_rng", "save_state", "finish", "publish_checkpoint"])
                inject(patch, ("checkpoint", function, rng.randint(1, sum(s > done for s in CHECKPOINT_STEPS))))
            else:
                inject(patch, ("export", "export_model", 1))
            with pytest.raises(Killed):
                jobs.run_distill(tiny_job(job_tree, tmp_path), resume=attempt > 0, callbacks=callbacks)
        assert not (run / "metrics.json").exists()
    monkeypatch.setattr(Trainer, "_run_epoch", no_training)  # killed after training: nothing is trained again
    resumed = jobs.run_distill(tiny_job(job_tree, tmp_path), resume=True)
    assert resumed.student.metrics == reference.student.metrics
    assert history(run) == pytest.approx(history(tmp_path / "ref"), abs=1e-6)
    assert not (run / "checkpoints").exists()
