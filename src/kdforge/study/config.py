"""A study file (``kdforge study CONFIG``): a base job, named rows and/or axes, seeds, a baseline
row and the claims to decide.

.. code-block:: yaml

    base: ../glue/sst2.yaml          # a job config (path relative to this file) or an inline mapping
    overrides: {task.train_limit: 20000}            # applied to every run
    rows:                            # name -> settings that differ from the base (dotted keys or sections)
      no teacher: {objectives: [{name: ce}]}
      kd: {objectives: [{name: ce, weight: 0.5}, {name: hinton_kd, weight: 0.5, temperature: 4}]}
    axes: {task.train_limit: [2000, 20000]}         # every row at every value (a grid)
    single_point_rows: []            # rows run at the first axis point only (they read nothing the axes change)
    seeds: [0, 1, 2]                 # train.seed of the student; the teacher is trained once
    baseline: no teacher             # every row is compared with it (default: the first row)
    claims:
      - {a: kd, b: no teacher, direction: higher, paper: 1.0, source: "..."}
    output_dir: runs/studies/sst2

Settings merge into the base (``{train: {lr: 1e-4}}`` changes ``train.lr`` only); a list (objectives,
stages) is replaced whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from kdforge.config import apply_overrides, format_validation_error, read_yaml_mapping
from kdforge.errors import KDForgeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ClaimConfig(Strict):
    """"Row ``a`` scores higher (lower) than row ``b`` on ``metric``", decided by the paired interval."""

    a: str
    b: str
    metric: str | None = Field(None, description="a metric of the student's report (accuracy, f1, ...), ece, "
                               "sharpness, params or latency_b<N>_ms; default: the task's main metric")
    direction: Literal["higher", "lower"] = "higher"
    paper: float | None = Field(None, description="the published difference a - b, in the table's unit "
                                "(points for scores)")
    source: str | None = Field(None, description="where the published figure comes from")
    text: str | None = Field(None, description="the claim in words; default: generated from a, b and metric")


class PublishedScore(Strict):
    value: float = Field(description="the published score, on the scale kdforge reports (0.915, not 91.5)")
    source: str
    metric: str | None = Field(None, description="the metric it is given in, when not the table's (e.g. MRPC "
                               "accuracy beside our F1); the teacher's own score on it is shown beside it")


class StudyConfig(Strict):
    base: str | dict[str, Any]
    overrides: dict[str, Any] = Field(default_factory=dict, description="settings applied to every run")
    rows: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> settings of that row")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values; every row at each")
    single_point_rows: list[str] = Field(
        default_factory=list, description="rows whose runs read nothing the axes change (e.g. a student trained "
        "without the teacher while the axes vary the teacher): run at the first axis point only, and shown (and "
        "compared) at every point by those runs")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    baseline: str | None = None
    claims: list[ClaimConfig] = Field(default_factory=list)
    teacher_floor: float | None = Field(None, description="the score every teacher must reach for the table to "
                                        "be evidence; default by metric (kdforge.study.floors)")
    teacher_published: PublishedScore | None = Field(None, description="a published score of a comparable "
                                                     "teacher, shown beside ours")
    teachers_dir: str | None = Field(None, description="where shared teachers are fine-tuned (default "
                                     "<output_dir>/teachers; another study may point at the same folder)")
    publish_dir: str | None = Field(None, description="a folder the report (study.md, study.json, study.html, "
                                    "charts) is also written to, e.g. one committed with the project")
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite:///<output_dir>/study.db")
    study_name: str | None = Field(None, description="default: the output folder's name")
    heartbeat_s: PositiveInt = Field(60, description="a run silent for 2x this is failed and run again")
    output_dir: str = "runs/study"

    @model_validator(mode="after")
    def _names_valid(self) -> StudyConfig:
        names = list(self.rows) or ["base"]
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a row ({', '.join(names)})")
        for i, claim in enumerate(self.claims):
            for side in ("a", "b"):
                if getattr(claim, side) not in names:
                    raise ValueError(f"claims.{i}.{side}: {getattr(claim, side)!r} is not a row ({', '.join(names)})")
        for key, values in self.axes.items():
            if not values:
                raise ValueError(f"axes.{key}: give at least one value")
        for i, row in enumerate(self.single_point_rows):
            if row not in names:
                raise ValueError(f"single_point_rows.{i}: {row!r} is not a row ({', '.join(names)})")
        if self.single_point_rows and not self.axes:
            raise ValueError("single_point_rows run at the first axis point only, but the study has no `axes`; "
                             "remove single_point_rows")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct (got {self.seeds})")
        return self

    def row_names(self) -> list[str]:
        return list(self.rows) or ["base"]

    def baseline_row(self) -> str:
        return self.baseline or self.row_names()[0]


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{train: {lr: 1}}`` -> ``{"train.lr": 1}``; lists and other values are leaves."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def merge(tree: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``settings`` merged in (see the module docstring)."""
    return apply_overrides(tree, flatten(settings))


def load_study(source: str | Path | dict,
               overrides: list[str] | dict[str, Any] | None = None) -> tuple[StudyConfig, dict]:
    """The validated study and its base job tree (a path base is read relative to the study file)."""
    where = Path(source) if not isinstance(source, dict) else None
    tree = read_yaml_mapping(where, "base:, rows:, seeds: ... (a kdforge study)") if where else dict(source)
    tree = apply_overrides(tree, overrides)
    label = str(where) if where else "study"
    try:
        study = StudyConfig.model_validate(tree)
    except ValidationError as err:
        raise KDForgeError(format_validation_error(err, label)) from None
    if isinstance(study.base, dict):
        base = study.base
    else:
        path = Path(study.base)
        if not path.is_absolute() and where is not None and not path.is_file():
            path = where.parent / path
        base = read_yaml_mapping(path)
    return study, merge(dict(base), study.overrides)
