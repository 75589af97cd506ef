"""A study's runs: every row at every axis point (a row of ``single_point_rows`` at the first point only)
with every seed, each a validated job config.

A run's job = the base, the row's settings, the axis values, then ``train.seed`` = the seed and
``output_dir`` = ``<study>/runs/<row>/<point>/seed-<seed>``. A teacher's fine-tuning seed is pinned to the
base's ``train.seed`` when the config leaves it to follow ``train.seed``, so the seeds of a row vary the
student only and share one teacher (kdforge.study.teachers).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge.config import JobConfig, validate_config
from kdforge.study.config import StudyConfig, flatten, merge

IGNORED = ("output_dir", "train.seed")  # what every run sets for itself: not a difference between rows


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid; ``key`` names it in the study's storage and folders."""

    row: str
    point: str  # "" without axes, else "key=value, ..."
    seed: int
    tree: dict[str, Any]  # the job as the user wrote it (before shared teachers replace fine-tuning)

    @property
    def group(self) -> str:
        return f"{self.row} @ {self.point}" if self.point else self.row

    @property
    def key(self) -> str:
        return f"{self.group} / seed {self.seed}"

    def config(self) -> JobConfig:
        return validate_config(copy.deepcopy(self.tree), f"study run {self.key!r}")

    @functools.cached_property
    def config_hash(self) -> str:
        """Identifies the run's settings: those that differ from kdforge's defaults, so a setting kdforge
        adds later (at its default) leaves every stored run found."""
        settings = self.config().model_dump(mode="json", exclude_defaults=True)
        settings.pop("output_dir", None)
        return digest(settings)

    def matches(self, stored: str | None) -> bool:
        """Whether ``stored`` (a trial's ``config_hash``) is this run's: as kdforge writes it now, or as
        earlier versions wrote it (the tree as written, the settings added since left out at their
        defaults; the settings before a default changed)."""
        return stored is not None and (stored == self.config_hash or stored in self.written_hashes
                                       or stored == self.settings_hash_before_changed_defaults)

    @functools.cached_property
    def settings_hash_before_changed_defaults(self) -> str:
        """:attr:`config_hash` as kdforge computed it before the defaults of :data:`CHANGED_DEFAULTS` changed:
        a setting at its former default was a default then, left out."""
        settings = self.config().model_dump(mode="json", exclude_defaults=True)
        settings.pop("output_dir", None)
        for (section, key), (_, before) in CHANGED_DEFAULTS.items():
            if isinstance(settings.get(section), dict) and settings[section].get(key, MISSING) == before:
                del settings[section][key]
                if not settings[section]:
                    del settings[section]
        return digest(settings)

    @functools.cached_property
    def written_hashes(self) -> tuple[str, str]:
        """The older hashes: of the tree as written, and of it without the settings added since at their
        defaults (written out by kdforge when it filled a section, not by the user). A default that changed
        since (:data:`CHANGED_DEFAULTS`) written out by kdforge is hashed at its former value, as it was written."""
        tree = {k: copy.deepcopy(v) for k, v in self.tree.items() if k != "output_dir"}
        for (section, key), (now, before) in CHANGED_DEFAULTS.items():
            if isinstance(tree.get(section), dict) and tree[section].get(key, MISSING) == now:
                tree[section][key] = before
        raw = digest(tree)
        for (section, key), default in LATE_DEFAULTS.items():
            if isinstance(tree.get(section), dict) and tree[section].get(key, MISSING) == default:
                del tree[section][key]
        return raw, digest(tree)


MISSING = object()
# settings added to kdforge after studies stored runs by their written trees (apply_overrides writes a
# whole section with its defaults): left out of that older hash at their defaults
LATE_DEFAULTS = {("eval", "ensembles"): {}, ("train", "optimizer"): "adamw", ("train", "momentum"): 0.9,
                 ("train", "shuffle"): True, ("train", "drop_last"): False, ("train", "scheduler"): "linear"}
# defaults changed after studies stored runs: (section, key) -> (the default now, the default before). A run
# stored before has the former default in its written tree (kdforge filled the section with it) and left it
# out of its settings (it was a default): both older hashes are computed as they were then. The run is found
# again as it was measured (eval.latency_seq_len: it was timed at 64 tokens; a new run of the same config is
# timed at its task.max_length: pin `eval.latency_seq_len: 64` in a half-finished study to keep its rows alike)
CHANGED_DEFAULTS = {("eval", "latency_seq_len"): (None, 64)}


def digest(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-") or "run"


def axis_points(study: StudyConfig) -> list[dict[str, Any]]:
    keys = list(study.axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*study.axes.values())]


def point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items())


def pin_teacher_seeds(tree: dict[str, Any]) -> None:
    """A teacher whose fine-tuning follows ``train.seed`` keeps the base's seed (shared by the seeds)."""
    seed = tree.get("train", {}).get("seed", 42)
    sections = [tree.get("teacher"), *(tree.get("teachers") or {}).values()]
    for section in sections:
        if isinstance(section, dict) and isinstance(section.get("finetune"), dict) \
                and section["finetune"].get("seed") is None:
            section["finetune"]["seed"] = seed


def expand(study: StudyConfig, base: dict[str, Any]) -> list[RunSpec]:
    """Every run of the study, rows in order, then axis points, then seeds; each config validated
    (a bad row is refused here, before any training)."""
    runs = []
    folder = Path(study.output_dir) / "runs"
    for row in study.row_names():
        points = axis_points(study)
        for point in points[:1] if row in study.single_point_rows else points:
            label = point_label(point)
            tree = merge(copy.deepcopy(base), study.rows.get(row, {}))
            tree = merge(tree, point)
            pin_teacher_seeds(tree)
            for seed in study.seeds:
                run_tree = merge(copy.deepcopy(tree), {"train.seed": seed})
                parts = [slug(row), *([slug(label)] if label else []), f"seed-{seed}"]
                run_tree["output_dir"] = str(folder.joinpath(*parts))
                spec = RunSpec(row, label, seed, run_tree)
                spec.config()
                runs.append(spec)
    return runs


def differing_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The settings (dotted keys; a list counts as one) in which two jobs differ, besides the seed and
    the output folder: a comparison should differ in one thing only. A section one job has and the other
    lacks (or leaves empty) counts once, by its name (``assistants``, not each assistant's keys)."""
    flat_a, flat_b = flatten(a), flatten(b)

    def holds(flat: dict[str, Any], key: str) -> bool:  # a non-empty section or value at ``key``
        return flat.get(key) not in (None, {}) or any(k.startswith(key + ".") for k in flat)

    def setting(key: str) -> str:  # the shortest prefix of ``key`` that one job lacks, else ``key``
        parts = key.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
        return next((p for p in prefixes if holds(flat_a, p) != holds(flat_b, p)), key)

    keys = set(flat_a) | set(flat_b)
    return sorted({setting(k) for k in keys if k not in IGNORED and flat_a.get(k) != flat_b.get(k)})
