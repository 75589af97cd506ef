"""Who teaches: roles, terms bound to roles, several teachers (average, CA-MKD), teacher-assistant
chains (TAKD), DE-weighted assistant ensembles and CES-KD, end to end on tiny models, with exact
resume after a kill for every strategy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from kdforge import jobs
from kdforge.config import ObjectiveConfig, validate_config
from kdforge.errors import KDForgeError
from kdforge.models.outputs import Outputs
from kdforge.objectives.composite import WeightedLoss
from kdforge.objectives.logit import kd_kl_loss
from kdforge.progress import Progress
from kdforge.recipes.catalog import check_stages
from tests.helpers import Killed, kill_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digit_teachers(tmp_path_factory) -> dict[str, str]:
    """Three small nets trained on digits (two ResNet8 seeds, one small CNN), saved as kdforge exports."""
    base = tmp_path_factory.mktemp("digit-teachers")
    folders = {}
    nets = (("r8a", "vision:resnet8", 0), ("r8b", "vision:resnet8", 1), ("cnn", "vision:small_cnn", 2))
    for name, model, seed in nets:
        config = validate_config({"task": {"name": "digits", "validation": 0.2},
                                  "teacher": {"model": model, "finetune": {"epochs": 2, "lr": 3e-3, "batch_size": 64,
                                                                           "seed": seed}},
                                  "train": {"device": "cpu"}, "output_dir": str(base / name)})
        jobs.run_finetune(config)
        folders[name] = str(base / name / "teacher" / "model")
    return folders


def digits_job(tmp_path: Path, name: str, **sections) -> dict:
    return {"task": {"name": "digits", "validation": 0.2},
            "student": {"model": "vision:small_cnn"},
            "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "seed": 0, "device": "cpu", "checkpoint_every": 4},
            "eval": {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0},
            "teacher_cache": {"folder": str(tmp_path / "cache")},
            "output_dir": str(tmp_path / name), **sections}


def three_teachers(folders: dict[str, str]) -> dict:
    return {"teachers": {role: {"model": path} for role, path in folders.items()}}


STRATEGY_JOBS = {
    "camkd": lambda f: {**three_teachers(f), "stages": [{"name": "distill", "objectives": [{"name": "ce"}],
                                                         "strategy": {"name": "multi_teacher"}}]},
    "average": lambda f: {**three_teachers(f), "stages": [{"name": "distill", "objectives": [{"name": "ce"}],
                                                           "strategy": {"name": "multi_teacher",
                                                                        "weighting": "average"}}]},
    "ensemble": lambda f: {**three_teachers(f), "stages": [{
        "name": "distill", "objectives": [{"name": "ce", "weight": 0.5},
                                          {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0}],
        "strategy": {"name": "assistant_ensemble", "maxiter": 5}}]},
    "ces_kd": lambda f: {**three_teachers(f), "stages": [{
        "name": "distill", "objectives": [{"name": "ce", "weight": 0.5}], "teachers": ["cnn", "r8b", "r8a"],
        "strategy": {"name": "ces_kd", "kd_weight": 0.5}}]},
    "amal": lambda f: {**three_teachers(f), "stages": [{
        "name": "distill", "objectives": [{"name": "ce", "weight": 0.5},
                                          {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0, "teacher": "r8a"}],
        "strategy": {"name": "amal", "meta_lr": 2000.0}}]},
    "takd": lambda f: {"teacher": {"model": f["r8a"]}, "assistants": {"ta": {"model": "vision:resnet8"}},
                       "stages": [{"name": "assistant", "learner": "ta", "teachers": ["teacher"],
                                   "objectives": [{"name": "ce", "weight": 0.5},
                                                  {"name": "hinton_kd", "weight": 0.5, "reduction": "mean"}]},
                                  {"name": "student", "teachers": ["ta"],
                                   "objectives": [{"name": "ce", "weight": 0.5},
                                                  {"name": "hinton_kd", "weight": 0.5}]}]},
}



@pytest.mark.parametrize("strategy", list(STRATEGY_JOBS))
def test_every_strategy_runs_and_resumes_exactly_after_a_kill(tmp_path, digit_teachers, strategy):
    tree = lambda name: validate_config(digits_job(tmp_path, name, **STRATEGY_JOBS[strategy](digit_teachers)))  # noqa: E731
    reference = kdforge.distill(tree("ref"))  # the Python API
    assert reference.student.metrics["accuracy"] > 0.3  # learnt something in 2 short epochs (10 classes)
    last_stage = tree("x").all_stages()[-1].name
    with pytest.raises(Killed):  # in the last stage, mid-epoch 2, after a checkpoint at step 20 (18 steps per epoch)
        jobs.run_distill(tree("run"), callbacks=[kill_at(22, stage=last_stage)])
    resumed = jobs.run_distill(tree("run"), resume=True)
    assert resumed.student.metrics == reference.student.metrics
    ref_hist = json.loads((tmp_path / "ref/metrics.json").read_text())["history"]
    new_hist = json.loads((tmp_path / "run/metrics.json").read_text())["history"]
    assert [h["loss"] for h in new_hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-6)
    metrics = json.loads((tmp_path / "ref/metrics.json").read_text())
    assert metrics["selected_on"].startswith("validation") and metrics["reported_on"].startswith("test")
    if strategy == "takd":  # the assistant is trained by the first stage, scored in the report
        assert set(metrics["other_roles"]) == {"ta"}
    else:  # the primary teacher is in the table, the other two beside it
        assert set(metrics["other_roles"]) == {"r8b", "cnn"}
    report = (tmp_path / "ref/report.md").read_text()
    assert "## Every model and form (measured interleaved in one process)" in report
    assert all(f"| {role} |" in report for role in metrics["other_roles"])


def test_three_vision_teachers_from_the_command_line(tmp_path, digit_teachers):
    """CA-MKD with three teachers from a YAML file; its intermediate term starts in the second epoch."""
    from kdforge.cli import main

    path = tmp_path / "camkd.yaml"
    path.write_text(yaml.safe_dump(digits_job(tmp_path, "camkd", **STRATEGY_JOBS["camkd"](digit_teachers))))
    assert main(["distill", str(path)]) == 0
    history = json.loads((tmp_path / "camkd/metrics.json").read_text())["history"]
    assert len(history) == 2
    # CA-MKD's intermediate term (weight 50) is off in the first epoch and on from the second
    assert history[0]["loss:camkd_feature"] == 0 and history[1]["loss:camkd_feature"] > 0
    assert history[1]["loss"] > history[0]["loss"]


# ------------------------------------------------------------------------------------------- roles


def test_a_term_reads_the_teacher_it_is_bound_to():
    torch.manual_seed(0)
    student, t1, t2 = (Outputs(logits=torch.randn(4, 3)) for _ in range(3))
    loss = WeightedLoss.from_config([ObjectiveConfig(name="hinton_kd", temperature=2.0, teacher="t2")], ["t1", "t2"])
    value, terms = loss(student, {"t1": t1, "t2": t2}, {}, Progress())
    assert loss.roles == ["t2"] and loss.teacher_roles == ["t2"]
    assert value.item() == pytest.approx(kd_kl_loss(student.logits, t2.logits, 2.0).item())
    assert value.item() != pytest.approx(kd_kl_loss(student.logits, t1.logits, 2.0).item())


def test_roles_are_checked_before_training(job_tree):
    two = {**job_tree, "teachers": {"t2": {"model": job_tree["teacher"]["model"]}}}
    with pytest.raises(KDForgeError, match="say which with `teacher: NAME`"):  # hinton_kd, 2 teachers
        check_stages(validate_config(two))
    with pytest.raises(KDForgeError, match="'t3' cannot teach here"):
        validate_config({**two, "objectives": [{"name": "hinton_kd", "teacher": "t3"}]})
    with pytest.raises(KDForgeError, match="not `teacher`/`student`"):
        validate_config({**job_tree, "teachers": {"student": {"model": "x"}}})
    with pytest.raises(KDForgeError, match="learner: 'ta' is not"):
        validate_config({**job_tree, "stages": [{"name": "s", "learner": "ta", "objectives": [{"name": "ce"}]}]})
    with pytest.raises(KDForgeError, match="multi_teacher needs 2 or more teacher roles"):
        check_stages(validate_config({**job_tree, "stages": [{"name": "s", "objectives": [{"name": "ce"}],
                                                              "strategy": {"name": "multi_teacher"}}]}))
    with pytest.raises(KDForgeError, match="unknown strategy 'nope'"):
        check_stages(validate_config({**job_tree, "stages": [{"name": "s", "objectives": [{"name": "ce"}],
                                                              "strategy": {"name": "nope"}}]}))
    with pytest.raises(KDForgeError, match="weighting"):
        check_stages(validate_config({**two, "stages": [{"name": "s", "objectives": [{"name": "ce"}],
                                                         "strategy": {"name": "multi_teacher", "weighting": "x"}}]}))


def test_two_text_teachers_from_the_command_line(tmp_path, job_tree, tiny_teacher_dir, tokenizer_dir):
    """Two tiny BERT teachers (the second a different random init), each term naming its teacher;
    each frozen teacher is cached under its own fingerprint."""
    from transformers import AutoTokenizer

    from tests.helpers import tiny_bert

    other = tmp_path / "other-teacher"
    tiny_bert(len(AutoTokenizer.from_pretrained(tokenizer_dir)), seed=7).save_pretrained(other)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(other)
    tree = {**job_tree, "teacher": None,
            "teachers": {"t1": {"model": str(tiny_teacher_dir), "finetune": {"epochs": 2, "lr": 3e-3,
                                                                            "batch_size": 16}},
                         "t2": {"model": str(other), "finetune": {"epochs": 2, "lr": 3e-3, "batch_size": 16,
                                                                  "seed": 5}}},
            "objectives": [{"name": "ce", "weight": 0.5},
                           {"name": "hinton_kd", "weight": 0.25, "temperature": 2.0, "teacher": "t1"},
                           {"name": "hinton_kd", "weight": 0.25, "temperature": 3.0, "teacher": "t2"}],
            "teacher_cache": {"folder": str(tmp_path / "cache")}}
    del tree["teacher"]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(tree))
    from kdforge.cli import main

    assert main(["distill", str(path)]) == 0
    run = Path(job_tree["output_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["other_roles"]) == {"t2"}
    assert (run / "teachers/t1/model").is_dir() and not (run / "teacher").exists()
    assert (run / "teachers/t2/finetune.json").is_file()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # one cache per teacher (and temperature)


def test_the_api_takes_named_teachers(tmp_path):
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    loader = DataLoader(data, batch_size=64)
    mlp = lambda h: torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Linear(h, 10))  # noqa: E731
    torch.manual_seed(0)
    teachers = {"a": mlp(64), "b": mlp(32)}
    for role, teacher in teachers.items():
        kdforge.Distiller(None, teacher, objectives=["ce"], output_dir=tmp_path / role).fit(
            loader, epochs=5, lr=3e-3, device="cpu")
    distiller = kdforge.Distiller(teachers, mlp(16), objectives=[
        "ce", {"name": "hinton_kd", "teacher": "a", "weight": 0.5},
        {"name": "hinton_kd", "teacher": "b", "weight": 0.5}], output_dir=tmp_path / "s")
    distiller.fit(loader, loader, epochs=8, lr=3e-3, device="cpu")
    assert distiller.module.loss.roles == [None, "a", "b"]
    assert distiller.evaluate(loader)["accuracy"] > 0.8
    with pytest.raises(KDForgeError, match="say which"):
        kdforge.Distiller(teachers, mlp(8), objectives=["hinton_kd"])
    with pytest.raises(KDForgeError, match="dict"):
        kdforge.Distiller(list(teachers.values()), mlp(8))


def test_a_loop_of_runs_writes_each_run_into_its_own_log(tmp_path, job_tree):
    logging.getLogger("kdforge").setLevel(logging.INFO)
    for name in ("first", "second"):
        tree = {**job_tree, "teacher": {"model": job_tree["teacher"]["model"]}, "output_dir": str(tmp_path / name)}
        tree["train"] = {**job_tree["train"], "epochs": 1}
        jobs.run_distill(validate_config(tree))
    first = (tmp_path / "first/train.log").read_text()
    assert str(tmp_path / "first") in first and str(tmp_path / "second") not in first
    assert not any(getattr(h, "baseFilename", "").endswith("train.log") for h in logging.getLogger("kdforge").handlers)


def test_hinton_kd_reduction_mean_is_kldivloss_default():
    """TAKD's hyper-parameters were tuned with nn.KLDivLoss() (mean over N x C elements) times T^2."""
    from kdforge.objectives.base import build_objective

    torch.manual_seed(1)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    term = build_objective(ObjectiveConfig(name="hinton_kd", temperature=3.0, reduction="mean"))
    reference = torch.nn.KLDivLoss()(torch.log_softmax(s / 3, -1), torch.softmax(t / 3, -1)) * 9
    assert term(Outputs(s), Outputs(t), {}, Progress()).item() == pytest.approx(reference.item(), rel=1e-6)
    batchmean = build_objective(ObjectiveConfig(name="hinton_kd", temperature=3.0))
    assert batchmean(Outputs(s), Outputs(t), {}, Progress()).item() == pytest.approx(7 * reference.item(), rel=1e-6)


def test_kdforge_list_names_the_strategies(capsys):
    from kdforge.cli import main

    assert main(["list"]) == 0
    lines = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in capsys.readouterr().out.splitlines()}
    # (other tests may register more strategies and data sources in this process, e.g. the design doc's examples)
    assert {"assistant_ensemble", "ces_kd", "multi_teacher", "offline"} <= set(lines["strategies"])
    assert {"corpus", "fsbbt", "ptp", "task"} <= set(lines["stage data"])


def test_camkd_on_text_teachers(tmp_path, job_tree, tiny_teacher_dir):
    """CA-MKD with two BERT teachers (the same checkpoint fine-tuned with two seeds): the feature site
    is the classifier's input (the pooled output), embedded without the final ReLU."""
    finetune = {"epochs": 1, "lr": 3e-3, "batch_size": 16}
    tree = {**job_tree, "teachers": {"t1": {"model": str(tiny_teacher_dir), "finetune": finetune},
                                     "t2": {"model": str(tiny_teacher_dir), "finetune": {**finetune, "seed": 3}}},
            "stages": [{"name": "distill", "objectives": [{"name": "ce"}],
                        "strategy": {"name": "multi_teacher", "relu": False}}]}
    del tree["teacher"]
    result = kdforge.distill(tree)
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["loss:camkd_kd"] > 0 for h in history)  # the confidence-weighted KD from both teachers
    assert history[0]["loss:camkd_feature"] == 0 < history[1]["loss:camkd_feature"]  # the pooled-output term
    saved = [load_file(str(result.run_dir / "teachers" / r / "model" / "model.safetensors")) for r in ("t1", "t2")]
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])  # two teachers: two seeds, two models
