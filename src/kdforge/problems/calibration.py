"""Calibration: expected calibration error and reliability diagrams.

Reference: C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On Calibration of Modern Neural
Networks", ICML 2017, section 2.

For each sample the *confidence* is the largest class probability and the *prediction* its
argmax. The interval (0, 1] is split into M equal-width bins, bin m = ((m-1)/M, m/M] for
m = 1..M (a confidence of exactly k/M falls in bin k; a confidence of 0, impossible for a
probability vector, is put in bin 1). With B_m the samples whose confidence falls in bin m:

    acc(B_m)  = 1/|B_m| * sum_{i in B_m} 1[prediction_i == label_i]
    conf(B_m) = 1/|B_m| * sum_{i in B_m} confidence_i
    ECE       = sum_{m=1}^{M} |B_m| / N * |acc(B_m) - conf(B_m)|

Probabilities are converted to float64 before binning, and the bin edges are computed as k/M,
so a float64 confidence equal to ``k / M`` lands in bin k exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits (max-subtracted, in the logits' dtype)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _bin_stats(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Per-bin sample counts, correct counts and confidence sums (arrays of length ``n_bins``)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must be a non-empty (N, C) array, got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0.0 or probs.max() > 1.0 + 1e-6:
        raise ValueError("probs must be probabilities in [0, 1] (apply softmax to logits first)")

    return _binned(probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64), n_bins)


def _binned(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    # searchsorted(side="left") returns m with edges[m-1] < conf <= edges[m]: the 1-based bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left"), 1, n_bins) - 1
    return {
        "edges": edges,
        "count": np.bincount(index, minlength=n_bins),
        "correct": np.bincount(index, weights=correct, minlength=n_bins),
        "confidence": np.bincount(index, weights=confidence, minlength=n_bins),
    }


def _ece(stats: dict[str, np.ndarray]) -> float:
    """ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)| = 1/N * sum_m |correct_m - conf_sum_m|."""
    return float(np.abs(stats["correct"] - stats["confidence"]).sum() / stats["count"].sum())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017) of a classifier, in [0, 1].

    ``probs``: (N, C) class probabilities (rows of a softmax); ``labels``: (N,) true class indices.
    Bins are ((m-1)/M, m/M] for m = 1..M with M = ``n_bins``, and

        ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|

    where acc is the fraction of argmax predictions that are correct and conf the mean max
    probability of the samples in bin m (see the module docstring)."""
    return _ece(_bin_stats(probs, labels, n_bins))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """The data of a reliability diagram, as a JSON-serialisable dict of plain Python values.

    Returns ``{"n_bins": M, "n_samples": N, "ece": float, "lower": [M floats], "upper": [M floats],
    "count": [M ints], "accuracy": [M floats or None], "confidence": [M floats or None]}``, where
    bin m covers (lower[m], upper[m]] and accuracy/confidence are ``None`` for empty bins.
    ``ece`` equals :func:`expected_calibration_error` on the same inputs."""
    return _reliability(_bin_stats(probs, labels, n_bins), n_bins)


def reliability_from_confidence(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """:func:`reliability_bins` from each prediction's confidence (its top probability) and whether it
    was right, for predictions too many to hold as probability rows (a language model's tokens)."""
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    if confidence.size == 0 or confidence.shape != correct.shape:
        raise ValueError(f"confidence and correct must be non-empty and of one length, got {confidence.shape} "
                         f"and {correct.shape}")
    return _reliability(_binned(confidence, correct, n_bins), n_bins)


def _reliability(stats: dict[str, np.ndarray], n_bins: int) -> dict[str, Any]:
    count = stats["count"]

    def per_bin_mean(total: np.ndarray) -> list[float | None]:
        return [float(t / c) if c else None for t, c in zip(total, count, strict=True)]

    return {
        "n_bins": int(n_bins),
        "n_samples": int(count.sum()),
        "ece": _ece(stats),
        "lower": stats["edges"][:-1].tolist(),
        "upper": stats["edges"][1:].tolist(),
        "count": [int(c) for c in count],
        "accuracy": per_bin_mean(stats["correct"]),
        "confidence": per_bin_mean(stats["confidence"]),
    }
