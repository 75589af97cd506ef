"""Student constructions and multi-stage recipes: teacher all-MiniLM-L6-v2, 3-layer students, GLUE
MRPC, RTE and an SST-2 subset, 3 seeds: plain fine-tuning, KD, PKD, TinyBERT two-stage, Pea-KD and
its parts (SPS only, PTP only). Writes benchmarks/results/students.md (and .json).

The teacher of each task is the one of benchmarks/objectives.py (fine-tuned once on a fixed
2,000-row sample, reused through its fingerprint from runs/bench-objectives/), loaded once per task;
every method is a kdforge job config (`stages:` where the method has several) whose stages run
through the job's own stage runner (`kdforge.recipes.stage.run_stage`: data, head, strategy,
teacher source), so this is also an end-to-end test of the recipes; only the export and the
per-run report are skipped.

    .venv/bin/python benchmarks/students.py                                   # the full table
    .venv/bin/python benchmarks/students.py --tasks rte --seeds 1 --rows 64   # a smoke run
    .venv/bin/python benchmarks/students.py --report-only                     # the table from students.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import objectives  # benchmarks/objectives.py: the fine-tuned teachers

from kdforge.config import PRIMARY_TEACHER, STUDENT, validate_config
from kdforge.engine.trainer import seed_everything
from kdforge.evaluation.size import count_parameters
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.models.adapter import ModelAdapter
from kdforge.models.student import build_student
from kdforge.recipes.stage import run_stage
from kdforge.roles.teachers import load_teacher
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"
TASKS = {key: (name, max_length) for key, (name, _, _, max_length) in objectives.TASKS.items()}
LAYERS = [1, 3, 5]
EPOCHS = 2  # of the final stage
GENERAL_SENTENCES = 1000  # TinyBERT's general distillation corpus (GLUE training sentences)
CE, KD = {"name": "ce", "weight": 0.3}, {"name": "hinton_kd", "weight": 0.7, "temperature": 10.0}
PKD = {"name": "pkd", "weight": 100.0}  # Pea-KD's beta on the patience loss
PTP = {"name": "ptp", "data": "ptp", "objectives": [{"name": "ce"}], "train": {"epochs": 1}}


def distill(objectives: list[dict], **stage) -> dict:
    return {"name": "distill", "objectives": objectives, **stage}


METHODS: dict[str, dict] = {
    "fine-tune (no KD)": {"stages": [distill([{"name": "ce"}])]},
    "KD": {"stages": [distill([CE, KD])]},
    "PKD": {"stages": [distill([CE, KD, PKD])]},
    "TinyBERT two-stage": {"stages": [
        {"name": "general", "data": "corpus",
         "objectives": [{"name": "tinybert_hidden"}, {"name": "tinybert_attention"}],
         "corpus": {"glue": ["sst2", "mrpc", "rte", "cola", "stsb"], "limit": GENERAL_SENTENCES, "max_length": 64},
         "train": {"epochs": 1}},
        {"name": "intermediate", "objectives": [{"name": "tinybert_hidden"}, {"name": "tinybert_attention"}],
         "train": {"epochs": 1}},
        distill([{"name": "tinybert_pred"}])]},
    "SPS only (+PKD-style KD)": {"sps": "swap", "stages": [distill([CE, KD, PKD])]},
    "PTP only (+PKD-style KD)": {"stages": [PTP, distill([CE, KD, PKD], head="reinit")]},
    "Pea-KD (SPS + PTP + PKD-style KD)": {"sps": "swap", "stages": [PTP, distill([CE, KD, PKD], head="reinit")]},
}


def fine_tuned_teacher(task_key: str):
    """The task's teacher of benchmarks/objectives.py (fine-tuned now unless its folder holds it
    already): its folder and the loaded model."""
    config = objectives.job_config(task_key, [], 0, Path("runs/bench-objectives"), teacher=True)
    teacher = load_teacher(config, build_task(config.task))
    return str(Path(config.output_dir) / "teacher" / "model"), teacher


def run_recipe(config, task, teacher) -> dict:
    """Every stage of ``config`` (as `kdforge distill` runs them), then the student's dev scores."""
    seed_everything(config.train.seed)
    student = build_student(config.student, teacher, task)
    models = {PRIMARY_TEACHER: teacher, STUDENT: student}
    start = time.perf_counter()
    for index in range(len(config.all_stages())):
        run_stage(config, index, task, models, Path(config.output_dir), resume=False)
    scores = task.evaluate(ModelAdapter(student.model), task.split(task.eval_split), task.collator(student.tokenizer),
                           64)
    return {"metrics": scores.metrics, "ece": scores.ece, "params": count_parameters(student.model),
            "seconds": time.perf_counter() - start}


def job(task_key: str, method: str, seed: int, rows: int, out: Path, teacher: str) -> dict:
    name, max_length = TASKS[task_key]
    spec = METHODS[method]
    return {
        "task": {"name": name, "train_limit": rows, "max_length": max_length},
        "teacher": {"model": teacher},
        "student": {"layers": LAYERS, **({"sps": spec["sps"]} if "sps" in spec else {})},
        "stages": spec["stages"],
        "train": {"epochs": EPOCHS, "batch_size": 32, "lr": 1e-4, "seed": seed, "device": "cpu", "log_every": 1000},
        "teacher_cache": {"hidden_states": [1, 2, 3, 4, 5]},  # PKD's mapped layers (3 and 6 effective layers)
        "output_dir": str(out / task_key),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=600, help="training rows of every task (fixed sample)")
    parser.add_argument("--out", default="runs/bench-students")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table from students.json")
    args = parser.parse_args()
    logging.getLogger("kdforge").setLevel(logging.WARNING)
    json_path = RESULTS / "students.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    for task_key in [] if args.report_only else args.tasks:
        folder, teacher = fine_tuned_teacher(task_key)
        task = build_task(validate_config(job(task_key, "KD", 0, args.rows, Path(args.out), folder)).task)
        dev = task.split(task.eval_split)
        teacher_scores = task.evaluate(ModelAdapter(teacher.model), dev, task.collator(teacher.tokenizer), 64)
        results.setdefault(task_key, {})["__teacher__"] = teacher_scores.metrics
        results[task_key]["__rows__"] = args.rows
        for method in METHODS:
            if len(results[task_key].get(method, [])) == args.seeds:
                continue  # done by an earlier invocation (results are saved method by method)
            runs = []
            for seed in range(args.seeds):
                config = validate_config(job(task_key, method, seed, args.rows, Path(args.out), folder))
                runs.append(run_recipe(config, task, teacher))
                print(f"{task_key} {method} seed {seed}: {runs[-1]['metrics']}", flush=True)
            results[task_key][method] = runs
            atomic_write_json(json_path, results)
    lines = ["# Students and recipes: 3-layer students of all-MiniLM-L6-v2", "",
             "Teacher all-MiniLM-L6-v2 fine-tuned on a fixed 2,000-row sample of each task (the teachers of "
             "benchmarks/objectives.py); students start from teacher layers [1, 3, 5] (SPS: the same 3 layers run "
             "twice, 6 effective layers); every method trains on the same fixed sample of the task's training "
             "rows (its size under each task), "
             f"{EPOCHS} epochs for the final stage (PTP 1 epoch before it; TinyBERT: general distillation 1 epoch "
             f"on {GENERAL_SENTENCES:,} GLUE training sentences, intermediate-layer stage 1 epoch, prediction "
             f"stage {EPOCHS} epochs), batch 32, AdamW lr 1e-4, best epoch by the dev metric; KD terms as in "
             "Pea-KD (0.3 CE + 0.7 KD at T = 10, PKD beta 100); max_length 96 (MRPC, RTE) / 64 (SST-2); "
             f"{args.seeds} seeds (mean ± std); GLUE dev sets; CPU, 2 threads.", "",
             "`seconds / run` is the wall time of all stages and the per-epoch evaluations (the teacher-output "
             "cache is built once per task and shared) on a shared 2-core machine that ran other jobs: a rough "
             "cost.", "",
             "Reproduce: `.venv/bin/python benchmarks/students.py`", ""]
    for task_key, methods in results.items():
        teacher = methods["__teacher__"]
        main_metric = next(iter(teacher))
        lines += [f"### {TASKS[task_key][0]} (teacher {main_metric} {teacher[main_metric]:.4f}; "
                  f"{methods['__rows__']} training rows)", "",
                  f"| method | {main_metric} | ECE | params (M) | seconds / run |", "|---|---|---|---|---|"]
        for method, runs in methods.items():
            if not method.startswith("__"):
                lines.append(f"| {method} | {objectives.mean_std([r['metrics'][main_metric] for r in runs])} | "
                             f"{objectives.mean_std([r['ece'] for r in runs])} | {runs[0]['params'] / 1e6:.2f} | "
                             f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(RESULTS / "students.md", text)


if __name__ == "__main__":
    main()
