"""Atomic file writes, checked reads and file locks: a reader never sees a half-written file.

Each write helper writes to a temporary file in the destination's folder (same file system), flushes
and fsyncs it, then renames it over the destination with :func:`os.replace`, which is atomic on
POSIX and Windows. If anything fails before the rename, the temporary file is removed and the
previous content of the destination (if any) is left untouched.

:func:`file_record` / :func:`check_file` store and verify a file's size and SHA-256 (a truncated
or corrupted file is named, not loaded); :func:`read_json` turns a truncated JSON file into one
clear error; :func:`file_lock` lets several processes agree on who builds a shared file;
:func:`staged_folder` writes a whole folder beside its destination and renames it into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdforge.errors import KDForgeError

_DEFAULT_MODE = 0o644


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating parent folders); return the path.

    A new file gets mode 0644; an existing file keeps its mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else _DEFAULT_MODE
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays (via ``tolist``) and paths (as strings)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (``indent=2``, trailing newline) to ``path`` atomically; return the path.

    The object is serialised completely before anything touches the disk, so a serialisation
    error leaves the previous file intact. numpy values and paths are converted; floats NaN/inf
    are written as ``NaN``/``Infinity`` (Python's default), so convert them to ``None`` first
    where strict JSON is needed."""
    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
    return atomic_write_text(path, text)


def read_json(path: str | Path, what: str) -> dict:
    """The JSON object stored in ``path``. A missing, unreadable, truncated or malformed file raises
    one :class:`KDForgeError` line naming the file, followed by ``what`` (what the user should do,
    e.g. "delete it and run `kdforge distill` again")."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KDForgeError(f"{path} does not exist; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KDForgeError(f"{path} is truncated or not valid JSON ({err}); {what}") from None
    except OSError as err:
        raise KDForgeError(f"cannot read {path} ({err.strerror or err}); {what}") from None
    if not isinstance(value, dict):
        raise KDForgeError(f"{path} does not hold a JSON object; {what}")
    return value


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, to be checked later with :func:`check_file`."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def check_file(path: str | Path, record: dict[str, Any]) -> str | None:
    """None when ``path`` still has the size and SHA-256 of ``record`` (from :func:`file_record`);
    otherwise what is wrong with it, in a few words ("missing", "truncated: 10 of 20 bytes", ...)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != record.get("size"):
        return f"truncated: {size} of {record.get('size')} bytes" if size < (record.get("size") or 0) \
            else f"{size} bytes instead of {record.get('size')}"
    if "sha256" in record and file_record(path)["sha256"] != record["sha256"]:
        return "corrupt: its SHA-256 does not match"
    return None


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed, never deleted) while the block runs;
    another process asking for the same lock waits until it is released. POSIX ``flock``; where it
    is unavailable (Windows) the block runs unlocked (writes stay atomic, work may be done twice)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def staging_dir(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.tmp")


def publish(folder: Path) -> None:
    """Replace ``folder`` with its staging copy (two renames; the old one is removed last)."""
    staging, old = staging_dir(folder), folder.with_name(f".{folder.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Write into a fresh staging folder; on success it replaces ``folder`` (``publish``)."""
    staging = staging_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    publish(folder)
