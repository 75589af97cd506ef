"""Search benchmark (issue 11): KD-NAS vs AutoKD vs random search vs the demo's hand-picked student.

SST-2, the demo's setting: a fixed 4,445-row sample of which 445 rows are carved off as the validation
split every search scores candidates on and every final run selects its best epoch on (held out from
training), all-MiniLM-L6-v2 fine-tuned on the other 4,000 (2 epochs); the full dev set (872 rows) is
reported. The teacher is fine-tuned once (``runs/bench-search/teacher``) and shared.

Budget (issue 21: enough trials for a learning controller to differ from random search): per method 60
trials (AutoKD: 10 random start-up trials, then TPE; KD-NAS: 5 random warm-up episodes, then its reward
predictor picks the predicted best of 100 unseen candidates, 10% exploration), each candidate distilled
up to 4 epochs on a fixed 250-row proxy subset of the 4,000 training rows (the config's 0.5 CE + 0.5
Hinton KD, T 4, plus KD-NAS's hidden-state term, the teacher's outputs and hidden states cached; AutoKD's
successive halving scores candidates after 1, 2 and 4 epochs and keeps the better half at each rung);
every method searches the architecture only (KD-NAS v1's space: kdforge.search.space defaults, 1-4
layers, hidden 128-384, head size 32/64, FFN 384-1536), latency at batch 32 and 64 tokens interleaved
with the teacher (10 rounds), reward = accuracy x (latency / target)^-0.07, target = the teacher's
latency / 3. The best candidate of each method (``search.final_top``: 1) is then distilled like the
demo's student (3 epochs on the 4,000 rows, with the terms its proxy ranked it with) and compared with
the hand-picked student (teacher layers [0, 5]); all final students are timed again together,
interleaved in one process (batch 1 and 32, 30 rounds).

Also measured: slicing the teacher's weights vs a fresh initialisation for narrower candidates (the
same proxy distillation, two architectures).

    .venv/bin/python benchmarks/search.py                # resumable trial by trial (several hours on 2 cores)
    .venv/bin/python benchmarks/search.py --report-only  # the table from the finished parts
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from kdforge import jobs
from kdforge.cli import demo_config_path
from kdforge.config import STUDENT, load_config, validate_config
from kdforge.engine.trainer import seed_everything
from kdforge.evaluation.evaluate import pytorch_form
from kdforge.evaluation.latency import interleaved_latency
from kdforge.evaluation.size import count_parameters
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.models.loading import load_model
from kdforge.models.student import build_student
from kdforge.recipes.stage import run_stages
from kdforge.roles.teachers import load_teacher
from kdforge.search.proxy import ProxyTask
from kdforge.search.report import best_so_far, final_validation
from kdforge.search.run import run_search, search_config
from kdforge.search.space import SearchSpace
from kdforge.search.trial import SearchContext, best_score, trial_config
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"
OUT = Path("runs/bench-search")
METHODS = ("kdnas", "autokd", "random")
SEARCH = {"trials": 60, "proxy_rows": 250, "proxy_epochs": 4, "latency_batch_size": 32, "latency_repeats": 10,
          "final_top": 1, "seed": 0, "space": {"temperature": [], "kd_weight": []}}
EVAL = {"latency_batch_sizes": [1, 32], "latency_seq_len": 64, "latency_repeats": 20, "latency_warmup": 3,
        "threads": 2}
INIT_ARCHS = {"L2 H256 d32 F768": {"layers": 2, "hidden_size": 256, "head_dim": 32, "intermediate_size": 768},
              "L3 H192 d32 F768": {"layers": 3, "hidden_size": 192, "head_dim": 32, "intermediate_size": 768}}


def base_tree() -> dict:
    tree = load_config(demo_config_path()).model_dump(mode="json")  # its validation split included
    tree["train"].update(log_every=1000, trackers=[])
    tree["eval"].update(EVAL)
    tree["export"] = {"onnx": False, "int8": False}
    return tree


def teacher_folder() -> Path:
    tree = {**base_tree(), "output_dir": str(OUT / "teacher")}
    config = validate_config(tree)
    load_teacher(config, build_task(config.task))
    return OUT / "teacher" / "teacher" / "model"


def job(teacher: Path, **changes) -> dict:
    tree = base_tree()
    tree["teacher"] = {"model": str(teacher)}
    tree.update(changes)
    return tree


def method_part(method: str, teacher: Path) -> dict:
    tree = job(teacher, search={**SEARCH, "method": method}, output_dir=str(OUT / method))
    result = run_search(validate_config(tree))
    return {"trials": result.trials, "best": [{k: b[k] for k in ("rank", "trial", "run_dir", "overrides", "command",
                                                               "validation")} for b in result.best]}


def hand_picked_part(teacher: Path) -> dict:
    tree = job(teacher, student={"layers": [0, 5]}, output_dir=str(OUT / "hand-picked"))
    result = jobs.run_distill(validate_config(tree), resume=True)
    return {"run_dir": str(result.run_dir)}


def init_part(teacher: Path) -> dict:
    """Proxy score of two narrower candidates initialised by slicing the teacher vs freshly."""
    config = search_config(validate_config(job(teacher, search=SEARCH, output_dir=str(OUT / "init"))))
    task = build_task(config.task)
    loaded = load_model(str(teacher), task)
    ctx = SearchContext(config, task, ProxyTask(task, SEARCH["proxy_rows"], config.task.sample_seed),
                        {"teacher": loaded}, SearchSpace.from_dict({}, "transformer"), OUT / "init")
    rows = {}
    for name, params in INIT_ARCHS.items():
        params = {**params, "temperature": 4.0, "kd_weight": 0.5}
        for init in ("sliced", "fresh"):
            cfg = trial_config(ctx, params, OUT / "init" / "work")
            if init == "fresh":  # the same shape from the teacher's config, every weight initialised anew
                fresh = {"layers": None, "config": {**cfg.student.config, "num_hidden_layers": params["layers"]}}
                cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update=fresh)})
            seed_everything(cfg.train.seed)
            student = build_student(cfg.student, loaded, task)
            history = run_stages(cfg, ctx.proxy, {"teacher": loaded, STUDENT: student}, OUT / "init" / "work", False)
            rows[f"{name} {init}"] = {"score": best_score(history, task.main_metric, True),
                                      "params": count_parameters(student.model)}
    return rows


def final_students(results: dict) -> dict[str, str]:
    runs = {"hand-picked [0, 5]": results["hand-picked"]["run_dir"]}
    for method in METHODS:
        for b in results.get(method, {}).get("best", []):
            runs[f"{method} #{b['rank']} (trial {b['trial']})"] = b["run_dir"]
    return runs


def timing_part(results: dict, teacher: Path) -> dict:
    """Every final student and the teacher timed together, interleaved (batch 1 and 32)."""
    config = validate_config(job(teacher, student={"layers": [0, 5]}))
    task = build_task(config.task)
    forms = {"teacher": pytorch_form("teacher", load_model(str(teacher), task), task, config.eval)}
    for name, run_dir in final_students(results).items():
        forms[name] = pytorch_form(name, load_model(str(Path(run_dir) / "student"), task), task, config.eval)
    return interleaved_latency({n: f.forward for n, f in forms.items()}, [1, 32], 3, 30, 2, reference="teacher")


def metrics_of(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def reached_at(trials: list[dict], target: float) -> int | None:
    """The number of trials run when the best reward first reached ``target``."""
    return next((number + 1 for number, best in best_so_far(trials) if best >= target - 1e-12), None)


def table(results: dict) -> str:
    timing = results.get("timing")
    runs = final_students(results)
    teacher = metrics_of(runs["hand-picked [0, 5]"])["teacher"]
    t_acc = teacher["metrics"]["accuracy"]
    lines = ["# Student architecture search (SST-2)", "", (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
             (__doc__ or "").split("\n\n")[2].replace("\n", " "), "",
             "| student | dev accuracy | retention | validation (held out) | b1 ms | b32 ms | speedup b32 | params |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(name: str, bs: int) -> float | None:
        return timing["models"][name]["batch_sizes"][str(bs)]["median_ms"] if timing else None

    lines.append(f"| teacher (MiniLM-L6) | {t_acc:.4f} | 100% | | {ms('teacher', 1) or 0:.2f} | "
                 f"{ms('teacher', 32) or 0:.1f} | 1.00x | {teacher['params'] / 1e6:.1f}M |")
    rows = {}
    for name, run_dir in runs.items():
        saved = metrics_of(run_dir)
        acc, speed = saved["student"]["metrics"]["accuracy"], None
        if timing:
            speed = timing["speedup"][name]["32"]
        rows[name] = {"acc": acc, "speed": speed["ratio"] if speed else None, "b32": ms(name, 32)}
        cell = f"{speed['ratio']:.2f}x [{speed['low']:.2f}-{speed['high']:.2f}]" if speed else ""
        held_out = final_validation(run_dir, "accuracy", True)
        lines.append(f"| {name} | {acc:.4f} | {100 * acc / t_acc:.1f}% | {held_out or 0:.4f} | "
                     f"{ms(name, 1) or 0:.2f} | {ms(name, 32) or 0:.1f} | {cell} | "
                     f"{saved['student']['params'] / 1e6:.1f}M |")
    if timing and timing.get("noisy"):
        lines += ["", f"**Latency was noisy: {'; '.join(timing['noisy_reasons'])}.**"]
    lines += ["", "## Searches", "", "| method | complete | pruned | best proxy reward | trials to reach random's best "
              "| minutes | best candidate |", "|---|---:|---:|---:|---:|---:|---|"]
    random_best = max((t["reward"] for t in results.get("random", {}).get("trials", [])
                       if t["state"] == "COMPLETE"), default=None)
    for method in METHODS:
        part = results.get(method)
        if not part:
            continue
        trials = part["trials"]
        done = [t for t in trials if t["state"] == "COMPLETE"]
        top = max(done, key=lambda t: t["reward"])
        minutes = sum(t["seconds"] or 0 for t in trials) / 60
        reach = reached_at(trials, random_best) if random_best is not None else None
        lines.append(f"| {method} | {len(done)} | {sum(t['state'] == 'PRUNED' for t in trials)} | {top['reward']:.4f} "
                     f"| {reach if reach else 'not reached'} | {minutes:.1f} | #{top['number']} "
                     f"{' '.join(f'{k}={v}' for k, v in top['choices'].items())} |")
    if results.get("init"):
        lines += ["", "## Initialising a narrower candidate: slicing the teacher vs fresh", "",
                  "| candidate | proxy validation accuracy | params |", "|---|---:|---:|"]
        lines += [f"| {name} | {r['score']:.4f} | {r['params'] / 1e6:.2f}M |" for name, r in results["init"].items()]
    lines += ["", "## What the table shows", ""]
    hand = rows["hand-picked [0, 5]"]
    lines.append("KD-NAS's claim, read against the hand-picked student: a searched student with an equal score "
                 "(within 0.5 points) at >= 15% lower batch-32 latency, or >= 1 point better at equal latency "
                 "(within 15%).")
    for name, r in rows.items():
        if name.startswith("hand") or r["speed"] is None or hand["speed"] is None:
            continue
        saved = 1 - hand["speed"] / r["speed"]  # latency saved vs the hand-picked student (negative: slower)
        points = 100 * (r["acc"] - hand["acc"])
        holds = (points >= -0.5 and saved >= 0.15) or (points >= 1 and abs(saved) <= 0.15)
        where = f"{100 * saved:.0f}% lower" if saved >= 0 else f"{-100 * saved:.0f}% higher"
        lines.append(f"- {name}: {points:+.1f} points at {where} batch-32 latency: "
                     f"{'holds' if holds else 'does not hold'}.")
    searches = {m: results[m]["trials"] for m in METHODS if results.get(m)}
    if "autokd" in searches and random_best is not None:
        auto = searches["autokd"]
        best = max(t["reward"] for t in auto if t["state"] == "COMPLETE")
        reach = reached_at(auto, random_best)
        lines.append(f"- AutoKD's claim, random search's best reached with far fewer trials: AutoKD's best proxy "
                     f"reward {best:.4f} in {len(auto)} trials ({sum(t['state'] == 'PRUNED' for t in auto)} pruned "
                     f"after 1 epoch) vs random search's {random_best:.4f} (its trial "
                     f"{reached_at(searches['random'], random_best)}): "
                     + (f"reached at trial {reach}." if reach else "not reached: does not hold in this budget."))
    fast = [(r["acc"] / t_acc, n) for n, r in rows.items() if r["speed"] and r["speed"] >= 3.0]
    if fast:
        best = max(fast)
        lines.append(f"- Best retention at >= 3x the teacher's batch-32 speed: {100 * best[0]:.1f}% ({best[1]}); "
                     "our goal is >= 97%.")
    else:
        lines.append("- No final student reached 3x the teacher's batch-32 speed.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--parts", default="hand-picked,init,kdnas,autokd,random,timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    torch.set_num_threads(2)
    saved_path = OUT / "results.json"
    results = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    if not args.report_only:
        teacher = teacher_folder()
        parts = {"hand-picked": lambda: hand_picked_part(teacher), "init": lambda: init_part(teacher),
                 **{m: (lambda m=m: method_part(m, teacher)) for m in METHODS},
                 "timing": lambda: timing_part(results, teacher)}
        for name in args.parts.split(","):
            if name in results and name != "timing":
                continue
            results[name] = parts[name]()
            on_disk = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
            atomic_write_json(saved_path, {**on_disk, name: results[name]})  # parts may run in parallel processes
            results = {**on_disk, **results}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "search.json", results)
    atomic_write_text(RESULTS / "search.md", table(results))
    print(table(results))


if __name__ == "__main__":
    main()
