"""Born-again networks (Furlanello et al., ICML 2018) as a recipe: same-architecture generations,
each taught by the one before, as assistant stages of one job."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from kdforge import jobs
from kdforge.config import TaskConfig, load_config, validate_config
from kdforge.engine.checkpoint import load as load_checkpoint
from kdforge.engine.trainer import seed_everything
from kdforge.errors import KDForgeError
from kdforge.models.loading import load_model
from kdforge.recipes.born_again import born_again_tree
from kdforge.recipes.catalog import check_stages
from kdforge.tasks.base import build_task

ROOT = Path(__file__).parents[1]
KD = [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0}]


def base_tree() -> dict:
    return {"task": {"name": "digits"}, "teacher": {"model": "vision:small_cnn"}, "objectives": KD}


def test_three_generations_chain_teacher_gen1_gen2_student():
    tree = base_tree()
    before = copy.deepcopy(tree)
    out = born_again_tree(tree, 3)
    assert tree == before  # a new tree; the input is untouched
    spec = {"model": "vision:small_cnn"}  # the teacher's architecture, fresh
    assert out["student"] == spec and out["assistants"] == {"gen1": spec, "gen2": spec}
    assert [(s["name"], s["learner"], s["teachers"]) for s in out["stages"]] == [
        ("gen1", "gen1", ["teacher"]), ("gen2", "gen2", ["gen1"]), ("student", "student", ["gen2"])]
    assert all(s["objectives"] == KD for s in out["stages"])
    out["stages"][0]["objectives"][0]["weight"] = 9.0
    assert out["stages"][1]["objectives"][0]["weight"] == 0.5  # each stage holds its own copy
    config = validate_config(born_again_tree(tree, 3))
    check_stages(config)
    assert [config.stage_teachers(s) for s in config.all_stages()] == [["teacher"], ["gen1"], ["gen2"]]


def test_the_caller_names_the_architecture_and_default_objectives_apply():
    text = {"task": {"name": "csv", "train_file": "train.csv"}, "teacher": {"model": "models/bert-base"}}
    with pytest.raises(KDForgeError, match="give the generations' architecture"):
        born_again_tree(text, 2)  # a Hugging Face teacher: its layer count is not in the tree
    out = born_again_tree(text, 2, student={"layers": [0, 1, 2, 3]})
    assert out["assistants"] == {"gen1": {"layers": [0, 1, 2, 3]}} and out["student"] == {"layers": [0, 1, 2, 3]}
    default = validate_config(text).objectives
    assert [validate_config(out).all_stages()[i].objectives for i in (0, 1)] == [default, default]
    single = born_again_tree(text, 1, student={"layers": [0, 1, 2, 3]})  # plain self-distillation
    assert "gen1" not in single["assistants"] and [s["teachers"] for s in single["stages"]] == [["teacher"]]


def test_bad_requests_fail_with_one_line():
    with pytest.raises(KDForgeError, match="generations must be a whole number >= 1"):
        born_again_tree(base_tree(), 0)
    with pytest.raises(KDForgeError, match="remove `stages`"):
        born_again_tree({**base_tree(), "stages": [{"name": "s", "objectives": KD}]}, 2)
    with pytest.raises(KDForgeError, match="already has assistants gen1"):
        born_again_tree({**base_tree(), "assistants": {"gen1": {"model": "vision:resnet8"}}}, 2)


def test_the_example_config_is_the_functions_output_and_validates():
    path = ROOT / "configs/recipes/born-again-cifar.yaml"
    full = yaml.safe_load(path.read_text())
    base = {k: v for k, v in full.items() if k not in ("student", "assistants", "stages")}
    assert born_again_tree(base, 2) == full
    config = load_config(path)
    check_stages(config)
    assert config.teacher.model == config.student.model == config.assistants["gen1"].model == "vision:resnet8"
    assert [(s.learner, s.teachers) for s in config.all_stages()] == [("gen1", ["teacher"]), ("student", ["gen1"])]



@pytest.mark.slow
def test_two_generations_on_digits_end_to_end(tmp_path, one_thread):
    tree = {**base_tree(),
            "teacher": {"model": "vision:small_cnn", "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 64}},
            "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3, "seed": 0, "device": "cpu"},
            "eval": {"latency_batch_sizes": [1], "latency_repeats": 1, "latency_warmup": 0,
                     "sharpness": True, "sharpness_samples": 64, "sharpness_iterations": 5},
            "teacher_cache": {"folder": str(tmp_path / "cache")},
            "output_dir": str(tmp_path / "ban")}
    config = validate_config(born_again_tree(tree, 2))
    result = jobs.run_distill(config)
    run = tmp_path / "ban"
    metrics = json.loads((run / "metrics.json").read_text())
    assert result.student.metrics["accuracy"] > 0.3  # learnt something in one short epoch (10 classes)
    assert set(metrics["other_roles"]) == {"gen1"}  # generation 1 is scored beside teacher and student
    bane = metrics["ensembles"]["BANE"]  # and the generations' ensemble (gen1 + student), as the paper scores it
    assert bane["params"] == metrics["other_roles"]["gen1"]["params"] + metrics["student"]["params"]
    assert 0 < bane["metrics"]["accuracy"] <= 1 and "BANE" in (run / "report.md").read_text()
    stages = {h["stage"] for h in metrics["history"]}
    assert stages == {"gen1", "student"}
    assert json.loads((run / "stages/gen1.json").read_text())["history"]
    # every model has its sharpness in the report (the top Hessian eigenvalue: positive near a minimum)
    for report in (metrics["teacher"], metrics["student"], metrics["other_roles"]["gen1"]):
        assert isinstance(report["sharpness"], float)
        assert 1 <= report["sharpness_iterations"] <= 5 and isinstance(report["sharpness_converged"], bool)
        assert report["sharpness_converged"] or report["sharpness_iterations"] == 5  # stops only when converged
    page = (run / "report.md").read_text()
    assert f"student: {metrics['student']['sharpness_iterations']} iterations" in page
    unsettled = [r for r in (metrics["teacher"], metrics["student"]) if not r["sharpness_converged"]]
    assert ("did not converge" in page) == bool(unsettled or not metrics["other_roles"]["gen1"]["sharpness_converged"])
    # generation 1 is exported beside the student, and `kdforge eval` scores it from there
    assert (run / "models/gen1/model.safetensors").is_file()
    again = json.loads((jobs.run_eval(run).run_dir / "metrics.json").read_text())
    assert again["other_roles"]["gen1"]["metrics"] == metrics["other_roles"]["gen1"]["metrics"]
    # each generation starts from its own fresh weights (seed + its position among the built roles), and
    # generation 1 was trained: its snapshot differs from the fresh net load_models built
    task = build_task(TaskConfig(name="digits"))
    seed_everything(config.train.seed)
    student_init = load_model("vision:small_cnn", task, "student.model").model.state_dict()
    seed_everything(config.train.seed + 1)
    fresh = load_model("vision:small_cnn", task, "student.model").model.state_dict()
    assert not all(torch.equal(student_init[k], fresh[k]) for k in fresh)
    trained = load_checkpoint(run / "stages/gen1.pt")["state"]
    assert trained.keys() == fresh.keys()
    changed = [k for k in fresh if fresh[k].is_floating_point() and not torch.equal(fresh[k], trained[k])]
    assert len(changed) >= len([k for k in fresh if k.endswith("weight")])
