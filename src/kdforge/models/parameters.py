"""Unique parameter count of a model (shared and aliased parameters once).

It lives with the models (not in :mod:`kdforge.evaluation.size`, which re-exports it) so that the
models package imports nothing from the evaluation.
"""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of unique parameter elements of ``model``.

    A parameter shared by several modules (e.g. tied input/output embeddings) counts once, and so
    do distinct parameter objects that view the same memory. Buffers (e.g. BatchNorm running
    statistics) are not parameters and are not counted."""
    seen: set[object] = set()
    total = 0
    for param in model.parameters():  # already deduplicated by object identity
        if trainable_only and not param.requires_grad:
            continue
        key: object = id(param)
        if param.device.type != "meta" and param.numel() > 0:
            key = (param.device, param.untyped_storage().data_ptr(), param.storage_offset(),
                   tuple(param.shape), tuple(param.stride()), param.dtype)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total
