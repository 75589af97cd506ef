"""The roles' owner (kdforge.roles): what each role can give, and a fine-tuned teacher found again by
its fingerprint instead of being trained twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdforge
from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.roles import teachers
from kdforge.roles.base import BLACK_BOX, MODEL, capabilities
from kdforge.roles.teachers import find_or_finetune_teacher, teacher_fingerprint
from kdforge.run_folder import RunFolder, TeacherFolder
from kdforge.tasks.base import build_task


def uniform(items):
    return np.full((len(items), 2), 0.5)


def black_box_tree(job_tree, tiny_teacher_dir, objectives) -> dict:
    return {**job_tree, "teacher": {"black_box": {"callable": "uniform", "cache_dir": str(job_tree["output_dir"])
                                                  + "-answers"}},
            "teachers": {"t2": {"model": str(tiny_teacher_dir)}}, "student": {"model": str(tiny_teacher_dir)},
            "objectives": objectives}


def test_a_black_box_gives_logits_only_and_a_model_everything(job_tree, tiny_teacher_dir):
    config = validate_config(black_box_tree(job_tree, tiny_teacher_dir, [{"name": "hinton_kd", "teacher": "t2"}]))
    box = capabilities(config, "teacher")
    assert box == BLACK_BOX and box.outputs == {"logits"} and not box.weights and box.queried
    assert box.gives({"logits"}) and not box.gives({"hidden_states"}) and not box.gives({"attentions"})
    for role in ("t2", "student"):
        assert capabilities(config, role) == MODEL
        assert MODEL.gives({"logits", "hidden_states", "attentions", "features"}) and MODEL.weights


@pytest.mark.parametrize("objectives", [
    [{"name": "tinybert_hidden", "teacher": "teacher"}],
    [{"name": "hinton_kd", "teacher": "t2"}, {"name": "pkd", "teacher": "teacher"}],
])
def test_an_objective_that_needs_hidden_states_of_a_black_box_is_refused_before_training(
        job_tree, tiny_teacher_dir, monkeypatch, objectives):
    trainings = []
    monkeypatch.setattr(teachers, "train_model", lambda *a, **k: trainings.append(a))
    with pytest.raises(KDForgeError) as refused:
        kdforge.distill(black_box_tree(job_tree, tiny_teacher_dir, objectives), black_boxes={"uniform": uniform})
    line = str(refused.value)
    assert "\n" not in line and "reads the hidden states, attention maps or module outputs of teacher 'teacher'" in line
    assert not trainings and not RunFolder(job_tree["output_dir"]).root.exists()  # nothing trained or written


@pytest.fixture
def counted_trainings(monkeypatch) -> list:
    """Every fine-tuning the roles' owner starts (the real one runs)."""
    calls = []
    real = teachers.train_model

    def counting(*args, **kwargs):
        calls.append(args[6])  # the folder it trains in
        return real(*args, **kwargs)

    monkeypatch.setattr(teachers, "train_model", counting)
    return calls


def quick_tree(job_tree) -> dict:
    return {**job_tree, "task": {**job_tree["task"], "train_limit": 48},
            "teacher": {**job_tree["teacher"], "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 16}},
            "train": {**job_tree["train"], "trackers": []}}


def test_a_finetuned_teacher_is_reused_by_fingerprint_and_not_trained_twice(job_tree, counted_trainings):
    config = validate_config(quick_tree(job_tree))
    task = build_task(config.task)
    first = find_or_finetune_teacher(config, task)
    folder = RunFolder.of(config).teacher("teacher")
    assert counted_trainings == [folder.root] and folder.model.is_dir()
    again = find_or_finetune_teacher(config, task)
    assert len(counted_trainings) == 1  # found by its fingerprint
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # other fine-tuning settings are another teacher: trained again
    other = validate_config({**quick_tree(job_tree), "teacher": {**quick_tree(job_tree)["teacher"],
                                                                 "finetune": {"epochs": 1, "lr": 1e-3}}})
    assert teacher_fingerprint(other, task) != teacher_fingerprint(config, task)
    find_or_finetune_teacher(other, task)
    assert len(counted_trainings) == 2


def test_runs_that_share_a_teacher_folder_train_it_once(tmp_path, job_tree, counted_trainings):
    """What a study does: many runs (other output_dir, other student) share one teacher by fingerprint."""
    shared = TeacherFolder(tmp_path / "teachers" / "abc")
    runs = [validate_config({**quick_tree(job_tree), "output_dir": str(tmp_path / f"run{i}"),
                             "student": {"layers": layers}}) for i, layers in enumerate([[0, 3], [0]])]
    task = build_task(runs[0].task)
    for config in runs:
        find_or_finetune_teacher(config, task, folder=shared.root)
    assert counted_trainings == [shared.root] and shared.record.is_file()
    assert not any((tmp_path / f"run{i}" / "teacher").exists() for i in range(2))


def test_another_output_folder_copies_an_identical_teacher_from_the_store(tmp_path, job_tree, counted_trainings):
    """Issue 24: a new output folder does not fine-tune the teacher again when an identical one exists."""
    runs = [validate_config({**quick_tree(job_tree), "output_dir": str(tmp_path / f"run{i}"),
                             "student": {"layers": layers}}) for i, layers in enumerate([[0, 3], [0]])]
    task = build_task(runs[0].task)
    first = find_or_finetune_teacher(runs[0], task)
    store = teachers.teacher_store(runs[0], task, "teacher")
    assert counted_trainings == [RunFolder.of(runs[0]).teacher("teacher").root]
    assert store.record.is_file() and store.root.parent == teachers.cache_dir() / "teachers"
    second = find_or_finetune_teacher(runs[1], task)
    assert len(counted_trainings) == 1  # copied, not trained
    own = RunFolder.of(runs[1]).teacher("teacher")
    assert own.record.read_text() == store.record.read_text()  # the run holds its own finished copy
    assert sorted(p.name for p in own.model.iterdir()) == sorted(p.name for p in store.model.iterdir())
    assert not list(own.root.glob(".model-*"))  # no staging folder left behind
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # the copy in the run folder is found again by the run itself (resume, eval) without the store
    assert teachers.is_finetuned(runs[1], task, "teacher", own)


def test_the_store_keys_the_settings_that_shape_the_teacher_and_can_be_turned_off(tmp_path, job_tree,
                                                                                   counted_trainings):
    base = quick_tree(job_tree)
    first = validate_config({**base, "output_dir": str(tmp_path / "a")})
    task = build_task(first.task)
    find_or_finetune_teacher(first, task)
    # the student's own training settings do not shape the teacher: found in the store
    student_side = validate_config({**base, "output_dir": str(tmp_path / "b"),
                                    "train": {**base["train"], "epochs": 5, "lr": 1e-4, "seed": 0}})
    assert teachers.teacher_store_key(student_side, task, "teacher") == teachers.teacher_store_key(first, task,
                                                                                                   "teacher")
    find_or_finetune_teacher(student_side, task)
    assert len(counted_trainings) == 1
    # the optimizer the fine-tuning inherits does: another teacher
    other_optimizer = validate_config({**base, "output_dir": str(tmp_path / "c"),
                                       "train": {**base["train"], "weight_decay": 0.1}})
    find_or_finetune_teacher(other_optimizer, task)
    assert len(counted_trainings) == 2
    # store: false fine-tunes again, and the switch is not part of the teacher's fingerprint
    opted_out = validate_config({**base, "output_dir": str(tmp_path / "d"),
                                 "teacher": {**base["teacher"], "finetune": {**base["teacher"]["finetune"],
                                                                             "store": False}}})
    assert teacher_fingerprint(opted_out, task) == teacher_fingerprint(first, task)
    find_or_finetune_teacher(opted_out, task)
    assert len(counted_trainings) == 3


def test_an_unfinished_teacher_in_the_store_is_not_used(tmp_path, job_tree, counted_trainings):
    config = validate_config({**quick_tree(job_tree), "output_dir": str(tmp_path / "a")})
    task = build_task(config.task)
    store = teachers.teacher_store(config, task, "teacher")
    store.model.mkdir(parents=True)  # a copy killed before its finetune.json
    (store.model / "config.json").write_text("{}")
    find_or_finetune_teacher(config, task)
    assert len(counted_trainings) == 1 and store.record.is_file()
    assert (store.model / "model.safetensors").is_file()  # replaced by the finished teacher
