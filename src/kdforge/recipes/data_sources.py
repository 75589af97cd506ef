"""Data sources: what a stage learns from, selected by ``stages[i].data``.

* ``task``: the task's own labelled data.
* ``corpus``: unlabeled text (general distillation, GLMD's word-prediction stages).

(``ptp``, Pea-KD's teacher-prediction labels, lives in :mod:`kdforge.recipes.ptp`; ``fsbbt``, the few
training inputs grown into a synthetic set labelled by a black-box teacher, in :mod:`kdforge.recipes.fsbbt`.)
"""

from __future__ import annotations

import hashlib
from typing import Any

from kdforge.config import CorpusConfig, JobConfig, StageConfig
from kdforge.models.loading import LoadedModel
from kdforge.recipes.base import DATA_SOURCES, DataSource, StageData
from kdforge.tasks.base import ListDataset, Task
from kdforge.tasks.language_model import LMCollator
from kdforge.tasks.passages import corpus_texts
from kdforge.tasks.text_base import TextCollator


@DATA_SOURCES.register("task")
class TaskData(DataSource):
    """``data: task`` (the default): the task's training split, scored on its selection split."""

    carries = frozenset({"labels", "gold_labels"})
    learns_task = True

    def build(self, stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig,
              device) -> StageData:
        return StageData(task.name, task.split("train"), task.collator, task.fingerprint(), self.carries,
                         selection=task.split(task.selection_split), selection_split=task.selection_split,
                         scorer=task, num_labels=task.num_labels, label_names=list(task.label_names),
                         random_train_inputs=task.random_train_inputs)


@DATA_SOURCES.register("corpus")
class Corpus(DataSource):
    """``data: corpus`` with ``corpus: {glue: [...], files: [...]}``: unlabeled passages, not scored."""

    Params = CorpusConfig

    def texts(self) -> list[str]:
        return corpus_texts(self.params)

    def input_lengths(self) -> dict[str, int]:
        return {"max_length": self.params.max_length}

    def build(self, stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig,
              device) -> StageData:
        language_model = task.problem.causal_lm  # collate next-token labels
        max_length = self.params.max_length

        def collator(tokenizer: Any = None, train: bool = False):
            if language_model:
                return LMCollator(tokenizer, max_length)
            return TextCollator(tokenizer, max_length)

        passages = ListDataset([{"text_a": t, "text_b": None, "label": 0} for t in self.texts()])
        fingerprint = hashlib.sha256(self.params.model_dump_json().encode()).hexdigest()[:16]
        return StageData("corpus", passages, collator, fingerprint, self.carries)
