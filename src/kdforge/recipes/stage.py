"""The stage runner: assembles one stage from its parts (data source, roles, strategy) and hands
the strategy's TrainStep to the engine. Stages run in order; each finished stage of a multi-stage
recipe but the last leaves ``stages/<name>.json`` (its history) and a snapshot of its learner, so
``--resume`` skips it, and each stage starts from its own seed, so it trains the same whether earlier
stages ran now or were restored. The last stage's learner is the run's result: a resume after it
finished restores it from the stage's final checkpoint (the trainer keeps every stage's
checkpoints; the job deletes them once the run's outputs are written) and trains no step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from kdforge.augment import EmbeddingNeighbours, augment_dataset
from kdforge.config import JobConfig, StageConfig, TrainConfig
from kdforge.engine.checkpoint import load as load_checkpoint_file
from kdforge.engine.checkpoint import save_torch_atomic
from kdforge.engine.step import TrainStep
from kdforge.engine.trainer import Trainer, check_parts, make_accelerator, seed_everything
from kdforge.io import atomic_write_json, read_json
from kdforge.models.heads import classifier_size, head_size, replace_head
from kdforge.models.loading import LoadedModel
from kdforge.models.vocab import StudentIdsCollator, id_map_of
from kdforge.recipes.base import StageContext, StageData
from kdforge.recipes.catalog import data_source_for, strategy_for
from kdforge.run_folder import RunFolder
from kdforge.tasks.base import Task

log = logging.getLogger("kdforge")


def train_model(step: TrainStep, task: Task | StageData, train_data, dev_data, tokenizer, train_config: TrainConfig,
                run_dir: Path, desc: str, resume: bool, callbacks=(), accelerator=None,
                collate_fn: Callable | None = None) -> Trainer:
    """Train ``step``; its learner is evaluated on ``dev_data`` each epoch unless it is None (``task``
    collates and scores it)."""
    accelerator = accelerator or make_accelerator(train_config)
    collate_fn = collate_fn or task.collator(tokenizer, train=True)
    evaluate = None
    if dev_data is not None:
        collate_eval = task.collator(tokenizer, train=False)

        def evaluate(learner: torch.nn.Module) -> dict[str, float]:
            return task.evaluate(learner, dev_data, collate_eval, train_config.batch_size * 2,
                                 accelerator.device).metrics

    trainer = Trainer(step, train_data, collate_fn, train_config, run_dir, evaluate=evaluate,
                      main_metric=task.main_metric if evaluate else None,
                      greater_is_better=task.greater_is_better, accelerator=accelerator, desc=desc,
                      callbacks=callbacks)
    trainer.fit(resume=resume)
    return trainer


def run_stage(config: JobConfig, index: int, task: Task, models: dict[str, LoadedModel], run_dir: Path,
              resume: bool, callbacks=()) -> Trainer:
    """Train the learner of stage ``index`` with its data, head, strategy and teachers."""
    stage = config.all_stages()[index]
    train_config = config.stage_train(stage)
    seed_everything(train_config.seed + 1000 * index)
    accelerator = make_accelerator(train_config)
    teachers = {role: models[role] for role in config.stage_teachers(stage)}
    first_teacher = next(iter(teachers.values()), None)
    data = data_source_for(stage, index).build(stage, task, first_teacher, config, accelerator.device)
    learner = models[stage.learner]
    if data.num_labels is not None and not task.problem.causal_lm and (
            stage.head == "reinit" or head_size(learner.model) != data.num_labels):
        log.info("stage %s: fresh %d-output head", stage.name, data.num_labels)
        replace_head(learner.model, data.num_labels, data.label_names or None)
    ctx = StageContext(config, stage, index, data, stage.learner, learner, teachers, stage_training_data(
        stage, data, first_teacher), training_collator(data, learner, first_teacher), accelerator.device, task=task)
    strategy = strategy_for(stage, index)
    step = strategy.build(ctx)
    step.learner_role = step.learner_role or stage.learner
    check_parts(train_config.lr_by_role, step.parts(), f"stage {stage.name!r}")
    log.info("stage %s: %s (%s) learns from %s on %s, strategy %s", stage.name, stage.learner, learner.source,
             ", ".join(teachers) or "no teacher", data.name, stage.strategy.name)
    try:
        return train_model(step, data, ctx.train_data, data.selection, learner.tokenizer, train_config, run_dir,
                           stage.name, resume, callbacks, accelerator, ctx.collate)
    finally:
        for adapter in ctx.adapters:
            adapter.remove_hooks()


def stage_training_data(stage: StageConfig, data: StageData, teacher: LoadedModel | None):
    """The stage's training examples, with TinyBERT augmentation when the stage asks for it."""
    train_data = data.train
    if stage.augment is not None:
        aug = stage.augment
        neighbours = EmbeddingNeighbours(teacher.tokenizer, teacher.model.get_input_embeddings().weight.detach(),
                                         aug.k)
        train_data = augment_dataset(train_data, neighbours, aug.copies, aug.p, aug.seed)
        log.info("stage %s: %d training examples after augmentation", stage.name, len(train_data))
    return train_data


def training_collator(data: StageData, learner: LoadedModel, teacher: LoadedModel | None):
    """The learner's collator; with a compressed vocabulary the batch is tokenized for the teacher and
    the learner gets its own ids."""
    id_map = id_map_of(learner.model)
    if id_map is None or teacher is None:
        return data.collator(learner.tokenizer, train=True)
    return StudentIdsCollator(data.collator(teacher.tokenizer, train=True), id_map)


def save_snapshot(model: LoadedModel, path: Path) -> None:
    save_torch_atomic({"num_labels": classifier_size(model.model), "state": model.model.state_dict()}, path)


def restore_snapshot(model: LoadedModel, path: Path) -> None:
    snapshot = load_checkpoint_file(path, fix=f"delete {path.with_suffix('.json')} and {path}, then resume")
    if snapshot["num_labels"] is not None and head_size(model.model) != snapshot["num_labels"]:
        replace_head(model.model, snapshot["num_labels"])
    model.model.load_state_dict(snapshot["state"])


def run_stages(config: JobConfig, task: Task, models: dict[str, LoadedModel], run_dir: Path, resume: bool,
               callbacks=()) -> list[dict]:
    """Every stage in order (finished ones skipped on resume); returns the joined history. Checkpoints
    are left in place (see :meth:`kdforge.run_folder.RunFolder.checkpoint_roots`)."""
    stages = config.all_stages()
    history: list[dict] = []
    for index, stage in enumerate(stages):
        marker, snapshot = RunFolder(run_dir).stage_marker(stage.name), RunFolder(run_dir).stage_snapshot(stage.name)
        learner = models[stage.learner]
        if resume and marker.is_file():
            log.info("stage %s finished earlier: skipped", stage.name)
            stage_history = read_json(marker, f"delete {marker} and its .pt snapshot, then resume to rerun stage "
                                                f"{stage.name}")["history"]
            if snapshot.is_file():
                restore_snapshot(learner, snapshot)
        else:
            trainer = run_stage(config, index, task, models, run_dir, resume, callbacks)
            stage_history = trainer.state.history
            if stage is not stages[-1] and trainer.accelerator.is_main_process:
                save_snapshot(learner, snapshot)  # the snapshot first: the marker says both are complete
                atomic_write_json(marker, {"history": stage_history})
        history += [{"stage": stage.name, **h} if len(stages) > 1 else h for h in stage_history]
    return history
