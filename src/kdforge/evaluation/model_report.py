"""The teacher-beside-student report: metrics, ECE, size and latency as a table, Markdown and HTML.

The comparison has one row per model and a third row, ``student / teacher``, that gives:

* for every metric, the retention ``100 * student / teacher`` in %. For metrics that can be
  negative or zero (MCC, Pearson/Spearman correlation) this is just that ratio, meaningful only
  when the teacher's value is positive; it is ``n/a`` when the teacher's value is 0;
* for parameters and size on disk, the ratio ``student / teacher`` (e.g. ``0.40x``);
* for each latency batch size, the speedup ``teacher latency / student latency`` (``2.50x``).

Latency cells are the median milliseconds from :func:`kdforge.evaluation.latency.measure_latency`.
A ``majority class`` row (the trivial baseline on the same split) sits under the student when given.
The documents (``report.md``, ``report.html``) are assembled in :mod:`kdforge.evaluation.run_page`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

RATIO_ROW = "student / teacher"
NA = "n/a"


@dataclass
class ModelReport:
    """Everything measured about one model.

    metrics:     the task's official metrics, e.g. ``{"accuracy": 0.91, "f1": 0.89}``.
    main_metric: the key of ``metrics`` that the task optimises.
    ece:         expected calibration error, or ``None`` (regression tasks).
    params:      unique parameter count; size_mb: size on disk in MB (10^6 bytes).
    latency:     the dict returned by ``measure_latency`` (or one model's entry of ``interleaved_latency``);
                 reliability: the dict returned by ``reliability_bins``, or ``None``.
    per_class:   ``kdforge.evaluation.sanity.per_class_report`` (classification), or ``None``.
    sharpness:   the top eigenvalue of the training-loss Hessian (``kdforge.evaluation.sharpness``), or ``None``;
                 sharpness_iterations: the power iterations run; sharpness_converged: whether the estimate
                 met ``eval.sharpness_tol`` within ``eval.sharpness_iterations``.
    similarity:  the similarity information of its responses (``kdforge.evaluation.similarity``;
                 classification), or ``None``.
    """

    name: str
    metrics: dict[str, float]
    main_metric: str
    ece: float | None
    params: int
    size_mb: float
    latency: dict[str, Any]
    reliability: dict[str, Any] | None = None
    per_class: dict[str, Any] | None = None
    sharpness: float | None = None
    sharpness_iterations: int | None = None
    sharpness_converged: bool | None = None
    similarity: dict[str, float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A deep, JSON-serialisable copy of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelReport:
        """Inverse of :meth:`to_dict` (e.g. after a JSON round trip)."""
        return cls(**data)


# --------------------------------------------------------------------------- numbers


def finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def ratio_of(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing/non-finite or the denominator is 0."""
    if not (finite_number(numerator) and finite_number(denominator)) or denominator == 0:
        return None
    return numerator / denominator


def latency_ms(report: ModelReport, batch_size: int) -> float | None:
    """Median latency in ms at ``batch_size`` (keys may be strings, as measure_latency writes, or ints)."""
    per_bs = (report.latency or {}).get("batch_sizes", {})
    entry = per_bs.get(str(batch_size), per_bs.get(batch_size))
    return None if entry is None else entry.get("median_ms")


def batch_sizes(*reports: ModelReport) -> list[int]:
    sizes = {int(bs) for r in reports for bs in (r.latency or {}).get("batch_sizes", {})}
    return sorted(sizes)


def _metric_names(teacher: ModelReport, student: ModelReport) -> list[str]:
    """The main metric first, then the other metrics of the teacher, then the student's extras."""
    names = dict.fromkeys([teacher.main_metric, *teacher.metrics, *student.metrics])
    return list(names)


def comparison_summary(teacher: ModelReport, student: ModelReport) -> dict[str, Any]:
    """The ``student / teacher`` numbers, JSON-serialisable (``None`` where undefined)::

        {"main_metric": str, "retention_pct": {metric: 100 * s / t},
         "params_ratio": s / t, "size_ratio": s / t, "speedup": {"<batch size>": t_ms / s_ms}}
    """
    return {
        "main_metric": teacher.main_metric,
        "retention_pct": {
            name: None if (r := ratio_of(student.metrics.get(name), teacher.metrics.get(name))) is None
            else 100.0 * r
            for name in _metric_names(teacher, student)
        },
        "params_ratio": ratio_of(student.params, teacher.params),
        "size_ratio": ratio_of(student.size_mb, teacher.size_mb),
        "speedup": {str(bs): ratio_of(latency_ms(teacher, bs), latency_ms(student, bs))
                    for bs in batch_sizes(teacher, student)},
    }


# --------------------------------------------------------------------------- formatting


def fmt(x: float | None, decimals: int = 2, suffix: str = "") -> str:
    """Fixed decimals; two significant digits for tiny non-zero values; ``n/a`` if missing."""
    if not finite_number(x):
        return NA
    text = f"{x:.2g}" if 0 < abs(x) < 10 ** -decimals else f"{x:.{decimals}f}"
    return text + suffix


def _latency_header(batch_size: int) -> str:
    return f"latency b{batch_size} (ms)"


def comparison_rows(teacher: ModelReport, student: ModelReport, baseline: ModelReport | None = None,
                    forms: dict[str, ModelReport] | None = None) -> list[dict[str, str]]:
    """Rows (teacher, student, [every other form,] [baseline,] ``student / teacher``) of display strings,
    each an ordered dict with the same keys: ``model``, the main metric, the other metrics, ``ECE``,
    ``params (M)``, ``MB on disk`` and ``latency b<N> (ms)`` per measured batch size. ``forms``: the
    deployment forms beside the PyTorch models (``"student onnx int8"``, ...), one row each.

    Metrics and ECE have 4 decimals, the other numbers 2; missing values (e.g. ECE of a
    regression model) read ``n/a``. See the module docstring for the ratio row."""
    others = list((forms or {}).values())
    metrics = _metric_names(teacher, student)
    sizes = batch_sizes(teacher, student, *others)

    def model_row(r: ModelReport) -> dict[str, str]:
        row = {"model": r.name}
        row.update({m: fmt(r.metrics.get(m), 4) for m in metrics})
        row["ECE"] = fmt(r.ece, 4)
        row["params (M)"] = fmt(r.params / 1e6) if r.params else NA
        row["MB on disk"] = fmt(r.size_mb) if r.size_mb else NA
        row.update({_latency_header(bs): fmt(latency_ms(r, bs)) for bs in sizes})
        return row

    summary = comparison_summary(teacher, student)
    ratio = {"model": RATIO_ROW}
    ratio.update({m: fmt(summary["retention_pct"][m], 1, "%") for m in metrics})
    ratio["ECE"] = ""
    ratio["params (M)"] = fmt(summary["params_ratio"], 2, "x")
    ratio["MB on disk"] = fmt(summary["size_ratio"], 2, "x")
    ratio.update({_latency_header(bs): fmt(summary["speedup"].get(str(bs)), 2, "x") for bs in sizes})
    return [model_row(teacher), model_row(student), *map(model_row, others),
            *([model_row(baseline)] if baseline else []), ratio]


def speedup_cell(latency: dict | None, name: str, batch_size: int) -> str:
    """``"2.50x [2.31-2.70]"``: the speedup of form ``name`` over the reference at ``batch_size`` with its
    95% interval, from an :func:`kdforge.evaluation.latency.interleaved_latency` result; ``n/a`` if not measured."""
    entry = ((latency or {}).get("speedup", {}).get(name) or {}).get(str(batch_size))
    if not entry:
        return NA
    return f"{fmt(entry['ratio'])}x [{fmt(entry['low'])}-{fmt(entry['high'])}]"


def speedup_table(latency: dict | None, names: list[str], sizes: list[int]) -> tuple[list[str], list[list[str]]]:
    """One row per form in ``names`` that has a speedup in ``latency``: its speedup over the reference
    (:func:`speedup_cell`) per batch size; no rows when nothing was timed interleaved."""
    speedups = (latency or {}).get("speedup") or {}
    headers = [f"speedup over the {(latency or {}).get('reference', 'teacher')} [95% CI]", *(f"b{bs}" for bs in sizes)]
    return headers, [[name, *(speedup_cell(latency, name, bs) for bs in sizes)] for name in names if name in speedups]


def describe_timing(latency: dict[str, Any] | None) -> str | None:
    """What a model was timed on, from its latency entry: ``"sequence length 32 tokens, batch sizes 1 and
    32"`` (text) or ``"images 3x32x32, batch sizes 1 and 32"``; the batch sizes alone when an older
    measurement did not record its inputs; None when the model was not timed."""
    sizes = sorted(int(bs) for bs in (latency or {}).get("batch_sizes") or {})
    if not sizes:
        return None
    inputs = (latency or {}).get("inputs") or {}
    shown = f"{', '.join(map(str, sizes[:-1]))} and {sizes[-1]}" if len(sizes) > 1 else str(sizes[0])
    batches = f"batch size{'s' if len(sizes) > 1 else ''} {shown}"
    if "seq_len" in inputs:
        return f"sequence length {inputs['seq_len']} tokens, {batches}"
    if "image_shape" in inputs:
        return f"images {'x'.join(map(str, inputs['image_shape']))}, {batches}"
    return batches


def footer_lines(teacher: ModelReport, student: ModelReport, baseline: ModelReport | None = None) -> list[str]:
    """Lines under the table: how latency was measured (threads), the baseline, how to read the ratio row."""
    def describe(r: ModelReport) -> str:
        lat = r.latency or {}
        if "repeats" not in lat:
            return "not timed"  # e.g. a black-box teacher: timing it would spend its query budget
        return f"{lat.get('threads', NA)} (median of {lat['repeats']} timed runs)"

    same = describe(teacher) == describe(student)
    threads = describe(teacher) if same else f"teacher {describe(teacher)}, student {describe(student)}"
    together = any("interleaved" in (r.latency or {}) for r in (teacher, student))
    interleaved = "interleaved in one process, " if together else ""
    timed = describe_timing(student.latency) or describe_timing(teacher.latency)
    return [
        f"CPU latency ({interleaved}median ms{f'; {timed}' if timed else ''}), torch threads: {threads}.",
        *([f"{baseline.name}: the trivial model (the training set's most frequent class; its mean for "
           "regression) on the same split: the floor a model must beat."] if baseline else []),
        f"{RATIO_ROW}: metrics as retention % = 100 × student / teacher (for metrics that can be "
        "negative, such as MCC, this is the plain ratio); params and MB on disk as ratios "
        "student / teacher; latency as speedup = teacher / student.",
    ]


def _aligned(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


def as_table(rows: list[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    headers = list(rows[0])
    return headers, [[row[h] for h in headers] for row in rows]


def selection_line(selected_on: str | None = None, reported_on: str | None = None) -> str | None:
    """Which split chose the best epoch and which split the numbers are from, e.g. ``"best epoch selected
    on: validation (90 rows carved from train); reported on: dev (872 rows)"`` (the arguments are
    ``Task.describe_split`` strings). ``None`` when neither is known. When both name the same split
    the line says so: a score selected on the split it reports is optimistically biased."""
    if selected_on is None and reported_on is None:
        return None
    if selected_on is None:
        return f"reported on: {reported_on}"
    line = f"best epoch selected on: {selected_on}"
    if reported_on is None:
        return line
    same = " (the same split: the score is optimistic)" if selected_on == reported_on else ""
    return f"{line}; reported on: {reported_on}{same}"


def format_table(teacher: ModelReport, student: ModelReport, selected_on: str | None = None,
                 reported_on: str | None = None, baseline: ModelReport | None = None,
                 warnings: list[str] | tuple[str, ...] = (), forms: dict[str, ModelReport] | None = None,
                 latency: dict[str, Any] | None = None) -> str:
    """The comparison as plain text: aligned columns (model left, numbers right; ``forms`` as rows of their
    own, see :func:`comparison_rows`), then each timed form's speedup over the reference with its interval
    when ``latency`` (an interleaved measurement) is given, and footer lines, ending with
    :func:`selection_line` when ``selected_on``/``reported_on`` are given."""
    selection = selection_line(selected_on, reported_on)
    names = ["student", *(forms or {})]
    headers, rows = speedup_table(latency, names, batch_sizes(teacher, student, *(forms or {}).values()))
    return "\n".join([*(f"WARNING: {w}" for w in warnings),
                      _aligned(*as_table(comparison_rows(teacher, student, baseline, forms))),
                      *(["", _aligned(headers, rows), ""] if rows else []),
                      *footer_lines(teacher, student, baseline), *([selection] if selection else [])])


def history_table(history: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns epoch, step, loss, then every other key in order of first appearance."""
    headers = list(dict.fromkeys(["epoch", "step", "loss", *(k for entry in history for k in entry)]))

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return fmt(value, 4)
        return str(value)

    return headers, [[cell(entry.get(h)) for h in headers] for entry in history]


