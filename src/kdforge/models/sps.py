"""Shuffled Parameter Sharing (SPS) students, after Pea-KD.

Paper: Ikhyun Cho and U Kang, "Pea-KD: Parameter-efficient and Accurate Knowledge Distillation on
BERT", PLOS ONE 17(2): e0263592, 2022 (arXiv 2009.14822, 2020). Only the SPS architecture is here;
the paper's other half (PTP pre-training on teacher-prediction labels) is a training recipe.

What SPS computes. A student with ``n`` physical transformer layers ``L_0 .. L_{n-1}`` runs

    swap (the paper's SPS):      h <- L_0(h), ..., L_{n-1}(h), then L~_0(h), ..., L~_{n-1}(h)
    share (paired sharing only): h <- L_0(h), ..., L_{n-1}(h), then L_0(h), ..., L_{n-1}(h)
    top_half_swap (the paper's 6-layer student): L_0 .. L_{n-1}, then L~_{n/2}, ..., L~_{n-1}

where ``L~_i`` is layer ``i`` with its self-attention Query and Key projections exchanged, weights
*and* biases: the second pass computes queries with ``W_K^i x + b_K^i`` and keys with
``W_Q^i x + b_Q^i``; Value, attention output, feed-forward and LayerNorm parameters are used as
they are. Attention is ``softmax((x W_K^T + b_K)(x W_Q^T + b_Q)^T / sqrt(d_head) + mask) V`` in the
swapped pass. That is 2n effective layers (n + n/2 for ``top_half_swap``, which needs an even n)
for the parameters of n. Paper, "Shuffled Parameter Sharing": step 1 stacks layers that share
parameters (the upper half reuses the lower half, "paired parameter sharing"), step 2 shuffles the
Query and Key parameters between the shared pairs. The authors' code re-runs each physical layer
in order with a flag that feeds the input to the key projection for the query and vice versa, and
for the 6-layer student re-runs only layers 3, 4, 5 (0-based) that way, i.e. 9 effective layers;
``top_half_swap`` generalises that to layers n/2 .. n-1. The 3-layer SPS student of the paper's
main results is ``swap`` with n = 3.

How it is built here (the HF model's source is not edited). :func:`make_sps_student` appends to the
model's layer stack (``bert.encoder.layer``) one :class:`SharedLayer` per re-run; a
``SharedLayer`` holds *no parameters*: it calls its physical layer (kept in ``__dict__``, not
registered as a child module) through ``torch.func.functional_call`` with a parameter dict in which
``query.*`` and ``key.*`` are exchanged, so

* the parameters are the physical layer's own: ``model.parameters()`` and ``count_parameters``
  see each once, gradients from both passes accumulate into them (for ``swap``:
  dL/dW_Q^i = dL/dW_Q(pass 1, layer i) + dL/dW_K(pass 2, layer i), and symmetrically for K);
* ``state_dict()`` holds only the physical layers' keys ``bert.encoder.layer.0..n-1.*`` (exactly
  an n-layer model's keys): that is the compact form;
* HF's attention mask and attention implementation (sdpa or eager) apply unchanged, since the
  encoder passes the same mask to every entry of the stack and the physical layer's own attention
  module runs;
* ``config.num_hidden_layers`` is set to the effective layer count and HF records every call of a
  physical layer, so ``output_hidden_states`` gives all 2n + 1 states (embedding output first) in
  execution order and ``output_attentions`` all 2n maps: feature losses see every effective layer.

Caveats. Forward hooks on a *submodule* of a physical layer (``bert.encoder.layer.1.output``) fire
in both passes, and kdforge's adapter keeps the last (second-pass) output; hook the stack entry
(``bert.encoder.layer.4``) or use hidden states to address an effective layer. A live SPS model's
plain ``save_pretrained`` does not give a loadable standard model (the re-runs have no weights of
their own): export with :func:`unroll_sps` (standard HF model, 2n independent layers) or
:func:`save_sps_compact` (physical weights + ``sps.json``). Gradient checkpointing is refused
for swapped layers (its backward re-computation would run without the swap). Encoder models only.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.adapter import is_hf_model
from kdforge.models.layer_stack import layer_stack_path
from kdforge.models.parameters import count_parameters
from kdforge.models.saving import write_pretrained

#: SPS layouts: "swap" (Pea-KD's SPS), "share" (paired sharing without the Q/K shuffle),
#: "top_half_swap" (Pea-KD's 6-layer student: only the top half re-run, swapped)
SPS_MODES = ("swap", "share", "top_half_swap")
#: the small JSON written beside the physical weights by :func:`save_sps_compact`
SPS_META = "sps.json"
#: config attribute marking a live SPS model (so a folder written by its plain save_pretrained is recognisable)
CONFIG_MARKER = "kdforge_sps"
#: (query, key) sibling-module names recognised as the self-attention projections
_QK_NAMES = (("query", "key"), ("q_lin", "k_lin"), ("q_proj", "k_proj"))


def _qk_paths(layer: nn.Module) -> tuple[str, str]:
    """Paths (inside one transformer layer) of its self-attention's query and key projections."""
    found = []
    for path, module in layer.named_modules():
        for q_name, k_name in _QK_NAMES:
            q, k = getattr(module, q_name, None), getattr(module, k_name, None)
            if isinstance(q, nn.Module) and isinstance(k, nn.Module):
                prefix = f"{path}." if path else ""
                found.append((f"{prefix}{q_name}", f"{prefix}{k_name}"))
    if len(found) != 1:
        raise KDForgeError(f"SPS needs exactly one self-attention with query/key projections per layer; "
                           f"{type(layer).__name__} has {len(found)}; use a BERT-style encoder student")
    q_path, k_path = found[0]
    q_params = dict(layer.get_submodule(q_path).named_parameters())
    k_params = dict(layer.get_submodule(k_path).named_parameters())
    if {n: p.shape for n, p in q_params.items()} != {n: p.shape for n, p in k_params.items()}:
        raise KDForgeError(f"SPS swaps {q_path} and {k_path}, but their parameters differ in shape; "
                           "use a student whose query and key projections have the same size")
    return q_path, k_path


def _swapped_names(q_path: str, k_path: str, names) -> dict[str, str]:
    """Map each parameter name of a layer to the name whose tensor it takes in the swapped pass."""
    mapping = {}
    for name in names:
        if name.startswith(f"{q_path}."):
            mapping[name] = f"{k_path}.{name[len(q_path) + 1:]}"
        elif name.startswith(f"{k_path}."):
            mapping[name] = f"{q_path}.{name[len(k_path) + 1:]}"
    return mapping


class SharedLayer(nn.Module):
    """A re-run of a physical transformer layer, optionally with Query and Key exchanged.

    Holds no parameters or buffers of its own (its state_dict is empty): the physical layer is kept
    in ``__dict__``, outside the module tree, so it is neither registered twice nor saved twice.
    ``copy.deepcopy`` of the whole model keeps the reference pointing at the copied physical layer.
    """

    def __init__(self, physical: nn.Module, source: int, swap_qk: bool, mode: str):
        super().__init__()
        self.__dict__["physical"] = physical  # deliberately not a child module
        self.source = source
        self.swap_qk = swap_qk
        self.mode = mode
        self.q_path, self.k_path = _qk_paths(physical)

    def extra_repr(self) -> str:
        return f"source={self.source}, swap_qk={self.swap_qk}"

    def swapped_parameters(self) -> dict[str, torch.Tensor]:
        """The physical layer's Q and K parameters under each other's names (the others are not listed)."""
        params = dict(self.physical.named_parameters())
        return {name: params[other] for name, other in _swapped_names(self.q_path, self.k_path, params).items()}

    def forward(self, *args: Any, **kwargs: Any):
        layer = self.physical
        if not self.swap_qk:
            return layer(*args, **kwargs)
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            raise KDForgeError("gradient checkpointing would re-run SPS's swapped layers without the Q/K swap; "
                               "call model.gradient_checkpointing_disable() for an SPS student")
        return torch.func.functional_call(layer, self.swapped_parameters(), args, kwargs, strict=False)


def _stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    path = layer_stack_path(model)
    return path, model.get_submodule(path)


def _shared_layers(model: nn.Module) -> list[SharedLayer]:
    return [m for m in model.modules() if isinstance(m, SharedLayer)]


def is_sps(model: nn.Module) -> bool:
    """Whether ``model`` is a live SPS student (its layer stack has re-run entries)."""
    return isinstance(model, nn.Module) and bool(_shared_layers(model))


def sps_schedule(mode: str, n: int) -> list[tuple[int, bool]]:
    """The effective layers of an SPS student with ``n`` physical layers, bottom to top, as
    ``(physical layer index, query/key swapped)``. ``swap``, n = 2: ``[(0, F), (1, F), (0, T), (1, T)]``;
    ``top_half_swap``, n = 6: ``[(0, F) .. (5, F), (3, T), (4, T), (5, T)]``."""
    if mode not in SPS_MODES:
        raise KDForgeError(f"unknown SPS mode {mode!r}; choose one of {', '.join(SPS_MODES)}")
    if n < 1 or (mode == "top_half_swap" and n % 2):
        raise KDForgeError(f"SPS mode {mode!r} needs an even number of physical layers (got {n}); "
                           "use mode 'swap' or a student with an even layer count")
    again = range(n // 2, n) if mode == "top_half_swap" else range(n)
    return [(i, False) for i in range(n)] + [(i, mode != "share") for i in again]


def sps_info(model: nn.Module) -> dict[str, Any]:
    """``{"mode", "physical_layers", "effective_layers", "schedule"}`` of a live SPS student."""
    shared = _shared_layers(model)
    if not shared:
        raise KDForgeError(f"{type(model).__name__} is not an SPS student; build one with make_sps_student")
    _, stack = _stack(model)
    n = len(stack) - len(shared)
    schedule = [(i, False) for i in range(n)] + [(s.source, s.swap_qk) for s in shared]
    return {"mode": shared[0].mode, "physical_layers": n, "effective_layers": len(stack), "schedule": schedule}


def sps_parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """True parameter count: each shared parameter once (``count_parameters``). For an SPS student this
    equals the count of the n-layer physical model; the unrolled export has n (or n/2) more layers'
    worth of parameters."""
    return count_parameters(model, trainable_only=trainable_only)


def make_sps_student(model: nn.Module, mode: str = "swap") -> nn.Module:
    """Turn a BERT-style HF encoder (e.g. ``BertForSequenceClassification``, fresh or teacher-derived)
    with n layers into an SPS student, **in place** (the same object is returned; deep-copy it first
    to keep the original). The n physical layers keep their modules, parameters and state_dict keys;
    ``SharedLayer`` re-runs are appended to the layer stack as :func:`sps_schedule` lists, and
    ``config.num_hidden_layers`` becomes the effective layer count (2n, or n + n/2)."""
    if not is_hf_model(model):
        raise KDForgeError(f"SPS needs a Hugging Face encoder model; {type(model).__name__} is not one")
    if is_sps(model):
        raise KDForgeError("the model is already an SPS student; build SPS from the plain n-layer model")
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise KDForgeError("SPS supports encoder models only; the shared layers would reuse a decoder's cache slots")
    _, stack = _stack(model)
    n = len(stack)
    schedule = sps_schedule(mode, n)
    wrappers = [SharedLayer(stack[i], i, swap, mode) for i, swap in schedule[n:]]  # validates Q/K first
    for wrapper in wrappers:
        wrapper.train(stack[wrapper.source].training)
        stack.append(wrapper)
    config.num_hidden_layers = len(stack)
    setattr(config, CONFIG_MARKER, {"mode": mode, "physical_layers": n})
    return model


def _plain_config(model: nn.Module, num_layers: int):
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if hasattr(config, CONFIG_MARKER):
        delattr(config, CONFIG_MARKER)
    return config


def _rebuild(model: nn.Module, num_layers: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh plain model of ``model``'s class with ``num_layers`` layers, holding ``state``."""
    plain = type(model)(_plain_config(model, num_layers))
    reference = next(iter(model.parameters()))
    plain.to(device=reference.device, dtype=reference.dtype)
    plain.load_state_dict(state, strict=True)
    return plain.train(model.training)


def physical_model(model: nn.Module) -> nn.Module:
    """A plain HF model of the n physical layers only (a new object; the compact form's weights).
    It does not compute what the SPS student computes: it is what :func:`save_sps_compact` stores."""
    info = sps_info(model)
    return _rebuild(model, info["physical_layers"], {k: v.detach().clone() for k, v in model.state_dict().items()})


def unroll_sps(model: nn.Module, check: bool = True) -> nn.Module:
    """A standard HF model (a new object, same class, device and dtype) with one independent layer per
    effective layer: entry j is a copy of physical layer ``schedule[j][0]``, with the Q and K weights
    and biases exchanged where ``schedule[j][1]``. Plain ``save_pretrained`` +
    ``AutoModelForSequenceClassification.from_pretrained`` reproduce the SPS student's predictions.
    With ``check`` a short random probe (with padding) is run through both models and any mismatch is
    an error."""
    info = sps_info(model)
    path, stack = _stack(model)
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    q_path, k_path = _qk_paths(stack[0])
    source_state = model.state_dict()
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    state = {}
    for key, value in source_state.items():
        match = pattern.match(key)
        if match:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            state[key] = value.detach().clone()
    for j, (i, swap) in enumerate(info["schedule"]):
        layer_state = by_layer[i]
        rename = _swapped_names(q_path, k_path, layer_state) if swap else {}
        for name in layer_state:
            state[f"{path}.{j}.{name}"] = layer_state[rename.get(name, name)].detach().clone()
    unrolled = _rebuild(model, info["effective_layers"], state)
    if check:
        check_same_predictions(model, unrolled)
    return unrolled


def _probe_batch(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    config = model.config
    device = next(iter(model.parameters())).device
    generator = torch.Generator().manual_seed(seed)
    length = max(2, min(8, getattr(config, "max_position_embeddings", 8) - 2))
    input_ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2:] = 0  # padding in the second row: masks must apply in every layer
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def check_same_predictions(model: nn.Module, other: nn.Module, batch: dict[str, torch.Tensor] | None = None) -> None:
    """Raise if ``model`` and ``other`` (an SPS student and its unrolled or reloaded form) give different
    logits on ``batch`` (default: a random probe with padding), both in eval mode."""
    batch = _probe_batch(model) if batch is None else batch
    modes = model.training, other.training
    model.eval()
    other.eval()
    try:
        a, b = model(**batch).logits, other(**batch).logits
    finally:
        model.train(modes[0])
        other.train(modes[1])
    tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 1e-2
    if a.shape != b.shape or not torch.allclose(a.float(), b.float().to(a.device), atol=tol, rtol=tol):
        diff = (a.float() - b.float().to(a.device)).abs().max().item() if a.shape == b.shape else "shape"
        raise KDForgeError(f"the exported SPS model predicts differently from the SPS student (max |diff| {diff}); "
                           "report this as a kdforge bug")


def save_sps_unrolled(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Export the unrolled standard model (plus the tokenizer, if given) with ``save_pretrained``."""
    return _write(folder, unroll_sps(model), tokenizer, meta=None)


def save_sps_compact(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save the compact shared form: the n physical layers as a standard n-layer HF folder
    (``config.json`` with ``num_hidden_layers = n`` + ``model.safetensors`` with exactly the SPS
    student's state_dict) and ``sps.json`` = ``{"format": 1, "mode", "physical_layers",
    "effective_layers"}``; the tokenizer is saved alongside if given. Reload with
    :func:`load_sps_compact` (plain ``from_pretrained`` gives the n-layer physical model, which is
    *not* the SPS student)."""
    info = sps_info(model)
    meta = {"format": 1, "mode": info["mode"], "physical_layers": info["physical_layers"],
            "effective_layers": info["effective_layers"]}
    return _write(folder, physical_model(model), tokenizer, meta)


def _write(folder: str | Path, plain: nn.Module, tokenizer: Any, meta: dict | None) -> Path:
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    extra = {SPS_META: json.dumps(meta, indent=2) + "\n"} if meta is not None else None
    return write_pretrained(folder, plain, tokenizer, extra)


def is_sps_compact(folder: str | Path) -> bool:
    """Whether ``folder`` was written by :func:`save_sps_compact`."""
    return (Path(folder) / SPS_META).is_file()


def load_sps_compact(folder: str | Path) -> nn.Module:
    """Rebuild the SPS student saved by :func:`save_sps_compact` (in eval mode, as ``from_pretrained``
    returns models). The tokenizer, if one was saved, loads with ``AutoTokenizer.from_pretrained(folder)``."""
    import transformers

    folder = Path(folder)
    if not is_sps_compact(folder):
        raise KDForgeError(f"{folder} has no {SPS_META}; give a folder written by save_sps_compact")
    meta = json.loads((folder / SPS_META).read_text())
    config = transformers.AutoConfig.from_pretrained(folder)
    if meta.get("mode") not in SPS_MODES or meta.get("physical_layers") != config.num_hidden_layers:
        raise KDForgeError(f"{folder / SPS_META} does not match config.json (mode {meta.get('mode')!r}, "
                           f"{meta.get('physical_layers')} vs {config.num_hidden_layers} layers); save it again")
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None  # a transformers model class, nothing else
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(folder)
    return make_sps_student(model, meta["mode"])
