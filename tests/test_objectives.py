"""Logit objectives against values derived by hand from their formulas, plus gradients."""

import math

import pytest
import torch

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress, build_objective
from kdforge.objectives.composite import WeightedLoss
from kdforge.objectives.logit import kd_kl_loss
from kdforge.objectives.schedules import make_schedule

P0 = Progress(step=0, total_steps=10)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_hinton_kd_matches_hand_derived_value_at_t1():
    # teacher logits (ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2)
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_kl_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.1308120, abs=1e-7)


def test_hinton_kd_scales_by_t_squared_and_averages_over_batch():
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 2.0]])
    T = 2.0
    per_sample = [kl(softmax([a / T for a in tr]), softmax([a / T for a in sr]))
                  for sr, tr in zip(s.tolist(), t.tolist(), strict=True)]
    expected = T**2 * sum(per_sample) / 2
    objective = build_objective(ObjectiveConfig(name="hinton_kd", temperature=T))
    value = objective(Outputs(s), Outputs(t), {}, P0)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_hinton_kd_gradient_is_t_times_prob_difference_and_teacher_gets_none():
    # d/dz_s [T^2 KL(p_t || p_s)] = T (p_s - p_t) / N for N samples
    T = 3.0
    s = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.1, 0.0]], requires_grad=True)
    kd_kl_loss(s, t, T).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t.detach() / T, -1)) / 2
    assert torch.allclose(s.grad, expected, atol=1e-6)
    assert t.grad is None


def test_hinton_kd_reduction_mean_is_takds_kldivloss_with_its_weights():
    """TAKD's loss: (1 - lambda) CE + lambda T^2 nn.KLDivLoss()(log_softmax(z_s / T), softmax(z_t / T)), the
    default reduction 'mean' averaging over all N x C elements; lambda 0.5, T 4 as configs/teachers/takd."""
    torch.manual_seed(3)
    z_s, z_t, y = torch.randn(6, 10), torch.randn(6, 10) * 2, torch.randint(0, 10, (6,))
    with pytest.warns(UserWarning, match="'mean' divides the total loss by both the batch size and the support"):
        takd = 0.5 * torch.nn.functional.cross_entropy(z_s, y) + 0.5 * 16 * torch.nn.KLDivLoss()(
            torch.log_softmax(z_s / 4, -1), torch.softmax(z_t / 4, -1))
    loss = WeightedLoss.from_config([ObjectiveConfig(name="ce", weight=0.5), ObjectiveConfig(
        name="hinton_kd", weight=0.5, temperature=4.0, reduction="mean")])
    ours, _ = loss(Outputs(z_s), {"teacher": Outputs(z_t)}, {"labels": y}, Progress())
    torch.testing.assert_close(ours, takd)
    batchmean = build_objective(ObjectiveConfig(name="hinton_kd", temperature=4.0))
    assert batchmean(Outputs(z_s), Outputs(z_t), {}, Progress()).item() == pytest.approx(
        10 * (ours - 0.5 * torch.nn.functional.cross_entropy(z_s, y)).item() / 0.5, rel=1e-5)  # C times larger


def test_hinton_kd_gradcheck():
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: kd_kl_loss(x, t, 2.5), (s,))


def test_ce_and_mse_are_the_task_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    ce = build_objective(ObjectiveConfig(name="ce"))(Outputs(logits), None, {"labels": labels}, P0)
    expected = -(math.log(softmax([2.0, 0.0])[0]) + math.log(softmax([0.0, 1.0])[0])) / 2
    assert ce.item() == pytest.approx(expected, rel=1e-6)
    mse = build_objective(ObjectiveConfig(name="mse"))(
        Outputs(torch.tensor([[1.0], [3.0]])), None, {"labels": torch.tensor([0.0, 1.0])}, P0)
    assert mse.item() == pytest.approx((1 + 4) / 2)


def test_class_losses_refuse_regression_outputs_with_the_fix():
    with pytest.raises(KDForgeError, match="logit_mse"):
        build_objective(ObjectiveConfig(name="hinton_kd"))(Outputs(torch.zeros(2, 1)), Outputs(torch.zeros(2, 1)),
                                                           {}, P0)


def test_bad_objective_config_is_one_line_error():
    with pytest.raises(KDForgeError, match="unknown objective 'hinton'.*known: .*hinton_kd"):
        build_objective(ObjectiveConfig(name="hinton"))
    with pytest.raises(KDForgeError, match="temperature") as err:
        build_objective(ObjectiveConfig(name="hinton_kd", temperature=-1))
    assert "\n" not in str(err.value)
    with pytest.raises(KDForgeError, match="tmperature.*does not exist"):
        build_objective(ObjectiveConfig(name="hinton_kd", tmperature=2))


def test_weighted_loss_sums_weighted_terms_and_follows_schedules():
    loss = WeightedLoss.from_config([
        ObjectiveConfig(name="ce", weight=0.25),
        ObjectiveConfig(name="hinton_kd", weight={"schedule": "linear", "start": 0.0, "end": 1.0}, temperature=1),
    ])
    s, t = Outputs(torch.tensor([[0.0, 0.0]])), Outputs(torch.tensor([[math.log(3.0), 0.0]]))
    batch = {"labels": torch.tensor([1])}
    ce, kd = math.log(2), 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    total, terms = loss(s, {"teacher": t}, batch, Progress(step=5, total_steps=10))
    assert total.item() == pytest.approx(0.25 * ce + 0.5 * kd, rel=1e-6)
    assert terms == pytest.approx({"ce": ce, "hinton_kd": kd}, rel=1e-6)


@pytest.mark.parametrize("spec, fraction, expected", [
    (0.7, 0.3, 0.7),
    ({"schedule": "constant", "value": 2.0}, 0.9, 2.0),
    ({"schedule": "linear", "start": 1.0, "end": 3.0}, 0.25, 1.5),
    ({"schedule": "cosine", "start": 1.0, "end": 0.0}, 0.0, 1.0),
    ({"schedule": "cosine", "start": 1.0, "end": 0.0}, 0.5, 0.5),
    ({"schedule": "cosine", "start": 1.0, "end": 0.0}, 1.0, 0.0),
    ({"schedule": "step", "values": [1.0, 0.5, 0.1], "milestones": [0.5, 0.75]}, 0.49, 1.0),
    ({"schedule": "step", "values": [1.0, 0.5, 0.1], "milestones": [0.5, 0.75]}, 0.5, 0.5),
    ({"schedule": "step", "values": [1.0, 0.5, 0.1], "milestones": [0.5, 0.75]}, 0.8, 0.1),
])
def test_schedules(spec, fraction, expected):
    progress = Progress(step=round(fraction * 100), total_steps=100)
    assert make_schedule(spec)(progress) == pytest.approx(expected)


def test_schedule_errors_and_callables():
    with pytest.raises(KDForgeError, match="start"):
        make_schedule({"schedule": "linear", "end": 1.0})
    assert make_schedule(lambda p: p.epoch * 2)(Progress(epoch=1.5)) == 3.0


def test_temperature_can_follow_a_schedule():
    s, t = torch.tensor([[0.3, -0.2, 1.0]]), torch.tensor([[1.0, 0.5, -1.0]])
    objective = build_objective(ObjectiveConfig(name="hinton_kd",
                                                temperature={"schedule": "linear", "start": 4.0, "end": 1.0}))
    start, end = Progress(step=0, total_steps=10), Progress(step=10, total_steps=10)
    assert objective(Outputs(s), Outputs(t), {}, start).item() == pytest.approx(kd_kl_loss(s, t, 4.0).item())
    assert objective(Outputs(s), Outputs(t), {}, end).item() == pytest.approx(kd_kl_loss(s, t, 1.0).item())
    dkd = build_objective(ObjectiveConfig(name="dkd", temperature=lambda p: 2.0 + p.fraction, warmup=0))
    assert dkd.temperature_at(Progress(step=5, total_steps=10)) == 2.5
    falling = build_objective(ObjectiveConfig(name="hinton_kd",
                                              temperature={"schedule": "linear", "start": 1.0, "end": -1.0}))
    with pytest.raises(KDForgeError, match="keep it above 0"):
        falling(Outputs(s), Outputs(t), {}, end)
    with pytest.raises(KDForgeError, match="start"):
        build_objective(ObjectiveConfig(name="hinton_kd", temperature={"schedule": "linear", "end": 1.0}))
