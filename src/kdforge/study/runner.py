"""``kdforge study CONFIG``: run a grid of whole jobs on Optuna storage, then write the study report.

Each run of the grid (:mod:`kdforge.study.grid`) is one Optuna trial, named by its key in the trial's
``run`` attribute, set when the trial is created (enqueued). A worker repeatedly takes the first run that
no worker has finished or is running, enqueues a trial for it and asks for a trial (the oldest waiting
one, its own or another worker's); it runs that trial's run unless a trial with a lower number holds the
same run (waiting or running): so two workers never run one run, on one machine or many. While a run trains, its
worker sends heartbeats; a run whose worker went silent for twice ``heartbeat_s`` is failed by the
next worker that looks and run again from its checkpoint (``run_distill(resume=True)``). A finished
run's summary (:func:`kdforge.study.summary.run_summary`) is kept in its trial, so the report can be
written from the storage alone; running the command again resumes the study.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import TrialState

from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.io import atomic_write_text
from kdforge.run_folder import RunFolder
from kdforge.search.storage import open_storage, require_study
from kdforge.search.workers import run_with_local_workers
from kdforge.study.config import StudyConfig, load_study
from kdforge.study.grid import RunSpec, expand
from kdforge.study.summary import run_summary
from kdforge.study.teachers import ensure_shared_teachers, with_shared_teachers

log = logging.getLogger("kdforge")
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class StudyResult:
    folder: Path
    summaries: dict[str, dict[str, Any]]
    report: dict[str, Any]
    table: str


def storage_url(study: StudyConfig) -> str:
    return study.storage or f"sqlite:///{Path(study.output_dir).resolve() / 'study.db'}"


def open_study(study: StudyConfig, join: bool = False) -> optuna.Study:
    storage = open_storage(storage_url(study), study.heartbeat_s, "storage", "study", retry_stale=False)
    name = study.study_name or Path(study.output_dir).name
    if join:
        require_study(storage, name, storage_url(study), "study")
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                               sampler=optuna.samplers.RandomSampler(), direction="maximize")


def finished(study: optuna.Study, runs: list[RunSpec]) -> dict[str, dict[str, Any]]:
    """Run key -> summary of every run finished with its current config (a run whose config changed
    since counts as not finished)."""
    specs = {r.key: r for r in runs}
    done = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = trial.user_attrs.get("run")
        if key in specs and specs[key].matches(trial.user_attrs.get("config_hash")):
            done[key] = trial.user_attrs["summary"]
    return done


def running(study: optuna.Study, states=(TrialState.RUNNING,)) -> dict[str, int]:
    """Run key -> the lowest number of the trials in ``states`` that hold it."""
    busy: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False, states=states):
        key = trial.user_attrs.get("run")
        if key is not None:
            busy[key] = min(trial.number, busy.get(key, trial.number))
    return busy


@contextmanager
def heartbeat(storage: RDBStorage, trial_id: int, every_s: float) -> Iterator[None]:
    """Record the trial's heartbeat now and every ``every_s`` seconds until the block ends."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name="kdforge-study-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def claim(study: optuna.Study, run: RunSpec) -> tuple[optuna.Trial, str] | None:
    """A trial for this worker and the key of the run it holds (``run``'s, or that of a run another worker
    enqueued a moment before), or None when a trial with a lower number holds the same run."""
    study.enqueue_trial({}, user_attrs={"run": run.key, "config_hash": run.config_hash})
    with warnings.catch_warnings():  # heartbeats outside Study.optimize: this module sends them itself
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    key = trial.user_attrs["run"]
    first = running(study, (TrialState.WAITING, TrialState.RUNNING)).get(key)
    if first is not None and first < trial.number:  # another trial holds this run
        trial.set_user_attr("duplicate_of", first)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial, key


def execute(run: RunSpec, teachers_dir: Path, tasks: dict[str, Any]) -> dict[str, Any]:
    """Train the run's shared teachers if not done yet, then the run itself; returns its summary."""
    from kdforge.jobs import run_distill
    from kdforge.tasks.base import build_task

    config = run.config()
    task_key = config.task.model_dump_json()
    if task_key not in tasks:
        tasks[task_key] = build_task(config.task)
    task = tasks[task_key]
    models = ensure_shared_teachers(config, task, teachers_dir)
    job = validate_config(with_shared_teachers(run.tree, models), f"study run {run.key!r}")
    folder = RunFolder.of(job)
    changed = folder.finished and folder.config_file.is_file() and \
        yaml.safe_load(folder.config_file.read_text()) != job.model_dump(mode="json")
    if changed:
        log.info("%s: the finished run there had other settings; it is replaced once this one completes", folder.root)
    run_distill(job, resume=not changed, overwrite=changed)
    primary = next(iter(job.teacher_configs()))
    spec = config.teacher_configs()[primary]
    teacher_id = models[primary].parent.resolve().name if primary in models else \
        (spec.model or f"black box {spec.black_box.version or ''}".strip())
    return run_summary(folder.metrics, run, teacher_id, task.greater_is_better)


def eta_line(study: optuna.Study, runs: list[RunSpec], started: float) -> str:
    done = finished(study, runs)
    busy = running(study)
    left = len(runs) - len(done)
    took = [(t.datetime_complete - t.datetime_start).total_seconds()
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("run") in done and t.datetime_complete and t.datetime_start]
    eta = ""
    if took and left:
        seconds = sum(took) / len(took) * left / max(1, len(busy))
        eta = f", ETA {seconds / 60:.0f} min ({sum(took) / len(took) / 60:.1f} min a run)"
    return (f"{len(done)}/{len(runs)} runs done, {len(busy)} running, {left} left{eta}; "
            f"this worker {(time.time() - started) / 60:.1f} min")


def run_worker(study_cfg: StudyConfig, study: optuna.Study, runs: list[RunSpec]) -> None:
    """Run open runs until none is left (each run tried once by this worker)."""
    teachers_dir = Path(study_cfg.teachers_dir or Path(study_cfg.output_dir) / "teachers")
    tried: set[str] = set()
    tasks: dict[str, Any] = {}
    started = time.time()
    while True:
        with warnings.catch_warnings():  # "experimental" since Optuna 2.9: used as documented
            warnings.simplefilter("ignore", ExperimentalWarning)
            fail_stale_trials(study)
        done, busy = finished(study, runs), running(study)
        todo = [r for r in runs if r.key not in done and r.key not in busy and r.key not in tried]
        if not todo:
            return
        claimed = claim(study, todo[0])
        if claimed is None:
            continue
        trial, key = claimed
        run = next((r for r in runs if r.key == key and r.matches(trial.user_attrs.get("config_hash"))), None)
        if run is None:  # enqueued by a worker with other settings: not a run of this study as it is now
            trial.set_user_attr("error", "not a run of this study's current settings")
            study.tell(trial, state=TrialState.FAIL)
            continue
        tried.add(run.key)
        log.info("study run %s (%s)", run.key, run.tree["output_dir"])
        try:
            with heartbeat(study._storage, trial._trial_id, study_cfg.heartbeat_s):
                summary = execute(run, teachers_dir, tasks)
        except KDForgeError as err:
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=TrialState.FAIL)
            log.error("study run %s failed: %s (the next `kdforge study` runs it again)", run.key, err)
            continue
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("summary", summary)
        study.tell(trial, summary["value"])
        log.info("study %s: %s", study.study_name, eta_line(study, runs, started))


def run_study(source: str | Path | dict, overrides=None, workers: int = 1, join: bool = False,
              report_only: bool = False) -> StudyResult | None:
    """Run (resume, or join) the study; write its report unless ``join``. See the module docstring."""
    from kdforge.study.report import write_study_report

    if workers < 1:
        raise KDForgeError(f"--workers {workers}: give 1 or more worker processes")
    study_cfg, base = load_study(source, overrides)
    runs = expand(study_cfg, base)  # every run's config validated before anything is trained
    folder = Path(study_cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "study-config.yaml"
    if not join:
        atomic_write_text(config_path, yaml.safe_dump({**study_cfg.model_dump(mode="json"), "base": base},
                                                      sort_keys=False))
    study = open_study(study_cfg, join)  # a bad URL or an unreachable database: refused before any training
    if not report_only:
        from kdforge.preflight import check_job
        from kdforge.recipes.catalog import check_stages

        for run in runs:
            config = run.config()
            check_job(config, "distill")
            check_stages(config)
        points = len({r.point for r in runs})
        single = f", {len(study_cfg.single_point_rows)} of them at one point" if study_cfg.single_point_rows else ""
        log.info("study %s: %d runs (%d rows%s x %d points x %d seeds), storage %s; %s", study.study_name, len(runs),
                 len(study_cfg.row_names()), single, points, len(study_cfg.seeds), storage_url(study_cfg),
                 eta_line(study, runs, time.time()))
        run_with_local_workers("study", config_path, workers, lambda: run_worker(study_cfg, study, runs))
    if join:
        return None
    summaries = finished(study, runs)
    shown_storage = study_cfg.storage or f"sqlite:///{folder / 'study.db'}"  # as given: no absolute path
    report, table = write_study_report(folder, study_cfg, runs, summaries, shown_storage)
    return StudyResult(folder, summaries, report, table)
