"""The ``hf_dataset`` task: text classification or regression over a Hugging Face ``datasets`` dataset
(``pip install "kdforge[hf]"``), with the keys of the ``csv`` task (``task.text_columns``,
``task.label_column``, ``task.label_names``, ``task.problem_type``, ``task.validation``).

Where the rows are (relative paths inside ``task.data_dir`` when it is set):

* ``task.dataset``: a folder written by ``save_to_disk`` (a ``DatasetDict``, or one ``Dataset``, which is
  then the ``train`` split), or else the name of a dataset on the Hub (``load_dataset(name)``).
  ``task.train_split`` names the split trained on (default ``train``), ``task.dev_split`` the reported one
  (default ``validation`` or ``dev``, whichever the dataset has).
* ``task.train_file`` / ``task.dev_file``, which replace that split of ``task.dataset``: a data file read by
  ``load_dataset(format, data_files=...)`` (the format from its suffix: ``.csv``, ``.tsv``, ``.json``,
  ``.jsonl``, ``.parquet``, ``.arrow``), or a folder holding one ``Dataset`` written by ``save_to_disk``.
* ``task.validation``: a fraction, the name of another split of ``task.dataset``, or a file or folder as
  for ``task.train_file``.

The rows become the csv task's records (:class:`~kdforge.tasks.text_files.FileTask` validates and converts
them), numbered from 0 as ``dataset[i]``; a ``ClassLabel`` label column gives its class names, which are the
label space unless ``task.label_names`` is set. The fingerprint adds each split's ``Dataset._fingerprint``
(which ``datasets`` derives from the data, or from its source files and their modification times), so new
data invalidates the cached teacher outputs and fine-tuned teachers.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.tasks.base import TASKS
from kdforge.tasks.text_base import Record, check_column
from kdforge.tasks.text_files import FileTask
from kdforge.tasks.validation import SPLIT as VALIDATION
from kdforge.tasks.validation import data_path

#: ``load_dataset`` builder and arguments by file suffix
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}), ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}), ".arrow": ("arrow", {})}
#: what a Hub dataset id looks like (``imdb``, ``stanfordnlp/sst2``)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hf_datasets() -> ModuleType:
    """The ``datasets`` package; one line saying how to install it when it is missing."""
    try:
        import datasets
    except ImportError:
        raise KDForgeError('task hf_dataset reads data with the `datasets` package, which is not installed; '
                           'pip install "kdforge[hf]"') from None
    return datasets


def _failure(err: BaseException) -> str:
    """The first line of a ``datasets`` error's root cause (``DatasetGenerationError`` wraps the parser's), for a
    one-line message."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_folder(path: Path, key: str) -> Any:
    """The ``Dataset`` or ``DatasetDict`` that ``save_to_disk`` wrote to the folder ``path``."""
    try:
        return hf_datasets().load_from_disk(str(path))
    except FileNotFoundError:
        raise KDForgeError(f"{path} is not a folder written by datasets' save_to_disk (no dataset_info.json or "
                           f"dataset_dict.json); fix `task.{key}`") from None


def load_file(path: Path, key: str) -> Any:
    """One ``Dataset``: a folder written by ``save_to_disk``, or a data file read by ``load_dataset``."""
    if path.is_dir():
        data = load_folder(path, key)
        if isinstance(data, dict):  # a DatasetDict
            raise KDForgeError(f"{path} holds several splits ({', '.join(data)}); give it as `task.dataset` and name "
                               f"the split with `task.train_split` / `task.dev_split`, or fix `task.{key}`")
        return data
    if path.suffix.lower() not in FORMATS:
        raise KDForgeError(f"cannot read {path} with datasets: give a {', '.join(FORMATS)} file or a save_to_disk "
                           f"folder as `task.{key}`")
    builder, kwargs = FORMATS[path.suffix.lower()]
    try:
        return hf_datasets().load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets and pyarrow raise many kinds: one line, whichever
        raise KDForgeError(f"cannot read {path} with load_dataset({builder!r}): {_failure(err)}; "
                           f"fix the file or `task.{key}`") from None


@TASKS.register("hf_dataset")
class HFDatasetTask(FileTask):
    """Rows of a Hugging Face dataset: a ``save_to_disk`` folder, data files or a Hub dataset."""

    file_kind = "data"
    reads_folders = True
    validation_file_format = "a split of task.dataset, or a file or save_to_disk folder like task.train_file"

    def __init__(self, config: TaskConfig):
        self._hf_splits: dict[str, Any] | None = None  # task.dataset's splits, loaded once
        self._data: dict[Path | str, Any] = {}  # each source's Dataset
        self._keys: dict[Path, str] = {}  # the config key naming each file or folder (for messages)
        super().__init__(config)

    # ---- sources: a Path (a file or save_to_disk folder) or a str (a split of task.dataset)

    def dataset_splits(self) -> dict[str, Any]:
        """The splits of ``task.dataset`` by name, loaded once."""
        if self._hf_splits is None:
            value = self.config.dataset
            if value is None:
                raise KDForgeError("task hf_dataset needs its data: set `task.dataset` (a save_to_disk folder or a "
                                   "Hub dataset name), or `task.train_file` and `task.dev_file`")
            path = data_path(self.config, value)
            if path.exists():
                data = load_folder(path, "dataset")
            elif _HUB_ID.fullmatch(value) and not self.config.data_dir:
                try:
                    data = hf_datasets().load_dataset(value)
                except Exception as err:  # not on the Hub, offline, ...: one line
                    raise KDForgeError(f"`task.dataset: {value}`: no folder {path}, and loading it from the Hub "
                                       f"failed ({_failure(err)}); fix `task.dataset`") from None
            else:
                raise KDForgeError(f"dataset folder {path} not found; fix `task.dataset`")
            self._hf_splits = dict(data) if isinstance(data, dict) else {"train": data}
        return self._hf_splits

    def split_name(self, split: str) -> str:
        """The split of ``task.dataset`` that serves ``split`` ("train" or "dev"), checked to exist."""
        splits, key = self.dataset_splits(), f"{split}_split"
        name = getattr(self.config, key)
        if name is None:
            name = "train" if split == "train" else next((n for n in ("validation", "dev") if n in splits), None)
        if name not in splits:
            missing = f"split {name!r} not found" if name else "no 'validation' or 'dev' split"
            raise KDForgeError(f"{missing} in {self.config.dataset} (splits: {', '.join(splits)}); set `task.{key}` "
                               f"to one of them or give the rows as `task.{split}_file`")
        return name

    def file_path(self, split: str) -> Path | str:
        """``task.train_file`` / ``task.dev_file`` when set, else the split of ``task.dataset``."""
        key = "train_file" if split == "train" else "dev_file"
        if getattr(self.config, key) is None:
            return self.split_name(split)
        path = super().file_path(split)
        self._keys[path] = key
        return path

    def validation_source(self) -> Path | str:
        value = str(self.config.validation)
        if self.config.dataset is not None and value in self.dataset_splits():
            return value
        path = data_path(self.config, value)
        if not path.exists():
            splits = f"no split of {self.config.dataset} (splits: {', '.join(self.dataset_splits())}) and " \
                if self.config.dataset is not None else ""
            raise KDForgeError(f"`task.validation: {value}` names {splits}no file or folder ({path} not found); "
                               "fix `task.validation` (or give a fraction such as 0.1)")
        self._keys[path] = "validation"
        return path

    def source_name(self, source: Path | str) -> str:
        """A source for messages: the path, or ``split 'train' of data/my-hf``."""
        return str(source) if isinstance(source, Path) else f"split {source!r} of {self.config.dataset}"

    def data(self, source: Path | str) -> Any:
        """The ``Dataset`` of ``source``, loaded once."""
        if source not in self._data:
            self._data[source] = load_file(source, self._keys[source]) if isinstance(source, Path) \
                else self.dataset_splits()[source]
        return self._data[source]

    # ---- rows

    def read_records(self, path: Path | str) -> list[Record]:
        """The rows of ``path`` (a source) as records; a ``ClassLabel`` label becomes its class name."""
        data, where, label = self.data(path), self.source_name(path), self.config.label_column
        for column in self.config.text_columns:
            check_column(column, data.column_names, where, "fix `task.text_columns`")
        check_column(label, data.column_names, where, "fix `task.label_column`")
        names = self.class_names(data)
        rows = data.select_columns(list(dict.fromkeys([*self.config.text_columns, label]))).to_list()
        if names is not None:  # class ids to names (ids outside the classes, e.g. -1, are left for the errors)
            for row in rows:
                if isinstance(row[label], int) and 0 <= row[label] < len(names):
                    row[label] = names[row[label]]
        return list(enumerate(rows))

    def class_names(self, data: Any) -> list[str] | None:
        """The class names of the label column when it is a ``ClassLabel``."""
        feature = data.features.get(self.config.label_column)
        return list(feature.names) if isinstance(feature, hf_datasets().ClassLabel) else None

    def where(self, line: int, path: Path | str) -> str:
        return f"row {line} of {self.source_name(path)}"

    def _label_space(self) -> list[str]:
        """A ``ClassLabel`` column's names (all of them, in order), unless ``task.label_names`` is set."""
        names = self.class_names(self.data(self.file_path("train"))) if self.config.label_names is None else None
        return names if names else super()._label_space()

    # ---- reports and caches

    def describe_split(self, split: str) -> str:
        source = None if split == VALIDATION else self.file_path(split)
        if isinstance(source, str):
            return f"{split} ({self.source_name(source)}, {len(self.split(split))} rows)"
        return super().describe_split(split)

    def fingerprint(self) -> str:
        """The config's fingerprint and the ``datasets`` fingerprint of every split read."""
        sources = [self.file_path("train"), self.file_path(self.eval_split)]
        if isinstance(self.config.validation, str):
            sources.append(self.validation_source())
        blob = json.dumps([super().fingerprint(), *(self.data(source)._fingerprint for source in sources)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
