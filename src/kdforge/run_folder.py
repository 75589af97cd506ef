"""A run folder (``output_dir``) and its lifecycle.

Layout (``output_dir``)::

    config.yaml          the validated config actually used
    train.log            progress and epoch metrics
    teacher/             fine-tuned primary teacher (model/, finetune.json) when teacher.finetune is set
    teachers/<role>/     the same for each named teacher of `teachers:`
    student/             exported student (save_pretrained + tokenizer; an SPS student unrolled)
    student-compact/     an SPS student's compact shared form (only for student.sps)
    stages/              per finished stage of a multi-stage recipe: history and learner snapshot
    metrics.json         teacher and student reports + comparison (+ the other roles' scores); written
                         last: its presence marks a finished run
    models/<role>/       every other model a stage trained (assistants, online peers), exported like the student
    exports/             teacher.onnx, student.onnx, student.int8.onnx (export.onnx / export.int8)
    report.md/.html      the same as a document (warnings, baseline, every form, per-class scores, plots,
                         provenance), with its PNGs (reliability, training curves, score vs latency)
    evaluations/<date>/  each `kdforge eval` / `kdforge export`: a new report and metrics.json
    latency/<date>/      each `kdforge bench-latency`: latency.json and latency.md
    tensorboard/         scalars of every stage
    checkpoints/<stage>/ while the run is not finished (kept after it with train.keep_checkpoint)
    .previous-run/       during an ``--overwrite`` run: the finished run it replaces

Never losing a finished run:

* ``--resume`` on a finished run (``metrics.json`` present) says so, returns its results and
  changes nothing.
* ``--overwrite`` validates the new config first, then moves the finished run's results into
  ``.previous-run/``; they are deleted only once the new run has written its ``metrics.json`` and
  report. When the new run stops with an error, they are moved back (and the new run's partial
  files removed): the folder is as it was. When it is interrupted (Ctrl-C, a kill), they stay in
  ``.previous-run/`` while ``--resume`` continues the new run.
* Checkpoints are deleted only after the outputs are written, so a run killed between training and
  export resumes without training again.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from kdforge.config import JobConfig
from kdforge.engine import checkpoint as ckpt
from kdforge.errors import KDForgeError
from kdforge.processes import MainProcessOnly, launch_rank
from kdforge.recipes.stage import checkpoint_roots

log = logging.getLogger("kdforge")


@contextlib.contextmanager
def log_file(run_dir: Path) -> Iterator[None]:
    """Write the ``kdforge`` log into ``run_dir/train.log`` while the job runs (and only then: a loop
    of runs in one process does not write every later run into every earlier log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(str((run_dir / "train.log").resolve()))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(MainProcessOnly())  # with several processes, one line each
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


#: a finished run's results: what ``--overwrite`` replaces (moved into PREVIOUS_RUN until the new ones exist)
RESULTS = ("config.yaml", "student", "student-compact", "models", "exports", "report.md", "report.html",
           "reliability.png", "training.png", "score-latency.png", "evaluations", "latency", "stages", "checkpoints",
           "metrics.json")
PREVIOUS_RUN = ".previous-run"


def prepare_output_dir(config: JobConfig, resume: bool, overwrite: bool) -> Path:
    """The run folder. A finished run in it is refused unless ``overwrite``; then its results are moved
    into ``.previous-run/`` (not deleted), until :func:`finish_run` (or back by :func:`restore_previous_run`)."""
    run_dir = Path(config.output_dir)
    main = launch_rank() == 0
    if main:
        _undo_set_aside(run_dir)
    if (run_dir / "metrics.json").exists() and not resume:
        if not overwrite:
            raise KDForgeError(f"{run_dir} already holds a finished run; pass --overwrite to replace it "
                               "or choose another folder with --set output_dir=...")
        if main:
            _set_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _set_aside(run_dir: Path) -> None:
    """Move the finished run's results into ``.previous-run/`` (through a staging folder: a kill in the
    middle is undone by :func:`_undo_set_aside` at the next start)."""
    aside, staging = run_dir / PREVIOUS_RUN, run_dir / f"{PREVIOUS_RUN}.tmp"
    if aside.exists():
        shutil.rmtree(aside)  # an older run than the finished one in run_dir (a kill just after a run finished)
    staging.mkdir()
    for name in RESULTS:  # metrics.json last: while it is in run_dir, run_dir holds the finished run
        if (run_dir / name).exists():
            (run_dir / name).rename(staging / name)
    staging.rename(aside)
    log.info("the finished run in %s is kept in %s until this run has written its results", run_dir, aside)


def _undo_set_aside(run_dir: Path) -> None:
    staging = run_dir / f"{PREVIOUS_RUN}.tmp"
    if staging.is_dir():
        for item in staging.iterdir():
            if not (run_dir / item.name).exists():
                item.rename(run_dir / item.name)
        shutil.rmtree(staging)


def restore_previous_run(run_dir: Path) -> bool:
    """After a failed ``--overwrite`` run: delete its partial results and move the finished run back
    from ``.previous-run/``. Nothing is done (False) when there is none, or when the new run has
    written its ``metrics.json`` (then it is the finished run)."""
    aside = run_dir / PREVIOUS_RUN
    if not aside.is_dir() or (run_dir / "metrics.json").exists():
        return False
    for name in RESULTS:
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for name in RESULTS:  # metrics.json last
        if (aside / name).exists():
            (aside / name).rename(run_dir / name)
    shutil.rmtree(aside)
    log.info("this run failed: the finished run it was to replace is moved back into %s", run_dir)
    return True


def finish_run(config: JobConfig, run_dir: Path) -> None:
    """Once the run's outputs are written: delete every stage's checkpoints (unless its
    ``train.keep_checkpoint``) and the finished run that this one replaced."""
    for root, keep in checkpoint_roots(config, run_dir):
        if not keep:
            ckpt.remove_checkpoints(root)
    shutil.rmtree(run_dir / PREVIOUS_RUN, ignore_errors=True)
