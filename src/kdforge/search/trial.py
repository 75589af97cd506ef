"""One search trial: a candidate student built from the teacher, timed, mini-distilled, scored.

A trial is a whole (small) kdforge job: the user's config with the sampled architecture and KD
hyper-parameters as overrides (:meth:`SearchSpace.overrides`), the candidate terms added (KD-NAS's
multi-layer hidden-state distillation: each student layer's hidden state, projected to the teacher's
width, learns from its mapped teacher layer, ``tinybert_hidden``), ``search.proxy_epochs`` epochs on
the proxy task (:mod:`kdforge.search.proxy`), scored by its best epoch on the validation split.

Latency depends on the architecture only, so it is measured first, on this machine, with the
search's batch size and the config's sequence length, *interleaved* with the teacher
(:func:`kdforge.evaluation.latency.interleaved_latency`): the candidate's latency enters the reward
as its ratio to the teacher's, which cancels load changes between trials and machines. With the
reward as objective each epoch's validation score gives an intermediate reward, on which AutoKD's
pruner stops weak candidates early (the proxy epochs are the fidelity).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from kdforge.config import PRIMARY_TEACHER, STUDENT, JobConfig, ObjectiveConfig, apply_overrides, validate_config
from kdforge.engine.trainer import seed_everything
from kdforge.errors import KDForgeError
from kdforge.evaluation.evaluate import Form, pytorch_form
from kdforge.evaluation.latency import interleaved_latency
from kdforge.evaluation.size import count_parameters
from kdforge.models.adapter import is_hf_model
from kdforge.models.loading import LoadedModel
from kdforge.models.student import build_student
from kdforge.recipes.stage import run_stages
from kdforge.search.proxy import ProxyTask
from kdforge.search.reward import mnas_reward
from kdforge.search.space import SearchSpace
from kdforge.tasks.base import Task

log = logging.getLogger("kdforge")

#: the candidate terms of KD-NAS for transformer students (added to the config's logit terms)
HIDDEN_STATE_TERM = ObjectiveConfig(name="tinybert_hidden", weight=1.0)


@dataclass
class SearchContext:
    """What every trial of one worker shares: the job, its task and proxy task, the teachers (loaded
    once), the space, the search folder, and the teacher's latency form."""

    config: JobConfig
    task: Task
    proxy: ProxyTask
    teachers: dict[str, LoadedModel]
    space: SearchSpace
    folder: Path
    teacher_form: Form | None = None

    @property
    def teacher(self) -> LoadedModel:
        return self.teachers.get(PRIMARY_TEACHER) or next(iter(self.teachers.values()))

    @property
    def latency_batch(self) -> int:
        return self.config.search.latency_batch_size or max(self.config.eval.latency_batch_sizes)


def candidate_terms(ctx: SearchContext) -> list[ObjectiveConfig]:
    """``search.candidate_objectives``, else the hidden-state term for a Hugging Face teacher, else none."""
    if ctx.config.search.candidate_objectives is not None:
        return list(ctx.config.search.candidate_objectives)
    return [HIDDEN_STATE_TERM] if ctx.space.kind == "transformer" and is_hf_model(ctx.teacher.model) else []


def teacher_layer_count(teacher: LoadedModel) -> int | None:
    return getattr(getattr(teacher.model, "config", None), "num_hidden_layers", None)


def candidate_overrides(ctx: SearchContext, params: dict[str, Any]) -> dict[str, Any]:
    """The config overrides that make the job's student (and KD terms) this candidate."""
    return ctx.space.overrides(params, getattr(ctx.teacher.model, "config", None), teacher_layer_count(ctx.teacher))


def check_space(ctx: SearchContext) -> None:
    """Before the first trial: every candidate of the space can be built from the teacher (its layer count,
    widths and heads), and every candidate term exists with valid parameters; one line otherwise."""
    from kdforge.objectives.base import objective_params

    for i, term in enumerate(candidate_terms(ctx)):
        try:
            objective_params(term, i)
        except KDForgeError as err:  # named by its own key, not the job's objectives
            raise KDForgeError(str(err).replace("objectives.", "search.candidate_objectives.")) from None
    dims = ctx.space.dimensions()
    for values in itertools.islice(itertools.product(*dims.values()), 20_000):
        candidate_overrides(ctx, dict(zip(dims, values, strict=True)))


def trial_config(ctx: SearchContext, params: dict[str, Any], work_dir: Path) -> JobConfig:
    """The job one trial runs: the candidate, its terms, the proxy epochs, no trackers or exports."""
    tree = apply_overrides(ctx.config.model_dump(mode="json"), candidate_overrides(ctx, params))
    terms = [t.model_dump(mode="json") for t in candidate_terms(ctx)]
    tree["objectives"] = [*tree["objectives"], *terms]
    tree["train"].update(epochs=ctx.config.search.proxy_epochs, trackers=[], keep_checkpoint=False,
                         select_best=True, max_steps=None)
    if any(t["name"].startswith("tinybert_hidden") for t in terms) and (layers := teacher_layer_count(ctx.teacher)):
        tree["teacher_cache"]["hidden_states"] = list(range(layers + 1))  # every mapping any candidate may need
    tree["teacher_cache"]["folder"] = str(ctx.folder / "teacher-cache")
    tree["export"] = {"onnx": False, "int8": False}
    tree["output_dir"] = str(work_dir)
    return validate_config(tree, "search trial")


def candidate_form(ctx: SearchContext, student: LoadedModel, work_dir: Path) -> Form:
    """The candidate in the form ``search.latency_form`` times: PyTorch fp32, or exported to ONNX and
    quantized to int8 in ``work_dir`` (the form that ships)."""
    if ctx.config.search.latency_form == "pytorch":
        return pytorch_form("candidate", student, ctx.task, ctx.config.eval)
    from kdforge.deploy.onnx_export import export_onnx
    from kdforge.deploy.quantize import quantize_int8
    from kdforge.evaluation.evaluate import onnx_form

    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(student, work_dir / "candidate.onnx", opset=ctx.config.export.opset)
    int8 = quantize_int8(fp32, work_dir / "candidate.int8.onnx")
    return onnx_form("candidate", int8, student, ctx.task, ctx.config.eval)


def measure_candidate(ctx: SearchContext, student: LoadedModel, work_dir: Path | None = None) -> dict[str, float]:
    """The candidate's latency at the search's batch size in ``search.latency_form``, interleaved with the
    teacher's (PyTorch fp32): its median in ms and its ratio to the teacher's (1 / the paired speedup)."""
    cfg, bs = ctx.config, ctx.latency_batch
    if ctx.teacher_form is None:
        ctx.teacher_form = pytorch_form("teacher", ctx.teacher, ctx.task, cfg.eval)
    candidate = candidate_form(ctx, student, work_dir or ctx.folder / "work" / "latency")
    timing = interleaved_latency({"teacher": ctx.teacher_form.forward, "candidate": candidate.forward}, [bs],
                                 cfg.eval.latency_warmup, cfg.search.latency_repeats, cfg.eval.threads,
                                 reference="teacher", max_spread=cfg.eval.latency_max_spread)
    speedup = timing["speedup"]["candidate"][str(bs)]
    return {"latency_ms": timing["models"]["candidate"]["batch_sizes"][str(bs)]["median_ms"],
            "teacher_latency_ms": timing["models"]["teacher"]["batch_sizes"][str(bs)]["median_ms"],
            "latency_ratio": 1.0 / speedup["ratio"], "speedup": speedup["ratio"],
            "latency_noisy": bool(timing["noisy"]), "latency_form": cfg.search.latency_form}


def reward_of(ctx: SearchContext, score: float, latency_ratio: float) -> float:
    """score x (latency / target)^w with target = the teacher's latency / ``search.target_speedup``,
    i.e. latency / target = (candidate / teacher latency) x target_speedup."""
    search = ctx.config.search
    return mnas_reward(score, latency_ratio * search.target_speedup, 1.0, search.reward_weight)


class ReportEpochs:
    """Trainer callback: after each epoch, the epoch's validation score (as a reward when the study
    maximises the reward) is reported to the trial; a pruner that says stop ends the trial, except after
    the last epoch (a candidate that finished its budget completes, its value counts)."""

    def __init__(self, trial: optuna.Trial, metric: str, to_value, prune: bool):
        self.trial, self.metric, self.to_value, self.prune = trial, metric, to_value, prune
        self.reported = 0

    def __call__(self, trainer) -> None:
        history = trainer.state.history
        if len(history) == self.reported or self.metric not in history[-1]:
            return
        self.reported = len(history)
        self.trial.report(self.to_value(history[-1][self.metric]), step=self.reported)
        last = self.reported >= trainer.config.epochs  # a finished candidate completes: its value counts
        if self.prune and not last and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {self.reported}")


def best_score(history: list[dict], metric: str, greater_is_better: bool) -> float:
    values = [h[metric] for h in history if isinstance(h.get(metric), int | float)]
    if not values:
        raise ValueError(f"the trial's history has no {metric}")
    return max(values) if greater_is_better else min(values)


def run_trial(ctx: SearchContext, trial: optuna.Trial, pareto: bool, prune: bool) -> float | tuple[float, float]:
    """Sample, build, time, mini-distill and score one candidate; its record goes to the trial's
    user attributes (params, score, latency, reward, parameters, overrides, the objectives it learnt with)."""
    params = ctx.space.sample(trial)
    work_dir = ctx.folder / "work" / f"trial-{trial.number}"
    shutil.rmtree(work_dir, ignore_errors=True)
    cfg = trial_config(ctx, params, work_dir)
    seed_everything(cfg.train.seed)
    student = build_student(cfg.student, ctx.teacher, ctx.task)
    timing = measure_candidate(ctx, student, work_dir / "form")
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("overrides", candidate_overrides(ctx, params))
    trial.set_user_attr("objectives", [o.model_dump(mode="json") for o in cfg.objectives])  # what ranked it
    trial.set_user_attr("params", count_parameters(student.model))
    for key, value in timing.items():
        trial.set_user_attr(key, value)
    task = ctx.task
    to_value = (lambda s: s) if pareto else (lambda s: reward_of(ctx, s, timing["latency_ratio"]))
    log.info("trial %d: %s (%.2fx faster than the teacher)", trial.number, params, timing["speedup"])
    try:
        report = [] if pareto else [ReportEpochs(trial, task.main_metric, to_value, prune)]  # Optuna: single-objective
        history = run_stages(cfg, ctx.proxy, {**ctx.teachers, STUDENT: student}, work_dir, False, report)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    score = best_score(history, task.main_metric, task.greater_is_better)
    reward = reward_of(ctx, score, timing["latency_ratio"])
    trial.set_user_attr("score", score)
    trial.set_user_attr("reward", reward)
    log.info("trial %d: %s %.4f, reward %.4f", trial.number, task.main_metric, score, reward)
    return (score, timing["latency_ratio"]) if pareto else reward
