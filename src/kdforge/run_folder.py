"""A run folder (``output_dir``): every path inside it, what is finished, and how its results are replaced.

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
    exports/             teacher.onnx, student.onnx, student.int8.onnx (export.onnx / export.int8) and
                         student.int8.json (how the int8 file was made: export.int8_mode)
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

:class:`RunFolder` is the one place that knows these paths: jobs, the roles (:mod:`kdforge.roles`), the
stage runner, the engine (checkpoints, trackers), eval, export, serve, compare and the report ask it.
:class:`Results` is a folder of one set of results (the run's own, or those of each later evaluation or
latency measurement); :class:`TeacherFolder` is a fine-tuned teacher's.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from kdforge.config import PRIMARY_TEACHER, STUDENT, JobConfig, load_config
from kdforge.engine import checkpoint as ckpt
from kdforge.errors import KDForgeError
from kdforge.processes import MainProcessOnly, launch_rank

log = logging.getLogger("kdforge")

#: the report's images (drawn by :mod:`kdforge.evaluation.run_page` when there is something to show)
REPORT_IMAGES = ("reliability.png", "training.png", "score-latency.png")
PREVIOUS_RUN = ".previous-run"


class Results:
    """A folder of one set of results: a run's own (the run folder), or those of each ``kdforge eval`` /
    ``kdforge export`` (``evaluations/<date>/``) or ``kdforge bench-latency`` (``latency/<date>/``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def metrics(self) -> Path:
        """``metrics.json``: written last, so its presence marks the results complete."""
        return self.root / "metrics.json"

    @property
    def finished(self) -> bool:
        return self.metrics.is_file()

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def image(self, name: str) -> Path:
        """One of :data:`REPORT_IMAGES`."""
        return self.root / name

    @property
    def latency_json(self) -> Path:
        return self.root / "latency.json"

    @property
    def latency_md(self) -> Path:
        return self.root / "latency.md"


def _made(results: Results) -> tuple[str, int]:
    """When a dated folder of :meth:`RunFolder._dated` was made: its UTC stamp, then its same-second number."""
    stamp, _, number = results.root.name.partition("Z-")
    return (stamp.removesuffix("Z"), int(number) if number.isdigit() else 1)


class TeacherFolder:
    """A fine-tuned teacher: ``model/`` (its export) and ``finetune.json`` (its fingerprint and training
    history; written last, it marks the teacher finished). Its fine-tuning's checkpoints and trackers go
    into the folder too (as a :class:`RunFolder` of its own)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def record(self) -> Path:
        return self.root / "finetune.json"


class RunFolder(Results):
    """Every path inside the run folder ``root`` (see the module docstring for the layout)."""

    @classmethod
    def of(cls, config: JobConfig) -> RunFolder:
        return cls(config.output_dir)

    # ------------------------------------------------------------------------ what a run writes

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def student(self) -> Path:
        """The exported student (save_pretrained + tokenizer + model card)."""
        return self.root / STUDENT

    @property
    def student_compact(self) -> Path:
        return self.root / "student-compact"

    def teacher(self, role: str) -> TeacherFolder:
        """Where teacher ``role`` is fine-tuned: ``teacher/`` for the primary one, ``teachers/<role>/`` else."""
        return TeacherFolder(self.root / "teacher" if role == PRIMARY_TEACHER else self.root / "teachers" / role)

    def model(self, role: str) -> Path:
        """A trained role's export: ``student/`` for the student, ``models/<role>/`` for any other role a
        stage trained (assistants, online peers)."""
        return self.student if role == STUDENT else self.root / "models" / role

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def onnx_files(self) -> dict[str, Path]:
        """The run's ONNX files by form name (whether written or not)."""
        return {"teacher onnx fp32": self.exports / "teacher.onnx", "student onnx fp32": self.exports / "student.onnx",
                "student onnx int8": self.exports / "student.int8.onnx"}

    def existing_onnx_files(self) -> dict[str, Path]:
        """The ONNX files that are on disk, by form name."""
        return {name: path for name, path in self.onnx_files().items() if path.is_file()}

    def stage_marker(self, stage: str) -> Path:
        """``stages/<stage>.json``: a finished stage's history (written after its learner's snapshot)."""
        return self.root / "stages" / f"{stage}.json"

    def stage_snapshot(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.pt"

    def fsbbt_set(self, stage: str) -> Path:
        """The synthetic set an FS-BBT stage had labelled by its black-box teacher."""
        return self.root / "stages" / f"{stage}-fsbbt.npz"

    def checkpoints(self, desc: str) -> Path:
        """``checkpoints/<desc>``: the checkpoints of the training named ``desc`` (a stage) in this folder."""
        return self.root / "checkpoints" / desc

    def checkpoint_roots(self, config: JobConfig) -> list[tuple[Path, bool]]:
        """Every stage's checkpoint folder and whether its ``train.keep_checkpoint`` keeps it after the run."""
        return [(self.checkpoints(stage.name), config.stage_train(stage).keep_checkpoint)
                for stage in config.all_stages()]

    def tracker(self, name: str) -> Path:
        """Where tracker ``name`` of a training in this folder writes: ``tensorboard/``, ``mlruns/`` (mlflow's
        file store), else ``<name>/``."""
        return self.root / {"mlflow": "mlruns"}.get(name, name)

    def new_evaluation(self) -> Results:
        """A new ``evaluations/<UTC date and time>/`` (not created yet): an old one is never reused."""
        return self._dated("evaluations")

    def new_latency(self) -> Results:
        """A new ``latency/<UTC date and time>/`` (not created yet)."""
        return self._dated("latency")

    def latency_measurements(self) -> list[Results]:
        """Every ``kdforge bench-latency`` measurement of the run (``latency/<date>/latency.json``), oldest first."""
        return sorted((Results(path.parent) for path in self.root.glob("latency/*/latency.json")), key=_made)

    def evaluations(self) -> list[Results]:
        """Every finished ``kdforge eval`` / ``kdforge export`` of the run (``evaluations/<date>/metrics.json``;
        one killed before its metrics.json is none), oldest first."""
        return sorted((Results(path.parent) for path in self.root.glob("evaluations/*/metrics.json")), key=_made)

    def remeasurements(self) -> list[Results]:
        """The finished evaluations and latency measurements together, oldest first (by their folders' UTC
        times): an evaluation is :attr:`Results.finished`, a latency measurement holds ``latency.json``."""
        return sorted([*self.evaluations(), *self.latency_measurements()], key=_made)

    def _dated(self, kind: str) -> Results:
        from datetime import UTC, datetime

        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
        folder, n = self.root / kind / stamp, 1
        while folder.exists():
            n += 1
            folder = self.root / kind / f"{stamp}-{n}"
        return Results(folder)

    @property
    def previous_run(self) -> Path:
        """``.previous-run/``: during an ``--overwrite`` run, the finished run it replaces."""
        return self.root / PREVIOUS_RUN

    def results(self) -> list[Path]:
        """A finished run's results: what ``--overwrite`` replaces (fine-tuned teachers stay: they are found
        again by fingerprint), ``metrics.json`` last."""
        return [self.config_file, self.student, self.student_compact, self.root / "models", self.exports,
                self.report_md, self.report_html, *map(self.image, REPORT_IMAGES), self.root / "evaluations",
                self.root / "latency", self.root / "stages", self.root / "checkpoints", self.metrics]

    # ------------------------------------------------------------------------ lifecycle

    @contextlib.contextmanager
    def keep_log(self) -> Iterator[None]:
        """Write the ``kdforge`` log into ``train.log`` while the job runs (and only then: a loop of runs in
        one process does not write every later run into every earlier log)."""
        self.root.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(str(self.train_log.resolve()))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.addFilter(MainProcessOnly())  # with several processes, one line each
        log.addHandler(handler)
        try:
            yield
        finally:
            log.removeHandler(handler)
            handler.close()

    @classmethod
    def open_finished(cls, target: str | Path, overrides=None) -> tuple[JobConfig, RunFolder]:
        """The config and folder of a finished run given as a run folder or its config file."""
        target = Path(target)
        config = load_config(target / "config.yaml" if target.is_dir() else target, overrides)
        run = cls(target if target.is_dir() else config.output_dir)
        if not run.student.is_dir():
            raise KDForgeError(f"{run.student} does not exist; run `kdforge distill` first")
        return config, run

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create the folder. A finished run in it is refused unless ``overwrite``; then its results are moved
        into ``.previous-run/`` (not deleted), until :meth:`finish` (or back by :meth:`restore_previous`)."""
        main = launch_rank() == 0
        if main:
            self._undo_set_aside()
        if self.metrics.exists() and not resume:
            if not overwrite:
                raise KDForgeError(f"{self.root} already holds a finished run; pass --overwrite to replace it "
                                   "or choose another folder with --set output_dir=...")
            if main:
                self._set_aside()
        self.root.mkdir(parents=True, exist_ok=True)

    def _set_aside(self) -> None:
        """Move the finished run's results into ``.previous-run/`` (through a staging folder: a kill in the
        middle is undone by :meth:`_undo_set_aside` at the next start)."""
        aside, staging = self.previous_run, self.root / f"{PREVIOUS_RUN}.tmp"
        if aside.exists():
            shutil.rmtree(aside)  # an older run than the finished one in root (a kill just after a run finished)
        staging.mkdir()
        for path in self.results():  # metrics.json last: while it is in root, root holds the finished run
            if path.exists():
                path.rename(staging / path.name)
        staging.rename(aside)
        log.info("the finished run in %s is kept in %s until this run has written its results", self.root, aside)

    def _undo_set_aside(self) -> None:
        staging = self.root / f"{PREVIOUS_RUN}.tmp"
        if staging.is_dir():
            for item in staging.iterdir():
                if not (self.root / item.name).exists():
                    item.rename(self.root / item.name)
            shutil.rmtree(staging)

    def restore_previous(self) -> bool:
        """After a failed ``--overwrite`` run: delete its partial results and move the finished run back
        from ``.previous-run/``. Nothing is done (False) when there is none, or when the new run has
        written its ``metrics.json`` (then it is the finished run)."""
        aside = self.previous_run
        if not aside.is_dir() or self.metrics.exists():
            return False
        for target in self.results():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for path in self.results():  # metrics.json last
            if (aside / path.name).exists():
                (aside / path.name).rename(path)
        shutil.rmtree(aside)
        log.info("this run failed: the finished run it was to replace is moved back into %s", self.root)
        return True

    def cleanup_pending(self, config: JobConfig) -> bool:
        """Whether :meth:`finish` has something left to do (a kill came after the results were written)."""
        return self.previous_run.exists() or any(root.exists() and not keep
                                                 for root, keep in self.checkpoint_roots(config))

    def finish(self, config: JobConfig) -> None:
        """Once the run's outputs are written: delete every stage's checkpoints (unless its
        ``train.keep_checkpoint``) and the finished run that this one replaced."""
        for root, keep in self.checkpoint_roots(config):
            if not keep:
                ckpt.remove_checkpoints(root)
        shutil.rmtree(self.previous_run, ignore_errors=True)
