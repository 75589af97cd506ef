"""Unlabeled text for general-distillation stages (TinyBERT's general distillation, GLMD's
word-prediction stages): sentences of GLUE training files and/or plain-text files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.config import CorpusConfig, TaskConfig
from kdforge.errors import KDForgeError
from kdforge.tasks.base import ListDataset, Task, build_task
from kdforge.tasks.text_base import TextCollator


def corpus_texts(config: CorpusConfig, data_dir_of: Callable[[str], str | None] = lambda name: None,
                 split: str = "train", files: list[str] | None = None, limit: int | None = None,
                 files_key: str = "corpus.files") -> list[str]:
    """Distinct passages in a fixed order (the sentences of the GLUE tasks' ``split`` first, then the
    lines of ``files``, default ``config.files``), a fixed random sample of ``limit`` (default
    ``config.limit``) of them."""
    texts: list[str] = []
    for name in config.glue:
        task = build_task(TaskConfig(name=f"glue/{name}", data_dir=data_dir_of(name)))
        for example in task.split(task.eval_split if split != "train" else "train"):
            texts += [t for t in (example["text_a"], example["text_b"]) if t]
    for file in config.files if files is None else files:
        path = Path(file)
        if not path.is_file():
            raise KDForgeError(f"text file {path} not found; fix `{files_key}`")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = list(dict.fromkeys(texts))
    limit = config.limit if limit is None else limit
    if limit and limit < len(texts):
        keep = np.sort(np.random.default_rng(config.sample_seed).choice(len(texts), limit, replace=False))
        texts = [texts[i] for i in keep]
    return texts


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
            from kdforge.tasks.language_model import LMCollator

            return LMCollator(tokenizer, self.config.max_length)
        return TextCollator(tokenizer, self.config.max_length, regression=False)

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.corpus.model_dump_json().encode()).hexdigest()[:16]
