"""Roles as the config names them, and what each can give.

Nobody else asks whether a role is a black box: they ask its :class:`Capabilities` (:func:`capabilities`
by role, :func:`teacher_capabilities` for a teacher's config section).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdforge.config import PRIMARY_TEACHER, JobConfig, TeacherConfig

#: outputs an objective may read of a model: logits, hidden states, attention maps, hooked module outputs
MODEL_OUTPUTS = frozenset({"logits", "hidden_states", "attentions", "features"})


@dataclass(frozen=True)
class Capabilities:
    """What a role can give the rest of the job.

    ``outputs``: what objectives may read of it (:data:`MODEL_OUTPUTS` for a model, ``logits`` only for a
    black box: the log of the probabilities it answers). ``weights``: it has parameters of its own, so it
    can be fine-tuned, trained by an online strategy, exported (ONNX), timed, sized and measured for
    sharpness, and its layers, config, embeddings and tokenizer can be read. ``queried``: its answers are
    bought by queries (cached, budgeted); the report states the queries it made."""

    outputs: frozenset[str]
    weights: bool
    queried: bool

    def gives(self, needs) -> bool:
        """Whether every output in ``needs`` (e.g. ``{"hidden_states"}``) can be read of the role."""
        return set(needs) <= self.outputs


MODEL = Capabilities(MODEL_OUTPUTS, weights=True, queried=False)
BLACK_BOX = Capabilities(frozenset({"logits"}), weights=False, queried=True)


def teacher_capabilities(spec: TeacherConfig) -> Capabilities:
    """A teacher's capabilities from its config section: a ``black_box`` one's, or a ``model``'s."""
    return BLACK_BOX if spec.black_box is not None else MODEL


def capabilities(config: JobConfig, role: str) -> Capabilities:
    """What ``role`` of the job can give (the student and the assistants are models)."""
    spec = config.teacher_configs().get(role)
    return MODEL if spec is None else teacher_capabilities(spec)


def primary_teacher(config: JobConfig) -> str:
    """The primary teacher's role: ``teacher`` when the config has that section, else the first named one."""
    return next(iter(config.teacher_configs()))


def teacher_key(role: str) -> str:
    """The config section of teacher ``role`` (for error messages)."""
    return "teacher" if role == PRIMARY_TEACHER else f"teachers.{role}"
