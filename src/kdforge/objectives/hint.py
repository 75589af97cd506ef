"""FitNets hint loss, and the feature helpers shared by the feature-level terms (TinyBERT, PKD).

Romero, Ballas, Ebrahimi Kahou, Chassang, Gatta & Bengio (ICLR 2015), "FitNets: Hints for Thin
Deep Nets", eq. (3):

    L_HT(W_Guided, W_r) = 1/2 || u_h(x; W_Hint) - r(v_g(x; W_Guided); W_r) ||^2

u_h is the teacher up to its hint layer, v_g the student up to its guided layer and r a learned
regressor that maps the guided layer's width to the hint layer's. For convolutional features the
paper's regressor is convolutional; here it is a 1x1 convolution (the same weights act as a linear
map on the last axis of token features), so the spatial size of the two feature maps must agree.

Reduction, as in the authors' code (``costs/HintCost.py``: ``0.5 * (hint - out) ** 2`` summed over
the channel axis, then averaged over everything else): one half of the squared error summed over
the channel / hidden axis, averaged over the batch and over positions (pixels, tokens). With
several (guided, hint) pairs the per-pair losses are summed. No temperature; the teacher's features
are detached; only the student and the regressors get gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import OBJECTIVES, Objective

# ---------------------------------------------------------------------------------------------
# Helpers shared by the feature-level objectives (tinybert.py, pkd.py)
# ---------------------------------------------------------------------------------------------


def hidden_states_of(outputs: Outputs, who: str, objective: str) -> tuple[torch.Tensor, ...]:
    if outputs.hidden_states is None:
        raise KDForgeError(f"objective {objective!r} needs the {who}'s hidden states but the {who} returned none; "
                           "use a Hugging Face model (output_hidden_states) for this term")
    return outputs.hidden_states


def feature_of(outputs: Outputs, path: str, who: str, objective: str) -> torch.Tensor:
    if path not in outputs.features:
        raise KDForgeError(f"objective {objective!r} reads the {who}'s module {path!r} but it was not captured; "
                           "build the loss with WeightedLoss.setup so its hook paths reach the model adapter")
    return outputs.features[path]


def encoder_size(model: nn.Module | None, who: str, objective: str) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) from a Hugging Face model's config."""
    if model is None:
        raise KDForgeError(f"objective {objective!r} needs a teacher; add a `teacher` section to the config")
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(width, int):
        raise KDForgeError(f"objective {objective!r} needs a transformer {who} with config.num_hidden_layers and "
                           f"config.hidden_size, but got {type(model).__name__}; use a Hugging Face encoder")
    return layers, width


def bert_linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    """nn.Linear initialised as BERT initialises its linears: N(0, std^2) weights, zero bias."""
    linear = nn.Linear(d_in, d_out)
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    nn.init.zeros_(linear.bias)
    return linear


def check_layer_map(pairs: Sequence[tuple[int, int]], student_max: int, teacher_max: int, what: str,
                    objective: str) -> list[tuple[int, int]]:
    """Validate (student, teacher) index pairs against the models' index ranges 0..max."""
    for s, t in pairs:
        if not (0 <= s <= student_max and 0 <= t <= teacher_max):
            raise KDForgeError(f"{objective}.layer_map pair [{s}, {t}] is out of range: {what} indices are "
                               f"0..{student_max} for the student and 0..{teacher_max} for the teacher")
    return [(int(s), int(t)) for s, t in pairs]


# ---------------------------------------------------------------------------------------------
# FitNets
# ---------------------------------------------------------------------------------------------

#: a layer: a hidden-state index (int; 0 = embedding output) or a module path (str, hooked)
Layer = int | str


class HintParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student_path: str | None = Field(None, min_length=1, description="guided layer: a student module path")
    teacher_path: str | None = Field(None, min_length=1, description="hint layer: a teacher module path")
    student_layer: int | None = Field(None, description="guided layer: a student hidden-state index")
    teacher_layer: int | None = Field(None, description="hint layer: a teacher hidden-state index")
    pairs: list[tuple[int | str, int | str]] | None = Field(
        None, min_length=1, description="several [guided, hint] pairs; int = hidden-state index, str = module path")
    widths: list[tuple[PositiveInt, PositiveInt]] | None = Field(
        None, min_length=1, description="[student, teacher] channel counts per pair, when they cannot be inferred")
    activation: Literal["none", "relu"] = Field(
        "none", description="non-linearity of the regressor; FitNets gives it the hint layer's non-linearity")

    @model_validator(mode="after")
    def _one_way(self) -> HintParams:
        single = (self.student_path, self.teacher_path, self.student_layer, self.teacher_layer)
        if self.pairs is not None:
            if any(v is not None for v in single):
                raise ValueError("give either `pairs` or student_path/student_layer + teacher_path/teacher_layer")
        else:
            for side in ("student", "teacher"):
                given = [getattr(self, f"{side}_path") is not None, getattr(self, f"{side}_layer") is not None]
                if sum(given) != 1:
                    raise ValueError(f"give exactly one of {side}_path and {side}_layer (or `pairs`)")
        if self.widths is not None and len(self.widths) != len(self.layer_pairs()):
            raise ValueError(f"`widths` has {len(self.widths)} entries for {len(self.layer_pairs())} pair(s)")
        return self

    def layer_pairs(self) -> list[tuple[Layer, Layer]]:
        if self.pairs is not None:
            return [(s, t) for s, t in self.pairs]
        s = self.student_path if self.student_path is not None else self.student_layer
        t = self.teacher_path if self.teacher_path is not None else self.teacher_layer
        return [(s, t)]  # type: ignore[list-item]


def module_width(model: nn.Module, path: str, who: str) -> int:
    """Channels of a module's output, read from its last sized submodule (Linear out_features,
    Conv out_channels, BatchNorm num_features, LayerNorm normalized_shape)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise KDForgeError(f"hint: {who} module path {path!r} not found in {type(model).__name__}") from None
    for sub in reversed(list(module.modules())):
        for attr in ("out_features", "out_channels", "num_features"):
            value = getattr(sub, attr, None)
            if isinstance(value, int):
                return value
        shape = getattr(sub, "normalized_shape", None)
        if isinstance(shape, tuple | list) and shape:
            return int(shape[-1])
    raise KDForgeError(f"hint: cannot tell the width of the {who}'s module {path!r}; give it with "
                       "`widths: [[student, teacher], ...]`")


def layer_width(model: nn.Module, layer: Layer, who: str) -> int:
    if isinstance(layer, str):
        return module_width(model, layer, who)
    n_layers, width = encoder_size(model, who, "hint")
    if not -(n_layers + 1) <= layer <= n_layers:
        raise KDForgeError(f"hint: {who} hidden-state index {layer} is out of range 0..{n_layers} "
                           "(0 = embedding output, i = output of layer i)")
    return width


class Regressor(nn.Module):
    """r(v) = act(W v + b): a 1x1 convolution on (N, C, H, W) maps, a linear map on the last axis
    of (N, ..., C) token features; the same (C_t, C_s) weights serve both."""

    def __init__(self, d_in: int, d_out: int, activation: str = "none"):
        super().__init__()
        conv = nn.Conv2d(d_in, d_out, kernel_size=1)  # PyTorch's default conv initialisation
        self.weight = nn.Parameter(conv.weight.detach().reshape(d_out, d_in).clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            out = F.conv2d(x, self.weight[:, :, None, None], self.bias)
        else:
            out = F.linear(x, self.weight, self.bias)
        return F.relu(out) if self.activation == "relu" else out


def hint_loss(regressed: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """1/2 sum_c (hint - regressed)^2, averaged over the batch and positions; the hint is detached.

    The channel axis is 1 for (N, C, H, W) maps and the last axis otherwise."""
    if regressed.shape != hint.shape:
        raise KDForgeError(f"hint: the regressed student feature {tuple(regressed.shape)} and the teacher's hint "
                           f"{tuple(hint.shape)} differ in shape; pick layers with the same spatial size / length")
    channel = 1 if hint.dim() == 4 else -1
    return 0.5 * (hint.detach() - regressed).pow(2).sum(channel).mean()


@OBJECTIVES.register("hint")
class Hint(Objective):
    """FitNets hint loss (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets").

        L_HT = sum_pairs 1/2 mean_{n, positions} sum_c ( u_h(x)_c - r(v_g(x))_c )^2

    u_h: the teacher's hint layer output (detached); v_g: the student's guided layer output;
    r: a learned 1x1-conv / linear regressor student width -> teacher width (owned by this term,
    trained with the student). Layers are module paths (``student_path``/``teacher_path``, read
    through forward hooks) or hidden-state indices (``student_layer``/``teacher_layer``; 0 =
    embedding output, i = output of layer i), or several ``pairs: [[s, t], ...]`` mixing both.
    Reduction: that of the authors' code (HintCost.py), 1/2 squared error summed over channels and
    averaged over batch and positions; pairs are summed. ``activation`` gives the regressor the hint
    layer's non-linearity as the paper asks (default none: hidden states after LayerNorm have none).
    Widths come from the models (config.hidden_size, or the hooked module's last sized submodule);
    ``widths`` overrides them. ``kdforge.objectives.hint_points.hint_points_for`` picks ``teacher_layer`` values
    by clustering the teacher's layers on their CKA similarity.
    """

    Params = HintParams

    def __init__(self, params: HintParams | None = None):
        super().__init__(params)
        self.pairs = self.params.layer_pairs()
        uses_hidden = any(isinstance(layer, int) for pair in self.pairs for layer in pair)
        self.requires = frozenset({"hidden_states"}) if uses_hidden else frozenset()
        self.regressors = nn.ModuleList()

    def setup(self, student, teacher):
        if teacher is None:
            raise KDForgeError("objective 'hint' needs a teacher; add a `teacher` section to the config")
        widths = self.params.widths
        regressors = []
        for i, (s, t) in enumerate(self.pairs):
            d_s, d_t = widths[i] if widths is not None else (layer_width(student, s, "student"),
                                                              layer_width(teacher, t, "teacher"))
            regressors.append(Regressor(d_s, d_t, self.params.activation))
        self.regressors = nn.ModuleList(regressors)

    def hook_paths(self, student, teacher):
        return ([s for s, _ in self.pairs if isinstance(s, str)], [t for _, t in self.pairs if isinstance(t, str)])

    @staticmethod
    def _feature(outputs: Outputs, layer: Layer, who: str) -> torch.Tensor:
        if isinstance(layer, str):
            return feature_of(outputs, layer, who, "hint")
        return hidden_states_of(outputs, who, "hint")[layer]

    def forward(self, student, teacher, batch, progress):
        if len(self.regressors) != len(self.pairs):
            raise RuntimeError("objective 'hint' was not set up: call setup(student, teacher) first")
        total = student.logits.new_zeros(())
        for (s, t), regressor in zip(self.pairs, self.regressors, strict=True):
            total = total + hint_loss(regressor(self._feature(student, s, "student")),
                                      self._feature(teacher, t, "teacher"))
        return total
