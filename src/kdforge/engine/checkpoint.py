"""Atomic checkpoints that load without unpickling code, and survive a corrupt file.

A checkpoint is a folder (``checkpoints/<desc>/last/``) holding

* ``state.pt``: trainable weights, optimizer and scheduler state (tensors and plain values);
* ``rng-<rank>.pt``: each process's random states (torch's as tensors, Python's and numpy's as lists);
* ``meta.json``: the trainer's counters and history, the number of processes, and the size and
  SHA-256 of every other file. Written last, it marks the checkpoint complete.

It is written into a staging folder and renamed into place; the checkpoint it replaces becomes
``previous/``, so two complete checkpoints are kept. On resume, ``last`` is used when every file
matches ``meta.json``; a truncated or corrupt file is reported (one line) and ``previous`` is used
instead. Every ``.pt`` file is read with ``torch.load(weights_only=True)``: a file holding anything
but tensors and plain values (a pickle whose loading would run code) is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.errors import KDForgeError
from kdforge.io import atomic_write_json, check_file, file_record, read_json, staging_dir
from kdforge.io import staged_folder as staged_folder  # re-exported: the staged-folder helpers live in kdforge.io

log = logging.getLogger("kdforge")

META = "meta.json"
STATE = "state.pt"
FORMAT = 2  # 1: pickled state.pt / rng-*.pt (kdforge before weights-only checkpoints)
RESTART = "start without --resume (or delete the checkpoints folder)"


# ---------------------------------------------------------------------------- random states


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain lists (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's (one per process)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------- staged folders


def previous_dir(folder: Path) -> Path:
    """Where :func:`publish_checkpoint` keeps the checkpoint before ``folder`` (``last`` -> ``previous``)."""
    return folder.with_name("previous" if folder.name == "last" else f"{folder.name}.previous")


def publish_checkpoint(folder: Path) -> None:
    """Make the staging copy of ``folder`` the newest checkpoint; the one it replaces becomes
    :func:`previous_dir`. A crash at any point leaves at least one complete checkpoint."""
    staging, previous = staging_dir(folder), previous_dir(folder)
    if folder.exists():
        if previous.exists():
            shutil.rmtree(previous)
        folder.rename(previous)
    staging.rename(folder)


def remove_checkpoints(root: Path) -> None:
    """Delete a trainer's checkpoints (``checkpoints/<desc>``: ``last``, ``previous``, the best epoch's
    weights), and ``checkpoints/`` when nothing else is left in it. The trainer never calls this:
    the job that owns the run does, once the run's outputs are written, so that a run killed before
    that still has its checkpoints (and ``--resume`` trains nothing again)."""
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (another stage's checkpoints), or gone already
        root.parent.rmdir()


# ---------------------------------------------------------------------------- files


def save_torch_atomic(obj: Any, path: Path, record: Path | None = None) -> None:
    """``torch.save`` to a uniquely named temporary file beside ``path``, then an atomic rename: two
    processes saving the same path at once both succeed, and a reader sees one whole file. With
    ``record``, the file's size and SHA-256 (:func:`kdforge.io.file_record`) are written there
    (atomically) just before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if record is not None:
            atomic_write_json(record, file_record(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, fix: str = f"delete it, or {RESTART}") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. A file holding anything but tensors and
    plain values is refused, and an unreadable one reported, in one :class:`KDForgeError` line
    naming the file and ``fix``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise KDForgeError(f"{path} holds objects other than tensors and plain values{what}; kdforge refuses "
                               f"to load it, since unpickling it could run code: {fix}") from None
        raise KDForgeError(f"{path} is corrupt ({short_reason(err)}); {fix}") from None
    except FileNotFoundError:
        raise KDForgeError(f"{path} is missing; {fix}") from None
    except Exception as err:  # truncated zip archives, bad headers, ...: torch raises several types
        raise KDForgeError(f"{path} is corrupt or truncated ({short_reason(err)}); {fix}") from None


def short_reason(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's loading errors run to paragraphs)."""
    text = str(err).strip()
    return (text.splitlines()[0].split(". ")[0] if text else type(err).__name__)[:200]


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------- checkpoints


def save_rng(staging: Path, rank: int) -> None:
    """Write this process's random states into the staging folder (every process)."""
    _save(rng_state(), staging / f"rng-{rank}.pt")


def save_state(staging: Path, state: dict[str, Any]) -> None:
    """Write weights, optimizer and scheduler state (tensors and plain values) into the staging folder."""
    _save(state, staging / STATE)


def finish(staging: Path, world: int, trainer: dict[str, Any]) -> None:
    """Write ``meta.json`` (counters and history, sizes and hashes of the other files), after every
    process has written its files; the folder is then a complete checkpoint."""
    files = {p.name: file_record(p) for p in sorted(staging.iterdir()) if p.suffix == ".pt"}
    atomic_write_json(staging / META, {"format": FORMAT, "world": world, "trainer": trainer, "files": files})


@dataclass
class Checkpoint:
    folder: Path
    state: dict[str, Any]  # module, optimizer, scheduler
    rng: dict[str, Any]  # this process's random states
    trainer: dict[str, Any]  # the trainer's counters and history
    world: int


def problem(folder: Path, world: int) -> str | None:
    """Why ``folder`` is not a complete checkpoint for ``world`` processes (naming the bad file), or None."""
    meta_path = folder / META
    if not meta_path.is_file():
        if (folder / STATE).is_file():
            return f"{meta_path} is missing (an incomplete checkpoint, or one written by an older kdforge)"
        return f"{folder} holds no checkpoint"
    try:
        meta = read_json(meta_path, "")
    except KDForgeError:
        return f"{meta_path} is truncated or not valid JSON"
    files = meta.get("files")
    if meta.get("format") != FORMAT or not isinstance(files, dict) or not isinstance(meta.get("trainer"), dict):
        return f"{meta_path} is not a kdforge checkpoint description (format {meta.get('format')!r})"
    if meta.get("world") != world:
        return None  # complete, but for another number of processes: read_checkpoint says so
    for name in [STATE, *(f"rng-{r}.pt" for r in range(world))]:
        if name not in files:
            return f"{meta_path} lists no {name}"
    for name, record in files.items():
        bad = check_file(folder / name, record)
        if bad:
            return f"{folder / name} is {bad}" if bad == "missing" else f"{folder / name} is corrupt ({bad})"
    return None


def read_checkpoint(folder: Path, rank: int, world: int) -> Checkpoint | None:
    """The newest complete checkpoint: ``folder`` (``last``), else :func:`previous_dir`; None when
    there is none. A bad ``last`` is reported in one log line before ``previous`` is used; when no
    complete checkpoint is left, one :class:`KDForgeError` line names the bad file and the fix. Every
    process checks every file, so all processes pick the same checkpoint."""
    candidates = [f for f in (folder, previous_dir(folder)) if f.is_dir()]
    problems: list[str] = []
    for i, candidate in enumerate(candidates):
        bad = problem(candidate, world)
        if bad is not None:
            problems.append(bad)
            fallback = f"; resuming from the previous checkpoint {candidates[i + 1]}" \
                if i + 1 < len(candidates) else ""
            log.warning("checkpoint %s cannot be used: %s%s", candidate, bad, fallback)
            continue
        meta = read_json(candidate / META, RESTART)
        if meta["world"] != world:
            raise KDForgeError(f"checkpoint {candidate} was written by {meta['world']} processes; "
                               f"resume with the same number (now {world}), or {RESTART}")
        return Checkpoint(candidate, load(candidate / STATE), load(candidate / f"rng-{rank}.pt"),
                          meta["trainer"], meta["world"])
    if problems:
        raise KDForgeError(f"no usable checkpoint to resume from: {'; '.join(problems)}; {RESTART}")
    return None
