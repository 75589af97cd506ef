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

Comparing models (teacher vs student): :func:`interleaved_latency`
--------------------------------------------------------------------
Timing the teacher, then the student, one after the other is fragile on a shared machine: if
another process starts while the student is being timed, the student looks slow and the
speedup is wrong, and nothing in the numbers shows it. :func:`interleaved_latency` instead
times all models in one process, after each has been warmed up, in *rounds*: in round ``r``
every model is called once, in an order rotated by ``r`` (A,B,C / B,C,A / C,A,B / ...) so that
no model is always first (cache state, turbo clocks). A load change during the measurement then
hits every model in the rounds it lasts, and round ``r``'s timings form a pair measured under
the same conditions.

The speedup of a model over the reference is the ratio of medians
``median(reference ms) / median(model ms)``; its 95% interval is a *paired* bootstrap
(:func:`speedup_interval`): resample the round indices with replacement (the same indices for
both models), recompute the ratio of medians, and take the 2.5 / 97.5 percentiles of 1000
resamples (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, percentile interval).

Noise is flagged with one simple rule: the result is ``noisy`` when the 1-minute load average
before or after the measurement exceeds the number of CPUs available to this process by more than
``LOAD_MARGIN`` (half a CPU: the measurement's own threads count in the load average, so a load of
``cpus`` can be this process alone; beyond it another program competes for the cores), or when a
model's ``spread = (q75 - q25) / median`` (interquartile range over median of its timings) exceeds
``max_spread`` at some batch size.
:func:`describe_latency_noise` turns that into one line for the report.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

import numpy as np
import torch
from torch import nn

from kdforge.errors import KDForgeError


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


# --------------------------------------------------------------------------- interleaved comparison


def speedup_interval(
    ref_ms: Sequence[float], model_ms: Sequence[float], n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Speedup ``median(ref_ms) / median(model_ms)`` with a paired-bootstrap 95% interval.

    ``ref_ms[r]`` and ``model_ms[r]`` are the timings of round ``r`` (measured back to back, under
    the same load), so the rounds are resampled *together*: draw ``n`` round indices with
    replacement (``numpy.random.Generator(seed)``), recompute the ratio of medians on those rounds,
    repeat ``n_boot`` times; ``low`` / ``high`` are the 2.5th / 97.5th percentiles of the resampled
    ratios (percentile bootstrap, Efron & Tibshirani 1993). Returns ``(ratio, low, high)``."""
    ref = np.asarray(ref_ms, dtype=float)
    model = np.asarray(model_ms, dtype=float)
    if ref.ndim != 1 or ref.shape != model.shape or ref.size == 0:
        raise KDForgeError(f"speedup_interval needs two equally long, non-empty lists of per-round timings "
                           f"(one per round, paired), got {ref.size} and {model.size} values")
    if not (np.isfinite(ref).all() and np.isfinite(model).all() and (ref > 0).all() and (model > 0).all()):
        raise KDForgeError("speedup_interval needs finite, positive timings; a zero or negative duration "
                           "means the clock is too coarse for this forward pass: time a larger batch")
    if n_boot < 1:
        raise KDForgeError(f"speedup_interval needs n_boot >= 1, got {n_boot}")
    ratio = float(np.median(ref) / np.median(model))
    idx = np.random.default_rng(seed).integers(0, ref.size, size=(n_boot, ref.size))
    ratios = np.median(ref[idx], axis=1) / np.median(model[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return ratio, float(low), float(high)


def _interleaved_stats(ms: np.ndarray, batch_size: int) -> dict[str, float]:
    """The measure_latency entry for one batch size, plus quartiles and ``spread = IQR / median``."""
    median = float(np.median(ms))
    q25, q75 = (float(q) for q in np.percentile(ms, [25, 75]))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "per_sample_ms": median / batch_size,
        "q25_ms": q25,
        "q75_ms": q75,
        "spread": (q75 - q25) / median if median > 0 else 0.0,
    }


#: load above the CPU count that marks the machine as busy (see the module docstring)
LOAD_MARGIN = 0.5


def _load_average() -> list[float] | None:
    """``os.getloadavg()`` (1, 5, 15 minutes) as a list, or None where the OS has none."""
    try:
        return [float(x) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def interleaved_latency(
    forwards: dict[str, Callable[[int], Any]],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
    reference: str | None = None,
    max_spread: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Time several models interleaved in rounds, with paired-bootstrap speedups (module docstring).

    ``forwards[name](batch_size)`` runs one inference of model ``name`` on a prepared input. For
    each batch size: ``warmup`` untimed calls of every model, then ``repeats`` rounds; round ``r``
    calls every model once, in the order of ``forwards`` rotated left by ``r`` (A,B,C / B,C,A /
    ...), each call timed with :func:`time.perf_counter` with the garbage collector disabled. Runs
    under ``torch.inference_mode()`` with denormals flushed, and sets / restores
    ``torch.set_num_threads`` as :func:`measure_latency` does.

    Returns (JSON-serialisable, batch-size keys as strings)::

        {"models": {name: <measure_latency format; per batch size also q25_ms, q75_ms, spread>},
         "speedup": {name: {"<bs>": {"ratio": r, "low": l, "high": h}}},   # every name but the reference
         "reference": name, "max_spread": max_spread,
         "load": {"before": [1, 5, 15-min load] | None, "after": [...] | None, "cpus": n},
         "noisy": bool, "noisy_reasons": [str, ...]}

    ``ratio = median(reference) / median(model)`` (> 1: the model is faster), with the 95% interval
    of :func:`speedup_interval` over the rounds (``seed``, 1000 resamples). ``reference`` defaults
    to the first model. ``noisy`` is true when the 1-minute load average before or after exceeds
    ``load.cpus`` (CPUs available to this process) + ``LOAD_MARGIN`` or a model's spread exceeds ``max_spread``."""
    names = list(forwards)
    if not names:
        raise KDForgeError("interleaved_latency needs at least one model in `forwards` (name -> forward)")
    reference = names[0] if reference is None else reference
    if reference not in forwards:
        raise KDForgeError(f"latency reference {reference!r} is not one of the measured models {names}; "
                           f"pass one of those names as `reference`")
    if warmup < 0 or repeats < 1:
        raise KDForgeError(f"latency needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}; "
                           f"fix latency_warmup / latency_repeats")
    sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    if not sizes or any(bs < 1 for bs in sizes):
        raise KDForgeError(f"latency batch sizes must be positive integers, got {list(batch_sizes)}; "
                           f"fix latency_batch_sizes")
    if max_spread < 0:
        raise KDForgeError(f"max_spread must be >= 0 (IQR / median), got {max_spread}")

    load_before = _load_average()
    timings: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in sizes} for name in names}
    previous_threads = torch.get_num_threads()
    flushing = torch.set_flush_denormal(True)
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        with torch.inference_mode():
            for bs in sizes:
                for _ in range(warmup):
                    for name in names:
                        forwards[name](bs)
                gc.collect()
                gc_was_enabled = gc.isenabled()
                gc.disable()  # as timeit does: keep collector pauses out of the timings
                try:
                    for r in range(repeats):
                        shift = r % len(names)
                        for name in names[shift:] + names[:shift]:
                            start = perf_counter()
                            forwards[name](bs)
                            timings[name][bs].append((perf_counter() - start) * 1e3)
                finally:
                    if gc_was_enabled:
                        gc.enable()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        if flushing:
            torch.set_flush_denormal(False)
    load_after = _load_average()
    cpus = _available_cpus()

    models = {
        name: {"threads": used_threads, "warmup": warmup, "repeats": repeats,
               "batch_sizes": {str(bs): _interleaved_stats(np.asarray(timings[name][bs]), bs) for bs in sizes}}
        for name in names
    }
    speedup: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        if name == reference:
            continue
        speedup[name] = {}
        for bs in sizes:
            ratio, low, high = speedup_interval(timings[reference][bs], timings[name][bs], seed=seed)
            speedup[name][str(bs)] = {"ratio": ratio, "low": low, "high": high}

    reasons = []
    peak_load = max((load[0] for load in (load_before, load_after) if load is not None), default=None)
    if peak_load is not None and peak_load > cpus + LOAD_MARGIN:
        reasons.append(f"machine load {peak_load:.1f} on {cpus} CPUs")
    for name in names:
        worst_bs, worst = max(((bs, s["spread"]) for bs, s in models[name]["batch_sizes"].items()),
                              key=lambda item: item[1])
        if worst > max_spread:
            reasons.append(f"{name} timings spread {worst:.0%} (IQR/median) at batch {worst_bs}")
    return {
        "models": models,
        "speedup": speedup,
        "reference": reference,
        "max_spread": max_spread,
        "load": {"before": load_before, "after": load_after, "cpus": cpus},
        "noisy": bool(reasons),
        "noisy_reasons": reasons,
    }


def describe_latency_noise(result: dict[str, Any], rerun_hint: str = "kdforge bench-latency RUN_DIR") -> str | None:
    """One line for the report when :func:`interleaved_latency` flagged its result ``noisy``, else None.

    E.g. ``latency noisy: machine load 3.1 on 2 CPUs; student timings spread 34% (IQR/median) at
    batch 1 — re-measure on an idle machine with `kdforge bench-latency RUN_DIR```."""
    if not result.get("noisy"):
        return None
    reasons = "; ".join(result.get("noisy_reasons") or []) or "unstable timings"
    return f"latency noisy: {reasons} — re-measure on an idle machine with `{rerun_hint}`"
