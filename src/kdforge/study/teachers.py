"""Teachers shared by a study's runs: each distinct fine-tuned teacher is trained once.

A teacher is known by its fingerprint (model, fine-tuning settings and seed, the task's data and
preprocessing: :func:`kdforge.jobs.teacher_fingerprint`) and the ``train`` settings its fine-tuning
inherits (weight decay, warm-up, precision, ...; not the student's seed). The first run that needs it fine-tunes it
into ``<teachers_dir>/<fingerprint>/`` (a file lock keeps workers on one machine from training it
twice; a finished one is reused, a killed one resumes); every run then loads that folder as its
teacher, with no fine-tuning of its own. Its cached outputs are shared too, since the teacher-output
cache is keyed by the teacher's weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from kdforge.config import PRIMARY_TEACHER, JobConfig, validate_config
from kdforge.io import file_lock

log = logging.getLogger("kdforge")


def _sections(tree: dict[str, Any]) -> dict[str, dict]:
    """The teacher sections of a job tree by role (``teacher`` first)."""
    found = {PRIMARY_TEACHER: tree["teacher"]} if isinstance(tree.get("teacher"), dict) else {}
    return {**found, **(tree.get("teachers") or {})}


def finetune_job(config: JobConfig, role: str, folder: Path) -> JobConfig:
    """The job that fine-tunes teacher ``role`` of ``config`` alone, into ``folder``."""
    tree = config.model_dump(mode="json")
    section = _sections(tree)[role]
    job = {"task": tree["task"], "teacher": section, "student": tree["student"], "train": tree["train"],
           "eval": tree["eval"], "output_dir": str(folder)}
    return validate_config(job, f"shared teacher {role}")


UNSHAPING = ("seed", "log_every", "trackers", "checkpoint_every", "keep_checkpoint", "device")


def teacher_key(config: JobConfig, task, role: str) -> str:
    """The shared folder's name: the teacher's fingerprint and the train settings that shape it."""
    from kdforge.jobs import teacher_fingerprint

    train = config.train.model_dump(mode="json", exclude=set(UNSHAPING))
    extra = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:8]
    return f"{teacher_fingerprint(config, task, role)}-{extra}"


def shared_teacher_jobs(config: JobConfig, task, teachers_dir: Path) -> dict[str, JobConfig]:
    """Role -> the fine-tuning job of every teacher of ``config`` that has a ``finetune`` section."""
    jobs = {}
    for role, spec in config.teacher_configs().items():
        if spec.finetune is not None:
            jobs[role] = finetune_job(config, role, teachers_dir / teacher_key(config, task, role))
    return jobs


def ensure_teacher(job: JobConfig, task) -> Path:
    """Fine-tune the teacher of ``job`` unless its folder holds it already; returns the model folder."""
    from kdforge.jobs import get_teacher, teacher_dir

    folder = Path(job.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "finetune.lock"):
        get_teacher(job, task, resume=True)
    return teacher_dir(folder, PRIMARY_TEACHER) / "model"


def with_shared_teachers(tree: dict[str, Any], models: dict[str, Path]) -> dict[str, Any]:
    """``tree`` with each fine-tuned teacher replaced by its shared folder (no fine-tuning of its own)."""
    tree = copy.deepcopy(tree)
    sections = _sections(tree)
    for role, model in models.items():
        sections[role].update(model=str(model), finetune=None)
    return tree
