"""The run's int8 student as ``export.int8_mode`` asks (:mod:`kdforge.deploy.quantize` for the two methods).

* ``dynamic`` (default): :func:`kdforge.deploy.quantize.quantize_int8`, no data needed.
* ``static``: :func:`kdforge.deploy.quantize.quantize_static_int8`, calibrated on ``export.calibration_rows``
  training rows (:mod:`kdforge.deploy.calibration`).
* ``best``: both written; each, and the fp32 ONNX student, scored on the *validation* split (the task's
  selection split; ``best`` is refused without ``task.validation``, so the reported split never chooses)
  and the two int8 files timed interleaved at the largest of ``eval.latency_batch_sizes``. Kept
  (:func:`choose_int8`): of the candidates whose main metric drops by at most ``export.int8_max_drop``
  from fp32, static when it is measurably faster than dynamic (the 95% interval of its speedup above 1),
  else dynamic (no calibration data to depend on); when neither is within the drop, the smaller drop.

How the file was made is written beside it (``student.int8.json``: the method, the calibration rows and,
for ``best``, the measurements and the reason), read into ``metrics.json`` (``int8``) and said under the
report's table (:func:`int8_line`). The form keeps its name, ``student onnx int8``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kdforge.config import JobConfig
from kdforge.io import atomic_write_json, read_json
from kdforge.models.loading import LoadedModel

log = logging.getLogger("kdforge")

#: the candidates of int8_mode best, the first the speedup's reference
CANDIDATES = ("dynamic", "static")


def record_path(int8_path: Path) -> Path:
    """``student.int8.onnx`` -> ``student.int8.json``: how the int8 file was made."""
    return Path(int8_path).with_suffix(".json")


def quantize_as(mode: str, config: JobConfig, task, student: LoadedModel, fp32_path: Path,
                out_path: Path) -> dict[str, Any]:
    """``fp32_path`` quantised to ``out_path`` by ``mode`` (dynamic / static); what was done, for the record."""
    from kdforge.deploy.calibration import CALIBRATION_SEED, CALIBRATION_SPLIT, calibration_batches
    from kdforge.deploy.quantize import quantize_int8, quantize_static_int8

    if mode == "dynamic":
        quantize_int8(fp32_path, out_path)
        return {"mode": "dynamic"}
    rows, batches = calibration_batches(task, student, fp32_path, config.export.calibration_rows,
                                        config.eval.batch_size)
    quantize_static_int8(fp32_path, out_path, batches)
    return {"mode": "static", "calibration": {"split": CALIBRATION_SPLIT, "rows": len(rows), "seed": CALIBRATION_SEED}}


def measure_candidates(config: JobConfig, task, student: LoadedModel, fp32_path: Path,
                       candidates: dict[str, Path]) -> dict[str, Any]:
    """The fp32 file and every candidate scored on the task's selection split, the candidates timed
    interleaved (the first the reference) at the largest latency batch size: scores, drops from fp32
    (positive = worse, in the main metric's units), median latencies and the speedup of the others."""
    from kdforge.evaluation.evaluate import onnx_form, score_form, time_forms

    size = max(config.eval.latency_batch_sizes)
    eval_config = config.eval.model_copy(update={"latency_batch_sizes": [size]})
    forms = {name: onnx_form(name, path, student, task, eval_config)
             for name, path in {"fp32": fp32_path, **candidates}.items()}
    data = task.split(task.selection_split)
    scores = {name: score_form(form, task, data, eval_config).metrics[task.main_metric] for name, form in forms.items()}
    timing = time_forms([forms[name] for name in candidates], eval_config)
    sign = 1 if task.greater_is_better else -1
    return {"split": task.selection_split, "metric": task.main_metric, "batch_size": size,
            "scores": scores, "drops": {m: sign * (scores["fp32"] - scores[m]) for m in candidates},
            "latency_ms": {m: timing["models"][m]["batch_sizes"][str(size)]["median_ms"] for m in candidates},
            "speedup": {m: timing["speedup"][m][str(size)] for m in list(candidates)[1:]},
            "noisy": timing["noisy"]}


def choose_int8(drops: dict[str, float], static_speedup: dict[str, float], max_drop: float) -> tuple[str, str]:
    """``(kept, why)`` by the rule of the module docstring; ``static_speedup``: static over dynamic
    (``ratio``, ``low``, ``high``: > 1 = static faster)."""
    within = [m for m in CANDIDATES if drops[m] <= max_drop]
    speed = f"static {static_speedup['ratio']:.2f}x dynamic [{static_speedup['low']:.2f}-{static_speedup['high']:.2f}]"
    if len(within) == len(CANDIDATES):
        if static_speedup["low"] > 1:
            return "static", f"both within {max_drop:g} of fp32, static measurably faster ({speed})"
        return "dynamic", f"both within {max_drop:g} of fp32, static not measurably faster ({speed})"
    if within:
        other = next(m for m in CANDIDATES if m not in within)
        return within[0], f"{other} dropped {drops[other]:.4g} from fp32 (> {max_drop:g})"
    kept = min(CANDIDATES, key=lambda m: drops[m])
    return kept, f"neither within {max_drop:g} of fp32 (drops {', '.join(f'{m} {drops[m]:.4g}' for m in CANDIDATES)})"


def _best(config: JobConfig, task, student: LoadedModel, fp32_path: Path, int8_path: Path) -> dict[str, Any]:
    candidates = {m: int8_path.with_name(f"{int8_path.stem}.{m}.onnx") for m in CANDIDATES}
    try:
        made = {m: quantize_as(m, config, task, student, fp32_path, path) for m, path in candidates.items()}
        measured = measure_candidates(config, task, student, fp32_path, candidates)
        kept, why = choose_int8(measured["drops"], measured["speedup"]["static"], config.export.int8_max_drop)
        os.replace(candidates[kept], int8_path)
    finally:
        for path in candidates.values():
            path.unlink(missing_ok=True)
    return {**made[kept], "selection": {**measured, "max_drop": config.export.int8_max_drop, "kept": kept,
                                        "why": why}}


def write_int8(config: JobConfig, task, student: LoadedModel, fp32_path: Path, int8_path: Path) -> dict[str, Any]:
    """The student's fp32 ONNX file quantised to ``int8_path`` as ``config.export.int8_mode`` asks, and its
    record (:func:`record_path`), which is returned."""
    mode = config.export.int8_mode
    record = _best(config, task, student, fp32_path, int8_path) if mode == "best" else \
        quantize_as(mode, config, task, student, fp32_path, int8_path)
    record = {"requested": mode, **record}
    atomic_write_json(record_path(int8_path), record)
    log.info("%s", int8_line(record))
    return record


def read_int8_record(int8_path: Path | None) -> dict[str, Any] | None:
    """The record of the int8 file at ``int8_path``; None without one (or without the file: a run exported
    before records were written)."""
    if int8_path is None or not record_path(int8_path).is_file():
        return None
    return read_json(record_path(int8_path), "delete it and export again (kdforge export RUN_DIR --int8)")


def int8_line(record: dict[str, Any]) -> str:
    """One line: how ``student onnx int8`` was made (and, with ``best``, why it was kept)."""
    calibration = record.get("calibration")
    line = "student onnx int8: " + (
        f"static int8, calibrated on {calibration['rows']} {calibration['split']} rows (seed {calibration['seed']})"
        if calibration else "dynamic int8 (activations quantised at run time)")
    selection = record.get("selection")
    if selection:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in selection["scores"].items())
        line += (f"; kept by export.int8_mode best on the {selection['split']} split ({selection['metric']}: "
                 f"{scores}; batch {selection['batch_size']}): {selection['why']}")
    return line
