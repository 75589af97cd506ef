"""The jobs behind the CLI and the API: fine-tune teachers, distill a student, evaluate a run.
The run folder's paths and its lifecycle (never losing a finished run) are in ``run_folder.py``; the
roles' models (teachers found again or fine-tuned, students built, a finished run's models) in ``roles/``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState

from kdforge.blackbox.teacher import BlackBoxes
from kdforge.config import STUDENT, JobConfig, dump_config
from kdforge.deploy.export import export_model
from kdforge.errors import KDForgeError
from kdforge.evaluation.latest import latest_measurements
from kdforge.evaluation.model_report import ModelReport
from kdforge.evaluation.run_report import (
    evaluate_run,
    finetune_records,
    refresh_run_report,
    result_table,
    write_exports,
    write_metrics,
    write_student_card,
)
from kdforge.io import atomic_write_json, atomic_write_text, read_json
from kdforge.models.loading import LoadedModel
from kdforge.preflight import check_job
from kdforge.processes import launch_rank
from kdforge.provenance import PhaseTimer, collect_provenance
from kdforge.recipes.catalog import check_stages
from kdforge.recipes.stage import run_stages
from kdforge.roles.base import primary_teacher
from kdforge.roles.loading import load_models, load_run_models, trained_roles
from kdforge.roles.teachers import finetune_teacher
from kdforge.run_folder import Results, RunFolder
from kdforge.tasks.base import Task, build_task

log = logging.getLogger("kdforge")


@dataclass
class RunResult:
    run_dir: Path
    teacher: ModelReport
    student: ModelReport
    table: str


# ---------------------------------------------------------------------------- teachers


def run_finetune(config: JobConfig, resume: bool = False) -> LoadedModel:
    """Fine-tune every teacher that has a ``finetune`` section; returns the primary teacher."""
    tuned = [role for role, spec in config.teacher_configs().items() if spec.finetune is not None]
    if not tuned:
        raise KDForgeError("teacher.finetune is not set; add `teacher: {finetune: {epochs: 3}}` to fine-tune")
    check_job(config, "finetune")
    task = build_task(config.task)
    with RunFolder.of(config).keep_log():
        models = {role: finetune_teacher(config, task, role, resume) for role in tuned}
    return models.get(primary_teacher(config)) or next(iter(models.values()))


# ---------------------------------------------------------------------------- distill


def finished_result(run: RunFolder) -> RunResult | None:
    """The results of the finished run in ``run`` (read from its ``metrics.json``), or None."""
    if not run.finished:
        return None
    fix = f"run `kdforge eval {run.root}` to write it again, or distill again with --overwrite"
    saved = read_json(run.metrics, fix)
    try:
        saved = latest_measurements(saved, run.root)  # with a later export's or bench-latency's numbers
        teacher, student = ModelReport.from_dict(saved["teacher"]), ModelReport.from_dict(saved["student"])
        return RunResult(run.root, teacher, student, result_table(saved))
    except (KeyError, TypeError):
        raise KDForgeError(f"{run.metrics} does not hold kdforge's teacher and student reports; {fix}") from None


def run_distill(config: JobConfig, resume: bool = False, overwrite: bool = False, callbacks=(),
                black_boxes: BlackBoxes | None = None) -> RunResult:
    """The whole job: teachers (fine-tuned if asked), student and assistants, every stage, export,
    report. ``resume`` skips finished stages and resumes the interrupted one; on a finished run it
    changes nothing and returns its results. See :mod:`kdforge.run_folder` for ``overwrite``.
    ``black_boxes``: functions ``fn(list of protocol inputs) -> probabilities`` that a teacher's
    ``black_box.callable`` names."""
    if config.student is None:
        raise KDForgeError("the config has no `student` section; add e.g. `student: {layers: [0, 5]}`")
    main = launch_rank() == 0
    run = RunFolder.of(config)
    if resume and (done := finished_result(run)) is not None:
        log.info("%s holds a finished run (metrics.json): nothing to resume, nothing changed (distill with "
                 "--overwrite to run it again)", run.root)
        if main and run.cleanup_pending(config):
            run.finish(config)  # a kill came after the results were written, before the clean-up
        return done if main else None  # type: ignore[return-value]
    check_job(config, "distill", black_boxes)  # devices, folders, models, lengths: refused before any file is written
    check_stages(config)  # bad strategies, roles or objective settings too
    run.prepare(resume, overwrite)
    timer = PhaseTimer()
    with run.keep_log():
        try:
            if main:
                atomic_write_text(run.config_file, dump_config(config))
            task = build_task(config.task)
            with timer.phase("teachers and students built (teachers fine-tuned)"):
                models = load_models(config, task, resume, black_boxes)
            with timer.phase("training stages"):
                history = run_stages(config, task, models, run.root, resume, callbacks)
            if not PartialState().is_main_process:
                return None  # type: ignore[return-value]
            with timer.phase("export"):
                export_model(models[STUDENT], run.student)
                for role in trained_roles(config):
                    export_model(models[role], run.model(role))
                onnx_files = write_exports(config, models[primary_teacher(config)], models[STUDENT], run, task)
            result = report_run(config, task, models, run, history, timer, onnx_files)
            run.finish(config)
            return result
        except Exception:
            if main:
                run.restore_previous()
            raise
        except BaseException:  # interrupted: --resume continues this run
            if main and run.previous_run.is_dir():
                log.info("interrupted: the finished run this one replaces stays in %s until this run completes "
                         "(--resume); move its files back into %s to return to it", run.previous_run, run.root)
            raise


def report_run(config: JobConfig, task: Task, models: dict[str, LoadedModel], run: RunFolder,
               history: list | None, timer: PhaseTimer, onnx_files: dict[str, Path], out: Results | None = None,
               function: str = "distill", selected: dict[str, Any] | None = None) -> RunResult:
    """Every form of the primary teacher and the student measured on the reported split (see
    :mod:`kdforge.evaluation.run_report`), the report and ``metrics.json`` written into ``out`` (the run folder
    by default)."""
    out = out or run
    teacher_role = primary_teacher(config)
    provenance = collect_provenance(config, function=function)
    with timer.phase("evaluation"):
        saved = evaluate_run(config, task, models, teacher_role, out.root, history,
                             {**provenance, "phases": timer.seconds}, finetune_records(config, run), onnx_files,
                             selected)
    saved["provenance"]["phases"] = dict(timer.seconds)
    if function == "distill":
        write_student_card(config, task, run, latest_measurements(saved, run.root))
    write_metrics(out, saved)
    log.info("results in %s", out.root)
    teacher, student = ModelReport.from_dict(saved["teacher"]), ModelReport.from_dict(saved["student"])
    return RunResult(out.root, teacher, student, result_table(saved))


# ---------------------------------------------------------------------------- eval, export, latency


def run_eval(target: str | Path, overrides=None, onnx: bool = False, int8: bool = False,
             black_boxes: BlackBoxes | None = None) -> RunResult:
    """Evaluate the teachers, the exported student and the run's ONNX files (those in ``exports/``;
    ``onnx``/``int8`` export them first) of a finished run, written as a new dated evaluation in
    ``RUN_DIR/evaluations/<date>/``; then the run's own report and its student's card show the newest
    measurements (:func:`kdforge.evaluation.run_report.refresh_run_report`; its ``metrics.json`` stays as it is).
    The result's table: every form this evaluation measured."""
    config, run = RunFolder.open_finished(target, overrides)
    if onnx or int8:
        config = config.model_copy(update={"export": config.export.model_copy(
            update={"onnx": True, "int8": int8 or config.export.int8})})
    out = run.new_evaluation()
    timer = PhaseTimer()
    with run.keep_log():
        task = build_task(config.task)
        models = load_run_models(config, run, task, black_boxes)
        with timer.phase("export"):
            onnx_files = write_exports(config, models[primary_teacher(config)], models[STUDENT], run, task) \
                if onnx or int8 else run.existing_onnx_files()
        saved = read_json(run.metrics, f"delete it and run `kdforge eval {run.root}` again") if run.finished else {}
        selected = {"selected_on": saved.get("selected_on")} if saved else None  # where training chose, not now
        result = report_run(config, task, models, run, saved.get("history"), timer, onnx_files, out, "evaluate",
                            selected)
        refresh_run_report(config, task, run)
        return result


def run_bench_latency(target: str | Path, overrides=None) -> tuple[Path, str]:
    """Re-measure the latency of a finished run's teacher, student and ONNX files on this machine
    (interleaved, see :func:`kdforge.evaluation.evaluate.time_forms`); writes ``latency.json`` and
    ``latency.md`` into ``RUN_DIR/latency/<date>/``, then the run's own report and its student's card show the
    new latencies (:func:`kdforge.evaluation.run_report.refresh_run_report`). Returns that folder and the
    table: every form with its newest score and size and the new latency, and where each was measured."""
    from kdforge.evaluation.evaluate import time_forms
    from kdforge.evaluation.latency import describe_latency_noise
    from kdforge.evaluation.model_report import describe_timing
    from kdforge.evaluation.render import render_markdown
    from kdforge.evaluation.run_report import build_forms, latency_table

    config, run = RunFolder.open_finished(target, overrides)
    task = build_task(config.task)
    models = load_run_models(config, run, task)
    onnx_files = run.existing_onnx_files()
    forms = [f for f in build_forms(config, task, models, primary_teacher(config), onnx_files) if f.forward]
    log.info("timing %s interleaved: %d rounds per batch size %s (black-box teachers are not timed: their "
             "round trip is in the run's report)", ", ".join(f.name for f in forms), config.eval.latency_repeats,
             config.eval.latency_batch_sizes)
    timing = time_forms(forms, config.eval)
    provenance = collect_provenance(config, function="bench_latency")
    out = run.new_latency()
    out.root.mkdir(parents=True)
    noise = describe_latency_noise(timing)
    headers, rows = latency_table(timing)
    first = next(iter(timing["models"].values()))
    summary = (f"timed at {describe_timing(first)}, threads {first['threads']}, {config.eval.latency_repeats} "
               f"interleaved rounds; CPU {provenance['cpu']}; {provenance['date']}")
    warning = [f"WARNING: {noise}"] if noise else []
    atomic_write_text(out.latency_md, render_markdown([("h1", f"Latency of {run.root}"), ("table", (headers, rows)),
                                                        *(("p", line) for line in [summary, *warning])]))
    atomic_write_json(out.latency_json, {**timing, "provenance": provenance})  # last: marks the measurement complete
    latest = refresh_run_report(config, task, run)
    if latest is None:  # a run without its metrics.json: no scores to show beside the new latencies
        return out.root, "\n".join([" | ".join(headers), *(" | ".join(r) for r in rows), summary, *warning])
    return out.root, "\n".join([result_table(latest), summary])
