"""How much similarity information between classes a classifier's responses carry (its "dark knowledge").

Hinton et al. (2015) distil the probabilities a teacher gives the wrong classes; Vats & Crandall (2021),
"Controlling the Quality of Distillation in Response-Based Network Compression" (arXiv:2112.10047),
argue that a well-trained high-capacity teacher loses this similarity information while it learns
fine-grained discrimination. Measured on the reported split, from the model's logits z_i (N x C) and the
gold labels y_i, at temperature 1, for C >= 3 classes (with two classes there is one non-target class
and nothing to measure: None):

* ``non_target_entropy``: the mean normalised entropy of the non-target distribution,
  q_i = softmax over the C - 1 non-target logits of example i (the non-target probabilities
  renormalised to sum to 1, computed without underflow however confident the model is),

      H = (1/N) sum_i ( - sum_{j != y_i} q_i[j] log q_i[j] ) / log(C - 1)        in [0, 1];

  1: the wrong classes are all alike to the model (no similarity information), lower: it ranks them.
* ``confusion_rank_correlation``: Spearman's rank correlation, over the ordered class pairs (a, b),
  a != b, of the mean non-target distribution M[a, b] = mean_{i: y_i = a} q_i[b] with the model's
  confusion rate K[a, b] = |{i: y_i = a, argmax z_i = b}| / |{i: y_i = a}|: whether the classes it
  calls similar are those it confuses (None when either is constant, e.g. no errors at all).
* ``non_target_mass``: the mean probability of the wrong classes, (1/N) sum_i (1 - p_i[y_i]), for any
  C >= 2 (how soft the responses are, not which classes they relate).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def non_target_distributions(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, C - 1) q_i: softmax over each row's non-target logits (the target column removed)."""
    n, c = logits.shape
    keep = np.ones((n, c), dtype=bool)
    keep[np.arange(n), labels] = False
    return np.exp(_log_softmax(logits[keep].reshape(n, c - 1)))


def similarity_information(logits, labels) -> dict[str, float | None]:
    """The measures of the module docstring for ``logits`` (N, C) and gold ``labels`` (N,)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"logits must be (N, C) for N = {labels.shape[0]} labels, got shape {logits.shape}")
    n, c = logits.shape
    p_target = np.exp(_log_softmax(logits)[np.arange(n), labels])
    out: dict[str, float | None] = {"non_target_mass": float(np.mean(1.0 - p_target)), "non_target_entropy": None,
                                    "confusion_rank_correlation": None}
    if c < 3:
        return out
    q = non_target_distributions(logits, labels)
    entropy = -(q * np.log(np.clip(q, 1e-300, None))).sum(axis=1) / math.log(c - 1)
    out["non_target_entropy"] = float(entropy.mean())
    predicted = logits.argmax(axis=1)
    soft, hard = [], []
    for a in np.unique(labels):
        rows = labels == a
        others = [b for b in range(c) if b != a]
        soft += list(q[rows].mean(axis=0))  # q's columns are the classes other than a, in order
        hard += [float(np.mean(predicted[rows] == b)) for b in others]
    if np.ptp(soft) > 0 and np.ptp(hard) > 0:
        out["confusion_rank_correlation"] = float(stats.spearmanr(soft, hard).statistic)
    return out
