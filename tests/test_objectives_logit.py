"""DKD, NKD, TF-NKD, BD-KD, generalized JSD and Continuation-KD against values derived by hand
from their formulas (plain Python ``math``), plus gradients, detachment, schedules and config errors."""

import math

import pytest
import torch

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress, build_objective
from kdforge.objectives.bdkd import balance_weights
from kdforge.objectives.dkd import dkd_parts
from kdforge.objectives.logit import kd_kl_loss

pytestmark = pytest.mark.usefixtures("one_thread")

LN = math.log
P_LATE = Progress(step=0, total_steps=10, epoch=50.0)  # past every warm-up



def softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * LN(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def entropy(p):
    return -sum(a * LN(a) for a in p)


def build(name, **params):
    return build_objective(ObjectiveConfig(name=name, **params))


def loss_of(objective, s, t, labels=None, progress=P_LATE):
    batch = {} if labels is None else {"labels": labels}
    return objective(Outputs(s), None if t is None else Outputs(t), batch, progress)


# --------------------------------------------------------------------------------------------- DKD


def test_dkd_hand_value_three_classes():
    # teacher (ln 6, ln 3, 0) -> p_t = (0.6, 0.3, 0.1); student (0, 0, 0) -> p_s = (1/3, 1/3, 1/3); y = 0, T = 1
    # b_t = (0.6, 0.4), b_s = (1/3, 2/3):   TCKD = 0.6 ln(1.8) + 0.4 ln(0.6)      = 0.148342...
    # p^_t = (0.75, 0.25), p^_s = (1/2, 1/2): NCKD = 0.75 ln(1.5) + 0.25 ln(0.5)  = 0.130812...
    tckd = 0.6 * LN(1.8) + 0.4 * LN(0.6)
    nckd = 0.75 * LN(1.5) + 0.25 * LN(0.5)
    assert tckd == pytest.approx(0.1483420, abs=1e-6) and nckd == pytest.approx(0.1308120, abs=1e-6)
    s, t = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[LN(6), LN(3), 0.0]])
    y = torch.tensor([0])
    objective = build("dkd", temperature=1.0)  # alpha 1, beta 8
    assert loss_of(objective, s, t, y).item() == pytest.approx(tckd + 8 * nckd, rel=1e-6)
    # epoch 0 (the paper's epoch 1): warm-up factor 1/20
    assert loss_of(objective, s, t, y, Progress(epoch=0.0)).item() == pytest.approx((tckd + 8 * nckd) / 20, rel=1e-6)


def test_dkd_hand_value_at_temperature_two_batch_of_two_with_t_squared():
    s = [[1.0, -0.5, 2.0], [0.3, 0.0, -1.2]]
    t = [[2.0, 0.5, -1.0], [-0.4, 1.5, 0.2]]
    labels, T, alpha, beta = [0, 2], 2.0, 0.5, 3.0
    tckd, nckd = [], []
    for zs, zt, y in zip(s, t, labels, strict=True):
        ps, pt = softmax(zs, T), softmax(zt, T)
        tckd.append(kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]))
        nt_s = softmax([v for j, v in enumerate(zs) if j != y], T)
        nt_t = softmax([v for j, v in enumerate(zt) if j != y], T)
        nckd.append(kl(nt_t, nt_s))
    expected = T**2 * (alpha * sum(tckd) + beta * sum(nckd)) / 2
    objective = build("dkd", alpha=alpha, beta=beta, temperature=T)
    value = loss_of(objective, torch.tensor(s), torch.tensor(t), torch.tensor(labels))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_dkd_decomposition_reproduces_hinton_kd():
    # the paper's eq. (2): KD_i = TCKD_i + (1 - p_t,i[y]) NCKD_i, so T^2-weighted batch means agree with kd_kl_loss
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.double), torch.randn(6, 5, dtype=torch.double) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    for T in (1.0, 4.0, torch.tensor([[1.0], [2.0], [3.0], [0.5], [4.0], [1.5]], dtype=torch.double)):
        tckd, nckd, b_t = dkd_parts(s, t, y, T)
        t2 = T.reshape(-1) ** 2 if torch.is_tensor(T) else T**2
        assert torch.allclose(((tckd + (1 - b_t) * nckd) * t2).mean(), kd_kl_loss(s, t, T), rtol=1e-12)


def test_dkd_on_two_classes_is_alpha_times_kd_and_says_so(caplog):
    # one sample, z_s = (0, 1), z_t = (2, 0), y = 0, T = 2: NCKD is over one class (0) and b = p, so
    # DKD = alpha * T^2 * KL(p_t || p_s) whatever beta is
    p_s, p_t = softmax([0.0, 1.0], 2.0), softmax([2.0, 0.0], 2.0)
    expected = 3.0 * 4.0 * kl(p_t, p_s)
    dkd = build("dkd", alpha=3.0, beta=8.0, temperature=2.0, warmup=0)
    with caplog.at_level("WARNING", logger="kdforge"):
        value = loss_of(dkd, torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        loss_of(dkd, torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert [r.message for r in caplog.records].count(
        "dkd: with two classes DKD equals alpha x KD (its non-target term NCKD is empty); it decouples nothing on "
        "this task") == 1


def test_dkd_non_target_kl_matches_the_official_minus_1000_masking():
    # official: softmax(z / T - 1000 * gt_mask) over all C columns; the masked target gets probability 0
    torch.manual_seed(1)
    s, t, y, T = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([5, 0, 2, 2]), 4.0
    mask = torch.nn.functional.one_hot(y, 6).float()
    log_q_s = torch.log_softmax(s / T - 1000.0 * mask, dim=-1)
    q_t = torch.softmax(t / T - 1000.0 * mask, dim=-1)
    official = torch.nn.functional.kl_div(log_q_s, q_t, reduction="none").sum(-1)
    assert torch.allclose(dkd_parts(s, t, y, T)[1], official, atol=1e-6)


def test_dkd_is_finite_when_the_student_saturates():
    # student (200, 0, 0): b_s = (1, 2e-200) underflows to 0 in float32, log-space keeps it finite:
    # TCKD = 1/3 ln(1/3) + 2/3 (ln(2/3) - (ln 2 - 200)) = ln(1/3) + 400/3; NCKD = 0 (both uniform on 2 classes)
    s = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    t = torch.zeros(1, 3)
    value = build("dkd", temperature=1.0)(Outputs(s), Outputs(t), {"labels": torch.tensor([0])}, P_LATE)
    assert value.item() == pytest.approx(LN(1 / 3) + 400 / 3, rel=1e-5)
    value.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("epoch, factor", [(0.0, 1 / 20), (0.99, 1 / 20), (4.5, 5 / 20), (18.0, 19 / 20),
                                           (19.0, 1.0), (60.0, 1.0)])
def test_dkd_warmup_uses_the_one_based_epoch(epoch, factor):
    torch.manual_seed(2)
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 3, 1])
    objective = build("dkd")
    full = loss_of(objective, s, t, y, Progress(epoch=100.0)).item()
    assert loss_of(objective, s, t, y, Progress(epoch=epoch)).item() == pytest.approx(factor * full, rel=1e-6)
    assert objective.warmup_factor(Progress(epoch=epoch)) == pytest.approx(factor)
    assert build("dkd", warmup=0).warmup_factor(Progress(epoch=0.0)) == 1.0
    assert build("dkd", warmup=5).warmup_factor(Progress(epoch=1.2)) == pytest.approx(2 / 5)


def test_dkd_gradcheck_and_teacher_detached():
    torch.manual_seed(3)
    y = torch.tensor([1, 0, 3])
    t = torch.randn(3, 4, dtype=torch.double)
    objective = build("dkd", alpha=0.7, beta=2.0)
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    T = torch.tensor([[1.5], [3.0], [0.8]], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: objective.logit_loss(a, t, y, b, P_LATE), (s, T))
    t_grad = t.clone().requires_grad_(True)
    objective.logit_loss(s, t_grad, y, 4.0, P_LATE).backward()
    assert t_grad.grad is None and s.grad is not None


# --------------------------------------------------------------------------------------------- NKD


def test_nkd_hand_value_three_classes_t1():
    # teacher (ln 6, ln 3, 0) -> (0.6, 0.3, 0.1), student uniform, y = 0:
    # target: -0.6 ln(1/3) = 0.6 ln 3;  non-target: q_t = (0.75, 0.25), q_s = (1/2, 1/2): -sum q_t ln q_s = ln 2
    # L = 0.6 ln 3 + gamma * 1^2 * ln 2 with gamma = 1.5  (cross-entropies: no -H(q_t) as a KL would have)
    s, t, y = torch.zeros(1, 3), torch.tensor([[LN(6), LN(3), 0.0]]), torch.tensor([0])
    expected = 0.6 * LN(3) + 1.5 * LN(2)
    assert loss_of(build("nkd"), s, t, y).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.6988, abs=1e-4)


def test_nkd_hand_value_temperature_three_batch_of_two():
    # CIFAR setting T = 3, gamma = 3.5; the target term stays at T = 1, only the non-target one gets T^2
    s = [[0.5, 1.0, -1.0], [0.2, -0.7, 1.1]]
    t = [[LN(6), LN(3), 0.0], [1.0, 2.0, -0.5]]
    labels, T, gamma = [0, 2], 3.0, 3.5
    total = 0.0
    for zs, zt, y in zip(s, t, labels, strict=True):
        target = -softmax(zt)[y] * LN(softmax(zs)[y])
        q_t = softmax([v for j, v in enumerate(zt) if j != y], T)
        q_s = softmax([v for j, v in enumerate(zs) if j != y], T)
        total += target - gamma * T**2 * sum(a * LN(b) for a, b in zip(q_t, q_s, strict=True))
    objective = build("nkd", temperature=T, gamma=gamma)
    value = loss_of(objective, torch.tensor(s), torch.tensor(t), torch.tensor(labels))
    assert value.item() == pytest.approx(total / 2, rel=1e-6)


def test_nkd_analytic_gradient_and_teacher_detached():
    # d/dz_s: target term -p_t[y] (onehot(y) - p_s) / N; non-target columns gamma T (q_s - q_t) / N
    torch.manual_seed(4)
    T, gamma, y = 2.0, 1.5, torch.tensor([2, 0])
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4, requires_grad=True)
    build("nkd", temperature=T, gamma=gamma).logit_loss(s, t, y, T, P_LATE).backward()
    assert t.grad is None
    expected = torch.zeros(2, 4)
    for i in range(2):
        p_s, p_t = torch.softmax(s[i].detach(), -1), torch.softmax(t[i].detach(), -1)
        onehot = torch.nn.functional.one_hot(y[i], 4).float()
        expected[i] = -p_t[y[i]] * (onehot - p_s)
        keep = [j for j in range(4) if j != y[i]]
        q_s = torch.softmax(s[i, keep].detach() / T, -1)
        q_t = torch.softmax(t[i, keep].detach() / T, -1)
        expected[i, keep] += gamma * T * (q_s - q_t)
    assert torch.allclose(s.grad, expected / 2, atol=1e-6)


def test_nkd_gradcheck_with_per_sample_temperature():
    torch.manual_seed(5)
    y, t = torch.tensor([0, 3, 1]), torch.randn(3, 5, dtype=torch.double)
    s = torch.randn(3, 5, dtype=torch.double, requires_grad=True)
    T = torch.tensor([[1.0], [2.5], [0.7]], dtype=torch.double, requires_grad=True)
    objective = build("nkd", gamma=2.0)
    assert torch.autograd.gradcheck(lambda a, b: objective.logit_loss(a, t, y, b, P_LATE), (s, T))
    same = objective.logit_loss(s, t, y, torch.full((3, 1), 2.0, dtype=torch.double), P_LATE)
    assert torch.allclose(same, objective.logit_loss(s, t, y, 2.0, P_LATE))


# ------------------------------------------------------------------------------------------ TF-NKD


def test_tf_nkd_hand_value_and_analytic_gradient():
    # s1 = (ln 2, 0, 0) -> p = (0.5, 0.25, 0.25), y = 0 -> p_y = 0.5
    # s2 = (0, ln 3, 0) -> p = (0.2, 0.6, 0.2),   y = 1 -> p_y = 0.6
    # power 2: p_y^2 = (0.25, 0.36), batch mean 0.305 -> w = (0.945, 1.055)
    # L = -(0.945 ln 0.5 + 1.055 ln 0.6) / 2;  grad_i = -w_i (onehot(y_i) - p_i) / 2
    s = torch.tensor([[LN(2), 0.0, 0.0], [0.0, LN(3), 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    objective = build("tf_nkd")
    assert objective.uses_teacher is False
    value = loss_of(objective, s, None, y)
    assert value.item() == pytest.approx(-(0.945 * LN(0.5) + 1.055 * LN(0.6)) / 2, rel=1e-6)
    value.backward()
    expected = -torch.tensor([[0.945 * 0.5, -0.945 * 0.25, -0.945 * 0.25],
                              [-1.055 * 0.2, 1.055 * 0.4, -1.055 * 0.2]]) / 2
    assert torch.allclose(s.grad, expected, atol=1e-6)
    # power 1: w = (0.5 + 1 - 0.55, 0.6 + 1 - 0.55) = (0.95, 1.05)
    unsquared = loss_of(build("tf_nkd", power=1), s.detach(), None, y)
    assert unsquared.item() == pytest.approx(-(0.95 * LN(0.5) + 1.05 * LN(0.6)) / 2, rel=1e-6)


def test_tf_nkd_weight_is_detached_and_gradcheck_when_it_is_constant():
    # the soft label w is detached: the gradient is -w (onehot(y) - p) / N with w held fixed (float64, random)
    torch.manual_seed(6)
    y = torch.tensor([0, 2, 1, 1])
    s = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    objective = build("tf_nkd")
    objective.logit_loss(s, None, y, 1.0, P_LATE).backward()
    p = torch.softmax(s.detach(), -1)
    q = p[torch.arange(4), y] ** 2
    w = (q + 1 - q.mean()).unsqueeze(1)
    assert torch.allclose(s.grad, -w * (torch.nn.functional.one_hot(y, 3).double() - p) / 4, atol=1e-12)
    # with one sample w = q + 1 - q = 1 exactly, so the term is -log p_y (CE) and gradcheck applies
    one = torch.randn(1, 5, dtype=torch.double, requires_grad=True)
    label = torch.tensor([3])
    assert torch.autograd.gradcheck(lambda a: objective.logit_loss(a, None, label, 1.0, P_LATE), (one,))
    assert torch.allclose(objective.logit_loss(one, None, label, 1.0, P_LATE),
                          torch.nn.functional.cross_entropy(one, label))
    with pytest.raises(KDForgeError, match="no temperature"):
        objective.logit_loss(s, None, y, torch.ones(4, 1), P_LATE)


# ------------------------------------------------------------------------------------------- BD-KD


def test_bdkd_hand_value_two_samples_one_over_one_under_confident():
    # a = (0.5, 0.25, 0.25) (logits (ln 2, 0, 0)), b = (0.8, 0.1, 0.1) (logits (ln 8, 0, 0)), at T = 2 with logits x2
    # sample 1: student b, teacher a: H(b) = 0.639 < H(a) = 1.040 -> over-confident -> (w_F, w_R) = (delta, 1)
    #           forward KL(a||b) = A, reverse KL(b||a) = B  -> 2A + B
    # sample 2: student a, teacher b: under-confident -> (1, delta):
    #           forward KL(b||a) = B, reverse KL(a||b) = A -> B + 2A
    # L = T^2 (4A + 2B) / 2 = 4 (2A + B) with delta = 2
    a, b = [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]
    assert entropy(b) < entropy(a)
    A, B = kl(a, b), kl(b, a)
    za, zb = [2 * LN(2), 0.0, 0.0], [2 * LN(8), 0.0, 0.0]
    s, t = torch.tensor([zb, za]), torch.tensor([za, zb])
    value = loss_of(build("bdkd", temperature=2.0, delta=2.0), s, t)
    assert value.item() == pytest.approx(4 * (2 * A + B), rel=1e-6)
    assert abs(4 * (A + 2 * B) - value.item()) > 0.1  # the reversed rule (extra weight on the other KL) fails


def test_bdkd_weight_rule_and_symmetric_kl_at_delta_one():
    log_over, log_under = torch.log(torch.tensor([[0.9, 0.05, 0.05]])), torch.log(torch.tensor([[0.4, 0.3, 0.3]]))
    w_f, w_r = balance_weights(log_over, log_under, 3.0)  # student more confident than teacher: forward KL
    assert (w_f.item(), w_r.item()) == (3.0, 1.0)
    w_f, w_r = balance_weights(log_under, log_over, 3.0)  # less confident: reverse KL
    assert (w_f.item(), w_r.item()) == (1.0, 3.0)
    w_f, w_r = balance_weights(log_under, log_under, 3.0)
    assert (w_f.item(), w_r.item()) == (1.0, 1.0)
    torch.manual_seed(7)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    symmetric = kd_kl_loss(s, t, 3.0) + kd_kl_loss(t, s, 3.0)  # forward + reverse, each T^2 batch mean
    assert torch.allclose(build("bdkd", temperature=3.0, delta=1.0).logit_loss(s, t, None, 3.0, P_LATE), symmetric)


def test_bdkd_weights_are_detached_analytic_gradient():
    # with w fixed: d/dz_s = T^2/N * [w_F (p_s - p_t) + w_R p_s * (r - KL_R)] / T,  r = ln p_s - ln p_t
    T, delta = 2.0, 4.0
    s = torch.tensor([[3.0, 0.0, -1.0], [0.1, 0.0, -0.1], [2.5, -1.0, 0.0], [0.2, 0.1, 0.0]], requires_grad=True)
    t = torch.tensor([[0.5, 0.0, 0.2], [2.0, 0.0, -1.0], [0.0, 0.3, 0.1], [1.5, -1.0, 0.0]], requires_grad=True)
    build("bdkd", temperature=T, delta=delta).logit_loss(s, t, None, T, P_LATE).backward()
    assert t.grad is None
    p_s, p_t = torch.softmax(s.detach() / T, -1), torch.softmax(t.detach() / T, -1)
    h_s, h_t = -(p_s * p_s.log()).sum(-1), -(p_t * p_t.log()).sum(-1)
    assert (h_s < h_t).any() and (h_s > h_t).any()  # both branches are exercised
    w_f = torch.where(h_s < h_t, delta, 1.0).unsqueeze(1)
    w_r = torch.where(h_s > h_t, delta, 1.0).unsqueeze(1)
    r = p_s.log() - p_t.log()
    kl_r = (p_s * r).sum(-1, keepdim=True)
    expected = T**2 / 4 * (w_f * (p_s - p_t) + w_r * p_s * (r - kl_r)) / T
    assert torch.allclose(s.grad, expected, atol=1e-5)


def test_bdkd_gradcheck_with_per_sample_temperature():
    torch.manual_seed(9)
    t = torch.randn(3, 4, dtype=torch.double)
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    T = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.double, requires_grad=True)
    objective = build("bdkd")
    assert torch.autograd.gradcheck(lambda a, b: objective.logit_loss(a, t, None, b, P_LATE), (s, T))


# --------------------------------------------------------------------------------------------- JSD


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_jsd_hand_value_three_classes(beta):
    # p_t = (0.6, 0.3, 0.1), p_s = (1/3, 1/3, 1/3); m = beta p_t + (1 - beta) p_s
    # JSD = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
    p_t, p_s = [0.6, 0.3, 0.1], [1 / 3] * 3
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s, strict=True)]
    expected = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    s, t = torch.zeros(1, 3, dtype=torch.double), torch.tensor([[LN(6), LN(3), 0.0]], dtype=torch.double)
    assert loss_of(build("jsd", beta=beta), s, t).item() == pytest.approx(expected, rel=1e-6)
    # T = 2 with logits doubled: same distributions, x T^2
    value = loss_of(build("jsd", beta=beta, temperature=2.0), s, 2 * t)
    assert value.item() == pytest.approx(4 * expected, rel=1e-6)
    if beta == 0.5:
        # m = (0.46667, 0.31667, 0.21667): KL(p_t||m) = 0.057249, KL(p_s||m) = 0.048535, JSD = 0.052892
        assert expected == pytest.approx(0.052892, abs=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl_and_limits_agree():
    torch.manual_seed(10)
    s, t, T = torch.randn(4, 5, dtype=torch.double), torch.randn(4, 5, dtype=torch.double), 2.0
    forward, reverse = kd_kl_loss(s, t, T), kd_kl_loss(t, s, T)
    assert torch.allclose(build("jsd", beta=0.0, temperature=T).logit_loss(s, t, None, T, P_LATE), forward)
    assert torch.allclose(build("jsd", beta=1.0, temperature=T).logit_loss(s, t, None, T, P_LATE), reverse)
    # GKD: JSD_beta / beta -> KL(p_t||p_s) as beta -> 0, JSD_beta / (1 - beta) -> KL(p_s||p_t) as beta -> 1
    eps = 1e-5
    near0 = build("jsd", beta=eps).logit_loss(s, t, None, T, P_LATE) / eps
    near1 = build("jsd", beta=1 - eps).logit_loss(s, t, None, T, P_LATE) / eps
    assert near0.item() == pytest.approx(forward.item(), rel=1e-3)
    assert near1.item() == pytest.approx(reverse.item(), rel=1e-3)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_gradcheck_and_teacher_detached(beta):
    torch.manual_seed(11)
    t = torch.randn(3, 4, dtype=torch.double)
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    T = torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.double, requires_grad=True)
    objective = build("jsd", beta=beta)
    assert torch.autograd.gradcheck(lambda a, b: objective.logit_loss(a, t, None, b, P_LATE), (s, T))
    t_grad = t.clone().requires_grad_(True)
    objective.logit_loss(s, t_grad, None, 1.0, P_LATE).backward()
    assert t_grad.grad is None


# ----------------------------------------------------------------------------------- Continuation-KD


@pytest.mark.parametrize("step, total, phi, psi", [
    (0, 60, 0.1, 0.0),        # k = 0: phi = 1/10
    (3, 60, 0.1, 0.075),      # f = 0.05: f * 10 / (2/3) = 0.75 -> k = 0
    (6, 60, 0.2, 0.15),       # f = 0.1: 1.5 -> k = 1
    (20, 60, 0.6, 0.5),       # f = 1/3: 5 -> k = 5
    (36, 60, 1.0, 0.9),       # f = 0.6: 9 -> k = 9, the last step: phi = 1
    (39, 60, 1.0, 0.975),     # f = 0.65
    (40, 60, 1.0, 1.0),       # f = 2/3: pure cross-entropy from here on
    (54, 60, 1.0, 1.0),
    (60, 60, 1.0, 1.0),
])
def test_continuation_schedule(step, total, phi, psi):
    objective = build("continuation_kd")
    progress = Progress(step=step, total_steps=total)
    assert objective.phi(progress) == pytest.approx(phi)
    assert objective.psi(progress) == pytest.approx(psi)


def test_continuation_schedule_other_settings():
    # max_t = 4, handover = 1: phi = 0.25, 0.5, 0.75, 1 on quarters of training; psi = f
    objective = build("continuation_kd", max_t=4, handover=1.0)
    steps = (0, 1, 2, 5, 7, 8)
    assert [objective.phi(Progress(step=s, total_steps=8)) for s in steps] == pytest.approx([0.25, 0.25, 0.5, 0.75,
                                                                                              1.0, 1.0])
    assert [objective.psi(Progress(step=s, total_steps=8)) for s in steps] == pytest.approx([0.0, 0.125, 0.25, 0.625,
                                                                                              0.875, 1.0])


def test_continuation_hand_value_with_margin_gate():
    # f = 0.1 -> phi = 0.2, psi = 0.15; margin 0.1 -> threshold margin * phi = 0.02
    # sample 1: z_s = (0.5, 0, 0), phi z_t = (0.4, 0, -0.4): d1 = (0.01 + 0 + 0.16) / 3 = 0.056667 > 0.02 counts
    # sample 2: z_s = (0.1, 0.1, 0.1), phi z_t = (0.2, 0.2, 0.2): d2 = 0.01 <= 0.02 gated out
    # L_KD = (0.056667 + 0) / 2;  CE = (-(0.5 - ln(e^0.5 + 2)) + ln 3) / 2;  L = 0.85 L_KD + 0.15 CE
    s = torch.tensor([[0.5, 0.0, 0.0], [0.1, 0.1, 0.1]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0, -2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    objective = build("continuation_kd", margin=0.1)
    progress = Progress(step=6, total_steps=60)
    kd = (0.17 / 3) / 2
    ce = (-(0.5 - LN(math.exp(0.5) + 2)) + LN(3)) / 2
    value = loss_of(objective, s, t, y, progress)
    assert value.item() == pytest.approx(0.85 * kd + 0.15 * ce, rel=1e-6)
    # gradient: (1 - psi) gate_i 2 (z_s - phi z_t) / (N C) + psi (p - onehot(y)) / N; teacher gets none
    value.backward()
    assert t.grad is None
    p = torch.softmax(s.detach(), -1)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    gate = torch.tensor([[1.0], [0.0]])
    expected = 0.85 * gate * 2 * (s.detach() - 0.2 * t.detach()) / 6 + 0.15 * (p - onehot) / 2
    assert torch.allclose(s.grad, expected, atol=1e-6)
    # without a margin both samples count
    no_gate = loss_of(build("continuation_kd"), s.detach(), t.detach(), y, progress)
    assert no_gate.item() == pytest.approx(0.85 * (0.17 / 3 + 0.01) / 2 + 0.15 * ce, rel=1e-6)


def test_continuation_is_cross_entropy_after_handover_and_gradcheck():
    torch.manual_seed(12)
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    t, y = torch.randn(3, 4, dtype=torch.double), torch.tensor([3, 0, 1])
    objective = build("continuation_kd", margin=0.05)
    late = Progress(step=9, total_steps=10)
    assert torch.allclose(objective.logit_loss(s, t, y, 1.0, late), torch.nn.functional.cross_entropy(s, y))
    mid = Progress(step=3, total_steps=10)
    assert torch.autograd.gradcheck(lambda a: objective.logit_loss(a, t, y, 1.0, mid), (s,))
    with pytest.raises(KDForgeError, match="no temperature"):
        objective.logit_loss(s, t, y, torch.ones(3, 1), mid)


# ------------------------------------------------------------------------------------ shared checks


@pytest.mark.parametrize("name", ["dkd", "nkd", "tf_nkd", "bdkd", "jsd", "continuation_kd"])
def test_terms_refuse_regression_outputs_and_missing_inputs(name):
    objective = build(name)
    with pytest.raises(KDForgeError, match="logit_mse"):
        loss_of(objective, torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2))
    if name in ("dkd", "nkd", "tf_nkd", "continuation_kd"):
        with pytest.raises(KDForgeError, match="labels"):
            loss_of(objective, torch.zeros(2, 3), torch.zeros(2, 3))
    if name != "tf_nkd":
        with pytest.raises(KDForgeError, match="teacher"):
            loss_of(objective, torch.zeros(2, 3), None, torch.tensor([0, 1]))


@pytest.mark.parametrize("name, params, key", [
    ("dkd", {"beta": -1.0}, "beta"),
    ("dkd", {"temperature": 0}, "temperature"),
    ("dkd", {"warmup": -2}, "warmup"),
    ("dkd", {"gamma": 1.0}, "gamma.*does not exist"),
    ("nkd", {"gamma": 0}, "gamma"),
    ("nkd", {"alpha": 1.0}, "alpha.*does not exist"),
    ("tf_nkd", {"power": -1}, "power"),
    ("tf_nkd", {"temperature": 2.0}, "temperature.*does not exist"),
    ("bdkd", {"delta": 0}, "delta"),
    ("jsd", {"beta": 1.5}, "beta"),
    ("jsd", {"beta": -0.1}, "beta"),
    ("continuation_kd", {"handover": 0}, "handover"),
    ("continuation_kd", {"handover": 1.2}, "handover"),
    ("continuation_kd", {"max_t": 0}, "max_t"),
    ("continuation_kd", {"margin": -0.1}, "margin"),
])
def test_bad_params_are_one_line_errors(name, params, key):
    with pytest.raises(KDForgeError, match=key) as err:
        build(name, **params)
    assert "\n" not in str(err.value)


def test_defaults_follow_the_papers():
    assert build("dkd").params.model_dump() == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20.0}
    assert build("nkd").params.model_dump() == {"temperature": 1.0, "gamma": 1.5}
    assert build("tf_nkd").params.model_dump() == {"power": 2.0}
    assert build("jsd").params.model_dump() == {"beta": 0.5, "temperature": 1.0}
    assert build("continuation_kd").params.max_t == 10
    assert build("continuation_kd").params.handover == pytest.approx(2 / 3)
