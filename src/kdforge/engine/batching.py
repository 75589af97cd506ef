"""Deterministic, resumable batch order.

The order of epoch ``e`` depends only on (seed, e): a permutation drawn from its own generator,
padded by wrapping to a multiple of the process count and dealt round-robin to ranks (as
``DistributedSampler`` does). Resuming mid-epoch therefore only needs the number of batches
already consumed, and no global RNG is touched by data ordering.
"""

from __future__ import annotations

import math

import torch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True, drop_last: bool = False) -> list[list[int]]:
    """Index batches of this rank for one epoch (the last may be smaller, or dropped with ``drop_last``)."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    total = math.ceil(n / world) * world
    order = (order * math.ceil(total / max(1, n)))[:total] if n else []
    mine = order[rank::world]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return [b for b in batches if len(b) == batch_size] if drop_last else batches


def batches_per_epoch(n: int, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
    rows = math.ceil(n / world)
    return rows // batch_size if drop_last else math.ceil(rows / batch_size)
