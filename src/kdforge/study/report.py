"""The study report: ``study.json``, ``study.md`` and a self-contained ``study.html``.

In order: a warning at the top when a teacher is below its floor (the table is then not evidence) or
runs are missing; the budget (data, epochs, seeds); each teacher's own score beside the trivial
predictor and its floor (:mod:`kdforge.study.floors`); per axis point, every row's score over seeds
(mean +- std, 95% t interval) and its paired difference from the baseline row (:mod:`kdforge.study.stats`),
with the settings in which it differs from the baseline when more than one; the claims, each worded
by :func:`kdforge.study.stats.verdict` from its interval (nothing in a findings line is fixed text),
the published effect beside ours; charts of the score against a numeric axis and against latency.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kdforge.evaluation.plots import score_by_axis_png, score_latency_png
from kdforge.evaluation.render import render_html, render_markdown
from kdforge.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from kdforge.study.config import PublishedScore, StudyConfig, merge
from kdforge.study.floors import teacher_floor
from kdforge.study.grid import RunSpec, axis_points, differing_settings, point_label
from kdforge.study.heatmap import grid_tables, grids_png, study_grids
from kdforge.study.stats import HOLDS, UNDECIDED, Interval, paired_difference, t_interval, verdict
from kdforge.study.teacher_measures import MEASURES, predictor_records

RAW = {"sharpness", "params", "size_mb", "perplexity", "loss"}  # shown as they are; other values in points


def in_points(metric: str) -> bool:
    return metric not in RAW and not metric.startswith("latency_")


def unit(metric: str) -> str:
    return " pts" if in_points(metric) else ""


def shown(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    scaled = 100 * value if in_points(metric) else value
    return f"{scaled:+.2f}" if signed else f"{scaled:.2f}"


def interval_text(iv: Interval | None, metric: str, signed: bool = True) -> str:
    """``[low, high]``; ``signed`` for a difference."""
    if iv is None:
        return "n/a (no run yet)"
    if iv.low is None:
        return "n/a (one seed)"
    return f"[{shown(iv.low, metric, signed)}, {shown(iv.high, metric, signed)}]"


def seed_values(summaries: dict[int, dict], metric: str) -> dict[int, float]:
    return {seed: s["student"][metric] for seed, s in summaries.items() if s["student"].get(metric) is not None}


def mean_of(summaries: dict[int, dict], key: str) -> float | None:
    found = [s["student"][key] for s in summaries.values() if s["student"].get(key) is not None]
    return sum(found) / len(found) if found else None


class StudyTables:
    """The finished runs arranged by axis point and row, and the comparisons between them."""

    def __init__(self, study: StudyConfig, runs: list[RunSpec], summaries: dict[str, dict]):
        self.study, self.runs, self.summaries = study, runs, summaries
        self.points = list(dict.fromkeys(r.point for r in runs))
        self.rows = study.row_names()
        self.cells: dict[tuple[str, str], dict[int, dict]] = {}
        self.specs: dict[tuple[str, str], RunSpec] = {}
        for run in runs:
            self.specs.setdefault((run.point, run.row), run)
            if run.key in summaries:
                self.cells.setdefault((run.point, run.row), {})[run.seed] = summaries[run.key]
        self.aliased: set[tuple[str, str]] = set()  # a single-point row's runs, shown at the other points
        values = {point_label(p): p for p in axis_points(study)}
        for row in study.single_point_rows:
            spec = self.specs.get((self.points[0], row)) if self.points else None
            for point in self.points[1:] if spec is not None else []:
                tree = merge(copy.deepcopy(spec.tree), values[point])
                self.specs[(point, row)] = RunSpec(row, point, spec.seed, tree)
                self.aliased.add((point, row))
                if (self.points[0], row) in self.cells:
                    self.cells[(point, row)] = self.cells[(self.points[0], row)]
        first = next(iter(summaries.values()), None)
        self.metric = first["main_metric"] if first else None
        self.greater = first.get("greater_is_better", True) if first else True

    def own_cells(self) -> dict[tuple[str, str], dict[int, dict]]:
        """The cells of runs made at their point (a single-point row's runs counted once)."""
        return {key: cell for key, cell in self.cells.items() if key not in self.aliased}

    def differs(self, point: str, a: str, b: str) -> list[str]:
        spec_a, spec_b = self.specs[(point, a)], self.specs[(point, b)]
        return differing_settings(spec_a.config().model_dump(mode="json"), spec_b.config().model_dump(mode="json"))

    def difference(self, point: str, a: str, b: str, metric: str) -> Interval | None:
        return paired_difference(seed_values(self.cells.get((point, a), {}), metric),
                                 seed_values(self.cells.get((point, b), {}), metric))


def teacher_name(spec: RunSpec | None, folder: str) -> str:
    """The primary teacher as a reader knows it (model, fine-tuning, seed), with its shared folder."""
    if spec is None:
        return folder
    config = spec.config()
    role = next(iter(config.teacher_configs()))
    teacher = config.teacher_configs()[role]
    ft = teacher.finetune
    trained = f", fine-tuned {ft.epochs} epochs at lr {ft.lr:g}, batch {ft.batch_size}, seed {ft.seed}" if ft else ""
    layers = f" layers {teacher.layers}" if teacher.layers is not None else ""
    where = f" (folder {folder})" if folder != teacher.model else ""
    return f"{role}: {teacher.model}{layers}{trained}{where}"


def teacher_rows(tables: StudyTables, study: StudyConfig) -> tuple[list[dict], list[str]]:
    """Each distinct teacher's score, trivial baseline and floor; the warnings for those below it."""
    seen: dict[str, dict] = {}
    shared = Path(study.teachers_dir or Path(study.output_dir) / "teachers")
    for summary in tables.summaries.values():
        folder = summary.get("teacher_id", "teacher")
        if (shared / folder).exists():  # one teacher under two names (a folder linked to another): once
            folder = (shared / folder).resolve().name
        seen.setdefault(folder, summary)
    out, warnings = [], []
    for folder, summary in seen.items():
        name = teacher_name(tables.specs.get((summary["point"], summary["row"])), folder)
        metric = summary["main_metric"]
        score, base = summary["teacher"].get(metric), summary["baseline"].get(metric)
        floor = teacher_floor(summary["task"], metric, base, study.teacher_floor)
        clears = floor.clears(score)
        out.append({"teacher": name, "task": summary["task"], "metric": metric, "score": score, "baseline": base,
                    "floor": floor.value, "rule": floor.rule, "clears": clears, "scores": summary["teacher"]})
        if clears is False:
            warnings.append(f"This table is not evidence: teacher {name} scores {metric} {score:.4f} on "
                            f"{summary['task']}, below its floor {floor.value:.4f} ({floor.rule}).")
    return out, warnings


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def predictor_row(record: dict) -> list[str]:
    """One line of the table "does the measure predict the student's score better than the teacher's score"."""
    interval = "n/a" if record["low"] is None else f"[{record['low']:+.3f}, {record['high']:+.3f}]"
    word = record["verdict"] + (f" ({record['why']})" if record["why"] else "")
    return [record["family"], str(record["teachers"]), MEASURES[record["measure"]],
            "n/a" if record["rho_score"] is None else f"{record['rho_score']:+.3f}",
            "n/a" if record["rho_measure"] is None else f"{record['rho_measure']:+.3f}", interval, word]


def published_cell(published: PublishedScore, teacher: dict) -> str:
    """The published score beside the teacher's own on the same metric, when that is not the table's."""
    if published.metric in (None, teacher["metric"]):
        return f"{published.value:.4f} ({published.source})"
    ours = teacher["scores"].get(published.metric)
    mine = f"; this teacher {ours:.4f}" if ours is not None else ""
    return f"{published.metric} {published.value:.4f} ({published.source}{mine})"


def row_table(tables: StudyTables, point: str) -> tuple[list[str], list[list[str]], list[dict]]:
    metric, base = tables.metric, tables.study.baseline_row()
    headers = ["row", "seeds", f"{metric} mean ± std", "95% interval", f"Δ vs {base}{unit(metric)}",
               "Δ 95% interval", "vs baseline", "ECE", "params", "b32 ms", "differs from the baseline in"]
    rows, records = [], []
    for row in tables.rows:
        cell = tables.cells.get((point, row), {})
        values = seed_values(cell, metric)
        iv = t_interval(list(values.values())) if values else None
        diff = tables.difference(point, row, base, metric) if row != base else None
        settings = tables.differs(point, row, base) if row != base else []
        direction = "higher" if tables.greater else "lower"
        word = {HOLDS: "better", UNDECIDED: "undecided"}.get(verdict(diff, direction), "worse") if diff else ""
        flag = ", ".join(settings) if len(settings) > 1 else ""
        if len(settings) > 1:
            flag = f"{len(settings)} settings at once: {flag}"
        mean_std = "n/a" if iv is None else \
            f"{shown(iv.mean, metric)} ± {shown(iv.std, metric) if iv.std is not None else 'n/a'}"
        ece, params, b32 = mean_of(cell, "ece"), mean_of(cell, "params"), mean_of(cell, "latency_b32_ms")
        rows.append([row, str(len(values)), mean_std, interval_text(iv, metric, signed=False),
                     shown(diff.mean, metric, True) if diff else "", interval_text(diff, metric) if diff else "",
                     word, shown(ece, "ece"), f"{params / 1e6:.2f}M" if params else "n/a",
                     f"{b32:.1f}" if b32 else "n/a", flag])
        records.append({"point": point, "row": row, "seeds": sorted(values), "score": iv.to_dict() if iv else None,
                        "difference": diff.to_dict() if diff else None, "vs_baseline": word,
                        "differs_in": settings, "ece": ece, "params": params, "latency_b32_ms": b32})
    return headers, rows, records


def claim_records(tables: StudyTables) -> list[dict]:
    records = []
    for claim in tables.study.claims:
        metric = claim.metric or tables.metric
        for point in tables.points:
            diff = tables.difference(point, claim.a, claim.b, metric)
            result = verdict(diff, claim.direction)
            text = claim.text or f"{claim.a} scores {claim.direction} {metric} than {claim.b}"
            settings = tables.differs(point, claim.a, claim.b)
            records.append({"claim": text, "point": point, "metric": metric, "direction": claim.direction,
                            "difference": diff.to_dict() if diff else None, "verdict": result,
                            "detectable": diff.half_width if diff else None, "paper": claim.paper,
                            "source": claim.source, "differs_in": settings})
    return records


def finding(record: dict) -> str:
    """One findings line, every word of it from the numbers."""
    metric, diff = record["metric"], record["difference"]
    where = f" at {record['point']}" if record["point"] else ""
    if diff is None:
        return f"{record['claim']}{where}: no seed ran both rows yet: {UNDECIDED}."
    iv = Interval(diff["mean"], diff["std"], diff["low"], diff["high"], diff["n"])
    line = (f"{record['claim']}{where}: difference {shown(iv.mean, metric, True)}{unit(metric)}, 95% interval "
            f"{interval_text(iv, metric)} over {iv.n} paired seed(s): {record['verdict']}")
    if record["verdict"] == UNDECIDED and iv.half_width is not None:
        line += f" (smallest difference this study could detect: {shown(iv.half_width, metric)}{unit(metric)})"
    if record["paper"] is not None:
        line += f"; the paper reports {record['paper']:+.2f}{unit(metric)}"
        line += f" ({record['source']})" if record["source"] else ""
    if len(record["differs_in"]) > 1:
        line += f"; the rows differ in {len(record['differs_in'])} settings ({', '.join(record['differs_in'])})"
    return line + "."


def charts(tables: StudyTables) -> list[tuple[str, bytes, str]]:
    metric, images = tables.metric, []
    axes = list(tables.study.axes)
    numeric = len(axes) == 1 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                     for v in tables.study.axes[axes[0]])
    if numeric and tables.cells:
        series = {}
        for row in tables.rows:
            points = []
            for point, value in zip(tables.points, tables.study.axes[axes[0]], strict=True):
                values = seed_values(tables.cells.get((point, row), {}), metric)
                if values:
                    iv = t_interval(list(values.values()))
                    points.append((float(value), iv.mean, iv.half_width))
            series[row] = points
        if any(series.values()):
            images.append(("study-axis.png", score_by_axis_png(series, axes[0], metric), f"{metric} by {axes[0]}"))
    base = tables.study.baseline_row()
    students_differ = any(k.startswith(("student", "assistants")) for point in tables.points for row in tables.rows
                          if row != base for k in tables.differs(point, row, base))
    if students_differ:
        points = []
        for (point, row), cell in tables.own_cells().items():
            values, latency = seed_values(cell, metric), mean_of(cell, "latency_b32_ms")
            if values and latency:
                iv = t_interval(list(values.values()))
                points.append({"name": f"{row} @ {point}" if point else row, "score": iv.mean, "latency_ms": latency,
                               "score_low": iv.low, "score_high": iv.high})
        if points:
            images.append(("study-latency.png", score_latency_png(points, metric, 32, tables.greater),
                           f"{metric} vs latency"))
    return images


def budget_line(tables: StudyTables) -> str:
    spec = next(iter(tables.specs.values()))
    config = spec.config()
    task, train = config.task, config.train
    rows = f"{task.train_limit:,} training rows" if task.train_limit else "the full training set"
    if isinstance(task.validation, float):
        rows += f" ({task.validation:.0%} of them carved off as the validation split that selects)"
    teachers = ", ".join(f"{role} {t.model} ({t.finetune.epochs} fine-tuning epochs)" if t.finetune else
                         f"{role} {t.model or 'black box'}" for role, t in config.teacher_configs().items())
    epochs = f"{train.epochs} epoch{'s' if train.epochs != 1 else ''}"
    return (f"Budget: {task.name}, {rows}; students {epochs} at batch {train.batch_size}, lr {train.lr:g} "
            f"(unless a row changes it); seeds {tables.study.seeds}; teachers: {teachers}. Intervals: 95% Student-t "
            "over seeds (paired by seed for differences), assuming normal differences.")


def write_study_report(folder: Path, study: StudyConfig, runs: list[RunSpec], summaries: dict[str, dict],
                       storage: str) -> tuple[dict[str, Any], str]:
    """Write the report files into ``folder``; returns what ``study.json`` holds and the main table."""
    tables = StudyTables(study, runs, summaries)
    todo = [r.key for r in runs if r.key not in summaries]
    teachers, warnings = teacher_rows(tables, study)
    blocks: list = [("h1", f"kdforge study: {folder.name}")]
    blocks += [("warning", w) for w in warnings]
    if todo:
        blocks.append(("warning", f"Half-finished: {len(summaries)} of {len(runs)} runs done; still to do: "
                                  f"{', '.join(todo)}."))
    blocks.append(("p", budget_line(tables)))
    if teachers:
        published = study.teacher_published
        measures = [m for m in MEASURES if any(t["scores"].get(m) is not None for t in teachers)]
        blocks += [("h2", "Teachers"), ("table", (
            ["teacher", "task", "metric", "score", "trivial predictor", "floor", "rule", "clears",
             *(MEASURES[m] for m in measures), *(["published"] if published else [])],
            [[t["teacher"], t["task"], t["metric"], f"{t['score']:.4f}" if t["score"] is not None else "n/a",
              f"{t['baseline']:.4f}" if t["baseline"] is not None else "n/a",
              f"{t['floor']:.4f}" if t["floor"] is not None else "n/a", t["rule"],
              {True: "yes", False: "NO", None: "n/a"}[t["clears"]],
              *(number(t["scores"].get(m)) for m in measures),
              *([published_cell(published, t)] if published else [])] for t in teachers]))]
        if measures:
            blocks.append(("p", "Similarity information of each teacher's responses on the reported split "
                                "(kdforge.evaluation.similarity): non-target entropy = mean normalised entropy of "
                                "its probabilities over the wrong classes (1: all alike); confusion rank "
                                "correlation = Spearman of its mean wrong-class probabilities with its confusion "
                                "rates over class pairs."))
    predictors = predictor_records(tables.own_cells(), tables.specs, tables.metric) if tables.metric else []
    if predictors:
        blocks += [("h2", "Does a teacher's similarity information predict the student's score?"),
                   ("p", "Spearman correlation across the teachers of a family of runs (runs that differ in their "
                         "teacher only) of the student's mean score with the teacher's score and with the measure; "
                         "the measure predicts better when the paired bootstrap interval of |rho measure| - "
                         "|rho score| excludes 0 (kdforge.study.teacher_measures)."),
                   ("table", (["runs", "teachers", "measure", "rho (teacher score)", "rho (measure)",
                               "|rho m| - |rho s| 95% interval", "the measure predicts better"],
                              [predictor_row(r) for r in predictors]))]
    records, main_table = [], ""
    for point in tables.points:
        if tables.metric is None:
            break
        headers, rows, recs = row_table(tables, point)
        records += recs
        blocks += [("h2", f"Rows at {point}" if point else "Rows"), ("table", (headers, rows))]
        main_table = main_table or render_markdown([("table", (headers, rows))])
    grids = study_grids(study.axes, [r for r in tables.rows if r not in study.single_point_rows],
                        tables.own_cells(), tables.metric, tables.greater) if tables.metric else None
    grid_png = None
    if grids is not None and any(v is not None for grid in grids["rows"].values() for line in grid for v in line):
        both = f"{grids['axes'][0]} x {grids['axes'][1]}"
        blocks.append(("h2", f"{both}: the best teacher and the best-teaching teacher"))
        for title, headers, rows in grid_tables(grids, tables.metric, lambda v: shown(v, tables.metric)):
            blocks += [("p", title), ("table", (headers, rows))]
        grid_png = ("study-grid.png", grids_png(grids, tables.metric, lambda v: shown(v, tables.metric)),
                    f"teacher and student {tables.metric} over {both}")
        blocks.append(("image", grid_png))
    claims = claim_records(tables) if tables.metric else []
    if claims:
        blocks += [("h2", "Claims"), *(("p", finding(r)) for r in claims)]
    images = charts(tables) if tables.metric else []
    blocks += [("image", (name, png, alt)) for name, png, alt in images]
    blocks.append(("p", f"Storage: {storage}. Resume or extend: kdforge study {folder / 'study-config.yaml'}"))
    report = {"name": folder.name, "complete": not todo, "todo": todo, "teachers": teachers,
              "evidence": not warnings, "rows": records, "claims": claims, "teacher_predictors": predictors,
              **({"grids": grids} if grids is not None else {}), "runs": summaries,
              "seeds": study.seeds, "baseline": study.baseline_row()}
    for target in [folder, *([Path(study.publish_dir)] if study.publish_dir else [])]:
        target.mkdir(parents=True, exist_ok=True)
        for name, png, _alt in [*images, *([grid_png] if grid_png else [])]:
            atomic_write_bytes(target / name, png)
        atomic_write_json(target / "study.json", report)
        atomic_write_text(target / "study.md", render_markdown(blocks))
        atomic_write_text(target / "study.html", render_html(blocks, f"kdforge study: {folder.name}"))
    return report, main_table
