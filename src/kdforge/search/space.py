"""The space a student architecture search samples from, and how a sample becomes a kdforge job.

A candidate is one categorical choice per searched dimension (KD-NAS, Trivedi et al. 2023: a grid of
layer counts and widths of a transformer student initialised from the teacher's weights; here also
CIFAR ResNet depths and widths). A transformer candidate with ``L`` layers, hidden size ``H``, head
size ``d`` and feed-forward size ``F`` is the student ``{layers: evenly_spaced_layers(N, L), config:
{hidden_size: H, num_attention_heads: H / d, intermediate_size: F}}`` of an ``N``-layer teacher (the
teacher's layers sliced to those widths, :func:`kdforge.models.student.student_sliced`); a ResNet
candidate with ``n`` blocks per stage and width ``w`` is ``vision:resnet{6n+2}_w{w}``.

Searching ``temperature`` T and ``kd_weight`` a as well replaces the job's objectives with AutoKD's
loss (Eyono et al. 2021): ``L = (1 - a) CE(y, s) + a KD_T(t, s)`` (``ce`` weight 1 - a, ``hinton_kd``
weight a at temperature T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from kdforge.errors import KDForgeError
from kdforge.models.student import evenly_spaced_layers

if TYPE_CHECKING:
    import optuna

TRANSFORMER_DIMS = ("layers", "hidden_size", "head_dim", "intermediate_size", "hidden_act")
RESNET_DIMS = ("blocks", "width")
LOSS_DIMS = ("temperature", "kd_weight")
KINDS = {"transformer": TRANSFORMER_DIMS, "resnet": RESNET_DIMS}

#: the choices of a dimension the search config leaves out
DEFAULTS: dict[str, list] = {
    "layers": [1, 2, 3, 4], "hidden_size": [128, 192, 256, 320, 384], "head_dim": [32, 64],
    "intermediate_size": [384, 768, 1536], "hidden_act": [], "blocks": [1, 2, 3], "width": [8, 16, 32],
    "temperature": [1.0, 2.0, 4.0, 8.0], "kd_weight": [0.25, 0.5, 0.75],
}


def _check_choice(key: str, value: Any) -> None:
    """One choice of ``search.space.<key>``: a whole number >= 1, a string (``hidden_act``), a finite
    temperature > 0 or a weight in [0, 1]."""
    where = f"search.space.{key}"
    if key == "hidden_act":
        ok, want = isinstance(value, str) and bool(value), "activation names (e.g. gelu)"
    elif key in LOSS_DIMS:
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ok = number and (value > 0 if key == "temperature" else 0 <= value <= 1)
        want = "finite numbers > 0" if key == "temperature" else "numbers in [0, 1]"
    else:
        ok, want = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "whole numbers >= 1"
    if not ok:
        raise KDForgeError(f"{where}: {value!r} is not a valid choice; give a list of {want}")


@dataclass
class SearchSpace:
    """Categorical choices per dimension; an empty list = dimension not searched (the teacher's value
    for transformer widths). Validated on construction: one KDForgeError naming ``search.space.<key>``."""

    layers: list[int] = field(default_factory=list)
    hidden_size: list[int] = field(default_factory=list)
    head_dim: list[int] = field(default_factory=list)
    intermediate_size: list[int] = field(default_factory=list)
    hidden_act: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    kd_weight: list[float] = field(default_factory=list)
    kind: Literal["transformer", "resnet"] = "transformer"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise KDForgeError(f"search.kind is {self.kind!r}; use transformer or resnet")
        for key in (*TRANSFORMER_DIMS, *RESNET_DIMS, *LOSS_DIMS):
            choices = getattr(self, key)
            if not isinstance(choices, list):
                raise KDForgeError(f"search.space.{key} must be a list of choices, got {choices!r}")
            if choices and key not in (*KINDS[self.kind], *LOSS_DIMS):
                raise KDForgeError(f"search.space.{key} is not a dimension of a {self.kind} search; remove it")
            for value in choices:
                _check_choice(key, value)
            if len(set(choices)) != len(choices):
                raise KDForgeError(f"search.space.{key} {choices} repeats a choice; list each once")
        for head in self.head_dim:
            bad = [h for h in self.hidden_size if h % head]
            if bad:
                raise KDForgeError(f"search.space.head_dim: {head} does not divide search.space.hidden_size {bad}; "
                                   "every hidden size must be a multiple of every head size")
        for pair in (RESNET_DIMS, LOSS_DIMS):
            given = [k for k in pair if getattr(self, k)]
            if len(given) == 1:
                other = next(k for k in pair if k not in given)
                raise KDForgeError(f"search.space.{other}: search {' and '.join(pair)} together; give "
                                   f"search.space.{other} one choice to fix it")

    @classmethod
    def from_dict(cls, d: dict | None, kind: str) -> SearchSpace:
        """A space of ``kind`` from the ``search.space`` mapping ``d``; dimensions it leaves out take
        :data:`DEFAULTS` (those of the other kind stay unsearched)."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise KDForgeError(f"search.space must be a mapping of dimension -> list of choices, got {d!r}")
        if kind not in KINDS:
            raise KDForgeError(f"search.kind is {kind!r}; use transformer or resnet")
        known = {f.name for f in fields(cls)} - {"kind"}
        for key in d:
            if key not in known:
                raise KDForgeError(f"search.space.{key} is not a dimension; known: {', '.join(sorted(known))}")
        values = {k: list(DEFAULTS[k]) for k in (*KINDS[kind], *LOSS_DIMS)}
        values.update(d)  # a dimension of the other kind is refused by the validation
        return cls(**values, kind=kind)

    def dimensions(self) -> dict[str, list]:
        """The searched dimensions (name -> choices) in a fixed order: the kind's, then the loss's."""
        return {k: getattr(self, k) for k in (*KINDS[self.kind], *LOSS_DIMS) if getattr(self, k)}

    def size(self) -> int:
        """The number of distinct candidates (the product of the choice counts)."""
        return math.prod(len(c) for c in self.dimensions().values())

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """One candidate: ``trial.suggest_categorical(name, choices)`` per searched dimension."""
        return {name: trial.suggest_categorical(name, choices) for name, choices in self.dimensions().items()}

    def overrides(self, params: dict, teacher_config=None, n_teacher_layers: int | None = None) -> dict[str, Any]:
        """``{dotted config key: value}`` overrides (:func:`kdforge.config.apply_overrides`) turning a job into
        the candidate ``params``: ``student`` (the whole section) and, when the loss is searched,
        ``objectives``. A transformer candidate needs the teacher's layer count (``n_teacher_layers`` or
        ``teacher_config.num_hidden_layers``) and, for unsearched widths, ``teacher_config``."""
        out: dict[str, Any] = {}
        if self.kind == "resnet" and "blocks" in params:
            out["student"] = {"model": f"vision:resnet{6 * params['blocks'] + 2}_w{params['width']}"}
        elif self.kind == "transformer" and any(k in params for k in TRANSFORMER_DIMS):
            out["student"] = _transformer_student(params, teacher_config, n_teacher_layers)
        if "temperature" in params:
            a = params["kd_weight"]
            out["objectives"] = [{"name": "ce", "weight": 1 - a},
                                 {"name": "hinton_kd", "weight": a, "temperature": params["temperature"]}]
        return out


def _transformer_student(params: dict, teacher_config, n_teacher_layers: int | None) -> dict[str, Any]:
    """``{layers: evenly spaced teacher layers, config: {hidden_size, num_attention_heads, ...}}``."""
    n = n_teacher_layers or getattr(teacher_config, "num_hidden_layers", None)
    if n is None:
        raise KDForgeError("a transformer search needs the teacher's layer count (its config's num_hidden_layers)")
    count = params.get("layers", n)
    if count > n:
        raise KDForgeError(f"search.space.layers: {count} layers but the teacher has {n}; keep choices <= {n}")
    config: dict[str, Any] = {}
    if "hidden_size" in params or "head_dim" in params:
        t_hidden = getattr(teacher_config, "hidden_size", None)
        t_heads = getattr(teacher_config, "num_attention_heads", None)
        t_head = getattr(teacher_config, "head_dim", None) or (t_hidden // t_heads if t_hidden and t_heads else None)
        hidden, head = params.get("hidden_size", t_hidden), params.get("head_dim", t_head)
        if hidden is None or head is None:
            raise KDForgeError("search.space: searching only one of hidden_size / head_dim needs the teacher's "
                               "config for the other")
        if hidden % head:
            raise KDForgeError(f"search.space.hidden_size: {hidden} is not a multiple of the head size {head}; "
                               "pick hidden sizes divisible by it")
        heads = hidden // head
        config.update(hidden_size=hidden, num_attention_heads=heads)
        if getattr(teacher_config, "head_dim", None) is not None:  # Llama-style configs store it
            config["head_dim"] = head
        if t_heads is not None and getattr(teacher_config, "num_key_value_heads", None) == t_heads:
            config["num_key_value_heads"] = heads  # multi-head attention stays multi-head
    for key in ("intermediate_size", "hidden_act"):
        if key in params:
            config[key] = params[key]
    student: dict[str, Any] = {"layers": evenly_spaced_layers(n, count)}
    if config:
        student["config"] = config
    return student
