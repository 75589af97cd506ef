"""The jobs behind the CLI and the API: fine-tune a teacher, distill a student, evaluate a run.

Run folder layout (``output_dir``)::

    config.yaml          the validated config actually used
    train.log            progress and epoch metrics
    teacher/             fine-tuned teacher (model/, finetune.json) when teacher.finetune is set
    student/             exported student (save_pretrained + tokenizer; an SPS student unrolled)
    student-compact/     an SPS student's compact shared form (only for student.sps)
    stages/              per finished stage of a multi-stage recipe: history and student snapshot
    metrics.json         teacher and student reports + comparison
    report.md/.html      the same as a document, with the reliability diagram
    tensorboard/         scalars of every stage
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from kdforge.augment import EmbeddingNeighbours, augment_dataset
from kdforge.cache import CacheSpec, IndexedCollator, IndexedDataset, TeacherCache
from kdforge.config import JobConfig, ObjectiveConfig, StageConfig, TrainConfig, dump_config, load_config
from kdforge.engine.checkpoint import save_torch_atomic
from kdforge.engine.module import DistillationModule
from kdforge.engine.trainer import Trainer, make_accelerator, seed_everything
from kdforge.errors import KDForgeError
from kdforge.evaluation.evaluate import evaluate_model
from kdforge.evaluation.report import ModelReport, comparison_summary, format_table, write_report
from kdforge.export import export_model
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.models.adapter import ModelAdapter
from kdforge.models.heads import classifier_size, head_size, replace_head
from kdforge.models.loading import LoadedModel, load_model
from kdforge.models.student import build_student
from kdforge.models.vocab import StudentIdsCollator
from kdforge.objectives.composite import WeightedLoss
from kdforge.recipes.ptp import PTPTask
from kdforge.tasks.base import Task, build_task
from kdforge.tasks.corpus import CorpusTask, corpus_texts

log = logging.getLogger("kdforge")


@dataclass
class RunResult:
    run_dir: Path
    teacher: ModelReport
    student: ModelReport
    table: str


def attach_log_file(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = str((run_dir / "train.log").resolve())
    if not any(getattr(h, "baseFilename", None) == path for h in log.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def make_evaluator(task: Task, data, tokenizer, batch_size: int, device):
    collate = task.collator(tokenizer, train=False)

    def evaluate(student_adapter: torch.nn.Module) -> dict[str, float]:
        return task.evaluate(student_adapter, data, collate, batch_size, device).metrics

    return evaluate


def task_loss_config(task: Task) -> list[ObjectiveConfig]:
    name = {"regression": "mse", "language_modeling": "next_token_ce"}.get(task.problem_type, "ce")
    return [ObjectiveConfig(name=name)]


def train_model(module: DistillationModule, task: Task, train_data, dev_data, tokenizer,
                train_config: TrainConfig, run_dir: Path, desc: str, resume: bool, callbacks=(),
                accelerator=None, collate_fn=None) -> Trainer:
    """Train ``module``; evaluated on ``dev_data`` each epoch unless it is None (unlabeled stages)."""
    accelerator = accelerator or make_accelerator(train_config)
    collate_fn = collate_fn or task.collator(tokenizer, train=True)
    evaluate = None if dev_data is None else make_evaluator(task, dev_data, tokenizer, train_config.batch_size * 2,
                                                            accelerator.device)
    trainer = Trainer(module, train_data, collate_fn, train_config, run_dir, evaluate=evaluate,
                      main_metric=task.main_metric if evaluate else None,
                      greater_is_better=task.greater_is_better, accelerator=accelerator, desc=desc,
                      callbacks=callbacks)
    trainer.fit(resume=resume)
    return trainer


# ---------------------------------------------------------------------------- teacher


def finetune_seed(config: JobConfig) -> int:
    seed = config.teacher.finetune.seed
    return config.train.seed if seed is None else seed


def teacher_fingerprint(config: JobConfig, task: Task) -> str:
    settings = config.teacher.finetune.model_dump(exclude={"seed"})  # the seed in effect is keyed below
    blob = json.dumps({"model": config.teacher.model, "finetune": settings,
                       "task": task.fingerprint(), "seed": finetune_seed(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_finetune(config: JobConfig, resume: bool = False) -> LoadedModel:
    """Fine-tune ``teacher.model`` on the task with the task loss; export to ``output_dir/teacher``."""
    if config.teacher.finetune is None:
        raise KDForgeError("teacher.finetune is not set; add `teacher: {finetune: {epochs: 3}}` to fine-tune")
    task = build_task(config.task)
    out = Path(config.output_dir) / "teacher"
    attach_log_file(Path(config.output_dir))
    seed_everything(finetune_seed(config))
    teacher = load_model(config.teacher.model, task, "teacher.model")
    ft = config.teacher.finetune
    train_cfg = config.train.model_copy(update={"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size,
                                                "seed": finetune_seed(config)})
    module = DistillationModule(ModelAdapter(teacher.model), WeightedLoss.from_config(task_loss_config(task)))
    log.info("fine-tuning teacher %s on %s", config.teacher.model, task.name)
    trainer = train_model(module, task, task.split("train"), task.split(task.eval_split), teacher.tokenizer,
                          train_cfg, out, "teacher", resume)
    if trainer.accelerator.is_main_process:
        export_model(teacher, out / "model")
        atomic_write_json(out / "finetune.json", {"fingerprint": teacher_fingerprint(config, task),
                                                  "history": trainer.state.history})
    return teacher


def get_teacher(config: JobConfig, task: Task, resume: bool = False) -> LoadedModel:
    """The task-trained teacher: reused from ``output_dir/teacher`` when its fingerprint (model, data,
    preprocessing, fine-tuning settings) matches, fine-tuned now otherwise, or ``teacher.model`` as is."""
    if config.teacher.finetune is None:
        return load_model(config.teacher.model, task, "teacher.model", trained_head=True)
    out = Path(config.output_dir) / "teacher"
    meta = out / "finetune.json"
    if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == teacher_fingerprint(config, task):
        log.info("reusing the fine-tuned teacher in %s (delete it to fine-tune again)", out)
        return load_model(str(out / "model"), task, "teacher.model")
    return run_finetune(config, resume=resume)


# ---------------------------------------------------------------------------- distill


def prepare_output_dir(config: JobConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(config.output_dir)
    if (run_dir / "metrics.json").exists() and not resume:
        if not overwrite:
            raise KDForgeError(f"{run_dir} already holds a finished run; pass --overwrite to replace it "
                               "or choose another folder with --set output_dir=...")
        for name in ("student", "metrics.json", "report.md", "report.html", "reliability.png", "checkpoints",
                     "stages"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    attach_log_file(run_dir)
    return run_dir


def cache_applies(config: JobConfig, loss: WeightedLoss, teacher_hooks: list[str], task: Task) -> bool:
    """The cache is exact only for a frozen teacher whose needed outputs it stores, on inputs
    without random augmentation."""
    cc = config.teacher_cache
    needs = loss.requires
    usable = (cc.enabled and loss.uses_teacher and not teacher_hooks and "attentions" not in needs
              and ("hidden_states" not in needs or bool(cc.hidden_states)) and not task.random_train_inputs)
    if cc.enabled and loss.uses_teacher and not usable:
        log.info("teacher outputs are computed every step (the cache does not apply: %s)",
                 "random augmentation" if task.random_train_inputs else
                 "set teacher_cache.hidden_states to cache hidden states" if "hidden_states" in needs
                 else "objectives read attention maps or hooked features")
    return usable


def kd_temperature(loss: WeightedLoss) -> float:
    """The temperature of a stage's KD terms when they share one fixed value (the top-k cache keeps
    the teacher's tail mass exact at it), else 1."""
    found = {getattr(o.params, "temperature", None) for o in loss.objectives if o.uses_teacher}
    found.discard(None)
    value = next(iter(found)) if len(found) == 1 else None
    return float(value) if isinstance(value, int | float) else 1.0


def stage_task(stage: StageConfig, task: Task, teacher: LoadedModel, config: JobConfig, device) -> Task:
    """The data a stage learns from: the task, its PTP relabelling, or an unlabeled corpus."""
    if stage.data == "ptp":
        return PTPTask(task, teacher, stage.ptp, config.eval.batch_size, device)
    if stage.data == "corpus":
        return CorpusTask(stage.corpus, language_model=task.problem_type == "language_modeling")
    return task


def training_texts(config: JobConfig, task: Task) -> list[str]:
    """Every passage the student trains on: the task's training text and the corpus stages' text
    (word frequencies for GLMD vocabulary compression are counted over them)."""
    texts = [t for e in task.split("train") for t in (e.get("text_a"), e.get("text_b")) if t]
    for stage in config.all_stages():
        if stage.data == "corpus":
            texts += corpus_texts(stage.corpus)
    return texts


def run_stage(config: JobConfig, index: int, task: Task, teacher: LoadedModel, student: LoadedModel,
              run_dir: Path, resume: bool, callbacks=()) -> Trainer:
    """Train the student for stage ``index``: its data, head, objectives (with their hooks) and cache.
    Each stage starts from its own seed, so it trains the same whether earlier stages ran now or
    were restored from their snapshots."""
    stage = config.all_stages()[index]
    train_config = config.stage_train(stage)
    seed_everything(train_config.seed + 1000 * index)
    accelerator = make_accelerator(train_config)
    data = stage_task(stage, task, teacher, config, accelerator.device)
    labelled = not isinstance(data, CorpusTask)
    classifier = labelled and data.problem_type != "language_modeling"
    if classifier and (stage.head == "reinit" or head_size(student.model) != data.num_labels):
        log.info("stage %s: fresh %d-output head", stage.name, data.num_labels)
        replace_head(student.model, data.num_labels, data.label_names or None)
    loss = WeightedLoss.from_config(stage.objectives)
    hooks = dict(zip(("student", "teacher"), loss.setup(student.model, teacher.model), strict=True))
    needs = loss.requires
    adapters = {name: ModelAdapter(m.model, hooks[name], hidden_states="hidden_states" in needs,
                                   attentions="attentions" in needs, teacher=name == "teacher")
                for name, m in (("student", student), ("teacher", teacher))}
    train_data = data.split("train")
    if stage.augment is not None:
        aug = stage.augment
        neighbours = EmbeddingNeighbours(teacher.tokenizer, teacher.model.get_input_embeddings().weight.detach(),
                                         aug.k)
        train_data = augment_dataset(train_data, neighbours, aug.copies, aug.p, aug.seed)
        log.info("stage %s: %d training examples after augmentation", stage.name, len(train_data))
    cache, id_map = None, getattr(student.model, "kdforge_id_map", None)
    # a compressed vocabulary: the batch is tokenized for the teacher and the student gets its own ids
    collate = data.collator(student.tokenizer, train=True) if id_map is None else \
        StudentIdsCollator(data.collator(teacher.tokenizer, train=True), id_map)
    if cache_applies(config, loss, hooks["teacher"], data):
        cc = config.teacher_cache
        spec = CacheSpec(getattr(torch, cc.dtype), cc.top_k, tuple(cc.hidden_states),
                         kd_temperature(loss))
        with accelerator.main_process_first():
            fingerprint = data.fingerprint() + (f"+augment:{stage.augment.model_dump_json()}" if stage.augment else "")
            cache = TeacherCache.load_or_build(teacher.model.to(accelerator.device), train_data,
                                               data.collator(teacher.tokenizer), fingerprint,
                                               teacher.tokenizer, config.eval.batch_size, accelerator.device,
                                               spec, Path(cc.folder) if cc.folder else None)
        train_data, collate = IndexedDataset(train_data), IndexedCollator(collate)
    module = DistillationModule(adapters["student"], loss, [adapters["teacher"]], teacher_cache=cache)
    log.info("stage %s: %s -> student (%s) on %s with %s", stage.name, teacher.source, student.source,
             data.name, ", ".join(loss.names))
    try:
        return train_model(module, data, train_data, data.split(data.eval_split) if labelled else None,
                           student.tokenizer, train_config, run_dir, stage.name, resume, callbacks,
                           accelerator, collate)
    finally:
        for adapter in adapters.values():
            adapter.remove_hooks()


def save_snapshot(student: LoadedModel, path: Path) -> None:
    save_torch_atomic({"num_labels": classifier_size(student.model), "state": student.model.state_dict()}, path)


def restore_snapshot(student: LoadedModel, path: Path) -> None:
    snapshot = torch.load(path, map_location="cpu")
    if snapshot["num_labels"] is not None and head_size(student.model) != snapshot["num_labels"]:
        replace_head(student.model, snapshot["num_labels"])
    student.model.load_state_dict(snapshot["state"])


def run_distill(config: JobConfig, resume: bool = False, overwrite: bool = False, callbacks=()) -> RunResult:
    """The whole job: teacher (fine-tuned if asked), student, every stage, export, report.

    With several stages, each finished stage leaves ``stages/<name>.json`` (its history) and a
    snapshot of the student; ``resume`` skips finished stages and resumes the interrupted one."""
    if config.student is None:
        raise KDForgeError("the config has no `student` section; add e.g. `student: {layers: [0, 5]}`")
    stages = config.all_stages()
    run_dir = prepare_output_dir(config, resume, overwrite)
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    seed_everything(config.train.seed)
    for stage in stages:  # bad objective settings fail before any training
        WeightedLoss.from_config(stage.objectives)
    task = build_task(config.task)
    dev_data = task.split(task.eval_split)
    teacher = get_teacher(config, task, resume)
    seed_everything(config.train.seed)
    student = build_student(config.student, teacher, task,
                            training_texts(config, task) if config.student.vocab_fraction else None)
    history: list[dict] = []
    for index, stage in enumerate(stages):
        marker, snapshot = run_dir / "stages" / f"{stage.name}.json", run_dir / "stages" / f"{stage.name}.pt"
        if resume and marker.is_file():
            log.info("stage %s finished earlier: skipped", stage.name)
            stage_history = json.loads(marker.read_text())["history"]
            if snapshot.is_file():
                restore_snapshot(student, snapshot)
        else:
            trainer = run_stage(config, index, task, teacher, student, run_dir, resume, callbacks)
            stage_history = trainer.state.history
            if len(stages) > 1 and trainer.accelerator.is_main_process:
                if stage is not stages[-1]:
                    save_snapshot(student, snapshot)
                atomic_write_json(marker, {"history": stage_history})
        history += [{"stage": stage.name, **h} if len(stages) > 1 else h for h in stage_history]
    if not PartialState().is_main_process:
        return None  # type: ignore[return-value]
    export_model(student, run_dir / "student")
    return report_run(config, task, teacher, student, dev_data, run_dir, history)


def report_run(config: JobConfig, task: Task, teacher: LoadedModel, student: LoadedModel, dev_data,
               run_dir: Path, history: list | None) -> RunResult:
    reports = [evaluate_model(name, m, task, dev_data, config.eval) for name, m in
               (("teacher", teacher), ("student", student))]
    table = format_table(*reports)
    atomic_write_json(run_dir / "metrics.json", {"task": task.name, "teacher": reports[0].to_dict(),
                                                 "student": reports[1].to_dict(),
                                                 "comparison": comparison_summary(*reports),
                                                 "history": history or []})
    write_report(run_dir, *reports, title=f"kdforge: {task.name}", config_yaml=dump_config(config),
                 history=history)
    log.info("results in %s", run_dir)
    return RunResult(run_dir, reports[0], reports[1], table)


# ---------------------------------------------------------------------------- eval


def run_eval(target: str | Path, overrides=None) -> RunResult:
    """Evaluate the teacher and the exported student of a finished run (a run folder or its config)."""
    target = Path(target)
    config = load_config(target / "config.yaml" if target.is_dir() else target, overrides)
    run_dir = Path(config.output_dir) if not target.is_dir() else target
    student_dir = run_dir / "student"
    if not student_dir.is_dir():
        raise KDForgeError(f"{student_dir} does not exist; run `kdforge distill` first")
    attach_log_file(run_dir)
    task = build_task(config.task)
    teacher_dir = run_dir / "teacher" / "model"
    teacher = load_model(str(teacher_dir) if teacher_dir.is_dir() else config.teacher.model, task)
    student = load_model(str(student_dir), task, "student")
    history = json.loads((run_dir / "metrics.json").read_text()).get("history") \
        if (run_dir / "metrics.json").is_file() else None
    return report_run(config, task, teacher, student, task.split(task.eval_split), run_dir, history)
