"""CES-KD (Amara et al., ICPR 2022): difficulty, the expert-assignment curriculum and the per-sample KD term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import KDForgeError
from kdforge.objectives.logit import kd_kl_loss
from kdforge.recipes.ces_kd import assign_experts, per_sample_kd, per_sample_kd_terms, sample_difficulty

# Ten samples; their difficulty ranks (0 = easiest) are [4, 0, 8, 2, 6, 1, 9, 3, 7, 5].
DIFFICULTY = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 1.0, 0.4, 0.8, 0.6])
RANK = [4, 0, 8, 2, 6, 1, 9, 3, 7, 5]


def _by_rank(expert_of_rank: list[int]) -> list[int]:
    return [expert_of_rank[r] for r in RANK]


# level = 3 * rank / 10 + (2p - 1) * 2, expert = clip(floor(level), 0, 2), worked out per rank 0..9:
@pytest.mark.parametrize("progress, expert_of_rank", [
    (0.0, [0] * 10),                                # levels -2.0 .. 0.7
    (0.25, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]),         # levels -1.0 .. 1.7: ranks 7, 8, 9 reach 1.1, 1.4, 1.7
    (0.5, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]),          # levels 0.0 .. 2.7: three equal-ish strata
    (0.75, [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]),         # levels 1.0 .. 3.7
    (1.0, [2] * 10),                                # levels 2.0 .. 4.7
])
def test_assignment_schedule_on_hand_computed_values(progress, expert_of_rank):
    got = assign_experts(DIFFICULTY, 3, progress)
    assert got.dtype == torch.long
    assert got.tolist() == _by_rank(expert_of_rank)


def test_two_experts_split_at_the_median_halfway():
    assert assign_experts(DIFFICULTY, 2, 0.5).tolist() == _by_rank([0] * 5 + [1] * 5)
    assert assign_experts(DIFFICULTY, 1, 0.3).tolist() == [0] * 10


def test_harder_samples_never_get_a_smaller_expert_and_experts_only_grow_with_progress():
    d = torch.rand(500, generator=torch.Generator().manual_seed(0)).pow(3)
    order = torch.argsort(d)
    previous = torch.zeros(500, dtype=torch.long)
    for p in torch.linspace(0, 1, 21).tolist():
        a = assign_experts(d, 4, p)
        assert (a[order].diff() >= 0).all(), p  # sorted by difficulty, the expert index never decreases
        assert (a >= previous).all(), p          # a sample's expert never shrinks as training goes on
        previous = a
    assert assign_experts(d, 4, 0.5).bincount(minlength=4).tolist() == [125, 125, 125, 125]


def test_equal_difficulties_share_an_expert():
    d = torch.tensor([0.3, 0.3, 0.3, 0.9, 0.1, 0.3])
    for p in (0.2, 0.5, 0.8):
        a = assign_experts(d, 3, p)
        assert len(set(a[d == 0.3].tolist())) == 1


def test_a_batch_ranked_against_the_training_split_gets_its_full_split_experts():
    d = torch.rand(200, generator=torch.Generator().manual_seed(1))
    batch = torch.tensor([3, 17, 40, 41, 199])
    for p in (0.1, 0.5, 0.9):
        full = assign_experts(d, 3, p)
        assert assign_experts(d[batch], 3, p, reference=d).tolist() == full[batch].tolist()


@pytest.mark.parametrize("n_experts, progress, message", [(0, 0.5, "at least one expert"),
                                                          (3, 1.5, r"\[0, 1\]"),
                                                          (3, float("nan"), r"\[0, 1\]")])
def test_bad_schedule_inputs_are_one_line_errors(n_experts, progress, message):
    with pytest.raises(KDForgeError, match=message):
        assign_experts(DIFFICULTY, n_experts, progress)


def test_difficulty_is_the_teachers_cross_entropy_with_the_gold_label():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    d = sample_difficulty(logits, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(d, torch.tensor([math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(2))]))
    with pytest.raises(KDForgeError, match=r"\[0, 2\)"):
        sample_difficulty(logits, torch.tensor([0, 2, 0]))
    with pytest.raises(KDForgeError, match="classification"):
        sample_difficulty(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def _kl_by_hand(teacher_row: torch.Tensor, student_row: torch.Tensor, t: float) -> torch.Tensor:
    q = torch.exp(teacher_row / t) / torch.exp(teacher_row / t).sum()
    p = torch.exp(student_row / t) / torch.exp(student_row / t).sum()
    return t**2 * (q * torch.log(q / p)).sum()


def test_per_sample_kd_equals_the_hand_assembled_per_sample_hinton_terms():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    experts = [torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assignment = torch.tensor([2, 0, 1, 1, 0])
    t = 4.0
    rows = [_kl_by_hand(experts[int(a)][i], student[i], t) for i, a in enumerate(assignment)]
    torch.testing.assert_close(per_sample_kd_terms(student, experts, assignment, t), torch.stack(rows))
    loss = per_sample_kd(student, experts, assignment, t)
    torch.testing.assert_close(loss, torch.stack(rows).mean())
    # the same number as kdforge's Hinton KD with each sample's own expert as the teacher
    gathered = torch.stack([experts[int(a)][i] for i, a in enumerate(assignment)])
    torch.testing.assert_close(loss, kd_kl_loss(student, gathered, t))
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(e.grad is None for e in experts)


def test_per_sample_kd_with_one_expert_is_plain_hinton_kd():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    loss = per_sample_kd(student, [teacher], torch.zeros(8, dtype=torch.long), 2.0)
    by_hand = 4.0 * F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1),
                             reduction="batchmean", log_target=True)
    torch.testing.assert_close(loss, by_hand)


def test_bad_assignments_are_one_line_errors():
    student, experts = torch.zeros(4, 3), [torch.zeros(4, 3), torch.zeros(4, 3)]
    with pytest.raises(KDForgeError, match="out of range"):
        per_sample_kd(student, experts, torch.tensor([0, 1, 2, 0]), 1.0)
    with pytest.raises(KDForgeError, match="batch of 4"):
        per_sample_kd(student, experts, torch.tensor([0, 1]), 1.0)
    with pytest.raises(KDForgeError, match="shape"):
        per_sample_kd(student, [torch.zeros(4, 5)], torch.zeros(4, dtype=torch.long), 1.0)
