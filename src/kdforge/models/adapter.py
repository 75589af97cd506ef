"""Uniform access to any model's outputs without editing the model.

``ModelAdapter(model)(batch) -> Outputs`` works for Hugging Face models (hidden states and
attentions requested through the standard flags) and for any ``nn.Module`` (logits = its
output); intermediate features are captured by forward hooks on modules named by path
(``bert.encoder.layer.3.output``, ``layer2``), as in torchdistill. The *input* of a module (the
student's penultimate feature, i.e. what its classification head reads) is captured by a forward
pre-hook for each path in ``input_paths``, under ``Outputs.features["input:" + path]``.

Which batch keys a model gets is read once from its ``forward`` signature: the keys it names (a
Hugging Face model: also every other key when its forward takes ``**kwargs``), never the keys in
:data:`NON_INPUT_KEYS`; so a data source that adds a batch key needs no change here. A plain
``nn.Module`` whose first parameter is not a batch key (``forward(x)``) gets ``batch["pixel_values"]``
(else ``batch["inputs"]``) as that first argument, plus the other keys it names.

A module whose class sets ``reads_batch = True`` (a black-box teacher, :mod:`kdforge.blackbox.teacher`)
gets the whole batch, raw sentences included, and returns its logits.

Attention maps: transformers 5 runs sdpa attention, which returns no maps. Only when an
objective needs them does the adapter switch that model to the eager implementation.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs

#: batch keys that are never model inputs: targets, example positions, the raw sentences of a text batch
#: (read by black-box teachers) and stored teacher probabilities (FS-BBT)
NON_INPUT_KEYS = ("labels", "index", "teacher_input_ids", "texts", "soft_labels")


class ForwardInputs:
    """The batch keys a model's ``forward`` takes, read once from its signature."""

    def __init__(self, model: nn.Module):
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):  # no readable signature: take keywords, as a **kwargs forward does
            params = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self.names = frozenset(p.name for p in params if p.kind in named) - set(NON_INPUT_KEYS)
        self.any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self.first = positional[0].name if positional else None

    def select(self, batch: dict[str, Any], any_keyword: bool) -> dict[str, Any]:
        """The entries of ``batch`` the forward names (all but :data:`NON_INPUT_KEYS` when ``any_keyword``
        and the forward takes ``**kwargs``)."""
        take_all = any_keyword and self.any_keyword
        return {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS and (take_all or k in self.names)}


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
        self._forward_inputs = ForwardInputs(model)
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
        reads_batch = getattr(self.model, "reads_batch", False)
        if self.teacher and "teacher_input_ids" in batch and not reads_batch:
            batch = {**batch, "input_ids": batch["teacher_input_ids"]}
        if reads_batch:
            result = Outputs(logits=self.model(batch))
        elif is_hf_model(self.model):
            inputs = self._forward_inputs.select(batch, any_keyword=True)
            out = self.model(**inputs, output_hidden_states=self.hidden_states or None,
                             output_attentions=self.attentions or None, return_dict=True)
            result = Outputs(logits=out.logits,
                             hidden_states=out.hidden_states if self.hidden_states else None,
                             attentions=out.attentions if self.attentions else None)
        else:
            inputs = self._forward_inputs.select(batch, any_keyword=False)
            if self._forward_inputs.first in inputs:  # forward(input_ids, mask), forward(pixel_values)
                out = self.model(**inputs)
            else:  # forward(x): the image (or generic input) as its first argument
                x = batch.get("pixel_values", batch.get("inputs"))
                if x is None:
                    raise KDForgeError(f"batch has no model input (keys: {sorted(batch)}); a plain nn.Module "
                                       "gets batch['pixel_values'] or batch['inputs'], or the keys its forward names")
                out = self.model(x, **inputs)
            result = Outputs(logits=out if isinstance(out, torch.Tensor) else _first_tensor(out))
        result.features = dict(self._captured)
        return result
