"""Where data lives: an explicit path, $KDFORGE_DATA, or ../shared/data beside the project."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kdforge.errors import KDForgeError

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("KDFORGE_DATA"):
        roots.append(Path(os.environ["KDFORGE_DATA"]))
    roots += [Path.cwd() / "../shared/data", _REPO_ROOT / "../shared/data"]
    return roots


def resolve_data_path(explicit: str | None, default_relative: str, config_key: str = "task.data_dir") -> Path:
    """Return ``explicit`` if given, else the first existing ``<root>/<default_relative>``.

    Raises a one-line :class:`KDForgeError` naming the config key when nothing exists."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise KDForgeError(f"data path {path} does not exist; fix `{config_key}`")
        return path
    for root in data_roots():
        candidate = (root / default_relative).resolve()
        if candidate.exists():
            return candidate
    tried = ", ".join(str(r / default_relative) for r in data_roots())
    raise KDForgeError(f"data not found (tried {tried}); set `{config_key}` or the KDFORGE_DATA variable")


def cache_dir() -> Path:
    """kdforge's cache (decoded images, teacher outputs): $KDFORGE_CACHE or ~/.cache/kdforge.

    One line when that path (or a folder above it) is a file rather than a folder."""
    from_env = bool(os.environ.get("KDFORGE_CACHE"))
    path = Path(os.environ["KDFORGE_CACHE"]).expanduser() if from_env else Path.home() / ".cache" / "kdforge"
    check_folder_path(path, "KDFORGE_CACHE")
    return path


def check_folder_path(path: Path, what: str) -> None:
    """Refuse a folder path that is a file, or lies below one: ``mkdir`` would fail there later."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"lies inside {candidate}, which is a file"
                raise KDForgeError(f"{path} ({what}) {where}, not a folder; point {what} at a folder")
            return


def check_writable_folder(path: str | Path, what: str) -> None:
    """Refuse a folder path that is a file (or below one), or where no file can be created; nothing
    is left behind (the probe file in the nearest existing folder is deleted at once)."""
    path = Path(path).expanduser()
    check_folder_path(path, what)
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise KDForgeError(f"cannot write in {existing} for {what} {path} ({err.strerror or err}); choose a "
                           f"folder you can write to for {what}") from None
