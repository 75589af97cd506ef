"""PNG charts for the run report and the ``compare`` page: training curves, a reliability diagram
restricted to the confidences that occur, and score versus latency with its Pareto front.

Each chart is drawn on its own matplotlib ``Figure`` with an Agg canvas (no display, no global pyplot
state, safe in threads) and returned as PNG bytes, so callers embed or write them as they like.

Reliability diagram: C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On Calibration of Modern Neural
Networks", ICML 2017 (bins as in :func:`kdforge.problems.calibration.reliability_bins`).

Pareto front (two objectives, latency to minimise and score to maximise or minimise): point i is on the
front when no other point j *dominates* it, i.e. when there is no j with

    latency_j <= latency_i  and  score_j >= score_i  (<= when lower scores are better),

at least one of the two strict.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: History keys that count training progress, neither a loss term nor a metric.
PROGRESS_KEYS = ("epoch", "step")


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


# --------------------------------------------------------------------------- training curves


def best_so_far_png(curve: Sequence[tuple[int, float]], title: str) -> bytes:
    """A search's progress as PNG bytes: ``curve`` = (trial number, best reward up to it), as a step line
    over the count of trials run."""
    fig = _new_figure(7.0, 3.6)
    ax = fig.subplots()
    ax.step([n + 1 for n, _ in curve], [v for _, v in curve], where="post", color="C0")
    ax.set(xlabel="trials run", ylabel="best reward so far", title=title)
    ax.grid(True, alpha=0.3)
    return _png(fig)


def split_history_keys(history: Sequence[Mapping[str, Any]],
                       metric_names: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(loss_terms, metrics)``: the numeric keys of the history entries, in order of first appearance.

    A key listed in ``metric_names`` (the task's evaluation metrics, e.g. ``("f1", "accuracy")``) is a
    metric; ``epoch`` and ``step`` are neither; every other key with a numeric value (``loss`` and any
    logged loss term such as ``ce`` or ``hinton_kd``) is a loss term. Non-numeric values are ignored."""
    metric_set = set(metric_names)
    numeric = [k for entry in history for k, v in entry.items() if k not in PROGRESS_KEYS and _number(v)]
    keys = list(dict.fromkeys(numeric))
    return [k for k in keys if k not in metric_set], [k for k in keys if k in metric_set]


def _curve(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the entries that hold a finite number for it."""
    xs, ys = [], []
    for position, entry in enumerate(history, start=1):
        value = entry.get(key)
        if _number(value) and math.isfinite(value):
            xs.append(float(entry.get("epoch", position)))
            ys.append(float(value))
    return xs, ys


def training_curves_png(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                        metric_names: Iterable[str]) -> bytes | None:
    """Training curves of every phase that logged at least one epoch, as PNG bytes; ``None`` if none did.

    ``histories`` maps a phase name (``"teacher fine-tune"``, ``"stage distill"``) to its trainer history,
    one dict per epoch as written by ``Trainer._end_epoch`` (``epoch``, ``step``, ``loss`` and the eval
    metrics). ``metric_names`` are the task's evaluation metric keys; :func:`split_history_keys` sorts the
    other numeric keys into loss terms. One row per phase: loss terms per epoch on the left, eval
    metrics per epoch on the right."""
    from matplotlib.ticker import MaxNLocator

    metric_names = list(metric_names)
    phases = {name: list(h) for name, h in histories.items() if h}
    if not phases:
        return None
    fig = _new_figure(11.0, 0.6 + 3.0 * len(phases))
    axes = np.asarray(fig.subplots(len(phases), 2, squeeze=False))
    for row, (phase, history) in enumerate(phases.items()):
        losses, metrics = split_history_keys(history, metric_names)
        for ax, keys, what in ((axes[row, 0], losses, "loss terms"), (axes[row, 1], metrics, "eval metrics")):
            ax.set_title(f"{phase}: {what}", fontsize="medium")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            drawn = 0
            for k, key in enumerate(keys):
                xs, ys = _curve(history, key)
                if xs:
                    ax.plot(xs, ys, marker="o", markersize=3, color=f"C{k % 10}", label=key)
                    drawn += 1
            if drawn:
                ax.legend(fontsize="small", loc="best")
            else:
                ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes,
                        color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
    return _png(fig)


# --------------------------------------------------------------------------- reliability


def data_range(bins: Mapping[str, Any]) -> tuple[float, float]:
    """``(lo, hi)``: the confidence range that holds data, from the lower edge of the lowest non-empty
    bin to the upper edge of the last bin (1.0). ``(lower[0], upper[-1])`` when every bin is empty.
    ``bins`` is a :func:`~kdforge.problems.calibration.reliability_bins` dict."""
    lower, upper, count = bins["lower"], bins["upper"], bins["count"]
    first = next((m for m, c in enumerate(count) if c), 0)
    return float(lower[first]), float(upper[-1])


def reliability_png(bins_by_model: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Reliability diagram (Guo et al., 2017) as PNG bytes, its x-axis restricted to the confidences
    that hold data (:func:`data_range`, the lowest ``lo`` over the models, up to 1).

    ``bins_by_model`` maps a display name to a ``reliability_bins`` dict. Top panel: per model, the
    accuracy of each confidence bin as bars side by side (ECE in the legend), and the diagonal
    accuracy = confidence of perfect calibration. Bottom panel: the number of samples per bin and model
    on a log scale, each bar labelled with its count."""
    if not bins_by_model:
        raise ValueError("reliability_png needs at least one model")
    lo = min(data_range(b)[0] for b in bins_by_model.values())
    hi = max(data_range(b)[1] for b in bins_by_model.values())
    n_models = len(bins_by_model)
    fig = _new_figure(7.0, 6.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
    max_count = 1
    for k, (name, bins) in enumerate(bins_by_model.items()):
        lower = np.asarray(bins["lower"], dtype=np.float64)
        upper = np.asarray(bins["upper"], dtype=np.float64)
        keep = lower >= lo - 1e-12
        width = (upper - lower)[keep] / n_models
        left = lower[keep] + k * width
        accuracy = np.asarray([a if a is not None else 0.0 for a in bins["accuracy"]], dtype=np.float64)[keep]
        count = np.asarray(bins["count"], dtype=np.int64)[keep]
        ece = bins.get("ece")
        label = name if ece is None else f"{name} (ECE {ece:.4f})"
        color = f"C{k % 10}"
        top.bar(left, accuracy, width=width, align="edge", color=color, alpha=0.75, edgecolor="black",
                linewidth=0.4, label=label)
        shown = np.where(count > 0, count, np.nan)  # an empty bin draws no bar on the log axis
        bottom.bar(left, shown, width=width, align="edge", color=color, alpha=0.75)
        for x, c in zip(left + width / 2, count, strict=True):
            if c:
                bottom.text(x, c, f"{c}", ha="center", va="bottom", rotation=90, fontsize=6.5)
        max_count = max(max_count, int(count.max(initial=0)))
    top.plot([lo, hi], [lo, hi], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    top.set(xlim=(lo, hi), ylim=(0, 1.02), ylabel="accuracy", title="Reliability diagram")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    bottom.set_yscale("log")
    bottom.set_ylim(0.8, max_count * 12)  # head room for the rotated count labels
    bottom.set(xlabel="confidence (max probability)", ylabel="samples per bin")
    return _png(fig)


# --------------------------------------------------------------------------- score vs latency


def _valid(point: Mapping[str, Any]) -> bool:
    score, latency = point.get("score"), point.get("latency_ms")
    return _number(score) and _number(latency) and math.isfinite(score) and math.isfinite(latency) and latency > 0


def pareto_front(points: Sequence[Mapping[str, Any]], greater_is_better: bool = True) -> list[int]:
    """Indices of the points on the Pareto front of (low ``latency_ms``, good ``score``), ordered by
    increasing latency (ties by index).

    Point i is on the front when no point j dominates it: ``latency_j <= latency_i`` and ``score_j`` at
    least as good (``>=`` when ``greater_is_better``, else ``<=``), one of the two strictly. Identical
    points do not dominate each other, so both stay. Points without a finite score or a positive finite
    latency are never on the front and dominate nothing."""
    valid = [i for i, p in enumerate(points) if _valid(p)]
    sign = 1.0 if greater_is_better else -1.0

    def dominates(j: int, i: int) -> bool:
        lat_j, lat_i = points[j]["latency_ms"], points[i]["latency_ms"]
        s_j, s_i = sign * points[j]["score"], sign * points[i]["score"]
        return lat_j <= lat_i and s_j >= s_i and (lat_j < lat_i or s_j > s_i)

    front = [i for i in valid if not any(dominates(j, i) for j in valid if j != i)]
    return sorted(front, key=lambda i: (points[i]["latency_ms"], i))


#: Label offsets from a point, in points, tried in turn: near first, then farther (with a leader line).
_LABEL_OFFSETS = tuple((sx * r, sy * r) for r in (6, 20, 34, 50) for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)))


def _overlap(a, b) -> float:
    """Area (display pixels) shared by two bounding boxes."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _place_labels(fig, ax, points: Sequence[Mapping[str, Any]]) -> None:
    """Label each point with its name at the offset whose label covers the least of the labels placed
    before, the other points and their error bars, and the area outside the axes (the first such
    offset with nothing covered). A label away from its point gets a thin leader line to it."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # fixes the layout, so display coordinates are final
    frame = ax.get_window_extent(renderer)
    xy = [ax.transData.transform((p["latency_ms"], p["score"])) for p in points]
    # Each point keeps a band above and below it free, so that no label seems to belong to it.
    markers = [Bbox.from_bounds(x - 6, y - 16, 12, 32) for x, y in xy]
    bars = []
    for p, (_, y) in zip(points, xy, strict=True):
        ends = [p.get(k) if _number(p.get(k)) else p["latency_ms"] for k in ("low_ms", "high_ms")]
        x0, x1 = (ax.transData.transform((e, p["score"]))[0] for e in ends)
        bars.append(Bbox.from_extents(x0, y - 2, x1, y + 2))
    placed: list = []
    for i, p in enumerate(points):
        best = None
        for dx, dy in _LABEL_OFFSETS:
            note = ax.annotate(str(p.get("name", "")), (p["latency_ms"], p["score"]), xytext=(dx, dy),
                               textcoords="offset points", fontsize=8, ha="left" if dx > 0 else "right",
                               va="bottom" if dy > 0 else "top")
            box = note.get_window_extent(renderer)
            outside = box.width * box.height - _overlap(box, frame)
            cost = (sum(_overlap(box, b) for b in placed) + 4 * outside
                    + sum(_overlap(box, b) for j, b in enumerate(markers) if j != i)
                    + 0.5 * sum(_overlap(box, b) for b in bars))
            note.remove()
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        _, dx, dy, box = best
        far = abs(dx) > _LABEL_OFFSETS[0][0]
        ax.annotate(str(p.get("name", "")), (p["latency_ms"], p["score"]), xytext=(dx, dy),
                    textcoords="offset points", fontsize=8, ha="left" if dx > 0 else "right",
                    va="bottom" if dy > 0 else "top",
                    arrowprops=dict(arrowstyle="-", color="0.3", linewidth=0.8, shrinkA=1, shrinkB=5) if far else None)
        placed.append(box)


def score_latency_png(points: Sequence[Mapping[str, Any]], metric: str, batch_size: int,
                      greater_is_better: bool = True) -> bytes:
    """``metric`` against latency (ms per call at ``batch_size``) as PNG bytes, the Pareto front drawn.

    ``points``: ``{"name", "score", "latency_ms"}`` per model (teacher, student, exported forms), with
    optional ``"low_ms"``/``"high_ms"`` drawn as a horizontal error bar around ``latency_ms`` and
    ``"score_low"``/``"score_high"`` as a vertical one around ``score``. Each point
    is labelled with its name; points on the front (:func:`pareto_front`) are joined by a step line
    and drawn as filled stars. The x-axis is logarithmic when the largest latency is over 10x the
    smallest. Points without a score or latency are left out; raises ``ValueError`` if none is left."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    kept = [dict(p) for p in points if _valid(p)]
    if not kept:
        raise ValueError("score_latency_png needs at least one point with a score and a positive latency")
    front = pareto_front(kept, greater_is_better)
    on_front = set(front)
    fig = _new_figure(8.0, 5.4)
    ax = fig.subplots()
    latencies = [p["latency_ms"] for p in kept]
    log_x = max(latencies) > 10 * min(latencies)
    if log_x:
        ax.set_xscale("log")
    for i, p in enumerate(kept):
        low, high = p.get("low_ms"), p.get("high_ms")
        if _number(low) or _number(high):
            below = p["latency_ms"] - low if _number(low) else 0.0
            above = high - p["latency_ms"] if _number(high) else 0.0
            ax.errorbar(p["latency_ms"], p["score"], xerr=[[max(below, 0.0)], [max(above, 0.0)]], fmt="none",
                        ecolor="gray", elinewidth=1, capsize=3, zorder=1)
        if _number(p.get("score_low")) and _number(p.get("score_high")):
            spread = [[p["score"] - p["score_low"]], [p["score_high"] - p["score"]]]
            ax.errorbar(p["latency_ms"], p["score"], yerr=spread, fmt="none", ecolor="gray", elinewidth=1,
                        capsize=3, zorder=1)
        ax.scatter(p["latency_ms"], p["score"], marker="*" if i in on_front else "o",
                   s=140 if i in on_front else 45, color="C3" if i in on_front else "C0",
                   edgecolor="black", linewidth=0.5, zorder=3)
    if len(front) > 1:
        ax.step([kept[i]["latency_ms"] for i in front], [kept[i]["score"] for i in front], where="post",
                color="C3", linewidth=1.2, linestyle="--", zorder=2, label="Pareto front")
    else:
        ax.plot([], [], color="C3", linestyle="--", label="Pareto front")
    ax.scatter([], [], marker="*", s=140, color="C3", edgecolor="black", linewidth=0.5, label="on the front")
    ax.scatter([], [], marker="o", s=45, color="C0", edgecolor="black", linewidth=0.5, label="dominated")
    better = "higher" if greater_is_better else "lower"
    ax.set(xlabel=f"latency at batch size {batch_size} (ms{', log scale' if log_x else ''})",
           ylabel=f"{metric} ({better} is better)", title=f"{metric} vs latency (batch size {batch_size})")
    if log_x:  # numbers at 1-2-5 steps read better than powers of ten
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both" if log_x else "major", alpha=0.3)
    ax.margins(x=0.12, y=0.1)
    fig.legend(loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    _place_labels(fig, ax, kept)
    return _png(fig)


# --------------------------------------------------------------------------- studies


def score_by_axis_png(series: Mapping[str, Sequence[tuple[float, float, float | None]]], axis: str,
                      metric: str) -> bytes:
    """A study's score against one numeric axis as PNG bytes: per row, ``(x, mean, half-width of the 95%
    interval or None)`` points joined by a line with error bars. Raises ``ValueError`` with no point."""
    if not any(series.values()):
        raise ValueError("score_by_axis_png needs at least one point")
    fig = _new_figure(7.5, 4.6)
    ax = fig.subplots()
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points)
        xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
        errors = [h if _number(h) else 0.0 for _, _, h in points]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=f"C{i % 10}", label=name)
    xs = sorted({x for points in series.values() for x, _, _ in points})
    if len(xs) > 1 and xs[0] > 0 and xs[-1] > 10 * xs[0]:
        ax.set_xscale("log")
    ax.set(xlabel=axis, ylabel=f"{metric} (mean over seeds, 95% interval)", title=f"{metric} by {axis}")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(4, len(series)), fontsize="small", frameon=False)
    return _png(fig)
