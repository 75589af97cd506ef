"""Which process of a multi-process launch this is, read from the launcher's environment (asking
sets up no process group), and a log filter that keeps each line once."""

from __future__ import annotations

import logging
import os


def launch_rank() -> int:
    """This process's rank in a multi-process launch (``torchrun``, ``accelerate launch``, MPI), 0
    otherwise. Read from the launcher's environment, so asking sets up no process group."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


class MainProcessOnly(logging.Filter):
    """Drops records on every process but the main one: with several processes each line is logged
    once (the engine makes every process compute the same numbers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return launch_rank() == 0
