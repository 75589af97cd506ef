"""Every role's model: for a job (:func:`load_models`: teachers fine-tuned or reused, the student and the
assistants built from the primary teacher) and for a finished run (:func:`load_run_model` by role, used by
eval, export, bench-latency, serve and the report's re-evaluation)."""

from __future__ import annotations

from kdforge.blackbox.teacher import BlackBoxes
from kdforge.config import STUDENT, JobConfig
from kdforge.engine.trainer import seed_everything
from kdforge.errors import KDForgeError
from kdforge.models.loading import LoadedModel, load_model
from kdforge.models.student import build_student
from kdforge.recipes.catalog import data_source_for, strategy_for
from kdforge.roles.base import capabilities, primary_teacher
from kdforge.roles.teachers import load_teacher
from kdforge.run_folder import RunFolder
from kdforge.tasks.base import Task


def training_texts(config: JobConfig, task: Task) -> list[str]:
    """Every passage the student trains on: the task's training text and the text of the stages' own data
    sources (a corpus; word frequencies for GLMD vocabulary compression are counted over them)."""
    texts = [t for e in task.split("train") for t in (e.get("text_a"), e.get("text_b")) if t]
    for index, stage in enumerate(config.all_stages()):
        texts += data_source_for(stage, index).texts()
    return texts


def load_models(config: JobConfig, task: Task, resume: bool = False,
                black_boxes: BlackBoxes | None = None) -> dict[str, LoadedModel]:
    """Every role's model: the teachers (fine-tuned when asked; black boxes collated with the tokenizer
    of the first teacher with weights, else the student's), the student and the assistants, both built
    from the primary teacher."""
    models: dict[str, LoadedModel] = {}
    for role in config.teacher_configs():
        seed_everything(config.train.seed)
        tokenizer = next((m.tokenizer for r, m in models.items() if capabilities(config, r).weights), None)
        models[role] = load_teacher(config, task, resume, role, black_boxes, tokenizer)
    primary = models[primary_teacher(config)]
    texts = training_texts(config, task) if any(
        s.vocab_fraction for s in [config.student, *config.assistants.values()]) else None
    for offset, (role, spec) in enumerate({STUDENT: config.student, **config.assistants}.items()):
        seed_everything(config.train.seed + offset)  # each assistant its own fresh parts (born-again generations)
        models[role] = build_student(spec, primary, task, texts if spec.vocab_fraction else None)
    return models


def trained_roles(config: JobConfig) -> list[str]:
    """The roles besides the student that a stage trains: assistants that learn in a stage, and teachers
    trained with their learner by an online strategy (DML, BD-KD online); exported to ``models/<role>/``."""
    roles: dict[str, None] = {}
    for index, stage in enumerate(config.all_stages()):
        roles[stage.learner] = None
        if strategy_for(stage, index).trains_teachers:
            roles.update(dict.fromkeys(config.stage_teachers(stage)))
    roles.pop(STUDENT, None)
    return list(roles)


def run_roles(config: JobConfig) -> list[str]:
    """The roles of a finished run: the student, the teachers, then the other roles a stage trained."""
    teachers = config.teacher_configs()
    return [STUDENT, *teachers, *(r for r in trained_roles(config) if r not in teachers)]


def load_run_model(config: JobConfig, run: RunFolder, task: Task, role: str,
                   black_boxes: BlackBoxes | None = None, tokenizer=None) -> LoadedModel:
    """The model ``role`` of the finished run in ``run``: the exported student, ``models/<role>/`` for a role
    a stage trained, a teacher's fine-tuned folder or else its configured model; a black-box teacher
    through its client, collated with ``tokenizer`` (the student's)."""
    if role == STUDENT:
        return load_model(str(run.student), task, "student")
    if role in trained_roles(config):
        folder = run.model(role)
        if not folder.is_dir():
            raise KDForgeError(f"{folder} does not exist (the run trained {role}); distill again with --overwrite")
        return load_model(str(folder), task, role)
    teachers = config.teacher_configs()
    if role not in teachers:
        raise KDForgeError(f"run {run.root} has no role {role!r}; its roles: {', '.join(run_roles(config))}")
    if teachers[role].black_box is not None:
        return load_teacher(config, task, role=role, black_boxes=black_boxes, tokenizer=tokenizer)
    folder = run.teacher(role).model
    if folder.is_dir():
        return load_model(str(folder), task)
    if teachers[role].finetune is not None:  # never the base model in place of the run's fine-tuned teacher
        raise KDForgeError(f"the run fine-tuned its teacher {role!r} into {folder}, which is gone; restore that folder "
                           f"or fine-tune it again with `kdforge finetune {run.config_file}`")
    return load_model(teachers[role].model, task)


def load_run_models(config: JobConfig, run: RunFolder, task: Task,
                    black_boxes: BlackBoxes | None = None) -> dict[str, LoadedModel]:
    """Every model of a finished run by role (:func:`load_run_model`): the teachers, the other roles a stage
    trained, then the student."""
    student = load_run_model(config, run, task, STUDENT)
    models = {role: load_run_model(config, run, task, role, black_boxes, student.tokenizer)
              for role in run_roles(config)[1:]}
    models[STUDENT] = student
    return models
