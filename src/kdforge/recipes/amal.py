"""AMAL: Sivasubramanian, Maheshwari, Shenoy, Prathosh & Ramakrishnan, "Adaptive Mixing of Auxiliary
Losses in Supervised Learning" (AAAI 2023; arXiv 2202.03250).

``strategy: {name: amal}``: every training example i gets its own weight vector over the stage's
K loss terms (``objectives``: any kdforge terms, e.g. ``ce`` and ``hinton_kd``), learnt by a
bi-level criterion on held-out validation data (``task.validation``):

    min_w  L_val(theta*(w)),   theta*(w) = argmin_theta  1/N sum_i sum_k w_ik L_k(x_i; theta)

approximated, as in the paper, by meta-learning with a one-step look-ahead of the student.

The rule implemented here, per training batch B (|B| = n) whose examples carry their ``index``:

* **Weights**: ``w`` in R^{N x K} (N = training examples, K = terms), a registered buffer of the
  step (``amal_weights``): checkpointed with the step's state and restored on resume, but not a
  parameter, so the engine's optimizer (``param_groups``: parameters only) never touches it.
  No softmax or sigmoid, no normalisation over terms (rows need not sum to 1): each w_ik is a raw
  non-negative mixing weight, projected onto [0, ``max_weight``] after every update, as the
  authors' code does (clamp to [1e-7, 2 - 1e-7]). **Initialisation**: w_ik = the configured
  ``weight`` of term k for every example (the authors' default, KD 0.9 and CE 1 - 0.9, is
  ``objectives: [{name: ce, weight: 0.1}, {name: hinton_kd, weight: 0.9, temperature: 4}]``).
* **Per-example terms**: L_ik = objective k evaluated on example i alone (the batch's outputs,
  the teacher's outputs and the batch sliced to row i), an (n, K) matrix; for a term that is a
  batch mean (ce, mse, hinton_kd, ...) its batch value is the mean of the L_ik. Terms that relate
  the examples of a batch to each other (``relation``, ``contrastive_kd``) have no per-example
  value and are refused.
* **Meta step** (every ``meta_every`` optimizer steps from step ``meta_start``; ``meta_steps``
  times on the same batch), with theta the learner's trainable parameters:

      L_tr(theta; w)  = 1/n sum_{i in B} sum_k w_ik L_ik(theta)
      theta'(w)       = theta - alpha grad_theta L_tr(theta; w)          (create_graph: differentiable in w)
      g_ik            = d L_val(theta'(w)) / d w_ik                      (i in B)
      w_ik           <- clip(w_ik - meta_lr g_ik, 0, max_weight)         (plain SGD, no momentum: no state)

  theta' is applied with ``torch.func.functional_call``; L_val is the task loss (cross-entropy,
  or MSE for regression) of theta' on one batch of the validation split, collated without
  augmentation and run in eval mode (no dropout, no batch-norm statistics updated). alpha =
  ``virtual_lr`` (default: the stage's ``train.lr``). By the chain rule
  g_ik = -(alpha / n) grad L_val(theta') . grad L_ik(theta): a term is up-weighted on an example
  when its gradient there agrees with the validation gradient.
  Validation batches: the m-th meta step reads rows [b * (m mod c), b * (m mod c + 1)) of a
  permutation of the validation split drawn from seed ``train.seed + stage index + m div c``
  (c = batches per pass, b = ``val_batch_size``, default the stage's batch size); the count m is
  the buffer ``meta_updates``, so a resumed run reads the same batches.
* **Real step**: the engine back-propagates ``L = 1/n sum_i sum_k w_ik L_ik`` with the *updated*
  weights, detached (the same forward pass as the meta step). The teachers are frozen (cached or
  live, as ``offline``). Logged: each term's batch mean and ``amal_w:<term>``, its mean weight on
  the batch.

Paper facts (abstract, arXiv 2202.03250, read with the search tool) and the authors' code
(github.com/durgas16/AMAL: KD/train_distill.py, KD/LearnMultiLambdaMeta.py,
KD/config/cifar100/config_amal_cifar100.py; paraphrased, nothing copied):

===============================  ==========================================================================
paper / official code            here
===============================  ==========================================================================
bi-level criterion on validation same; ``task.validation`` must be set
data, instance-level mixing
weights over the training data
lambda: (N, 1 + #teachers),      (N, K) over the stage's terms, initialised to the configured weights
CE column 1 - lambda_KD, KD 0.9
raw weights, clamped to          raw weights, clamped to [0, max_weight]; max_weight 2 by default
[1e-7, 2 - 1e-7], no softmax
look-ahead restricted to the     every trainable parameter of the learner (exact second-order
last linear layer (closed form)  look-ahead through ``functional_call``)
eta = the SGD optimizer's        alpha = ``virtual_lr`` or the stage's configured ``train.lr`` (constant);
current lr                       kdforge's optimizer is AdamW, whose steps are not alpha * gradient
meta lr 1500, SGD, 5 iterations  ``meta_lr`` 150 / alpha (1500 at the paper's lr 0.1), SGD, ``meta_steps`` 1 by
                                 default (set 5 for the code's)
per group at fixed theta
a separate pass over the whole   online: at each batch, the weights of that batch's examples, every
training set every 10 epochs     ``meta_every`` optimizer steps from ``meta_start``
(from epoch 10), 3 batches per
group, model in eval mode
validation batch of 1000 rows    ``val_batch_size`` (default: the stage's batch size)
lambdas saved in checkpoints     the ``amal_weights`` buffer is in every checkpoint (exact resume)
===============================  ==========================================================================

The meta-gradient scales with alpha / n, so the paper's meta lr 1500 suits its SGD learning rate 0.1;
by default ``meta_lr`` = 150 / alpha keeps the paper's meta step meta_lr x alpha = 150 at any learning
rate (AdamW's 1e-4 gives 1.5e6; the batch size n is not rescaled). The weights' mean and standard
deviation over every training example, per term, are logged each step (``amal_w:<term>``,
``amal_w_sd:<term>``): the history and ``training.png`` show how they move, the last epoch their
spread at the end. Runs in one process: the
double back-propagation of the look-ahead is not supported under DDP, and the weights of the
examples seen by other processes would not be shared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn
from torch.func import functional_call

from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.composite import WeightedLoss
from kdforge.problems import Problem
from kdforge.progress import Progress
from kdforge.recipes.base import STRATEGIES, StageContext, Strategy
from kdforge.recipes.offline import OfflineStep, stage_parts
from kdforge.recipes.teacher_sources import index_examples

log = logging.getLogger("kdforge")

#: terms whose value relates the examples of a batch to each other: no per-example value
BATCH_LEVEL_OBJECTIVES = frozenset({"relation", "contrastive_kd"})


class AMALParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    meta_lr: PositiveFloat | None = Field(None, description="the meta step's learning rate; default 150 / alpha "
                                          "(the paper's 1500 at its SGD lr 0.1), alpha the look-ahead's lr")
    virtual_lr: PositiveFloat | None = None
    meta_every: PositiveInt = 1
    meta_start: NonNegativeInt = 0
    meta_steps: PositiveInt = 1
    max_weight: PositiveFloat = 2.0
    val_batch_size: PositiveInt | None = None


# ----------------------------------------------------------------------------- per-example terms


def _row(value: Any, i: int, n: int) -> Any:
    """Row i (kept as a batch of one) of a tensor or list whose first dimension is the batch."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        return value[i:i + 1]
    if isinstance(value, list | tuple) and len(value) == n:
        return value[i:i + 1]
    return value


def example_outputs(outputs: Outputs, i: int, n: int) -> Outputs:
    """``outputs`` restricted to example i of a batch of n."""
    return Outputs(logits=_row(outputs.logits, i, n),
                   hidden_states=None if outputs.hidden_states is None else
                   tuple(_row(h, i, n) for h in outputs.hidden_states),
                   attentions=None if outputs.attentions is None else tuple(_row(a, i, n) for a in outputs.attentions),
                   features={k: _row(v, i, n) for k, v in outputs.features.items()})


def per_example_terms(loss: WeightedLoss, student: Outputs, teachers: Mapping[str, Outputs], batch: dict[str, Any],
                      progress: Progress) -> torch.Tensor:
    """L_ik: term k of ``loss`` on example i alone, an (n, K) tensor (gradients flow to the student)."""
    n = student.logits.shape[0]
    rows = []
    for i in range(n):
        s_i = example_outputs(student, i, n)
        t_i = {role: example_outputs(out, i, n) for role, out in teachers.items()}
        b_i = {k: _row(v, i, n) for k, v in batch.items()}
        rows.append(torch.stack([objective(s_i, t_i[role] if role is not None else None, b_i, progress).reshape(())
                                 for objective, role in zip(loss.objectives, loss.roles, strict=True)]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- the meta step


def meta_gradient(terms: torch.Tensor, weights: torch.Tensor, params: Mapping[str, torch.Tensor],
                  val_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], virtual_lr: float) -> torch.Tensor:
    """d L_val(theta - alpha grad_theta L_tr(theta; w)) / d w with L_tr = 1/n sum_i sum_k w_ik L_ik(theta).

    ``terms``: (n, K) L_ik(theta), with their graph to ``params`` (theta, by name); ``weights``:
    (n, K) w (its value only); ``val_loss(theta')`` the validation loss of the model with the
    parameters ``theta'`` (e.g. through ``functional_call``); ``virtual_lr``: alpha. The graph of
    ``terms`` is kept for the real step."""
    if terms.shape != weights.shape:
        raise KDForgeError(f"AMAL needs one weight per example and term: weights {tuple(weights.shape)}, "
                           f"terms {tuple(terms.shape)}")
    w = weights.detach().to(terms.dtype).requires_grad_(True)
    names = list(params)
    train = (w * terms).sum(-1).mean()
    grads = torch.autograd.grad(train, [params[k] for k in names], create_graph=True, allow_unused=True)
    virtual = {k: params[k] if g is None else params[k] - virtual_lr * g for k, g in zip(names, grads, strict=True)}
    (grad_w,) = torch.autograd.grad(val_loss(virtual), w, retain_graph=True, allow_unused=True)
    return torch.zeros_like(w) if grad_w is None else grad_w.detach()


PAPER_META_STEP = 1500 * 0.1  # the paper's meta_lr x alpha (meta lr 1500, SGD lr 0.1)


def effective_meta_lr(params: AMALParams, virtual_lr: float) -> float:
    """``meta_lr`` as configured, else the paper's meta step at learning rate ``virtual_lr``: 150 / alpha."""
    return params.meta_lr if params.meta_lr is not None else PAPER_META_STEP / virtual_lr


def meta_update(weights: torch.Tensor, grad: torch.Tensor, meta_lr: float, max_weight: float) -> torch.Tensor:
    """w <- clip(w - meta_lr * g, 0, max_weight): one projected SGD step (no normalisation over terms)."""
    return (weights - meta_lr * grad.to(weights.dtype)).clamp(0.0, max_weight)


def task_loss(problem: Problem) -> Callable[[Outputs, dict[str, Any]], torch.Tensor]:
    """The validation loss of the meta step: the task loss of the problem kind, batch mean."""
    if problem.causal_lm:
        raise KDForgeError(f"strategy amal needs a classification or regression task (its meta step scores the "
                           f"student on labelled validation rows), not {problem.name.replace('_', ' ')}; use strategy "
                           "offline")
    return lambda out, batch: problem.loss(out.logits, batch["labels"])


class ValidationBatches:
    """Batch m of the validation split for the m-th meta step: a fixed function of (seed, m)."""

    def __init__(self, data: Sequence, collate: Callable, batch_size: int, seed: int):
        if len(data) == 0:
            raise KDForgeError("strategy amal: the validation split is empty; give `task.validation` a larger "
                               "fraction or more rows")
        self.data, self.collate, self.seed = data, collate, seed
        self.batch_size = min(batch_size, len(data))
        self.per_pass = math.ceil(len(data) / self.batch_size)

    def rows(self, m: int) -> list[int]:
        cycle, position = divmod(int(m), self.per_pass)
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + cycle))
        return order[position * self.batch_size:(position + 1) * self.batch_size].tolist()

    def batch(self, m: int, device) -> dict[str, Any]:
        batch = self.collate([self.data[i] for i in self.rows(m)])
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- the step


class AMALStep(OfflineStep):
    """``loss``'s terms mixed per example by the learnt ``amal_weights`` (see the module docstring)."""

    def __init__(self, learner: ModelAdapter, loss: WeightedLoss, teachers: Mapping[str, nn.Module],
                 initial: Sequence[float], n_examples: int, validation: ValidationBatches,
                 val_loss: Callable[[Outputs, dict[str, Any]], torch.Tensor], params: AMALParams,
                 virtual_lr: float):
        super().__init__(learner, loss, teachers)
        if len(initial) != len(loss.objectives) or not initial:
            raise KDForgeError(f"strategy amal needs one initial weight per term: {len(initial)} for "
                               f"{len(loss.objectives)} terms")
        start = torch.as_tensor([float(v) for v in initial], dtype=torch.float32)
        self.register_buffer("amal_weights", start.repeat(n_examples, 1))
        self.register_buffer("meta_updates", torch.zeros((), dtype=torch.long))
        self.validation, self.val_loss, self.params, self.virtual_lr = validation, val_loss, params, virtual_lr
        self.meta_lr = effective_meta_lr(params, virtual_lr)

    def meta_due(self, progress: Progress) -> bool:
        p = self.params
        return progress.step >= p.meta_start and (progress.step - p.meta_start) % p.meta_every == 0

    def validation_loss(self, val_batch: dict[str, Any]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        def loss(virtual: dict[str, torch.Tensor]) -> torch.Tensor:
            was_training = self.learner.training
            self.learner.eval()
            try:
                return self.val_loss(functional_call(self.learner, virtual, (val_batch,)), val_batch)
            finally:
                self.learner.train(was_training)

        return loss

    def meta_step(self, terms: torch.Tensor, index: torch.Tensor) -> None:
        """Update the weights of the batch's examples (``index``) from the look-ahead's validation loss."""
        params = {k: p for k, p in self.learner.named_parameters() if p.requires_grad}
        val_batch = self.validation.batch(int(self.meta_updates), self.amal_weights.device)
        loss = self.validation_loss(val_batch)
        weights = self.amal_weights[index]
        for _ in range(self.params.meta_steps):
            grad = meta_gradient(terms, weights, params, loss, self.virtual_lr)
            weights = meta_update(weights, grad, self.meta_lr, self.params.max_weight)
        self.amal_weights[index] = weights.to(self.amal_weights.dtype)
        self.meta_updates += 1

    def forward(self, batch: dict[str, Any], progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        if "index" not in batch:
            raise KDForgeError("strategy amal needs each training example's `index` in its batch "
                               "(recipes.teacher_sources.index_examples)")
        student = self.learner(batch)
        terms = per_example_terms(self.loss, student, self.teacher_outputs(batch), batch, progress)
        index = batch["index"].to(self.amal_weights.device).long()
        if self.training and torch.is_grad_enabled() and self.meta_due(progress):
            self.meta_step(terms, index)
        weights = self.amal_weights[index].detach().to(terms.dtype)
        total = (weights * terms).sum(-1).mean()
        logged = {name: float(terms[:, k].detach().mean()) for k, name in enumerate(self.loss.names)}
        logged.update({f"amal_w:{name}": float(weights[:, k].mean()) for k, name in enumerate(self.loss.names)})
        logged.update({f"amal_w_sd:{name}": float(self.amal_weights[:, k].std()) for k, name in
                       enumerate(self.loss.names)})
        return total, logged


# ----------------------------------------------------------------------------- the strategy


def initial_weights(stage) -> list[float]:
    return [float(o.weight) for o in stage.objectives]


@STRATEGIES.register("amal")
class AMAL(Strategy):
    """``strategy: {name: amal, meta_lr: ..., meta_every: ...}``: per-example mixing weights of the
    stage's objectives, learnt on ``task.validation`` (see the module docstring)."""

    Params = AMALParams
    needs = frozenset({"labels"})  # its meta step scores the student on validation labels

    def check(self, config, stage) -> None:
        where = f"stage {stage.name!r}: strategy amal"
        if not stage.objectives:
            raise KDForgeError(f"{where} mixes the stage's loss terms; list at least one under `objectives` "
                               "(e.g. ce and hinton_kd)")
        if config.task.validation is None:
            raise KDForgeError(f"{where} learns its weights on a validation split; set `task.validation` (a fraction "
                               "of the training rows such as 0.1, or a file)")
        for i, objective in enumerate(stage.objectives):
            if objective.name in BATCH_LEVEL_OBJECTIVES:
                raise KDForgeError(f"{where} weights each example's terms, but objective {objective.name!r} "
                                   f"(objectives.{i}) relates the examples of a batch and has no per-example value; "
                                   "remove it or use strategy offline")
            weight = objective.weight
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise KDForgeError(f"{where} learns each term's weight per example from its initial value; give "
                                   f"`objectives.{i}.weight` a number, not a schedule")
            if not 0 <= weight <= self.params.max_weight:
                raise KDForgeError(f"{where}: `objectives.{i}.weight` {weight:g} is its initial weight, which must "
                                   f"lie in [0, max_weight = {self.params.max_weight:g}] (strategy.max_weight)")

    def build(self, ctx: StageContext) -> AMALStep:
        from accelerate import PartialState

        if PartialState().num_processes > 1:
            raise KDForgeError("strategy amal runs in one process (its look-ahead needs double back-propagation, "
                               "which DDP does not support); launch without accelerate launch / torchrun")
        val_loss = task_loss(ctx.job_task.problem)
        parts = stage_parts(ctx)
        index_examples(ctx)
        train = ctx.config.stage_train(ctx.stage)
        p = self.params
        validation = ValidationBatches(ctx.data.selection, ctx.data.collator(ctx.learner.tokenizer, train=False),
                                       p.val_batch_size or train.batch_size, train.seed + ctx.index)
        alpha = p.virtual_lr if p.virtual_lr is not None else train.lr
        log.info("stage %s: amal meta lr %g (look-ahead lr %g)", ctx.stage.name, effective_meta_lr(p, alpha), alpha)
        return AMALStep(parts.learner, parts.loss, parts.teachers, initial_weights(ctx.stage),
                        len(ctx.train_data), validation, val_loss, p, alpha)
