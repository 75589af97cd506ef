"""Batched inference over a split: the model's outputs batch by batch, or all logits and labels."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kdforge.models.outputs import Outputs


@torch.inference_mode()
def iterate_outputs(adapter: torch.nn.Module, data: Dataset, collate_fn: Callable, batch_size: int = 64,
                    device: torch.device | str = "cpu", desc: str = "eval") -> Iterator[tuple[Outputs, dict]]:
    """``(adapter(batch), batch)`` for every batch of ``data`` in order, in eval mode; the previous
    mode is restored when the iteration ends."""
    was_training = adapter.training
    adapter.eval()
    try:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                            generator=torch.Generator())  # leaves the global RNG untouched
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            yield adapter(batch), batch
    finally:
        adapter.train(was_training)


def predict(adapter: torch.nn.Module, data: Dataset, collate_fn: Callable, batch_size: int = 64,
            device: torch.device | str = "cpu", desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Run ``adapter`` (a ModelAdapter) in eval mode over ``data``: all logits and labels."""
    logits, labels = [], []
    for out, batch in iterate_outputs(adapter, data, collate_fn, batch_size, device, desc):
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()
