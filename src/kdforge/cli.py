"""``kdforge`` command line: demo, finetune, distill, eval, export, bench-latency, compare, search, study,
serve, list.

Every user error ends with one line ``kdforge: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources

from kdforge.console import setup_logging
from kdforge.errors import KDForgeError

log = logging.getLogger("kdforge")




def demo_config_path() -> str:
    return str(resources.files("kdforge") / "configs" / "demo.yaml")


def parser() -> argparse.ArgumentParser:
    from kdforge import __version__

    p = argparse.ArgumentParser(prog="kdforge", description="Knowledge distillation that proves what was kept.")
    p.add_argument("--version", action="version", version=f"kdforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, target: str | None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        if target:
            sp.add_argument("target", metavar=target)
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-5 (repeatable)")
        return sp

    demo = add("demo", "fine-tune all-MiniLM-L6-v2 on SST-2, distill a 2-layer student, report", None)
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    ft = add("finetune", "fine-tune the config's teacher on its task", "CONFIG")
    ft.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    dist = add("distill", "fine-tune the teacher if asked, distill the student, export and report", "CONFIG")
    dist.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    dist.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    add("eval", "evaluate a finished run again: a new dated report in RUN_DIR/evaluations/", "CONFIG|RUN_DIR")
    export = add("export", "export a finished run's teacher and student to ONNX (and int8), evaluate every form",
                 "RUN_DIR")
    export.add_argument("--onnx", action="store_true", help="ONNX fp32 (the default when nothing is given)")
    export.add_argument("--int8", action="store_true",
                        help="also the student as int8 (export.int8_mode, default dynamic)")
    add("bench-latency", "re-measure a finished run's latencies on this machine (interleaved)", "RUN_DIR")
    compare = sub.add_parser("compare", help="one page with several runs side by side (score, ECE, latency, size, "
                             "config differences, Pareto chart)")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", default="runs/compare", help="folder of compare.html / compare.md")
    search = add("search", "search the student's architecture (KD-NAS, AutoKD, random) on Optuna storage, "
                 "then distill and report the best", "CONFIG")
    search.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    search.add_argument("--join", action="store_true", help="only run trials of the study (a worker on another "
                        "machine, same search.storage and search.study_name): no final runs, no report")
    search.add_argument("--storage", help="Optuna storage URL (search.storage), e.g. postgresql://USER@HOST/DB")
    search.add_argument("--study-name", help="the study to create or join (search.study_name)")
    study = add("study", "run a grid of jobs (rows x axes x seeds) with shared teachers, then report the rows "
                "with intervals and decide the claims", "CONFIG")
    study.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    study.add_argument("--join", action="store_true", help="only run runs of the study (a worker on another "
                       "machine with the same storage and study_name): no report")
    study.add_argument("--report-only", action="store_true", help="write the report from the storage; run nothing")
    config = sub.add_parser("config", help="the keys of a config section with their types, defaults and meaning")
    config.add_argument("--explain", default="", metavar="SECTION", help="e.g. train, task, eval, stages, "
                        "teachers (default: the top level)")
    serve = sub.add_parser("serve", help="serve a finished run's model as a black-box teacher over HTTP "
                           "(kdforge's JSON protocol) until Ctrl+C")
    serve.add_argument("target", metavar="RUN_DIR")
    serve.add_argument("--role", default="student", help="the model to serve: student (default) or a teacher, "
                       "assistant or peer role of the run")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: "
                       "every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    sub.add_parser("list", help="registered tasks, objectives, strategies and vision nets")
    return p


def run(args: argparse.Namespace) -> int:
    from kdforge import jobs
    from kdforge.config import load_config

    if args.command == "list":
        from kdforge.models.vision_nets import VISION_NETS
        from kdforge.objectives.base import OBJECTIVES
        from kdforge.recipes.base import DATA_SOURCES, STRATEGIES
        from kdforge.recipes.catalog import load_recipes
        from kdforge.tasks.base import TASKS

        load_recipes()

        for title, reg in (("tasks", TASKS), ("objectives", OBJECTIVES), ("strategies", STRATEGIES),
                           ("stage data", DATA_SOURCES), ("vision nets", VISION_NETS)):
            print(f"{title}: {', '.join(reg.names())}")
        return 0
    if args.command in ("eval", "export"):
        export = args.command == "export"
        result = jobs.run_eval(args.target, args.overrides, onnx=export, int8=export and args.int8)
        print(result.table)
        print(f"\nevaluation written to {result.run_dir} (report.html, metrics.json)")
        return 0
    if args.command == "bench-latency":
        folder, table = jobs.run_bench_latency(args.target, args.overrides)
        print(table)
        print(f"\nwritten to {folder}")
        return 0
    if args.command == "config":
        from kdforge.config import explain

        print(explain(args.explain))
        return 0
    if args.command == "serve":
        from kdforge.blackbox.serve import serve_run

        serve_run(args.target, args.role, args.host, args.port)
        return 0
    if args.command == "compare":
        from pathlib import Path

        from kdforge.evaluation.compare import compare_runs

        paths = compare_runs([Path(r) for r in args.runs], Path(args.out))
        print(f"comparison of {len(args.runs)} runs: {paths['html']}")
        return 0
    if args.command == "search":
        from kdforge.search.run import run_search

        extra = [f"search.{key}={value}" for key, value in (("storage", args.storage), ("study_name", args.study_name))
                 if value]
        outcome = run_search(load_config(args.target, [*args.overrides, *extra]), args.workers, args.join)
        if outcome is not None:
            print(outcome.table)
            print(f"\nsearch folder: {outcome.folder}  (report.html, trials.json, best/)")
        return 0
    if args.command == "study":
        from kdforge.study.runner import run_study

        outcome = run_study(args.target, args.overrides, args.workers, args.join, args.report_only)
        if outcome is not None:
            print(outcome.table)
            print(f"\nstudy folder: {outcome.folder}  (study.html, study.md, study.json, runs/)")
        return 0
    if args.command == "demo":
        config = load_config(demo_config_path(), args.overrides)
        result = jobs.run_distill(config, resume=args.resume, overwrite=not args.resume)
    else:
        config = load_config(args.target, args.overrides)
        if args.command == "finetune":
            from kdforge.config import PRIMARY_TEACHER
            from kdforge.run_folder import RunFolder

            jobs.run_finetune(config, resume=args.resume)
            print(f"fine-tuned teacher written to {RunFolder.of(config).teacher(PRIMARY_TEACHER).model}")
            return 0
        result = jobs.run_distill(config, resume=args.resume, overwrite=args.overwrite)
    if result is not None:
        print(result.table)
        print(f"\nrun folder: {result.run_dir}  (report.html, metrics.json, student/, tensorboard/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    try:
        return run(args)
    except KDForgeError as err:
        print(f"kdforge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdforge: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
