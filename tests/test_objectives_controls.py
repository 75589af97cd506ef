"""The controls of the distillation hypothesis (objectives/controls.py) against values derived by hand:
the permuted teacher keeps the true class's probability and the multiset of the others, is fixed per
example, refuses two classes; label smoothing at the teacher's mean confidence; gradients reach the
student only."""

import math

import pytest
import torch

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress, build_objective
from kdforge.objectives.controls import non_target_permutations, permute_non_target

pytestmark = pytest.mark.usefixtures("one_thread")

LN = math.log
P = Progress(step=0, total_steps=10, epoch=0.0)


def kl(p, q):
    return sum(a * LN(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def build(name, **params):
    return build_objective(ObjectiveConfig(name=name, **params))


def test_permute_non_target_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    labels = torch.tensor([1, 3])
    # row 0: others (0, 2, 3) with values (1, 3, 4); sigma = (2, 0, 1) -> class 0 gets 4, class 2 gets 1, class 3 gets 3
    # row 1: others (0, 1, 2) with values (10, 20, 30); sigma = (1, 2, 0) -> (20, 30, 10), class 3 keeps 40
    permutations = torch.tensor([[2, 0, 1], [1, 2, 0]])
    out = permute_non_target(logits, labels, permutations)
    assert out.tolist() == [[4.0, 2.0, 1.0, 3.0], [20.0, 30.0, 10.0, 40.0]]


def test_permutations_are_fixed_per_example_and_differ_between_examples():
    first = non_target_permutations(torch.tensor([5, 6, 7, 5]), 10, seed=0)
    again = non_target_permutations(torch.tensor([7, 5]), 10, seed=0)
    assert first[0].tolist() == first[3].tolist() == again[1].tolist()  # example 5, any batch, any epoch
    assert first[2].tolist() == again[0].tolist()
    assert sorted(first[1].tolist()) == list(range(9))
    assert len({tuple(r) for r in first[:3].tolist()}) == 3
    assert non_target_permutations(torch.tensor([5]), 10, seed=1).tolist() != first[:1].tolist()


def test_permuted_teacher_keeps_the_true_class_and_the_multiset_of_the_others():
    torch.manual_seed(0)
    teacher = torch.randn(64, 10) * 3
    labels = torch.randint(0, 10, (64,))
    out = permute_non_target(teacher, labels, non_target_permutations(torch.arange(64), 10, seed=3))
    p, q = teacher.softmax(-1), out.softmax(-1)
    rows = torch.arange(64)
    assert torch.allclose(q[rows, labels], p[rows, labels])
    for i in range(64):
        others = [c for c in range(10) if c != labels[i]]
        assert sorted(p[i, others].tolist()) == pytest.approx(sorted(q[i, others].tolist()))
    assert not torch.allclose(q, p)  # something moved


def test_permuted_kd_hand_value_and_gradient_to_the_student_only():
    # one example, 3 classes, y = 0, T = 2: teacher logits (2 ln 6, 2 ln 3, 0) -> p_t^T = (0.6, 0.3, 0.1)
    t = torch.tensor([[2 * LN(6), 2 * LN(3), 0.0]], requires_grad=True)
    s = torch.tensor([[0.5, -1.0, 1.5]], requires_grad=True)
    objective = build("permuted_kd", temperature=2.0, seed=0)
    sigma = non_target_permutations(torch.tensor([4]), 3, seed=0)[0].tolist()
    others = [0.3, 0.1]
    q = [0.6, others[sigma[0]], others[sigma[1]]]
    expected = 4 * kl(q, softmax([0.5, -1.0, 1.5], 2.0))
    loss = objective(Outputs(s), Outputs(t), {"labels": torch.tensor([0]), "index": torch.tensor([4])}, P)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    p_s = softmax([0.5, -1.0, 1.5], 2.0)
    # d/dz_s of T^2 KL(q || softmax(z_s / T)) = T (p_s - q)
    assert s.grad[0].tolist() == pytest.approx([2 * (a - b) for a, b in zip(p_s, q, strict=True)], rel=1e-5)
    assert t.grad is None
    mean = build("permuted_kd", temperature=2.0, reduction="mean")
    assert mean(Outputs(s), Outputs(t), {"labels": torch.tensor([0]), "index": torch.tensor([4])}, P).item() == \
        pytest.approx(expected / 3, rel=1e-5)


def test_permuted_kd_refuses_binary_tasks_and_a_batch_without_indices():
    objective = build("permuted_kd")
    two = Outputs(torch.zeros(2, 2))
    with pytest.raises(KDForgeError, match="nothing to permute") as err:
        objective(two, two, {"labels": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}, P)
    assert "\n" not in str(err.value)
    three = Outputs(torch.zeros(2, 3))
    with pytest.raises(KDForgeError, match="index"):
        objective(three, three, {"labels": torch.tensor([0, 1])}, P)
    assert objective.needs_index and not build("hinton_kd").needs_index


def test_teacher_confidence_ls_hand_value_and_gradient():
    # T = 1, y = (0, 2); teacher p_t = (0.6, 0.3, 0.1) and (0.2, 0.2, 0.6): mean confidence c = (0.6 + 0.6) / 2 = 0.6
    # target u_0 = (0.6, 0.2, 0.2), u_1 = (0.2, 0.2, 0.6): the teacher's spread (0.3, 0.1) is not kept
    t = torch.tensor([[LN(6), LN(3), 0.0], [0.0, 0.0, LN(3)]], requires_grad=True)
    z = [[0.2, 0.1, -0.3], [1.0, 0.0, 0.5]]
    s = torch.tensor(z, requires_grad=True)
    u = [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]
    expected = (kl(u[0], softmax(z[0])) + kl(u[1], softmax(z[1]))) / 2
    objective = build("teacher_confidence_ls", temperature=1.0)
    loss = objective(Outputs(s), Outputs(t), {"labels": torch.tensor([0, 2])}, P)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    for i in range(2):
        assert s.grad[i].tolist() == pytest.approx([(a - b) / 2 for a, b in zip(softmax(z[i]), u[i], strict=True)],
                                                   rel=1e-5)
    assert t.grad is None


def test_teacher_confidence_ls_at_temperature_and_on_two_classes():
    # T = 2: teacher logits (2 ln 4, 0) -> p_t^T = (0.8, 0.2) on y = 0; target (0.8, 0.2); T^2 = 4
    t = torch.tensor([[2 * LN(4), 0.0]])
    s = torch.tensor([[0.0, 1.0]])
    loss = build("teacher_confidence_ls", temperature=2.0)(Outputs(s), Outputs(t), {"labels": torch.tensor([0])}, P)
    assert loss.item() == pytest.approx(4 * kl([0.8, 0.2], softmax([0.0, 1.0], 2.0)), rel=1e-6)


def test_the_controls_need_a_teacher_and_labels():
    for name in ("permuted_kd", "teacher_confidence_ls"):
        objective = build(name)
        three = Outputs(torch.zeros(1, 3))
        with pytest.raises(KDForgeError, match="needs a teacher"):
            objective(three, None, {"labels": torch.tensor([0]), "index": torch.tensor([0])}, P)
        with pytest.raises(KDForgeError, match="needs labels"):
            objective(three, three, {"index": torch.tensor([0])}, P)


def test_a_term_that_reads_indices_gets_an_indexed_stage_with_a_live_teacher(job_tree):
    from kdforge.config import validate_config
    from kdforge.models.loading import load_model
    from kdforge.objectives.composite import WeightedLoss
    from kdforge.recipes.base import StageContext
    from kdforge.recipes.catalog import data_source_for
    from kdforge.recipes.teacher_sources import LiveTeacher, teacher_sources
    from kdforge.tasks.base import build_task

    tree = {**job_tree, "teacher": {"model": job_tree["teacher"]["model"]},
            "objectives": [{"name": "ce"}, {"name": "teacher_confidence_ls"}]}
    config = validate_config(tree)
    stage = config.all_stages()[0]
    task = build_task(config.task)
    teacher = load_model(config.teacher.model, task)
    data = data_source_for(stage, 0).build(stage, task, teacher, config, "cpu")

    live = stage.model_copy(update={"teacher_source": "live"})  # no cache: it would index the data itself

    def context():
        return StageContext(config, live, 0, data, "student", teacher, {"teacher": teacher}, data.train,
                            data.collator(teacher.tokenizer, train=True), "cpu", task=task)

    plain = context()
    teacher_sources(plain, WeightedLoss.from_config(stage.objectives, ["teacher"]), {})
    assert plain.train_data is data.train  # no term reads indices: the data as it was
    indexed = context()
    loss = WeightedLoss.from_config([ObjectiveConfig(name="ce"), ObjectiveConfig(name="permuted_kd")], ["teacher"])
    sources = teacher_sources(indexed, loss, {})
    assert isinstance(sources["teacher"], LiveTeacher)
    batch = indexed.collate([indexed.train_data[i] for i in (3, 7)])
    assert batch["index"].tolist() == [3, 7]


def test_the_controls_train_a_student_with_a_live_teacher_on_augmented_images(tmp_path):
    """Digits (10 classes, random crops: the teacher runs live): the permuted teacher gets each example's index."""
    import json

    from kdforge import api

    tree = {"task": {"name": "digits", "train_limit": 96, "eval_limit": 64},
            "teacher": {"model": "vision:small_cnn"}, "student": {"model": "vision:small_cnn"},
            "objectives": [{"name": "ce", "weight": 0.1}, {"name": "permuted_kd", "weight": 0.45},
                           {"name": "teacher_confidence_ls", "weight": 0.45}],
            "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "seed": 0, "device": "cpu", "trackers": []},
            "eval": {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0},
            "output_dir": str(tmp_path / "run")}
    result = api.distill(tree)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    history = saved["history"]
    logged = [e["loss:permuted_kd"] for e in history if "loss:permuted_kd" in e]
    assert logged and all(math.isfinite(v) and v > 0 for v in logged), history
    assert saved["teacher"]["similarity"]["non_target_entropy"] is not None  # ten classes
