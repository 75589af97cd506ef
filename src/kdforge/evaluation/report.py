"""The teacher-beside-student report: metrics, ECE, size and latency as a table, Markdown and HTML.

The comparison has one row per model and a third row, ``student / teacher``, that gives:

* for every metric, the retention ``100 * student / teacher`` in %. For metrics that can be
  negative or zero (MCC, Pearson/Spearman correlation) this is just that ratio, meaningful only
  when the teacher's value is positive; it is ``n/a`` when the teacher's value is 0;
* for parameters and size on disk, the ratio ``student / teacher`` (e.g. ``0.40x``);
* for each latency batch size, the speedup ``teacher latency / student latency`` (``2.50x``).

Latency cells are the median milliseconds from :func:`kdforge.evaluation.latency.measure_latency`.
The Markdown and HTML files are rendered from the same list of blocks, so they hold the same
content; the HTML is self-contained (reliability diagram embedded as a base64 PNG).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdforge.evaluation.calibration import plot_reliability
from kdforge.io import atomic_write_text

RATIO_ROW = "student / teacher"
NA = "n/a"


@dataclass
class ModelReport:
    """Everything measured about one model.

    metrics:     the task's official metrics, e.g. ``{"accuracy": 0.91, "f1": 0.89}``.
    main_metric: the key of ``metrics`` that the task optimises.
    ece:         expected calibration error, or ``None`` (regression tasks).
    params:      unique parameter count; size_mb: size on disk in MB (10^6 bytes).
    latency:     the dict returned by ``measure_latency``; reliability: the dict returned by
                 ``reliability_bins``, or ``None``.
    """

    name: str
    metrics: dict[str, float]
    main_metric: str
    ece: float | None
    params: int
    size_mb: float
    latency: dict[str, Any]
    reliability: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A deep, JSON-serialisable copy of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelReport:
        """Inverse of :meth:`to_dict` (e.g. after a JSON round trip)."""
        return cls(**data)


# --------------------------------------------------------------------------- numbers


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing/non-finite or the denominator is 0."""
    if not (_finite(numerator) and _finite(denominator)) or denominator == 0:
        return None
    return numerator / denominator


def _latency_ms(report: ModelReport, batch_size: int) -> float | None:
    """Median latency in ms at ``batch_size`` (keys may be strings, as measure_latency writes, or ints)."""
    per_bs = (report.latency or {}).get("batch_sizes", {})
    entry = per_bs.get(str(batch_size), per_bs.get(batch_size))
    return None if entry is None else entry.get("median_ms")


def _batch_sizes(*reports: ModelReport) -> list[int]:
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
            name: None if (r := _ratio(student.metrics.get(name), teacher.metrics.get(name))) is None
            else 100.0 * r
            for name in _metric_names(teacher, student)
        },
        "params_ratio": _ratio(student.params, teacher.params),
        "size_ratio": _ratio(student.size_mb, teacher.size_mb),
        "speedup": {str(bs): _ratio(_latency_ms(teacher, bs), _latency_ms(student, bs))
                    for bs in _batch_sizes(teacher, student)},
    }


# --------------------------------------------------------------------------- formatting


def _num(x: float | None, decimals: int = 2, suffix: str = "") -> str:
    """Fixed decimals; two significant digits for tiny non-zero values; ``n/a`` if missing."""
    if not _finite(x):
        return NA
    text = f"{x:.2g}" if 0 < abs(x) < 10 ** -decimals else f"{x:.{decimals}f}"
    return text + suffix


def _latency_header(batch_size: int) -> str:
    return f"latency b{batch_size} (ms)"


def comparison_rows(teacher: ModelReport, student: ModelReport) -> list[dict[str, str]]:
    """Three rows (teacher, student, ``student / teacher``) of display strings, each an ordered
    dict with the same keys: ``model``, the main metric, the other metrics, ``ECE``,
    ``params (M)``, ``MB on disk`` and ``latency b<N> (ms)`` per measured batch size.

    Metrics and ECE have 4 decimals, the other numbers 2; missing values (e.g. ECE of a
    regression model) read ``n/a``. See the module docstring for the ratio row."""
    metrics = _metric_names(teacher, student)
    batch_sizes = _batch_sizes(teacher, student)

    def model_row(r: ModelReport) -> dict[str, str]:
        row = {"model": r.name}
        row.update({m: _num(r.metrics.get(m), 4) for m in metrics})
        row["ECE"] = _num(r.ece, 4)
        row["params (M)"] = _num(r.params / 1e6)
        row["MB on disk"] = _num(r.size_mb)
        row.update({_latency_header(bs): _num(_latency_ms(r, bs)) for bs in batch_sizes})
        return row

    summary = comparison_summary(teacher, student)
    ratio = {"model": RATIO_ROW}
    ratio.update({m: _num(summary["retention_pct"][m], 1, "%") for m in metrics})
    ratio["ECE"] = ""
    ratio["params (M)"] = _num(summary["params_ratio"], 2, "x")
    ratio["MB on disk"] = _num(summary["size_ratio"], 2, "x")
    ratio.update({_latency_header(bs): _num(summary["speedup"][str(bs)], 2, "x") for bs in batch_sizes})
    return [model_row(teacher), model_row(student), ratio]


def _footer(teacher: ModelReport, student: ModelReport) -> list[str]:
    """Lines under the table: how latency was measured (threads) and how to read the ratio row."""
    def describe(r: ModelReport) -> str:
        lat = r.latency or {}
        return f"{lat.get('threads', NA)} (median of {lat.get('repeats', '?')} timed runs)"

    same = describe(teacher) == describe(student)
    threads = describe(teacher) if same else f"teacher {describe(teacher)}, student {describe(student)}"
    return [
        f"CPU latency, torch threads: {threads}.",
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


def _as_table(rows: list[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
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
                 reported_on: str | None = None) -> str:
    """The comparison as plain text: aligned columns (model left, numbers right) and footer lines,
    ending with :func:`selection_line` when ``selected_on``/``reported_on`` are given."""
    selection = selection_line(selected_on, reported_on)
    return "\n".join([_aligned(*_as_table(comparison_rows(teacher, student))), *_footer(teacher, student),
                      *([selection] if selection else [])])


def _history_table(history: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns epoch, step, loss, then every other key in order of first appearance."""
    headers = list(dict.fromkeys(["epoch", "step", "loss", *(k for entry in history for k in entry)]))

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return _num(value, 4)
        return str(value)

    return headers, [[cell(entry.get(h)) for h in headers] for entry in history]


# --------------------------------------------------------------------------- documents

# A document is a list of (kind, payload) blocks rendered by both _markdown and _html:
#   ("h1" | "h2" | "p", text), ("table", (headers, rows)), ("image", (filename, png bytes)),
#   ("code", (language, text)).
Block = tuple[str, Any]


def _blocks(teacher: ModelReport, student: ModelReport, title: str, config_yaml: str,
            history: list[dict[str, Any]] | None, png: bytes | None, selection: str | None = None,
            other_roles: dict[str, dict[str, Any]] | None = None) -> list[Block]:
    blocks: list[Block] = [
        ("h1", title),
        ("h2", "Teacher vs student"),
        ("table", _as_table(comparison_rows(teacher, student))),
        *(("p", line) for line in _footer(teacher, student)),
        *([("p", selection)] if selection else []),
    ]
    if other_roles:
        metrics = list(dict.fromkeys(k for r in other_roles.values() for k in r["metrics"]))
        rows = [[role, *(f"{r['metrics'].get(m, float('nan')):.4f}" for m in metrics), f"{r['ece']:.4f}"]
                for role, r in other_roles.items()]
        blocks += [("h2", "Other teachers and assistants (same split)"), ("table", (["role", *metrics, "ECE"], rows))]
    if png is not None:
        blocks += [("h2", "Reliability diagram"), ("image", ("reliability.png", png))]
    if history:
        blocks += [("h2", "Training history"), ("table", _history_table(history))]
    blocks += [("h2", "Config"), ("code", ("yaml", config_yaml))]
    return blocks


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, payload in blocks:
        if kind == "h1":
            out.append("# " + " ".join(payload.split()))
        elif kind == "h2":
            out.append(f"## {payload}")
        elif kind == "p":
            out.append(payload)
        elif kind == "table":
            headers, rows = payload
            align = ["---", *["---:"] * (len(headers) - 1)]
            out.append("\n".join("| " + " | ".join(_md_cell(c) for c in cells) + " |"
                                 for cells in [headers, align, *rows]))
        elif kind == "image":
            out.append(f"![reliability diagram]({payload[0]})")
        elif kind == "code":
            language, text = payload
            fence = "`" * max(3, _longest_backtick_run(text) + 1)
            out.append(f"{fence}{language}\n{text.rstrip()}\n{fence}")
    return "\n\n".join(out) + "\n"


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


_CSS = ("body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem}"
        "td:not(:first-child),th:not(:first-child){text-align:right}"
        "pre{background:#f6f6f6;padding:1rem;overflow:auto}img{max-width:100%}")


def _html(blocks: list[Block], title: str) -> str:
    esc = html.escape
    body: list[str] = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{esc(payload)}</{kind}>")
        elif kind == "table":
            headers, rows = payload
            head = "".join(f"<th>{esc(h)}</th>" for h in headers)
            rows_html = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>")
        elif kind == "image":
            data = base64.b64encode(payload[1]).decode("ascii")
            body.append(f'<img src="data:image/png;base64,{data}" alt="reliability diagram">')
        elif kind == "code":
            body.append(f"<pre><code>{esc(payload[1].rstrip())}</code></pre>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(
    run_dir: str | Path,
    teacher: ModelReport,
    student: ModelReport,
    title: str,
    config_yaml: str,
    history: list[dict[str, Any]] | None = None,
    selected_on: str | None = None,
    reported_on: str | None = None,
    other_roles: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and (when both models have reliability bins)
    ``reliability.png`` into ``run_dir``, each atomically.

    ``history``: optional training log, one dict per evaluation with ``epoch``, ``step``, ``loss``
    and eval metrics. ``selected_on``/``reported_on``: descriptions of the selection and reported
    splits (``Task.describe_split``), written as one line under the table (:func:`selection_line`).
    ``other_roles``: ``{role: {"metrics": {...}, "ece": x}}`` of the job's other teachers and
    assistants, a table of their own.
    Returns ``{"markdown": path, "html": path}`` plus ``"reliability": path`` when the diagram was drawn."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    png = None
    if teacher.reliability is not None and student.reliability is not None:
        names = (teacher.name, student.name) if teacher.name != student.name else ("teacher", "student")
        paths["reliability"] = plot_reliability(
            {names[0]: teacher.reliability, names[1]: student.reliability}, run_dir / "reliability.png")
        png = paths["reliability"].read_bytes()
    blocks = _blocks(teacher, student, title, config_yaml, history, png, selection_line(selected_on, reported_on),
                     other_roles)
    paths["markdown"] = atomic_write_text(run_dir / "report.md", _markdown(blocks))
    paths["html"] = atomic_write_text(run_dir / "report.html", _html(blocks, title))
    return paths
