"""CTKD: a learned, adversarial distillation temperature that wraps any logit objective.

Li, Li, Yang, Zhao, Song, Luo, Li & Yang (AAAI 2023), "Curriculum Temperature for Knowledge
Distillation" (arXiv:2211.16231; official code github.com/zhengli97/CTKD).

The temperature is predicted by a small module with parameters theta_T and fed to a base logit
term (``hinton_kd``, ``dkd``...), which is called exactly as it is without CTKD, with T in place of
its fixed temperature:

    T = T_min + T_range * sigmoid(GRL_lambda(theta))           in (T_min, T_min + T_range) = (1, 21)
    L = base.logit_loss(z_s, z_t, y, T)                         e.g. hinton_kd: mean_i T_i^2 KL(p_t,i || p_s,i)

* ``mode: global``: theta is one learnable scalar, initialised at 1 (the official ``Global_T``:
  ``nn.Parameter(torch.ones(1))``), so T at initialisation is 1 + 20 sigmoid(1) = 15.6212. T is a scalar
  tensor.
* ``mode: instance``: theta_i = MLP([z_t,i, z_s,i]) for each sample, giving T of shape (N, 1). The paper
  describes the instance-wise module as a small MLP on the teacher's and student's predictions; the
  official repository releases only the global module, so the architecture is our choice, documented
  here: Linear(2C, hidden_dim) -> ReLU -> Linear(hidden_dim, 1), on the concatenated *logits*
  [teacher, student], both detached (the module reads them, it must not push the student through the
  reversed path). The last layer starts at weight 0 and bias ``theta_init``, so every sample starts at
  the global module's T (15.6212) and the per-sample spread is learned.

Adversarial training with a gradient-reversal layer (GRL, Ganin & Lempitsky 2015): the forward pass is
the identity, the backward multiplies the incoming gradient by ``lambda`` (no extra negation: lambda
itself is negative here), so the student's optimizer *descends* the loss w.r.t. the student and
*ascends* it, scaled by |lambda|, w.r.t. theta: min_student max_theta L. The gradient reaching theta
includes the T^2 factor of the base term (T is a tensor, nothing about it is detached).

Curriculum (paper, eq. for lambda_n; official ``CosineDecay(max_value=0, min_value=-1, num_loops)`` called
with the 1-based epoch): for the 1-based epoch e (``progress.epoch_number``) and L = ``lambda_epochs``,

    lambda_paper(e) = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min(e, L) / L)) / 2
    GRL multiplier  = -lambda_paper(e)     = -(1 - cos(pi e / L)) / 2 for e = 1..L, then -1 (defaults)

Defaults (official scripts and paper): T_min = 1 (``--t_start 1``), T_range = 20 (``--t_end 20``;
T = t_start + t_end * sigmoid), theta_init = 1 (``Global_T``), lambda_min = 0, lambda_max = 1 (paper;
``--decay_max 0 --decay_min -1``), lambda_epochs = 10 for CIFAR-100 (``--decay_loops 10``; use 5 for
ImageNet as the official ImageNet script does), base = ``hinton_kd`` (``--distill kd``).

Reduction and T^2: those of the base term (kdforge's KL terms: sum over classes, mean over the batch,
times T_i^2 per sample). The teacher logits are detached by the base term and by the instance module.
The weights of the task and KD terms are the job's objective weights, e.g. the official CIFAR run
(``-r 0.1 -a 0.9``)::

    objectives:
      - {name: ce, weight: 0.1}
      - {name: ctkd, weight: 0.9, base: hinton_kd}
      # or: {name: ctkd, base: dkd, base_params: {alpha: 1, beta: 8}}

theta trains with the student's optimizer (it is a parameter of this module). The curriculum was
designed with SGD (as in the paper); Adam-type optimizers normalise the gradient's scale, so there
|lambda| mainly matters through its sign and its changes, not its magnitude.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from torch import nn

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.objectives.base import OBJECTIVES, LogitObjective, Objective, Progress, build_objective
from kdforge.objectives.logit import _class_logits

#: keys of an objective's config that are not its parameters, and the one CTKD replaces
_RESERVED_BASE_KEYS = ("name", "weight", "temperature")


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``lam`` (negative: reversed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.lam, None


def gradient_reversal(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``x`` in the forward pass; ``lam * gradient`` in the backward pass."""
    return _GradientReversal.apply(x, lam)


def grl_lambda(epoch_number: int, lambda_epochs: int, lambda_min: float = 0.0, lambda_max: float = 1.0) -> float:
    """The GRL multiplier at 1-based epoch ``epoch_number``: -(lambda_min + (lambda_max - lambda_min) *
    (1 - cos(pi * min(e, L) / L)) / 2), i.e. from about 0 at e = 1 to -lambda_max at e >= L."""
    e = min(max(epoch_number, 0), lambda_epochs)
    return -(lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * e / lambda_epochs)) / 2.0)


class CTKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = Field("hinton_kd", description="the wrapped logit objective, by name")
    base_params: dict[str, Any] = Field(default_factory=dict, description="its parameters (no temperature)")
    mode: Literal["global", "instance"] = "global"
    temperature_min: PositiveFloat = 1.0
    temperature_range: PositiveFloat = 20.0
    theta_init: float = 1.0
    lambda_epochs: PositiveInt = 10
    lambda_min: NonNegativeFloat = 0.0
    lambda_max: NonNegativeFloat = 1.0
    hidden_dim: PositiveInt = Field(256, description="instance mode: width of the MLP's hidden layer")
    num_classes: PositiveInt | None = Field(None, description="instance mode: number of classes, when it cannot "
                                            "be read from the student (HF config.num_labels or its last Linear)")

    @field_validator("base")
    @classmethod
    def _base_is_a_logit_objective(cls, name: str) -> str:
        if name not in OBJECTIVES:  # filled: importing any objectives module runs the package's __init__ first
            raise ValueError(f"unknown objective {name!r}; known logit objectives: {', '.join(_logit_names())}")
        if not issubclass(OBJECTIVES.get(name), LogitObjective):
            raise ValueError(f"objective {name!r} is not a logit objective CTKD can drive with a learned "
                             f"temperature; use one of: {', '.join(_logit_names())}")
        return name

    @field_validator("base_params")
    @classmethod
    def _base_params_are_valid(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key in _RESERVED_BASE_KEYS:
            if key in params:
                fix = ("CTKD learns the temperature; bound it with temperature_min and temperature_range"
                       if key == "temperature" else "set it on the ctkd objective itself")
                raise ValueError(f"`{key}` does not belong in base_params: {fix}")
        base = info.data.get("base")
        if base is not None:  # else `base` itself failed and is reported
            try:
                OBJECTIVES.get(base).Params.model_validate(params)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "(top level)"
                msg = "this key does not exist" if first["type"] == "extra_forbidden" else first["msg"]
                raise ValueError(f"`{where}` of base objective {base!r}: {msg}") from None
        return params

    @field_validator("lambda_max")
    @classmethod
    def _max_at_least_min(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("lambda_min")
        if low is not None and value < low:
            raise ValueError(f"lambda_max ({value}) must be >= lambda_min ({low})")
        return value


def _logit_names() -> list[str]:
    return [n for n in OBJECTIVES.names() if issubclass(OBJECTIVES.get(n), LogitObjective)]


def _infer_num_classes(model: nn.Module) -> int | None:
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(num_labels, int) and num_labels > 0:
        return num_labels
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


@OBJECTIVES.register("ctkd")
class CTKD(Objective):
    """Curriculum temperature (Li et al., AAAI 2023) around a base logit objective; see the module docstring.

    ``current_temperature``: the last temperature used (the global T, or the batch mean of the per-sample
    T in instance mode), for logging; ``current_lambda``: the last GRL multiplier.
    """

    Params = CTKDParams

    def __init__(self, params: CTKDParams | None = None):
        super().__init__(params)
        p = self.params
        base = build_objective(ObjectiveConfig(name=p.base, **p.base_params))
        if not isinstance(base, LogitObjective):  # the Params validator rejects it first; kept as a guard
            raise KDForgeError(f"objective 'ctkd': `base` {p.base!r} is not a logit objective")
        self.base = base
        self.uses_teacher = base.uses_teacher
        self.requires = base.requires
        self.theta: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if p.mode == "global":
            self.theta = nn.Parameter(torch.tensor(float(p.theta_init)))
        elif p.num_classes is not None:
            self._build_mlp(p.num_classes)
        self.current_lambda: float | None = None
        self._last_temperature: torch.Tensor | None = None

    def _build_mlp(self, num_classes: int) -> None:
        hidden = self.params.hidden_dim
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, float(self.params.theta_init))
        self.num_classes = num_classes

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.base.setup(student, teacher)
        if self.params.mode == "instance" and self.mlp is None:
            n = _infer_num_classes(student)
            if n is None or n < 2:
                raise KDForgeError("objective 'ctkd' (mode: instance) cannot tell the number of classes from the "
                                   "student; set `num_classes` on the ctkd objective")
            self._build_mlp(n)

    def hook_paths(self, student, teacher):
        return self.base.hook_paths(student, teacher)

    def lambda_at(self, progress: Progress) -> float:
        """The GRL multiplier for this epoch (negative: the temperature ascends the loss)."""
        p = self.params
        return grl_lambda(progress.epoch_number, p.lambda_epochs, p.lambda_min, p.lambda_max)

    def temperature(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, lam: float) -> torch.Tensor:
        """T with the GRL multiplier ``lam``: a scalar tensor (global) or (N, 1) (instance)."""
        p = self.params
        if p.mode == "global":
            theta = self.theta
        else:
            if self.mlp is None:
                raise KDForgeError("objective 'ctkd' (mode: instance) was not set up: call setup(student, teacher) "
                                   "before building the optimizer, or set `num_classes`")
            if student_logits.shape[-1] != self.num_classes:
                raise KDForgeError(f"objective 'ctkd' built its MLP for {self.num_classes} classes but the logits "
                                   f"have {student_logits.shape[-1]}; set `num_classes` on the ctkd objective")
            inputs = torch.cat([teacher_logits.detach(), student_logits.detach()], dim=-1)
            theta = self.mlp(inputs.to(self.mlp[0].weight.dtype))
        return p.temperature_min + p.temperature_range * torch.sigmoid(gradient_reversal(theta, lam))

    def forward(self, student, teacher, batch, progress):
        student_logits = _class_logits(student.logits, "ctkd")
        lam = self.lambda_at(progress)
        temperature = self.temperature(student_logits, teacher.logits, lam)
        self.current_lambda = lam
        self._last_temperature = temperature.detach()
        return self.base.logit_loss(student_logits, teacher.logits, batch.get("labels"), temperature, progress)

    @property
    def current_temperature(self) -> float | None:
        p = self.params
        if p.mode == "global":
            return float(p.temperature_min + p.temperature_range * torch.sigmoid(self.theta.detach()))
        return None if self._last_temperature is None else float(self._last_temperature.mean())
