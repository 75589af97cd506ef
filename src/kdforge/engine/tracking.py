"""Experiment tracking through HF Accelerate's trackers (``train.trackers``, Accelerate's ``log_with`` names).

Each :meth:`kdforge.engine.trainer.Trainer.fit` is one tracked run named after its stage (``desc``):
the trainer hands this fit's tracker objects to its Accelerator (``log_with``), starts them with
``init_trackers``, logs with ``accelerator.log`` and finishes them when the fit ends or fails
(:func:`end_tracking`), so a process that trains several times (teacher fine-tuning, then stages)
never keeps a run open. Where each tracker writes:

* ``tensorboard``: event files in ``<run_dir>/tensorboard/<desc>`` (no hparams sub-run).
* ``mlflow``: the server or store of ``MLFLOW_TRACKING_URI`` when it is set; otherwise a local file
  store ``<run_dir>/mlruns`` (mlflow-skinny has no SQL backend, so kdforge sets
  ``MLFLOW_ALLOW_FILE_STORE=true`` for it unless the variable is set). Experiment: the run folder's
  name (``MLFLOW_EXPERIMENT_NAME`` wins); MLflow run name: ``desc``; params: the train config.
* the others (wandb, trackio, comet_ml, aim, clearml, dvclive, swanlab): Accelerate's tracker with
  project/run name ``desc`` (and ``<run_dir>/<tracker>`` where it needs a folder), configured by
  their own environment variables.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from kdforge.errors import KDForgeError
from kdforge.run_folder import RunFolder

log = logging.getLogger("kdforge")

#: pip package that provides each tracker
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb",
                    "trackio": "trackio", "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml",
                    "dvclive": "dvclive", "swanlab": "swanlab"}


def known_trackers() -> list[str]:
    """The names Accelerate's ``log_with`` accepts (``all`` aside)."""
    from accelerate.utils import LoggerType

    return [name for name in LoggerType.list() if name != "all"]


def resolve_trackers(names: list[str], config_key: str = "train.trackers") -> list[str]:
    """``names`` without repeats, ``all`` replaced by every installed tracker; an unknown name or an
    uninstalled package is one :class:`KDForgeError` line naming ``config_key`` (call before training)."""
    from accelerate.tracking import get_available_trackers

    known, installed = known_trackers(), [str(t) for t in get_available_trackers()]
    resolved: list[str] = []
    for name in names:
        if name == "all":
            resolved += installed
            continue
        if name not in known:
            raise KDForgeError(f"`{config_key}`: unknown tracker {name!r}; choose from {', '.join(known)} or all "
                               "(HF Accelerate's log_with names), or [] for none")
        if name not in installed:
            raise KDForgeError(f"`{config_key}` lists {name} but its package is not installed: pip install "
                               f"{TRACKER_PACKAGES.get(name, name)} (or remove {name} from {config_key})")
        resolved.append(name)
    return list(dict.fromkeys(resolved))


def _mlflow_tracker_class():
    from accelerate.tracking import MLflowTracker, on_main_process

    class KDForgeMLflowTracker(MLflowTracker):
        """Accelerate's MLflow tracker, with a local file store under the run folder when no
        ``MLFLOW_TRACKING_URI`` is set (restored to unset when the run finishes) and metric names
        reduced to the characters MLflow accepts."""

        def __init__(self, experiment_name: str, run_name: str, local_store: Path):
            super().__init__(experiment_name=experiment_name, run_name=run_name, tags={"kdforge.stage": run_name})
            self.local_store = Path(local_store)
            self.own_uri = False
            self.status = "FINISHED"  # FAILED when the fit raised (set by end_tracking)

        @on_main_process
        def start(self):
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                self.local_store.mkdir(parents=True, exist_ok=True)
                mlflow.set_tracking_uri(self.local_store.resolve().as_uri())
                self.own_uri = True
            log.info("mlflow: run %s of experiment %s at %s", self.run_name, self.experiment_name,
                     mlflow.get_tracking_uri())
            super().start()

        @on_main_process
        def log(self, values: dict, step: int | None = None, **kwargs):
            super().log({re.sub(r"[^\w\-. /]", "_", k): v for k, v in values.items()}, step=step, **kwargs)

        @on_main_process
        def finish(self):
            import mlflow

            try:
                mlflow.end_run(status=self.status)
            finally:
                if self.own_uri:  # the next fit (maybe of another run folder) picks its own store
                    mlflow.set_tracking_uri(None)
                    self.own_uri = False

    return KDForgeMLflowTracker


def build_trackers(names: list[str], run_dir: Path, desc: str) -> list:
    """Accelerate tracker objects (``GeneralTracker``) for one fit named ``desc`` of the run in ``run_dir``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker

    run = RunFolder(run_dir)
    trackers = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(desc, str(run.tracker(name))))
        elif name == "mlflow":
            experiment = run.root.resolve().name or "kdforge"
            trackers.append(_mlflow_tracker_class()(experiment, desc, run.tracker(name)))
        else:
            cls = LOGGER_TYPE_TO_CLASS[name]
            trackers.append(cls(desc, str(run.tracker(name))) if cls.requires_logging_directory else cls(desc))
    return trackers


def flat_params(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as tracker params: numbers, strings and booleans kept, lists joined, None left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        if value is not None:
            out[key] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def start_tracking(accelerator, names: list[str], run_dir: Path, desc: str, params: dict[str, Any],
                   config_key: str = "train.trackers") -> None:
    """Start this fit's trackers on ``accelerator`` (main process only) with ``params`` as the run's
    configuration (not for TensorBoard, whose folder stays as before: scalars only)."""
    accelerator.log_with = build_trackers(resolve_trackers(names, config_key), run_dir, desc)
    if not accelerator.log_with:
        return
    try:
        accelerator.init_trackers(project_name=desc)
        for tracker in accelerator.trackers:
            if tracker.name != "tensorboard":
                tracker.store_init_configuration(flat_params(params))
    except Exception as err:
        end_tracking(accelerator)
        first = (str(err).strip().splitlines() or [""])[0]
        raise KDForgeError(f"{desc}: could not start experiment tracking ({', '.join(names)}): "
                           f"{type(err).__name__}: {first}; check the tracker's settings (e.g. "
                           f"MLFLOW_TRACKING_URI) or remove it from {config_key}") from None


def end_tracking(accelerator, failed: bool = False) -> None:
    """Finish every tracker of ``accelerator`` (an MLflow run as FAILED when ``failed``) and forget them.
    Unlike ``Accelerator.end_training``, it leaves the process group alone: the job may train again
    (the next stage) in this process."""
    trackers, accelerator.trackers = list(accelerator.trackers), []
    accelerator.log_with = []
    for tracker in trackers:
        if failed and hasattr(tracker, "status"):
            tracker.status = "FAILED"
        try:
            tracker.finish()
        except Exception as err:  # one tracker failing to close must not hide the run's result
            log.warning("closing the %s tracker failed: %s", tracker.name, err)
