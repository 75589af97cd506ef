"""CA-MKD (Zhang, Chen & Wang, ICASSP 2022) and the averaging baseline: weights, losses and gradients
checked against values computed by hand / with numpy from the formulas."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.vision_nets import build_vision_net
from kdforge.objectives.camkd import (
    DEFAULT_TEMPERATURE,
    DEFAULT_WEIGHTS,
    CAMKDLoss,
    average_kd,
    camkd_kd,
    camkd_teacher_weights,
    feature_site,
    feature_term_active,
)
from kdforge.objectives.logit import kd_kl_loss

BN_EPS = 1e-5


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_weights(ce: np.ndarray) -> np.ndarray:
    """(1 - softmax over teachers) / (K - 1) of a (K, N) array."""
    e = np.exp(ce - ce.max(0, keepdims=True))
    return (1 - e / e.sum(0, keepdims=True)) / (ce.shape[0] - 1)


def np_kl(zs: np.ndarray, zt: np.ndarray, t: float) -> np.ndarray:
    ls, lt = np_log_softmax(zs / t), np_log_softmax(zt / t)
    return (np.exp(lt) * (lt - ls)).sum(-1) * t * t


def test_defaults_are_the_official_ones():
    assert DEFAULT_TEMPERATURE == 4.0
    assert DEFAULT_WEIGHTS == {"ce": 1.0, "kd": 1.0, "feature": 50.0}
    assert not feature_term_active(1) and feature_term_active(2) and feature_term_active(240)


def test_teacher_weights_on_hand_computed_values():
    # 3 teachers, 2 samples, 3 classes; labels 0 and 2
    logits = [[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
              [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
              [[0.0, 3.0, 0.0], [0.0, 0.0, 4.0]]]
    labels = [0, 2]
    ce = [[math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(teacher, labels, strict=True)]
          for teacher in logits]
    assert ce[1][0] == pytest.approx(math.log(3))  # uniform teacher: CE = log C
    k = 3
    expected = [[0.0] * 2 for _ in range(k)]
    for n in range(2):
        denom = sum(math.exp(ce[j][n]) for j in range(k))
        for j in range(k):
            expected[j][n] = (1 - math.exp(ce[j][n]) / denom) / (k - 1)
    w = camkd_teacher_weights([torch.tensor(t, requires_grad=True) for t in logits], torch.tensor(labels))
    assert w.shape == (3, 2) and not w.requires_grad
    assert torch.allclose(w, torch.tensor(expected, dtype=w.dtype), atol=1e-6)
    assert torch.allclose(w.sum(0), torch.ones(2))  # each sample's weights sum to 1
    # the most confident-and-right teacher gets the most weight: sample 0 -> teacher 0, sample 1 -> teacher 2
    assert w[:, 0].argmax() == 0 and w[:, 1].argmax() == 2
    assert w[2, 0] == w[:, 0].min()  # teacher 2 is confidently wrong on sample 0


def test_two_teachers_weight_is_a_sigmoid_of_the_ce_gap():
    torch.manual_seed(0)
    z1, z2, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    w = camkd_teacher_weights([z1, z2], y)
    ce1 = np_ce(z1.numpy(), y.numpy())
    ce2 = np_ce(z2.numpy(), y.numpy())
    assert np.allclose(w[0].numpy(), 1 / (1 + np.exp(ce1 - ce2)), atol=1e-6)  # K = 2: w_1 = softmax_2(CE)
    assert np.allclose(w[1].numpy(), 1 / (1 + np.exp(ce2 - ce1)), atol=1e-6)


def test_kd_term_matches_numpy_and_the_official_reduction():
    torch.manual_seed(1)
    n, c, t = 6, 5, 4.0
    zs = torch.randn(n, c) * 2
    zts = [torch.randn(n, c) * 3 for _ in range(3)]
    y = torch.randint(0, c, (n,))
    loss, w = camkd_kd(zs, zts, y, t)
    kl = np.stack([np_kl(zs.numpy(), z.numpy(), t) for z in zts])  # (K, N)
    ww = np_weights(np.stack([np_ce(z.numpy(), y.numpy()) for z in zts]))
    assert np.allclose(w.numpy(), ww, atol=1e-6)
    assert loss.item() == pytest.approx((ww * kl).sum() / (n * 3), rel=1e-5)  # sum over (K, N) / (N K)


def test_equal_teachers_give_equal_weights_and_one_kth_of_the_average():
    torch.manual_seed(2)
    zs, zt, y = torch.randn(4, 3), torch.randn(4, 3), torch.randint(0, 3, (4,))
    loss, w = camkd_kd(zs, [zt, zt, zt], y, 4.0)
    assert torch.allclose(w, torch.full((3, 4), 1 / 3))
    # the official /(N K) reduction: with weights 1/K the weighted KD is the average baseline / K
    assert loss.item() == pytest.approx(average_kd(zs, [zt, zt, zt], 4.0).item() / 3, rel=1e-5)


def test_average_kd_is_the_mean_of_per_teacher_hinton_kd():
    torch.manual_seed(3)
    zs = torch.randn(7, 4)
    zts = [torch.randn(7, 4) for _ in range(3)]
    avg = average_kd(zs, zts, 2.0)
    assert avg.item() == pytest.approx(sum(kd_kl_loss(zs, z, 2.0).item() for z in zts) / 3, rel=1e-5)
    by_hand = np.mean([np_kl(zs.numpy(), z.numpy(), 2.0).mean() for z in zts])
    assert avg.item() == pytest.approx(by_hand, rel=1e-5)
    assert average_kd(zs, zts[:1], 2.0).item() == pytest.approx(kd_kl_loss(zs, zts[0], 2.0).item(), rel=1e-6)


def identity_loss(dim: int, teachers: int, relu: bool = True) -> CAMKDLoss:
    loss = CAMKDLoss(dim, [dim] * teachers, relu=relu)
    with torch.no_grad():
        for emb in loss.embeddings:
            emb.conv.weight.copy_(torch.eye(dim)[:, :, None, None])
            emb.conv.bias.zero_()
    return loss


def linear_head(weight, bias) -> nn.Linear:
    head = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
        head.bias.copy_(torch.tensor(bias))
    return head.requires_grad_(False)


def test_feature_term_with_identity_embeddings_by_hand():
    """Eval mode: BN uses running stats (0, 1), so e = relu(f_s / sqrt(1 + eps))."""
    fs = [[1.0, -2.0], [0.5, 3.0]]
    ft = [[[1.0, 0.0], [0.0, 2.0]], [[2.0, 1.0], [1.0, 1.0]]]
    heads_w = [([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]), ([[0.0, 2.0], [1.0, -1.0]], [0.5, 0.0])]
    y = [0, 1]
    loss = identity_loss(2, 2).eval()
    zs = torch.zeros(2, 2)
    out = loss(zs, torch.tensor(fs), [torch.zeros(2, 2)] * 2, [torch.tensor(f) for f in ft],
               [linear_head(w, b) for w, b in heads_w], torch.tensor(y), with_feature_term=True)
    scale = 1 / math.sqrt(1 + BN_EPS)
    e = [[max(0.0, v * scale) for v in row] for row in fs]  # identical for both teachers
    ce = []
    for w, b in heads_w:
        row = []
        for n in range(2):
            z = [sum(w[c][d] * e[n][d] for d in range(2)) + b[c] for c in range(2)]
            row.append(math.log(sum(math.exp(v) for v in z)) - z[y[n]])
        ce.append(row)
    v = [[(1 - math.exp(ce[k][n]) / (math.exp(ce[0][n]) + math.exp(ce[1][n]))) / 1 for n in range(2)] for k in range(2)]
    mse = [[sum((e[n][d] - ft[k][n][d]) ** 2 for d in range(2)) / 2 for n in range(2)] for k in range(2)]
    expected = sum(v[k][n] * mse[k][n] for k in range(2) for n in range(2)) / (2 * 2)
    assert out["feature"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(out["feature_weights"], torch.tensor(v), atol=1e-6)
    assert out["kd_weights"].shape == (2, 2)


def test_feature_term_train_mode_uses_batch_statistics():
    torch.manual_seed(4)
    fs, ft = torch.randn(5, 3), [torch.randn(5, 3) for _ in range(3)]
    heads = [linear_head(torch.randn(4, 3).tolist(), torch.randn(4).tolist()) for _ in range(3)]
    y = torch.randint(0, 4, (5,))
    out = identity_loss(3, 3).train()(torch.randn(5, 4), fs, [torch.randn(5, 4) for _ in range(3)], ft, heads, y,
                                      with_feature_term=True)
    x = fs.numpy()
    e = np.maximum(0, (x - x.mean(0)) / np.sqrt(x.var(0) + BN_EPS))  # biased variance, as BatchNorm normalises
    logits = [e @ h.weight.numpy().T + h.bias.numpy() for h in heads]
    v = np_weights(np.stack([np_ce(z, y.numpy()) for z in logits]))
    mse = np.stack([((e - f.numpy()) ** 2).mean(-1) for f in ft])
    assert out["feature"].item() == pytest.approx((v * mse).sum() / (5 * 3), rel=1e-4)


def test_spatial_maps_are_pooled_to_the_teachers_size():
    fs = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    ft = [torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 4, 4)]
    loss = identity_loss(1, 2, relu=False).eval()
    emb = loss.embed(fs, ft)
    scale = 1 / math.sqrt(1 + BN_EPS)
    pooled = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]], [[[18.5, 20.5], [26.5, 28.5]]]])  # 2x2 means by hand
    assert torch.allclose(emb[0], pooled * scale, atol=1e-5)
    assert torch.allclose(emb[1], fs * scale, atol=1e-5)
    small = loss.embed(torch.ones(2, 1, 2, 2) * 3, [torch.zeros(2, 1, 4, 4)] * 2)  # smaller: interpolated up
    assert small[0].shape == (2, 1, 4, 4) and torch.allclose(small[0], torch.full((2, 1, 4, 4), 3 * scale))
    # the per-sample MSE averages over C*H*W: all-zero teacher maps -> mean of squares of the embedded map
    heads = [lambda m: m.mean((2, 3)).repeat(1, 2)] * 2
    out = loss(torch.zeros(2, 2), fs, [torch.zeros(2, 2)] * 2, ft, heads, torch.tensor([0, 1]), with_feature_term=True)
    mse = torch.stack([e.pow(2).reshape(2, -1).mean(-1) for e in emb])
    assert torch.allclose(out["feature_weights"], torch.full((2, 2), 0.5))  # both logits equal: CE = log 2
    assert out["feature"].item() == pytest.approx((0.5 * mse).sum().item() / 4, rel=1e-5)


def test_gradients_reach_student_and_embeddings_but_not_teachers():
    torch.manual_seed(5)
    n, c, d_s, d_t = 4, 3, 5, 6
    zs = torch.randn(n, c, requires_grad=True)
    fs = torch.randn(n, d_s, requires_grad=True)
    zts = [torch.randn(n, c, requires_grad=True) for _ in range(2)]
    fts = [torch.randn(n, d_t, requires_grad=True) for _ in range(2)]
    heads = [nn.Linear(d_t, c).requires_grad_(False) for _ in range(2)]
    y = torch.randint(0, c, (n,))
    loss = CAMKDLoss(d_s, [d_t, d_t])
    out = loss(zs, fs, zts, fts, heads, y, with_feature_term=True)
    (out["kd"] + 50 * out["feature"]).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    for emb in loss.embeddings:
        assert emb.conv.weight.grad is not None and emb.conv.weight.grad.abs().sum() > 0
    assert all(t.grad is None for t in zts + fts)
    assert all(p.grad is None for h in heads for p in h.parameters())


def test_feature_weights_carry_gradient_unless_detached():
    torch.manual_seed(6)
    args = (torch.randn(4, 3), torch.randn(4, 5), [torch.randn(4, 3)] * 2, [torch.randn(4, 6) for _ in range(2)],
            [nn.Linear(6, 3).requires_grad_(False) for _ in range(2)], torch.randint(0, 3, (4,)))
    grads = []
    for detach in (False, True):
        torch.manual_seed(7)
        loss = CAMKDLoss(5, [6, 6], detach_feature_weights=detach)
        loss(*args, with_feature_term=True)["feature"].backward()
        grads.append(loss.embeddings[0].conv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])  # official: the weights' own gradient is part of it


def test_first_epoch_term_is_zero_and_needs_no_features():
    torch.manual_seed(8)
    zs = torch.randn(3, 4, requires_grad=True)
    loss = CAMKDLoss(2, [2, 2])
    out = loss(zs, None, [torch.randn(3, 4), torch.randn(3, 4)], None, None, torch.tensor([0, 1, 2]),
               with_feature_term=False)
    assert out["feature"].item() == 0.0 and "feature_weights" not in out
    (out["kd"] + out["feature"]).backward()
    assert all(p.grad is None for p in loss.parameters())


def test_bad_inputs_are_one_line_errors():
    y = torch.tensor([0, 1])
    with pytest.raises(KDForgeError, match="at least 2 teachers"):
        CAMKDLoss(4, [4])
    with pytest.raises(KDForgeError, match="at least 2 teachers"):
        camkd_teacher_weights([torch.randn(2, 3)], y)
    with pytest.raises(KDForgeError, match="classification"):
        camkd_teacher_weights([torch.randn(2, 1), torch.randn(2, 1)], y)
    with pytest.raises(KDForgeError, match="label space"):
        camkd_kd(torch.randn(2, 4), [torch.randn(2, 3), torch.randn(2, 3)], y)
    loss = CAMKDLoss(4, [4, 8])
    zt = [torch.randn(2, 3), torch.randn(2, 3)]
    heads = [nn.Linear(4, 3), nn.Linear(8, 3)]
    with pytest.raises(KDForgeError, match=r"teacher 1's feature"):
        loss(torch.randn(2, 3), torch.randn(2, 4), zt, [torch.randn(2, 4), torch.randn(2, 4)], heads, y,
             with_feature_term=True)
    with pytest.raises(KDForgeError, match="one feature and one head per teacher"):
        loss(torch.randn(2, 3), torch.randn(2, 4), zt, [torch.randn(2, 4)], heads[:1], y, with_feature_term=True)


@pytest.mark.parametrize("spatial", [False, True])
def test_end_to_end_step_with_cifar_nets(spatial):
    """Two frozen small_cnn teachers and a small_cnn student on 8x8 inputs: one CA-MKD step."""
    torch.manual_seed(9)
    teachers = [build_vision_net("small_cnn", 3, in_channels=1).eval().requires_grad_(False) for _ in range(2)]
    student = build_vision_net("small_cnn", 3, in_channels=1).train()
    sites = [feature_site(m, spatial=spatial) for m in [student, *teachers]]
    assert [s[0] for s in sites] == ["pool" if spatial else "fc"] * 3
    adapters = [ModelAdapter(m, input_paths=[path]) for m, (path, _) in zip([student, *teachers], sites, strict=True)]
    batch = {"pixel_values": torch.randn(6, 1, 8, 8), "labels": torch.randint(0, 3, (6,))}
    s_out = adapters[0](batch)
    with torch.no_grad():
        t_outs = [a(batch) for a in adapters[1:]]
    key = "input:" + sites[0][0]
    dim = s_out.features[key].shape[1]
    loss = CAMKDLoss(dim, [t.features[key].shape[1] for t in t_outs])
    out = loss(s_out.logits, s_out.features[key], [t.logits for t in t_outs], [t.features[key] for t in t_outs],
               [head for _, head in sites[1:]], batch["labels"], with_feature_term=True)
    total = nn.functional.cross_entropy(s_out.logits, batch["labels"]) + out["kd"] + 50 * out["feature"]
    total.backward()
    assert out["feature"].item() > 0 and torch.isfinite(total)
    assert student.stem[0].weight.grad is not None and student.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for t in teachers for p in t.parameters())
    # the teacher head applied to the teacher's own feature reproduces its logits
    assert torch.allclose(sites[1][1](t_outs[0].features[key]), t_outs[0].logits, atol=1e-5)
