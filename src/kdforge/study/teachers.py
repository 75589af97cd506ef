"""Teachers shared by a study's runs: each distinct fine-tuned teacher is trained once.

A teacher is known by :func:`kdforge.roles.teachers.teacher_store_key`: its fingerprint (model,
fine-tuning settings and seed, the task's data and preprocessing) and the ``train`` settings its
fine-tuning inherits (optimizer, weight decay, warm-up, precision, ...; not the student's seed, epochs,
lr or batch size). The first run that needs it fine-tunes it into ``<teachers_dir>/<key>/`` (a file lock
keeps workers on one machine from training it twice; a finished one is found again by its fingerprint, a
killed one resumes); every run then loads that folder as its teacher, with no fine-tuning of its own. Its
cached outputs are shared too, since the teacher-output cache is keyed by the teacher's weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kdforge.config import PRIMARY_TEACHER, JobConfig
from kdforge.io import file_lock
from kdforge.roles.teachers import find_or_finetune_teacher, teacher_store_key
from kdforge.run_folder import TeacherFolder


def ensure_shared_teachers(config: JobConfig, task, teachers_dir: Path) -> dict[str, Path]:
    """Role -> the model folder of every teacher of ``config`` that has a ``finetune`` section, fine-tuned
    now unless its shared folder holds it already."""
    models = {}
    for role, spec in config.teacher_configs().items():
        if spec.finetune is None:
            continue
        folder = TeacherFolder(teachers_dir / teacher_store_key(config, task, role))
        folder.root.mkdir(parents=True, exist_ok=True)
        with file_lock(folder.root / "finetune.lock"):
            find_or_finetune_teacher(config, task, role, resume=True, folder=folder.root)
        models[role] = folder.model
    return models


def with_shared_teachers(tree: dict[str, Any], models: dict[str, Path]) -> dict[str, Any]:
    """``tree`` with each fine-tuned teacher replaced by its shared folder (no fine-tuning of its own; the
    folder holds the model already cut to its ``layers``)."""
    tree = copy.deepcopy(tree)
    sections = {PRIMARY_TEACHER: tree.get("teacher"), **(tree.get("teachers") or {})}
    for role, model in models.items():
        sections[role].update(model=str(model), finetune=None)
        sections[role].pop("layers", None)
    return tree
