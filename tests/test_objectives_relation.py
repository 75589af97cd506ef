"""Relation (Gram) distillation and contrastive KD against values derived by hand from their formulas."""

import math

import pytest
import torch

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress, build_objective
from kdforge.objectives.composite import WeightedLoss
from kdforge.objectives.contrastive import info_nce
from kdforge.objectives.relation import pool
from tests.helpers import tiny_bert

P0 = Progress(step=0, total_steps=10)


# ---------------------------------------------------------------------------- plain-Python references


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def unit(v):
    n = math.sqrt(dot(v, v))
    return [x / n for x in v]


def sp_gram(rows):
    """Tung & Mori: G = F F^T, then every row of G scaled to unit L2 norm."""
    return [unit([dot(a, b) for b in rows]) for a in rows]


def cosine_gram(rows):
    u = [unit(r) for r in rows]
    return [[dot(a, b) for b in u] for a in u]


def frob2(a, b):
    return sum((x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def outputs(*hidden, features=None):
    """Outputs whose hidden_states are the given (N, L, d) tensors (logits unused by these terms)."""
    n = hidden[0].shape[0] if hidden else next(iter(features.values())).shape[0]
    return Outputs(logits=torch.zeros(n, 2), hidden_states=tuple(hidden) or None, features=features or {})


def as_cls(rows, dtype=torch.float32, requires_grad=False):
    """(N, d) rows as (N, 1, d) token states, so `cls` pooling returns the rows themselves."""
    return torch.tensor(rows, dtype=dtype).unsqueeze(1).requires_grad_(requires_grad)


def relation(**params):
    return build_objective(ObjectiveConfig(name="relation", **params))


# ---------------------------------------------------------------------------- relation, over samples


def test_relation_samples_matches_hand_derived_2x2_value():
    # teacher rows (1,0),(0,1): G_t = I.  student rows (1,0),(1,1): G_s = [[1,1],[1,2]],
    # row-normalised: (1,1)/sqrt2, (1,2)/sqrt5.  L = ||G~_s - G~_t||_F^2 / N^2 with N = 2
    a, b = 1 / math.sqrt(2), 1 / math.sqrt(5)
    expected = ((a - 1) ** 2 + a**2 + b**2 + (2 * b - 1) ** 2) / 4
    assert expected == pytest.approx(0.1992330, abs=1e-7)
    s, t = as_cls([[1.0, 0.0], [1.0, 1.0]]), as_cls([[1.0, 0.0], [0.0, 1.0]])
    value = relation()(outputs(s), outputs(t), {}, P0)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_relation_samples_is_zero_for_identical_rotated_and_rescaled_students():
    torch.manual_seed(0)
    f_t = torch.randn(5, 4, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    assert torch.allclose(rotation @ rotation.T, torch.eye(4, dtype=torch.float64))
    term = relation()
    for f_s in (f_t.clone(), f_t @ rotation, 3.0 * (f_t @ rotation)):
        value = term(outputs(f_s.unsqueeze(1)), outputs(f_t.unsqueeze(1)), {}, P0)
        assert value.item() == pytest.approx(0.0, abs=1e-12)
    # and it is not zero for an unrelated student
    assert term(outputs(torch.randn(5, 1, 4, dtype=torch.float64)), outputs(f_t.unsqueeze(1)), {}, P0).item() > 1e-3


def test_relation_samples_works_across_widths():
    s_rows = [[0.5, -1.0, 2.0], [1.0, 0.0, 0.3], [-0.2, 0.4, 0.1], [0.0, 1.0, 1.0]]
    t_rows = [[1.0, 0.2, 0.0, -0.5, 0.3, 0.0, 1.0], [0.1, 0.9, 0.4, 0.0, 0.0, -1.0, 0.2],
              [0.3, 0.3, -0.3, 0.6, 0.1, 0.0, 0.0], [2.0, 0.0, 0.0, 0.1, -0.4, 0.5, 0.5]]
    expected = frob2(sp_gram(s_rows), sp_gram(t_rows)) / 16
    value = relation()(outputs(as_cls(s_rows)), outputs(as_cls(t_rows)), {}, P0)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_relation_samples_sums_over_layer_pairs_and_detaches_the_teacher():
    s1, s2 = [[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [1.0, -1.0]]
    t1, t2 = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.5]]
    expected = frob2(sp_gram(s1), sp_gram(t1)) / 4 + frob2(sp_gram(s2), sp_gram(t2)) / 4
    student = (as_cls(s1, requires_grad=True), as_cls(s2, requires_grad=True))
    teacher = (as_cls(t1, requires_grad=True), as_cls(t2, requires_grad=True))
    term = relation(student_layers=[0, 1], teacher_layers=[0, -1])
    value = term(outputs(*student), outputs(*teacher), {}, P0)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in student)
    assert all(h.grad is None for h in teacher)


def test_relation_samples_gradcheck():
    torch.manual_seed(1)
    t = torch.randn(4, 3, 6, dtype=torch.float64)
    term = relation(pooling="mean")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    s = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: term(outputs(x), outputs(t), {"attention_mask": mask}, P0), (s,))


# ---------------------------------------------------------------------------- relation, over layers


def test_relation_layers_matches_hand_derived_value():
    # sample 1: teacher layers (1,0),(0,1) -> cos 0; student (1,0),(1,1) -> cos 1/sqrt2
    #   ||G_s - G_t||_F^2 = 2 * (1/sqrt2)^2 = 1, / K^2 = 1/4.   sample 2 identical -> 0.   mean = 1/8
    s_layer0 = as_cls([[1.0, 0.0], [2.0, 1.0]])
    s_layer1 = as_cls([[1.0, 1.0], [0.0, 3.0]])
    t_layer0 = as_cls([[1.0, 0.0], [2.0, 1.0]])
    t_layer1 = as_cls([[0.0, 1.0], [0.0, 3.0]])
    term = relation(over="layers", student_layers=[0, 1], teacher_layers=[0, 1])
    assert term(outputs(s_layer0, s_layer1), outputs(t_layer0, t_layer1), {}, P0).item() == pytest.approx(1 / 8)


def test_relation_layers_across_widths_and_hooked_paths():
    # three hooked "modalities" per sample; student width 3, teacher width 4
    torch.manual_seed(2)
    s = {f"s{k}": torch.randn(2, 3) for k in range(3)}
    t = {f"t{k}": torch.randn(2, 4) for k in range(3)}
    term = relation(over="layers", student_paths=list(s), teacher_paths=list(t))
    assert term.hook_paths(None, None) == (list(s), list(t))
    assert term.requires == frozenset()
    expected = 0.0
    for i in range(2):
        g_s = cosine_gram([s[f"s{k}"][i].tolist() for k in range(3)])
        g_t = cosine_gram([t[f"t{k}"][i].tolist() for k in range(3)])
        expected += frob2(g_s, g_t) / 9 / 2
    value = term(outputs(features=s), outputs(features=t), {}, P0)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_relation_layers_gradcheck():
    torch.manual_seed(3)
    t = tuple(torch.randn(3, 2, 4, dtype=torch.float64) for _ in range(3))
    term = relation(over="layers", student_layers=[0, 1, 2], teacher_layers=[0, 1, 2])
    s = torch.randn(3, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: term(outputs(*x.unbind(0)), outputs(*t), {}, P0), (s,))


# ---------------------------------------------------------------------------- pooling and errors


def test_pooling_cls_masked_mean_flatten_and_feature_maps():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(x, "cls", mask, "relation").tolist() == [[1.0, 2.0]]
    assert pool(x, "mean", mask, "relation").tolist() == [[2.0, 3.0]]  # the padded position is ignored
    assert pool(x, "mean", None, "relation")[0].tolist() == pytest.approx([104 / 3, 106 / 3])
    assert pool(x, "flatten", mask, "relation").tolist() == [[1.0, 2.0, 3.0, 4.0, 0.0, 0.0]]
    fmap = torch.arange(8.0).reshape(1, 2, 2, 2)  # (N, C, H, W): global average pooling per channel
    assert pool(fmap, "mean", None, "relation").tolist() == [[1.5, 5.5]]
    with pytest.raises(KDForgeError, match="pooling `cls`"):
        pool(fmap, "cls", None, "relation")


@pytest.mark.parametrize("params, match", [
    ({"over": "layers"}, "at least 2"),
    ({"student_layers": [1, 2], "teacher_layers": [3]}, "2 representations and the teacher 1"),
    ({"pooling": "max"}, "pooling"),
    ({"ovr": "samples"}, "ovr.*does not exist"),
])
def test_relation_config_errors_are_one_line(params, match):
    with pytest.raises(KDForgeError, match=match) as err:
        relation(**params)
    assert "\n" not in str(err.value)


def test_relation_runtime_errors_name_the_fix():
    s, t = as_cls([[1.0, 0.0]]), as_cls([[0.0, 1.0]])
    with pytest.raises(KDForgeError, match="out of range.*2 hidden states"):
        relation(student_layers=[5])(outputs(s, s), outputs(t, t), {}, P0)
    cached_teacher = Outputs(torch.zeros(1, 2), hidden_states=(None, t))  # a cache that kept hidden state 1 only
    assert relation(teacher_layers=[1])(outputs(s), cached_teacher, {}, P0).item() == pytest.approx(0.0)
    with pytest.raises(KDForgeError, match="teacher_cache.hidden_states"):
        relation(teacher_layers=[0])(outputs(s), cached_teacher, {}, P0)
    with pytest.raises(KDForgeError, match="has no teacher"):  # caught when the loss is bound to its roles
        WeightedLoss.from_config([ObjectiveConfig(name="relation")], teachers=[])
    with pytest.raises(KDForgeError, match="student_paths"):
        relation()(Outputs(torch.zeros(1, 2)), outputs(t), {}, P0)
    term = relation(over="layers", student_layers=[0, 1], teacher_layers=[0, 1])
    with pytest.raises(KDForgeError, match="different widths"):
        term(outputs(s, as_cls([[1.0, 0.0, 1.0]])), outputs(t, t), {}, P0)


# ---------------------------------------------------------------------------- contrastive KD


def contrastive(width=2, student_width=None, **params):
    params = {"projection": "none", "student_dim": student_width or width, "teacher_dim": width, **params}
    term = build_objective(ObjectiveConfig(name="contrastive_kd", **params))
    term.setup(None, None)
    return term


def test_contrastive_matches_hand_derived_infonce_with_empty_queue():
    # q1 = (1,0), q2 = (0,1); k1 = (1,0), k2 = (1,1)/sqrt2; s = 1/T = 2
    # L1 = -log e^{2}/(e^{2} + e^{2/sqrt2});  L2 = -log e^{2/sqrt2}/(e^{0} + e^{2/sqrt2});  L = (L1 + L2)/2
    c = 1 / math.sqrt(2)
    l1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2 * c)))
    l2 = -math.log(math.exp(2 * c) / (math.exp(0) + math.exp(2 * c)))
    term = contrastive(temperature=0.5)
    s, t = as_cls([[3.0, 0.0], [0.0, 0.5]]), as_cls([[1.0, 0.0], [2.0, 2.0]])  # norms do not matter
    value = term(outputs(s), outputs(t), {}, P0)
    assert value.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_contrastive_queue_entries_are_negatives():
    # one sample, q = k = (1,0); the queue holds b = (0,1) from an earlier batch; s = 2
    # L = -log e^{2} / (e^{2} + e^{0})
    term = contrastive(temperature=0.5, queue_size=4).train()
    term(outputs(as_cls([[0.0, 1.0]])), outputs(as_cls([[0.0, 5.0]])), {}, P0)  # enqueues (0, 5)
    assert int(term.queue_count) == 1
    value = term(outputs(as_cls([[1.0, 0.0]])), outputs(as_cls([[1.0, 0.0]])), {}, P0)
    assert value.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def test_contrastive_queue_is_fifo_wraps_and_only_fills_in_training():
    term = contrastive(queue_size=3).train()
    rows = [[float(i), 1.0] for i in range(1, 9)]

    def step(batch_rows):
        term(outputs(as_cls(batch_rows)), outputs(as_cls(batch_rows)), {}, P0)

    step(rows[0:2])  # a, b
    assert term.queue[:2].tolist() == rows[0:2] and int(term.queue_count) == 2 and int(term.queue_ptr) == 2
    step(rows[2:4])  # c fills slot 2, d overwrites the oldest (a) in slot 0
    assert term.queue.tolist() == [rows[3], rows[1], rows[2]]
    assert int(term.queue_count) == 3 and int(term.queue_ptr) == 1
    term.eval()
    step(rows[4:6])
    assert term.queue.tolist() == [rows[3], rows[1], rows[2]] and int(term.queue_ptr) == 1
    term.train()
    step(rows[4:8])  # 4 rows into 3 slots: the newest 3 survive, written from slot 1 on
    assert sorted(term.queue.tolist()) == rows[5:8] and term.queue[1].tolist() == rows[5]
    assert int(term.queue_ptr) == 1


def test_contrastive_closer_positives_give_lower_loss():
    torch.manual_seed(4)
    t = torch.randn(6, 1, 5)
    term = contrastive(width=5)
    aligned = term(outputs(t + 0.05 * torch.randn(6, 1, 5)), outputs(t), {}, P0)
    shuffled = term(outputs(t[torch.tensor([1, 2, 3, 4, 5, 0])]), outputs(t), {}, P0)
    assert aligned.item() < shuffled.item()


def test_contrastive_gradients_match_the_analytic_ones_and_skip_the_teacher():
    # with unit student rows x_i: dL/dx_i = (I - x_i x_i^T) s/N (sum_j p_ij k_j - k_i)
    # and dL/d log s = s/N sum_i (sum_j p_ij c_ij - c_ii), c = q k^T, p = softmax(s c) per row
    torch.manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    term = contrastive(width=4, temperature=0.2).double()
    s_states = x.unsqueeze(1).clone().requires_grad_(True)
    t_states = k.unsqueeze(1).clone().requires_grad_(True)
    term(outputs(s_states), outputs(t_states), {}, P0).backward()
    scale = term.log_scale.exp().item()  # 1/T = 5, up to the float32 rounding of the stored log-scale
    assert scale == pytest.approx(5.0, rel=1e-6)
    c = x @ k.T
    p = torch.softmax(scale * c, dim=-1)
    grad_q = scale / 3 * (p @ k - k)
    expected_x = grad_q - (grad_q * x).sum(-1, keepdim=True) * x
    assert torch.allclose(s_states.grad.squeeze(1), expected_x, atol=1e-10)
    expected_log_scale = scale / 3 * ((p * c).sum(-1) - c.diagonal()).sum()
    assert term.log_scale.grad is not None
    assert term.log_scale.grad.item() == pytest.approx(expected_log_scale.item(), rel=1e-8)
    assert t_states.grad is None


def test_contrastive_gradcheck_with_a_fixed_queue():
    torch.manual_seed(6)
    term = contrastive(width=4, student_width=3, projection="shared", proj_dim=5, queue_size=6).double().train()
    for _ in range(2):  # fill the queue with 4 teacher rows, then freeze it
        term(outputs(torch.randn(2, 1, 3, dtype=torch.float64)), outputs(torch.randn(2, 1, 4, dtype=torch.float64)),
             {}, P0)
    term.eval()
    assert int(term.queue_count) == 4
    queue = term.queue.clone()
    t = torch.randn(3, 2, 4, dtype=torch.float64)
    s = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    assert torch.autograd.gradcheck(lambda x: term(outputs(x), outputs(t), {"attention_mask": mask}, P0), (s,))
    assert torch.equal(term.queue, queue)


def test_contrastive_logit_scale_starts_at_one_over_t_and_is_clamped():
    term = contrastive()
    assert term.log_scale.exp().item() == pytest.approx(1 / 0.07)
    assert term.log_scale.requires_grad
    with torch.no_grad():
        term.log_scale.fill_(10.0)
    term(outputs(as_cls([[1.0, 0.0], [0.0, 1.0]])), outputs(as_cls([[1.0, 0.0], [0.0, 1.0]])), {}, P0)
    assert term.log_scale.exp().item() == pytest.approx(100.0)
    assert not contrastive(learn_temperature=False).log_scale.requires_grad


def test_contrastive_other_labels_drops_same_class_negatives():
    # both samples share label 1: each anchor's only key left is its positive -> L = -log 1 = 0
    s, t = as_cls([[1.0, 0.0], [0.0, 1.0]]), as_cls([[0.0, 1.0], [1.0, 0.0]])
    same = {"labels": torch.tensor([1, 1])}
    assert contrastive(negatives="other_labels")(outputs(s), outputs(t), same, P0).item() == pytest.approx(0.0)
    assert contrastive()(outputs(s), outputs(t), same, P0).item() > 1.0
    # queue entries of the anchor's class are dropped too: queue = [(0,1) label 0]; anchor label 0 -> L = 0
    term = contrastive(negatives="other_labels", queue_size=2, temperature=0.5).train()
    term(outputs(as_cls([[0.0, 1.0]])), outputs(as_cls([[0.0, 1.0]])), {"labels": torch.tensor([0])}, P0)
    term.eval()  # freeze the queue
    one = (outputs(as_cls([[1.0, 0.0]])), outputs(as_cls([[1.0, 0.0]])))
    assert term(*one, {"labels": torch.tensor([0])}, P0).item() == pytest.approx(0.0, abs=1e-7)
    other_class = term(*one, {"labels": torch.tensor([1])}, P0).item()
    assert other_class == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)
    with pytest.raises(KDForgeError, match="class labels"):
        contrastive(negatives="other_labels")(outputs(s), outputs(t), {}, P0)


def test_contrastive_queue_is_checkpointed():
    torch.manual_seed(7)
    term = contrastive(width=3, student_width=2, projection="shared", queue_size=5).train()
    term(outputs(torch.randn(4, 1, 2)), outputs(torch.randn(4, 1, 3)), {}, P0)
    state = term.state_dict()
    assert {"queue", "queue_labels", "queue_ptr", "queue_count", "log_scale"} <= set(state)
    restored = contrastive(width=3, student_width=2, projection="shared", queue_size=5)
    restored.load_state_dict(state)
    s, t = torch.randn(3, 1, 2), torch.randn(3, 1, 3)
    assert torch.equal(restored.queue, term.queue) and int(restored.queue_ptr) == 4
    assert restored.eval()(outputs(s), outputs(t), {}, P0).item() == term.eval()(outputs(s), outputs(t), {}, P0).item()


def test_contrastive_sizes_itself_from_hf_models_and_trains_end_to_end():
    teacher, student = tiny_bert(40, layers=2, hidden=32, seed=0), tiny_bert(40, layers=1, hidden=16, seed=1)
    term = build_objective(ObjectiveConfig(name="contrastive_kd", pooling="mean", teacher_layers=[1, 2],
                                           queue_size=8))
    assert term.requires == frozenset({"hidden_states"})
    term.setup(student, teacher)
    assert (term.student_proj.in_features, term.teacher_proj.in_features, term.queue.shape) == (16, 64, (8, 64))
    batch = {"input_ids": torch.randint(5, 40, (3, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2,
                                                                                        [1] * 5 + [0]])}
    s_out = ModelAdapter(student, hidden_states=True)(batch)
    with torch.no_grad():
        t_out = ModelAdapter(teacher.eval(), hidden_states=True)(batch)
    term.train()(s_out, t_out, batch, P0).backward()
    assert term.student_proj.weight.grad is not None and term.teacher_proj.weight.grad is not None
    assert student.bert.encoder.layer[0].output.dense.weight.grad is not None
    assert int(term.queue_count) == 3


@pytest.mark.parametrize("params, match", [
    ({"temperature": 0.005}, "max_scale"),
    ({"queue_size": -1}, "queue_size"),
    ({"projection": "both"}, "projection"),
    ({"temprature": 0.1}, "temprature.*does not exist"),
])
def test_contrastive_config_errors_are_one_line(params, match):
    with pytest.raises(KDForgeError, match=match) as err:
        build_objective(ObjectiveConfig(name="contrastive_kd", **params))
    assert "\n" not in str(err.value)


def test_contrastive_setup_errors_name_the_fix():
    with pytest.raises(KDForgeError, match="equal widths"):
        contrastive(width=4, student_width=3)
    with pytest.raises(KDForgeError, match="student_dim"):
        build_objective(ObjectiveConfig(name="contrastive_kd")).setup(torch.nn.Linear(2, 2), None)
    term = build_objective(ObjectiveConfig(name="contrastive_kd"))
    with pytest.raises(KDForgeError, match="not set up"):
        term(outputs(as_cls([[1.0, 0.0]])), outputs(as_cls([[1.0, 0.0]])), {}, P0)
    with pytest.raises(KDForgeError, match="teacher_dim: 3"):
        contrastive(width=2, projection="student")(outputs(as_cls([[1.0, 0.0]])), outputs(as_cls([[1.0, 0.0, 1.0]])),
                                                   {}, P0)


def test_info_nce_is_cross_entropy_over_scaled_cosines():
    # two keys, q = k_0: L = -log e^{s}/(e^{s} + e^{s cos}) with cos = 0.6
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert info_nce(q, keys, 3.0).item() == pytest.approx(math.log(1 + math.exp(3 * 0.6 - 3)), rel=1e-6)
