"""Python API: the same jobs as the CLI, and a :class:`Distiller` for your own modules and loaders.

    import kdforge
    result = kdforge.distill("configs/glue/sst2.yaml", overrides={"train.epochs": 2})
    print(result.table)

    distiller = kdforge.Distiller(teacher, student, objectives=[
        {"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4}])
    distiller.fit(train_loader, val_loader, epochs=3)   # the best epoch is kept on val_loader
    distiller.evaluate(test_loader)            # {"accuracy": ...}
    distiller.report(test_loader)              # teacher vs student: score, ECE, size, latency, ONNX/int8
    distiller.save("my-student")               # save_pretrained, or model.safetensors + the class path

    kdforge.Distiller({"a": t1, "b": t2}, student, objectives=["ce"], strategy="multi_teacher",
                      strategy_params={"weighting": "average"})   # any registered strategy, by name
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from kdforge import jobs
from kdforge.config import (
    PRIMARY_TEACHER,
    STUDENT,
    EvalConfig,
    JobConfig,
    ObjectiveConfig,
    StageConfig,
    TaskConfig,
    TeacherConfig,
    TrainConfig,
    apply_overrides,
    format_validation_error,
    load_config,
    validate_config,
)
from kdforge.console import default_logging
from kdforge.engine.predict import predict
from kdforge.engine.step import TrainStep
from kdforge.engine.trainer import Trainer, TrainState, check_parts, make_accelerator, seed_everything
from kdforge.errors import KDForgeError
from kdforge.evaluation.size import count_parameters
from kdforge.io import read_json
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel
from kdforge.objectives.base import Objective
from kdforge.objectives.composite import Term, WeightedLoss
from kdforge.recipes.base import StageContext, StageData, Strategy
from kdforge.recipes.catalog import strategy_for
from kdforge.tasks.metrics import accuracy

log = logging.getLogger("kdforge")


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
    default_logging()
    return jobs.run_distill(_config(config, overrides), resume=resume, overwrite=overwrite, black_boxes=black_boxes)


def finetune(config: str | Path | dict | JobConfig, overrides=None, resume: bool = False):
    """Fine-tune the config's teacher on its task (written to ``output_dir/teacher/model``)."""
    default_logging()
    return jobs.run_finetune(_config(config, overrides), resume=resume)


def search(config: str | Path | dict | JobConfig, overrides: dict | list[str] | None = None, workers: int = 1,
           join: bool = False):
    """Search the student's architecture (``search`` section: KD-NAS, AutoKD or random on Optuna storage),
    then distill the best candidates; returns a :class:`kdforge.search.run.SearchResult` (None when
    ``join``)."""
    from kdforge.search.run import run_search

    default_logging()
    return run_search(_config(config, overrides), workers, join)


def study(config: str | Path | dict, overrides: dict | list[str] | None = None, workers: int = 1,
          join: bool = False, report_only: bool = False):
    """Run a study (:mod:`kdforge.study.config`: a base job, rows, axes, seeds, claims) on Optuna storage
    and write its report; returns a :class:`kdforge.study.runner.StudyResult` (None when ``join``)."""
    from kdforge.study.runner import run_study

    default_logging()
    return run_study(config, overrides, workers, join, report_only)


def evaluate(run_dir_or_config: str | Path, overrides=None,
             black_boxes: Mapping[str, Callable[[list[dict]], Any]] | None = None) -> jobs.RunResult:
    """Evaluate the teacher and exported student of a finished run (``black_boxes`` as for :func:`distill`)."""
    default_logging()
    return jobs.run_eval(run_dir_or_config, overrides, black_boxes=black_boxes)


ObjectiveSpec = str | dict[str, Any] | Objective | tuple[Objective, float]


def objective_terms(objectives: Sequence[ObjectiveSpec]) -> list[ObjectiveConfig | Term]:
    """Names (``"ce"``) and config dicts (``{"name": "hinton_kd", "temperature": 2, "teacher": "t2"}``) as
    validated :class:`ObjectiveConfig`; instances (optionally ``(instance, weight)`` or ``(instance, weight,
    role)``) as ``(objective, weight, role)`` terms."""
    terms: list[ObjectiveConfig | Term] = []
    for i, spec in enumerate(objectives):
        if isinstance(spec, str | dict):
            try:
                terms.append(ObjectiveConfig.model_validate({"name": spec} if isinstance(spec, str) else spec))
            except ValidationError as err:
                raise KDForgeError(format_validation_error(err, f"objectives.{i}")) from None
        else:
            terms.append((*spec, None)[:3] if isinstance(spec, tuple) else (spec, 1.0, None))
    return terms


def build_loss(objectives: Sequence[ObjectiveSpec], teachers: Sequence[str] = ("teacher",)) -> WeightedLoss:
    """The loss of :func:`objective_terms`, each term bound to one of the ``teachers`` roles (the only one
    by default), built like a stage's (:meth:`kdforge.objectives.composite.WeightedLoss.from_config`)."""
    return WeightedLoss.from_config(objective_terms(objectives), teachers)


def as_batch(batch: Any) -> dict:
    """A collated batch as kdforge's dict: ``(x, y)`` becomes ``{"inputs": x, "labels": y}``; mappings (a
    ``BatchEncoding`` too) become dicts, their ``label`` (a Hugging Face dataset's column name) renamed
    ``labels`` when they have no ``labels``."""
    if isinstance(batch, Mapping):
        batch = dict(batch)
        if "labels" not in batch and "label" in batch:
            batch["labels"] = batch.pop("label")
        return batch
    inputs, labels = batch
    return {"inputs": inputs, "labels": labels}


class _AsBatch:
    """Collate wrapper: the loader's ``collate_fn``, then :func:`as_batch`."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, samples: list) -> dict:
        return as_batch(self.collate_fn(samples))


def loader_predictions(adapter: nn.Module, loader: DataLoader, device) -> tuple[np.ndarray, np.ndarray]:
    """``adapter``'s logits and the labels over ``loader``'s rows, collated by its ``collate_fn``."""
    return predict(adapter, loader.dataset, _AsBatch(loader.collate_fn), loader.batch_size or 64, device)


def describe_loader(loader: DataLoader, what: str) -> str:
    return f"{what} ({len(loader.dataset)} rows)"


Metric = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def default_metric(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(logits.argmax(-1), labels)}


def _api_config(stage: StageConfig, train: TrainConfig | None = None) -> JobConfig:
    """The job a Distiller's stage belongs to: its teacher roles (placeholders: the modules are given), no
    teacher-output cache (the examples of a DataLoader carry no index to look them up by)."""
    roles = stage.teachers or []
    placeholder = TeacherConfig(model="(given to the Distiller)")
    named = {role: placeholder for role in roles if role != PRIMARY_TEACHER}
    tree = {"task": TaskConfig(name="(the Distiller's loaders)"), "teachers": named, "stages": [stage],
            "teacher": placeholder if PRIMARY_TEACHER in roles or not named else None,
            "teacher_cache": {"enabled": False}, "train": train or TrainConfig()}
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise KDForgeError(format_validation_error(err, "Distiller")) from None


def loader_batching(loader: DataLoader) -> tuple[Dataset, dict[str, Any]]:
    """The rows a DataLoader trains on and the ``train`` settings that draw its batches (batch_size, shuffle,
    drop_last); one line for a sampler kdforge cannot reproduce."""
    from torch.utils.data import RandomSampler, SequentialSampler, SubsetRandomSampler

    if loader.batch_size is None:
        raise KDForgeError(f"Distiller.fit: the train_loader has a custom batch_sampler "
                           f"({type(loader.batch_sampler).__name__}), which kdforge cannot reproduce on resume; give "
                           "the DataLoader a batch_size (and shuffle) instead")
    sampler, dataset, shuffle = loader.sampler, loader.dataset, None
    if isinstance(sampler, SubsetRandomSampler):
        dataset, shuffle = Subset(loader.dataset, list(sampler.indices)), True
    elif isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == len(dataset):
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    if shuffle is None:
        raise KDForgeError(f"Distiller.fit: the train_loader's sampler ({type(sampler).__name__}) is not one kdforge "
                           "can reproduce (shuffle, no shuffle, SubsetRandomSampler); for class imbalance weight the "
                           "loss or resample the rows into the dataset")
    return dataset, {"batch_size": loader.batch_size, "shuffle": shuffle, "drop_last": loader.drop_last}


class Distiller:
    """Distill ``teacher`` into ``student`` (any ``nn.Module`` or HF model) with your DataLoaders.

    Batches may be dicts (HF inputs + ``labels``) or ``(inputs, labels)`` pairs; a plain module is
    called as ``module(inputs)``. Several teachers: a dict of named teachers, each loss term naming
    the one it learns from (``{"name": "hinton_kd", "teacher": "t2"}``); ``train_teachers=True``
    trains them too (online KD through the loss, strategy offline).

    ``strategy``: any registered strategy by name (``kdforge list``), with ``strategy_params`` as under
    a stage's ``strategy:``; the step is built as a job's stage builds it (on the first :meth:`fit`, when
    the data is known), its teachers run live. Strategies that read the job's task or its config checks
    (``amal``, ``sokd``) run from a config (:func:`distill`).
    """

    def __init__(self, teacher: nn.Module | Mapping[str, nn.Module] | None, student: nn.Module,
                 objectives: Sequence[ObjectiveSpec] = ({"name": "ce", "weight": 0.5},
                                                        {"name": "hinton_kd", "weight": 0.5}),
                 output_dir: str | Path = "runs/api", metric: Metric = default_metric,
                 main_metric: str = "accuracy", train_teachers: bool = False, hook_paths: Sequence[str] = (),
                 strategy: str = "offline", strategy_params: Mapping[str, Any] | None = None):
        if isinstance(teacher, list | tuple):
            raise KDForgeError("several teachers are given by name: pass a dict {name: module} and name each "
                               "term's teacher ({'name': 'hinton_kd', 'teacher': NAME})")
        self.teachers = dict(teacher) if isinstance(teacher, Mapping) else {} if teacher is None else \
            {PRIMARY_TEACHER: teacher}
        self.stage = StageConfig(name="distill", teachers=list(self.teachers), objectives=[], teacher_source="live",
                                 strategy={"name": strategy, **(strategy_params or {})})
        self.strategy: Strategy = strategy_for(self.stage, 0)
        if train_teachers and strategy != "offline":
            raise KDForgeError(f"train_teachers=True trains the teachers through the loss of strategy offline; "
                               f"strategy {strategy} trains or freezes its teachers itself")
        config = _api_config(self.stage)
        self.strategy.check_roles(config, self.stage, 0)
        self._rng = torch.get_rng_state()  # the step is built on the first fit, from the RNG state of now
        self.terms = objective_terms(objectives)
        WeightedLoss.from_config(self.terms, self.strategy.term_roles(config, self.stage))  # every term binds
        self._student = student
        self.hook_paths = list(hook_paths)
        self.train_teachers = train_teachers
        self.module: TrainStep | None = None  # the strategy's step, built by the first fit
        self._data: tuple[Any, Any, Callable] | None = None  # (loader's dataset, training data, collate) of the step
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.main_metric = main_metric
        self.state: TrainState | None = None
        self._selection: DataLoader | None = None  # the eval_loader fit kept its best epoch on

    @property
    def student(self) -> nn.Module:
        return self._student

    def _build(self, train_loader: DataLoader, eval_loader: DataLoader | None, config: TrainConfig,
               device) -> TrainStep:
        """The strategy's step over the given data, as a job's stage runner builds it."""

        def collator(tokenizer: Any = None, train: bool = False) -> Callable:
            loader = eval_loader if eval_loader is not None and not train else train_loader
            return _AsBatch(loader.collate_fn)

        data = StageData("DataLoader", train_loader.dataset, collator, "", frozenset({"labels"}),
                         selection=None if eval_loader is None else eval_loader.dataset,
                         selection_split="the evaluation loader")
        ctx = StageContext(_api_config(self.stage, config), self.stage, 0, data, STUDENT, LoadedModel(self._student),
                           {role: LoadedModel(model) for role, model in self.teachers.items()}, data.train,
                           collator(train=True), device, terms=self.terms, hook_paths=self.hook_paths,
                           train_teachers=self.train_teachers)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            step = self.strategy.build(ctx)
        step.learner_role = step.learner_role or STUDENT
        self._data = (train_loader.dataset, ctx.train_data, ctx.collate)
        return step

    def fit(self, train_loader: DataLoader, eval_loader: DataLoader | None = None, resume: bool = False,
            callbacks=(), **train_settings: Any) -> TrainState:
        """Train; ``train_settings`` are :class:`kdforge.config.TrainConfig` fields (epochs, lr...).

        The loader's ``batch_size``, ``shuffle`` (a ``RandomSampler``) and ``drop_last`` are honoured, and a
        ``SubsetRandomSampler`` trains on its rows only; kdforge draws the batches itself (seeded per epoch,
        so ``resume`` continues exactly). A sampler it cannot reproduce (``WeightedRandomSampler``, a custom
        ``batch_sampler``...) is refused in one line rather than replaced.

        ``eval_loader`` is the *selection* split: each epoch is scored on it and the best epoch kept, so a
        score reported on the same loader is optimistic; pass a validation loader here and report on a
        held-out one (:meth:`report` says which was which)."""
        default_logging()  # each epoch's metrics and the kept epoch, also outside a terminal
        dataset, batching = loader_batching(train_loader)
        config = TrainConfig(**{**batching, **train_settings})
        accelerator = make_accelerator(config)
        if self.module is None:
            self.module = self._build(train_loader, eval_loader, config, accelerator.device)
        check_parts(config.lr_by_role, self.module.parts(), "the Distiller's step")
        built_for, train_data, collate = self._data
        if train_loader.dataset is not built_for:
            train_data, collate = train_loader.dataset, _AsBatch(train_loader.collate_fn)
        if dataset is not train_loader.dataset:  # a SubsetRandomSampler's rows
            train_data = Subset(train_data, dataset.indices)
        seed_everything(config.seed)
        evaluate = None
        if eval_loader is not None:
            evaluate = lambda adapter: self._score(adapter, eval_loader, accelerator.device)
            self._selection = eval_loader
            log.info("Distiller.fit keeps the epoch that scores best on %s: report on a held-out loader, a score "
                     "on that one is optimistic", describe_loader(eval_loader, "the eval_loader"))
        trainer = Trainer(self.module, train_data, collate, config, self.output_dir, evaluate,
                          self.main_metric if evaluate else None, callbacks=callbacks, accelerator=accelerator,
                          desc="distill")
        self.state = trainer.fit(resume=resume)
        trainer.remove_checkpoints()
        return self.state

    def _learner(self) -> nn.Module:
        return self.module.learner if self.module is not None else ModelAdapter(self._student)

    def _score(self, adapter: nn.Module, loader: DataLoader, device) -> dict[str, float]:
        return self.metric(*loader_predictions(adapter, loader, device))

    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        device = next(self.student.parameters()).device
        return self._score(self._learner(), loader, device)

    def predict(self, loader: DataLoader) -> np.ndarray:
        return loader_predictions(self._learner(), loader, next(self.student.parameters()).device)[0]

    def save(self, path: str | Path, tokenizer: Any = None) -> Path:
        """Write the student in its natural format into folder ``path`` (atomically) and return it: a Hugging
        Face model with ``save_pretrained`` (and ``tokenizer``'s, when given), so ``AutoModel*.from_pretrained``
        loads it; any other module as ``model.safetensors`` (its state dict) and ``kdforge_module.json``
        naming its class: rebuild the module, then :func:`load_student_weights`."""
        from safetensors.torch import save_model

        from kdforge.io import staged_folder
        from kdforge.models.saving import write_pretrained

        student, path = self.student, Path(path)
        if LoadedModel(student).is_hf:
            return write_pretrained(path, student, tokenizer)
        with staged_folder(path) as staging:
            save_model(student, str(staging / "model.safetensors"))
            cls = type(student)
            (staging / MODULE_META).write_text(json.dumps(
                {"class": f"{cls.__module__}:{cls.__qualname__}", "parameters": count_parameters(student)}, indent=2))
        return path

    def report(self, eval_loader: DataLoader, example_inputs: Any = None, output_dir: str | Path | None = None,
               onnx: bool = True, eval_config: EvalConfig | None = None):
        """Teacher beside student on ``eval_loader``, the report a CLI run gets
        (:func:`kdforge.evaluation.module_report.report_modules`): the metric, ECE, the majority-class
        baseline (fitted to the labels of :meth:`fit`'s loader), parameters, size, latency timed interleaved
        on ``example_inputs`` (a tensor or a dict of model inputs; default: the loader's first batch), and
        the ONNX fp32 / int8 forms where the modules export. Runs on the CPU (the modules are moved there).
        Writes ``report.html`` and ``metrics.json`` into ``output_dir`` (default ``<output_dir>/report``);
        returns a :class:`~kdforge.evaluation.module_report.ModuleReport` (``.table`` prints it)."""
        from kdforge.evaluation.module_report import report_modules
        from kdforge.provenance import collect_provenance

        if not self.teachers:
            raise KDForgeError("Distiller.report compares the teacher with the student, and this Distiller has "
                               "no teacher; use Distiller.evaluate(loader) for the student alone")
        teacher = self.teachers.get(PRIMARY_TEACHER) or next(iter(self.teachers.values()))
        example = next(iter(eval_loader)) if example_inputs is None else \
            dict(example_inputs) if isinstance(example_inputs, Mapping) else {"inputs": example_inputs}
        reported = describe_loader(eval_loader, "the loader given to report")
        selected = None if self._selection is None else describe_loader(self._selection, "the eval_loader of fit")
        if self._selection is not None and self._selection.dataset is eval_loader.dataset:
            reported = selected
        provenance = {**collect_provenance(_api_config(self.stage), function="Distiller"),
                      "command": "kdforge.Distiller(...).report(...) in your script"}
        return report_modules(
            teacher.to("cpu"), self.student.to("cpu"), ModelAdapter,
            lambda adapter: loader_predictions(adapter, eval_loader, "cpu"),
            self.metric, self.main_metric, as_batch(example), self._train_labels(),
            Path(output_dir or self.output_dir / "report"), eval_config or EvalConfig(), onnx,
            self.state.history if self.state else None, selected, reported, provenance)

    def _train_labels(self) -> np.ndarray | None:
        """The labels :meth:`fit` trained on (for the majority-class baseline), or None before a fit."""
        if self._data is None:
            return None
        _, data, collate = self._data
        batches = DataLoader(data, batch_size=256, collate_fn=collate)
        return torch.cat([torch.as_tensor(batch["labels"]).reshape(-1) for batch in batches]).numpy()


MODULE_META = "kdforge_module.json"  # beside a plain module's model.safetensors (Distiller.save)


def load_student_weights(path: str | Path, module: nn.Module) -> nn.Module:
    """Load the weights :meth:`Distiller.save` wrote for a plain module into ``module`` (built like the
    saved one; its class must be the one named in ``kdforge_module.json``) and return it. Reads safetensors
    only: nothing is unpickled."""
    from safetensors.torch import load_model

    path = Path(path)
    meta = read_json(path / MODULE_META, f"save the student with Distiller.save({str(path)!r}) first")
    cls = type(module)
    if meta.get("class") != f"{cls.__module__}:{cls.__qualname__}":
        raise KDForgeError(f"{path} holds a {meta.get('class')}, not a {cls.__module__}:{cls.__qualname__}; build "
                           "the module the student was saved from")
    load_model(module, str(path / "model.safetensors"))
    return module
