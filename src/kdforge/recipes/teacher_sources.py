"""Teacher sources: where a teacher role's outputs for a training batch come from.

* ``live``: the model runs on every batch (frozen: eval mode, no gradients).
* ``cache``: a frozen model's outputs computed once over the training split and stored on disk
  (:mod:`kdforge.recipes.teacher_cache`), looked up by each example's ``index``. The cache is exact only for a
  frozen teacher whose needed outputs it stores, on inputs without random augmentation; it is
  keyed by the temperature of the terms bound to that teacher (the top-k tail is fitted there).
* ``auto`` (default): the cache where it is exact, else live.

A previous stage's learner is simply a frozen model of its role. A black-box teacher (answers to
queries over HTTP, from a callable or a file) is a frozen model too: its role's model is a
:class:`kdforge.blackbox.teacher.BlackBoxModule`, run live (its answers are cached and budgeted in
its own SQLite cache, so the output cache adds nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.composite import WeightedLoss
from kdforge.recipes.base import StageContext
from kdforge.recipes.teacher_cache import CacheSpec, IndexedCollator, IndexedDataset, TeacherCache

log = logging.getLogger("kdforge")


class LiveTeacher(nn.Module):
    """A model run on every batch; gradients flow only when it trains (online KD)."""

    def __init__(self, adapter: ModelAdapter, trainable: bool = False):
        super().__init__()
        self.adapter = adapter
        self.trainable = trainable

    def forward(self, batch: dict) -> Outputs:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.adapter(batch)


class CachedTeacher(nn.Module):
    """A frozen teacher's stored outputs, looked up by ``batch["index"]``."""

    def __init__(self, cache: TeacherCache):
        super().__init__()
        self.cache = cache

    def forward(self, batch: dict) -> Outputs:
        return self.cache.lookup(batch)


def bound_temperature(loss: WeightedLoss, role: str) -> float:
    """The temperature at which the terms bound to ``role`` read it (``Objective.teacher_temperature``)
    when they share one fixed value (the top-k cache keeps the teacher's tail mass exact at it), else 1."""
    found = {o.teacher_temperature for o in loss.terms_of(role)}
    found.discard(None)
    return next(iter(found)) if len(found) == 1 else 1.0


def cache_applies(ctx: StageContext, loss: WeightedLoss, role: str, hook_paths: list[str]) -> str | None:
    """None when the cache is exact for ``role``, else why it is not."""
    needs = loss.requires(role)
    if ctx.train_teachers:
        return "the teachers train with the learner"
    if ctx.data.random_train_inputs:
        return "random augmentation"
    if hook_paths or "attentions" in needs:
        return "objectives read attention maps or hooked features"
    if "hidden_states" in needs and not ctx.config.teacher_cache.hidden_states:
        return "set teacher_cache.hidden_states to cache hidden states"
    return None


def cached_teacher(ctx: StageContext, role: str, temperature: float) -> CachedTeacher:
    """Load or build the cache of ``role``'s outputs on the stage's training split."""
    cc, teacher = ctx.config.teacher_cache, ctx.teachers[role]
    spec = CacheSpec(getattr(torch, cc.dtype), cc.top_k, tuple(cc.hidden_states), temperature)
    stage = ctx.stage
    fingerprint = ctx.data.fingerprint + (f"+augment:{stage.augment.model_dump_json()}" if stage.augment else "")
    with PartialState().main_process_first():
        cache = TeacherCache.load_or_build(teacher.model.to(ctx.device), ctx.train_data,
                                           ctx.data.collator(teacher.tokenizer), fingerprint, teacher.tokenizer,
                                           ctx.config.eval.batch_size, ctx.device, spec,
                                           Path(cc.folder) if cc.folder else None)
    return CachedTeacher(cache)


def teacher_sources(ctx: StageContext, loss: WeightedLoss, hook_paths: dict[str, list[str]],
                    roles: list[str] | None = None, temperatures: Mapping[str, float] | None = None
                    ) -> dict[str, nn.Module]:
    """A source for every teacher role the loss reads (or ``roles``), as the stage's
    ``teacher_source`` says; wraps the training data with example indices when a cache is used or a term
    reads them (``Objective.needs_index``).
    ``temperatures``: the temperature at which the strategy itself reads a role's logits (its cache is
    built for it); default: that of the terms bound to the role (:func:`bound_temperature`)."""
    wanted, sources, temperatures = ctx.stage.teacher_source, {}, temperatures or {}
    for role in roles if roles is not None else loss.teacher_roles:
        paths = hook_paths.get(role, [])
        why_not = cache_applies(ctx, loss, role, paths) if ctx.config.teacher_cache.enabled else "it is disabled"
        if wanted == "cache" and why_not:
            raise KDForgeError(f"stage {ctx.stage.name!r}: teacher_source: cache cannot serve {role!r} ({why_not}); "
                               "use teacher_source: live or auto")
        if wanted != "live" and why_not is None:
            sources[role] = cached_teacher(ctx, role, temperatures.get(role, bound_temperature(loss, role)))
            continue
        if wanted == "auto" and ctx.config.teacher_cache.enabled:
            log.info("teacher %s: outputs computed every step (the cache does not apply: %s)", role, why_not)
        needs = loss.requires(role)
        sources[role] = LiveTeacher(ctx.adapter(ctx.teachers[role], hook_paths=paths,
                                                hidden_states="hidden_states" in needs,
                                                attentions="attentions" in needs, teacher=True), ctx.train_teachers)
    if any(isinstance(s, CachedTeacher) for s in sources.values()) or any(o.needs_index for o in loss.objectives):
        index_examples(ctx)
    return sources


def index_examples(ctx: StageContext) -> None:
    """Give every training batch the ``index`` of its examples (cache look-ups, per-sample state)."""
    if not isinstance(ctx.train_data, IndexedDataset):
        ctx.train_data, ctx.collate = IndexedDataset(ctx.train_data), IndexedCollator(ctx.collate)
