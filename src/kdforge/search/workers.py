"""Local worker processes of the outer loops (search and study): ``--workers N`` runs the work here and in
``N - 1`` more processes (``kdforge COMMAND CONFIG --join``) that share the storage, the CPU threads split
between them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("kdforge")


def worker_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def run_with_local_workers(command: str, config_path: Path, workers: int, work: Callable[[], None]) -> None:
    """Run ``work`` in this process and ``workers - 1`` joined ``kdforge COMMAND`` processes; wait for all
    of them. A process that failed is reported (its trials are run again by the next ``kdforge COMMAND``)."""
    threads = worker_threads(workers)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    joined = [sys.executable, "-m", "kdforge.cli", command, str(config_path), "--join"]
    helpers = [subprocess.Popen(joined, env=env) for _ in range(workers - 1)]
    try:
        work()
    finally:
        failed = [p.wait() for p in helpers]
    if any(failed):
        log.warning("%d worker process(es) ended with an error; what they were running is run again by the next "
                    "`kdforge %s`", sum(1 for code in failed if code), command)
