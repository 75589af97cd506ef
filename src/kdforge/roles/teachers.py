"""A teacher's lifecycle: fingerprinted, found again by its fingerprint, else fine-tuned on the task;
or its configured model as is; or a black box behind its client.

:func:`find_or_finetune_teacher` is the one function that gives a fine-tuned teacher for a config: it
looks in a teacher folder (by default the run's ``teacher/`` or ``teachers/<role>/``; any folder, so
that many runs can share one teacher) for a ``finetune.json`` whose fingerprint (model and the layers kept
of it, data, preprocessing, fine-tuning settings and seed) is this config's, and fine-tunes the teacher into that
folder only when there is none. A run's own teacher folder is backed by the *teacher store*
(``$KDFORGE_CACHE/teachers/<key>/``, :func:`teacher_store_key`): a teacher fine-tuned by any earlier
run with the same key is copied from there instead of fine-tuned again, and a newly fine-tuned one is
copied there (``teacher.finetune.store: false`` opts out). :func:`load_teacher` gives any teacher role.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from kdforge.blackbox.teacher import BlackBoxes, black_box_teacher
from kdforge.config import PRIMARY_TEACHER, JobConfig, ObjectiveConfig, TeacherConfig
from kdforge.deploy.export import export_model
from kdforge.engine.trainer import seed_everything
from kdforge.errors import KDForgeError
from kdforge.io import atomic_write_json, file_lock, read_json
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel, load_model
from kdforge.models.student import keep_layers
from kdforge.objectives.composite import WeightedLoss
from kdforge.paths import cache_dir
from kdforge.processes import launch_rank
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
    settings = teacher.finetune.model_dump(exclude={"seed", "store"})  # the seed in effect is keyed below
    layers = {"layers": teacher.layers} if teacher.layers is not None else {}  # absent: earlier keys stay
    blob = json.dumps({"model": teacher.model, "finetune": settings, **layers,
                       "task": task.fingerprint(), "seed": finetune_seed(config, role)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# train settings that do not shape a fine-tuned teacher: logging, the student's seed, and what the
# teacher's own `finetune` section replaces (epochs, lr, batch size: part of its fingerprint)
UNSHAPING = ("seed", "log_every", "trackers", "checkpoint_every", "keep_checkpoint", "device",
             "epochs", "lr", "batch_size")

# train settings added after shared teachers existed: left out at their defaults, so those stay found
LATE_DEFAULTS = {"shuffle": True, "drop_last": False, "scheduler": "linear"}


def teacher_store_key(config: JobConfig, task: Task, role: str) -> str:
    """The name a fine-tuned teacher is shared under (a study's teachers, the teacher store): its
    fingerprint and a hash of the ``train`` settings its fine-tuning inherits (optimizer, weight decay,
    warm-up, precision...; not the student's seed, epochs, lr or batch size)."""
    train = config.train.model_dump(mode="json", exclude=set(UNSHAPING))
    train = {k: v for k, v in train.items() if k not in LATE_DEFAULTS or v != LATE_DEFAULTS[k]}
    extra = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:8]
    return f"{teacher_fingerprint(config, task, role)}-{extra}"


def teacher_store(config: JobConfig, task: Task, role: str) -> TeacherFolder:
    """Teacher ``role``'s folder in the teacher store, ``$KDFORGE_CACHE/teachers/<key>``."""
    return TeacherFolder(cache_dir() / "teachers" / teacher_store_key(config, task, role))


def copy_teacher(source: TeacherFolder, target: TeacherFolder) -> None:
    """Copy a finished teacher (``model/``, then ``finetune.json``, which marks it finished) into
    ``target``; the model is copied beside its place and renamed into it, so a kill leaves no half copy.
    Checkpoints and trackers stay behind."""
    target.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.root, prefix=".model-"))
    try:
        shutil.copytree(source.model, staging / "model")
        target.record.unlink(missing_ok=True)  # a stale teacher stops counting as finished first
        if target.model.exists():
            shutil.rmtree(target.model)
        (staging / "model").rename(target.model)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(target.record, read_json(source.record, f"delete {source.root} to fine-tune again"))


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
    if spec.layers is not None:
        teacher = keep_layers(teacher, spec.layers, f"{key}.layers")
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


def is_finetuned(config: JobConfig, task: Task, role: str, folder: TeacherFolder) -> bool:
    """Whether ``folder`` holds teacher ``role`` fine-tuned for this config: its fingerprint in
    ``finetune.json``, written once the teacher is exported."""
    return folder.record.is_file() and read_json(
        folder.record, f"delete {folder.root} to fine-tune the teacher again").get(
        "fingerprint") == teacher_fingerprint(config, task, role)


def find_finetuned_teacher(config: JobConfig, task: Task, role: str,
                           folder: str | Path | None = None) -> LoadedModel | None:
    """Teacher ``role`` as fine-tuned earlier for this config (see :func:`is_finetuned`), or None."""
    out = teacher_folder(config, role, folder)
    if not is_finetuned(config, task, role, out):
        return None
    log.info("reusing the fine-tuned %s in %s (delete it to fine-tune again)", role, out.root)
    return load_model(str(out.model), task, f"{teacher_key(role)}.model")


def find_or_finetune_teacher(config: JobConfig, task: Task, role: str | None = None, resume: bool = False,
                             folder: str | Path | None = None) -> LoadedModel:
    """Teacher ``role`` (default: the primary one; it has a ``finetune`` section) fine-tuned on the task:
    found again in ``folder`` (default: its folder in the run) by its fingerprint, else fine-tuned into it
    now. Runs that share ``folder`` share the teacher: it is trained once per fingerprint. A run's own folder
    is backed by the teacher store (:func:`teacher_store`, unless ``finetune.store`` is false): an identical
    teacher there is copied into the run instead of fine-tuned, and a newly fine-tuned one is copied there."""
    role = role or primary_teacher(config)
    found = find_finetuned_teacher(config, task, role, folder)
    if found is not None:
        return found
    if folder is not None or not config.teacher_configs()[role].finetune.store:
        return finetune_teacher(config, task, role, resume, folder)
    store, own, main = teacher_store(config, task, role), teacher_folder(config, role), launch_rank() == 0
    if is_finetuned(config, task, role, store):  # finished teachers in the store are never rewritten
        log.info("reusing the fine-tuned %s from the teacher store %s (same model, data, settings and seed; "
                 "`%s.finetune.store: false` fine-tunes it again)", role, store.root, teacher_key(role))
        if main:
            copy_teacher(store, own)  # the run keeps its own copy, as if it had fine-tuned it
        return load_model(str(store.model), task, f"{teacher_key(role)}.model")
    teacher = finetune_teacher(config, task, role, resume)
    if main:
        with file_lock(store.root.with_name(store.root.name + ".lock")):
            if not is_finetuned(config, task, role, store):
                copy_teacher(own, store)
    return teacher


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
