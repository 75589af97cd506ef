"""Data sources: what a stage learns from, selected by ``stages[i].data``.

* ``task``: the task's own labelled data.
* ``ptp``: the task relabelled with the teacher's four confidence/correctness classes (Pea-KD).
* ``corpus``: unlabeled text (general distillation, GLMD's word-prediction stages).
* ``fsbbt``: the task's few training inputs grown into a synthetic set labelled by a black-box teacher
  (FS-BBT, :mod:`kdforge.recipes.fsbbt`).
"""

from __future__ import annotations

from kdforge.config import JobConfig, StageConfig
from kdforge.models.loading import LoadedModel
from kdforge.recipes.base import DATA_SOURCES
from kdforge.recipes.fsbbt import fsbbt_task
from kdforge.recipes.ptp import PTPTask
from kdforge.tasks.base import Task
from kdforge.tasks.corpus import CorpusTask


@DATA_SOURCES.register("task")
def task_data(stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig, device) -> Task:
    return task


@DATA_SOURCES.register("ptp")
def ptp_data(stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig, device) -> Task:
    return PTPTask(task, teacher, stage.ptp, config.eval.batch_size, device)


@DATA_SOURCES.register("corpus")
def corpus_data(stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig, device) -> Task:
    return CorpusTask(stage.corpus, language_model=task.problem.causal_lm)


@DATA_SOURCES.register("fsbbt")
def fsbbt_data(stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig, device) -> Task:
    return fsbbt_task(stage, task, teacher, config, device)
