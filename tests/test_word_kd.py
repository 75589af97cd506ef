"""GLMD word-prediction distillation (`word_kd`): hand-derived values, gradients, masking, vocabulary restriction."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress, build_objective
from kdforge.objectives.composite import WeightedLoss
from kdforge.objectives.word_kd import WordKD, word_kd_loss

P0 = Progress(step=0, total_steps=10)
LN2, LN3 = math.log(2.0), math.log(3.0)


def softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def reference(student, teacher, mask, temperature, reduction="tokens"):
    """Plain-Python GLMD loss on nested lists: T^2 KL(p_t || p_s) summed over counted positions, divided by
    their number (tokens) or by N * L (positions)."""
    total, counted = 0.0, 0
    for s_seq, t_seq, m_seq in zip(student, teacher, mask, strict=True):
        for s, t, m in zip(s_seq, t_seq, m_seq, strict=True):
            if m:
                p_t = softmax([v / temperature for v in t])
                p_s = softmax([v / temperature for v in s])
                total += temperature**2 * kl(p_t, p_s)
                counted += 1
    n_positions = sum(len(seq) for seq in mask)
    return total / (counted if reduction == "tokens" else n_positions)


def hand_example(T):
    """One sequence: two real positions over a 3-word vocabulary, then one padding position.

    position 1: z_t / T = (ln 2, 0, 0) -> p_t = (1/2, 1/4, 1/4); z_s = 0 -> p_s = (1/3, 1/3, 1/3)
                KL1 = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 0.0588915...
    position 2: z_t / T = (0, ln 3, 0) -> p_t = (1/5, 3/5, 1/5); z_s / T = (ln 2, ln 2, 0) -> p_s = (2/5, 2/5, 1/5)
                KL2 = 1/5 ln(1/2) + 3/5 ln(3/2) + 1/5 ln 1 = 0.1046496...
    position 3: padding, with logits that would dominate the loss if they counted.
    """
    teacher = torch.tensor([[[T * LN2, 0.0, 0.0], [0.0, T * LN3, 0.0], [9.0, -7.0, 3.0]]], dtype=torch.double)
    student = torch.tensor([[[0.0, 0.0, 0.0], [T * LN2, T * LN2, 0.0], [-8.0, 6.0, 0.0]]], dtype=torch.double)
    mask = torch.tensor([[1, 1, 0]])
    kl1 = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    kl2 = -0.2 * LN2 + 0.6 * math.log(1.5)
    return student, teacher, mask, kl1, kl2


def test_word_kd_matches_hand_derived_value_and_ignores_padding():
    T = 2.0
    student, teacher, mask, kl1, kl2 = hand_example(T)
    assert kl1 == pytest.approx(0.0588915, abs=1e-7) and kl2 == pytest.approx(0.1046496, abs=1e-7)
    # mean over the two real positions, times T^2 = 4: 4 * (0.0588915 + 0.1046496) / 2 = 0.3270823
    objective = build_objective(ObjectiveConfig(name="word_kd", temperature=T))
    value = objective(Outputs(student), Outputs(teacher), {"attention_mask": mask}, P0)
    assert value.item() == pytest.approx(T**2 * (kl1 + kl2) / 2, rel=1e-6)
    assert value.item() == pytest.approx(0.3270823, abs=1e-6)
    # the official code's reduction divides by all N * L = 3 positions, padding counting as zero
    positions = build_objective(ObjectiveConfig(name="word_kd", temperature=T, reduction="positions"))
    value = positions(Outputs(student), Outputs(teacher), {"attention_mask": mask}, P0)
    assert value.item() == pytest.approx(T**2 * (kl1 + kl2) / 3, rel=1e-6)


def test_without_attention_mask_every_position_counts():
    T = 2.0
    student, teacher, mask, *_ = hand_example(T)
    objective = build_objective(ObjectiveConfig(name="word_kd", temperature=T))
    value = objective(Outputs(student), Outputs(teacher), {}, P0)
    expected = reference(student.tolist(), teacher.tolist(), [[1, 1, 1]], T)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert value.item() > 1.0  # the "padding" position's large KL now counts


def test_token_mean_over_a_ragged_batch_and_t_squared_scaling():
    # sequence 1 has one real position, sequence 2 three: the mean is over the 4 positions, not per sequence
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g) * 2
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    for T in (1.0, 4.0, 15.0):
        expected = reference(student.tolist(), teacher.tolist(), mask.tolist(), T)
        assert word_kd_loss(student, teacher, T, mask).item() == pytest.approx(expected, rel=1e-5)
    per_sequence_mean = (reference(student[:1].tolist(), teacher[:1].tolist(), [[1, 0, 0]], 15.0)
                         + reference(student[1:].tolist(), teacher[1:].tolist(), [[1, 1, 1]], 15.0)) / 2
    assert word_kd_loss(student, teacher, 15.0, mask).item() != pytest.approx(per_sequence_mean, rel=1e-3)


def test_default_temperature_is_glmd_15_and_labels_are_ignored():
    assert WordKD.Params().temperature == 15.0 and WordKD.Params().reduction == "tokens"
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    objective = build_objective(ObjectiveConfig(name="word_kd"))
    value = objective(Outputs(student), Outputs(teacher), {"attention_mask": mask}, P0)
    assert value.item() == pytest.approx(reference(student.tolist(), teacher.tolist(), mask.tolist(), 15.0), rel=1e-5)
    with_labels = objective(Outputs(student), Outputs(teacher),
                            {"attention_mask": mask, "labels": torch.tensor([[0, 4, 2], [1, 1, -100]])}, P0)
    assert with_labels.item() == value.item()


def test_gradient_is_t_times_prob_difference_on_real_positions_and_teacher_gets_none():
    # d/dz_s [T^2 KL(p_t || softmax(z_s / T))] = T (p_s - p_t), divided by the M = 3 counted positions
    T = 3.0
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 2, 4, generator=g).requires_grad_()
    teacher = torch.randn(2, 2, 4, generator=g).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]])
    word_kd_loss(student, teacher, T, mask).backward()
    p_s, p_t = torch.softmax(student.detach() / T, -1), torch.softmax(teacher.detach() / T, -1)
    expected = T * (p_s - p_t) / 3 * mask.unsqueeze(-1)
    assert torch.allclose(student.grad, expected, atol=1e-6)
    assert torch.all(student.grad[1, 1] == 0)
    assert teacher.grad is None


def test_gradcheck_student_logits_and_a_per_sample_temperature():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, 4, dtype=torch.double, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 4, dtype=torch.double, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.autograd.gradcheck(lambda s: word_kd_loss(s, teacher, 15.0, mask), (student,))
    temperature = torch.tensor([[2.0], [5.0]], dtype=torch.double, requires_grad=True)
    small = student[:, :2, :3].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: word_kd_loss(s, teacher[:, :2, :3], t, mask[:, :2]),
                                    (small, temperature))


def test_per_sample_temperature_matches_the_reference():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 2, 3, generator=g), torch.randn(2, 2, 3, generator=g)
    mask = torch.tensor([[1, 1], [1, 0]])
    value = word_kd_loss(student, teacher, torch.tensor([[2.0], [6.0]]), mask)
    # sequence 1 at T = 2 (two positions), sequence 2 at T = 6 (one), mean over the 3 positions
    total = (reference(student[:1].tolist(), teacher[:1].tolist(), [[1, 1]], 2.0) * 2
             + reference(student[1:].tolist(), teacher[1:].tolist(), [[1, 0]], 6.0) * 1)
    assert value.item() == pytest.approx(total / 3, rel=1e-5)


class _Teacher(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)


def test_teacher_logits_are_restricted_to_the_students_kept_ids():
    # teacher vocabulary of 5; the student kept teacher ids (3, 0, 4), in that order. The teacher logits put the
    # hand example's values at ids 3, 0, 4 and large values at the dropped ids 1, 2, which must not count.
    T = 2.0
    student, _, mask, kl1, kl2 = hand_example(T)
    teacher = torch.tensor([[[0.0, 8.0, -5.0, T * LN2, 0.0],
                             [T * LN3, -6.0, 7.0, 0.0, 0.0],
                             [1.0, 2.0, 3.0, 4.0, 5.0]]], dtype=torch.double)
    objective = build_objective(ObjectiveConfig(name="word_kd", temperature=T))
    student_model = nn.Linear(1, 1)
    student_model.kdforge_vocab_map = torch.tensor([3, 0, 4])
    objective.setup(student_model, _Teacher(5))
    value = objective(Outputs(student), Outputs(teacher), {"attention_mask": mask}, P0)
    assert value.item() == pytest.approx(T**2 * (kl1 + kl2) / 2, rel=1e-6)


def test_vocabulary_mismatch_and_bad_maps_are_one_line_errors():
    objective = build_objective(ObjectiveConfig(name="word_kd"))
    s, t = torch.zeros(1, 2, 3), torch.zeros(1, 2, 5)
    with pytest.raises(KDForgeError, match="compress_vocabulary"):
        objective(Outputs(s), Outputs(t), {}, P0)
    student_model = nn.Linear(1, 1)
    student_model.kdforge_vocab_map = torch.tensor([3, 0, 7])
    with pytest.raises(KDForgeError, match="teacher has 5 words"):
        objective.setup(student_model, _Teacher(5))
    student_model.kdforge_vocab_map = torch.tensor([3, 3, 1])
    with pytest.raises(KDForgeError, match="distinct"):
        objective.setup(student_model, _Teacher(5))


def test_shape_errors_name_the_fix():
    objective = build_objective(ObjectiveConfig(name="word_kd"))
    with pytest.raises(KDForgeError, match="logit_mse"):  # a regression output
        objective(Outputs(torch.zeros(2, 1)), Outputs(torch.zeros(2, 1)), {}, P0)
    with pytest.raises(KDForgeError, match="hinton_kd"):  # sequence-classification logits
        objective(Outputs(torch.zeros(2, 3)), Outputs(torch.zeros(2, 3)), {}, P0)
    with pytest.raises(KDForgeError, match="attention_mask"):
        objective(Outputs(torch.zeros(2, 3, 4)), Outputs(torch.zeros(2, 3, 4)),
                  {"attention_mask": torch.ones(2, 5)}, P0)
    with pytest.raises(KDForgeError, match="has no teacher"):  # caught when the loss is bound to its roles
        WeightedLoss.from_config([ObjectiveConfig(name="word_kd")], teachers=[])


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": -1.0}, {"reduction": "mean"},
                                    {"kept_ids": [0, 1]}, {"temprature": 2.0}])
def test_invalid_params_are_config_errors(params):
    with pytest.raises(KDForgeError, match="word_kd"):
        build_objective(ObjectiveConfig(name="word_kd", **params))


def test_distils_between_causal_lms_of_different_width_and_depth():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdforge.models.adapter import ModelAdapter

    def llama(hidden, layers):
        return LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                            pad_token_id=0))

    torch.manual_seed(0)
    teacher, student = llama(24, 2), llama(16, 1)
    batch = {"input_ids": torch.tensor([[1, 5, 7, 2], [1, 3, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1],
                                                                                                     [1, 1, 0, 0]])}
    objective = build_objective(ObjectiveConfig(name="word_kd", temperature=2.0))
    objective.setup(student, teacher)
    s_out, t_out = ModelAdapter(student)(batch), ModelAdapter(teacher)(batch)
    value = objective(s_out, t_out, batch, P0)
    expected = reference(s_out.logits.tolist(), t_out.logits.tolist(), batch["attention_mask"].tolist(), 2.0)
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)  # float32 logits
    value.backward()
    assert student.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
