"""SOKD (Liu, Liu & Huang, BMVC 2021): the knowledge bridge, its loss terms and gradients, the
strategy's checks, and end-to-end runs (vision with an exact resume, text)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdforge import jobs
from kdforge.config import ObjectiveConfig, validate_config
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.vision_nets import build_vision_net
from kdforge.objectives.composite import WeightedLoss
from kdforge.progress import Progress
from kdforge.recipes.catalog import check_stages, strategy_names
from kdforge.recipes.sokd import SOKDParams, SOKDStep, TextBridge, VisionBridge, knowledge_bridge, sokd_terms
from kdforge.recipes.teacher_sources import LiveTeacher
from tests.helpers import Killed, kill_at, tiny_bert, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TERMS = ("kd_bridge", "bridge_ce", "bridge_kd_teacher", "bridge_kd_student")



def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _shares_storage(a: nn.Module, b: nn.Module) -> bool:
    ptrs = {p.data_ptr() for p in b.parameters()}
    return any(p.data_ptr() in ptrs for p in a.parameters())


# ------------------------------------------------------------------------------------------ bridge


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_2"])
def test_vision_bridge_is_a_copy_of_the_last_stage_with_a_fresh_head(arch):
    torch.manual_seed(0)
    teacher = build_vision_net(arch, num_classes=10).eval()
    with torch.no_grad():  # make the BatchNorm statistics non-trivial, so a copy must carry them
        teacher.train()
        teacher(torch.randn(8, 3, 32, 32))
        teacher.eval()
    bridge = knowledge_bridge(teacher, init="teacher")
    assert isinstance(bridge, VisionBridge) and bridge.hook_paths == ["layer2"] and not bridge.hidden_states
    assert _same_state(bridge.stage, teacher.layer3) and _same_state(bridge.post_act, teacher.post_act)
    assert not _shares_storage(bridge, teacher)  # copies, not the teacher's own modules
    assert all(p.requires_grad for p in bridge.parameters()) and bridge.training
    assert bridge.fc.weight.shape == teacher.fc.weight.shape
    assert not torch.equal(bridge.fc.weight, teacher.fc.weight) and torch.equal(bridge.fc.bias, torch.zeros(10))

    adapter = ModelAdapter(teacher, hook_paths=bridge.hook_paths)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = adapter({"pixel_values": x})
        bridge.eval()
        h = bridge.take_input(out)
        assert h.shape == (3, teacher.layer3[0].conv1.in_channels, 16, 16)  # layer2: 16x16 maps
        assert torch.equal(bridge.stage(h), teacher.layer3(h))
        logits = bridge(h)
        assert logits.shape == (3, 10)
        bridge.fc.load_state_dict(teacher.fc.state_dict())  # with the teacher's own head it IS the teacher's top
        torch.testing.assert_close(bridge(h), out.logits)
    adapter.remove_hooks()


def test_the_bridge_starts_from_a_fresh_initialisation_by_default_as_the_authors_code():
    """Semi-Online-KD builds its bridge before loading the teacher checkpoint: random weights, and
    BatchNorm statistics of a fresh net (mean 0, variance 1), not the trained teacher's."""
    torch.manual_seed(0)
    teacher = build_vision_net("resnet20", num_classes=10).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3)  # a "trained" teacher: every weight moved off its initialisation
        teacher.train()
        teacher(torch.randn(8, 3, 32, 32))
        teacher.eval()
    bridge = knowledge_bridge(teacher)
    assert SOKDParams().bridge_init == "random"
    convs = [m for m in bridge.stage.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:  # He-normal, fan-out: std sqrt(2 / (out_channels * k * k)), mean 0
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.1
        assert abs(conv.weight.mean().item()) < 0.01
    for bn in (m for m in bridge.stage.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_mean,
                                                                                  torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.equal(convs[0].weight, teacher.layer3[0].conv1.weight)
    assert teacher.layer3[0].bn1.weight.min().item() == pytest.approx(1.3)  # untouched

    text_teacher = tiny_bert(100, num_labels=3, layers=3).eval()
    with torch.no_grad():
        for p in text_teacher.parameters():
            p.add_(0.3)
    text_bridge = knowledge_bridge(text_teacher)
    weights = [m.weight for m in text_bridge.layer.modules() if isinstance(m, nn.Linear)]
    assert all(abs(w.std().item() / 0.02 - 1) < 0.15 and abs(w.mean().item()) < 0.005 for w in weights)
    norms = [m for m in text_bridge.layer.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert text_teacher.bert.encoder.layer[-1].output.LayerNorm.weight.min().item() == pytest.approx(1.3)


def test_text_bridge_is_a_copy_of_the_last_layer_with_a_fresh_classifier():
    teacher = tiny_bert(100, num_labels=3, layers=3).eval()
    bridge = knowledge_bridge(teacher, init="teacher")
    assert isinstance(bridge, TextBridge) and bridge.hidden_states and bridge.hook_paths == []
    assert _same_state(bridge.layer, teacher.bert.encoder.layer[-1]) and _same_state(bridge.pooler, teacher.bert.pooler)
    assert not _shares_storage(bridge, teacher)
    assert bridge.classifier.weight.shape == (3, 32) and not torch.equal(bridge.classifier.weight,
                                                                          teacher.classifier.weight)
    ids = torch.randint(5, 100, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        out = ModelAdapter(teacher, hidden_states=True)({"input_ids": ids, "attention_mask": mask})
        bridge.eval()
        h = bridge.take_input(out)
        assert h.shape == (4, 9, 32) and h is not out.hidden_states[-2] and torch.equal(h, out.hidden_states[-2])
        assert bridge(h, mask).shape == (4, 3)
        bridge.classifier.load_state_dict(teacher.classifier.state_dict())
        torch.testing.assert_close(bridge(h, mask), out.logits)  # the copy with the teacher's head = the teacher
        padded = mask.clone()
        padded[1, 4:] = 0  # the mask is applied: hiding tokens changes the bridge's answer
        assert not torch.allclose(bridge(h, padded)[1], bridge(h, mask)[1])


def test_unsplittable_teachers_are_one_line_errors():
    with pytest.raises(KDForgeError, match="cannot build a knowledge bridge from a Sequential.*supported: kdforge's"):
        knowledge_bridge(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(KDForgeError, match="LlamaForCausalLM.*BertForSequenceClassification"):
        knowledge_bridge(tiny_llama(50, 16, layers=2))
    from transformers import BertForTokenClassification

    with pytest.raises(KDForgeError, match="BertForTokenClassification.*with a pooler"):  # no pooler: per-token
        knowledge_bridge(BertForTokenClassification(tiny_bert(50).config))


# ------------------------------------------------------------------------------------------ loss


def _kd_by_hand(target: list[list[float]], learner: list[list[float]], t: float) -> float:
    """T^2 * mean_i sum_c q_ic log(q_ic / p_ic), q = softmax(target / T), p = softmax(learner / T)."""
    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]
    rows = [sum(q * math.log(q / p) for q, p in zip(softmax(a), softmax(b), strict=True))
            for a, b in zip(target, learner, strict=True)]
    return t * t * sum(rows) / len(rows)


def _ce_by_hand(logits: list[list[float]], labels: list[int]) -> float:
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels, strict=True)) / len(
        labels)


def test_terms_equal_the_papers_formula_on_known_logits():
    s = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    b = [[0.0, 1.0, 0.0], [2.0, -1.0, 1.0]]
    t = [[3.0, 0.0, 0.0], [0.0, 0.0, 4.0]]
    y = [0, 2]
    got = sokd_terms(torch.tensor(s), torch.tensor(b), torch.tensor(t), torch.tensor(y), 4.0)
    assert set(got) == set(TERMS)
    assert got["kd_bridge"].item() == pytest.approx(_kd_by_hand(b, s, 4.0), rel=1e-5)
    assert got["bridge_kd_teacher"].item() == pytest.approx(_kd_by_hand(t, b, 4.0), rel=1e-5)
    assert got["bridge_kd_student"].item() == pytest.approx(_kd_by_hand(s, b, 4.0), rel=1e-5)
    assert got["bridge_ce"].item() == pytest.approx(_ce_by_hand(b, y), rel=1e-6)
    # KD is not symmetric: the two KD terms between student and bridge are different numbers
    assert got["kd_bridge"].item() != pytest.approx(got["bridge_kd_student"].item(), rel=1e-3)


def _vision_step(params: SOKDParams | None = None):
    torch.manual_seed(0)
    teacher, student = build_vision_net("resnet8", 10).eval(), build_vision_net("small_cnn", 10)
    bridge = knowledge_bridge(teacher)
    loss = WeightedLoss.from_config([ObjectiveConfig(name="ce")], ["teacher"])
    source = LiveTeacher(ModelAdapter(teacher, hook_paths=bridge.hook_paths, teacher=True))
    step = SOKDStep(ModelAdapter(student), loss, "teacher", source, bridge, params or SOKDParams())
    batch = {"pixel_values": torch.randn(6, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3, 4, 5])}
    return step.train(), teacher, student, batch


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_gradients_reach_exactly_the_right_parameters():
    step, teacher, student, batch = _vision_step()
    assert teacher.training is False and step.bridge.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    trainable = {n.split(".")[0] for n, p in step.named_parameters() if p.requires_grad}
    assert trainable == {"learner", "bridge"}  # the optimizer's parameters: never the teacher's
    student_loss, bridge_loss, _ = step.losses(batch, Progress())

    student_loss.backward(retain_graph=True)  # the student's loss: CE + KD from the (detached) bridge
    assert all(g is not None for g in _grads(student)) and any(g.abs().sum() > 0 for g in _grads(student))
    assert all(g is None for g in _grads(step.bridge)) and all(g is None for g in _grads(teacher))

    step.zero_grad(set_to_none=True)
    bridge_loss.backward()  # the bridge's loss: CE + KD from the teacher + KD from the (detached) student
    assert all(g is not None for g in _grads(step.bridge)) and any(g.abs().sum() > 0 for g in _grads(step.bridge))
    assert all(g is None for g in _grads(student)) and all(g is None for g in _grads(teacher))


def test_step_loss_is_the_weighted_sum_and_logs_every_term():
    weights = dict(kd_weight=0.5, bridge_ce_weight=2.0, bridge_kd_teacher_weight=3.0, bridge_kd_student_weight=0.25)
    step, _, _, batch = _vision_step(SOKDParams(temperature=2.0, **weights))
    total, terms = step(batch, Progress())
    assert set(terms) == {"ce", *TERMS}
    expected = (terms["ce"] + 0.5 * terms["kd_bridge"] + 2.0 * terms["bridge_ce"] + 3.0 * terms["bridge_kd_teacher"]
                + 0.25 * terms["bridge_kd_student"])
    assert total.item() == pytest.approx(expected, rel=1e-5)
    state = step.checkpoint_state()
    assert any(k.startswith("bridge.stage.") for k in state) and any(k.startswith("bridge.fc.") for k in state)
    assert not any(k.startswith("frozen.") for k in state)


# ------------------------------------------------------------------------------------------ checks


def _digits_tree(tmp_path: Path, teacher: str = "vision:resnet8", **stage) -> dict:
    return {"task": {"name": "digits", "validation": 0.2, "train_limit": 400},
            "teacher": {"model": teacher},
            "student": {"model": "vision:small_cnn"},
            "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "seed": 0, "device": "cpu", "checkpoint_every": 4},
            "eval": {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0},
            "stages": [{"name": "distill", "objectives": [{"name": "ce"}], "strategy": {"name": "sokd"}, **stage}],
            "output_dir": str(tmp_path / "run")}


def test_sokd_is_registered():
    assert "sokd" in strategy_names()


@pytest.mark.parametrize("change, message", [
    ({"teacher_source": "cache"}, r"stage 'distill': strategy sokd runs the teacher live.*stages\.0\.teacher_source"),
    ({"objectives": [{"name": "ce"}, {"name": "hinton_kd"}]}, r"objectives\.1 \(hinton_kd\) reads a teacher"),
    ({"strategy": {"name": "sokd", "temprature": 2}}, r"stages\.0\.strategy"),
    ({"strategy": {"name": "sokd", "kd_weight": -1}}, r"kd_weight"),
])
def test_bad_stages_are_refused_before_training(tmp_path, change, message):
    with pytest.raises(KDForgeError, match=message):
        check_stages(validate_config(_digits_tree(tmp_path, **change)))


def test_exactly_one_teacher_and_labelled_data(tmp_path):
    tree = _digits_tree(tmp_path)
    check_stages(validate_config(tree))  # the plain stage passes
    two = {**tree, "teachers": {"t2": {"model": "vision:resnet8"}}}
    with pytest.raises(KDForgeError, match=r"needs exactly 1 teacher role \(got teacher, t2\).*stages\.0\.teachers"):
        check_stages(validate_config(two))
    check_stages(validate_config({**two, "stages": [{**tree["stages"][0], "teachers": ["t2"]}]}))
    ptp_first = {**tree, "stages": [{**tree["stages"][0], "name": "ptp", "data": "ptp"},
                                    {"name": "distill", "objectives": [{"name": "ce"}]}]}
    with pytest.raises(KDForgeError, match=r"stages\.0\.data: task"):
        check_stages(validate_config(ptp_first))


# ------------------------------------------------------------------------------------------ end to end



@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> str:
    """A ResNet8 fine-tuned on 320 digits for 2 epochs, saved as a kdforge export."""
    base = tmp_path_factory.mktemp("sokd-teacher")
    config = validate_config({"task": {"name": "digits", "validation": 0.2, "train_limit": 400},
                              "teacher": {"model": "vision:resnet8",
                                          "finetune": {"epochs": 2, "lr": 3e-3, "batch_size": 32}},
                              "train": {"device": "cpu"}, "output_dir": str(base)})
    jobs.run_finetune(config)
    return str(base / "teacher" / "model")


def test_vision_run_learns_and_resumes_exactly_after_a_kill(tmp_path, digits_teacher):
    def config(name: str):
        tree = _digits_tree(tmp_path, teacher=digits_teacher)
        return validate_config({**tree, "output_dir": str(tmp_path / name)})

    reference = jobs.run_distill(config("ref"))
    assert reference.student.metrics["accuracy"] > 0.3  # 10 classes, 20 steps
    history = json.loads((tmp_path / "ref/metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [10, 20]
    assert all(f"loss:{n}" in h for h in history for n in ("ce", *TERMS))
    assert history[1]["loss:bridge_ce"] < history[0]["loss:bridge_ce"]  # the bridge learns the task too

    with pytest.raises(Killed):  # mid-epoch 2, after the checkpoint at step 12 (10 steps per epoch)
        jobs.run_distill(config("run"), callbacks=[kill_at(14)])
    resumed = jobs.run_distill(config("run"), resume=True)
    assert resumed.student.metrics == reference.student.metrics
    new_history = json.loads((tmp_path / "run/metrics.json").read_text())["history"]
    for ref, new in zip(history, new_history, strict=True):
        for key in ("loss", *(f"loss:{n}" for n in TERMS)):
            assert new[key] == pytest.approx(ref[key], abs=1e-6), key


def test_text_run_from_a_config_dict(job_tree):
    tree = copy.deepcopy(job_tree)
    tree["stages"] = [{"name": "distill", "objectives": [{"name": "ce"}], "strategy": {"name": "sokd"}}]
    result = jobs.run_distill(validate_config(tree))
    history = json.loads((Path(tree["output_dir"]) / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(f"loss:{n}" in h for h in history for n in ("ce", *TERMS))
    assert all(math.isfinite(h[f"loss:{n}"]) and h[f"loss:{n}"] >= 0 for h in history for n in TERMS)
    assert history[1]["loss:ce"] < history[0]["loss:ce"] and history[1]["loss:bridge_ce"] < history[0]["loss:bridge_ce"]
    # the synthetic task is learnable: a teacher that knows it, and a student that learns it in 2 epochs
    assert result.teacher.metrics["accuracy"] >= 0.9 and result.student.metrics["accuracy"] >= 0.9
