"""Cheap integrity checks of weight files before a model is loaded.

A ``.safetensors`` file is ``[8-byte little-endian header size N][N bytes of JSON header][data]``,
where the header maps each tensor to ``data_offsets: [begin, end]`` inside the data. A complete
file is therefore exactly ``8 + N + max(end)`` bytes long, which is checked from the header alone
(nothing is read beyond it), so a truncated or overwritten file is named in one line instead of
failing deep inside the loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from kdforge.errors import KDForgeError

#: a header larger than this is not a safetensors header (the format caps it at 100 MB)
_MAX_HEADER = 100 * 1024 * 1024


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (truncated, corrupt header), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"is truncated ({size} bytes, shorter than the 8-byte header size)"
    with path.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if header_size > _MAX_HEADER:
            return f"has a corrupt header (size field {header_size})"
        if 8 + header_size > size:
            return f"is truncated ({size} bytes, its header alone needs {8 + header_size})"
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "has a corrupt header (not the JSON table of a safetensors file)"
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


def check_weight_files(folder: str | Path) -> None:
    """Raise one line naming the first truncated or corrupt ``*.safetensors`` file of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise KDForgeError(f"weights file {path} {problem}; export or download the model again "
                               "(an interrupted copy leaves such a file)")
