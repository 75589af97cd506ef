"""Helpers shared by the benchmark scripts: results split over several JSON files, mean +- std cells."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def merged_results(folder: Path, prefix: str) -> dict:
    """Every ``<prefix>*.json`` in ``folder`` merged part by part, method by method (parts run in parallel
    write their own file; a method's runs from several files are put together)."""
    merged: dict = {}
    for path in sorted(Path(folder).glob(f"{prefix}*.json")):
        for part, rows in json.loads(path.read_text()).items():
            for method, runs in rows.items():
                merged.setdefault(part, {}).setdefault(method, {}).update(runs)
    return merged


def mean_std(values: list) -> str:
    """``mean ± std`` (sample std) of the values that are not None; one value alone; empty when none."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
