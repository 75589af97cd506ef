"""CPU inference latency: warm-up, then the median / p90 / mean of repeated timed forward passes.

The result of :func:`measure_latency` (and :func:`model_latency`) is JSON-serialisable and keyed
by batch size as a *string* (``"1"``, ``"32"``), so it reads the same before and after a JSON
round trip::

    {"threads": 4, "warmup": 3, "repeats": 10,
     "batch_sizes": {"1": {"median_ms": 2.1, "p90_ms": 2.4, "mean_ms": 2.2, "per_sample_ms": 2.1},
                     "32": {...}}}

``per_sample_ms`` is ``median_ms / batch_size``; ``p90_ms`` is numpy's linearly interpolated
90th percentile. Timings are wall-clock (:func:`time.perf_counter`) of a synchronous call, so they
are meaningful for CPU models; move the model to the CPU before measuring.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

import numpy as np
import torch
from torch import nn


def _time_runs(forward: Callable[[int], Any], batch_size: int, warmup: int, repeats: int) -> list[float]:
    """``warmup`` untimed calls, then ``repeats`` timed calls; durations in milliseconds."""
    for _ in range(warmup):
        forward(batch_size)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: keep collector pauses out of the timings
    try:
        durations = []
        for _ in range(repeats):
            start = perf_counter()
            forward(batch_size)
            durations.append((perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return durations


def measure_latency(
    forward: Callable[[int], Any],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time ``forward(batch_size)`` (one inference on a prepared input) for each batch size.

    Runs under ``torch.inference_mode()`` with denormal floats flushed to zero
    (``torch.set_flush_denormal``, the FTZ/DAZ setting CPU inference servers use): without it a
    model whose activations underflow into denormals runs many times slower on x86 (a trained
    1-layer Llama: 44 ms -> 3.6 ms), which would measure the CPU's slow path, not the model.
    If ``threads`` is given, ``torch.set_num_threads`` is set for the measurement and the previous
    value is restored afterwards, even on error. Returns the dict described in the module
    docstring (batch-size keys are strings)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if not batch_sizes or any(int(bs) < 1 for bs in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    previous_threads = torch.get_num_threads()
    flushing = torch.set_flush_denormal(True)
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        results: dict[str, dict[str, float]] = {}
        with torch.inference_mode():
            for bs in dict.fromkeys(int(b) for b in batch_sizes):
                ms = np.asarray(_time_runs(forward, bs, warmup, repeats))
                median = float(np.median(ms))
                results[str(bs)] = {
                    "median_ms": median,
                    "p90_ms": float(np.percentile(ms, 90)),
                    "mean_ms": float(ms.mean()),
                    "per_sample_ms": median / bs,
                }
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        if flushing:
            torch.set_flush_denormal(False)
    return {"threads": used_threads, "warmup": warmup, "repeats": repeats, "batch_sizes": results}


def text_inputs(
    tokenizer_or_vocab_size: Any, batch_size: int, seq_len: int, device: str | torch.device = "cpu",
    seed: int = 0, vocab_limit: int | None = None,
) -> dict[str, torch.Tensor]:
    """A fixed-length (``batch_size`` x ``seq_len``) text batch for latency measurement.

    ``input_ids`` are drawn uniformly (seeded) from [1000, vocab) so that special tokens, which
    sit at low ids in BERT-style vocabularies, are avoided (from [1, vocab) when vocab <= 1000);
    ``attention_mask`` is all ones and ``token_type_ids`` all zeros. Given a tokenizer, the vocab
    is ``len(tokenizer)`` and only the keys in its ``model_input_names`` are returned (e.g. no
    ``token_type_ids`` for DistilBERT); given an int, all three keys are returned. ``vocab_limit``
    caps the vocab (a compressed-vocabulary tokenizer has more strings than the model has ids)."""
    if isinstance(tokenizer_or_vocab_size, int):
        vocab, names = tokenizer_or_vocab_size, None
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)
        names = getattr(tokenizer, "model_input_names", None)
    if vocab_limit is not None:
        vocab = min(vocab, vocab_limit)
    if vocab < 2:
        raise ValueError(f"vocabulary size must be at least 2, got {vocab}")
    low = 1000 if vocab > 1000 else 1
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len)
    batch = {
        "input_ids": torch.randint(low, vocab, shape, generator=generator),
        "attention_mask": torch.ones(shape, dtype=torch.long),
        "token_type_ids": torch.zeros(shape, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items() if names is None or k in names}


def image_inputs(
    batch_size: int, shape: Sequence[int], device: str | torch.device = "cpu", seed: int = 0
) -> torch.Tensor:
    """A seeded standard-normal float batch of shape ``(batch_size, *shape)``, e.g. shape (3, 32, 32)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *shape), generator=generator).to(device)


def model_latency(
    model: nn.Module,
    make_inputs: Callable[[int], dict[str, torch.Tensor] | torch.Tensor],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """:func:`measure_latency` of ``model`` in eval mode on inputs from ``make_inputs(batch_size)``.

    Inputs are built once per batch size before timing; a dict is passed as keyword arguments
    (``model(**inputs)``), a tensor positionally (``model(inputs)``). The model's train/eval
    mode is restored afterwards."""
    prepared = {int(bs): make_inputs(int(bs)) for bs in batch_sizes}

    def forward(batch_size: int) -> Any:
        inputs = prepared[batch_size]
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    was_training = model.training
    model.eval()
    try:
        return measure_latency(forward, batch_sizes, warmup=warmup, repeats=repeats, threads=threads)
    finally:
        model.train(was_training)
