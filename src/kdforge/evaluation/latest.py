"""A run's newest measurements: its training-time results with every later measurement laid over them.

After training, ``kdforge eval`` / ``kdforge export`` write a new evaluation (``evaluations/<date>/metrics.json``)
and ``kdforge bench-latency`` a new latency measurement (``latency/<date>/latency.json``); the run's own
``metrics.json`` is never changed. :func:`latest_measurements` starts from the run's own results and applies the
finished later measurements, oldest first:

* an evaluation replaces every deployment form it measured (the teacher, the student, each ONNX form: score,
  size and latency), and the baseline, warnings and reported split that go with its scores;
* a latency measurement replaces the latency of every form it timed that has a score.

So each form shows its newest score and its newest latency; ``measured`` says, per form, where (a folder
inside the run, or the training run) and when its score and its latency were measured, and on which CPU.
A form's speedup is the one of the measurement that timed it (paired with the reference timed in the same
rounds), and the noise flag covers every measurement a latency comes from. An evaluation killed before its
``metrics.json``, or a latency measurement before its ``latency.json``, is not used.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kdforge.evaluation.model_report import ModelReport, comparison_summary
from kdforge.io import read_json
from kdforge.run_folder import RunFolder

#: where the results written by the training run itself come from
THE_RUN = "the training run"
#: what an evaluation brings besides its forms: what goes with its scores (``int8``: how its int8 file was made)
WITH_SCORES = ("baseline", "warnings", "reported_on", "int8")


def deployment_forms(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The teacher, the student and their exported forms of a ``metrics.json`` (or of :func:`latest_measurements`),
    by name: ``{"teacher": report, "student": report, "student onnx int8": report, ...}``."""
    exports = metrics.get("exports") or {}
    return {"teacher": metrics["teacher"], "student": metrics["student"],
            **{name: report for name, report in exports.items() if isinstance(report, dict)}}


def _source(where: str, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """Where and when something was measured, and the machine's CPU."""
    provenance = provenance or {}
    return {"where": where, "date": provenance.get("date"), "cpu": provenance.get("cpu"),
            "logical_cpus": provenance.get("logical_cpus")}


def describe_source(source: dict[str, Any]) -> str:
    """``"evaluations/2025-06-01T10-00-00Z (2025-06-01T10:00:04+00:00)"``."""
    return f"{source['where']} ({source['date']})" if source.get("date") else str(source["where"])


def describe_cpu(source: dict[str, Any], threads: int | None = None) -> str | None:
    """``"Intel Xeon ... (2 logical CPUs), 1 torch thread"`` from a source's (or a provenance's) CPU fields."""
    if not source.get("cpu"):
        return None
    text = f"{source['cpu']} ({source.get('logical_cpus')} logical CPUs)"
    return text if threads is None else f"{text}, {threads} torch thread{'s' if threads != 1 else ''}"


class _Merge:
    """The newest numbers so far, with each form's sources and the measurement that timed it."""

    def __init__(self, saved: dict[str, Any]):
        self.latest = copy.deepcopy(saved)
        self.latest["exports"] = dict(self.latest.get("exports") or {})
        own = _source(THE_RUN, saved.get("provenance"))
        timing = saved.get("latency") or {}
        self.measured = {name: {"score": own, "latency": own} for name in deployment_forms(self.latest)}
        self.timed_by = {name: (THE_RUN, timing) for name in self.measured}
        self.applied: list[str] = []

    def _set_form(self, name: str, report: dict[str, Any]) -> None:
        if name in ("teacher", "student"):
            self.latest[name] = report
        else:
            self.latest["exports"][name] = report

    def evaluation(self, where: str, metrics: dict[str, Any]) -> None:
        """Every form of a later evaluation, with its scores' baseline, warnings and reported split."""
        source, timing = _source(where, metrics.get("provenance")), metrics.get("latency") or {}
        for name, report in deployment_forms(metrics).items():
            self._set_form(name, report)
            self.measured[name] = {"score": source, "latency": source}
            self.timed_by[name] = (where, timing)
        self.latest.update({key: metrics[key] for key in WITH_SCORES if key in metrics})
        self.applied.append(where)

    def latency(self, where: str, measured: dict[str, Any]) -> None:
        """The latency of every scored form a later ``kdforge bench-latency`` timed."""
        source = _source(where, measured.get("provenance"))
        timing = {key: value for key, value in measured.items() if key not in ("models", "provenance")}
        forms = deployment_forms(self.latest)
        timed = [name for name in measured.get("models", {}) if name in forms]
        for name in timed:
            forms[name]["latency"] = measured["models"][name]
            self.measured[name]["latency"] = source
            self.timed_by[name] = (where, timing)
        if timed:
            self.latest["latency_from"] = where
            self.applied.append(where)

    def result(self) -> dict[str, Any]:
        """The merged results (see :func:`latest_measurements`)."""
        latest, sources = self.latest, {where for where, _ in self.timed_by.values()}
        speedup = {name: timing["speedup"][name] for name, (_, timing) in self.timed_by.items()
                   if name in (timing.get("speedup") or {})}
        reasons = []
        for where, timing in dict(self.timed_by.values()).items():
            tag = f" ({where})" if len(sources) > 1 else ""
            if timing.get("noisy"):
                reasons += [f"{reason}{tag}" for reason in timing.get("noisy_reasons") or ["unstable timings"]]
        reference = self.timed_by["teacher"][1].get("reference") or (latest.get("latency") or {}).get("reference")
        latest["latency"] = {"reference": reference, "speedup": speedup, "noisy": bool(reasons),
                             "noisy_reasons": list(dict.fromkeys(reasons))}
        teacher, student = ModelReport.from_dict(latest["teacher"]), ModelReport.from_dict(latest["student"])
        latest["comparison"] = comparison_summary(teacher, student)
        latest["measured"] = self.measured
        latest["measured_again"] = self.applied
        return latest


def latest_measurements(saved: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """A copy of ``saved`` (the run's own ``metrics.json``) with each deployment form's newest score and latency
    (module docstring), plus ``measured`` (per form: ``{"score": source, "latency": source}``, each source
    ``{"where", "date", "cpu", "logical_cpus"}``), ``measured_again`` (the folders applied, oldest first; empty
    when nothing was measured after training) and ``latency_from`` (the newest bench-latency folder used)."""
    run = RunFolder(run_dir)
    merge = _Merge(saved)
    for results in run.remeasurements():
        where = results.root.relative_to(run.root).as_posix()
        fix = f"delete {results.root} (a later measurement of the run) or measure again"
        if results.finished:
            merge.evaluation(where, read_json(results.metrics, fix))
        else:
            merge.latency(where, read_json(results.latency_json, fix))
    return merge.result()


def measured_lines(latest: dict[str, Any]) -> list[str]:
    """Where each form's numbers come from, one line per group of forms measured alike, e.g.
    ``"teacher, student: score evaluations/... (date); latency latency/... (date) on Intel Xeon (2 CPUs)"``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, sources in latest.get("measured", {}).items():
        cpu = describe_cpu(sources["latency"])
        key = (describe_source(sources["score"]), describe_source(sources["latency"]) + (f" on {cpu}" if cpu else ""))
        groups.setdefault(key, []).append(name)
    return [f"{', '.join(names)}: score from {score}; latency from {latency}"
            for (score, latency), names in groups.items()]
