"""What every text task shares: reading delimited/JSON-lines files into numbered records with
one-line errors, turning raw label cells into label ids or scores, the tokenizing collator and
metric computation.

Line numbers in records and messages are 1-based physical lines of the file (a header is line 1),
so users can jump straight to the offending row.
"""

from __future__ import annotations

import csv
import json
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np
import torch

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.tasks.base import ListDataset, Task
from kdforge.tasks.metrics import METRICS

Example = dict[str, Any]
Record = tuple[int, dict[str, Any]]
"""A data row as ``(line number, {column: value})``."""


# --------------------------------------------------------------------------- reading files


@contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """Open ``path`` as UTF-8 (a byte-order mark is dropped); I/O and decoding failures, also
    those raised while reading inside the ``with`` block, become one-line :class:`KDForgeError`."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield handle
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        message = f"cannot read {path}: {reason}; check that it is a readable UTF-8 text file"
        raise KDForgeError(message) from None


def check_column(name: str, columns: Sequence[str], source: object, fix: str) -> None:
    """A missing column ``name`` of ``source`` is an error that lists the existing ``columns``."""
    if name not in columns:
        raise KDForgeError(f"column {name!r} not found in {source} (columns: {', '.join(map(repr, columns))}); {fix}")


@dataclass
class Table:
    """A delimited file: its column names and its non-blank data rows with their line numbers."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, list[str]]]

    def column(self, name: str, fix: str) -> int:
        """Index of column ``name``; a missing column is an error that lists the existing ones."""
        check_column(name, self.columns, self.path, fix)
        return self.columns.index(name)

    def records(self) -> list[Record]:
        return [(line, dict(zip(self.columns, row, strict=True))) for line, row in self.rows]


def _numbered_rows(reader: Any, path: Path) -> list[tuple[int, list[str]]]:
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            raise KDForgeError(f"cannot parse line {reader.line_num} of {path}: {err}; fix the row") from None
        if row:
            rows.append((start, row))


def read_delimited(path: Path, delimiter: str = "\t", columns: Sequence[str] | None = None,
                   quoting: int = csv.QUOTE_NONE) -> Table:
    """Read a delimited file whose first line names the columns, or, when ``columns`` is given,
    a headerless file with those columns. Every row must have one field per column.

    ``QUOTE_NONE`` is the default because GLUE sentences contain bare quote characters."""
    with open_text(path) as handle:
        rows = _numbered_rows(csv.reader(handle, delimiter=delimiter, quoting=quoting), path)
    if columns is None:
        if not rows:
            raise KDForgeError(f"{path} is empty; expected a header line naming the columns")
        columns = [name.strip() for name in rows.pop(0)[1]]
    for line, row in rows:
        if len(row) != len(columns):
            raise KDForgeError(f"line {line} of {path} has {len(row)} fields, expected {len(columns)} "
                               f"({', '.join(columns)}); fix the row (a stray delimiter or line break?)")
    return Table(path, list(columns), rows)


def read_jsonl(path: Path) -> list[Record]:
    """Read a file holding one JSON object per line (blank lines skipped)."""
    records = []
    with open_text(path) as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise KDForgeError(f"line {line} of {path} is not valid JSON ({err.msg}); "
                                   "write one JSON object per line") from None
            if not isinstance(value, dict):
                raise KDForgeError(f"line {line} of {path} holds a JSON {type(value).__name__}, "
                                   "not an object; write one JSON object per line")
            records.append((line, value))
    return records


# --------------------------------------------------------------------------- label cells


def label_key(value: Any) -> str:
    """The string form under which a raw label is looked up (``1``, ``1.0`` and ``"1"`` agree)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def label_id(value: Any, lookup: dict[str, int], where: str, fix: str) -> int:
    """Map a raw label to its id via ``lookup`` (label string -> id)."""
    key = label_key(value)
    if key not in lookup:
        raise KDForgeError(f"{where}: label {key!r} is outside the label space "
                           f"[{', '.join(lookup)}]; {fix}")
    return lookup[key]


def score(value: Any, where: str, fix: str) -> float:
    """A regression target: a finite number, given as a number or a numeric string."""
    number = math.nan
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(number):
        raise KDForgeError(f"{where}: regression score {value!r} is not a finite number; {fix}")
    return number


# --------------------------------------------------------------------------- task and collator


class TextCollator:
    """Tokenizes a batch of text examples with dynamic padding and adds ``labels``, and the raw
    sentences as ``texts``: one ``(text_a, text_b or None)`` per example (no model input; black-box
    teachers read them).

    A class rather than a closure so DataLoader workers can pickle it."""

    def __init__(self, tokenizer: Any, max_length: int, label_dtype: torch.dtype = torch.long):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_dtype = label_dtype

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        text_a = [example["text_a"] for example in batch]
        text_b = [example["text_b"] for example in batch]
        if all(text is None for text in text_b):
            text_b = None
        elif any(text is None for text in text_b):
            raise ValueError("a batch mixes single sentences and sentence pairs")
        encoded = self.tokenizer(text_a, text_b, truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt")
        out = dict(encoded.items())
        out["labels"] = torch.tensor([example["label"] for example in batch], dtype=self.label_dtype)
        out["texts"] = list(zip(text_a, text_b or [None] * len(text_a), strict=True))
        return out


class TextTask(Task):
    """A text task whose splits are read once per instance by :meth:`read_split`."""

    modality = "text"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy",)

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self._splits: dict[str, ListDataset] = {}

    @abstractmethod
    def read_split(self, split: str) -> list[Example]:
        """Read and validate all examples of ``split`` (called once per split)."""

    def load_split(self, split: str) -> ListDataset:
        if split not in ("train", self.eval_split):
            raise KDForgeError(f"task {self.name} has no split {split!r}; use 'train' or {self.eval_split!r}")
        if split not in self._splits:
            self._splits[split] = ListDataset(self.read_split(split))
        return self._splits[split]

    def read_validation_file(self, path: Path) -> ListDataset:
        return ListDataset(self.read_file(path))

    def read_file(self, path: Path) -> list[Example]:
        """Read and validate the examples of a file in this task's training-file format."""
        raise KDForgeError(f"task {self.name} cannot read a validation file; give `task.validation` as a fraction")

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The metrics of ``metric_names`` on the problem's metric inputs (for classification, logits (N, C)
        are reduced by argmax and 1-D predictions taken as class ids; regression predictions may be (N,)
        or (N, 1))."""
        try:
            predictions, labels = self.problem.metric_inputs(predictions, labels)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None
        return {name: METRICS[name](predictions, labels) for name in self.metric_names}

    def collator(self, tokenizer: Any = None, train: bool = False) -> Callable[[list[dict]], dict]:
        if tokenizer is None:
            raise KDForgeError(f"text task {self.name} needs a tokenizer; "
                               "use a text model for `teacher.model`")
        return TextCollator(tokenizer, self.config.max_length, self.problem.label_dtype)
