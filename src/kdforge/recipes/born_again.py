"""Born-again networks as a recipe: a chain of same-architecture generations, each taught by the last.

T. Furlanello, Z. C. Lipton, M. Tschannen, L. Itti, A. Anandkumar, "Born-Again Neural Networks",
ICML 2018. A student parameterised identically to its teacher is trained from a fresh start to
predict the labels and match the teacher's output distribution; repeated, generation g learns
from generation g-1 (their "sequence of teaching selves"):

    teacher -> gen1 -> gen2 -> ... -> gen{N-1} -> student        (N generations)

No new strategy is needed: generations 1..N-1 are assistants built like the student (roles
``gen1`` .. ``gen{N-1}``), and the recipe is N offline stages, stage ``gen{g}`` training assistant
``gen{g}`` with teachers ``[gen{g-1}]`` (``[teacher]`` for g = 1), the last stage ``student`` the
student with teachers ``[gen{N-1}]``. Each stage's loss is the tree's ``objectives`` (the job's
default, 0.5 CE + 0.5 Hinton KD at T = 4, when the tree has none). A finished generation is a frozen
role like any teacher: its outputs are cached where exact, and ``--resume`` skips finished stages.

:func:`born_again_tree` only writes the config tree; ``kdforge.config.validate_config`` checks it.
"""

from __future__ import annotations

import copy
from typing import Any

from kdforge.config import PRIMARY_TEACHER, STUDENT, JobConfig
from kdforge.errors import KDForgeError


def generation_role(g: int) -> str:
    """The role (and stage) name of generation ``g`` (1-based) before the last: ``gen1``, ``gen2``..."""
    return f"gen{g}"


def _default_objectives() -> list[dict[str, Any]]:
    field = JobConfig.model_fields["objectives"]
    return [o.model_dump(mode="json", exclude_none=True) for o in field.get_default(call_default_factory=True)]


def _same_architecture(tree: dict, student: dict | None) -> dict:
    """The spec every generation is built from: ``student`` if given, else the tree's student, else a
    fresh built-in vision net named like the teacher's ``vision:NAME`` model."""
    if student is not None:
        return copy.deepcopy(student)
    if tree.get("student") is not None:
        return copy.deepcopy(tree["student"])
    model = (tree.get(PRIMARY_TEACHER) or {}).get("model")
    if isinstance(model, str) and model.startswith("vision:"):
        return {"model": model}
    raise KDForgeError("born-again networks: give the generations' architecture (the teacher's): "
                       "born_again_tree(tree, N, student={'layers': [0, 1, ..., L-1]}) for a Hugging Face teacher "
                       "of L layers, or student={'model': 'vision:NAME'}")


def born_again_tree(tree: dict, generations: int, student: dict | None = None) -> dict:
    """A copy of the config ``tree`` turned into a born-again recipe of ``generations`` generations.

    Adds ``assistants`` ``gen1`` .. ``gen{N-1}`` and sets ``student``, each built from ``student`` (a
    StudentConfig mapping; default: the tree's ``student``, else ``{"model": teacher.model}`` for a
    ``vision:NAME`` teacher, i.e. a fresh net of the teacher's architecture), and writes ``stages``:
    ``gen1`` (learner gen1, teachers [teacher]), ``gen2`` (learner gen2, teachers [gen1]), ...,
    ``student`` (learner student, teachers [gen{N-1}]), each with the tree's ``objectives``.
    ``generations = 1`` is plain self-distillation (one stage). With two or more generations the report
    also scores BANE, the paper's ensemble of the born-again generations (the mean of gen1 .. student's
    class probabilities; ``eval.ensembles``). The tree's own assistants are kept;
    it must not already hold ``stages`` or a ``gen<g>`` assistant. Nothing else is validated here:
    pass the result to :func:`kdforge.config.validate_config`."""
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise KDForgeError(f"born-again networks: generations must be a whole number >= 1 (got {generations!r})")
    if tree.get("stages"):
        raise KDForgeError("born-again networks write the recipe's `stages` themselves; remove `stages` from the "
                           "config first")
    out = copy.deepcopy(tree)
    spec = _same_architecture(tree, student)
    assistants = dict(out.get("assistants") or {})
    roles = [generation_role(g) for g in range(1, generations)]
    clash = sorted(set(roles) & set(assistants))
    if clash:
        raise KDForgeError(f"born-again networks name their generations {', '.join(roles)}; the config already "
                           f"has assistants {', '.join(clash)}: rename them")
    objectives = out.get("objectives") or _default_objectives()
    out["student"] = spec
    out["assistants"] = {**assistants, **{role: copy.deepcopy(spec) for role in roles}}
    stages, previous = [], PRIMARY_TEACHER
    for learner in [*roles, STUDENT]:
        stages.append({"name": learner, "learner": learner, "teachers": [previous],
                       "objectives": copy.deepcopy(objectives)})
        previous = learner
    out["stages"] = stages
    if generations >= 2:  # BANE: the born-again generations' ensemble, scored beside them
        evaluation = out.setdefault("eval", {})
        evaluation["ensembles"] = {**(evaluation.get("ensembles") or {}), "BANE": [*roles, STUDENT]}
    return out
