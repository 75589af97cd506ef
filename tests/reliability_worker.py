"""Run in spawned processes by tests/test_reliability_files.py: kept small (torch and kdforge.recipes.teacher_cache
only, no transformers) so that a fresh interpreter starts fast."""

import time
from pathlib import Path

import torch


def bag_teacher() -> torch.nn.Module:
    """A plain nn.Module classifier (mean of token embeddings, then a linear layer), the same in every process."""
    torch.manual_seed(0)

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(100, 8), torch.nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1))

    return Bag()


def rows(n: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"inputs": torch.randint(0, 100, (5,), generator=g)} for _ in range(n)]


def collate(examples: list[dict]) -> dict:
    return {"inputs": torch.stack([e["inputs"] for e in examples])}


def share_one_cache(folder: str, worker: int, barrier, counter: str) -> None:
    """First hammer one file with save_torch_atomic, then build the cache entry that the other
    process builds at the same moment; the entry's logits are saved to ``logits-<worker>.pt``."""
    import kdforge.recipes.teacher_cache as cache
    from kdforge.engine.checkpoint import save_torch_atomic

    barrier.wait()
    for i in range(30):
        save_torch_atomic({"worker": worker, "i": i, "x": torch.full((50_000,), float(i))}, Path(folder) / "shared.pt")
    real = cache.compute_outputs

    def counted(*args, **kwargs):
        with open(counter, "a") as handle:
            handle.write(f"{worker}\n")
        time.sleep(1.0)  # a slow teacher: the other process arrives while this one builds
        return real(*args, **kwargs)

    cache.compute_outputs = counted
    barrier.wait()
    store = cache.TeacherCache.load_or_build(bag_teacher(), rows(), collate, "shared", batch_size=4,
                                             folder=Path(folder) / "cache").store
    torch.save(store["logits"], Path(folder) / f"logits-{worker}.pt")
