"""kdforge's lines on the console: ``[kdforge] ...`` on stderr from the main process.

The CLI always sets them up; the Python API does when the program has not configured logging itself
(no handler on the root logger or on ``kdforge``), so a script, a notebook or a job under ``nohup``
sees each epoch's metrics and the kept epoch, while a program with its own logging gets kdforge's
records through it instead.
"""

from __future__ import annotations

import logging
import sys

from kdforge.processes import MainProcessOnly

log = logging.getLogger("kdforge")


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (not the stream of
    the moment it was made, which a caller may have replaced and closed since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """``[kdforge] ...`` lines at INFO on stderr (once), not propagated further."""
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[kdforge] %(message)s"))
        handler.addFilter(MainProcessOnly())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    quiet_library_progress_bars()


def quiet_library_progress_bars() -> None:
    """Hugging Face's weight-loading and download bars would interleave with kdforge's own lines."""
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    hf_logging.disable_progress_bar()
    disable_progress_bars()


def default_logging() -> None:
    """The API's default: :func:`setup_logging` unless the program configured logging itself."""
    if not logging.getLogger().handlers and not any(
            not isinstance(h, logging.FileHandler) for h in log.handlers):
        setup_logging()
