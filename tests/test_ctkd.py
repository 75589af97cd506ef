"""CTKD (curriculum temperature): temperature range, curriculum, gradient reversal, composition.

Expected numbers are derived by hand from the formulas (plain ``math``), never from the code under test.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress, build_objective
from kdforge.objectives.composite import WeightedLoss
from kdforge.objectives.ctkd import CTKD, gradient_reversal, grl_lambda
from tests.helpers import offline_step


def ctkd(**params) -> CTKD:
    return build_objective(ObjectiveConfig(name="ctkd", **params))


def softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def kd_value(s, t, T):
    """T^2 KL(softmax(t/T) || softmax(s/T)) for one sample."""
    return T**2 * kl(softmax([v / T for v in t]), softmax([v / T for v in s]))


def kd_dvalue_dT(s, t, T):
    """d/dT of T^2 KL(p_t || p_s) with p = softmax(z u), u = 1/T, derived by hand:
    d log p_k / du = z_k - E_p[z], so dKL/du = Cov_pt(z_t, log p_t - log p_s) - (E_pt[z_s] - E_ps[z_s]),
    and d/dT [T^2 KL] = 2 T KL + T^2 * dKL/du * (-1/T^2) = 2 T KL - dKL/du."""
    p_t, p_s = softmax([v / T for v in t]), softmax([v / T for v in s])
    e_t = sum(p * z for p, z in zip(p_t, t, strict=True))
    log_ratio = [math.log(a / b) for a, b in zip(p_t, p_s, strict=True)]
    cov = sum(p * (z - e_t) * r for p, z, r in zip(p_t, t, log_ratio, strict=True))
    shift = sum(p * z for p, z in zip(p_t, s, strict=True)) - sum(p * z for p, z in zip(p_s, s, strict=True))
    return 2 * T * kl(p_t, p_s) - (cov - shift)


T_INIT = 1 + 20 * sigmoid(1.0)  # = 1 + 20 * 0.7310586 = 15.6211716
S = [[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]]
T_LOGITS = [[1.0, 0.0, -1.0], [2.0, 0.1, 0.0]]
LABELS = torch.tensor([2, 0])


def at_epoch(e: int) -> Progress:
    """A progress whose 1-based epoch_number is ``e`` (halfway through that epoch)."""
    return Progress(step=0, total_steps=100, epoch=e - 1 + 0.5)


# ------------------------------------------------------------------------------------------ temperature


def test_temperature_at_init_is_one_plus_twenty_sigmoid_one():
    assert T_INIT == pytest.approx(15.6211716, abs=1e-6)
    objective = ctkd()
    assert objective.current_temperature == pytest.approx(T_INIT, rel=1e-6)
    assert objective.theta.item() == 1.0
    T = objective.temperature(torch.tensor(S), torch.tensor(T_LOGITS), -0.5)
    assert T.shape == () and T.item() == pytest.approx(T_INIT, rel=1e-6)


def test_global_loss_is_base_kd_at_the_learned_temperature_by_hand():
    objective = ctkd()
    value = objective(Outputs(torch.tensor(S)), Outputs(torch.tensor(T_LOGITS)), {"labels": LABELS}, at_epoch(1))
    expected = sum(kd_value(s, t, T_INIT) for s, t in zip(S, T_LOGITS, strict=True)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_temperature_range_and_init_are_configurable():
    objective = ctkd(temperature_min=2.0, temperature_range=5.0, theta_init=0.0)
    assert objective.current_temperature == pytest.approx(2.0 + 5.0 * 0.5)
    with torch.no_grad():
        objective.theta.fill_(50.0)
    assert objective.current_temperature == pytest.approx(7.0)  # the sup of the range
    with torch.no_grad():
        objective.theta.fill_(-50.0)
    assert objective.current_temperature == pytest.approx(2.0)  # the inf of the range


# ---------------------------------------------------------------------------------------- curriculum


@pytest.mark.parametrize("epoch, expected", [
    (1, -(1 - math.cos(math.pi / 10)) / 2),  # -(1 - 0.9510565) / 2 = -0.0244717
    (5, -0.5),  # L/2: cos(pi/2) = 0
    (10, -1.0),  # L: cos(pi) = -1
    (13, -1.0),  # after L: held at -lambda_max
])
def test_lambda_schedule_by_hand(epoch, expected):
    objective = ctkd(lambda_epochs=10)
    assert objective.lambda_at(at_epoch(epoch)) == pytest.approx(expected, abs=1e-12)
    assert grl_lambda(epoch, 10) == pytest.approx(expected, abs=1e-12)
    assert grl_lambda(1, 10) == pytest.approx(-0.0244717, abs=1e-7)


def test_lambda_schedule_uses_the_one_based_epoch_and_min_max():
    # Progress.epoch 0.0 .. 0.99 is epoch_number 1; lambda_epochs 5 (ImageNet): at e = 2, cos(2 pi / 5) = 0.3090170
    objective = ctkd(lambda_epochs=5)
    assert objective.lambda_at(Progress(epoch=0.0)) == pytest.approx(-(1 - math.cos(math.pi / 5)) / 2)
    assert objective.lambda_at(Progress(epoch=1.99)) == pytest.approx(-(1 - 0.3090170) / 2, abs=1e-7)
    scaled = ctkd(lambda_epochs=10, lambda_min=0.2, lambda_max=0.6)
    assert scaled.lambda_at(at_epoch(5)) == pytest.approx(-(0.2 + 0.4 * 0.5))  # -0.4
    assert scaled.lambda_at(at_epoch(30)) == pytest.approx(-0.6)


# ----------------------------------------------------------------------------------- gradient reversal


def test_gradient_reversal_layer_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = gradient_reversal(x, -0.3)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.6, -1.5]))
    z = torch.randn(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: gradient_reversal(v, 1.0).sin(), (z,))


def _grads(objective, progress=None, lam=None, dtype=torch.float32):
    """(d loss / d theta, d loss / d student logits) with the schedule's GRL (progress) or a given lam."""
    objective.zero_grad()
    s = torch.tensor(S, dtype=dtype, requires_grad=True)
    t = torch.tensor(T_LOGITS, dtype=dtype, requires_grad=True)
    if progress is not None:
        loss = objective(Outputs(s), Outputs(t), {"labels": LABELS}, progress)
    else:
        loss = objective.base.logit_loss(s, t, LABELS, objective.temperature(s, t, lam), Progress())
    loss.backward()
    assert t.grad is None  # the teacher is detached
    return objective.theta.grad.clone(), s.grad.clone()


def test_theta_gradient_is_lambda_times_the_unreversed_gradient():
    objective = ctkd(lambda_epochs=10)
    plain_theta, plain_s = _grads(objective, lam=1.0)
    for epoch in (1, 3, 10, 12):
        lam = -(1 - math.cos(math.pi * min(epoch, 10) / 10)) / 2
        theta_grad, s_grad = _grads(objective, progress=at_epoch(epoch))
        assert theta_grad.item() == pytest.approx(lam * plain_theta.item(), rel=1e-5)
        assert torch.allclose(s_grad, plain_s)  # the student's own gradient is not reversed
    assert plain_theta.item() != 0


def test_theta_gradient_matches_the_hand_derived_derivative():
    # dL/dtheta (no reversal) = mean_i d(T^2 KL_i)/dT * dT/dtheta, dT/dtheta = 20 sigmoid(1) (1 - sigmoid(1))
    # (float64: at T ~ 15.6 the KL is ~1e-3 and float32 leaves ~4e-4 relative error in this gradient)
    objective = ctkd().double()
    theta_grad, _ = _grads(objective, lam=1.0, dtype=torch.double)
    dT = 20 * sigmoid(1.0) * (1 - sigmoid(1.0))
    expected = sum(kd_dvalue_dT(s, t, T_INIT) for s, t in zip(S, T_LOGITS, strict=True)) / 2 * dT
    assert theta_grad.item() == pytest.approx(expected, rel=1e-8)
    # at epoch 12 (lambda = -1) theta ascends the loss: its gradient is exactly the negative
    reversed_grad, _ = _grads(objective, progress=at_epoch(12), dtype=torch.double)
    assert reversed_grad.item() == pytest.approx(-expected, rel=1e-8)


def test_lambda_zero_gives_theta_no_gradient_but_the_student_one():
    objective = ctkd(lambda_min=0.0, lambda_max=0.0)
    theta_grad, s_grad = _grads(objective, progress=at_epoch(4))
    assert theta_grad.item() == 0.0
    assert s_grad.abs().sum() > 0


def test_gradient_through_t_squared_matches_finite_difference_of_the_full_loss():
    objective = ctkd().double()
    s, t = torch.tensor(S, dtype=torch.double), torch.tensor(T_LOGITS, dtype=torch.double)

    def full_loss(theta: float) -> float:
        with torch.no_grad():
            objective.theta.fill_(theta)
            return objective.base.logit_loss(s, t, LABELS, objective.temperature(s, t, 1.0), Progress()).item()

    h = 1e-5
    finite_difference = (full_loss(1.0 + h) - full_loss(1.0 - h)) / (2 * h)
    objective.theta.data.fill_(1.0)
    objective.zero_grad()
    objective.base.logit_loss(s, t, LABELS, objective.temperature(s, t, 1.0), Progress()).backward()
    assert objective.theta.grad.item() == pytest.approx(finite_difference, rel=1e-6)
    # the T^2 factor matters: detaching it gives a clearly different gradient
    objective.zero_grad()
    T = objective.temperature(s, t, 1.0)
    no_t2 = (T.detach() ** 2 / T**2) * objective.base.logit_loss(s, t, LABELS, T, Progress())
    no_t2.backward()
    assert abs(objective.theta.grad.item() - finite_difference) > 0.1 * abs(finite_difference)


def test_gradcheck_full_loss_in_student_logits_and_theta():
    objective = ctkd().double()
    t = torch.randn(3, 4, dtype=torch.double)

    class NoReversal(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, s):
            return self.inner.base.logit_loss(s, t, None, self.inner.temperature(s, t, 1.0), Progress())

    wrapper = NoReversal(objective)
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    theta = torch.tensor(0.3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s_, th: torch.func.functional_call(wrapper, {"inner.theta": th}, (s_,)), (s, theta))


# ------------------------------------------------------------------------------------- instance mode


def test_instance_mode_gives_one_temperature_per_sample_in_range():
    objective = ctkd(mode="instance", num_classes=3, hidden_dim=8)
    assert objective.theta is None
    s, t = torch.tensor(S), torch.tensor(T_LOGITS)
    T = objective.temperature(s, t, -1.0)
    assert T.shape == (2, 1)
    assert torch.allclose(T, torch.full((2, 1), T_INIT))  # starts at the global module's temperature
    with torch.no_grad():
        for p in objective.mlp.parameters():
            p.normal_(0, 3.0)
    T = objective.temperature(100 * torch.randn(16, 3), 100 * torch.randn(16, 3), -1.0)
    assert T.shape == (16, 1)
    assert (T >= 1.0).all() and (T <= 21.0).all()
    assert T.std() > 0  # per-sample values
    assert objective.current_temperature is None
    objective(Outputs(s), Outputs(t), {}, at_epoch(1))
    assert 1.0 <= objective.current_temperature <= 21.0


def test_instance_mode_loss_is_per_sample_t_squared_kd_and_reverses_mlp_gradients():
    torch.manual_seed(0)
    objective = ctkd(mode="instance", num_classes=3, hidden_dim=8)
    with torch.no_grad():
        objective.mlp[2].weight.normal_(0, 0.5)
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T_LOGITS, requires_grad=True)
    loss = objective(Outputs(s), Outputs(t), {"labels": LABELS}, at_epoch(12))  # lambda = -1
    T = objective.temperature(s, t, 1.0).detach()
    assert T.shape == (2, 1) and T[0, 0] != T[1, 0]
    expected = sum(kd_value(a, b, T[i, 0].item()) for i, (a, b) in enumerate(zip(S, T_LOGITS, strict=True))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert t.grad is None
    reversed_bias = objective.mlp[2].bias.grad.clone()
    # the MLP reads detached logits: the student's gradient is that of KD at a constant T
    s2 = torch.tensor(S, requires_grad=True)
    objective.base.logit_loss(s2, torch.tensor(T_LOGITS), None, T, Progress()).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-7)
    # the module's own gradient is reversed (lambda = -1)
    objective.zero_grad()
    objective.base.logit_loss(s.detach(), t.detach(), None, objective.temperature(s, t, 1.0), Progress()).backward()
    assert reversed_bias.item() == pytest.approx(-objective.mlp[2].bias.grad.item(), rel=1e-5)
    assert reversed_bias.item() != 0


def test_instance_mode_gradcheck_in_student_logits():
    torch.manual_seed(1)
    objective = ctkd(mode="instance", num_classes=4, hidden_dim=5).double()
    with torch.no_grad():
        objective.mlp[2].weight.normal_()
    t = torch.randn(3, 4, dtype=torch.double)
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    # T depends on s only through detached inputs, so d loss / d s is KD's at a constant per-sample T
    T = objective.temperature(s, t, 1.0).detach()
    assert torch.autograd.gradcheck(lambda x: objective.base.logit_loss(x, t, None, T, Progress()), (s,))


def test_instance_mode_sizes_its_mlp_in_setup():
    objective = ctkd(mode="instance", hidden_dim=4)
    assert objective.mlp is None
    objective.setup(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), nn.Linear(5, 3))
    assert objective.mlp[0].in_features == 6  # [teacher, student] logits of 3 classes
    hf_like = nn.Linear(5, 9)
    hf_like.config = SimpleNamespace(num_labels=4)
    other = ctkd(mode="instance", hidden_dim=4)
    other.setup(hf_like, None)
    assert other.mlp[0].in_features == 8
    unset = ctkd(mode="instance")
    with pytest.raises(KDForgeError, match="num_classes"):
        unset.setup(nn.Identity(), None)
    with pytest.raises(KDForgeError, match="setup"):
        unset(Outputs(torch.tensor(S)), Outputs(torch.tensor(T_LOGITS)), {}, at_epoch(1))
    with pytest.raises(KDForgeError, match="num_classes"):
        objective(Outputs(torch.zeros(2, 5)), Outputs(torch.zeros(2, 5)), {}, at_epoch(1))


# --------------------------------------------------------------------------------------- composition


def test_wrapped_kd_at_a_fixed_temperature_equals_hinton_kd():
    # theta = ln(0.15 / 0.85) gives sigmoid = 0.15, T = 1 + 20 * 0.15 = 4
    objective = ctkd(theta_init=math.log(0.15 / 0.85))
    assert objective.current_temperature == pytest.approx(4.0)
    s, t = Outputs(torch.tensor(S)), Outputs(torch.tensor(T_LOGITS))
    hinton = build_objective(ObjectiveConfig(name="hinton_kd", temperature=4.0))
    value = objective(s, t, {"labels": LABELS}, at_epoch(2))
    assert value.item() == pytest.approx(hinton(s, t, {}, at_epoch(2)).item(), rel=1e-6)
    expected = sum(kd_value(a, b, 4.0) for a, b in zip(S, T_LOGITS, strict=True)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_wrapped_dkd_at_a_fixed_temperature_equals_dkd_and_trains_theta():
    objective = ctkd(base="dkd", base_params={"alpha": 1, "beta": 8}, theta_init=math.log(0.15 / 0.85))
    dkd = build_objective(ObjectiveConfig(name="dkd", alpha=1, beta=8))
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T_LOGITS)
    progress = Progress(step=50, total_steps=100, epoch=30.0)
    value = objective(Outputs(s), Outputs(t), {"labels": LABELS}, progress)
    direct = dkd.logit_loss(torch.tensor(S), t, LABELS, 4.0, progress)
    assert value.item() == pytest.approx(direct.item(), rel=1e-5)
    value.backward()
    assert objective.theta.grad is not None and objective.theta.grad.item() != 0
    # instance mode: DKD gets the (N, 1) per-sample temperature
    torch.manual_seed(0)
    per_sample = ctkd(base="dkd", base_params={"alpha": 1, "beta": 8}, mode="instance", num_classes=3, hidden_dim=4)
    with torch.no_grad():
        per_sample.mlp[2].weight.normal_()
    T = per_sample.temperature(torch.tensor(S), t, 1.0).detach()
    value = per_sample(Outputs(torch.tensor(S)), Outputs(t), {"labels": LABELS}, progress)
    assert value.item() == pytest.approx(dkd.logit_loss(torch.tensor(S), t, LABELS, T, progress).item(), rel=1e-6)


def test_ctkd_copies_what_the_base_needs_and_delegates_setup():
    objective = ctkd()
    assert objective.uses_teacher is True
    assert objective.requires == frozenset()
    assert objective.hook_paths(nn.Linear(2, 2), nn.Linear(2, 2)) == ([], [])


def test_theta_trains_inside_the_distillation_module_and_ascends_the_loss():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    loss = WeightedLoss.from_config([ObjectiveConfig(name="ce", weight=0.1),
                                     ObjectiveConfig(name="ctkd", weight=0.9, lambda_epochs=10)])
    loss.setup(student, {"teacher": teacher})
    module = offline_step(ModelAdapter(student), loss, ModelAdapter(teacher))
    module.train()
    term = loss.objectives[1]
    assert any(p is term.theta for p in module.parameters())
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=10.0)
    batch = {"inputs": torch.randn(8, 4), "labels": torch.randint(0, 3, (8,))}

    # the unreversed d(0.9 L_ctkd)/d theta, to know which way an ascent goes
    with torch.no_grad():
        s_logits, t_logits = student(batch["inputs"]), teacher(batch["inputs"])
    ascent = torch.autograd.grad(0.9 * term.base.logit_loss(s_logits, t_logits, None,
                                                            term.temperature(s_logits, t_logits, 1.0), Progress()),
                                 term.theta)[0].item()
    before = term.theta.item()
    total, terms = module(batch, Progress(step=1, total_steps=100, epoch=11.0))  # epoch 12: lambda = -1
    assert set(terms) == {"ce", "ctkd"}
    optimizer.zero_grad()
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    # SGD: theta -= lr * (lambda * ascent) with lambda = -1, so theta moves by +lr * ascent
    assert term.theta.item() == pytest.approx(before + 10.0 * ascent, rel=1e-4)
    assert term.theta.item() != before
    assert math.copysign(1, term.theta.item() - before) == math.copysign(1, ascent)


def test_instance_mlp_trains_inside_the_distillation_module():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    loss = WeightedLoss.from_config([ObjectiveConfig(name="ctkd", mode="instance", hidden_dim=8)])
    loss.setup(student, {"teacher": teacher})
    module = offline_step(ModelAdapter(student), loss, ModelAdapter(teacher))
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    mlp = loss.objectives[0].mlp
    before = [p.detach().clone() for p in mlp.parameters()]
    total, _ = module({"inputs": torch.randn(8, 4), "labels": torch.randint(0, 3, (8,))}, Progress(epoch=5.0))
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, mlp.parameters(), strict=True))


# -------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("params, message", [
    ({"base": "ce"}, r"`base`.*'ce' is not a logit objective.*hinton_kd"),
    ({"base": "logit_mse"}, r"`base`.*not a logit objective"),
    ({"base": "ctkd"}, r"`base`.*not a logit objective"),
    ({"base": "nope"}, r"`base`.*unknown objective 'nope'"),
    ({"base_params": {"temperature": 2}}, r"`base_params`.*temperature.*temperature_min"),
    ({"base_params": {"weight": 2}}, r"`base_params`.*weight"),
    ({"base_params": {"tmp": 1}}, r"`base_params`.*`tmp` of base objective 'hinton_kd'.*does not exist"),
    ({"mode": "local"}, r"`mode`"),
    ({"temperature_min": 0}, r"`temperature_min`"),
    ({"temperature_range": -1}, r"`temperature_range`"),
    ({"lambda_epochs": 0}, r"`lambda_epochs`"),
    ({"lambda_min": -0.1}, r"`lambda_min`"),
    ({"lambda_min": 0.7, "lambda_max": 0.5}, r"`lambda_max`.*>= lambda_min"),
    ({"hidden_dim": 0}, r"`hidden_dim`"),
    ({"tempreature": 4}, r"`tempreature`.*does not exist"),
])
def test_config_errors_are_one_line_and_name_the_key(params, message):
    with pytest.raises(KDForgeError, match=message) as err:
        ctkd(**params)
    assert "\n" not in str(err.value)
    assert "objective 'ctkd'" in str(err.value)


def test_runtime_errors_name_the_fix():
    objective = ctkd()
    with pytest.raises(KDForgeError, match="logit_mse"):
        objective(Outputs(torch.zeros(2, 1)), Outputs(torch.zeros(2, 1)), {}, at_epoch(1))
    with pytest.raises(KDForgeError, match="has no teacher"):  # caught when the loss is bound to its roles
        WeightedLoss.from_config([ObjectiveConfig(name="ctkd")], teachers=[])


def test_defaults_are_the_papers():
    p = ctkd().params
    assert (p.base, p.mode, p.temperature_min, p.temperature_range, p.theta_init) == ("hinton_kd", "global", 1, 20, 1)
    assert (p.lambda_epochs, p.lambda_min, p.lambda_max) == (10, 0, 1)
