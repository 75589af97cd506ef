"""The student worth shipping (issue 20): the targets table of a shipping study (configs/studies/sst2-ship.yaml,
mrpc-ship.yaml).

Scores come from each finished run's report (dev set, the best epoch chosen on the held-out validation split;
seed 0). Latency: the teacher's PyTorch and ONNX fp32 forms and every student form of every finished run
(PyTorch, ONNX fp32, ONNX int8) loaded into one process and timed *together*, interleaved (batch 1 and 32, the
study's sequence length, 30 rounds, 1 thread), so every ratio in the table comes from the same rounds. The
reference is the teacher's *fastest* fp32 form (picked on 5 rounds of the teacher forms alone, then measured
with the others): a user who ships exports the teacher too. The speedup over the teacher in PyTorch stands
beside it. Targets (issue 20): >= 97% retention at >= 3x in fp32, >= 95% at >= 6x in ONNX int8 (moonshot:
>= 97% at >= 8x), each read off the interval's low end ("met"), its point estimate only ("undecided") or
neither ("missed").

    .venv/bin/python benchmarks/ship.py configs/studies/sst2-ship.yaml   # writes benchmarks/results/sst2-ship.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdforge.config import STUDENT
from kdforge.evaluation.latency import interleaved_latency
from kdforge.evaluation.run_report import build_forms
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.roles.base import primary_teacher
from kdforge.roles.loading import load_run_models
from kdforge.run_folder import RunFolder
from kdforge.study.config import load_study
from kdforge.study.grid import expand
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"
TEACHER_FORMS = ("teacher", "teacher onnx fp32")
TARGETS = [("fp32: >= 97% at >= 3x", ("student", "student onnx fp32"), 97.0, 3.0),
           ("int8: >= 95% at >= 6x", ("student onnx int8",), 95.0, 6.0),
           ("moonshot: >= 97% at >= 8x", ("student", "student onnx fp32", "student onnx int8"), 97.0, 8.0)]


def finished_runs(study_path: str) -> dict[str, RunFolder]:
    """Row -> the finished seed-0 run of each row (the rows run so far)."""
    study, base = load_study(study_path)
    runs = {}
    for spec in expand(study, base):
        run = RunFolder(spec.tree["output_dir"])
        if spec.seed == study.seeds[0] and run.finished:
            runs[spec.row] = run
    return runs


def forms_of(runs: dict[str, RunFolder]) -> tuple[dict, dict[str, dict]]:
    """Every form to time ({name: Form}, the teacher's from the first run) and each student form's report."""
    forms, reports = {}, {}
    for i, (row, run) in enumerate(runs.items()):
        config = RunFolder.open_finished(run.root)[0]
        task = build_task(config.task)
        models = load_run_models(config, run, task)
        saved = json.loads(run.metrics.read_text())
        scored = {"teacher": saved["teacher"], "student": saved["student"], **saved.get("exports", {})}
        for form in build_forms(config, task, models, primary_teacher(config), run.existing_onnx_files()):
            if form.name in TEACHER_FORMS and i == 0:
                forms[form.name], reports[form.name] = form, scored[form.name]
            elif form.name == STUDENT or form.name.startswith(f"{STUDENT} onnx"):
                forms[f"{row}: {form.name}"], reports[f"{row}: {form.name}"] = form, {**scored[form.name],
                                                                                      "form": form.name}
    return forms, reports


def measure(forms: dict) -> dict:
    """The interleaved measurement, its reference the faster teacher fp32 form (5 rounds of the teachers)."""
    teachers = {n: forms[n].forward for n in TEACHER_FORMS if n in forms}
    first = interleaved_latency(teachers, [32], 2, 5, 1)
    fastest = min(teachers, key=lambda n: first["models"][n]["batch_sizes"]["32"]["median_ms"])
    timing = interleaved_latency({n: f.forward for n, f in forms.items()}, [1, 32], 3, 30, 1, reference=fastest)
    return {**timing, "pytorch_speedup": interleaved_speedups(timing, "teacher")}


def interleaved_speedups(timing: dict, reference: str) -> dict[str, float]:
    """Point speedups at b32 over another form of the same rounds (median over median)."""
    ref = timing["models"][reference]["batch_sizes"]["32"]["median_ms"]
    return {n: ref / m["batch_sizes"]["32"]["median_ms"] for n, m in timing["models"].items()}


def verdict(retention: float, speed: dict, target_retention: float, target_speed: float) -> str:
    if retention < target_retention or speed["ratio"] < target_speed:
        return "missed"
    return "met" if speed["low"] >= target_speed else "undecided"


def table(study_path: str, reports: dict[str, dict], timing: dict) -> str:
    teacher = reports["teacher"]
    metric = teacher["main_metric"]
    t_score = teacher["metrics"][metric]
    lines = [f"# Shipping students: {Path(study_path).stem}", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Reference: {timing['reference']} (the teacher's fastest fp32 form here). CPU threads 1; noisy: "
             f"{'yes: ' + '; '.join(timing['noisy_reasons']) if timing['noisy'] else 'no'}.", "",
             f"| form | {metric} | retention | ECE | MB | b1 ms | b32 ms | b32 speedup [95%] | over PyTorch teacher |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for name, report in reports.items():
        score, ms = report["metrics"][metric], timing["models"][name]["batch_sizes"]
        speed = timing["speedup"].get(name, {}).get("32")
        cell = f"{speed['ratio']:.2f}x [{speed['low']:.2f}-{speed['high']:.2f}]" if speed else "reference"
        retention = 100 * score / t_score
        lines.append(f"| {name} | {score:.4f} | {retention:.1f}% | {report['ece'] or 0:.4f} | {report['size_mb']:.1f} "
                     f"| {ms['1']['median_ms']:.2f} | {ms['32']['median_ms']:.1f} | {cell} | "
                     f"{timing['pytorch_speedup'][name]:.2f}x |")
        for label, kinds, want_retention, want_speed in TARGETS:
            if speed and report.get("form") in kinds:
                verdicts.append((label, name, verdict(retention, speed, want_retention, want_speed)))
    lines += ["", "## Targets", "", "| target | form | verdict |", "|---|---|---|",
              *(f"| {label} | {name} | {v} |" for label, name, v in verdicts)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = finished_runs(args.study)
    if not runs:
        raise SystemExit(f"no finished run of {args.study} yet: run `kdforge study {args.study}` first")
    forms, reports = forms_of(runs)
    timing = measure(forms)
    stem = Path(args.study).stem
    atomic_write_json(RESULTS / f"{stem}.json", {"reports": reports, "timing": timing})
    atomic_write_text(RESULTS / f"{stem}.md", table(args.study, reports, timing))
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
