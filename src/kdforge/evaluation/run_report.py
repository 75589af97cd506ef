"""Evaluate a run's models in every deployment form and write its report.

For a finished run (or a re-evaluation of one): the primary teacher and the student as PyTorch
models and, with ``export.onnx``, as ONNX fp32 (``exports/teacher.onnx``, ``exports/student.onnx``)
and the student as int8 (``exports/student.int8.onnx``, ``export.int8``); each form scored on the
reported split, then all timed interleaved; the majority-class baseline on the same split; sanity
warnings; per-class scores; training curves; provenance. Writes ``report.md``/``report.html`` (+ PNGs)
and, last, ``metrics.json``.

A black-box teacher (:mod:`kdforge.blackbox.teacher`) is scored like a model (its answers cached) but
neither exported nor timed (timing it would spend its query budget); the report and ``metrics.json``
(``black_box``: per role) state the queries the run made, the cache hits and the measured round trip.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdforge.blackbox.teacher import stats_line
from kdforge.config import PRIMARY_TEACHER, STUDENT, JobConfig, dump_config
from kdforge.deploy.model_card import Deployment
from kdforge.evaluation.evaluate import Form, ensemble_form, onnx_form, pytorch_form, score_form, time_forms
from kdforge.evaluation.int8_choice import int8_line, read_int8_record, write_int8
from kdforge.evaluation.latency import describe_latency_noise
from kdforge.evaluation.latest import deployment_forms, describe_cpu, latest_measurements, measured_lines
from kdforge.evaluation.model_report import (
    ModelReport,
    comparison_summary,
    describe_timing,
    format_table,
    speedup_cell,
)
from kdforge.evaluation.run_page import Findings, write_report
from kdforge.evaluation.sanity import majority_baseline, sanity_warnings
from kdforge.io import atomic_write_json, read_json
from kdforge.models.loading import LoadedModel
from kdforge.roles.base import capabilities, primary_teacher
from kdforge.run_folder import Results, RunFolder
from kdforge.tasks.base import Task

log = logging.getLogger("kdforge")


def write_exports(config: JobConfig, teacher: LoadedModel, student: LoadedModel, run: RunFolder,
                  task: Task) -> dict[str, Path]:
    """The ONNX (and int8) files that ``config.export`` asks for (of the primary teacher and the student),
    written now into the run's ``exports/``; ``{form name: path}``. ``task``: the training rows static int8
    calibrates on and the validation split int8_mode best chooses on (:mod:`kdforge.evaluation.int8_choice`)."""
    if not config.export.onnx:
        return {}
    from kdforge.deploy.onnx_export import export_onnx
    from kdforge.deploy.onnx_fusion import fuse_transformer

    paths = run.onnx_files()
    run.exports.mkdir(parents=True, exist_ok=True)
    if not capabilities(config, primary_teacher(config)).weights:
        log.info("the teacher is a black box: no ONNX export of it")
        del paths["teacher onnx fp32"]
    for name, loaded in (("teacher onnx fp32", teacher), ("student onnx fp32", student)):
        if name not in paths:
            continue
        log.info("exporting the %s to %s", name.split()[0], paths[name])
        export_onnx(loaded, paths[name], opset=config.export.opset)
        if config.export.fuse and loaded.is_hf:
            fuse_transformer(paths[name], loaded)
    if not config.export.int8:
        del paths["student onnx int8"]
        return paths
    log.info("quantizing the student to int8 (%s): %s", config.export.int8_mode, paths["student onnx int8"])
    write_int8(config, task, student, paths["student onnx fp32"], paths["student onnx int8"])
    return paths


def build_forms(config: JobConfig, task: Task, models: dict[str, LoadedModel], teacher_role: str,
                onnx_files: dict[str, Path]) -> list[Form]:
    """The primary teacher and the student in PyTorch, every ONNX file given, then the job's other roles
    (teachers, assistants, peers) in PyTorch; the teacher first: the speedups' reference."""
    teacher, student = models[teacher_role], models[STUDENT]
    forms = [model_form("teacher", teacher_role, teacher, task, config),
             model_form("student", STUDENT, student, task, config)]
    for name, path in onnx_files.items():
        forms.append(onnx_form(name, path, teacher if name.startswith("teacher") else student, task, config.eval))
    forms += [model_form(role, role, loaded, task, config) for role, loaded in models.items()
              if role not in (teacher_role, STUDENT)]
    forms += [ensemble_form(name, [models[teacher_role if r == PRIMARY_TEACHER else r] for r in members])
              for name, members in config.eval.ensembles.items()]
    return forms


def model_form(name: str, role: str, loaded: LoadedModel, task: Task, config: JobConfig) -> Form:
    """The PyTorch form of ``role``'s model; one without weights (a black-box teacher) is scored only
    (``forward`` None: not timed, no parameters or size of its own to report)."""
    if not capabilities(config, role).weights:
        from kdforge.models.adapter import ModelAdapter

        return Form(name, ModelAdapter(loaded.model), None, loaded.tokenizer, 0, 0.0)  # type: ignore[arg-type]
    return pytorch_form(name, loaded, task, config.eval)


def score_and_time(forms: list[Form], task: Task, data, config: JobConfig) -> tuple[dict[str, ModelReport], dict]:
    """Each form's :class:`ModelReport` on ``data``, then every timed form (``forward`` set) measured interleaved
    (:func:`kdforge.evaluation.evaluate.time_forms`, the first timed form the speedups' reference)."""
    reports = {f.name: score_form(f, task, data, config.eval) for f in forms}
    timing = time_forms([f for f in forms if f.forward is not None], config.eval)
    for name, report in reports.items():
        report.latency = dict(timing["models"].get(name, {}))
    return reports, timing


def black_box_stats(config: JobConfig, models: dict[str, LoadedModel]) -> dict[str, dict[str, Any]]:
    """The queries of every queried role, a black box (:meth:`kdforge.blackbox.teacher.BlackBoxModule.stats`)."""
    return {role: loaded.model.stats() for role, loaded in models.items() if capabilities(config, role).queried}


def add_sharpness(reports: dict[str, ModelReport], config: JobConfig, task: Task, models: dict[str, LoadedModel],
                  teacher_role: str) -> None:
    """Each PyTorch model's sharpness (top Hessian eigenvalue of its training loss on a fixed sample of
    training rows, :func:`kdforge.evaluation.sharpness.model_sharpness`); ONNX forms share their model's."""
    from kdforge.evaluation.sharpness import model_sharpness

    train = task.split("train")
    for name, role in (("teacher", teacher_role), ("student", STUDENT),
                       *((r, r) for r in models if r not in (teacher_role, STUDENT))):
        if not capabilities(config, role).weights:
            log.info("sharpness of the %s: not measured (a black box has no visible loss surface)", name)
            continue
        result = model_sharpness(models[role], task, train, config.eval)
        report = reports[name]
        report.sharpness, report.sharpness_iterations = result["eigenvalue"], result["iterations"]
        report.sharpness_converged = result["converged"]
        log.info("sharpness of the %s: %.4g after %d power iterations on %d training rows (%s, tol %g)", name,
                 result["eigenvalue"], result["iterations"], result["samples"],
                 "converged" if result["converged"] else "NOT converged", config.eval.sharpness_tol)


def baseline_report(task: Task, data, config: JobConfig) -> ModelReport | None:
    scores = majority_baseline(task, task.split("train"), data, config.eval.ece_bins)
    if scores is None:
        return None
    return ModelReport(name=task.problem.baseline_name, metrics=scores.metrics, main_metric=task.main_metric,
                       ece=scores.ece, params=0, size_mb=0.0, latency={}, reliability=None)


def phase_histories(config: JobConfig, history: list[dict] | None,
                    finetune_records: dict[str, Path]) -> dict[str, list[dict]]:
    """Training history per phase: each fine-tuned teacher's (its ``finetune.json`` by role) and each stage's."""
    phases: dict[str, list[dict]] = {}
    for role, meta in finetune_records.items():
        if meta.is_file():
            fix = f"delete {meta.parent} to fine-tune again"
            phases[f"{role} fine-tune"] = read_json(meta, fix).get("history", [])
    for entry in history or []:
        phases.setdefault(f"stage {entry.get('stage', config.all_stages()[-1].name)}", []).append(entry)
    return phases


def data_sizes(task: Task) -> dict[str, int]:
    sizes = {"train": len(task.split("train"))}
    if task.selection_split != task.eval_split:
        sizes[task.selection_split] = len(task.split(task.selection_split))
    sizes[f"{task.eval_split} (reported)"] = len(task.split(task.eval_split))
    return sizes


def evaluate_run(config: JobConfig, task: Task, models: dict[str, LoadedModel], teacher_role: str, out_dir: Path,
                 history: list | None, provenance: dict[str, Any], finetune_records: dict[str, Path],
                 onnx_files: dict[str, Path], selected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every form, time them interleaved, write the report into ``out_dir``; returns what
    ``metrics.json`` holds (written last by the caller's :func:`write_metrics`). ``selected``: the run's
    own ``{"selected_on": ...}`` when re-evaluating it (the split its training selected on, whatever
    split is scored now)."""
    data = task.split(task.eval_split)
    forms = build_forms(config, task, models, teacher_role, onnx_files)
    reports, timing = score_and_time(forms, task, data, config)
    black_box = black_box_stats(config, models)  # after scoring: the evaluation's queries count
    if config.eval.sharpness:
        add_sharpness(reports, config, task, models, teacher_role)
    teacher, student = reports["teacher"], reports["student"]
    baseline = baseline_report(task, data, config)
    baseline_main = baseline.metrics.get(task.main_metric) if baseline else None
    counts = {n: r.per_class["predicted_counts"] for n, r in reports.items() if r.per_class}
    warnings = sanity_warnings(reports, baseline_main, task.main_metric,
                               task.greater_is_better, counts, split=task.eval_split, label_names=task.label_names)
    roles = {role: reports[role] for role in models if role not in (teacher_role, STUDENT)}
    ensembles = {name: reports[name] for name in config.eval.ensembles}
    exports = {n: r for n, r in reports.items() if n not in ("teacher", "student", *roles, *ensembles)}
    selects = config.stage_train(config.all_stages()[-1]).select_best  # else the last epoch is kept
    splits = {"selected_on": task.describe_split(task.selection_split) if selects else None,
              "reported_on": task.describe_split(task.eval_split)}
    if selected is not None:
        splits["selected_on"] = selected.get("selected_on")
    int8 = read_int8_record(onnx_files.get("student onnx int8"))
    saved = {"task": task.name, "teacher": teacher.to_dict(), "student": student.to_dict(),
             "comparison": comparison_summary(teacher, student),
             "exports": {n: r.to_dict() for n, r in exports.items()},
             "other_roles": {n: r.to_dict() for n, r in roles.items()},
             **({"ensembles": {n: r.to_dict() for n, r in ensembles.items()}} if ensembles else {}),
             "baseline": baseline.to_dict() if baseline else None, "warnings": warnings,
             "latency": {k: v for k, v in timing.items() if k != "models"},
             **splits, "provenance": {**provenance, "data": data_sizes(task)}, "history": history or [],
             **({"black_box": black_box} if black_box else {}), **({"int8": int8} if int8 else {})}
    write_run_report(out_dir, saved, dump_config(config), phase_histories(config, history, finetune_records),
                     task.greater_is_better)
    for line in warnings:
        log.warning("WARNING: %s", line)
    return saved


def notes(saved: dict[str, Any]) -> list[str]:
    """The lines under the table of ``saved`` (a ``metrics.json``): each black-box teacher's queries, how the
    int8 student was made."""
    return [*(stats_line(role, stats) for role, stats in (saved.get("black_box") or {}).items()),
            *([int8_line(saved["int8"])] if saved.get("int8") else [])]


def write_run_report(out_dir: Path, saved: dict[str, Any], config_yaml: str, histories: dict[str, list[dict]],
                     greater_is_better: bool, latest: dict[str, Any] | None = None) -> dict[str, Path]:
    """The report (:func:`kdforge.evaluation.run_page.write_report`) of ``saved`` (what ``metrics.json`` holds)
    into ``out_dir``; ``latest`` (:func:`kdforge.evaluation.latest.latest_measurements`) adds the run's newest
    measurements at the top."""
    forms = {name: ModelReport.from_dict(report) for name, report in
             {**deployment_forms(saved), **(saved.get("other_roles") or {}), **(saved.get("ensembles") or {})}.items()}
    baseline = ModelReport.from_dict(saved["baseline"]) if saved.get("baseline") else None
    findings = Findings(baseline=baseline, forms=forms, latency=saved.get("latency"),
                        warnings=list(saved.get("warnings") or []), histories=histories,
                        provenance=saved.get("provenance"), greater_is_better=greater_is_better,
                        notes=notes(saved), latest=latest and {**latest, "notes": notes(latest)})
    return write_report(out_dir, forms["teacher"], forms["student"], title=f"kdforge: {saved['task']}",
                        config_yaml=config_yaml, history=saved.get("history"), findings=findings,
                        selected_on=saved.get("selected_on"), reported_on=saved.get("reported_on"))


def result_table(saved: dict[str, Any]) -> str:
    """The plain-text table of a ``metrics.json`` or of a run's :func:`kdforge.evaluation.latest.latest_measurements`:
    sanity warnings first, then every deployment form measured (teacher, student, ONNX fp32, ONNX int8: score,
    size, latency), the baseline, each form's speedup over the teacher with its interval, where each number was
    measured (after a later measurement), and the latency-noise warning when the measurement was noisy."""
    baseline = saved.get("baseline")
    forms = {name: ModelReport.from_dict(report) for name, report in deployment_forms(saved).items()}
    teacher, student = forms.pop("teacher"), forms.pop("student")
    table = format_table(teacher, student, saved.get("selected_on"), saved.get("reported_on"),
                         ModelReport.from_dict(baseline) if baseline else None, saved.get("warnings") or (),
                         forms, saved.get("latency"))
    noise = describe_latency_noise(saved["latency"]) if saved.get("latency") else None
    table = "\n".join([table, *notes(saved), *(measured_lines(saved) if saved.get("measured_again") else [])])
    return f"{table}\nWARNING: {noise}" if noise else table


def write_metrics(out: Results, saved: dict[str, Any]) -> Path:
    """``metrics.json`` (last: in a run folder it marks a finished run)."""
    return atomic_write_json(out.metrics, saved)


def latency_table(timing: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Median, p90 and speedup over the reference [95% interval] per form and batch size of an
    :func:`kdforge.evaluation.latency.interleaved_latency` result."""
    sizes = sorted({int(bs) for m in timing["models"].values() for bs in m["batch_sizes"]})
    headers = ["form", *(h for bs in sizes for h in (f"b{bs} median (ms)", f"b{bs} p90 (ms)", f"b{bs} speedup"))]
    rows = []
    for name, measured in timing["models"].items():
        row = [name]
        for bs in sizes:
            entry = measured["batch_sizes"][str(bs)]
            speed = timing["speedup"].get(name, {}).get(str(bs))
            row += [f"{entry['median_ms']:.2f}", f"{entry['p90_ms']:.2f}",
                    "reference" if speed is None else f"{speed['ratio']:.2f}x [{speed['low']:.2f}-{speed['high']:.2f}]"]
        rows.append(row)
    return headers, rows


def finetune_records(config: JobConfig, run: RunFolder) -> dict[str, Path]:
    """Each teacher's ``finetune.json`` in ``run`` by role (its fine-tuning history, when it was fine-tuned)."""
    return {role: run.teacher(role).record for role in config.teacher_configs()}


def refresh_run_report(config: JobConfig, task: Task, run: RunFolder) -> dict[str, Any] | None:
    """After a later evaluation or latency measurement of the finished ``run`` (each complete: its file written
    last): the run's own report rewritten with its newest measurements at the top, the training-time sections
    as they were, and the student's card with the newest numbers. Returns those newest measurements
    (:func:`kdforge.evaluation.latest.latest_measurements`), None when the run has no ``metrics.json`` (nothing
    is written then). ``metrics.json`` itself is never changed; each file is replaced atomically."""
    if not run.finished:
        return None
    saved = read_json(run.metrics, f"run `kdforge eval {run.root}` to measure the run again")
    latest = latest_measurements(saved, run.root)
    config_yaml = run.config_file.read_text(encoding="utf-8") if run.config_file.is_file() else dump_config(config)
    write_run_report(run.root, saved, config_yaml,
                     phase_histories(config, saved.get("history"), finetune_records(config, run)),
                     task.greater_is_better, latest)
    write_student_card(config, task, run, latest)
    log.info("the run's report (%s) and its student's card show its newest measurements", run.report_html)
    return latest


def student_deployment(task: Task, run: RunFolder, results: dict[str, Any]) -> Deployment:
    """What the student's card says about its speed and its ONNX forms, from ``results`` (a run's
    :func:`kdforge.evaluation.latest.latest_measurements`: its newest numbers and where they were measured)."""
    forms = {name: report for name, report in deployment_forms(results).items()
             if name == STUDENT or name.startswith(f"{STUDENT} ")}
    latency, timing = results["student"].get("latency") or {}, results.get("latency") or {}
    source = ((results.get("measured") or {}).get(STUDENT) or {}).get("latency") or results.get("provenance") or {}
    speedups = {name: {bs: speedup_cell(timing, name, int(bs)) for bs in (report.get("latency") or {}).get(
        "batch_sizes", {})} for name, report in forms.items()}
    return Deployment(forms=forms, speedups=speedups, reference=timing.get("reference") or "teacher",
                      noise=describe_latency_noise(timing) if timing else None,
                      files={name: path.name for name, path in run.existing_onnx_files().items() if name in forms},
                      timed_on=describe_timing(latency), hardware=describe_cpu(source, latency.get("threads")),
                      max_length=None if task.modality == "image" else task.config.max_length,
                      image_shape=(latency.get("inputs") or {}).get("image_shape"))


def write_student_card(config: JobConfig, task: Task, run: RunFolder, results: dict[str, Any]) -> Path:
    """``student/README.md``: the Hugging Face model card of the exported student (:mod:`kdforge.deploy.model_card`);
    ``results``: the run's :func:`kdforge.evaluation.latest.latest_measurements`."""
    from kdforge.deploy.model_card import write_model_card

    teacher_spec = config.teacher_configs()[primary_teacher(config)]
    teacher_source = teacher_spec.model if capabilities(config, primary_teacher(config)).weights \
        else f"a black box ({teacher_spec.black_box.describe()})"
    student = config.student.model_dump(exclude_defaults=True)
    described = ", ".join(f"{k}: {v}" for k, v in student.items()) or "the teacher's architecture"
    pipeline_tag = task.problem.pipeline_tag or (
        "image-classification" if task.modality == "image" else "text-classification")
    return write_model_card(
        run.student, task_name=task.name, metrics=results["student"]["metrics"],
        teacher_metrics=results["teacher"]["metrics"], main_metric=task.main_metric, teacher_source=teacher_source,
        objectives=list(dict.fromkeys(o.name for s in config.all_stages() for o in s.objectives)),
        student_description=f"built from the teacher ({described})", params=results["student"]["params"],
        size_mb=results["student"]["size_mb"], latency_ms=results["student"]["latency"].get("batch_sizes"),
        label_names=list(task.label_names) or None, base_model=teacher_spec.model,
        command=results["provenance"]["command"], pipeline_tag=pipeline_tag,
        deployment=student_deployment(task, run, results))
