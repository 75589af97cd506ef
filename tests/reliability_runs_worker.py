"""Run under ``torchrun --nproc_per_node 2`` by tests/test_reliability_runs.py: a tiny regression
trained by the engine over gloo, with the CLI's logging and a ``train.log``. Its evaluation scores
the shard of the data that belongs to the process (as a sharded evaluation would), so every
process would see its own number unless the engine makes them agree. Each process writes what it
computed to ``rank-<r>.json``."""

import json
import os
import sys
from pathlib import Path

import torch

from kdforge.cli import setup_logging
from kdforge.config import TrainConfig
from kdforge.engine.step import TrainStep
from kdforge.engine.trainer import Trainer
from kdforge.run_folder import RunFolder


class Regression(TrainStep):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.learner = torch.nn.Linear(4, 1)

    def forward(self, batch, progress):
        loss = ((self.learner(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return loss, {"mse": float(loss)}


def rows(n: int = 48) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(n, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def collate(examples: list[dict]) -> dict:
    return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}


def main(out: str) -> None:
    setup_logging()
    out_dir = Path(out)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = rows(40)

    def evaluate(learner):
        shard = collate(dev[rank::world])
        with torch.no_grad():
            return {"mse": float(((learner(shard["x"]).squeeze(-1) - shard["y"]) ** 2).mean())}

    config = TrainConfig(epochs=3, batch_size=4, lr=0.02, seed=0, device="cpu", select_best=True, log_every=100)
    with RunFolder(out_dir).keep_log():
        trainer = Trainer(Regression(), rows(), collate, config, out_dir, evaluate=evaluate, main_metric="mse",
                          greater_is_better=False)
        state = trainer.fit()
    (out_dir / f"rank-{rank}.json").write_text(json.dumps({
        "scores": [h["mse"] for h in state.history], "best_epoch": state.best_epoch,
        "best": state.best_metric, "weight": trainer.unwrapped.learner.weight.tolist()}))


if __name__ == "__main__":
    main(sys.argv[1])
