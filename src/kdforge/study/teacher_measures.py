"""Does the similarity information of a teacher's responses predict how well it teaches, better than its score?

Vats & Crandall (2021, arXiv:2112.10047) argue that the best-teaching teacher is not the best-scoring
one, and that the similarity information in its responses decides. Each run's summary holds its
teacher's score and measures (:mod:`kdforge.evaluation.similarity`: ``non_target_entropy``,
``confusion_rank_correlation``). The runs are grouped into *families* that differ in their teacher only
(the same job once the ``teacher``/``teachers`` sections, the seed and the output folder are set aside);
in a family with two or more distinct teachers, with s_k the student's mean score over seeds under
teacher k, a_k the teacher's score and m_k a measure:

* rho_score = Spearman(s, a) and rho_m = Spearman(s, m) across the n teachers;
* "the measure predicts the student's score better than the teacher's score" is decided by the paired
  bootstrap over teachers of d = |rho_m| - |rho_score| (``RESAMPLES`` resamples of the n teachers with
  replacement, fixed seed; resamples where a correlation is undefined are dropped), its 2.5-97.5
  percentile interval read by :func:`kdforge.study.stats.verdict`; with fewer than ``MIN_TEACHERS``
  teachers it is undecided (a rank correlation over 4 points cannot exclude 0 at the 5% level).
  |rho| is compared: a measure that predicts in either direction predicts.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
from scipy import stats

from kdforge.study.stats import UNDECIDED, Interval, verdict

MEASURES = {"non_target_entropy": "non-target entropy", "confusion_rank_correlation": "confusion rank correlation"}
MIN_TEACHERS = 5
RESAMPLES = 2000


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation, or None for fewer than 3 points or a constant side."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def compare(points: list[dict[str, Any]], measure: str) -> dict[str, Any]:
    """rho_score, rho_measure, n, the bootstrap interval of d and the verdict for ``points`` (one per teacher:
    ``student``, ``score`` and the measure; those without the measure are left out)."""
    used = [p for p in points if p.get(measure) is not None and p.get("score") is not None]
    n = len(used)
    student = [p["student"] for p in used]
    rho_score = spearman(student, [p["score"] for p in used])
    rho_measure = spearman(student, [p[measure] for p in used])
    record = {"measure": measure, "n": n, "rho_score": rho_score, "rho_measure": rho_measure, "low": None,
              "high": None, "verdict": UNDECIDED,
              "why": f"{n} teachers; at least {MIN_TEACHERS} are needed" if n < MIN_TEACHERS else ""}
    if n < MIN_TEACHERS or rho_score is None or rho_measure is None:
        if not record["why"]:
            record["why"] = "a correlation is undefined (a constant score or measure)"
        return record
    rng = np.random.default_rng(0)
    differences = []
    for _ in range(RESAMPLES):
        pick = [used[i] for i in rng.integers(0, n, n)]
        s = [p["student"] for p in pick]
        a, m = spearman(s, [p["score"] for p in pick]), spearman(s, [p[measure] for p in pick])
        if a is not None and m is not None:
            differences.append(abs(m) - abs(a))
    if len(differences) < RESAMPLES // 2:
        record["why"] = f"only {len(differences)} of {RESAMPLES} resamples give both correlations"
        return record
    low, high = np.percentile(differences, [2.5, 97.5])
    d = abs(rho_measure) - abs(rho_score)
    record.update(low=float(low), high=float(high), verdict=verdict(Interval(d, None, float(low), float(high), n)))
    return record


def family_key(tree: dict[str, Any]) -> str:
    """The job with its teachers, seed and output folder set aside: runs with one key differ in the teacher."""
    job = copy.deepcopy(tree)
    for key in ("teacher", "teachers", "output_dir"):
        job.pop(key, None)
    job.get("train", {}).pop("seed", None)
    return json.dumps(job, sort_keys=True, default=str)


def families(cells: dict[tuple[str, str], dict[int, dict]], specs: dict, metric: str) -> list[dict[str, Any]]:
    """Each family with 2+ teachers: its label and one point per teacher (``teacher``, ``student`` = the mean
    over seeds and cells, ``score``, the measures)."""
    groups: dict[str, dict[str, Any]] = {}
    for (point, row), cell in cells.items():
        scores = [s["student"][metric] for s in cell.values() if s["student"].get(metric) is not None]
        if not scores:
            continue
        first = next(iter(cell.values()))
        group = groups.setdefault(family_key(specs[(point, row)].config().model_dump(mode="json")),
                                  {"rows": [], "points": [], "teachers": {}})
        group["rows"].append(row)
        group["points"].append(point)
        entry = group["teachers"].setdefault(first["teacher_id"], {
            "teacher": first["teacher_id"], "score": first["teacher"].get(metric), "students": [],
            **{m: first["teacher"].get(m) for m in MEASURES}})
        entry["students"].append(sum(scores) / len(scores))
    out = []
    for group in groups.values():
        if len(group["teachers"]) < 2:
            continue
        rows = list(dict.fromkeys(group["rows"]))
        points = set(group["points"])
        label = ", ".join(rows) + (f" at {next(iter(points))}" if len(points) == 1 and next(iter(points)) else "")
        teachers = [{**{k: v for k, v in t.items() if k != "students"},
                     "student": sum(t["students"]) / len(t["students"])} for t in group["teachers"].values()]
        out.append({"family": label, "teachers": teachers})
    return out


def predictor_records(cells: dict[tuple[str, str], dict[int, dict]], specs: dict, metric: str) -> list[dict]:
    """For every family with 2+ teachers and every measure some of them have (none with two classes):
    :func:`compare`, labelled by the family."""
    return [{"family": f["family"], "teachers": len(f["teachers"]), **compare(f["teachers"], measure)}
            for f in families(cells, specs, metric) for measure in MEASURES
            if any(t.get(measure) is not None for t in f["teachers"])]
