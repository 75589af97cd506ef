"""GLUE tasks read from the standard GLUE TSV folders (``train.tsv`` and ``dev.tsv``).

Each task says which columns hold its sentences and label, how labels are written in the files
and which metrics GLUE reports for it (the first is the main metric).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.paths import resolve_data_path
from kdforge.tasks.base import TASKS
from kdforge.tasks.text_base import Example, TextTask, label_id, read_delimited, score


class GlueTask(TextTask):
    """A GLUE task described by class attributes; subclasses only fill them in."""

    folder: ClassVar[str]
    text_a_column: ClassVar[str]
    text_b_column: ClassVar[str | None] = None
    label_column: ClassVar[str] = "label"
    file_labels: ClassVar[tuple[str, ...]] = ("0", "1")
    """Labels as written in the files, in label-id order (empty for regression)."""
    glue_label_names: ClassVar[tuple[str, ...]] = ()
    validation_file_format = "a TSV laid out like the task's train.tsv"
    headerless_columns: ClassVar[tuple[str, ...] | None] = None
    """Column names of a file without a header line (CoLA)."""

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.label_names = list(self.glue_label_names)
        self._label_ids = {label: i for i, label in enumerate(self.file_labels)}

    def data_folder(self) -> Path:
        return resolve_data_path(self.config.data_dir, f"glue/{self.folder}")

    def read_split(self, split: str) -> list[Example]:
        path = self.data_folder() / f"{split}.tsv"
        if not path.is_file():
            raise KDForgeError(f"{path} not found; point `task.data_dir` at the GLUE {self.folder} folder "
                               "holding train.tsv and dev.tsv")
        return self.read_file(path)

    def read_file(self, path: Path) -> list[Example]:
        """The examples of a TSV laid out like this task's GLUE files."""
        table = read_delimited(path, "\t", columns=self.headerless_columns)
        fix = f"point `task.data_dir` at the GLUE {self.folder} folder"
        a = table.column(self.text_a_column, fix)
        b = None if self.text_b_column is None else table.column(self.text_b_column, fix)
        y = table.column(self.label_column, fix)
        return [{"text_a": row[a], "text_b": None if b is None else row[b],
                 "label": self.target(row[y], f"line {line} of {path}")} for line, row in table.rows]

    def target(self, value: str, where: str) -> int | float:
        fix = f"fix the row or point `task.data_dir` at the GLUE {self.folder} folder"
        if self.problem.classes:
            return label_id(value, self._label_ids, where, fix)
        return score(value, where, fix)


@TASKS.register("glue/sst2")
class SST2(GlueTask):
    """Stanford Sentiment Treebank: sentence polarity."""

    folder = "SST-2"
    text_a_column = "sentence"
    glue_label_names = ("negative", "positive")


@TASKS.register("glue/mrpc")
class MRPC(GlueTask):
    """Microsoft Research Paraphrase Corpus: are the two sentences paraphrases?"""

    folder = "MRPC"
    text_a_column = "#1 String"
    text_b_column = "#2 String"
    label_column = "Quality"
    glue_label_names = ("not_equivalent", "equivalent")
    main_metric = "f1"
    metric_names = ("f1", "accuracy")


@TASKS.register("glue/rte")
class RTE(GlueTask):
    """Recognizing Textual Entailment: does sentence1 entail sentence2?"""

    folder = "RTE"
    text_a_column = "sentence1"
    text_b_column = "sentence2"
    file_labels = ("entailment", "not_entailment")
    glue_label_names = ("entailment", "not_entailment")


@TASKS.register("glue/cola")
class CoLA(GlueTask):
    """Corpus of Linguistic Acceptability: is the sentence grammatical? (files have no header)"""

    folder = "CoLA"
    text_a_column = "sentence"
    headerless_columns = ("source", "label", "original_label", "sentence")
    glue_label_names = ("unacceptable", "acceptable")
    main_metric = "mcc"
    metric_names = ("mcc", "accuracy")


@TASKS.register("glue/stsb")
class STSB(GlueTask):
    """Semantic Textual Similarity Benchmark: similarity score 0-5 of a sentence pair."""

    folder = "STS-B"
    text_a_column = "sentence1"
    text_b_column = "sentence2"
    label_column = "score"
    file_labels = ()
    problem_type = "regression"
    main_metric = "pearson"
    metric_names = ("pearson", "spearman")
