"""What a study keeps of a finished run (in its trial, so the report needs only the storage): the
numbers of the student, the teacher and the trivial baseline, flat by name.

Values by name (:func:`values`): every metric of the model's report (accuracy, f1, mcc, pearson, ...),
``ece``, ``sharpness``, ``params``, ``size_mb``, ``latency_b<N>_ms`` (the median at batch size N) and the
similarity information of its responses (``non_target_entropy``, ``confusion_rank_correlation``,
``non_target_mass``: :mod:`kdforge.evaluation.similarity`; absent from reports written before it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.io import read_json


def values(report: dict[str, Any] | None) -> dict[str, float | None]:
    """One model's numbers by name (see the module docstring); {} for no report."""
    if not report:
        return {}
    out: dict[str, float | None] = dict(report.get("metrics") or {})
    out.update(ece=report.get("ece"), sharpness=report.get("sharpness"), params=report.get("params"),
               size_mb=report.get("size_mb"), sharpness_converged=report.get("sharpness_converged"))
    out.update(report.get("similarity") or {})
    for size, entry in ((report.get("latency") or {}).get("batch_sizes") or {}).items():
        out[f"latency_b{size}_ms"] = entry.get("median_ms")
    return out


def run_summary(metrics_path: Path, run, teacher_id: str, greater_is_better: bool) -> dict[str, Any]:
    """The summary of ``run`` (a :class:`~kdforge.study.grid.RunSpec`) from its ``metrics.json``;
    ``teacher_id`` names its primary teacher (the shared folder, or the model as given)."""
    saved = read_json(metrics_path, f"run `kdforge eval {metrics_path.parent}` to write it again")
    student, teacher = saved["student"], saved["teacher"]
    main = student["main_metric"]
    return {"row": run.row, "point": run.point, "seed": run.seed, "run_dir": str(metrics_path.parent),
            "task": saved["task"],
            "main_metric": main, "greater_is_better": greater_is_better, "value": student["metrics"][main],
            "student": values(student), "teacher": values(teacher), "baseline": values(saved.get("baseline")),
            "teacher_id": teacher_id,
            "other_roles": {name: values(r) for name, r in (saved.get("other_roles") or {}).items()}}
