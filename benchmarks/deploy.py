"""Deployment benchmark: the demo's teacher and students in every exported form, timed interleaved.

The demo's teacher (all-MiniLM-L6-v2 fine-tuned on a fixed 4,000-row SST-2 sample, 2 epochs) is
fine-tuned once (``runs/bench-deploy/teacher``, reused when its fingerprint matches). Students, each
distilled exactly like the demo's (0.5 CE + 0.5 Hinton KD at T 4, 3 epochs), with ``export.onnx`` and
``export.int8``:

    demo student   teacher layers [0, 5] (the demo)
    1 layer [0]    teacher layer 0
    1 layer [5]    teacher layer 5

(the 1-layer students were chosen before any was measured, as the next step down in depth; both are
shown). For each student run the report measures, on the full SST-2 dev set (872 rows): accuracy,
ECE, size on disk, and latency at batch 1 and 32 (sequence length 64, torch and onnxruntime with 2
threads, 30 interleaved rounds after 3 warm-up calls) of teacher fp32 (PyTorch), teacher ONNX fp32,
student fp32 (PyTorch), student ONNX fp32 and student ONNX int8 (onnxruntime dynamic quantization),
with each speedup over the teacher's PyTorch fp32 (ratio of medians, 95% paired-bootstrap interval).

The issue's target: an int8 student that keeps >= 95% of the teacher's SST-2 dev accuracy at >= 6x
the teacher's fp32 PyTorch speed at batch 32. Resumable run by run (finished runs are read back):

    .venv/bin/python benchmarks/deploy.py                 # everything (about 20 min on 2 idle cores)
    .venv/bin/python benchmarks/deploy.py --report-only   # rewrite the table from the finished runs
    .venv/bin/python benchmarks/deploy.py --remeasure     # re-time every form of the finished runs now
                                                          # (`kdforge bench-latency`, on a quiet machine)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from kdforge import jobs
from kdforge.cli import demo_config_path
from kdforge.config import load_config, validate_config
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.roles.teachers import load_teacher
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"
TEACHER_RUN = Path("runs/bench-deploy")
OUT = Path("runs/bench-deploy-students")
STUDENTS = {"demo student [0, 5]": [0, 5], "1 layer [0]": [0], "1 layer [5]": [5]}
EVAL = {"latency_batch_sizes": [1, 32], "latency_seq_len": 64, "latency_repeats": 30, "latency_warmup": 3,
        "threads": 2}
TARGET_RETENTION, TARGET_SPEEDUP = 95.0, 6.0
FORMS = ("teacher", "teacher onnx fp32", "student", "student onnx fp32", "student onnx int8")


def teacher_folder() -> Path:
    """The demo's fine-tuned teacher (fine-tuned now unless a matching one is in TEACHER_RUN)."""
    config = load_config(demo_config_path(), [f"output_dir={TEACHER_RUN}"])
    load_teacher(config, build_task(config.task))
    return TEACHER_RUN / "teacher" / "model"


def student_run(name: str, layers: list[int], teacher: Path) -> dict:
    tree = load_config(demo_config_path()).model_dump()
    tree.update(teacher={"model": str(teacher)}, student={"layers": layers}, eval=EVAL,
                export={"onnx": True, "int8": True}, output_dir=str(OUT / "-".join(map(str, layers))))
    tree["train"]["log_every"] = 1000
    result = jobs.run_distill(validate_config(tree), resume=True)
    return json.loads((result.run_dir / "metrics.json").read_text())


def remeasure(name: str, saved: dict) -> dict:
    """The run's latencies timed again now (``kdforge bench-latency``): scores stay, timings are replaced."""
    folder, _ = jobs.run_bench_latency(OUT / "-".join(map(str, STUDENTS[name])))
    timing = json.loads((folder / "latency.json").read_text())
    for form, report in (("teacher", saved["teacher"]), ("student", saved["student"]), *saved["exports"].items()):
        report["latency"] = {**timing["models"][form], "interleaved": True}
    saved["latency"] = {k: v for k, v in timing.items() if k not in ("models", "provenance")}
    saved["latency"]["measured"] = timing["provenance"]["date"]
    return saved


def rows_of(name: str, saved: dict) -> list[list[str]]:
    forms = {"teacher": saved["teacher"], "student": saved["student"], **saved["exports"]}
    speedup = saved["latency"]["speedup"]
    teacher_acc = saved["teacher"]["metrics"]["accuracy"]
    rows = []
    for form in FORMS:
        r = forms[form]
        b1, b32 = (r["latency"]["batch_sizes"][bs] for bs in ("1", "32"))

        def cell(bs: str, form: str = form) -> str:
            s = speedup.get(form, {}).get(bs)
            return "1.00x (ref.)" if s is None else f"{s['ratio']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]"

        rows.append([name if form == "teacher" else "", form, f"{r['metrics']['accuracy']:.4f}",
                     f"{100 * r['metrics']['accuracy'] / teacher_acc:.1f}%", f"{r['ece']:.4f}", f"{r['size_mb']:.1f}",
                     f"{b1['median_ms']:.2f}", cell("1"), f"{b32['median_ms']:.1f}", f"{b32['p90_ms']:.1f}",
                     cell("32")])
    return rows


def verdict(name: str, saved: dict) -> str:
    int8 = saved["exports"]["student onnx int8"]
    retention = 100 * int8["metrics"]["accuracy"] / saved["teacher"]["metrics"]["accuracy"]
    s = saved["latency"]["speedup"]["student onnx int8"]["32"]
    met = retention >= TARGET_RETENTION and s["ratio"] >= TARGET_SPEEDUP
    return (f"{name}: int8 keeps {retention:.1f}% of the teacher's accuracy at {s['ratio']:.2f}x "
            f"[{s['low']:.2f}-{s['high']:.2f}] its batch-32 speed: target {'met' if met else 'not met'}.")


def write_table(results: dict[str, dict]) -> Path:
    headers = ["student", "form", "accuracy", "retention", "ECE", "MB", "b1 ms", "b1 speedup [95% CI]", "b32 ms",
               "b32 p90 ms", "b32 speedup [95% CI]"]
    lines = ["# Deployment: the demo's teacher and students in every form (SST-2 dev, 872 rows)", "",
             "Generated by `benchmarks/deploy.py` (see its docstring for the protocol). Latency: median ms, "
             "sequence length 64, 2 threads, 30 interleaved rounds; speedup = teacher PyTorch fp32 median / "
             "form median, 95% paired-bootstrap interval over rounds. Each student's forms were measured together "
             "with the teacher in one process.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, saved in results.items():
        lines += ["| " + " | ".join(row) + " |" for row in rows_of(name, saved)]
    lines += ["", "## Target (int8 student >= 95% of the teacher's accuracy at >= 6x its fp32 speed, batch 32)", ""]
    lines += [f"- {verdict(name, saved)}" for name, saved in results.items()]
    lines += ["", "## What the table says", ""]
    for name, saved in results.items():
        speed = saved["latency"]["speedup"]
        pt, ort32, ort8 = (speed[f]["32"]["ratio"] for f in ("student", "student onnx fp32", "student onnx int8"))
        lines.append(f"- {name}: at batch 32 onnxruntime fp32 runs the student at {ort32 / pt:.2f}x PyTorch's "
                     f"speed and int8 at {ort8 / ort32:.2f}x onnxruntime fp32's (the teacher in ONNX fp32: "
                     f"{speed['teacher onnx fp32']['32']['ratio']:.2f}x its PyTorch speed).")
    noisy = [f"{name}: {'; '.join(saved['latency']['noisy_reasons'])}" for name, saved in results.items()
             if saved["latency"]["noisy"]]
    lines += ["", "Measurement noise flagged: " + (" / ".join(noisy) if noisy else "none (load and spread below the "
                                                     "thresholds during every measurement).")]
    dates = sorted({saved["latency"].get("measured", saved["provenance"]["date"]) for saved in results.values()})
    lines += ["", f"Latency measured: {', '.join(dates)}."]
    cpu = next(iter(results.values()))["provenance"]["cpu"] if results else "?"
    lines += ["", f"Machine: {cpu}, {next(iter(results.values()))['provenance']['logical_cpus']} logical CPUs."]
    return atomic_write_text(RESULTS / "deploy.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--remeasure", action="store_true", help="re-time the finished runs' forms now")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    json_path = RESULTS / "deploy.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.remeasure:
        for name in results:
            results[name] = remeasure(name, results[name])
            atomic_write_json(json_path, results)
    elif not args.report_only:
        teacher = teacher_folder()
        for name, layers in STUDENTS.items():
            if name not in results:
                results[name] = student_run(name, layers, teacher)
                atomic_write_json(json_path, results)
    print(write_table(results).read_text())


if __name__ == "__main__":
    main()
