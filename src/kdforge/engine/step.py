"""The one seam between a strategy (``kdforge.recipes``) and the engine: :class:`TrainStep`.

A strategy decides who learns from whom and computes the loss of a batch; the engine
(:class:`kdforge.engine.trainer.Trainer`) owns everything else: devices, DDP, mixed precision,
accumulation, the optimizer and schedule, checkpoints with exact resume, evaluation of the
``learner`` each epoch and best-epoch keeping. The engine knows no objective and no role.

Contract::

    step = SomeStep(...)                    # an nn.Module holding every model it needs, by role
    loss, terms = step(batch, progress)     # scalar loss to back-propagate, {name: float} to log
    step.after_step(progress)               # after each optimizer step (EMA, schedules, ...)
    step.learner                            # the model evaluated and kept (a ModelAdapter)
    step.checkpoint_state()                 # what a checkpoint stores (frozen parts left out)
    step.parts()                            # trainable parts by name: each may get its own learning rate

Every trainable parameter of the step (the learner's, those owned by loss terms, a peer's) is
trained by the engine's optimizer; modules named in ``frozen`` are rebuilt from their source, not
checkpointed, and stay in eval mode whatever ``train()`` is called with (no dropout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.progress import Progress


class TrainStep(nn.Module):
    """Base class of training steps. Subclasses set ``learner`` and implement ``forward``."""

    learner: nn.Module
    #: the name the learner goes by in :meth:`parts` (the stage runner sets its role); None: not named
    learner_role: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.ModuleDict()  # frozen models by role: no gradients, eval mode, not checkpointed

    def freeze(self, role: str, module: nn.Module) -> nn.Module:
        """Hold ``module`` as a frozen model under ``role`` (returns it)."""
        module.requires_grad_(False)
        module.eval()
        self.frozen[role] = module
        return module

    def train(self, mode: bool = True) -> TrainStep:
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, batch: dict[str, Any], progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, progress: Progress) -> None:
        """Called after every optimizer step."""

    def parts(self) -> dict[str, nn.Module]:
        """Trainable parts by name (the learner's role, a peer's role, a bridge, a loss term's name), for
        ``train.lr_by_role``: a part named there is optimised at its own learning rate. Default: the learner."""
        return {self.learner_role: self.learner} if self.learner_role is not None else {}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything that trains (frozen models are rebuilt from their source, not checkpointed)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen.")}

    @staticmethod
    def is_frozen_key(key: str) -> bool:
        return key.startswith("frozen.")
