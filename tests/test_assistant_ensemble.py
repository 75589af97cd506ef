"""Weighted ensemble of teacher assistants (Ganta, Das Gupta & Sheng): ensemble math and DE weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import KDForgeError
from kdforge.objectives.logit import kd_kl_loss
from kdforge.recipes.assistant_ensemble import (
    accuracy_score,
    ensemble_logits,
    ensemble_probs,
    ensemble_score,
    fit_ensemble_weights,
    normalise_weights,
)


def _members(n: int = 6, c: int = 4, k: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g, dtype=torch.float64) * 3 for _ in range(k)]


def test_ensemble_probs_is_the_weighted_sum_of_softened_member_probabilities():
    z = _members()
    w, t = [0.5, 0.3, 0.2], 4.0
    by_hand = sum(wk * torch.exp(zk / t) / torch.exp(zk / t).sum(-1, keepdim=True) for wk, zk in zip(w, z, strict=True))
    p = ensemble_probs(z, w, t)
    torch.testing.assert_close(p, by_hand)
    torch.testing.assert_close(p.sum(-1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_ensemble_logits_softmax_at_the_same_temperature_is_exactly_the_ensemble(temperature):
    z = _members()
    w = torch.tensor([0.6, 0.0, 0.4], dtype=torch.float64)  # a zero weight: log 0 must not leak a NaN / inf
    logits = ensemble_logits(z, w, temperature)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(F.softmax(logits / temperature, dim=-1), ensemble_probs(z, w, temperature))


def test_hinton_kd_reading_the_ensemble_logits_is_the_kl_to_the_ensemble():
    z, w, t = _members(), [0.2, 0.5, 0.3], 4.0
    student = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    loss = kd_kl_loss(student, ensemble_logits(z, w, t), t)
    p = ensemble_probs(z, w, t)
    q = F.softmax(student / t, dim=-1)
    by_hand = t**2 * (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss, by_hand)


def test_ensemble_logits_stay_finite_when_member_probabilities_underflow():
    z = [torch.tensor([[1000.0, 0.0, -1000.0]]), torch.tensor([[-1000.0, 0.0, 1000.0]])]
    logits = ensemble_logits(z, [0.5, 0.5], 1.0)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(F.softmax(logits, -1), torch.tensor([[0.5, 0.0, 0.5]]))


@pytest.mark.parametrize("weights, message", [([0.5, 0.5], "one weight per assistant"),
                                              ([0.7, 0.7, -0.4], ">= 0"),
                                              ([0.5, 0.3, 0.1], "sum to 1")])
def test_bad_weights_are_one_line_errors(weights, message):
    with pytest.raises(KDForgeError, match=message):
        ensemble_probs(_members(), weights, 2.0)


def test_members_of_different_shapes_are_rejected():
    with pytest.raises(KDForgeError, match="same examples"):
        ensemble_probs([torch.zeros(3, 4), torch.zeros(3, 5)], [0.5, 0.5], 1.0)


def test_normalise_weights_maps_to_the_simplex_and_all_zero_to_uniform():
    np.testing.assert_allclose(normalise_weights(np.array([0.2, 0.6, 0.2])), [0.2, 0.6, 0.2])
    np.testing.assert_allclose(normalise_weights(np.array([1.0, 3.0])), [0.25, 0.75])
    np.testing.assert_allclose(normalise_weights(np.zeros(4)), [0.25] * 4)


def _good_and_noise(n: int = 400, c: int = 5, seed: int = 0):
    """A good assistant (right on ~85% of examples, soft) and a confident noise assistant (random class)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    wrong = rng.random(n) < 0.15
    good_pred = np.where(wrong, (y + rng.integers(1, c, n)) % c, y)
    good = 3.0 * np.eye(c)[good_pred] + rng.normal(0, 0.5, (n, c))
    noise = 8.0 * np.eye(c)[rng.integers(0, c, n)] + rng.normal(0, 0.5, (n, c))
    return [good, noise], y


def test_de_weights_beat_uniform_and_match_the_best_single_assistant():
    logits, y = _good_and_noise()
    w = fit_ensemble_weights(logits, y, seed=0)
    assert w.shape == (2,) and (w >= 0).all() and np.isclose(w.sum(), 1.0)
    de = ensemble_score(logits, y, w)
    uniform = ensemble_score(logits, y, [0.5, 0.5])
    singles = [accuracy_score(torch.softmax(torch.as_tensor(z), -1).numpy(), y) for z in logits]
    assert singles[0] > 0.8 and uniform < 0.5  # the construction: averaging in the noise hurts
    assert de > uniform
    assert de >= max(singles)
    assert w[0] > w[1]


def test_de_weights_improve_a_three_assistant_ensemble_over_uniform():
    logits, y = _good_and_noise(seed=3)
    rng = np.random.default_rng(7)
    middling = 1.0 * np.eye(5)[np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, 5, len(y)))]
    logits = [logits[0], middling, logits[1]]
    w = fit_ensemble_weights(logits, torch.as_tensor(y), seed=1)
    assert (w >= 0).all() and np.isclose(w.sum(), 1.0)
    de = ensemble_score(logits, y, w)
    assert de > ensemble_score(logits, y, np.full(3, 1 / 3))
    for k in range(3):
        assert de >= ensemble_score(logits, y, np.eye(3)[k])


def test_de_weights_are_deterministic_for_a_seed():
    logits, y = _good_and_noise(seed=5)
    logits = [logits[0], logits[1], logits[0] + np.random.default_rng(1).normal(0, 2.0, logits[0].shape)]
    a = fit_ensemble_weights(logits, y, seed=11, temperature=2.0)
    b = fit_ensemble_weights([torch.as_tensor(z) for z in logits], y, seed=11, temperature=2.0)
    np.testing.assert_array_equal(a, b)


def test_a_custom_score_is_maximised_on_the_ensemble_probabilities():
    logits, y = _good_and_noise(seed=2)
    seen = []

    def mean_true_class_probability(probs: np.ndarray, labels: np.ndarray) -> float:
        seen.append(probs.shape)
        np.testing.assert_allclose(probs.sum(-1), 1.0)
        return float(probs[np.arange(len(labels)), labels].mean())

    w = fit_ensemble_weights(logits, y, score=mean_true_class_probability, temperature=2.0, seed=0, maxiter=20)
    assert seen and all(shape == (len(y), 5) for shape in seen)
    # mean p[y] is linear in w, so its maximum is the better vertex: the good assistant alone
    best = ensemble_score(logits, y, w, score=mean_true_class_probability, temperature=2.0)
    for k in range(2):
        assert best >= ensemble_score(logits, y, np.eye(2)[k], score=mean_true_class_probability, temperature=2.0)
    assert w[0] > 0.95


def test_one_assistant_gets_all_the_weight():
    logits, y = _good_and_noise()
    np.testing.assert_array_equal(fit_ensemble_weights(logits[:1], y), [1.0])


def test_labels_that_do_not_match_the_predictions_are_rejected():
    logits, y = _good_and_noise()
    with pytest.raises(KDForgeError, match="validation labels"):
        fit_ensemble_weights(logits, y[:-1])
    with pytest.raises(KDForgeError, match=r"\[0, 5\)"):
        fit_ensemble_weights(logits, y + 5)


def test_de_finds_interior_weights_that_no_vertex_or_uniform_reaches():
    """Two classes, label 0 always; p_k = each assistant's probability of it. The mix w p_1 + (1 - w) p_2
    is right iff w (p_1 - p_2) > 1/2 - p_2: with p_1 = 0.9 an example is right iff w > (0.5 - p_2) / (0.9 - p_2),
    with p_1 = 0.1 iff w < (p_2 - 0.5) / (p_2 - 0.1). Thresholds w > 0.1, 0.2, 0.25 and w < 0.45, 0.35, 0.3
    (20 examples each): accuracy 1 only for w in (0.25, 0.3); 1/2 at both vertices and at the uniform weights."""
    lower, upper = (0.1, 0.2, 0.25), (0.45, 0.35, 0.3)
    pairs = [(0.9, (0.5 - 0.9 * a) / (1 - a)) for a in lower] + [(0.1, (0.5 - 0.1 * b) / (1 - b)) for b in upper]
    p = np.repeat(np.array(pairs), 20, axis=0)  # (120, 2): (p_1, p_2) per example
    logits = [np.log(np.stack([p[:, k], 1 - p[:, k]], axis=1)) for k in range(2)]
    y = np.zeros(len(p), dtype=np.int64)
    for w_vertex in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]):
        assert ensemble_score(logits, y, w_vertex) == pytest.approx(0.5)
    w = fit_ensemble_weights(logits, y, seed=0)
    assert 0.25 < w[0] < 0.3 and ensemble_score(logits, y, w) == 1.0
