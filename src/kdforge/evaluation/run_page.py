"""The run report as a document: ``report.md`` and one self-contained ``report.html`` with the same content.

Sections, in order: warnings (a run that is no better than the trivial baseline, or a model that
predicts one class for everything, is said at the top); the newest measurements when the run was measured
again after training (``kdforge eval``, ``export``, ``bench-latency``: each form's newest score and latency,
saying where and when each was measured; :mod:`kdforge.evaluation.latest`); teacher vs student with the majority-class
baseline and the ``student / teacher`` row; every deployment form (PyTorch, ONNX fp32, ONNX int8)
with its score, ECE, size and interleaved latency (speedup over the teacher with a 95% interval,
p90; a noisy measurement is said next to it); the score-vs-latency chart; per-class precision /
recall / F1 and confusion matrices; the reliability diagram; training curves and history; the
other teachers and assistants; provenance (date, versions, CPU, phase times, data sizes, the
command that reproduces the run) and the config as its difference from the defaults (the full
config folded below it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdforge.evaluation.latency import describe_latency_noise
from kdforge.evaluation.latest import deployment_forms, describe_source, measured_lines
from kdforge.evaluation.model_report import (
    NA,
    ModelReport,
    as_table,
    batch_sizes,
    comparison_rows,
    describe_timing,
    fmt,
    footer_lines,
    history_table,
    ratio_of,
    selection_line,
    speedup_cell,
)
from kdforge.evaluation.plots import reliability_png, score_latency_png, training_curves_png
from kdforge.evaluation.render import Block, render_html, render_markdown
from kdforge.io import atomic_write_bytes, atomic_write_text
from kdforge.run_folder import REPORT_IMAGES, Results

RELIABILITY, TRAINING, SCORE_LATENCY = REPORT_IMAGES  # the images' file names


@dataclass
class Findings:
    """What a report shows beyond teacher vs student (every field optional).

    baseline:   the majority-class (mean, for regression) model's scores on the reported split.
    forms:      every measured model by name: ``"teacher"``, ``"student"``, the ONNX forms (``"student onnx
                int8"``, ...) and the job's other roles (teachers, assistants, peers) in PyTorch.
    latency:    the :func:`kdforge.evaluation.latency.interleaved_latency` result (speedups, load, noise).
    warnings:   sanity lines shown at the top.
    histories:  training history per phase (``"teacher fine-tune"``, ``"stage distill"``).
    provenance: :func:`kdforge.provenance.collect_provenance` plus ``phases`` (wall seconds) and ``data``
                (rows per split).
    notes:      lines shown under the teacher-vs-student table (e.g. a black-box teacher's queries).
    latest:     the run's newest measurements (:func:`kdforge.evaluation.latest.latest_measurements`), shown
                first when it holds any measurement made after training.
    remeasure:  the command a noisy latency warning tells the reader to run again.
    """

    baseline: ModelReport | None = None
    forms: dict[str, ModelReport] = field(default_factory=dict)
    latency: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None
    greater_is_better: bool = True
    notes: list[str] = field(default_factory=list)
    latest: dict[str, Any] | None = None
    remeasure: str = "kdforge bench-latency RUN_DIR"


def forms_table(forms: dict[str, ModelReport], latency: dict | None, teacher: ModelReport,
                measured: dict[str, dict[str, Any]] | None = None) -> tuple[list, list]:
    """One row per form: score, retention, ECE, [sharpness,] MB, median and p90 ms and the speedup over
    the teacher (ratio of medians, 95% paired-bootstrap interval) per batch size; with ``measured`` (per form,
    the sources of :func:`kdforge.evaluation.latest.latest_measurements`), where and when its score and its
    latency were measured."""
    metric = teacher.main_metric
    sizes = batch_sizes(*forms.values())
    sharp = any(r.sharpness is not None for r in forms.values())
    headers = ["form", metric, "retention", "ECE", *(["sharpness"] if sharp else []), "MB on disk"]
    for bs in sizes:
        headers += [f"b{bs} median (ms)", f"b{bs} p90 (ms)", f"b{bs} speedup [95% CI]"]
    if measured is not None:
        headers += ["score measured", "latency measured"]
    rows = []
    for name, r in forms.items():
        retention = ratio_of(r.metrics.get(metric), teacher.metrics.get(metric))
        row = [name, fmt(r.metrics.get(metric), 4), fmt(None if retention is None else 100 * retention, 1, "%"),
               fmt(r.ece, 4), *([fmt(r.sharpness, 3)] if sharp else []), fmt(r.size_mb)]
        for bs in sizes:
            entry = (r.latency or {}).get("batch_sizes", {}).get(str(bs), {})
            row += [fmt(entry.get("median_ms")), fmt(entry.get("p90_ms")),
                    "1.00x (reference)" if name == (latency or {}).get("reference") else
                    speedup_cell(latency, name, bs)]
        if measured is not None:
            row += [describe_source(measured[name][kind]) if name in measured else NA for kind in ("score", "latency")]
        rows.append(row)
    return headers, rows


def latest_blocks(latest: dict[str, Any]) -> list[Block]:
    """The 'Newest measurements' section: every deployment form's newest score and latency (see
    :mod:`kdforge.evaluation.latest`), where and when each was measured, what it was timed on and the noise."""
    forms = {name: ModelReport.from_dict(report) for name, report in deployment_forms(latest).items()}
    timed = describe_timing(forms["student"].latency) or describe_timing(forms["teacher"].latency)
    reference = latest["latency"].get("reference") or "teacher"
    blocks: list[Block] = [
        ("h2", "Newest measurements"),
        ("p", "This run was measured again after training (kdforge eval, export or bench-latency): each form's "
              "newest score and latency, with where (a folder of this run) and when each was measured. The "
              "sections below are the training run's own results, unchanged."),
        ("table", forms_table(forms, latest["latency"], forms["teacher"], latest["measured"])),
        *([("p", f"Latency: median ms per call at {timed}; speedup over the {reference} "
                 "from the measurement that timed the form (95% paired-bootstrap interval).")] if timed else []),
        *(("p", line) for line in measured_lines(latest)),
        *(("p", line) for line in latest.get("notes") or ()),  # e.g. how the newest int8 file was made
    ]
    if noise := describe_latency_noise(latest["latency"]):
        blocks.append(("warning", noise))
    return blocks


def _per_class_blocks(forms: dict[str, ModelReport]) -> list[Block]:
    reports = {name: r.per_class for name, r in forms.items() if r.per_class}
    if not reports:
        return []
    names = list(reports)
    labels = reports[names[0]]["labels"]
    headers = ["class", *(f"{n} {k}" for n in names for k in ("precision", "recall", "F1")), "support"]
    rows = [[label, *(fmt(reports[n]["per_class"][label][k], 4) for n in names for k in ("precision", "recall", "f1")),
             str(reports[names[0]]["per_class"][label]["support"])] for label in labels]
    blocks: list[Block] = [("h2", "Per class"), ("table", (headers, rows))]
    for name in names:
        matrix = reports[name]["confusion_matrix"]
        blocks += [("p", f"Confusion matrix of the {name} (rows: true class, columns: predicted)"),
                   ("table", (["true \\ predicted", *labels], [[label, *map(str, matrix[i])]
                                                              for i, label in enumerate(labels)]))]
    return blocks


def _similarity_blocks(forms: dict[str, ModelReport]) -> list[Block]:
    """The similarity information of each classifier's responses (:mod:`kdforge.evaluation.similarity`),
    when measured (3+ classes)."""
    measured = {name: r.similarity for name, r in forms.items() if r.similarity
                and r.similarity.get("non_target_entropy") is not None}
    if not measured:
        return []
    keys = ("non_target_entropy", "confusion_rank_correlation", "non_target_mass")
    rows = [[name, *(fmt(values.get(k), 4) for k in keys)] for name, values in measured.items()]
    return [("h2", "Similarity information in the responses"), ("table", (["model", *keys], rows)),
            ("p", "non_target_entropy: mean normalised entropy of the wrong-class probabilities (1: the wrong "
                  "classes all alike; lower: the model ranks them); confusion_rank_correlation: Spearman "
                  "correlation of those probabilities with the model's confusions; non_target_mass: mean "
                  "probability of the wrong classes.")]


def _provenance_rows(provenance: dict[str, Any]) -> list[list[str]]:
    versions = provenance.get("versions", {})
    rows = [["date (UTC)", str(provenance.get("date"))],
            *([f"{name} version", str(v)] for name, v in versions.items() if v is not None),
            ["platform", str(provenance.get("platform"))],
            ["CPU", f"{provenance.get('cpu')} ({provenance.get('logical_cpus')} logical CPUs, "
                    f"torch threads {provenance.get('torch_threads')})"]]
    if provenance.get("cuda"):
        rows.append(["GPU", ", ".join(provenance["cuda"])])
    rows += [[f"rows: {split}", str(n)] for split, n in provenance.get("data", {}).items()]
    rows += [[f"wall time: {phase}", f"{seconds:.1f} s"] for phase, seconds in provenance.get("phases", {}).items()]
    return rows


def _chart_points(forms: dict[str, ModelReport], batch_size: int) -> list[dict]:
    points = []
    for name, r in forms.items():
        entry = (r.latency or {}).get("batch_sizes", {}).get(str(batch_size), {})
        points.append({"name": name, "score": r.metrics.get(r.main_metric), "latency_ms": entry.get("median_ms"),
                       "low_ms": entry.get("q25_ms"), "high_ms": entry.get("q75_ms")})
    return points


def report_blocks(teacher: ModelReport, student: ModelReport, title: str, config_yaml: str,
                  history: list[dict[str, Any]] | None, selection: str | None, findings: Findings,
                  images: dict[str, bytes]) -> list[Block]:
    """The report's blocks (see the module docstring); ``images``: PNGs by file name, drawn by the caller."""
    blocks: list[Block] = [("h1", title), *(("warning", line) for line in findings.warnings)]
    if findings.latest and findings.latest.get("measured_again"):
        blocks += latest_blocks(findings.latest)
    blocks += [("h2", "Teacher vs student"),
               ("table", as_table(comparison_rows(teacher, student, findings.baseline))),
               *(("p", line) for line in footer_lines(teacher, student, findings.baseline)),
               *(("p", line) for line in findings.notes),
               *([("p", selection)] if selection else [])]
    if len(findings.forms) > 2 or findings.latency:
        blocks += [("h2", "Every model and form (measured interleaved in one process)"),
                   ("table", forms_table(findings.forms, findings.latency, teacher))]
        measured = {n: r for n, r in findings.forms.items() if r.sharpness is not None}
        if measured:
            runs = "; ".join(f"{n}: {r.sharpness_iterations} iterations" for n, r in measured.items()
                             if r.sharpness_iterations is not None)
            blocks.append(("p", "sharpness: the largest eigenvalue of the training-loss Hessian on a fixed sample "
                                "of training rows (power iteration on Hessian-vector products, stopped when the "
                                "estimate changes by less than eval.sharpness_tol of itself); lower is flatter."
                                + (f" {runs}." if runs else "")))
            unsettled = [n for n, r in measured.items() if r.sharpness_converged is False]
            if unsettled:
                blocks.append(("warning", f"the sharpness of {', '.join(unsettled)} did not converge within "
                                          "eval.sharpness_iterations: read it as a lower bound and raise the limit"))
        if findings.latency:
            blocks.append(("p", "Speedup = teacher median / form median; the interval is a 95% bootstrap over "
                                "measurement rounds (each round times every form once, in rotating order, so a "
                                "load change hits all of them)."))
            if noise := describe_latency_noise(findings.latency, findings.remeasure):
                blocks.append(("warning", noise))
    if SCORE_LATENCY in images:
        blocks += [("h2", f"{teacher.main_metric} vs latency"),
                   ("image", (SCORE_LATENCY, images[SCORE_LATENCY], "score vs latency"))]
    blocks += _per_class_blocks({"teacher": teacher, "student": student})
    blocks += _similarity_blocks({"teacher": teacher, "student": student})
    if RELIABILITY in images:
        blocks += [("h2", "Reliability diagram"), ("image", (RELIABILITY, images[RELIABILITY],
                                                             "reliability diagram"))]
    if TRAINING in images:
        blocks += [("h2", "Training curves"), ("image", (TRAINING, images[TRAINING], "training curves"))]
    if history:
        blocks += [("h2", "Training history"), ("table", history_table(history))]
    if findings.provenance:
        command = str(findings.provenance.get("command"))
        blocks += [("h2", "Provenance"), ("table", (["", "value"], _provenance_rows(findings.provenance))),
                   ("p", "The command that reproduces this run:"),
                   ("code", ("python" if command.startswith("import ") else "bash", command))]
        diff = findings.provenance.get("config_diff") or {}
        blocks += [("h2", "Config (difference from the defaults)"),
                   ("code", ("yaml", yaml.safe_dump(diff, sort_keys=False) if diff else "# all defaults\n"))]
    else:
        blocks.append(("h2", "Config"))
    blocks.append(("details", ("full config", "yaml", config_yaml)))
    return blocks


def draw_images(teacher: ModelReport, student: ModelReport, findings: Findings,
                history: list[dict[str, Any]] | None = None) -> dict[str, bytes]:
    """The report's PNGs by file name: reliability (teacher and student), training curves (per phase of
    ``findings.histories``, else of ``history``), score vs latency."""
    images: dict[str, bytes] = {}
    if teacher.reliability is not None and student.reliability is not None:
        names = (teacher.name, student.name) if teacher.name != student.name else ("teacher", "student")
        images[RELIABILITY] = reliability_png({names[0]: teacher.reliability, names[1]: student.reliability})
    metric_names = list(dict.fromkeys([*teacher.metrics, *student.metrics]))
    histories = findings.histories or ({"training": history} if history else {})
    if histories and (png := training_curves_png(histories, metric_names)) is not None:
        images[TRAINING] = png
    forms = findings.forms or {"teacher": teacher, "student": student}
    sizes = batch_sizes(*forms.values())
    if sizes:
        points = _chart_points(forms, sizes[-1])
        if any(p["score"] is not None and p["latency_ms"] for p in points):
            images[SCORE_LATENCY] = score_latency_png(points, teacher.main_metric, sizes[-1],
                                                            findings.greater_is_better)
    return images


def write_report(run_dir: str | Path, teacher: ModelReport, student: ModelReport, title: str, config_yaml: str,
                 history: list[dict[str, Any]] | None = None, selected_on: str | None = None,
                 reported_on: str | None = None, findings: Findings | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs they show (``reliability.png``, ``training.png``,
    ``score-latency.png``, each when there is something to draw) into ``run_dir``, each atomically.

    ``history``: the training log (one dict per epoch). ``selected_on``/``reported_on``: the selection
    and reported splits (``Task.describe_split``), one line under the table. Returns ``{"markdown": path,
    "html": path}`` plus each image's stem (``"reliability"``, ...) -> path."""
    out = Results(run_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    findings = findings or Findings()
    images = draw_images(teacher, student, findings, history)
    paths = {Path(name).stem: atomic_write_bytes(out.image(name), png) for name, png in images.items()}
    blocks = report_blocks(teacher, student, title, config_yaml, history, selection_line(selected_on, reported_on),
                           findings, images)
    paths["markdown"] = atomic_write_text(out.report_md, render_markdown(blocks))
    paths["html"] = atomic_write_text(out.report_html, render_html(blocks, title))
    return paths
