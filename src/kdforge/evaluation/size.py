"""Model size: unique parameter count and size on disk (MB = 10^6 bytes)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_model
from torch import nn

from kdforge.models.parameters import count_parameters as count_parameters  # re-exported (it lives with the models)

_MB = 1e6


def size_on_disk_mb(model: nn.Module) -> float:
    """Size in MB (10^6 bytes) of ``model``'s state dict (parameters and buffers) saved as
    safetensors, at the tensors' current dtypes.

    ``safetensors.torch.save_model`` stores shared (tied) tensors once, so tied weights are not
    counted twice. The file (tensor data plus a small JSON header) is written to a temporary
    folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kdforge-size-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size / _MB


def dir_size_mb(path: str | Path) -> float:
    """Total size in MB (10^6 bytes) of the regular files under ``path`` (recursively; symbolic
    links are not followed), e.g. an exported model folder. A file path gives that file's size."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / _MB
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if file.is_file() and not file.is_symlink():
                total += file.stat().st_size
    return total / _MB
