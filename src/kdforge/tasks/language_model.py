"""Causal language modelling (``task.name: lm``): next-token prediction on plain text, scored by
held-out perplexity.

The text comes from ``task.corpus``: training passages are the sentences of the listed GLUE tasks'
training files plus the lines of ``corpus.files``; held-out passages are the same GLUE tasks' dev
sentences plus the lines of ``task.dev_file``. Each passage is one sequence (truncated to
``task.max_length`` tokens, padded per batch).

Metrics over every predicted token (position j predicts token j + 1 of the same passage; padding
never counts), with N the number of predicted tokens:

    cross_entropy = -1/N * sum log p(x_{j+1} | x_{<=j})          (nats per token)
    perplexity    = exp(cross_entropy)
    accuracy      = share of tokens where the argmax is the next token

ECE is token-level: each predicted token is one prediction whose confidence is its top probability.
A (batch, length, vocabulary) logit tensor per split would not fit in memory, so :meth:`evaluate`
accumulates these sums batch by batch instead of collecting logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.problems.calibration import reliability_from_confidence
from kdforge.problems.kinds import IGNORE, next_token_targets
from kdforge.tasks.base import TASKS, ListDataset, Scores, Task
from kdforge.tasks.passages import corpus_texts


class LMCollator:
    """Tokenizes passages with dynamic padding; ``labels`` are the input ids with padding set to -100
    (the model's logits at position j are scored against ``labels[j + 1]``)."""

    def __init__(self, tokenizer: Any, max_length: int):
        if tokenizer.pad_token is None:  # GPT-style tokenizers have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer([e["text_a"] for e in batch], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt")
        out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, IGNORE)
        return out


@TASKS.register("lm")
class LanguageModelTask(Task):
    """Next-token prediction on text passages; main metric held-out perplexity (lower is better)."""

    modality = "text"
    problem_type = "language_modeling"
    main_metric = "perplexity"
    greater_is_better = False
    validation_file_format = "a text file, one passage per line"

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        if config.corpus is None:
            raise KDForgeError("task `lm` needs its text: set task.corpus (e.g. `corpus: {glue: [sst2]}`) and, "
                               "for your own held-out text, task.dev_file")
        self._splits: dict[str, ListDataset] = {}

    def load_split(self, split: str) -> ListDataset:
        if split not in ("train", self.eval_split):
            raise KDForgeError(f"task lm has no split {split!r}; use 'train' or {self.eval_split!r}")
        if split not in self._splits:
            corpus = self.config.corpus
            if split == "train":
                texts = corpus_texts(corpus, split="train", files_key="task.corpus.files")
            else:  # held out: every GLUE dev sentence / dev_file line (eval_limit samples them)
                texts = corpus_texts(corpus, split="dev", files=[self.config.dev_file] if self.config.dev_file
                                     else [], limit=0, files_key="task.dev_file")
            self._splits[split] = ListDataset([{"text_a": t, "text_b": None, "label": 0} for t in texts])
        return self._splits[split]

    def read_validation_file(self, path: Path) -> ListDataset:
        """Distinct non-blank lines of ``path``, one passage each (like ``corpus.files``)."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise KDForgeError(f"cannot read the validation file {path} ({err}); fix `task.validation`") from None
        texts = dict.fromkeys(line.strip() for line in lines if line.strip())
        return ListDataset([{"text_a": t, "text_b": None, "label": 0} for t in texts])

    def collator(self, tokenizer: Any = None, train: bool = False) -> Callable[[list[dict]], dict]:
        if tokenizer is None:
            raise KDForgeError("task lm needs a tokenizer; use a causal language model for `teacher.model`")
        return LMCollator(tokenizer, self.config.max_length)

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics from collected (N, L, V) logits and (N, L) labels (small data only; see evaluate)."""
        nll, _, hit = _token_scores(torch.as_tensor(predictions).double(), torch.as_tensor(labels))
        return _metrics(nll, int(hit.sum()), len(hit))

    def evaluate(self, adapter: torch.nn.Module, data: Dataset, collate_fn: Callable, batch_size: int,
                 device: torch.device | str = "cpu", ece_bins: int = 15, desc: str = "eval") -> Scores:
        from kdforge.engine.predict import iterate_outputs

        nll, confidence, correct = 0.0, [], []
        for out, batch in iterate_outputs(adapter, data, collate_fn, batch_size, device, desc):
            batch_nll, top_prob, hit = _token_scores(out.logits.float(), batch["labels"])
            nll += batch_nll
            confidence.append(top_prob.double().cpu())
            correct.append(hit.cpu())
        hits = torch.cat(correct)
        if len(hits) == 0:
            raise KDForgeError("the held-out text has no token to predict (every passage is one token long)")
        bins = reliability_from_confidence(torch.cat(confidence).numpy(), hits.numpy(), ece_bins)
        return Scores(_metrics(nll, int(hits.sum()), len(hits)), bins["ece"], bins)


def _token_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the next tokens, and per predicted token its top
    probability and whether the argmax was the next token."""
    logits, targets = next_token_targets(logits, labels)
    log_probs = logits.log_softmax(-1)
    top, guess = log_probs.max(-1)
    return -log_probs.gather(1, targets[:, None]).sum().item(), top.exp(), guess == targets


def _metrics(nll_sum: float, correct: int, n: int) -> dict[str, float]:
    ce = nll_sum / n
    return {"perplexity": math.exp(ce), "cross_entropy": ce, "accuracy": correct / n}
