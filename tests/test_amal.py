"""AMAL (Sivasubramanian et al., AAAI 2023): per-example mixing weights of the stage's terms, learnt by a
one-step look-ahead on the validation split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdforge import jobs
from kdforge.config import ObjectiveConfig, validate_config
from kdforge.engine.trainer import param_groups
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.composite import WeightedLoss
from kdforge.problems import Classification
from kdforge.progress import Progress
from kdforge.recipes.amal import (
    AMALParams,
    AMALStep,
    ValidationBatches,
    effective_meta_lr,
    meta_gradient,
    meta_update,
    per_example_terms,
    task_loss,
)
from kdforge.recipes.catalog import check_stages
from kdforge.recipes.teacher_sources import LiveTeacher

T = 2.0
OBJECTIVES = [ObjectiveConfig(name="ce", weight=0.5), ObjectiveConfig(name="hinton_kd", weight=0.5, temperature=T)]


def kd_rows(student_logits, teacher_logits, temperature=T):
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)) per row, written out."""
    p_t = F.softmax(teacher_logits / temperature, -1)
    return temperature**2 * (p_t * (p_t.log() - F.log_softmax(student_logits / temperature, -1))).sum(-1)


def linear_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 4).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    x, y = torch.randn(6, 3, generator=g, dtype=dtype), torch.randint(0, 4, (6,), generator=g)
    z_t = torch.randn(6, 4, generator=g, dtype=dtype) * 2
    xv, yv = torch.randn(5, 3, generator=g, dtype=dtype), torch.randint(0, 4, (5,), generator=g)
    return model, x, y, z_t, xv, yv


def test_per_example_terms_are_each_terms_value_on_one_example():
    model, x, y, z_t, _, _ = linear_problem()
    loss = WeightedLoss.from_config(OBJECTIVES, ["teacher"])
    batch = {"inputs": x, "labels": y}
    z = model(x)
    terms = per_example_terms(loss, Outputs(logits=z), {"teacher": Outputs(logits=z_t)}, batch, Progress())
    assert terms.shape == (6, 2)
    torch.testing.assert_close(terms[:, 0], F.cross_entropy(z, y, reduction="none"))
    torch.testing.assert_close(terms[:, 1], kd_rows(z, z_t))
    _, logged = loss(Outputs(logits=z), {"teacher": Outputs(logits=z_t)}, batch, Progress())
    assert terms.mean(0).tolist() == pytest.approx([logged["ce"], logged["hinton_kd"]], rel=1e-12)


def test_meta_gradient_equals_central_finite_differences_of_the_look_ahead_validation_loss():
    model, x, y, z_t, xv, yv = linear_problem()
    alpha = 0.7
    weights = torch.tensor([[0.2, 1.3], [0.9, 0.4], [1.1, 1.1], [0.3, 0.7], [1.6, 0.1], [0.5, 0.8]],
                           dtype=torch.float64)

    def look_ahead_val(w: torch.Tensor) -> float:  # L_val(theta - alpha grad L_tr(theta; w)), written out
        z = model(x)
        train = (w[:, 0] * F.cross_entropy(z, y, reduction="none") + w[:, 1] * kd_rows(z, z_t)).mean()
        g_w, g_b = torch.autograd.grad(train, [model.weight, model.bias])
        w_new, b_new = model.weight - alpha * g_w, model.bias - alpha * g_b
        return float(F.cross_entropy(xv @ w_new.T + b_new, yv).detach())

    eps = 1e-6
    numeric = torch.zeros_like(weights)
    for i in range(6):
        for k in range(2):
            up, down = weights.clone(), weights.clone()
            up[i, k] += eps
            down[i, k] -= eps
            numeric[i, k] = (look_ahead_val(up) - look_ahead_val(down)) / (2 * eps)

    loss = WeightedLoss.from_config(OBJECTIVES, ["teacher"])
    terms = per_example_terms(loss, Outputs(logits=model(x)), {"teacher": Outputs(logits=z_t)},
                              {"inputs": x, "labels": y}, Progress())
    params = dict(model.named_parameters())
    analytic = meta_gradient(terms, weights, params,
                             lambda p: F.cross_entropy(functional_call(model, p, (xv,)), yv), alpha)
    assert analytic.abs().max() > 1e-3  # a real signal, not a vacuous zero
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)
    # the chain rule's closed form: g_ik = -(alpha / n) grad L_val(theta') . grad L_ik(theta)
    z = model(x)
    row = torch.autograd.grad(F.cross_entropy(z[2:3], y[2:3]), [model.weight, model.bias], retain_graph=True)
    train = (weights[:, 0] * F.cross_entropy(z, y, reduction="none") + weights[:, 1] * kd_rows(z, z_t)).mean()
    g = torch.autograd.grad(train, [model.weight, model.bias])
    virtual = {"weight": model.weight - alpha * g[0], "bias": model.bias - alpha * g[1]}
    val = torch.autograd.grad(F.cross_entropy(functional_call(model, virtual, (xv,)), yv),
                              [virtual["weight"], virtual["bias"]])
    closed = -(alpha / 6) * sum((a * b).sum() for a, b in zip(val, row, strict=True))
    assert float(analytic[2, 0]) == pytest.approx(float(closed), rel=1e-9)
    terms.sum().backward()  # the graph of the terms is kept for the engine's real step
    assert model.weight.grad is not None


def test_weights_are_projected_onto_zero_to_max_weight_and_not_normalised():
    w = torch.tensor([[0.5, 1.9], [0.1, 1.0]])
    g = torch.tensor([[-1.0, -1.0], [1.0, 0.5]])
    new = meta_update(w, g, 0.2, 2.0)
    torch.testing.assert_close(new, torch.tensor([[0.7, 2.0], [0.0, 0.9]]))  # 2.1 -> 2, -0.1 -> 0
    assert new.sum(1).tolist() == pytest.approx([2.7, 0.9])  # rows are not renormalised


# ----------------------------------------------------------------------------------- the step

N_TRAIN, D, C = 12, 3, 4


def make_step(**params) -> tuple[AMALStep, list[dict]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    student, teacher = nn.Linear(D, C), nn.Linear(D, C)
    loss = WeightedLoss.from_config(OBJECTIVES, ["teacher"])
    val_rows = [{"inputs": torch.randn(D, generator=g), "labels": int(i % C)} for i in range(10)]

    def collate(rows):
        return {"inputs": torch.stack([r["inputs"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}

    validation = ValidationBatches(val_rows, collate, 4, seed=0)
    step = AMALStep(ModelAdapter(student), loss, {"teacher": LiveTeacher(ModelAdapter(teacher, teacher=True))},
                    [0.5, 0.5], N_TRAIN, validation, task_loss(Classification()), AMALParams(meta_lr=1.0, **params),
                    virtual_lr=0.5)
    x = torch.randn(N_TRAIN, D, generator=g)
    batches = [{"inputs": x[i:i + 4], "labels": torch.arange(i, i + 4) % C, "index": torch.arange(i, i + 4)}
               for i in range(0, N_TRAIN, 4)]
    return step.train(), batches


@pytest.mark.parametrize("params, due", [({"meta_every": 3}, [0, 3]), ({"meta_every": 2, "meta_start": 1}, [1, 3, 5])])
def test_weights_move_only_on_meta_steps_and_only_for_the_batch(params, due):
    step, batches = make_step(**params)
    changed = []
    for s in range(6):
        batch = batches[s % 3]
        before = step.amal_weights.clone()
        loss, logged = step(batch, Progress(step=s, total_steps=6))
        moved = (step.amal_weights != before).any(1)
        if s in due:
            assert moved[batch["index"]].all()
        others = torch.ones(N_TRAIN, dtype=torch.bool)
        others[batch["index"]] = False
        assert not moved[others].any()  # only the examples of the batch
        changed.append(bool(moved.any()))
        # the engine's loss: the batch's terms mixed by the updated, detached weights
        w = step.amal_weights[batch["index"]]
        student, teacher = step.learner(batch), step.sources["teacher"](batch)
        ce = F.cross_entropy(student.logits, batch["labels"], reduction="none")
        expected = (w[:, 0] * ce + w[:, 1] * kd_rows(student.logits, teacher.logits)).mean()
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        assert logged["amal_w:ce"] == pytest.approx(float(w[:, 0].mean()), rel=1e-6)
        assert logged["amal_w_sd:ce"] == pytest.approx(float(step.amal_weights[:, 0].std()), rel=1e-6)
        loss.backward()
        assert step.learner.model.weight.grad is not None and not step.amal_weights.requires_grad
        assert step.learner.training  # the look-ahead's eval mode is undone
    assert [s for s, c in enumerate(changed) if c] == due
    assert int(step.meta_updates) == len(due)


def test_weights_are_checkpointed_and_restored_but_not_optimised():
    step, batches = make_step()
    for s in range(3):
        step(batches[s], Progress(step=s, total_steps=3))
    assert not torch.equal(step.amal_weights, torch.full((N_TRAIN, 2), 0.5))
    state = step.checkpoint_state()
    assert {"amal_weights", "meta_updates"} <= set(state)
    fresh, _ = make_step()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("frozen.") for k in missing)
    assert torch.equal(fresh.amal_weights, step.amal_weights) and int(fresh.meta_updates) == 3
    optimised = [p for group in param_groups(step, 0.01) for p in group["params"]]
    assert all(p is not step.amal_weights for p in optimised)
    assert "amal_weights" not in dict(step.named_parameters())
    assert {id(p) for p in optimised} == {id(p) for p in step.learner.parameters()}


def test_validation_batches_are_a_fixed_function_of_the_meta_step_count():
    rows = list(range(10))
    a, b = ValidationBatches(rows, list, 4, seed=3), ValidationBatches(rows, list, 4, seed=3)
    assert [a.rows(m) for m in range(7)] == [b.rows(m) for m in range(7)]
    one_pass = a.rows(0) + a.rows(1) + a.rows(2)
    assert sorted(one_pass) == rows  # every validation row once per pass (3 batches of <= 4)
    assert a.rows(3) != a.rows(0) or a.rows(4) != a.rows(1)  # the next pass is reshuffled


# ----------------------------------------------------------------------------------- config checks


def amal_tree(job_tree: dict, objectives=None, validation: float | None = 0.2, **strategy) -> dict:
    tree = {**job_tree, "task": {**job_tree["task"]}}
    if validation is not None:
        tree["task"]["validation"] = validation
    tree["stages"] = [{"name": "distill", "objectives": job_tree["objectives"] if objectives is None else objectives,
                       "strategy": {"name": "amal", **strategy}}]
    return tree


@pytest.mark.parametrize("change, message", [
    ({"validation": None}, "task.validation"),
    ({"objectives": []}, "at least one under `objectives`"),
    ({"objectives": [{"name": "ce", "weight": {"schedule": "linear", "start": 1.0, "end": 0.0}}]}, "not a schedule"),
    ({"objectives": [{"name": "ce", "weight": 3.0}]}, "max_weight"),
    ({"objectives": [{"name": "ce"}, {"name": "relation"}]}, "no per-example value"),
    ({"meta_lr": -1}, "meta_lr"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_amal_configs_are_one_line_errors_before_training(job_tree, change, message):
    with pytest.raises(KDForgeError, match=message) as err:
        check_stages(validate_config(amal_tree(job_tree, **change)))
    assert "\n" not in str(err.value).strip()


# ----------------------------------------------------------------------------------- end to end


def run_and_watch(tree: dict) -> tuple[jobs.RunResult, dict]:
    seen: dict = {}

    def watch(trainer):
        seen.update(weights=trainer.unwrapped.amal_weights.detach().clone(),
                    updates=int(trainer.unwrapped.meta_updates), step=trainer.state.step)

    return jobs.run_distill(validate_config(tree), callbacks=[watch]), seen


def test_text_job_learns_per_example_weights(job_tree):
    tree = amal_tree(job_tree, meta_lr=2000.0)
    tree["task"]["train_limit"] = 160
    tree["teacher"]["finetune"]["epochs"] = 1
    tree["train"] = {**tree["train"], "epochs": 1}
    result, seen = run_and_watch(tree)
    w = seen["weights"]
    assert w.shape == (128, 2)  # 160 rows - ceil(0.2 * 160) validation rows, one weight per term
    assert seen["updates"] == seen["step"] > 0  # a meta step on every batch (meta_every 1)
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 2).all()
    assert ((w - 0.5).abs() > 1e-4).any(1).float().mean() > 0.9  # nearly every example moved off its start
    assert (w - 0.5).abs().max() > 1e-2
    assert "accuracy" in result.student.metrics


def test_vision_job_learns_per_example_weights(tmp_path):
    tree = {"task": {"name": "digits", "validation": 0.2, "train_limit": 300},
            "teacher": {"model": "vision:small_cnn", "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 32}},
            "student": {"model": "vision:small_cnn"},
            "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "seed": 0, "device": "cpu"},
            "eval": {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0},
            "teacher_cache": {"folder": str(tmp_path / "cache")},
            "stages": [{"name": "distill", "objectives": [{"name": "ce", "weight": 0.1},
                                                          {"name": "hinton_kd", "weight": 0.9, "temperature": 4.0}],
                        "strategy": {"name": "amal", "meta_lr": 2000.0, "meta_every": 2}}],
            "output_dir": str(tmp_path / "run")}
    result, seen = run_and_watch(tree)
    w, start = seen["weights"], torch.tensor([0.1, 0.9])
    assert w.shape == (240, 2)  # 300 rows - 60 validation rows
    assert seen["updates"] == (seen["step"] + 1) // 2  # steps 0, 2, 4, ...
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 2).all()
    moved = ((w - start).abs() > 1e-4).any(1)
    assert moved.float().mean() > 0.3 and moved.sum() <= 32 * seen["updates"]  # only the examples of meta steps
    assert (w - start).abs().max() > 1e-2
    assert "accuracy" in result.student.metrics


def test_the_default_meta_lr_keeps_the_papers_meta_step_at_any_learning_rate():
    """The paper: meta lr 1500 with SGD at lr 0.1; the meta-gradient scales with alpha, so the default
    meta_lr = 150 / alpha gives the same meta step meta_lr x alpha = 150."""
    assert effective_meta_lr(AMALParams(), 0.1) == pytest.approx(1500.0)
    assert effective_meta_lr(AMALParams(), 0.05) == pytest.approx(3000.0)
    assert effective_meta_lr(AMALParams(), 1e-4) == pytest.approx(1.5e6)
    assert effective_meta_lr(AMALParams(meta_lr=7.0), 1e-4) == 7.0  # as configured
