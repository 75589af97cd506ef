"""The jobs behind the CLI and the API: fine-tune teachers, distill a student, evaluate a run.
The run folder's layout and its lifecycle (never losing a finished run) are in ``run_folder.py``."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState

from kdforge.blackbox.teacher import BlackBoxes, black_box_teacher, is_black_box
from kdforge.config import PRIMARY_TEACHER, STUDENT, JobConfig, ObjectiveConfig, TeacherConfig, dump_config, load_config
from kdforge.engine.trainer import seed_everything
from kdforge.errors import KDForgeError
from kdforge.evaluation.report import ModelReport
from kdforge.export import export_model
from kdforge.io import atomic_write_json, atomic_write_text, read_json
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel, load_model
from kdforge.models.student import build_student
from kdforge.objectives.composite import WeightedLoss
from kdforge.preflight import check_job
from kdforge.processes import launch_rank
from kdforge.provenance import PhaseTimer, collect_provenance
from kdforge.recipes.catalog import check_stages, data_source_for, strategy_for
from kdforge.recipes.offline import OfflineStep
from kdforge.recipes.stage import checkpoint_roots, run_stages, train_model
from kdforge.run_folder import PREVIOUS_RUN, finish_run, log_file, prepare_output_dir, restore_previous_run
from kdforge.run_report import (
    evaluate_run,
    existing_exports,
    result_table,
    write_exports,
    write_metrics,
    write_student_card,
)
from kdforge.tasks.base import Task, build_task

log = logging.getLogger("kdforge")


@dataclass
class RunResult:
    run_dir: Path
    teacher: ModelReport
    student: ModelReport
    table: str


def task_loss_config(task: Task) -> list[ObjectiveConfig]:
    name = {"regression": "mse", "language_modeling": "next_token_ce"}.get(task.problem_type, "ce")
    return [ObjectiveConfig(name=name)]


# ---------------------------------------------------------------------------- teachers


def finetune_seed(config: JobConfig, role: str = PRIMARY_TEACHER) -> int:
    seed = config.teacher_configs()[role].finetune.seed
    return config.train.seed if seed is None else seed


def teacher_fingerprint(config: JobConfig, task: Task, role: str = PRIMARY_TEACHER) -> str:
    teacher = config.teacher_configs()[role]
    settings = teacher.finetune.model_dump(exclude={"seed"})  # the seed in effect is keyed below
    blob = json.dumps({"model": teacher.model, "finetune": settings,
                       "task": task.fingerprint(), "seed": finetune_seed(config, role)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_dir(run_dir: str | Path, role: str) -> Path:
    """Where a fine-tuned teacher lives: ``teacher/`` for the primary one, ``teachers/<role>/`` else."""
    return Path(run_dir) / "teacher" if role == PRIMARY_TEACHER else Path(run_dir) / "teachers" / role


def teacher_key(role: str) -> str:
    """The config section of teacher ``role`` (for error messages)."""
    return "teacher" if role == PRIMARY_TEACHER else f"teachers.{role}"


def primary_teacher(config: JobConfig) -> str:
    return next(iter(config.teacher_configs()))


def finetune_teacher(config: JobConfig, task: Task, role: str, resume: bool = False) -> LoadedModel:
    """Fine-tune teacher ``role`` on the task with the task loss; export it to its folder."""
    spec: TeacherConfig = config.teacher_configs()[role]
    key = teacher_key(role)
    if spec.finetune is None:
        raise KDForgeError(f"{key}.finetune is not set; add `finetune: {{epochs: 3}}` to it to fine-tune")
    out = teacher_dir(config.output_dir, role)
    seed_everything(finetune_seed(config, role))
    teacher = load_model(spec.model, task, f"{key}.model")
    ft = spec.finetune
    train_cfg = config.train.model_copy(update={"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size,
                                                "seed": finetune_seed(config, role)})
    step = OfflineStep(ModelAdapter(teacher.model), WeightedLoss.from_config(task_loss_config(task), []))
    log.info("fine-tuning %s %s on %s", role, spec.model, task.name)
    trainer = train_model(step, task, task.split("train"), task.split(task.selection_split), teacher.tokenizer,
                          train_cfg, out, role if role != PRIMARY_TEACHER else "teacher", resume)
    if trainer.accelerator.is_main_process:
        export_model(teacher, out / "model")
        atomic_write_json(out / "finetune.json", {"fingerprint": teacher_fingerprint(config, task, role),
                                                  "history": trainer.state.history})
    trainer.remove_checkpoints()  # only now: a kill before finetune.json resumes without training again
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


def get_teacher(config: JobConfig, task: Task, resume: bool = False, role: str | None = None,
                black_boxes: BlackBoxes | None = None, tokenizer=None) -> LoadedModel:
    """Teacher ``role`` (default: the primary one), trained on the task: reused from its folder when
    its fingerprint (model, data, preprocessing, fine-tuning settings) matches, fine-tuned now
    otherwise, or its ``model`` as is when it has no ``finetune``. A black-box teacher is its
    :class:`~kdforge.blackbox.teacher.BlackBoxModule` (``black_boxes``: functions registered by name for
    ``black_box.callable``), collated with ``tokenizer`` (default: :func:`black_box_tokenizer`)."""
    role = role or primary_teacher(config)
    spec = config.teacher_configs()[role]
    key = teacher_key(role)
    if spec.black_box is not None:
        tokenizer = tokenizer if tokenizer is not None else black_box_tokenizer(config, task)
        return black_box_teacher(spec.black_box, task, f"{key}.black_box", black_boxes, tokenizer)
    if spec.finetune is None:
        return load_model(spec.model, task, f"{key}.model", trained_head=True)
    out = teacher_dir(config.output_dir, role)
    meta = out / "finetune.json"
    if meta.is_file() and read_json(meta, f"delete {out} to fine-tune the teacher again").get(
            "fingerprint") == teacher_fingerprint(config, task, role):
        log.info("reusing the fine-tuned %s in %s (delete it to fine-tune again)", role, out)
        return load_model(str(out / "model"), task, f"{key}.model")
    return finetune_teacher(config, task, role, resume)


def run_finetune(config: JobConfig, resume: bool = False) -> LoadedModel:
    """Fine-tune every teacher that has a ``finetune`` section; returns the primary teacher."""
    tuned = [role for role, spec in config.teacher_configs().items() if spec.finetune is not None]
    if not tuned:
        raise KDForgeError("teacher.finetune is not set; add `teacher: {finetune: {epochs: 3}}` to fine-tune")
    check_job(config, "finetune")
    task = build_task(config.task)
    with log_file(Path(config.output_dir)):
        models = {role: finetune_teacher(config, task, role, resume) for role in tuned}
    return models.get(primary_teacher(config)) or next(iter(models.values()))


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
    of the first teacher with a model, else the student's), the student and the assistants, both built
    from the primary teacher."""
    models: dict[str, LoadedModel] = {}
    for role in config.teacher_configs():
        seed_everything(config.train.seed)
        tokenizer = next((m.tokenizer for m in models.values() if not is_black_box(m)), None)
        models[role] = get_teacher(config, task, resume, role, black_boxes, tokenizer)
    primary = models[primary_teacher(config)]
    texts = training_texts(config, task) if any(
        s.vocab_fraction for s in [config.student, *config.assistants.values()]) else None
    for offset, (role, spec) in enumerate({STUDENT: config.student, **config.assistants}.items()):
        seed_everything(config.train.seed + offset)  # each assistant its own fresh parts (born-again generations)
        models[role] = build_student(spec, primary, task, texts if spec.vocab_fraction else None)
    return models


# ---------------------------------------------------------------------------- distill


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


def finished_result(config: JobConfig, run_dir: Path) -> RunResult | None:
    """The results of the finished run in ``run_dir`` (read from its ``metrics.json``), or None."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    fix = f"run `kdforge eval {run_dir}` to write it again, or distill again with --overwrite"
    saved = read_json(path, fix)
    try:
        teacher, student = ModelReport.from_dict(saved["teacher"]), ModelReport.from_dict(saved["student"])
        return RunResult(run_dir, teacher, student, result_table(saved))
    except (KeyError, TypeError):
        raise KDForgeError(f"{path} does not hold kdforge's teacher and student reports; {fix}") from None


def run_distill(config: JobConfig, resume: bool = False, overwrite: bool = False, callbacks=(),
                black_boxes: BlackBoxes | None = None) -> RunResult:
    """The whole job: teachers (fine-tuned if asked), student and assistants, every stage, export,
    report. ``resume`` skips finished stages and resumes the interrupted one; on a finished run it
    changes nothing and returns its results. See the module docstring for ``overwrite``.
    ``black_boxes``: functions ``fn(list of protocol inputs) -> probabilities`` that a teacher's
    ``black_box.callable`` names."""
    if config.student is None:
        raise KDForgeError("the config has no `student` section; add e.g. `student: {layers: [0, 5]}`")
    main = launch_rank() == 0
    run_dir = Path(config.output_dir)
    if resume and (done := finished_result(config, run_dir)) is not None:
        log.info("%s holds a finished run (metrics.json): nothing to resume, nothing changed (distill with "
                 "--overwrite to run it again)", run_dir)
        if main and ((run_dir / PREVIOUS_RUN).exists() or any(
                root.exists() and not keep for root, keep in checkpoint_roots(config, run_dir))):
            finish_run(config, run_dir)  # a kill came after the results were written, before the clean-up
        return done if main else None  # type: ignore[return-value]
    check_job(config, "distill", black_boxes)  # devices, folders, models, lengths: refused before any file is written
    check_stages(config)  # bad strategies, roles or objective settings too
    run_dir = prepare_output_dir(config, resume, overwrite)
    timer = PhaseTimer()
    with log_file(run_dir):
        try:
            if main:
                atomic_write_text(run_dir / "config.yaml", dump_config(config))
            task = build_task(config.task)
            with timer.phase("teachers and students built (teachers fine-tuned)"):
                models = load_models(config, task, resume, black_boxes)
            with timer.phase("training stages"):
                history = run_stages(config, task, models, run_dir, resume, callbacks)
            if not PartialState().is_main_process:
                return None  # type: ignore[return-value]
            with timer.phase("export"):
                export_model(models[STUDENT], run_dir / "student")
                for role in trained_roles(config):
                    export_model(models[role], run_dir / "models" / role)
                onnx_files = write_exports(config, models[primary_teacher(config)], models[STUDENT], run_dir)
            result = report_run(config, task, models, run_dir, history, timer, onnx_files)
            finish_run(config, run_dir)
            return result
        except Exception:
            if main:
                restore_previous_run(run_dir)
            raise
        except BaseException:  # interrupted: --resume continues this run
            if main and (run_dir / PREVIOUS_RUN).is_dir():
                log.info("interrupted: the finished run this one replaces stays in %s until this run completes "
                         "(--resume); move its files back into %s to return to it", run_dir / PREVIOUS_RUN,
                         run_dir)
            raise


def report_run(config: JobConfig, task: Task, models: dict[str, LoadedModel], run_dir: Path,
               history: list | None, timer: PhaseTimer, onnx_files: dict[str, Path], out_dir: Path | None = None,
               function: str = "distill") -> RunResult:
    """Every form of the primary teacher and the student measured on the reported split (see
    :mod:`kdforge.run_report`), the report and ``metrics.json`` written into ``out_dir`` (the run folder
    by default)."""
    out_dir = out_dir or run_dir
    teacher_role = primary_teacher(config)
    provenance = collect_provenance(config, function=function)
    with timer.phase("evaluation"):
        saved = evaluate_run(config, task, models, teacher_role, out_dir, history,
                             {**provenance, "phases": timer.seconds},
                             {role: teacher_dir(run_dir, role) for role in config.teacher_configs()}, onnx_files)
    saved["provenance"]["phases"] = dict(timer.seconds)
    if function == "distill":
        write_student_card(config, task, run_dir, saved)
    write_metrics(out_dir, saved)
    log.info("results in %s", out_dir)
    teacher, student = ModelReport.from_dict(saved["teacher"]), ModelReport.from_dict(saved["student"])
    return RunResult(out_dir, teacher, student, result_table(saved))


# ---------------------------------------------------------------------------- eval, export, latency


def finished_run(target: str | Path, overrides=None) -> tuple[JobConfig, Path]:
    """The config and folder of a finished run given as a run folder or its config file."""
    target = Path(target)
    config = load_config(target / "config.yaml" if target.is_dir() else target, overrides)
    run_dir = target if target.is_dir() else Path(config.output_dir)
    if not (run_dir / "student").is_dir():
        raise KDForgeError(f"{run_dir / 'student'} does not exist; run `kdforge distill` first")
    return config, run_dir


def run_models(config: JobConfig, run_dir: Path, task: Task,
               black_boxes: BlackBoxes | None = None) -> dict[str, LoadedModel]:
    """A finished run's models: teachers from their fine-tuned folders (or their config; black boxes
    collated with the student's tokenizer), every role a stage trained from ``models/<role>/``, and the
    exported student."""
    models = {}
    student = load_model(str(run_dir / "student"), task, "student")
    for role, spec in config.teacher_configs().items():
        if spec.black_box is not None:
            models[role] = black_box_teacher(spec.black_box, task, f"{teacher_key(role)}.black_box", black_boxes,
                                             student.tokenizer)
            continue
        folder = teacher_dir(run_dir, role) / "model"
        models[role] = load_model(str(folder) if folder.is_dir() else spec.model, task)
    for role in trained_roles(config):
        folder = run_dir / "models" / role
        if not folder.is_dir():
            raise KDForgeError(f"{folder} does not exist (the run trained {role}); distill again with --overwrite")
        models[role] = load_model(str(folder), task, role)
    models[STUDENT] = student
    return models


def dated_folder(run_dir: Path, kind: str) -> Path:
    """``run_dir/<kind>/<UTC date and time>``: a new folder for each evaluation, never an old one reused."""
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    folder, n = run_dir / kind / stamp, 1
    while folder.exists():
        n += 1
        folder = run_dir / kind / f"{stamp}-{n}"
    return folder


def run_eval(target: str | Path, overrides=None, onnx: bool = False, int8: bool = False,
             black_boxes: BlackBoxes | None = None) -> RunResult:
    """Evaluate the teachers, the exported student and the run's ONNX files (those in ``exports/``;
    ``onnx``/``int8`` export them first) of a finished run, written as a new dated evaluation in
    ``RUN_DIR/evaluations/<date>/``; the run's own report and metrics stay as they are."""
    config, run_dir = finished_run(target, overrides)
    if onnx or int8:
        config = config.model_copy(update={"export": config.export.model_copy(
            update={"onnx": True, "int8": int8 or config.export.int8})})
    out_dir = dated_folder(run_dir, "evaluations")
    timer = PhaseTimer()
    with log_file(run_dir):
        task = build_task(config.task)
        models = run_models(config, run_dir, task, black_boxes)
        with timer.phase("export"):
            onnx_files = write_exports(config, models[primary_teacher(config)], models[STUDENT], run_dir) \
                if onnx or int8 else existing_exports(run_dir)
        metrics = run_dir / "metrics.json"
        history = read_json(metrics, f"delete it and run `kdforge eval {run_dir}` again").get("history") \
            if metrics.is_file() else None
        return report_run(config, task, models, run_dir, history, timer, onnx_files, out_dir, "evaluate")


def run_bench_latency(target: str | Path, overrides=None) -> tuple[Path, str]:
    """Re-measure the latency of a finished run's teacher, student and ONNX files on this machine
    (interleaved, see :func:`kdforge.evaluation.evaluate.time_forms`); writes ``latency.json`` and
    ``latency.md`` into ``RUN_DIR/latency/<date>/`` and returns that folder and the table."""
    from kdforge.evaluation.evaluate import time_forms
    from kdforge.evaluation.latency import describe_latency_noise
    from kdforge.evaluation.render import render_markdown
    from kdforge.run_report import build_forms, latency_table

    config, run_dir = finished_run(target, overrides)
    task = build_task(config.task)
    models = run_models(config, run_dir, task)
    onnx_files = existing_exports(run_dir)
    forms = [f for f in build_forms(config, task, models, primary_teacher(config), onnx_files) if f.forward]
    log.info("timing %s interleaved: %d rounds per batch size %s (black-box teachers are not timed: their "
             "round trip is in the run's report)", ", ".join(f.name for f in forms), config.eval.latency_repeats,
             config.eval.latency_batch_sizes)
    timing = time_forms(forms, config.eval)
    provenance = collect_provenance(config, function="bench_latency")
    out_dir = dated_folder(run_dir, "latency")
    out_dir.mkdir(parents=True)
    atomic_write_json(out_dir / "latency.json", {**timing, "provenance": provenance})
    noise = describe_latency_noise(timing)
    headers, rows = latency_table(timing)
    threads = next(iter(timing["models"].values()))["threads"]
    lines = [f"seq len {config.eval.latency_seq_len}, threads {threads}, "
             f"{config.eval.latency_repeats} interleaved rounds; CPU {provenance['cpu']}; {provenance['date']}",
             *([f"WARNING: {noise}"] if noise else [])]
    atomic_write_text(out_dir / "latency.md", render_markdown([("h1", f"Latency of {run_dir}"),
                                                               ("table", (headers, rows)),
                                                               *(("p", line) for line in lines)]))
    table = "\n".join([" | ".join(headers), *(" | ".join(r) for r in rows), *lines])
    return out_dir, table
