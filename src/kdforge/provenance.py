"""Provenance of a run: what ran, where, with which versions, and how to run it again.

:func:`collect_provenance` returns a JSON-serialisable dict:

* ``date``: when it was collected, ISO 8601 in UTC;
* ``versions``: kdforge, torch, transformers and onnxruntime (``None`` when not installed), read with
  :mod:`importlib.metadata`, and ``python``;
* ``platform``, ``cpu`` (``model name`` of /proc/cpuinfo, else :func:`platform.processor`, else
  ``None``), ``logical_cpus`` (:func:`os.cpu_count`), ``torch_threads``, ``cuda`` (GPU names, or ``None``)
  and ``cwd``;
* ``command``: how to reproduce the run. From the CLI, ``"kdforge " + shlex.join(argv)``; from the
  Python API, a snippet ``import kdforge; kdforge.distill(REQUIRED, overrides=DIFF)`` where REQUIRED
  holds the required keys (task name, teacher model(s)) and DIFF is :func:`config_diff` — applying
  DIFF to REQUIRED with :func:`kdforge.config.apply_overrides` validates back to the same config;
* ``config_diff``: :func:`config_diff` of the config, so the record shows what was changed.

:class:`PhaseTimer` measures the wall time of each phase of a job with a monotonic clock.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from kdforge.config import JobConfig, TaskConfig, TeacherConfig

PACKAGES = ("kdforge", "torch", "transformers", "onnxruntime")
"""Distributions whose versions are recorded (``None`` when one is not installed)."""

CLI_NAMES = frozenset({"kdforge", "kdforge.exe"})
"""``Path(sys.argv[0]).name`` of the console script: the process was started from the CLI."""


# --------------------------------------------------------------------------- config as a difference


def required_tree(config: JobConfig) -> dict[str, Any]:
    """The required part of ``config``: the task name and the model of each teacher (the ``teacher``
    section and/or the named ``teachers``), as a config tree."""
    tree: dict[str, Any] = {"task": {"name": config.task.name}}
    if config.teacher is not None:
        tree["teacher"] = _required_teacher(config.teacher)
    if config.teachers:
        tree["teachers"] = {name: _required_teacher(t) for name, t in config.teachers.items()}
    return tree


def _required_teacher(teacher: TeacherConfig) -> dict[str, Any]:
    """A teacher's ``model``, or its ``black_box`` source (url, file or callable)."""
    if teacher.black_box is None:
        return {"model": teacher.model}
    return {"black_box": teacher.black_box.model_dump(mode="json", include={"url", "file", "callable"},
                                                      exclude_none=True)}


def default_config(config: JobConfig) -> JobConfig:
    """A config with only :func:`required_tree` of ``config`` set; every other key at its default."""
    required = required_tree(config)
    return JobConfig(task=TaskConfig(**required["task"]),
                     teacher=TeacherConfig(**required["teacher"]) if "teacher" in required else None,
                     teachers={n: TeacherConfig(**t) for n, t in required.get("teachers", {}).items()})


def config_diff(config: JobConfig) -> dict[str, Any]:
    """``config`` as its difference from :func:`default_config` (same task name and teacher model(s)),
    as ``{dotted key: value}`` of JSON values, in the order of the config's fields.

    The rule, on ``model_dump(mode="json")`` of both: where both values are mappings and every key of
    the default's is also in the config's, recurse (keys joined by ``.``); a key absent from the
    default (e.g. a role under ``teachers``, a key of ``student.config``) is reported with its whole
    value; any other pair of values (lists included, compared whole) is reported as the config's
    value when the two differ. So ``{"train.lr": 3e-5, "student": {"layers": [0, 5], ...}}`` for a
    config that sets a learning rate and a student (``student`` defaults to ``None``). Applying the
    result to :func:`required_tree` with :func:`kdforge.config.apply_overrides` gives back the config."""
    out: dict[str, Any] = {}
    _diff(config.model_dump(mode="json"), default_config(config).model_dump(mode="json"), "", out)
    return out


def _diff(value: Any, default: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and isinstance(default, dict) and set(default) <= set(value):
        for key, sub in value.items():
            dotted = f"{prefix}{key}"
            if key not in default:
                out[dotted] = sub
            else:
                _diff(sub, default[key], f"{dotted}.", out)
    elif value != default or isinstance(value, bool) != isinstance(default, bool):  # True == 1 in Python
        out[prefix.removesuffix(".")] = value


# --------------------------------------------------------------------------- provenance


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The ``model name`` of the first CPU in ``cpuinfo``; else :func:`platform.processor`; else ``None``."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _cuda() -> list[str] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def reproduce_command(config: JobConfig, argv: list[str] | None = None, function: str = "distill") -> str:
    """How to run this again: ``"kdforge " + shlex.join(argv)`` when ``argv`` is given, or when it is
    ``None`` and the process is the ``kdforge`` console script (then ``sys.argv[1:]``); otherwise (the
    Python API) ``import kdforge; kdforge.<function>(REQUIRED, overrides=DIFF)`` with the Python
    literals of :func:`required_tree` and :func:`config_diff`."""
    if argv is None and Path(sys.argv[0]).name in CLI_NAMES:
        argv = sys.argv[1:]
    if argv is not None:
        return "kdforge " + shlex.join(argv)
    return f"import kdforge; kdforge.{function}({required_tree(config)!r}, overrides={config_diff(config)!r})"


def collect_provenance(config: JobConfig, argv: list[str] | None = None, *, function: str = "distill") -> dict:
    """The provenance record of a run of ``config`` (see the module docstring); ``argv`` and
    ``function`` as for :func:`reproduce_command`."""
    import torch

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}},
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": _cuda(),
        "cwd": os.getcwd(),
        "command": reproduce_command(config, argv, function),
        "config_diff": config_diff(config),
    }


# --------------------------------------------------------------------------- timing


class PhaseTimer:
    """Wall seconds per phase, on a monotonic clock (``time.monotonic`` unless ``clock`` is given)::

        timer = PhaseTimer()
        with timer.phase("teacher fine-tune"):
            ...
        timer.seconds  # {"teacher fine-tune": 812.4}

    A phase is recorded when its block ends, also by an exception; a phase entered again adds to its
    total; phases may nest (each counts its own wall time)."""

    def __init__(self, clock: Callable[[], float] | None = None):
        self.clock = clock
        self.seconds: dict[str, float] = {}

    def _now(self) -> float:
        return (self.clock or time.monotonic)()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + (self._now() - start)
