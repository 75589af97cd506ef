"""``kdforge search CONFIG``: student architecture search (KD-NAS, AutoKD, random) on Optuna storage.

One command = one worker (plus ``workers - 1`` local worker processes it starts): the study's
trials are shared through the storage until ``search.trials`` trials have finished, counted over
every worker (a worker may finish one trial more than the budget when several end at once). Then
the command (unless it only ``join``-ed) distills the ``search.final_top`` best candidates on the
full training set with the job's own settings (``best/rank-<i>/``, each a complete kdforge run with
its teacher-beside-student report and ``config.yaml`` that reproduces it) and writes the search
report (:mod:`kdforge.search.report`). Running the same command again resumes: finished trials are
kept, a trial killed mid-way is run again, finished final runs are reused.

On other machines ``kdforge search CONFIG --join --set search.storage=postgresql://...`` (same
``search.study_name``) adds workers to the same study.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from kdforge.config import PRIMARY_TEACHER, JobConfig, dump_config, validate_config
from kdforge.errors import KDForgeError
from kdforge.io import atomic_write_text, file_lock
from kdforge.models.loading import VISION_META
from kdforge.preflight import check_job
from kdforge.roles.base import capabilities
from kdforge.run_folder import RunFolder
from kdforge.search.proxy import ProxyTask
from kdforge.search.report import trial_records, write_search_report
from kdforge.search.space import LOSS_DIMS, SearchSpace
from kdforge.search.storage import require_study
from kdforge.search.study import FINISHED, finished_count, make_storage, open_study, storage_url, study_name
from kdforge.search.trial import SearchContext, check_space, run_trial
from kdforge.search.workers import run_with_local_workers, worker_threads
from kdforge.tasks.base import build_task

log = logging.getLogger("kdforge")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # kdforge logs every trial itself


@dataclass
class SearchResult:
    folder: Path
    trials: list[dict[str, Any]]
    best: list[dict[str, Any]]
    table: str


def search_config(config: JobConfig) -> JobConfig:
    """The job as the search runs it: a validation split carved from the training rows
    (``search.validation``) unless the task names one; refused when the search cannot run it."""
    if config.stages is not None:
        raise KDForgeError("search runs single-stage jobs: remove `stages` and give `objectives` (the candidates' "
                           "logit terms)")
    if not all(capabilities(config, role).weights for role in config.teacher_configs()):
        raise KDForgeError("search builds candidates from the teacher's weights and times them beside it: give a "
                           "teacher `model`, not a `black_box`")
    if config.assistants:
        raise KDForgeError("search does not train assistants: remove the `assistants` section")
    if config.search.method == "kdnas" and config.search.objective == "pareto":
        raise KDForgeError("search.objective: pareto needs search.method autokd or random (the KD-NAS controller "
                           "learns from one reward)")
    tree = config.model_dump(mode="json")
    if tree["task"]["validation"] is None:
        tree["task"]["validation"] = config.search.validation
    if tree["student"] is None:
        tree["student"] = {"layers": [0]}  # replaced by every candidate; lets the job's checks run
    return validate_config(tree, "search")


def space_kind(config: JobConfig) -> str:
    """``resnet`` for a vision teacher (``vision:NAME`` or a folder kdforge exported one to), else
    ``transformer``."""
    model = config.teacher_configs()[next(iter(config.teacher_configs()))].model or ""
    vision = model.startswith("vision:") or (Path(model) / VISION_META).is_file()
    return "resnet" if vision else "transformer"


def load_teachers(config: JobConfig, task) -> dict:
    from kdforge.roles.teachers import load_teacher

    return {role: load_teacher(config, task, role=role) for role in config.teacher_configs()}


def run_worker(ctx: SearchContext, study: optuna.Study) -> None:
    """Run trials until the study holds ``search.trials`` finished ones."""
    search = ctx.config.search
    pareto, prune = search.objective == "pareto", search.method == "autokd"
    if finished_count(study) >= search.trials:
        return
    study.optimize(lambda trial: run_trial(ctx, trial, pareto, prune),
                   callbacks=[optuna.study.MaxTrialsCallback(search.trials, states=FINISHED)])


def budget_warning(trials: int, proxy_rows: int, validation_rows: int) -> str | None:
    """A warning when the search's budget is too small for its ranking to mean anything."""
    small = [f"{n} {what}" for n, what, least in ((trials, "trials", 10), (proxy_rows, "proxy training rows", 100),
                                                   (validation_rows, "validation rows", 100)) if n < least]
    if not small:
        return None
    return (f"this search has only {', '.join(small)}: its ranking of candidates is mostly noise (aim for 10 or "
            "more trials and 100 or more rows each: search.trials, search.proxy_rows, task.validation)")


def search_space_settings(config: JobConfig) -> dict[str, list[Any]]:
    """``search.space``; KD-NAS (v1) searches the architecture only, so for ``kdnas`` the temperature and
    the KD weight are searched only when the space lists them (our addition, an option)."""
    space = dict(config.search.space)
    if config.search.method == "kdnas":
        for dim in LOSS_DIMS:
            space.setdefault(dim, [])
    return space


def ranked_trials(study: optuna.Study, config: JobConfig) -> list[optuna.trial.FrozenTrial]:
    """Finished candidates, best first: by reward, or (pareto) the front by score; one per candidate."""
    if config.search.objective == "pareto":
        ranked = sorted(study.best_trials, key=lambda t: t.values[0],
                        reverse=study.directions[0] == optuna.study.StudyDirection.MAXIMIZE)
    else:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        ranked = sorted(complete, key=lambda t: t.value, reverse=True)
    unique: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in ranked:
        unique.setdefault(repr(trial.user_attrs.get("overrides")), trial)
    return list(unique.values())


def final_config(config: JobConfig, folder: Path, overrides: dict[str, Any], rank: int,
                 objectives: list[dict[str, Any]] | None = None) -> JobConfig:
    """The job with the candidate as its student, into ``best/rank-<rank>``, distilled with the terms the
    proxy ranked it with (``objectives``: the job's and the candidate terms, e.g. KD-NAS's hidden-state
    term); a teacher the search fine-tuned is used from its folder (not fine-tuned again)."""
    from kdforge.config import apply_overrides

    tree = apply_overrides(config.model_dump(mode="json"), overrides)
    if objectives is not None:
        tree["objectives"] = objectives
    for role, spec in config.teacher_configs().items():
        tuned = RunFolder(folder).teacher(role).model
        if spec.finetune is not None and tuned.is_dir():
            section = tree["teacher"] if role == PRIMARY_TEACHER else tree["teachers"][role]
            section.update(model=str(tuned), finetune=None)
    tree["output_dir"] = str(folder / "best" / f"rank-{rank}")
    return validate_config(tree, f"search final run {rank}")


def distill_best(config: JobConfig, study: optuna.Study, folder: Path) -> list[dict[str, Any]]:
    from kdforge.jobs import run_distill

    best = []
    for rank, trial in enumerate(ranked_trials(study, config)[:config.search.final_top], start=1):
        cfg = final_config(config, folder, trial.user_attrs["overrides"], rank, trial.user_attrs.get("objectives"))
        log.info("final run %d: trial %d distilled on the full training set into %s", rank, trial.number,
                 cfg.output_dir)
        result = run_distill(cfg, resume=True)
        best.append({"rank": rank, "trial": trial.number, "run_dir": str(result.run_dir),
                     "overrides": trial.user_attrs["overrides"], "teacher": result.teacher.to_dict(),
                     "student": result.student.to_dict(),
                     "command": f"kdforge distill {RunFolder.of(cfg).config_file}"})
    return best


def run_search(config: JobConfig, workers: int = 1, join: bool = False) -> SearchResult | None:
    """Run (or resume, or join) the search of ``config``; see the module docstring."""
    if workers < 1:
        raise KDForgeError(f"--workers {workers}: give 1 or more worker processes")
    config = search_config(config)
    check_job(config, "distill")
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "search-config.yaml"
    if not join:
        atomic_write_text(config_path, dump_config(config))
    space = SearchSpace.from_dict(search_space_settings(config), space_kind(config))
    if not space.dimensions():
        raise KDForgeError("search.space: every dimension is [] (nothing to search); list the choices of at least "
                           "one, e.g. search.space.layers: [1, 2, 3]")
    storage = make_storage(config)  # a bad space, URL or an unreachable database: refused before any training
    if join:
        require_study(storage, study_name(config), storage_url(config), "search")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or worker_threads(workers)))
    task = build_task(config.task)
    if config.search.objective == "reward" and not task.greater_is_better:
        raise KDForgeError(f"search.objective: reward multiplies {task.main_metric}, where lower is better; use "
                           "search.objective: pareto")
    study = open_study(config, storage, space, task.greater_is_better)
    with file_lock(folder / "teachers.lock"):  # workers started together fine-tune a teacher once
        teachers = load_teachers(config, task)
    log.info("search %s (%s, %s): %d of %d trials finished, storage %s", study.study_name, config.search.method,
             config.search.objective, finished_count(study), config.search.trials, storage_url(config))
    ctx = SearchContext(config, task, ProxyTask(task, config.search.proxy_rows, config.task.sample_seed),
                        teachers, space, folder)
    check_space(ctx)  # a candidate the teacher cannot give, or a bad candidate term: one line, before any trial
    warning = budget_warning(config.search.trials, len(ctx.proxy.split("train")), len(task.split(task.selection_split)))
    if warning:
        log.warning("WARNING: %s", warning)
    run_with_local_workers("search", config_path, workers, lambda: run_worker(ctx, study))
    if join:
        return None
    best = distill_best(config, study, folder) if config.search.final_top else []
    records = trial_records(study)
    table = write_search_report(folder, config, study, records, best, task)
    return SearchResult(folder, records, best, table)
