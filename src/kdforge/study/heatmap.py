"""The grids of a study with two axes (e.g. the teacher's ``finetune.batch_size`` x ``finetune.epochs``):
the teacher's score and each row's student score (mean over seeds) at every point, as tables and one PNG
heat map, with the best teacher and each row's best-teaching teacher marked, so that the two can be told
apart (Vats & Crandall 2021, arXiv:2112.10047: the best-teaching teacher is not the best teacher).

Grid cell (i, j) is the point (axis A = A[i], axis B = B[j]). The teacher's score there is that of the
teacher of the first row (in the study's order) with a finished run at the point. "Best" is the
highest value, or the lowest for a metric where lower is better; ties: the first in row-major order.
Rows of ``single_point_rows`` have no grid (they ran at one point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kdforge.evaluation.plots import _new_figure, _png
from kdforge.study.grid import point_label

Grid = list[list[float | None]]


def best_cell(grid: Grid, greater: bool) -> tuple[int, int] | None:
    """(i, j) of the best value of ``grid`` (see the module docstring), None when it is empty."""
    found = [(v, i, j) for i, line in enumerate(grid) for j, v in enumerate(line) if v is not None]
    if not found:
        return None
    best = max(found, key=lambda f: f[0]) if greater else min(found, key=lambda f: f[0])
    value = best[0]
    return next((i, j) for v, i, j in found if v == value)


def study_grids(axes: dict[str, list[Any]], rows: list[str], cells: dict[tuple[str, str], dict[int, dict]],
                metric: str, greater: bool) -> dict[str, Any] | None:
    """The grids of a two-axis study (None otherwise): ``axes``, ``values``, ``teacher`` (grid),
    ``rows`` ({row: grid of the student's mean}), ``best_teacher`` and ``best_teaching`` ({row: (i, j)})."""
    if len(axes) != 2:
        return None
    (key_a, values_a), (key_b, values_b) = axes.items()
    teacher: Grid = [[None] * len(values_b) for _ in values_a]
    students: dict[str, Grid] = {row: [[None] * len(values_b) for _ in values_a] for row in rows}
    for i, a in enumerate(values_a):
        for j, b in enumerate(values_b):
            point = point_label({key_a: a, key_b: b})
            for row in rows:
                cell = cells.get((point, row), {})
                scores = [s["student"][metric] for s in cell.values() if s["student"].get(metric) is not None]
                if scores:
                    students[row][i][j] = sum(scores) / len(scores)
                if teacher[i][j] is None and cell:
                    teacher[i][j] = next(iter(cell.values()))["teacher"].get(metric)
    return {"axes": [key_a, key_b], "values": [list(values_a), list(values_b)], "teacher": teacher,
            "rows": students, "best_teacher": best_cell(teacher, greater),
            "best_teaching": {row: best_cell(grid, greater) for row, grid in students.items()}}


def grid_tables(grids: dict[str, Any], metric: str, fmt: Callable[[float | None], str]
                ) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of the teacher's grid and of each row's student grid; ``fmt`` writes a value.
    The best teacher's cell says "best teacher" in every table; a row's best cell says "best teaching"."""
    (key_a, key_b), (values_a, values_b) = grids["axes"], grids["values"]
    headers = [f"{key_a} \\ {key_b}", *(str(v) for v in values_b)]

    def table(grid: Grid, best: tuple[int, int] | None) -> list[list[str]]:
        lines = []
        for i, a in enumerate(values_a):
            cells = []
            for j in range(len(values_b)):
                marks = [*(["best teacher"] if grids["best_teacher"] == (i, j) else []),
                         *(["best teaching"] if best == (i, j) else [])]
                cells.append(fmt(grid[i][j]) + (f" ({', '.join(marks)})" if marks else ""))
            lines.append([str(a), *cells])
        return lines

    out = [(f"Teacher {metric}", headers, table(grids["teacher"], None))]
    for row, grid in grids["rows"].items():
        title = f"Student {metric} (mean over seeds), row {row}"
        out.append((title, headers, table(grid, grids["best_teaching"][row])))
    return out


def grids_png(grids: dict[str, Any], metric: str, fmt: Callable[[float | None], str]) -> bytes:
    """One heat map per grid (the teacher's, then each row's student), values written in the cells; a solid
    frame marks the panel's best cell, a dashed frame the best teacher's cell in the student panels."""
    from matplotlib.patches import Rectangle

    (key_a, key_b), (values_a, values_b) = grids["axes"], grids["values"]
    panels = [("teacher", grids["teacher"], grids["best_teacher"]),
              *((f"student, {row}", grid, grids["best_teaching"][row]) for row, grid in grids["rows"].items())]
    fig = _new_figure(3.4 * len(panels) + 0.6, 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, grid, best) in zip(axes, panels, strict=True):
        data = np.array([[np.nan if v is None else v for v in line] for line in grid], dtype=float)
        image = ax.imshow(data, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.8)
        low, high = (np.nanmin(data), np.nanmax(data)) if not np.all(np.isnan(data)) else (0.0, 0.0)
        for i in range(len(values_a)):
            for j in range(len(values_b)):
                bright = grid[i][j] is not None and high > low and (grid[i][j] - low) / (high - low) > 0.6
                ax.text(j, i, fmt(grid[i][j]), ha="center", va="center", color="black" if bright else "white",
                        fontsize=8)
        frames = [(best, "-")] + ([(grids["best_teacher"], "--")] if title != "teacher" else [])
        for cell, style in frames:
            if cell is not None:
                i, j = cell
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2,
                                       linestyle=style))
        ax.set(xticks=range(len(values_b)), xticklabels=[str(v) for v in values_b],
               yticks=range(len(values_a)), yticklabels=[str(v) for v in values_a], xlabel=key_b, ylabel=key_a,
               title=f"{title} {metric}")
        ax.title.set_fontsize(9)
    fig.suptitle("solid frame: best in the panel; dashed: the best teacher's cell", fontsize=9)
    return _png(fig)
