"""Calibration batches for static int8 (:func:`kdforge.deploy.quantize.quantize_static_int8`).

A fixed sample of the task's *training* rows (``export.calibration_rows``, drawn with
:data:`CALIBRATION_SEED`), never the validation or the reported split: the quantisation ranges are
fitted like any other parameter, on training data, so that a score on a held-out split stays a held-out
score. The rows are collated by the task's evaluation collator with the exported model's tokenizer (no
augmentation) and cast to the ONNX file's declared inputs by
:func:`kdforge.deploy.onnx_runtime.session_feeds`, exactly as the file is fed when it is scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdforge.models.loading import LoadedModel

#: the split the calibration rows are drawn from
CALIBRATION_SPLIT = "train"
#: the seed of the calibration sample
CALIBRATION_SEED = 0


def calibration_rows(n_rows: int, count: int, seed: int = CALIBRATION_SEED) -> list[int]:
    """``min(count, n_rows)`` distinct row indices of ``range(n_rows)`` drawn with ``seed``, sorted."""
    if count < 1:
        raise ValueError(f"calibration needs at least 1 row, got {count}")
    picked = np.random.default_rng(seed).choice(n_rows, size=min(count, n_rows), replace=False)
    return sorted(int(i) for i in picked)


def calibration_batches(task, loaded: LoadedModel, onnx_path: Path, count: int,
                        batch_size: int) -> tuple[list[int], Iterator[dict[str, np.ndarray]]]:
    """The :func:`calibration_rows` of ``task``'s training split (indices into it) and the ONNX file's
    numpy inputs of those rows in batches of ``batch_size`` (collated lazily, one batch at a time)."""
    from kdforge.deploy.onnx_runtime import make_session, session_feeds

    data = task.split(CALIBRATION_SPLIT)
    rows = calibration_rows(len(data), count)
    collate = task.collator(loaded.tokenizer, train=False)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        session = make_session(onnx_path, threads=1)
        for start in range(0, len(rows), batch_size):
            yield session_feeds(session, collate([data[i] for i in rows[start:start + batch_size]]))

    return rows, batches()
