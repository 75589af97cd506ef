"""Experiment tracking through Accelerate's trackers (train.trackers): what a run logs is what kdforge's
history holds, read back with MLflow's own client and TensorBoard's own event reader; bad names and
missing packages are one line before training; every fit's run is closed, also when it fails."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import kdforge
from kdforge.config import TrainConfig, validate_config
from kdforge.engine.tracking import known_trackers, resolve_trackers
from kdforge.errors import KDForgeError

mlflow = pytest.importorskip("mlflow")

EPOCHS, LOG_EVERY = 3, 5


@pytest.fixture(scope="module")
def digits_loaders():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:640], order[1400:]
    return (DataLoader(TensorDataset(x[train], torch.tensor(y)[train]), batch_size=64),
            DataLoader(TensorDataset(x[test], torch.tensor(y)[test]), batch_size=128))


def distill(run_dir, loaders, callbacks=(), **settings):
    """A small MLP student learning digits from an untrained teacher (the loss still falls: ce term)."""
    torch.manual_seed(0)
    mlp = lambda h: torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Linear(h, 10))
    distiller = kdforge.Distiller(mlp(32), mlp(16), objectives=[
        {"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0}], output_dir=run_dir)
    return distiller.fit(*loaders, epochs=EPOCHS, lr=3e-3, device="cpu", log_every=LOG_EVERY, callbacks=callbacks,
                         **settings)


def client_for(store):
    return mlflow.MlflowClient(tracking_uri=store.resolve().as_uri())


def only_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def series(client, run, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def matches(logged, history, key, rel=1e-9):
    """``logged`` (step, value) pairs are the history's ``key`` at each epoch's step."""
    steps, values = zip(*logged, strict=True) if logged else ((), ())
    return list(steps) == [h["step"] for h in history] and list(values) == pytest.approx(
        [h[key] for h in history], rel=rel)


@pytest.fixture
def no_mlflow_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the file store back here


def test_mlflow_run_holds_the_history(tmp_path, digits_loaders, no_mlflow_env):
    import os

    run_dir = tmp_path / "digits-run"
    state = distill(run_dir, digits_loaders, trackers=["mlflow"])
    # no URI set: a local file store under the run folder; the global URI is unset again afterwards
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.active_run() is None
    client = client_for(run_dir / "mlruns")
    run = only_run(client, "digits-run")
    assert run.info.run_name == "distill" and run.info.status == "FINISHED"
    assert len(state.history) == EPOCHS
    assert matches(series(client, run, "train/epoch_loss"), state.history, "loss")
    assert matches(series(client, run, "eval/accuracy"), state.history, "accuracy")
    steps = [s for s, _ in series(client, run, "train/loss")]
    total = state.history[-1]["step"]
    assert steps == [s for s in range(1, total + 1) if s % LOG_EVERY == 0 or s == total]
    assert set(series(client, run, "train/hinton_kd")) and set(series(client, run, "train/lr"))
    params = run.data.params
    assert float(params["lr"]) == 3e-3 and params["trackers"] == "mlflow" and params["desc"] == "distill"
    assert not (run_dir / "tensorboard").exists()  # only the trackers asked for


def test_mlflow_uses_the_tracking_uri_of_the_environment(tmp_path, digits_loaders, no_mlflow_env, monkeypatch):
    store = tmp_path / "shared-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-kd")
    state = distill(tmp_path / "a", digits_loaders, trackers=["mlflow"])
    distill(tmp_path / "b", digits_loaders, trackers=["mlflow"])  # a second fit in this process: its own run
    assert not (tmp_path / "a" / "mlruns").exists()
    client = client_for(store)
    runs = client.search_runs([client.get_experiment_by_name("team-kd").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    first = min(runs, key=lambda r: r.info.start_time)
    assert matches(series(client, first, "eval/accuracy"), state.history, "accuracy")


class Interrupt(Exception):
    pass


def test_a_failed_fit_closes_its_run(tmp_path, digits_loaders, no_mlflow_env):
    def stop_at_step_3(trainer):
        if trainer.state.step == 3:
            raise Interrupt

    run_dir = tmp_path / "failing"
    with pytest.raises(Interrupt):
        distill(run_dir, digits_loaders, callbacks=[stop_at_step_3], trackers=["mlflow", "tensorboard"])
    assert mlflow.active_run() is None
    client = client_for(run_dir / "mlruns")
    assert only_run(client, "failing").info.status == "FAILED"
    distill(tmp_path / "next", digits_loaders, trackers=["mlflow"])  # no run left open blocks the next fit
    assert only_run(client_for(tmp_path / "next" / "mlruns"), "next").info.status == "FINISHED"


def test_default_writes_tensorboard_event_files(tmp_path, digits_loaders):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert TrainConfig().trackers == ["tensorboard"]
    state = distill(tmp_path / "run", digits_loaders)
    folder = tmp_path / "run" / "tensorboard" / "distill"
    assert list(folder.glob("events.out.tfevents.*")) and not [p for p in folder.iterdir() if p.is_dir()]
    events = EventAccumulator(str(folder)).Reload()
    # TensorBoard stores float32 scalars
    assert matches([(e.step, e.value) for e in events.Scalars("train/epoch_loss")], state.history, "loss", 1e-6)
    assert matches([(e.step, e.value) for e in events.Scalars("eval/accuracy")], state.history, "accuracy", 1e-6)
    assert not (tmp_path / "run" / "mlruns").exists()


def test_no_trackers(tmp_path, digits_loaders):
    distill(tmp_path / "run", digits_loaders, trackers=[])
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_config_names_are_accelerates(job_tree):
    assert set(TrainConfig.model_fields["trackers"].annotation.__args__[0].__args__) == {*known_trackers(), "all"}
    job_tree["train"]["trackers"] = ["tensorbord"]
    with pytest.raises(KDForgeError, match=r"`train\.trackers\.0`: Input should be 'tensorboard', 'mlflow'"):
        validate_config(job_tree)
    job_tree["train"]["trackers"] = ["mlflow", "tensorboard"]
    assert validate_config(job_tree).train.trackers == ["mlflow", "tensorboard"]


def test_uninstalled_tracker_is_one_line_before_training(tmp_path, digits_loaders, monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.TENSORBOARD])
    with pytest.raises(KDForgeError, match=r"`train\.trackers` lists mlflow but its package is not installed: "
                                           r"pip install mlflow-skinny"):
        distill(tmp_path / "run", digits_loaders, trackers=["tensorboard", "mlflow"])
    assert not (tmp_path / "run").exists()  # refused before any training or logging
    assert resolve_trackers(["all", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(KDForgeError, match="unknown tracker 'neptune'; choose from .*mlflow"):
        resolve_trackers(["neptune"])


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, digits_loaders, no_mlflow_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # MLflow 3 refuses a file store then
    with pytest.raises(KDForgeError, match=r"distill: could not start experiment tracking \(mlflow\): "
                                           r"MlflowException: .*remove it from train\.trackers"):
        distill(tmp_path / "run", digits_loaders, trackers=["mlflow"])
    assert mlflow.active_run() is None
