"""Generic text tasks from the user's own files: ``csv`` (comma separated, or tab separated when
the file ends in ``.tsv``) and ``jsonl`` (one JSON object per line).

The config names the files (``task.train_file``, ``task.dev_file``; relative paths are taken
inside ``task.data_dir`` when that is set), the 1 or 2 text columns (``task.text_columns``), the
label column (``task.label_column``), the problem type and, for classification, the label space
(``task.label_names``; default: the distinct training labels, sorted numerically when they are
all integers, else alphabetically).
"""

from __future__ import annotations

import csv
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.problems import PROBLEMS, Problem
from kdforge.tasks.base import TASKS
from kdforge.tasks.text_base import (
    Example,
    Record,
    TextTask,
    label_id,
    label_key,
    read_delimited,
    read_jsonl,
    score,
)
from kdforge.tasks.validation import data_path


def _label_order(label: str) -> tuple[int, int, str]:
    """Sort key putting integer labels first, in numeric order (so "10" comes after "9")."""
    is_int = label.lstrip("-").isdigit()
    return (0, int(label), "") if is_int else (1, 0, label)


class FileTask(TextTask):
    """A classification or regression task over the rows of a training and an evaluation file."""

    file_kind: ClassVar[str]
    #: a split's file may be a folder (``hf_dataset``: one written by ``save_to_disk``)
    reads_folders: ClassVar[bool] = False

    @classmethod
    def problem_of(cls, config: TaskConfig) -> Problem:
        return PROBLEMS.get(config.problem_type, "task.problem_type")()

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        if not 1 <= len(config.text_columns) <= 2:
            raise KDForgeError(f"`task.text_columns` must name 1 or 2 columns, got {config.text_columns}")
        self.problem_type = config.problem_type
        problem = self.problem
        self.metric_names = problem.metrics
        self.main_metric = problem.metrics[0]
        self._records: dict[str, tuple[Path | str, list[Record]]] = {}
        if problem.classes:
            self.label_names = self._label_space()
        self._label_ids = {name: i for i, name in enumerate(self.label_names)}

    # ---- files

    def file_path(self, split: str) -> Path | str:
        """The configured file of ``split``, checked to exist (the source :meth:`read_records` reads)."""
        key = "train_file" if split == "train" else "dev_file"
        value = getattr(self.config, key)
        if value is None:
            raise KDForgeError(f"task {self.name} needs the {split} {self.file_kind} file; set `task.{key}`")
        path = data_path(self.config, value)
        if not (path.exists() if self.reads_folders else path.is_file()):
            raise KDForgeError(f"{split} file {path} not found; fix `task.{key}`")
        return path

    @abstractmethod
    def read_records(self, path: Path | str) -> list[Record]:
        """All rows of the file at ``path`` as ``(line, {column: value})``."""

    def where(self, line: int, path: Path | str) -> str:
        """Where a row is, for messages: ``line 3 of data/train.csv``."""
        return f"line {line} of {path}"

    def records(self, split: str) -> tuple[Path | str, list[Record]]:
        """The raw rows of ``split``, read once (dropped once the split is converted)."""
        if split not in self._records:
            path = self.file_path(split)
            self._records[split] = (path, self.read_records(path))
        return self._records[split]

    # ---- fields

    @staticmethod
    def field(fields: dict[str, Any], column: str, where: str, key: str) -> Any:
        if column not in fields:
            raise KDForgeError(f"{where}: column {column!r} not found (columns: "
                               f"{', '.join(map(repr, fields))}); fix `{key}`")
        return fields[column]

    def text(self, fields: dict[str, Any], column: str, where: str) -> str:
        value = self.field(fields, column, where, "task.text_columns")
        if not isinstance(value, str):
            raise KDForgeError(f"{where}: column {column!r} holds {value!r}, not text; "
                               "fix the row or `task.text_columns`")
        return value

    def _label_space(self) -> list[str]:
        if self.config.label_names is not None:
            names = [label_key(name) for name in self.config.label_names]
            if not names or len(set(names)) != len(names):
                raise KDForgeError(f"`task.label_names` must list distinct labels, "
                                   f"got {self.config.label_names}")
            return names
        path, rows = self.records("train")
        column = self.config.label_column
        seen = {label_key(self.field(fields, column, self.where(line, path), "task.label_column"))
                for line, fields in rows}
        return sorted(seen, key=_label_order)

    def example(self, line: int, fields: dict[str, Any], path: Path | str) -> Example:
        where = self.where(line, path)
        texts = [self.text(fields, column, where) for column in self.config.text_columns]
        raw = self.field(fields, self.config.label_column, where, "task.label_column")
        if self.problem.classes:
            label: int | float = label_id(raw, self._label_ids, where, "add it to `task.label_names` or fix the row")
        else:
            label = score(raw, where, "fix the row, or set `task.problem_type: classification` "
                          "if the labels are classes")
        return {"text_a": texts[0], "text_b": texts[1] if len(texts) == 2 else None, "label": label}

    def read_split(self, split: str) -> list[Example]:
        path, rows = self.records(split)
        del self._records[split]
        return [self.example(line, fields, path) for line, fields in rows]

    def read_file(self, path: Path | str) -> list[Example]:
        return [self.example(line, fields, path) for line, fields in self.read_records(path)]


@TASKS.register("csv")
class CsvTask(FileTask):
    """Rows of a CSV file with a header line (``.tsv`` files: tab separated, no quoting)."""

    file_kind = "csv"
    validation_file_format = "a file like task.train_file (.csv, or .tsv: tab separated)"

    def read_records(self, path: Path) -> list[Record]:
        if path.suffix.lower() == ".tsv":
            table = read_delimited(path, "\t", quoting=csv.QUOTE_NONE)
        else:
            table = read_delimited(path, ",", quoting=csv.QUOTE_MINIMAL)
        for column in self.config.text_columns:
            table.column(column, "fix `task.text_columns`")
        table.column(self.config.label_column, "fix `task.label_column`")
        return table.records()


@TASKS.register("jsonl")
class JsonlTask(FileTask):
    """One JSON object per line, e.g. ``{"text": "...", "label": "pos"}``."""

    file_kind = "jsonl"
    validation_file_format = "a JSON-lines file like task.train_file"

    def read_records(self, path: Path) -> list[Record]:
        return read_jsonl(path)
