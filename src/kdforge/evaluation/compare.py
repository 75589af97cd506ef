"""The ``compare`` page: several finished runs of one task side by side, as Markdown and HTML.

For each run folder (``metrics.json`` and ``config.yaml`` written by ``kdforge distill``), with its newest
measurements (each later ``kdforge eval`` / ``export`` and ``kdforge bench-latency`` laid over the training
run's results: :func:`kdforge.evaluation.latest.latest_measurements`), the page shows one table row: the
student's and the teacher's main metric, the retention ``100 * student / teacher`` in %, the student's ECE,
parameters (millions) and size on disk (MB), and the median latency per measured batch size of the student
and of every exported form (``exports``, e.g. ``"student onnx int8"``). A second table lists the config
keys (dotted paths, list items by index) whose values differ between the runs; ``output_dir`` is left out,
it is the run folder itself. Last comes the main metric against latency of every run's student and exports, with
their Pareto front (:func:`kdforge.evaluation.plots.pareto_front`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kdforge.errors import KDForgeError
from kdforge.evaluation.latest import latest_measurements, measured_lines
from kdforge.evaluation.model_report import describe_timing, finite_number, fmt
from kdforge.evaluation.plots import score_latency_png
from kdforge.evaluation.render import Block, render_html, render_markdown
from kdforge.io import atomic_write_bytes, atomic_write_text, read_json
from kdforge.paths import check_writable_folder
from kdforge.run_folder import RunFolder

ABSENT = "(absent)"
_MISSING = object()  # a key one config lacks
#: Main metrics for which a lower value is better (the rest: higher is better).
LOWER_IS_BETTER = frozenset({"perplexity"})
#: Config keys left out of the differences table.
IGNORED_KEYS = frozenset({"output_dir"})
PLOT_NAME = "score_latency.png"


def _finish_hint(run_dir: Path) -> str:
    return (f"{run_dir} is not a finished run: run `kdforge distill` to finish it or `kdforge eval {run_dir}` "
            "to measure it")


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, config)`` of one run folder, the metrics with its newest measurements
    (:func:`kdforge.evaluation.latest.latest_measurements`), or one :class:`KDForgeError` line naming the folder."""
    run = RunFolder(run_dir)
    run_dir = run.root
    if not run_dir.is_dir():
        raise KDForgeError(f"run folder {run_dir} does not exist; pass the output_dir of a finished run")
    metrics = read_json(run.metrics, f"run `kdforge distill` to finish it or `kdforge eval {run_dir}`")
    for key in ("task", "student", "teacher"):
        if not isinstance(metrics.get(key), dict if key != "task" else str):
            raise KDForgeError(f"{run.metrics} has no {key!r} entry; {_finish_hint(run_dir)}")
    path = run.config_file
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KDForgeError(f"{path} does not exist; {_finish_hint(run_dir)}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise KDForgeError(f"{path} is not readable YAML ({' '.join(str(err).split())}); "
                           f"{_finish_hint(run_dir)}") from None
    if not isinstance(config, dict):
        raise KDForgeError(f"{path} does not hold a YAML mapping; {_finish_hint(run_dir)}")
    return latest_measurements(metrics, run_dir), config


# --------------------------------------------------------------------------- numbers


def _score(report: dict[str, Any] | None, metric: str) -> float | None:
    value = ((report or {}).get("metrics") or {}).get(metric)
    return value if finite_number(value) else None


def _latency_entry(report: dict[str, Any] | None, batch_size: int) -> dict[str, Any]:
    per_bs = ((report or {}).get("latency") or {}).get("batch_sizes") or {}
    return per_bs.get(str(batch_size), per_bs.get(batch_size)) or {}


def _batch_sizes(reports: Sequence[dict[str, Any]]) -> list[int]:
    return sorted({int(bs) for r in reports for bs in ((r.get("latency") or {}).get("batch_sizes") or {})})


def _forms(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The student and its exported forms: ``{"student": report, "<form name>": report, ...}``."""
    exports = metrics.get("exports") or {}
    return {"student": metrics["student"], **{name: r for name, r in exports.items() if isinstance(r, dict)}}


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names; when two runs share one, their paths relative to the folders' common parent."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    resolved = [str(Path(d).resolve()) for d in run_dirs]
    common = os.path.commonpath(resolved) if len(resolved) > 1 else str(Path(resolved[0]).parent)
    return [os.path.relpath(r, common) if r != common else Path(r).name for r in resolved]


# --------------------------------------------------------------------------- tables


def runs_table(labels: Sequence[str], runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per run: see the module docstring. Latency cells are median ms."""
    metric = runs[0]["student"].get("main_metric") or runs[0]["teacher"].get("main_metric") or ""
    forms = list(dict.fromkeys(name for m in runs for name in _forms(m)))
    batch_sizes = _batch_sizes([r for m in runs for r in _forms(m).values()])
    headers = ["run", "task", f"student {metric}", f"teacher {metric}", f"retention {metric}", "student ECE",
               "student params (M)", "student MB on disk",
               *(f"{form} b{bs} (ms)" for form in forms for bs in batch_sizes)]
    rows = []
    for label, m in zip(labels, runs, strict=True):
        student, teacher = _score(m["student"], metric), _score(m["teacher"], metric)
        retention = 100.0 * student / teacher if student is not None and teacher else None
        params = m["student"].get("params")
        row = [label, m["task"], fmt(student, 4), fmt(teacher, 4), fmt(retention, 1, "%"),
               fmt(m["student"].get("ece"), 4), fmt(params / 1e6 if finite_number(params) else None),
               fmt(m["student"].get("size_mb"))]
        own = _forms(m)
        row += [fmt(_latency_entry(own.get(form), bs).get("median_ms")) for form in forms for bs in batch_sizes]
        rows.append(row)
    return headers, rows


def timing_blocks(labels: Sequence[str], runs: Sequence[dict[str, Any]]) -> list[Block]:
    """What the students were timed on (:func:`kdforge.evaluation.model_report.describe_timing`): one line when
    every run was timed alike, else a warning naming each run's (latencies on other inputs do not compare)."""
    timed = {label: describe_timing(m["student"].get("latency")) for label, m in zip(labels, runs, strict=True)}
    kinds = set(filter(None, timed.values()))
    if len(kinds) == 1:
        return [("p", f"Latency timed at {kinds.pop()}.")]
    if not kinds:
        return []
    each = "; ".join(f"{label}: {what or 'not recorded'}" for label, what in timed.items())
    return [("warning", f"the runs were timed on different inputs ({each}): their latencies do not compare; "
                        "re-time them alike with `kdforge bench-latency RUN_DIR --set eval.latency_seq_len=N`")]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the leaves of a nested YAML value, list items by index (``{"a": {"b": 1}, "c": [{"d": 2}]}
    -> {"a.b": 1, "c.0.d": 2}``). A list of plain values (``[0, 2]``) and an empty mapping or list are
    leaves of their own."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _show(value: Any) -> str:
    if value is _MISSING:
        return ABSENT
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("\n...").strip()


def _merged_order(flat: Sequence[dict[str, Any]]) -> list[str]:
    """The keys of all configs in one order: the first config's, then each new key of a later config
    right after the key that precedes it there (so ``student.layers`` stays beside ``student.model``)."""
    order: list[str] = []
    for keys in flat:
        at = 0
        for key in keys:
            if key in order:
                at = order.index(key) + 1
            else:
                order.insert(at, key)
                at += 1
    return order


def config_differences(configs: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """``[(dotted key, [display value per run])]`` for the keys whose values differ between the
    configs (a key missing from a config reads ``(absent)``), in the configs' order (a key only a later
    config has comes after the key it follows there); ``output_dir`` is left out."""
    flat = [flatten(c) for c in configs]
    out = []
    for key in _merged_order(flat):
        if key in IGNORED_KEYS:
            continue
        values = [f.get(key, _MISSING) for f in flat]
        if any(v != values[0] or type(v) is not type(values[0]) for v in values[1:]):
            out.append((key, [_show(v) for v in values]))
    return out


# --------------------------------------------------------------------------- chart


def chart_points(labels: Sequence[str], runs: Sequence[dict[str, Any]], metric: str,
                 batch_size: int) -> list[dict[str, Any]]:
    """One point per run's student and exported form, named ``"<run>"`` (the student) or ``"<run>: <form>"``
    (an export), with the main metric, the median latency at ``batch_size`` and its 90th percentile
    as ``high_ms``."""
    points = []
    for label, m in zip(labels, runs, strict=True):
        for form, report in _forms(m).items():
            entry = _latency_entry(report, batch_size)
            point = {"name": label if form == "student" else f"{label}: {form}", "score": _score(report, metric),
                     "latency_ms": entry.get("median_ms")}
            if finite_number(entry.get("p90_ms")):
                point["high_ms"] = entry["p90_ms"]
            points.append(point)
    return points


# --------------------------------------------------------------------------- page


def compare_runs(run_dirs: Sequence[Path], out: Path) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.html`` (self-contained) and, when any run has latencies,
    ``score_latency.png`` into ``out``, each atomically; return ``{"markdown", "html"[, "plot"]}`` paths.

    Every folder must hold a finished run (``metrics.json``, ``config.yaml``) and all of one task;
    otherwise one :class:`KDForgeError` line says which folder and what to do."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise KDForgeError("compare needs at least one run folder; pass the output_dir of finished runs")
    check_writable_folder(out, "--out")
    loaded = [load_run(d) for d in run_dirs]
    runs, configs = [m for m, _ in loaded], [c for _, c in loaded]
    tasks = dict.fromkeys(m["task"] for m in runs)
    if len(tasks) > 1:
        which = ", ".join(f"{d} ({m['task']})" for d, m in zip(run_dirs, runs, strict=True))
        raise KDForgeError(f"runs of different tasks cannot be compared: {which}; pass runs of one task")
    spaces = [tuple((m["student"].get("per_class") or {}).get("labels") or ()) for m in runs]
    if len(set(spaces)) > 1:
        which = "; ".join(f"{d}: {', '.join(map(str, labels)) or 'no classes'}"
                          for d, labels in zip(run_dirs, spaces, strict=True))
        raise KDForgeError(f"runs of {runs[0]['task']} with different label spaces cannot be compared ({which}); "
                           "pass runs whose data has the same labels")
    labels = run_labels(run_dirs)
    task = next(iter(tasks))
    metric = runs[0]["student"].get("main_metric") or runs[0]["teacher"].get("main_metric") or ""
    greater_is_better = metric not in LOWER_IS_BETTER

    title = f"kdforge: {len(runs)} runs of {task} compared"
    blocks: list[Block] = [
        ("h1", title),
        ("h2", "Runs"),
        ("table", runs_table(labels, runs)),
        ("p", f"retention = 100 * student {metric} / teacher {metric}; latency cells are median milliseconds "
              "per call at the batch size b; n/a: not measured."),
        *(("p", f"{label}: each form's newest measurements (later `kdforge eval`, `export`, `bench-latency`): "
                f"{'; '.join(measured_lines(m))}.")
          for label, m in zip(labels, runs, strict=True) if m.get("measured_again")),
        *timing_blocks(labels, runs),
        ("h2", "Config differences"),
    ]
    diffs = config_differences(configs)
    if diffs:
        blocks.append(("table", (["config key", *labels], [[key, *values] for key, values in diffs])))
    else:
        blocks.append(("p", "The runs' config.yaml files are identical (output_dir aside)."))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    sizes = _batch_sizes([r for m in runs for r in _forms(m).values()])
    batch_size = 1 if 1 in sizes else (sizes[0] if sizes else None)
    points = chart_points(labels, runs, metric, batch_size) if batch_size is not None else []
    blocks.append(("h2", f"{metric} vs latency"))
    if any(p["score"] is not None and finite_number(p["latency_ms"]) for p in points):
        png = score_latency_png(points, metric, batch_size, greater_is_better)
        paths["plot"] = atomic_write_bytes(out / PLOT_NAME, png)
        blocks += [("image", (PLOT_NAME, png, "score vs latency")),
                   ("p", f"Students and exported forms of every run at batch size {batch_size}; error bars reach "
                         "the 90th-percentile latency. Stars: the Pareto front (no other model is at least as fast "
                         f"and at least as good in {metric}, and strictly better in one of the two).")]
    else:
        blocks.append(("p", "No run has both a score and a latency to plot."))
    paths["markdown"] = atomic_write_text(out / "compare.md", render_markdown(blocks))
    paths["html"] = atomic_write_text(out / "compare.html", render_html(blocks, title))
    return paths
