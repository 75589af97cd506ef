"""Sharpness = the Hessian's top eigenvalue of the training loss (power iteration on Pearlmutter
Hessian-vector products), checked against exact Hessians."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdforge.config import EvalConfig, TaskConfig
from kdforge.errors import KDForgeError
from kdforge.evaluation.sharpness import hessian_top_eigenvalue, model_sharpness
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel, load_model
from kdforge.problems import LanguageModelling
from kdforge.tasks.base import build_task

pytestmark = pytest.mark.usefixtures("one_thread")



class Quadratic(nn.Module):
    """'logits' = theta repeated per row, so that a loss 0.5 theta^T A theta has Hessian A exactly."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


def rotated(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_a_quadratic_gives_the_top_eigenvalue_of_its_matrix():
    a = rotated([5.0, 2.0, 1.0])
    model = ModelAdapter(Quadratic(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)))
    loss = lambda out, batch: 0.5 * torch.einsum("ni,ij,nj->n", out.logits, a, out.logits).mean()  # noqa: E731
    batches = [{"inputs": torch.zeros(3, 1)}, {"inputs": torch.zeros(5, 1)}]
    result = hessian_top_eigenvalue(model, batches, loss, iterations=200, tol=1e-9)
    assert result["eigenvalue"] == pytest.approx(5.0, abs=1e-3)
    assert result["converged"] and result["samples"] == 8 and result["iterations"] < 200
    few = hessian_top_eigenvalue(model, batches, loss, iterations=2, tol=1e-12)
    assert few["iterations"] == 2 and not few["converged"] and few["eigenvalue"] < 5.0  # Rayleigh quotient <= max


def linear_ce_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    return [{"inputs": x[:7], "labels": y[:7]}, {"inputs": x[7:], "labels": y[7:]}], x, y


def test_a_linear_classifier_matches_the_exact_hessian_of_its_mean_cross_entropy():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    batches, x, y = linear_ce_data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def hessian(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        def mean_loss(f: torch.Tensor) -> torch.Tensor:
            chunks = torch.split(f, [s.numel() for s in shapes])
            params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
            return F.cross_entropy(torch.func.functional_call(model, params, (inputs,)), labels)
        return torch.autograd.functional.hessian(mean_loss, flat)

    exact = torch.linalg.eigvalsh(hessian(x, y)).max().item()  # all 12 rows: batches weighted 7/12 and 5/12
    result = hessian_top_eigenvalue(ModelAdapter(model), batches, lambda o, b: F.cross_entropy(o.logits, b["labels"]),
                                    iterations=2000, tol=1e-12)
    assert result["eigenvalue"] == pytest.approx(exact, rel=1e-6)
    equal = 0.5 * (hessian(x[:7], y[:7]) + hessian(x[7:], y[7:]))
    assert abs(torch.linalg.eigvalsh(equal).max().item() - exact) > 1e-4  # unweighted batches: another number


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def test_modes_grads_and_running_statistics_are_restored_and_the_result_is_deterministic():
    torch.manual_seed(0)
    model = Noisy().double()
    model.train()
    model.net[1].eval()  # a mixed state must come back as it was
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    model.net[0].bias.requires_grad_(False)
    stats = model.net[1].running_mean.clone()
    batches, _, _ = linear_ce_data(1)
    loss = lambda o, b: F.cross_entropy(o.logits, b["labels"])  # noqa: E731
    adapter = ModelAdapter(model)
    adapter.train()
    model.net[1].eval()
    first = hessian_top_eigenvalue(adapter, batches, loss, iterations=8, seed=3)
    assert first == hessian_top_eigenvalue(adapter, batches, loss, iterations=8, seed=3)  # no dropout: same number
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True, True]
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert torch.equal(model.net[1].running_mean, stats)  # eval mode: BatchNorm used, not updated, its statistics
    assert not model.net[0].bias.requires_grad
    other = hessian_top_eigenvalue(adapter, batches, loss, iterations=300, seed=4, tol=1e-10)
    converged = hessian_top_eigenvalue(adapter, batches, loss, iterations=300, seed=3, tol=1e-10)
    assert other["eigenvalue"] == pytest.approx(converged["eigenvalue"], rel=1e-5)  # any start finds lambda_max


def test_three_times_the_outputs_is_nine_times_as_sharp_for_least_squares():
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    g = torch.Generator().manual_seed(0)
    batches = [{"inputs": torch.randn(9, 5, generator=g, dtype=torch.float64),
                "labels": torch.randn(9, generator=g, dtype=torch.float64)}]
    mse = lambda o, b: F.mse_loss(o.logits.squeeze(-1), b["labels"])  # noqa: E731
    x = batches[0]["inputs"]
    exact = torch.linalg.eigvalsh(2 / 9 * torch.cat([x, torch.ones(9, 1, dtype=x.dtype)], 1).T
                                  @ torch.cat([x, torch.ones(9, 1, dtype=x.dtype)], 1)).max().item()  # 2/N X^T X
    plain = hessian_top_eigenvalue(ModelAdapter(model), batches, mse, iterations=500, tol=1e-12)
    scaled = hessian_top_eigenvalue(ModelAdapter(Scaled(model, 3.0)), batches, mse, iterations=500, tol=1e-12)
    assert plain["eigenvalue"] == pytest.approx(exact, rel=1e-6)
    assert scaled["eigenvalue"] == pytest.approx(9 * exact, rel=1e-6)


class Scaled(nn.Module):
    def __init__(self, model: nn.Module, factor: float):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.factor * self.model(x)


def test_model_sharpness_on_digits_sees_a_sharper_model():
    task = build_task(TaskConfig(name="digits"))
    torch.manual_seed(0)
    net = load_model("vision:small_cnn", task, "student.model")
    net.model.requires_grad_(False)  # a frozen teacher is measured over all its weights too
    config = EvalConfig(batch_size=32, sharpness_samples=48, sharpness_iterations=6)
    train = task.split("train")
    plain = model_sharpness(net, task, train, config)
    assert plain["samples"] == 48 and plain["iterations"] <= 6 and plain["eigenvalue"] > 0
    assert not any(p.requires_grad for p in net.model.parameters())
    assert model_sharpness(net, task, train, config) == plain  # the same fixed rows and start vector
    sharper = model_sharpness(LoadedModel(Scaled(net.model, 3.0)), task, train, config)
    assert sharper["eigenvalue"] > 3 * plain["eigenvalue"]
    few = model_sharpness(net, task, [train[i] for i in range(5)], config)
    assert few["samples"] == 5


def test_model_sharpness_refuses_language_modelling():
    task = SimpleNamespace(problem=LanguageModelling())
    with pytest.raises(KDForgeError, match="not supported for language modeling"):
        model_sharpness(LoadedModel(nn.Linear(2, 2)), task, [1], EvalConfig())


def test_model_sharpness_of_a_text_transformer(job_tree, tiny_teacher_dir):
    """A BERT through its sdpa attention (whose fused kernels have no double backward)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = build_task(TaskConfig.model_validate(job_tree["task"]))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    model.train()
    loaded = LoadedModel(model, AutoTokenizer.from_pretrained(tiny_teacher_dir))
    result = model_sharpness(loaded, task, task.split("train"),
                             EvalConfig(batch_size=4, sharpness_samples=8, sharpness_iterations=3))
    assert result["samples"] == 8 and result["iterations"] <= 3 and abs(result["eigenvalue"]) > 0
    assert model.training and model.config._attn_implementation == "sdpa"
