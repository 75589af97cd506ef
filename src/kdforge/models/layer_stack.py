"""Where a transformer keeps its layers: the path of the ModuleList holding the layer stack."""

from __future__ import annotations

from torch import nn

from kdforge.errors import KDForgeError


def layer_stack_path(model: nn.Module) -> str:
    """Path of the ModuleList holding the transformer layers (``bert.encoder.layer``, ``model.layers``)."""
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = [name for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == n]
    if not candidates:
        raise KDForgeError(f"cannot find the layer stack of {type(model).__name__}; build the student with "
                           "student.config or give one with student.model")
    return min(candidates, key=len)
