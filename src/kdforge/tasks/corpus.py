"""Unlabeled text for general-distillation stages (TinyBERT's general distillation, GLMD's
word-prediction stages): sentences of GLUE training files and/or plain-text files."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from kdforge.config import CorpusConfig, TaskConfig
from kdforge.errors import KDForgeError
from kdforge.tasks.base import ListDataset, Task
from kdforge.tasks.language_model import LMCollator
from kdforge.tasks.passages import corpus_texts
from kdforge.tasks.text_base import TextCollator

__all__ = ["CorpusTask", "corpus_texts"]


class CorpusTask(Task):
    """Unlabeled passages as a training split (no labels, no metric, no evaluation split)."""

    modality = "text"
    main_metric = ""

    def __init__(self, config: CorpusConfig, language_model: bool = False):
        super().__init__(TaskConfig(name="corpus", max_length=config.max_length))
        self.corpus = config
        self.language_model = language_model  # collate next-token labels (for a causal LM's corpus stage)
        self._data: ListDataset | None = None

    def load_split(self, split: str) -> ListDataset:
        if split != "train":
            raise KDForgeError("a corpus stage has only training text; it is not evaluated")
        if self._data is None:
            self._data = ListDataset([{"text_a": t, "text_b": None, "label": 0} for t in corpus_texts(self.corpus)])
        return self._data

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {}

    def collator(self, tokenizer: Any = None, train: bool = False):
        if self.language_model:
            return LMCollator(tokenizer, self.config.max_length)
        return TextCollator(tokenizer, self.config.max_length)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.corpus.model_dump_json().encode()).hexdigest()[:16]
