"""Teachers shared by a study's runs: each distinct fine-tuned teacher is trained once.

A teacher is known by its fingerprint (model, fine-tuning settings and seed, the task's data and
preprocessing: :func:`kdforge.roles.teachers.teacher_fingerprint`) and the ``train`` settings its
fine-tuning inherits (optimizer, weight decay, warm-up, precision, ...; not the student's seed, epochs,
lr or batch size). The first run that needs it fine-tunes it into ``<teachers_dir>/<key>/`` (a file lock
keeps workers on one machine from training it twice; a finished one is found again by its fingerprint, a
killed one resumes); every run then loads that folder as its teacher, with no fine-tuning of its own. Its
cached outputs are shared too, since the teacher-output cache is keyed by the teacher's weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from kdforge.config import PRIMARY_TEACHER, JobConfig
from kdforge.io import file_lock
from kdforge.roles.teachers import find_or_finetune_teacher, teacher_fingerprint
from kdforge.run_folder import TeacherFolder

# train settings that do not shape a fine-tuned teacher: logging, the student's seed, and what the
# teacher's own `finetune` section replaces (epochs, lr, batch size: part of its fingerprint)
UNSHAPING = ("seed", "log_every", "trackers", "checkpoint_every", "keep_checkpoint", "device",
             "epochs", "lr", "batch_size")


# train settings added after shared teachers existed: left out at their defaults, so those stay found
LATE_DEFAULTS = {"shuffle": True, "drop_last": False, "scheduler": "linear"}


def shared_key(config: JobConfig, task, role: str) -> str:
    """The shared folder's name: the teacher's fingerprint and the train settings that shape it."""
    train = config.train.model_dump(mode="json", exclude=set(UNSHAPING))
    train = {k: v for k, v in train.items() if k not in LATE_DEFAULTS or v != LATE_DEFAULTS[k]}
    extra = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:8]
    return f"{teacher_fingerprint(config, task, role)}-{extra}"


def ensure_shared_teachers(config: JobConfig, task, teachers_dir: Path) -> dict[str, Path]:
    """Role -> the model folder of every teacher of ``config`` that has a ``finetune`` section, fine-tuned
    now unless its shared folder holds it already."""
    models = {}
    for role, spec in config.teacher_configs().items():
        if spec.finetune is None:
            continue
        folder = TeacherFolder(teachers_dir / shared_key(config, task, role))
        folder.root.mkdir(parents=True, exist_ok=True)
        with file_lock(folder.root / "finetune.lock"):
            find_or_finetune_teacher(config, task, role, resume=True, folder=folder.root)
        models[role] = folder.model
    return models


def with_shared_teachers(tree: dict[str, Any], models: dict[str, Path]) -> dict[str, Any]:
    """``tree`` with each fine-tuned teacher replaced by its shared folder (no fine-tuning of its own)."""
    tree = copy.deepcopy(tree)
    sections = {PRIMARY_TEACHER: tree.get("teacher"), **(tree.get("teachers") or {})}
    for role, model in models.items():
        sections[role].update(model=str(model), finetune=None)
    return tree
