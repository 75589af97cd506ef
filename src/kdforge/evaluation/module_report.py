"""Teacher beside student for modules and DataLoaders of one's own (:meth:`kdforge.Distiller.report`).

The same measurements as a CLI run's report (:mod:`kdforge.evaluation.run_report`), where there is no
task: each form (the teacher and the student in PyTorch, then the ONNX fp32 exports and the student's
dynamic int8, where the modules export) is scored on the user's loader with the user's metric; ECE
(Guo et al. 2017, :mod:`kdforge.problems.calibration`) and the majority-class baseline (fitted to the
training labels) when the outputs are class logits; parameters and size on disk; latency of every
form timed *interleaved* on the user's example batch (:func:`kdforge.evaluation.latency.interleaved_latency`,
the teacher the speedups' reference). The report is written as ``report.md`` / ``report.html`` and
``metrics.json`` into the output folder, atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdforge.config import EvalConfig
from kdforge.errors import KDForgeError
from kdforge.evaluation.latency import describe_latency_noise, interleaved_latency
from kdforge.evaluation.model_report import ModelReport, comparison_summary, format_table
from kdforge.evaluation.run_page import Findings, write_report
from kdforge.evaluation.size import count_parameters, dir_size_mb, size_on_disk_mb
from kdforge.io import atomic_write_json
from kdforge.models.adapter import NON_INPUT_KEYS
from kdforge.models.loading import LoadedModel
from kdforge.problems import Classification
from kdforge.run_folder import Results

log = logging.getLogger("kdforge")
CLASSIFICATION = Classification()  # ECE and the majority baseline of class logits, as a classification task's

Predict = Callable[[nn.Module], tuple[np.ndarray, np.ndarray]]  # adapter -> (logits, labels) on the loader
Metric = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class ModuleReport:
    """What :func:`report_modules` measured: every form by name (``"teacher"``, ``"student"``, ``"student
    onnx int8"``...), the baseline (or None), notes (forms that could not be exported, and why), the printed
    table and the folder holding ``report.html`` and ``metrics.json``."""

    out_dir: Path
    forms: dict[str, ModelReport]
    baseline: ModelReport | None
    notes: list[str]
    table: str

    @property
    def teacher(self) -> ModelReport:
        return self.forms["teacher"]

    @property
    def student(self) -> ModelReport:
        return self.forms["student"]


def is_class_logits(logits: np.ndarray, labels: np.ndarray) -> bool:
    """(N, C>1) logits with integer labels: a classification, which has ECE and a majority baseline."""
    return logits.ndim == 2 and logits.shape[1] > 1 and np.issubdtype(labels.dtype, np.integer)


def score(name: str, logits: np.ndarray, labels: np.ndarray, metric: Metric, main_metric: str, params: int,
          size_mb: float, ece_bins: int) -> ModelReport:
    """One form's metrics (the user's ``metric``), ECE and reliability bins (class logits only); no latency yet."""
    metrics = metric(logits, labels)
    if main_metric not in metrics:
        raise KDForgeError(f"the metric returned {sorted(metrics)}, not the main metric {main_metric!r}; pass "
                           "main_metric= one of those to the Distiller")
    bins = CLASSIFICATION.calibration(logits, labels, ece_bins) if is_class_logits(logits, labels) else None
    return ModelReport(name=name, metrics=metrics, main_metric=main_metric, ece=bins["ece"] if bins else None,
                       params=params, size_mb=size_mb, latency={}, reliability=bins)


def majority_baseline(train_labels: np.ndarray | None, eval_logits: np.ndarray, eval_labels: np.ndarray,
                      metric: Metric, main_metric: str, ece_bins: int) -> ModelReport | None:
    """The input-blind classifier of the classification problem kind (:meth:`kdforge.problems.Classification.
    baseline`: log of the training prior for every row, its argmax the majority class); None without training
    labels or class logits."""
    if train_labels is None or not is_class_logits(eval_logits, eval_labels):
        return None
    scores = CLASSIFICATION.baseline(metric, train_labels, eval_labels, eval_logits.shape[1], ece_bins)
    return ModelReport(name=CLASSIFICATION.baseline_name, metrics=scores.metrics, main_metric=main_metric,
                       ece=scores.ece, params=0, size_mb=0.0, latency={}, reliability=None)


def example_inputs(batch: dict[str, Any]) -> dict[str, Any] | torch.Tensor:
    """The model inputs of a collated batch: its one ``inputs`` tensor (``(x, y)`` data), else the dict
    without labels and other non-input keys."""
    inputs = {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
    return inputs["inputs"] if set(inputs) == {"inputs"} else inputs


def export_forms(teacher: nn.Module, student: nn.Module, example: dict[str, Any] | torch.Tensor,
                 folder: Path) -> tuple[dict[str, Path], list[str]]:
    """ONNX fp32 files of the teacher and the student and the student's dynamic int8
    (:mod:`kdforge.deploy`), where each exports; ``({form name: path}, [why a form is missing])``."""
    from kdforge.deploy.onnx_export import export_onnx
    from kdforge.deploy.quantize import quantize_int8

    files, notes = {}, []
    for name, module in (("teacher", teacher), ("student", student)):
        path = folder / f"{name}.onnx"
        seq_len = next(iter(example.values())).shape[-1] if isinstance(example, dict) else 16
        try:
            export_onnx(LoadedModel(module), path, seq_len=max(seq_len, 2),
                        example=example if isinstance(example, torch.Tensor) else None)
        except KDForgeError as err:
            notes.append(f"{name}: no ONNX form ({err})")
            continue
        files[f"{name} onnx fp32"] = path
    if "student onnx fp32" in files:
        files["student onnx int8"] = quantize_int8(files["student onnx fp32"], folder / "student-int8.onnx")
    return files, notes


def report_modules(teacher: nn.Module, student: nn.Module, adapter: Callable[[nn.Module], nn.Module],
                   predict: Predict, metric: Metric, main_metric: str, example_batch: dict[str, Any],
                   train_labels: np.ndarray | None, out_dir: Path, config: EvalConfig, onnx: bool = True,
                   history: list[dict] | None = None, selected_on: str | None = None,
                   reported_on: str | None = None, provenance: dict[str, Any] | None = None) -> ModuleReport:
    """Score, size and time every form of ``teacher`` and ``student`` (see the module docstring) and write
    the report into ``out_dir``. ``adapter(module)`` makes a module callable on a batch; ``predict(adapter)``
    gives its logits and labels on the reported loader; the latency is timed on ``example_batch`` (its batch
    size) with ``config``'s warm-up, rounds and threads."""
    from kdforge.deploy.onnx_runtime import OnnxAdapter, make_session, onnx_forward

    out = Results(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    example = example_inputs(example_batch)
    batch_size = len(next(iter(example.values())) if isinstance(example, dict) else example)
    modules = {"teacher": teacher.eval(), "student": student.eval()}
    forms: dict[str, ModelReport] = {}
    forwards: dict[str, Callable[[int], Any]] = {}
    for name, module in modules.items():
        called = adapter(module)
        logits, labels = predict(called)
        forms[name] = score(name, logits, labels, metric, main_metric, count_parameters(module),
                            size_on_disk_mb(module), config.ece_bins)
        forwards[name] = lambda _bs, called=called: called(example_batch)
    files, notes = export_forms(teacher, student, example, out.root / "exports") if onnx else ({}, [])
    for name, path in files.items():
        session = make_session(path, config.threads or torch.get_num_threads())
        params = forms[name.split()[0]].params
        forms[name] = score(name, *predict(OnnxAdapter(session)), metric, main_metric, params, dir_size_mb(path),
                            config.ece_bins)
        forwards[name] = onnx_forward(session, lambda _bs: example)
    timing = interleaved_latency(forwards, [batch_size], config.latency_warmup, config.latency_repeats,
                                 config.threads, max_spread=config.latency_max_spread)
    for name, report in forms.items():
        report.latency = {**timing["models"][name], "interleaved": True}
    baseline = majority_baseline(train_labels, logits, labels, metric, main_metric, config.ece_bins)
    remeasure = "Distiller.report(...)"
    findings = Findings(baseline=baseline, forms=forms, latency=timing, provenance=provenance, notes=notes,
                        remeasure=remeasure)
    write_report(out.root, forms["teacher"], forms["student"], title="kdforge: Distiller report", config_yaml="",
                 history=history, selected_on=selected_on, reported_on=reported_on, findings=findings)
    noise = describe_latency_noise(timing, remeasure)
    exported = {n: r for n, r in forms.items() if n not in modules}
    table = "\n".join([format_table(forms["teacher"], forms["student"], selected_on, reported_on, baseline,
                                    forms=exported, latency=timing),
                       *notes, *([f"WARNING: {noise}"] if noise else [])])
    atomic_write_json(out.metrics, {
        "teacher": forms["teacher"].to_dict(), "student": forms["student"].to_dict(),
        "comparison": comparison_summary(forms["teacher"], forms["student"]),
        "exports": {n: r.to_dict() for n, r in exported.items()},
        "baseline": baseline.to_dict() if baseline else None, "notes": notes,
        "latency": {k: v for k, v in timing.items() if k != "models"}, "selected_on": selected_on,
        "reported_on": reported_on, "provenance": provenance or {}, "history": history or []})
    log.info("Distiller report in %s", out.root)
    return ModuleReport(out.root, forms, baseline, notes, table)
