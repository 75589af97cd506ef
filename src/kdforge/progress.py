"""Where training is, as the engine tells every loss term and schedule (a plain record, no logic
that depends on models or losses, so the engine and the objectives both import it from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where training is: optimizer ``step`` of ``total_steps``, and the (fractional) ``epoch``."""

    step: int = 0
    total_steps: int = 1
    epoch: float = 0.0

    @property
    def epoch_number(self) -> int:
        """The current epoch counted from 1, as the papers' schedules count it."""
        return int(self.epoch) + 1

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))
