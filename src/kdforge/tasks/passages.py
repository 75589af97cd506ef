"""Text passages for corpus stages and the ``lm`` task: the sentences of GLUE tasks' files and the
lines of plain-text files, deduplicated, optionally a fixed random sample."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdforge.config import CorpusConfig, TaskConfig
from kdforge.errors import KDForgeError
from kdforge.tasks.base import build_task


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
