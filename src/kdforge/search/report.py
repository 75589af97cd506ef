"""The search folder's record: every trial (``trials.json``, ``trials.md``) and ``report.md`` /
``report.html`` with the best students' full runs, the score-latency chart of every candidate with
its Pareto front, and the best reward found after each trial (how fast the method got there)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna

from kdforge.config import JobConfig
from kdforge.evaluation.model_report import NA, ModelReport, finite_number, fmt, latency_ms
from kdforge.evaluation.plots import best_so_far_png, score_latency_png
from kdforge.evaluation.render import render_html, render_markdown
from kdforge.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from kdforge.run_folder import RunFolder
from kdforge.search.predictor import PREDICTED, prediction_track


def rung_counts(records: list[dict[str, Any]], proxy_epochs: int) -> list[tuple[int, int]]:
    """(epochs, finished candidates that were scored after that many epochs) at each rung of successive
    halving with reduction factor 2: 1, 2, 4, ... epochs up to ``proxy_epochs`` (the last rung: complete)."""
    rungs = [2 ** i for i in range(proxy_epochs.bit_length()) if 2 ** i <= proxy_epochs]
    if rungs[-1] != proxy_epochs:
        rungs.append(proxy_epochs)
    done = [r for r in records if r["state"] in ("COMPLETE", "PRUNED")]
    return [(e, sum(1 for r in done if r["epochs"] >= e)) for e in rungs]


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    """One JSON-ready record per trial: number, state, sampled choices, and what the trial measured."""
    records = []
    for t in study.get_trials(deepcopy=False):
        records.append({"number": t.number, "state": t.state.name, "choices": dict(t.params),
                        "values": list(t.values) if t.values else None,
                        "seconds": t.duration.total_seconds() if t.duration else None,
                        "epochs": len(t.intermediate_values), "retry_of": t.system_attrs.get("failed_trial"),
                        "predicted": t.system_attrs.get(PREDICTED), **t.user_attrs})
    return records


def describe(choices: dict[str, Any]) -> str:
    short = {"layers": "L", "hidden_size": "H", "head_dim": "d", "intermediate_size": "F", "hidden_act": "act",
             "blocks": "n", "width": "w", "temperature": "T", "kd_weight": "a"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in choices.items())


def best_so_far(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(trial number, the best reward of the complete trials up to it)."""
    best, curve = -math.inf, []
    for r in sorted(records, key=lambda r: r["number"]):
        if r["state"] == "COMPLETE" and finite_number(r.get("reward")):
            best = max(best, r["reward"])
        if best > -math.inf:
            curve.append((r["number"], best))
    return curve


def final_rows(best: list[dict[str, Any]], records: dict[int, dict[str, Any]], metric: str) -> list[list[str]]:
    rows = []
    for b in best:
        teacher, student = ModelReport.from_dict(b["teacher"]), ModelReport.from_dict(b["student"])
        t_score, s_score = teacher.metrics.get(metric), student.metrics.get(metric)
        speedups = []
        for bs in (1, 32):
            t_ms, s_ms = latency_ms(teacher, bs), latency_ms(student, bs)
            speedups.append(f"{t_ms / s_ms:.2f}x" if finite_number(t_ms) and finite_number(s_ms) and s_ms else NA)
        record = records.get(b["trial"], {})
        rows.append([str(b["rank"]), f"#{b['trial']}", describe(record.get("choices", {})),
                     fmt(record.get("score"), 4), fmt(s_score, 4), fmt(b.get("validation"), 4),
                     fmt(100 * s_score / t_score, 1, "%") if finite_number(s_score) and t_score else NA,
                     *speedups, f"{student.params / 1e6:.2f}M", b["command"]])
    return rows


def trial_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    return [[f"#{r['number']}", r["state"].lower() + (f" (rerun of #{r['retry_of']})" if r.get("retry_of") is not None
                                                      else ""), describe(r["choices"]),
             f"{r['params'] / 1e6:.2f}M" if finite_number(r.get("params")) else NA, fmt(r.get("latency_ms"), 1),
             fmt(r.get("latency_ratio"), 3), fmt(r.get("score"), 4), fmt(r.get("reward"), 4), str(r.get("epochs", "")),
             fmt(r.get("seconds"), 0)] for r in sorted(records, key=lambda r: r["number"])]


TRIAL_HEADERS = ["trial", "state", "candidate", "params", "latency ms", "/ teacher", "proxy score", "reward",
                 "epochs", "s"]


def final_validation(run_dir: str, metric: str, greater_is_better: bool) -> float | None:
    """The final run's best validation score (the split carved from training, held out from it)."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return None
    values = [h[metric] for h in read_json(path, "").get("history", []) if finite_number(h.get(metric))]
    return (max(values) if greater_is_better else min(values)) if values else None


def write_search_report(folder: Path, config: JobConfig, study: optuna.Study, records: list[dict[str, Any]],
                        best: list[dict[str, Any]], task) -> str:
    """Write trials.json / trials.md / report.md / report.html (and the charts) into ``folder``;
    returns the Markdown of the final students (or of the trials when there are none)."""
    search, metric = config.search, task.main_metric
    for b in best:
        b["validation"] = final_validation(b["run_dir"], metric, task.greater_is_better)
    track = prediction_track(records)
    atomic_write_json(folder / "trials.json", {"study": study.study_name, "method": search.method,
                                               "objective": search.objective, "trials": records, "best": best,
                                               "predictions": track})
    complete = [r for r in records if r["state"] == "COMPLETE" and finite_number(r.get("score"))]
    counts = {s: sum(1 for r in records if r["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    bs = search.latency_batch_size or max(config.eval.latency_batch_sizes)
    teacher_ms = [r["teacher_latency_ms"] for r in complete if finite_number(r.get("teacher_latency_ms"))]
    blocks: list = [
        ("h1", f"Architecture search {study.study_name}"),
        ("p", f"Method {search.method}, objective {search.objective} (reward = {metric} x (latency / "
              f"target)^{search.reward_weight}, target = the teacher's latency / {search.target_speedup}). "
              f"Trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
              f"{counts['RUNNING']} running. Each candidate distilled {search.proxy_epochs} epoch(s) on "
              f"{search.proxy_rows} training rows, scored on the validation split; latency of its "
              f"{'ONNX int8 export' if search.latency_form == 'onnx_int8' else 'PyTorch fp32 form'} at batch size "
              f"{bs}, interleaved with the teacher's PyTorch fp32"
              + (f" (teacher median {sorted(teacher_ms)[len(teacher_ms) // 2]:.1f} ms)." if teacher_ms else ".")),
    ]
    if track:
        rho = next((t["spearman"] for t in reversed(track) if t["spearman"] is not None), None)
        series = ", ".join(f"#{t['trial']} {t['spearman']:+.2f}" for t in track if t["spearman"] is not None)
        blocks.append(("p", f"KD-NAS predictor: {len(track)} candidate(s) chosen as the predicted best of a pool; "
                            "Spearman rank correlation of their predicted and measured rewards "
                            + (f"{rho:+.2f} over all of them (after each episode: {series})." if rho is not None
                               else "not yet defined (fewer than 3 episodes).")))
    if search.method == "autokd" and search.objective == "reward":
        rungs = ", ".join(f"{n} reached {e} epoch(s)" for e, n in rung_counts(records, search.proxy_epochs))
        blocks.append(("p", f"Successive halving (reduction factor 2), candidates per rung: {rungs}."))
    noisy = [r["number"] for r in complete if r.get("latency_noisy")]
    if noisy:
        listed = ", ".join(f"#{n}" for n in noisy[:10]) + (", ..." if len(noisy) > 10 else "")
        blocks.append(("warning", f"latency of {len(noisy)} trial(s) was measured on a busy or noisy machine "
                                  f"({listed}); their ratios to the teacher still hold better than their milliseconds"))
    images: dict[str, bytes] = {}
    if best:
        by_number = {r["number"]: r for r in records}
        blocks += [("h2", "Best students (distilled on the full training set)"),
                   ("table", (["rank", "trial", "candidate", "proxy score", f"dev {metric}", "validation",
                               "retention", "speedup b1", "speedup b32", "params", "reproduce"],
                              final_rows(best, by_number, metric))),
                   ("p", "Each rank's folder holds its full teacher-beside-student report (report.html).")]
    if complete:
        points = [{"name": f"#{r['number']}", "score": r["score"], "latency_ms": r["latency_ms"]} for r in complete]
        images["search-pareto.png"] = score_latency_png(points, f"proxy {metric}", bs, task.greater_is_better)
        blocks += [("h2", "Every candidate: proxy score against latency"),
                   ("image", ("search-pareto.png", images["search-pareto.png"], "score vs latency, Pareto front"))]
    curve = best_so_far(records)
    if curve and search.objective == "reward":
        images["search-progress.png"] = best_so_far_png(curve, f"search progress ({search.method})")
        blocks.append(("image", ("search-progress.png", images["search-progress.png"], "best reward per trial")))
    trials_table = ("table", (TRIAL_HEADERS, trial_rows(records)))
    blocks += [("h2", "Trials"), trials_table]
    for name, png in images.items():
        atomic_write_bytes(folder / name, png)
    atomic_write_text(folder / "trials.md", render_markdown([("h1", f"Trials of {study.study_name}"), trials_table]))
    atomic_write_text(folder / "report.md", render_markdown(blocks))
    atomic_write_text(folder / "report.html", render_html(blocks, f"search {study.study_name}"))
    summary = [b for b in blocks if b[0] == "table"][0]
    return render_markdown([summary])
