"""Online distillation: Deep Mutual Learning (dml) and BD-KD online (bdkd_online), where the stage's
teacher roles are trained together with the learner. Losses against hand computations, gradients
(each model only from its own loss), end to end on text and vision, exact resume of both models
after a kill, and the checks made before training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForSequenceClassification

from kdforge import jobs
from kdforge.config import ObjectiveConfig, validate_config
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import build_objective
from kdforge.objectives.bdkd import BDKD, BDKDParams
from kdforge.progress import Progress
from kdforge.recipes.bdkd_online import BDKDOnlineParams, bdkd_online_loss
from kdforge.recipes.catalog import check_stages
from kdforge.recipes.dml import dml_loss, dml_terms
from tests.helpers import Killed, kill_at

# ------------------------------------------------------------------------------------------------ math


def kl_by_hand(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) = sum_c p_c (log p_c - log q_c)."""
    return (p * (p.log() - q.log())).sum(-1)


def logits_set(seed: int, k: int, n: int = 5, c: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, c, generator=g) * (1 + i)).requires_grad_(True) for i in range(k)]


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dml_loss_is_the_papers_formula_by_hand(temperature):
    z = logits_set(0, 3)
    labels = torch.tensor([0, 3, 1, 2, 0])
    roles = ["student", "peer", "big"]
    total, logged = dml_loss(dict(zip(roles, z, strict=True)), labels, temperature, kl_weight=0.7)
    expected = 0.0
    for k, zk in enumerate(z):
        probs = (zk / 1.0).softmax(-1)
        ce = -probs.log()[torch.arange(5), labels].mean()
        pk = (zk / temperature).softmax(-1)
        kl = sum(kl_by_hand((zl / temperature).softmax(-1), pk).mean() for i, zl in enumerate(z) if i != k) / 2
        kl = kl * temperature**2
        assert logged[f"ce:{roles[k]}"] == pytest.approx(ce.item(), rel=1e-5)
        assert logged[f"kl:{roles[k]}"] == pytest.approx(kl.item(), rel=1e-5)
        expected = expected + ce + 0.7 * kl
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dml_each_model_gets_gradient_only_from_its_own_loss():
    z = logits_set(1, 3)
    labels = torch.tensor([1, 0, 3, 3, 2])
    logits = dict(zip(["a", "b", "c"], z, strict=True))
    total, _ = dml_loss(logits, labels, temperature=2.0)
    grads = torch.autograd.grad(total, z)
    for k, zk in enumerate(z):
        # L_k computed by hand with the other models' distributions as constants
        pk = (zk / 2.0).log_softmax(-1)
        kl = sum((zl.detach() / 2.0).softmax(-1).mul((zl.detach() / 2.0).log_softmax(-1) - pk).sum(-1).mean()
                 for i, zl in enumerate(z) if i != k) / 2 * 4.0
        own = torch.autograd.grad(F.cross_entropy(zk, labels) + kl, zk)[0]
        assert torch.allclose(grads[k], own, atol=1e-6)
    # and no term of another model reaches z_k at all (its target side is detached)
    terms = dml_terms(logits, labels, 2.0)
    for role, (ce, kl) in terms.items():
        others = [zk for r, zk in logits.items() if r != role]
        assert all(g is None for g in torch.autograd.grad(ce + kl, others, allow_unused=True, retain_graph=True))
    # had the targets not been detached, z_k would also get gradient from the others' KL terms
    undetached = sum(F.cross_entropy(zk, labels) + 4.0 / 2 * sum(
        kl_by_hand((zl / 2.0).softmax(-1), (zk / 2.0).softmax(-1)).mean() for i, zl in enumerate(z) if i != k)
        for k, zk in enumerate(z))
    assert not torch.allclose(torch.autograd.grad(undetached, z[0])[0], grads[0], atol=1e-4)


def entropy(z: torch.Tensor, t: float) -> torch.Tensor:
    p = (z / t).softmax(-1)
    return -(p * p.log()).sum(-1)


def bdkd_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits whose samples cover the three cases of the balance: student more
    confident (sample 0), less confident (sample 1), equally confident (sample 2: the same logits)."""
    s = torch.tensor([[6.0, 0.0, -1.0], [0.3, 0.1, 0.0], [1.0, -2.0, 0.5], [-1.0, 2.0, 0.0]])
    t = torch.tensor([[1.0, 0.5, 0.0], [5.0, -1.0, 0.0], [1.0, -2.0, 0.5], [0.0, 3.0, -2.0]])
    return s.requires_grad_(True), t.requires_grad_(True)


@pytest.mark.parametrize("rule", ["reverse", "balanced"])
def test_bdkd_online_student_term_is_the_offline_objective_and_the_teachers_its_rule(rule):
    s, t = bdkd_logits()
    labels = torch.tensor([0, 0, 2, 1])
    T, delta = 2.0, 3.0
    params = BDKDOnlineParams(temperature=T, delta=delta, ce_weight=0.5, kd_weight=2.0, teacher_ce_weight=0.25,
                              teacher_kd_weight=4.0, teacher_rule=rule)
    total, logged = bdkd_online_loss(s, t, labels, BDKD(BDKDParams(temperature=T, delta=delta)), params, Progress(),
                                     ("student", "teacher"))
    h_s, h_t = entropy(s, T), entropy(t, T)
    assert h_s[0] < h_t[0] and h_s[1] > h_t[1] and h_s[2] == h_t[2]

    offline = build_objective(ObjectiveConfig(name="bdkd", temperature=T, delta=delta))
    student_term = offline(Outputs(s), Outputs(t), {"labels": labels}, Progress())
    assert logged["bdkd:student"] == pytest.approx(student_term.item(), rel=1e-6)

    p_s, p_t = (s / T).softmax(-1), (t / T).softmax(-1)
    reverse = (T**2 * kl_by_hand(p_t, p_s)).mean()  # KL(p_t || p_s): the teacher's distribution first
    if rule == "reverse":  # the default: a reverse-KL regulariser, no balance
        assert BDKDOnlineParams().teacher_rule == "reverse"
        teacher_term = reverse
        assert logged["bdkd:teacher"] == pytest.approx(reverse.item(), rel=1e-6)
        assert abs(logged["bdkd:teacher"] - logged["bdkd:student"]) > 1e-2
    else:
        # the student's balance with the roles swapped: (w'_F, w'_R) = (delta, 1) where H(p_t) < H(p_s), ...
        w_f = torch.where(h_t < h_s, delta, 1.0)   # on KL(p_s || p_t)
        w_r = torch.where(h_t > h_s, delta, 1.0)   # on KL(p_t || p_s)
        assert w_f.tolist()[:3] == [1.0, delta, 1.0] and w_r.tolist()[:3] == [delta, 1.0, 1.0]
        teacher_term = (T**2 * (w_f * kl_by_hand(p_s, p_t) + w_r * kl_by_hand(p_t, p_s))).mean()
        assert logged["bdkd:teacher"] == pytest.approx(teacher_term.item(), rel=1e-6)
        # the swapped rule weighs each KL direction as the student's does: the same value (see the docstring)
        assert logged["bdkd:teacher"] == pytest.approx(logged["bdkd:student"], rel=1e-6)
        unswapped = (T**2 * (w_r * kl_by_hand(p_s, p_t) + w_f * kl_by_hand(p_t, p_s))).mean()
        assert abs(unswapped.item() - teacher_term.item()) > 1e-3

    ce_s, ce_t = F.cross_entropy(s, labels), F.cross_entropy(t, labels)
    assert logged["ce:student"] == pytest.approx(ce_s.item()) and logged["ce:teacher"] == pytest.approx(ce_t.item())
    assert total.item() == pytest.approx((0.5 * ce_s + 2.0 * student_term + 0.25 * ce_t + 4.0 * teacher_term).item(),
                                         rel=1e-6)

    # gradients: each model only from its own loss, the other side detached
    g_s, g_t = torch.autograd.grad(total, [s, t])
    own_s = torch.autograd.grad(0.5 * F.cross_entropy(s, labels) + 2.0 * offline(Outputs(s), Outputs(t.detach()), {},
                                                                                  Progress()), s)[0]
    if rule == "reverse":
        q_t, q_s = (t / T).softmax(-1), (s.detach() / T).softmax(-1)
        teacher_kd = (T**2 * kl_by_hand(q_t, q_s)).mean()
    else:
        teacher_kd = offline(Outputs(t), Outputs(s.detach()), {}, Progress())
    own_t = torch.autograd.grad(0.25 * F.cross_entropy(t, labels) + 4.0 * teacher_kd, t)[0]
    assert torch.allclose(g_s, own_s, atol=1e-6) and torch.allclose(g_t, own_t, atol=1e-6)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def captured(monkeypatch) -> list[tuple[dict, dict]]:
    """Every ``jobs.load_models`` call of the test: (the weights as built, the job's models), so a test
    can compare a role's weights before and after training."""
    calls = []
    real = jobs.load_models

    def load_models(config, task, *args, **kwargs):
        models = real(config, task, *args, **kwargs)
        calls.append(({r: copy.deepcopy(m.model.state_dict()) for r, m in models.items()}, models))
        return models

    monkeypatch.setattr(jobs, "load_models", load_models)
    return calls


def changed(before: dict, model: torch.nn.Module) -> bool:
    after = model.state_dict()
    return any(not torch.equal(before[k], v) for k, v in after.items() if v.is_floating_point())


def digits_tree(tmp_path: Path, name: str, strategy: dict, rows: int = 512, **roles) -> dict:
    return {"task": {"name": "digits", "validation": 0.2, "train_limit": rows, "eval_limit": 200},
            "teacher": {"model": "vision:resnet8"}, "student": {"model": "vision:small_cnn"}, **roles,
            "stages": [{"name": "online", "objectives": [], "strategy": strategy,
                        **({"teachers": list(roles["assistants"])} if "assistants" in roles else {})}],
            "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "seed": 0, "device": "cpu", "checkpoint_every": 2},
            "eval": {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0},
            "output_dir": str(tmp_path / name)}


@pytest.mark.slow
def test_dml_on_text_from_the_command_line(tmp_path, job_tree, captured):
    """A tiny BERT student and a 2-layer assistant peer learn from each other; the job's teacher
    is not in the stage and stays as it was."""
    from kdforge.cli import main

    tree = {**job_tree, "teacher": {"model": job_tree["teacher"]["model"]},
            "task": {**job_tree["task"], "train_limit": 128, "eval_limit": 64},
            "assistants": {"peer": {"layers": [1]}},  # a 1-layer peer for a 2-layer student
            "stages": [{"name": "mutual", "teachers": ["peer"], "objectives": [],
                        "strategy": {"name": "dml", "temperature": 2.0}}]}
    path = tmp_path / "dml.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main(["distill", str(path)]) == 0
    (before, models), = captured
    assert changed(before["peer"], models["peer"].model) and changed(before["student"], models["student"].model)
    assert not changed(before["teacher"], models["teacher"].model)
    metrics = json.loads((Path(job_tree["output_dir"]) / "metrics.json").read_text())
    assert {"loss:ce:student", "loss:kl:student", "loss:ce:peer", "loss:kl:peer"} <= set(metrics["history"][0])
    assert "peer" in metrics["other_roles"]  # the trained peer is scored in the report


@pytest.mark.slow
def test_bdkd_online_on_digits_trains_teacher_and_student(tmp_path, captured):
    config = validate_config(digits_tree(tmp_path, "bdkd", {"name": "bdkd_online"}))
    result = jobs.run_distill(config)
    (before, models), = captured
    assert changed(before["teacher"], models["teacher"].model) and changed(before["student"], models["student"].model)
    metrics = json.loads((tmp_path / "bdkd/metrics.json").read_text())
    history = metrics["history"]
    assert {"loss:ce:teacher", "loss:bdkd:teacher", "loss:ce:student", "loss:bdkd:student"} <= set(history[0])
    assert history[1]["loss"] < history[0]["loss"]
    assert result.student.metrics["accuracy"] > 0.3 and result.teacher.metrics["accuracy"] > 0.3  # 10 classes



@pytest.mark.slow
def test_dml_resumes_exactly_after_a_kill_both_models(tmp_path, captured, kdlog):
    """Student (small CNN) and an assistant peer (ResNet8), killed mid-epoch 2 after a checkpoint:
    the resumed run ends with the same weights of BOTH models as an uninterrupted one."""
    tree = lambda name: validate_config(digits_tree(  # noqa: E731
        tmp_path, name, {"name": "dml"}, rows=256, assistants={"peer": {"model": "vision:resnet8"}}))
    jobs.run_distill(tree("ref"))

    with pytest.raises(Killed):  # 4 steps an epoch (204 rows), a checkpoint every 2: killed at batch 3 of epoch 2
        jobs.run_distill(tree("run"), callbacks=[kill_at(7)])
    kdlog.clear()
    jobs.run_distill(tree("run"), resume=True)
    assert any("resumed from" in r.getMessage() and "at step 6" in r.getMessage() for r in kdlog)
    (ref_before, ref), _, (_, resumed) = captured
    for role in ("student", "peer"):
        assert changed(ref_before[role], ref[role].model)
        a, b = ref[role].model.state_dict(), resumed[role].model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
    ref_hist = json.loads((tmp_path / "ref/metrics.json").read_text())["history"]
    new_hist = json.loads((tmp_path / "run/metrics.json").read_text())["history"]
    assert [h["loss"] for h in new_hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-6)


# ----------------------------------------------------------------------------------------------- checks


def stage_tree(job_tree, strategy: str | dict = "dml", **stage) -> dict:
    return {**job_tree, "assistants": {"peer": {"layers": [0, 1]}, "peer2": {"layers": [2, 3]}},
            "stages": [{"name": "s", "teachers": ["peer"], "objectives": [],
                        "strategy": strategy if isinstance(strategy, dict) else {"name": strategy}, **stage}]}


def test_online_stages_are_checked_before_training(job_tree):
    check = lambda tree: check_stages(validate_config(tree))  # noqa: E731
    check(stage_tree(job_tree))  # fine as it is
    check(stage_tree(job_tree, "bdkd_online", teachers=["teacher"]))
    with pytest.raises(KDForgeError, match=r"stages\.0\.teacher_source: live"):
        check(stage_tree(job_tree, teacher_source="cache"))
    with pytest.raises(KDForgeError, match=r"needs 1 or more teacher role.*got none.*stages\.0\.teachers"):
        check(stage_tree(job_tree, teachers=[]))
    with pytest.raises(KDForgeError, match="needs exactly 1 teacher role"):
        check(stage_tree(job_tree, "bdkd_online", teachers=["peer", "peer2"]))
    regression = {**stage_tree(job_tree), "task": {**job_tree["task"], "problem_type": "regression"}}
    with pytest.raises(KDForgeError, match="a regression task"):
        check(regression)
    with pytest.raises(KDForgeError, match=r"ignores `objectives`; set stages\.0\.objectives: \[\]"):
        check(stage_tree(job_tree, objectives=[{"name": "ce"}]))
    two = stage_tree(job_tree)
    two["stages"].append({"name": "last", "objectives": [{"name": "ce"}]})
    with pytest.raises(KDForgeError, match="must be the recipe's last stage"):
        check(two)
    with pytest.raises(KDForgeError, match="temperature"):
        check(stage_tree(job_tree, {"name": "dml", "temperature": 0}))


@pytest.mark.slow
def test_bdkd_online_on_text_from_the_api_exports_the_trained_teacher(tmp_path, job_tree, captured):
    """BD-KD online on the tiny BERT through the Python API: both models learn, and the co-trained
    teacher is exported to models/teacher/ and measured in the report beside the student."""
    import kdforge

    tree = {**job_tree, "teacher": {"model": job_tree["teacher"]["model"]},
            "task": {**job_tree["task"], "train_limit": 128, "eval_limit": 64},
            "stages": [{"name": "online", "objectives": [], "strategy": {"name": "bdkd_online"}}]}
    result = kdforge.distill(tree)
    (before, models), = captured
    assert changed(before["teacher"], models["teacher"].model) and changed(before["student"], models["student"].model)
    run = Path(job_tree["output_dir"])
    assert (run / "models/teacher/config.json").is_file()
    exported = AutoModelForSequenceClassification.from_pretrained(run / "models/teacher").state_dict()
    trained = models["teacher"].model.state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in exported if k in trained)
    assert result.teacher.latency["batch_sizes"] and result.student.latency["batch_sizes"]
