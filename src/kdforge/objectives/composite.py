"""A stage's loss: the weighted sum of its objectives, each bound to the role it learns from.

Every term that reads a teacher is bound to exactly one role (``{name: hinton_kd, teacher: t2}``;
the stage's only teacher by default), so an objective always receives exactly one ``Outputs``.
Weights may follow schedules (see schedules.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Objective, build_objective
from kdforge.objectives.schedules import Schedule, make_schedule
from kdforge.progress import Progress

#: an objective built already, with its weight (a number, a schedule mapping or a callable) and the role
#: it learns from (None: the stage's only teacher)
Term = tuple[Objective, Any, str | None]


def bind_role(objective: Objective, name: str, role: str | None, teachers: Sequence[str]) -> str | None:
    """The role ``objective`` learns from: ``role`` if given, else the only teacher; None for terms
    that read no teacher. One clear line when that is ambiguous or impossible."""
    if not objective.uses_teacher:
        return None
    if role is not None:
        if role not in teachers:
            raise KDForgeError(f"objective {name!r} learns from {role!r}, which does not teach in this stage "
                               f"(teachers: {', '.join(teachers) or 'none'}); fix its `teacher:` key")
        return role
    if len(teachers) == 1:
        return teachers[0]
    if not teachers:
        raise KDForgeError(f"objective {name!r} reads a teacher's outputs but this stage has no teacher; "
                           "add a `teacher` section or remove the term")
    raise KDForgeError(f"objective {name!r} reads a teacher's outputs and this stage has {len(teachers)} teachers "
                       f"({', '.join(teachers)}); say which with `teacher: NAME` on the term")


class WeightedLoss(nn.Module):
    """L = sum_k w_k(progress) * L_k(student, teacher[role_k], batch, progress)."""

    def __init__(self, objectives: Sequence[Objective], weights: Sequence[Schedule], names: Sequence[str],
                 roles: Sequence[str | None] | None = None):
        super().__init__()
        self.objectives = nn.ModuleList(objectives)
        self.weights = list(weights)
        self.names = list(names)
        self.roles = list(roles) if roles is not None else \
            [("teacher" if o.uses_teacher else None) for o in objectives]

    @classmethod
    def from_config(cls, configs: Sequence[ObjectiveConfig | Term],
                    teachers: Sequence[str] = ("teacher",)) -> WeightedLoss:
        """Build and bind the terms of ``configs`` to the roles in ``teachers`` (the stage's teachers). A term
        is an :class:`ObjectiveConfig`, or an objective built already as ``(objective, weight, role)`` (the
        Python API; its name is its class name in lower case)."""
        objectives, weights, names, roles = [], [], [], []
        for i, c in enumerate(configs):
            if isinstance(c, ObjectiveConfig):
                objective, weight, name, role = build_objective(c, i), c.weight, c.name, c.teacher
            else:
                (objective, weight, role), name = c, type(c[0]).__name__.lower()
            check_weight_sign(type(objective), name, weight, f"objectives.{i}.weight")
            objectives.append(objective)
            weights.append(make_schedule(weight, f"objectives.{i}.weight"))
            names.append(name)
            roles.append(role)
        names = unique_names(names)
        roles = [bind_role(o, n, r, list(teachers)) for o, n, r in zip(objectives, names, roles, strict=True)]
        return cls(objectives, weights, names, roles)

    @property
    def uses_teacher(self) -> bool:
        return any(role is not None for role in self.roles)

    @property
    def teacher_roles(self) -> list[str]:
        """The roles some term learns from, in order of first use."""
        return list(dict.fromkeys(r for r in self.roles if r is not None))

    def terms_of(self, role: str) -> list[Objective]:
        return [o for o, r in zip(self.objectives, self.roles, strict=True) if r == role]

    def parts(self) -> dict[str, nn.Module]:
        """The terms that own trainable parameters (a projection, a learned temperature), by name."""
        return {name: o for name, o in zip(self.names, self.objectives, strict=True)
                if any(p.requires_grad for p in o.parameters())}

    def setup(self, student: nn.Module, teachers: Mapping[str, nn.Module]) -> tuple[list[str], dict[str, list[str]]]:
        """Let every term size itself to the student and its own teacher; returns the student's hook
        paths and each teacher role's hook paths."""
        student_paths: list[str] = []
        teacher_paths: dict[str, list[str]] = {role: [] for role in teachers}
        for objective, role in zip(self.objectives, self.roles, strict=True):
            teacher = teachers.get(role) if role is not None else None
            objective.setup(student, teacher)
            s_paths, t_paths = objective.hook_paths(student, teacher)
            student_paths += [p for p in s_paths if p not in student_paths]
            if role is not None:
                teacher_paths[role] += [p for p in t_paths if p not in teacher_paths[role]]
        return student_paths, teacher_paths

    def requires(self, role: str | None = None) -> frozenset[str]:
        """What the terms need from forward passes ("hidden_states", "attentions"): of the student
        (``role=None``: every term) or of one teacher role (the terms bound to it)."""
        chosen = self.objectives if role is None else self.terms_of(role)
        return frozenset().union(*(o.requires for o in chosen))

    def forward(self, student: Outputs, teachers: Mapping[str, Outputs], batch: dict[str, Any],
                progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        total = student.logits.new_zeros(())
        terms: dict[str, float] = {}
        for name, objective, weight, role in zip(self.names, self.objectives, self.weights, self.roles, strict=True):
            w = weight(progress)
            value = objective(student, teachers[role] if role is not None else None, batch, progress)
            terms[name] = float(value.detach())
            if w != 0:
                total = total + w * value
        return total, terms


def weight_numbers(weight: Any) -> list[float]:
    """The numbers a weight setting can take: the number itself, or a schedule's value/start/end/values
    (a callable from the API cannot be inspected: none)."""
    if isinstance(weight, bool):
        return []
    if isinstance(weight, int | float):
        return [float(weight)]
    if isinstance(weight, dict):
        found = [weight.get(k) for k in ("value", "start", "end")] + list(weight.get("values") or [])
        return [float(v) for v in found if isinstance(v, int | float) and not isinstance(v, bool)]
    return []


def check_weight_sign(objective: type[Objective], name: str, weight: Any, where: str) -> None:
    """A negative weight turns a loss to minimise into one to maximise; refuse it unless the term
    documents that it allows one (``Objective.allows_negative_weight``)."""
    negative = [v for v in weight_numbers(weight) if v < 0]
    if negative and not getattr(objective, "allows_negative_weight", False):
        raise KDForgeError(f"`{where}` is {negative[0]:g}: objective {name!r} does not allow a negative weight "
                           "(it would maximise the loss); use a weight >= 0")


def unique_names(names: Sequence[str]) -> list[str]:
    """Suffix repeated names (``ce``, ``ce_2``) so every term has its own log entry."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
