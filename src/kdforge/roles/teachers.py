"""A teacher's lifecycle: fingerprinted, found again by its fingerprint, else fine-tuned on the task;
or its configured model as is; or a black box behind its client.

:func:`find_or_finetune_teacher` is the one function that gives a fine-tuned teacher for a config: it
looks in a teacher folder (by default the run's ``teacher/`` or ``teachers/<role>/``; any folder, so
that many runs can share one teacher) for a ``finetune.json`` whose fingerprint (model, data,
preprocessing, fine-tuning settings and seed) is this config's, and fine-tunes the teacher into that
folder only when there is none. :func:`load_teacher` gives any teacher role.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from kdforge.blackbox.teacher import BlackBoxes, black_box_teacher
from kdforge.config import PRIMARY_TEACHER, JobConfig, ObjectiveConfig, TeacherConfig
from kdforge.deploy.export import export_model
from kdforge.engine.trainer import seed_everything
from kdforge.errors import KDForgeError
from kdforge.io import atomic_write_json, read_json
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel, load_model
from kdforge.objectives.composite import WeightedLoss
from kdforge.recipes.offline import OfflineStep
from kdforge.recipes.stage import train_model
from kdforge.roles.base import primary_teacher, teacher_key
from kdforge.run_folder import RunFolder, TeacherFolder
from kdforge.tasks.base import Task

log = logging.getLogger("kdforge")


def task_loss_config(task: Task) -> list[ObjectiveConfig]:
    """The task loss alone (a teacher's fine-tuning): the objective of the task's problem kind."""
    name = task.problem.objective
    if name is None:
        raise KDForgeError(f"task {task.name}: problem kind {task.problem_type!r} names no objective to fine-tune "
                           "a teacher with; give a teacher that needs no fine-tuning")
    return [ObjectiveConfig(name=name)]


def finetune_seed(config: JobConfig, role: str = PRIMARY_TEACHER) -> int:
    seed = config.teacher_configs()[role].finetune.seed
    return config.train.seed if seed is None else seed


def teacher_fingerprint(config: JobConfig, task: Task, role: str = PRIMARY_TEACHER) -> str:
    teacher = config.teacher_configs()[role]
    settings = teacher.finetune.model_dump(exclude={"seed"})  # the seed in effect is keyed below
    blob = json.dumps({"model": teacher.model, "finetune": settings,
                       "task": task.fingerprint(), "seed": finetune_seed(config, role)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_folder(config: JobConfig, role: str, folder: str | Path | None = None) -> TeacherFolder:
    """``folder`` as a teacher folder, by default teacher ``role``'s in the run folder."""
    return TeacherFolder(folder) if folder is not None else RunFolder.of(config).teacher(role)


def finetune_teacher(config: JobConfig, task: Task, role: str, resume: bool = False,
                     folder: str | Path | None = None) -> LoadedModel:
    """Fine-tune teacher ``role`` on the task with the task loss; export it to its folder (``folder``, by
    default its folder in the run) with its fingerprint."""
    spec: TeacherConfig = config.teacher_configs()[role]
    key = teacher_key(role)
    if spec.finetune is None:
        raise KDForgeError(f"{key}.finetune is not set; add `finetune: {{epochs: 3}}` to it to fine-tune")
    out = teacher_folder(config, role, folder)
    seed_everything(finetune_seed(config, role))
    teacher = load_model(spec.model, task, f"{key}.model")
    ft = spec.finetune
    train_cfg = config.train.model_copy(update={"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size,
                                                "seed": finetune_seed(config, role)})
    step = OfflineStep(ModelAdapter(teacher.model), WeightedLoss.from_config(task_loss_config(task), []))
    log.info("fine-tuning %s %s on %s", role, spec.model, task.name)
    trainer = train_model(step, task, task.split("train"), task.split(task.selection_split), teacher.tokenizer,
                          train_cfg, out.root, role if role != PRIMARY_TEACHER else "teacher", resume)
    if trainer.accelerator.is_main_process:
        export_model(teacher, out.model)
        atomic_write_json(out.record, {"fingerprint": teacher_fingerprint(config, task, role),
                                       "history": trainer.state.history})
    trainer.remove_checkpoints()  # only now: a kill before finetune.json resumes without training again
    return teacher


def find_finetuned_teacher(config: JobConfig, task: Task, role: str,
                           folder: str | Path | None = None) -> LoadedModel | None:
    """Teacher ``role`` as fine-tuned earlier for this config (its fingerprint in ``finetune.json`` of its
    folder), or None."""
    out = teacher_folder(config, role, folder)
    if not out.record.is_file() or read_json(out.record, f"delete {out.root} to fine-tune the teacher again").get(
            "fingerprint") != teacher_fingerprint(config, task, role):
        return None
    log.info("reusing the fine-tuned %s in %s (delete it to fine-tune again)", role, out.root)
    return load_model(str(out.model), task, f"{teacher_key(role)}.model")


def find_or_finetune_teacher(config: JobConfig, task: Task, role: str | None = None, resume: bool = False,
                             folder: str | Path | None = None) -> LoadedModel:
    """Teacher ``role`` (default: the primary one; it has a ``finetune`` section) fine-tuned on the task:
    found again in ``folder`` (default: its folder in the run) by its fingerprint, else fine-tuned into it
    now. Runs that share ``folder`` share the teacher: it is trained once per fingerprint."""
    role = role or primary_teacher(config)
    found = find_finetuned_teacher(config, task, role, folder)
    return found if found is not None else finetune_teacher(config, task, role, resume, folder)


def black_box_tokenizer(config: JobConfig, task: Task):
    """The tokenizer that collates text for a black-box teacher (whose own is unknown): the student's
    (``student.model``), else that of the primary teacher's model the student is built from."""
    from transformers import AutoTokenizer

    from kdforge.models.loading import resolve_model_source

    if task.modality != "text":
        return None
    primary = config.teacher_configs()[primary_teacher(config)]
    spec, key = (config.student.model, "student.model") if config.student is not None and config.student.model \
        else (primary.model, "teacher.model")
    if spec is None:
        raise KDForgeError("a student learning from a black-box teacher must be `student.model` (a model of its "
                           "own with its tokenizer): the teacher's layers and vocabulary are not visible")
    try:
        return AutoTokenizer.from_pretrained(resolve_model_source(spec, key))
    except (OSError, ValueError) as err:
        raise KDForgeError(f"cannot load the tokenizer of {key} {spec!r} ({str(err).splitlines()[0]}); give a "
                           "model folder saved with its tokenizer") from None


def load_teacher(config: JobConfig, task: Task, resume: bool = False, role: str | None = None,
                 black_boxes: BlackBoxes | None = None, tokenizer=None) -> LoadedModel:
    """Teacher ``role`` (default: the primary one) for a job: fine-tuned on the task when it has a
    ``finetune`` section (:func:`find_or_finetune_teacher`), else its ``model`` as is. A black-box teacher
    is its :class:`~kdforge.blackbox.teacher.BlackBoxModule` (``black_boxes``: functions registered by name
    for ``black_box.callable``), collated with ``tokenizer`` (default: :func:`black_box_tokenizer`)."""
    role = role or primary_teacher(config)
    spec = config.teacher_configs()[role]
    key = teacher_key(role)
    if spec.black_box is not None:
        tokenizer = tokenizer if tokenizer is not None else black_box_tokenizer(config, task)
        return black_box_teacher(spec.black_box, task, f"{key}.black_box", black_boxes, tokenizer)
    if spec.finetune is None:
        return load_model(spec.model, task, f"{key}.model", trained_head=True)
    return find_or_finetune_teacher(config, task, role, resume)
