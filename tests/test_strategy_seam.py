"""The strategy seam: what the base class checks for every strategy, the Distiller taking any strategy
by name, learning rates per part of a stage, and the temperature a strategy reads a cached teacher at."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import kdforge
from kdforge import jobs
from kdforge.config import validate_config
from kdforge.engine.step import TrainStep
from kdforge.engine.trainer import param_groups
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Objective
from kdforge.recipes.base import STRATEGIES, Strategy
from kdforge.recipes.catalog import check_stages, load_recipes


def mlp(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return DataLoader(torch.utils.data.Subset(data, range(640)), batch_size=64)


@pytest.fixture(scope="module")
def two_teachers(digits, tmp_path_factory):
    torch.manual_seed(0)
    teachers = {"a": mlp(64), "b": mlp(32)}
    for role, teacher in teachers.items():
        kdforge.Distiller(None, teacher, objectives=["ce"], output_dir=tmp_path_factory.mktemp(role)).fit(
            digits, epochs=3, lr=3e-3, device="cpu")
    return teachers


# ---------------------------------------------------------------------------- checks of every strategy


class Bare(Strategy):
    """A strategy that says only how many teachers it takes and what its batches carry (no check of its own)."""

    teacher_count = (1, 1)
    needs = frozenset({"gold_labels"})


def test_the_base_class_checks_roles_terms_and_data_before_training(job_tree):
    load_recipes()
    if "bare_for_tests" not in STRATEGIES:
        STRATEGIES.register("bare_for_tests")(Bare)
    stage = {"name": "s", "objectives": [{"name": "ce"}], "strategy": {"name": "bare_for_tests"}}
    check = lambda tree: check_stages(validate_config(tree))  # noqa: E731
    check({**job_tree, "stages": [stage]})
    two = {**job_tree, "teachers": {"t2": {"model": job_tree["teacher"]["model"]}}}
    with pytest.raises(KDForgeError, match=r"stage 's' \(stages\.0\): strategy bare_for_tests needs exactly 1 teacher "
                                           r"role \(got teacher, t2\); list them in stages\.0\.teachers"):
        check({**two, "stages": [stage]})
    unbound = {**stage, "teachers": ["teacher"], "objectives": [{"name": "hinton_kd", "teacher": "t2"}]}
    with pytest.raises(KDForgeError, match="learns from 't2', which does not teach in this stage"):
        check({**two, "stages": [unbound]})
    ptp_first = {**job_tree, "stages": [{**stage, "name": "p", "data": "ptp"}, {"name": "s", "objectives": []}]}
    with pytest.raises(KDForgeError, match=r"needs batches with the task's own labels \(`labels`, not relabelled\), "
                                           r"which `data: ptp` does not give; set stages\.0\.data: task"):
        check(ptp_first)
    with pytest.raises(KDForgeError, match=r"unknown strategy 'nope' \(config key `stages\.0\.strategy\.name`\)"):
        check({**job_tree, "stages": [{**stage, "strategy": {"name": "nope"}}]})


# ---------------------------------------------------------------------------- the Distiller takes any strategy


def test_the_distiller_builds_any_registered_strategy(tmp_path, digits, two_teachers):
    """multi_teacher (average) builds, through the same loss builder, exactly the loss of offline with one
    Hinton term per teacher: the two runs train identically."""
    runs = {}
    for name, kwargs in {
        "offline": {"objectives": ["ce", {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0, "teacher": "a"},
                                   {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0, "teacher": "b"}]},
        "multi_teacher": {"objectives": ["ce"], "strategy": "multi_teacher",
                          "strategy_params": {"weighting": "average", "temperature": 2.0, "kd_weight": 1.0}},
    }.items():
        torch.manual_seed(1)
        distiller = kdforge.Distiller(two_teachers, mlp(16), output_dir=tmp_path / name, **kwargs)
        assert distiller.module is None  # built by the first fit, when the data is known
        state = distiller.fit(digits, digits, epochs=3, lr=1e-2, device="cpu")
        assert distiller.module.loss.roles == [None, "a", "b"]
        assert all(not p.requires_grad for p in distiller.module.frozen.parameters())
        runs[name] = [(h["loss"], h["accuracy"]) for h in state.history]
    assert runs["offline"] == runs["multi_teacher"] and runs["offline"][-1][1] > 0.6


def test_the_distiller_runs_an_online_strategy(tmp_path, digits):
    """dml through the API: the peer trains with the student (here at its own learning rate)."""
    torch.manual_seed(0)
    peer = mlp(32)
    before = [p.detach().clone() for p in peer.parameters()]
    distiller = kdforge.Distiller({"peer": peer}, mlp(16), objectives=[], strategy="dml", output_dir=tmp_path)
    state = distiller.fit(digits, digits, epochs=2, lr=1e-2, device="cpu", lr_by_role={"peer": 1e-3})
    assert {"loss:ce:peer", "loss:kl:student"} <= set(state.history[-1])
    assert sorted(distiller.module.parts()) == ["peer", "student"]
    assert any(not torch.equal(a, b) for a, b in zip(before, peer.parameters(), strict=True))
    with pytest.raises(KDForgeError, match="strategy amal reads the job's task, which a Distiller"):
        kdforge.Distiller(peer, mlp(16), objectives=["ce"], strategy="amal").fit(digits, epochs=1, device="cpu")


def test_the_distiller_refuses_what_the_strategy_cannot_do(two_teachers):
    with pytest.raises(KDForgeError, match="multi_teacher needs 2 or more teacher roles"):
        kdforge.Distiller(two_teachers["a"], mlp(8), strategy="multi_teacher")
    with pytest.raises(KDForgeError, match="unknown strategy 'nope'"):
        kdforge.Distiller(two_teachers, mlp(8), objectives=["ce"], strategy="nope")
    with pytest.raises(KDForgeError, match=r"strategy 'multi_teacher' \(stages\.0\.strategy\): `weighting`"):
        kdforge.Distiller(two_teachers, mlp(8), strategy="multi_teacher", strategy_params={"weighting": "x"})
    with pytest.raises(KDForgeError, match="train_teachers=True trains the teachers through the loss of strategy "
                                           "offline"):
        kdforge.Distiller(two_teachers, mlp(8), objectives=["ce"], strategy="multi_teacher", train_teachers=True)


# ---------------------------------------------------------------------------- learning rates per part


class Pair(TrainStep):
    def __init__(self):
        super().__init__()
        self.learner = mlp(8)
        self.peer = mlp(4)
        self.learner_role = "student"

    def parts(self):
        return {**super().parts(), "peer": self.peer}


def test_param_groups_default_is_unchanged_and_a_named_part_gets_its_own_rate():
    step = Pair()
    default = param_groups(step, 0.01)
    assert [sorted(g) for g in default] == [["params", "weight_decay"]] * 2  # no lr of their own: the optimizer's
    assert sum(len(g["params"]) for g in default) == 8
    groups = param_groups(step, 0.01, {"peer": 1e-3}, step.parts())
    assert len(groups) == 4 and "lr" not in groups[0] and "lr" not in groups[1]
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in step.peer.parameters()}
    assert all(g["lr"] == 1e-3 for g in groups[2:]) and [g["weight_decay"] for g in groups[2:]] == [0.01, 0.0]


def test_lr_by_role_reaches_the_optimizer_and_unknown_names_are_refused(tmp_path, digits, two_teachers):
    """Online KD through the API: the teacher (trained with the learner) gets its own rate; the rest keep `lr`."""
    seen = {}

    def record(trainer):
        seen.update({id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]})

    teacher = mlp(32)
    distiller = kdforge.Distiller(teacher, mlp(16), train_teachers=True, output_dir=tmp_path / "online")
    distiller.fit(digits, epochs=1, lr=3e-3, device="cpu", max_steps=2, callbacks=[record],
                  lr_by_role={"teacher": 1e-4})
    assert sorted(distiller.module.parts()) == ["student", "teacher"]
    assert {seen[id(p)] for p in teacher.parameters()} == {1e-4}
    assert {seen[id(p)] for p in distiller.student.parameters()} == {3e-3}
    with pytest.raises(KDForgeError, match=r"train\.lr_by_role: 'peer' is not a trained part of the Distiller's "
                                           r"step \(its parts: student, teacher\)"):
        distiller.fit(digits, epochs=1, device="cpu", lr_by_role={"peer": 1e-3})


@pytest.mark.slow
def test_a_dml_peer_trains_at_its_own_rate_from_a_config(job_tree):
    seen = {}

    def record(trainer):
        for group in trainer.optimizer.param_groups:
            seen.setdefault(group.get("initial_lr"), set()).update(id(p) for p in group["params"])

    tree = {**job_tree, "teacher": {"model": job_tree["teacher"]["model"]},
            "task": {**job_tree["task"], "train_limit": 64, "eval_limit": 32},
            "assistants": {"peer": {"layers": [1, 2]}},
            "stages": [{"name": "s", "teachers": ["peer"], "objectives": [], "strategy": {"name": "dml"},
                        "train": {"epochs": 1, "lr_by_role": {"peer": 1e-4}}}]}
    result = jobs.run_distill(validate_config(tree), callbacks=[record])
    assert set(seen) == {1e-4, job_tree["train"]["lr"]}
    assert result.student.metrics["accuracy"] >= 0


# ---------------------------------------------------------------------------- the temperature the cache is built at


class ReadsAtSeven(Objective):
    """A term that reads its teacher at T = 7 (it declares it; it has no ``temperature`` parameter)."""

    teacher_temperature = 7.0

    def forward(self, student: Outputs, teacher: Outputs | None, batch, progress) -> torch.Tensor:
        return (student.logits - teacher.logits).pow(2).mean()


def test_a_cached_teacher_is_built_at_the_temperature_it_is_read_at(tmp_path, job_tree):
    """With top_k the cache is exact at one temperature: the one the strategy declares for the role, else
    the one its terms declare (``Objective.teacher_temperature``: by default their ``temperature``)."""
    from kdforge.models.loading import load_model
    from kdforge.objectives.composite import WeightedLoss
    from kdforge.recipes.base import StageContext
    from kdforge.recipes.catalog import data_source_for
    from kdforge.recipes.teacher_sources import CachedTeacher, bound_temperature, teacher_sources
    from kdforge.tasks.base import build_task

    folder = tmp_path / "cache"
    tree = {**job_tree, "teacher": {"model": job_tree["teacher"]["model"]},
            "teacher_cache": {"folder": str(folder), "top_k": 1},
            "objectives": [{"name": "ce"}, {"name": "hinton_kd", "temperature": 2.0}]}
    config = validate_config(tree)
    stage = config.all_stages()[0]
    task = build_task(config.task)
    teacher = load_model(config.teacher.model, task)
    data = data_source_for(stage, 0).build(stage, task, teacher, config, "cpu")

    def tags(loss, **kwargs) -> set[str]:
        ctx = StageContext(config, stage, 0, data, "student", teacher, {"teacher": teacher}, data.train,
                           data.collator(teacher.tokenizer, train=True), "cpu", task=task)
        sources = teacher_sources(ctx, loss, {}, **kwargs)
        assert isinstance(sources["teacher"], CachedTeacher)
        return {p.name.split("-")[2] for p in folder.glob("*.pt")}

    ctx_loss = WeightedLoss.from_config(stage.objectives, ["teacher"])
    assert bound_temperature(ctx_loss, "teacher") == 2.0
    assert tags(ctx_loss) == {"k1T2"}  # the terms' temperature
    assert tags(ctx_loss, temperatures={"teacher": 5.0}) == {"k1T2", "k1T5"}  # the strategy's, declared
    own = WeightedLoss.from_config([(ReadsAtSeven(), 1.0, None)], ["teacher"])
    assert bound_temperature(own, "teacher") == 7.0
    assert tags(own) == {"k1T2", "k1T5", "k1T7"}
