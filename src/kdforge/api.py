"""Python API: the same jobs as the CLI, and a :class:`Distiller` for your own modules and loaders.

    import kdforge
    result = kdforge.distill("configs/glue/sst2.yaml", overrides={"train.epochs": 2})
    print(result.table)

    distiller = kdforge.Distiller(teacher, student, objectives=[
        {"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4}])
    distiller.fit(train_loader, eval_loader, epochs=3)
    distiller.evaluate(eval_loader)            # {"accuracy": ...}
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader

from kdforge import jobs
from kdforge.config import (
    JobConfig,
    ObjectiveConfig,
    TrainConfig,
    apply_overrides,
    format_validation_error,
    load_config,
    validate_config,
)
from kdforge.engine.predict import predict
from kdforge.engine.trainer import Trainer, TrainState, make_accelerator, seed_everything
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.objectives.base import Objective, build_objective
from kdforge.objectives.composite import WeightedLoss, bind_role, unique_names
from kdforge.objectives.schedules import make_schedule
from kdforge.recipes.offline import OfflineStep
from kdforge.recipes.teacher_sources import LiveTeacher
from kdforge.tasks.metrics import accuracy


def _config(config: str | Path | dict | JobConfig, overrides) -> JobConfig:
    if isinstance(config, str | Path):
        return load_config(config, overrides)
    tree = config.model_dump() if isinstance(config, JobConfig) else copy.deepcopy(config)
    return validate_config(apply_overrides(tree, overrides))


def distill(config: str | Path | dict | JobConfig, overrides: dict | list[str] | None = None,
            resume: bool = False, overwrite: bool = False,
            black_boxes: Mapping[str, Callable[[list[dict]], Any]] | None = None) -> jobs.RunResult:
    """Run a whole distillation job from a config file, dict or :class:`JobConfig`. ``black_boxes``: black-box
    teachers by name, for ``teacher: {black_box: {callable: NAME}}``: each ``fn(inputs) -> probabilities``
    takes a list of protocol inputs (``{"text": ..., "text_pair": ...}`` or ``{"image": {...}}``, see
    :mod:`kdforge.blackbox.protocol`) and returns one row of class probabilities per input."""
    return jobs.run_distill(_config(config, overrides), resume=resume, overwrite=overwrite, black_boxes=black_boxes)


def finetune(config: str | Path | dict | JobConfig, overrides=None, resume: bool = False):
    """Fine-tune the config's teacher on its task (written to ``output_dir/teacher/model``)."""
    return jobs.run_finetune(_config(config, overrides), resume=resume)


def search(config: str | Path | dict | JobConfig, overrides: dict | list[str] | None = None, workers: int = 1,
           join: bool = False):
    """Search the student's architecture (``search`` section: KD-NAS, AutoKD or random on Optuna storage),
    then distill the best candidates; returns a :class:`kdforge.search.run.SearchResult` (None when
    ``join``)."""
    from kdforge.search.run import run_search

    return run_search(_config(config, overrides), workers, join)


def study(config: str | Path | dict, overrides: dict | list[str] | None = None, workers: int = 1,
          join: bool = False, report_only: bool = False):
    """Run a study (:mod:`kdforge.study.config`: a base job, rows, axes, seeds, claims) on Optuna storage
    and write its report; returns a :class:`kdforge.study.runner.StudyResult` (None when ``join``)."""
    from kdforge.study.runner import run_study

    return run_study(config, overrides, workers, join, report_only)


def evaluate(run_dir_or_config: str | Path, overrides=None,
             black_boxes: Mapping[str, Callable[[list[dict]], Any]] | None = None) -> jobs.RunResult:
    """Evaluate the teacher and exported student of a finished run (``black_boxes`` as for :func:`distill`)."""
    return jobs.run_eval(run_dir_or_config, overrides, black_boxes=black_boxes)


ObjectiveSpec = str | dict[str, Any] | Objective | tuple[Objective, float]


def build_loss(objectives: Sequence[ObjectiveSpec], teachers: Sequence[str] = ("teacher",)) -> WeightedLoss:
    """Objectives from names (``"ce"``), config dicts (``{"name": "hinton_kd", "temperature": 2,
    "teacher": "t2"}``), or instances (optionally ``(instance, weight)`` or ``(instance, weight, role)``),
    each term bound to one of the ``teachers`` roles (the only one by default)."""
    modules, weights, names, roles = [], [], [], []
    for i, spec in enumerate(objectives):
        if isinstance(spec, str | dict):
            try:
                cfg = ObjectiveConfig.model_validate({"name": spec} if isinstance(spec, str) else spec)
            except ValidationError as err:
                raise KDForgeError(format_validation_error(err, f"objectives.{i}")) from None
            objective, weight, name, role = build_objective(cfg, i), cfg.weight, cfg.name, cfg.teacher
        else:
            objective, weight, role = (*spec, None)[:3] if isinstance(spec, tuple) else (spec, 1.0, None)
            name = type(objective).__name__.lower()
        modules.append(objective)
        weights.append(make_schedule(weight, f"objectives.{i}.weight"))
        names.append(name)
        roles.append(role)
    names = unique_names(names)
    bound = [bind_role(o, n, r, list(teachers)) for o, n, r in zip(modules, names, roles, strict=True)]
    return WeightedLoss(modules, weights, names, bound)


class _AsBatch:
    """Collate wrapper: ``(x, y)`` samples become ``{"inputs": x, "labels": y}``; dicts pass through."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, samples: list) -> dict:
        batch = self.collate_fn(samples)
        if isinstance(batch, dict):
            return batch
        inputs, labels = batch
        return {"inputs": inputs, "labels": labels}


Metric = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def default_metric(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(logits.argmax(-1), labels)}


class Distiller:
    """Distill ``teacher`` into ``student`` (any ``nn.Module`` or HF model) with your DataLoaders.

    Batches may be dicts (HF inputs + ``labels``) or ``(inputs, labels)`` pairs; a plain module is
    called as ``module(inputs)``. Several teachers: a dict of named teachers, each loss term naming
    the one it learns from (``{"name": "hinton_kd", "teacher": "t2"}``); ``train_teachers=True``
    trains them too (online KD).
    """

    def __init__(self, teacher: nn.Module | Mapping[str, nn.Module] | None, student: nn.Module,
                 objectives: Sequence[ObjectiveSpec] = ({"name": "ce", "weight": 0.5},
                                                        {"name": "hinton_kd", "weight": 0.5}),
                 output_dir: str | Path = "runs/api", metric: Metric = default_metric,
                 main_metric: str = "accuracy", train_teachers: bool = False, hook_paths: Sequence[str] = ()):
        if isinstance(teacher, list | tuple):
            raise KDForgeError("several teachers are given by name: pass a dict {name: module} and name each "
                               "term's teacher ({'name': 'hinton_kd', 'teacher': NAME})")
        teachers = dict(teacher) if isinstance(teacher, Mapping) else {} if teacher is None else {"teacher": teacher}
        loss = build_loss(objectives, list(teachers))
        s_hooks, t_hooks = loss.setup(student, teachers)
        wrap = lambda m, paths, needs: ModelAdapter(m, [*hook_paths, *paths], "hidden_states" in needs,
                                                    "attentions" in needs)
        sources = {role: LiveTeacher(wrap(teachers[role], t_hooks[role], loss.requires(role)), train_teachers)
                   for role in loss.teacher_roles}
        self.module = OfflineStep(wrap(student, s_hooks, loss.requires()), loss, sources, train_teachers)
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.main_metric = main_metric
        self.state: TrainState | None = None

    @property
    def student(self) -> nn.Module:
        return self.module.learner.model

    def fit(self, train_loader: DataLoader, eval_loader: DataLoader | None = None, resume: bool = False,
            callbacks=(), **train_settings: Any) -> TrainState:
        """Train; ``train_settings`` are :class:`kdforge.config.TrainConfig` fields (epochs, lr...)."""
        config = TrainConfig(batch_size=train_loader.batch_size or 1, **train_settings)
        seed_everything(config.seed)
        accelerator = make_accelerator(config)
        evaluate = None
        if eval_loader is not None:
            evaluate = lambda adapter: self._score(adapter, eval_loader, accelerator.device)
        trainer = Trainer(self.module, train_loader.dataset, _AsBatch(train_loader.collate_fn), config,
                          self.output_dir, evaluate, self.main_metric if evaluate else None,
                          callbacks=callbacks, accelerator=accelerator, desc="distill")
        self.state = trainer.fit(resume=resume)
        trainer.remove_checkpoints()
        return self.state

    def _score(self, adapter: nn.Module, loader: DataLoader, device) -> dict[str, float]:
        logits, labels = predict(adapter, loader.dataset, _AsBatch(loader.collate_fn),
                                 loader.batch_size or 64, device)
        return self.metric(logits, labels)

    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        device = next(self.student.parameters()).device
        return self._score(self.module.learner, loader, device)

    def predict(self, loader: DataLoader) -> np.ndarray:
        return predict(self.module.learner, loader.dataset, _AsBatch(loader.collate_fn),
                       loader.batch_size or 64, next(self.student.parameters()).device)[0]
