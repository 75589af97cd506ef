"""Sharpness of a trained model: the largest eigenvalue of the Hessian of its training loss.

With theta the model's parameters and L(theta) = 1/N sum_i l(f(x_i; theta), y_i) the task loss
(cross-entropy for classification, MSE for regression) over a FIXED sample of N training rows,

    sharpness = lambda_max(H),   H = d^2 L / d theta^2,

estimated by power iteration on Hessian-vector products, never forming H:

    v_0 ~ N(0, I) (seeded), v_0 <- v_0 / ||v_0||
    w_k = H v_k,  lambda_k = v_k . w_k  (Rayleigh quotient),  v_{k+1} = w_k / ||w_k||

stopping when |lambda_k - lambda_{k-1}| < tol * |lambda_{k-1}| or after ``iterations`` steps.
H v is Pearlmutter's trick (B. A. Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural
Computation 1994): H v = d/d theta (g(theta) . v) with g = dL/d theta, i.e. a double backward
(``torch.autograd.grad(..., create_graph=True)``). Over several batches b of n_b rows (each loss
the batch mean), H v = sum_b (n_b / N) H_b v, the Hessian of the mean loss over all N rows.

Power iteration converges to the eigenvalue of largest *magnitude*; at a (near-)minimum of the
training loss the Hessian is (nearly) positive semi-definite, so that is lambda_max (far from one,
e.g. at initialisation, the dominant eigenvalue may be negative, and is reported as such). The model is
measured in eval mode (no dropout, BatchNorm on its running statistics), so the loss is a
deterministic function of theta, and its modes are restored afterwards; ``.grad`` is untouched.
Attention runs PyTorch's math SDPA kernel (the fused kernels have no double backward).

Why: flat minima (small lambda_max) are linked to generalisation (Keskar et al., "On Large-Batch
Training for Deep Learning: Generalization Gap and Sharp Minima", ICLR 2017). "Revisiting
Self-Distillation" (M. Pham, M. Cho, A. Joshi, C. Hegde, arXiv:2206.08491, 2022) explains why a
self-distilled student beats its same-architecture teacher through loss-landscape geometry: self-
distillation leads to flatter minima. The Hessian's top eigenvalue is the usual measure of that
flatness (also PyHessian's: Yao et al., "PyHessian: Neural Networks Through the Lens of the
Hessian", 2020), so a run report can compare teacher and student with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.problems import Problem

LossFn = Callable[[Outputs, dict], torch.Tensor]


@contextmanager
def measurement_mode(model: nn.Module, all_parameters: bool = False) -> Iterator[None]:
    """Every module of ``model`` in eval mode (and, with ``all_parameters``, every parameter
    requiring grad) for the duration; each module's mode and each parameter's flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    if all_parameters:
        model.requires_grad_(True)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


def batch_rows(batch: dict[str, Any]) -> int:
    """Rows in a batch: the length of its labels, else of its first tensor."""
    tensor = batch.get("labels")
    if not torch.is_tensor(tensor):
        tensor = next((v for v in batch.values() if torch.is_tensor(v)), None)
    if tensor is None or tensor.dim() == 0:
        raise KDForgeError(f"a sharpness batch holds no batched tensor (keys: {sorted(batch)})")
    return int(tensor.shape[0])


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _hvp(adapter: nn.Module, batches: list[dict], loss_fn: LossFn, params: list[nn.Parameter],
         v: list[torch.Tensor], weights: list[float]) -> list[torch.Tensor]:
    """H v of the weighted mean loss: sum_b w_b d/d theta (dL_b/d theta . v) (Pearlmutter)."""
    total = [torch.zeros_like(p) for p in params]
    for batch, weight in zip(batches, weights, strict=True):
        loss = loss_fn(adapter(batch), batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [(g, x) for g, x in zip(grads, v, strict=True) if g is not None]
        if not used or not any(g.requires_grad for g, _ in used):
            continue  # the loss is (at most) linear in theta on this batch: H_b = 0
        inner = _dot([g for g, _ in used], [x for _, x in used])
        hv = torch.autograd.grad(inner, params, allow_unused=True)
        for acc, h in zip(total, hv, strict=True):
            if h is not None:
                acc.add_(h.detach(), alpha=weight)
    return total


def hessian_top_eigenvalue(adapter: nn.Module, batches: list[dict], loss_fn: LossFn, iterations: int = 20,
                           seed: int = 0, tol: float = 1e-3) -> dict:
    """The largest eigenvalue of the Hessian of the mean ``loss_fn`` over ``batches`` w.r.t. the
    parameters of ``adapter`` that require grad, by power iteration (see the module docstring).

    ``adapter`` maps a batch to :class:`Outputs` (a :class:`kdforge.models.adapter.ModelAdapter`);
    ``loss_fn(outputs, batch)`` returns the batch's MEAN loss; batches are weighted by their rows.
    Returns ``{"eigenvalue", "iterations" (run), "converged" (relative change < tol), "samples"}``."""
    if not batches:
        raise KDForgeError("sharpness needs at least one batch of training rows (eval.sharpness_samples)")
    if iterations < 1:
        raise KDForgeError(f"sharpness iterations must be >= 1 (got {iterations}); fix eval.sharpness_iterations")
    params = [p for p in adapter.parameters() if p.requires_grad]
    if not params:
        raise KDForgeError("the model has no parameter that requires grad: its sharpness is undefined")
    rows = [batch_rows(b) for b in batches]
    samples = sum(rows)
    weights = [n / samples for n in rows]
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
         for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eigenvalue, previous, converged, done = 0.0, None, False, 0
    # the math kernel of scaled_dot_product_attention is made of differentiable ops; the fused (flash)
    # kernels have no double backward
    with measurement_mode(adapter), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for step in range(1, iterations + 1):
            done = step
            hv = _hvp(adapter, batches, loss_fn, params, v, weights)
            eigenvalue = float(_dot(hv, v))
            norm = float(torch.sqrt(_dot(hv, hv)))
            if norm == 0.0:  # H v = 0: a flat direction, and v stays an eigenvector (eigenvalue 0)
                converged = True
                break
            v = [h / norm for h in hv]
            if previous is not None and abs(eigenvalue - previous) < tol * abs(previous):
                converged = True
                break
            previous = eigenvalue
    return {"eigenvalue": eigenvalue, "iterations": done, "converged": converged, "samples": samples}


def task_loss_fn(problem: Problem) -> LossFn:
    """The training loss of a task as ``loss_fn(outputs, batch)``: its problem kind's loss (the batch
    mean: cross-entropy for classification, MSE of the single output for regression). Language models
    are refused."""
    if problem.causal_lm:
        raise KDForgeError(f"sharpness is not supported for {problem.name.replace('_', ' ')} tasks (only "
                           "classification and regression); set eval.sharpness: false")
    return lambda out, batch: problem.loss(out.logits, batch["labels"])


def sample_rows(train_data, samples: int, seed: int = 0) -> list[dict]:
    """The first ``samples`` rows of a seeded permutation of ``train_data`` (all rows when fewer)."""
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed))
    return [train_data[int(i)] for i in order[:samples]]


def model_sharpness(loaded, task, train_data, config) -> dict:
    """Sharpness of ``loaded`` (a :class:`kdforge.models.loading.LoadedModel`) on ``task``: the Hessian
    top eigenvalue of its task loss over ``config.sharpness_samples`` fixed training rows (the first of
    a permutation seeded 0 of ``train_data``), collated without augmentation in batches of
    ``config.batch_size``, with at most ``config.sharpness_iterations`` power-iteration steps, stopped once
    the estimate changes by less than ``config.sharpness_tol`` of itself (``config``: an
    :class:`kdforge.config.EvalConfig`). Measured w.r.t. ALL the model's parameters (a frozen teacher's
    too, so teacher and student compare); requires_grad flags and modes are restored."""
    from kdforge.models.adapter import ModelAdapter

    loss_fn = task_loss_fn(task.problem)  # refuses language modelling before any work
    if len(train_data) == 0:
        raise KDForgeError("sharpness: the training split is empty")
    rows = sample_rows(train_data, config.sharpness_samples)
    collate = task.collator(loaded.tokenizer, train=False)
    device = next(loaded.model.parameters()).device
    batches = []
    for start in range(0, len(rows), config.batch_size):
        batch = collate(rows[start:start + config.batch_size])
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    with measurement_mode(loaded.model, all_parameters=True):
        adapter = ModelAdapter(loaded.model)
        try:
            return hessian_top_eigenvalue(adapter, batches, loss_fn, iterations=config.sharpness_iterations,
                                          tol=config.sharpness_tol)
        finally:
            adapter.remove_hooks()
