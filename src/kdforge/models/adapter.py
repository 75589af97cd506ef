"""Uniform access to any model's outputs without editing the model.

``ModelAdapter(model)(batch) -> Outputs`` works for Hugging Face models (hidden states and
attentions requested through the standard flags) and for any ``nn.Module`` (logits = its
output); intermediate features are captured by forward hooks on modules named by path
(``bert.encoder.layer.3.output``, ``layer2``), as in torchdistill. The *input* of a module (the
student's penultimate feature, i.e. what its classification head reads) is captured by a forward
pre-hook for each path in ``input_paths``, under ``Outputs.features["input:" + path]``.

A module whose class sets ``reads_batch = True`` (a black-box teacher, :mod:`kdforge.blackbox.teacher`)
gets the whole batch, raw sentences included, and returns its logits.

Attention maps: transformers 5 runs sdpa attention, which returns no maps. Only when an
objective needs them does the adapter switch that model to the eager implementation.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs

#: batch keys that are never model inputs: targets, example positions, the raw sentences of a text batch
#: (read by black-box teachers) and stored teacher probabilities (FS-BBT)
NON_INPUT_KEYS = ("labels", "index", "teacher_input_ids", "texts", "soft_labels")


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "last_hidden_state") and value.last_hidden_state is not None:
        return value.last_hidden_state
    if isinstance(value, tuple | list) and value:
        return _first_tensor(value[0])
    raise TypeError(f"cannot take a tensor from {type(value).__name__}")


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


class ModelAdapter(nn.Module):
    """Wraps a model; ``forward(batch)`` returns :class:`Outputs`."""

    def __init__(self, model: nn.Module, hook_paths: Iterable[str] = (), hidden_states: bool = False,
                 attentions: bool = False, teacher: bool = False, input_paths: Iterable[str] = ()):
        super().__init__()
        self.model = model
        self.teacher = teacher  # reads batch["teacher_input_ids"] when a compressed-vocabulary student has its own
        self.hidden_states = hidden_states
        self.attentions = attentions
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [self._hook(path) for path in hook_paths]
        self._hooks += [self._input_hook(path) for path in input_paths]
        self.train(model.training)  # mirror the wrapped model's mode, so restoring "the previous mode" is right
        if attentions and is_hf_model(model) and model.config._attn_implementation != "eager":
            model.set_attn_implementation("eager")

    def _module(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in self.model.named_modules() if n]
            close = difflib.get_close_matches(path, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KDForgeError(f"module path {path!r} not found in {type(self.model).__name__}{hint}") from None

    def _hook(self, path: str):
        module = self._module(path)

        def keep(_module, _inputs, output):
            self._captured[path] = _first_tensor(output)

        return module.register_forward_hook(keep)

    def _input_hook(self, path: str):
        """A forward pre-hook keeping the module's first positional input (else its first keyword input)."""
        module = self._module(path)

        def keep_input(_module, args, kwargs):
            value = args[0] if args else next(iter(kwargs.values()), None)
            if value is not None:
                self._captured["input:" + path] = _first_tensor(value)

        return module.register_forward_pre_hook(keep_input, with_kwargs=True)

    def remove_hooks(self) -> None:
        """Detach this adapter's forward hooks and pre-hooks from the model (before another adapter wraps it)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def forward(self, batch: dict[str, Any]) -> Outputs:
        self._captured = {}
        inputs = {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
        if self.teacher and "teacher_input_ids" in batch:
            inputs["input_ids"] = batch["teacher_input_ids"]
        if getattr(self.model, "reads_batch", False):
            result = Outputs(logits=self.model(batch))
        elif is_hf_model(self.model):
            out = self.model(**inputs, output_hidden_states=self.hidden_states or None,
                             output_attentions=self.attentions or None, return_dict=True)
            result = Outputs(logits=out.logits,
                             hidden_states=out.hidden_states if self.hidden_states else None,
                             attentions=out.attentions if self.attentions else None)
        else:
            x = inputs.get("pixel_values", inputs.get("inputs"))
            if x is None:
                raise KDForgeError(f"batch has no model input (keys: {sorted(batch)}); a plain nn.Module "
                                   "gets batch['pixel_values'] or batch['inputs']")
            out = self.model(x)
            result = Outputs(logits=out if isinstance(out, torch.Tensor) else _first_tensor(out))
        result.features = dict(self._captured)
        return result
