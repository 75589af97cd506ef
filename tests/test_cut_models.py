"""Models cut to some of their layers: a shallower teacher from the same pre-trained model
(``teacher.layers``, fine-tuned, fingerprinted, shared by a study) and a student made of a given model's
layers (``student.model`` + ``student.layers``), the same for teachers of every depth."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from kdforge.config import StudentConfig, TeacherConfig, validate_config
from kdforge.errors import KDForgeError

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_weight(model, i: int) -> torch.Tensor:
    return model.bert.encoder.layer[i].attention.self.query.weight


def test_a_student_of_a_given_models_layers(job_tree):
    from kdforge.models.loading import load_model
    from kdforge.models.student import build_student
    from kdforge.tasks.base import build_task

    config = validate_config({**job_tree, "student": {"model": job_tree["teacher"]["model"], "layers": [2, 3]}})
    task = build_task(config.task)
    base = load_model(job_tree["teacher"]["model"], task)
    student = build_student(config.student, base, task).model
    assert student.config.num_hidden_layers == 2
    assert torch.equal(layer_weight(student, 0), layer_weight(base.model, 2))
    assert torch.equal(layer_weight(student, 1), layer_weight(base.model, 3))
    with pytest.raises(KDForgeError, match=r"student.layers \[4\] must be a non-empty list of layer indices 0..3"):
        build_student(StudentConfig(model=job_tree["teacher"]["model"], layers=[4]), base, task)


def test_a_teacher_cut_to_some_layers_needs_fine_tuning_and_a_transformer(job_tree):
    with pytest.raises(ValueError, match="add `finetune`"):
        TeacherConfig(model="x", layers=[0, 1])
    from kdforge.models.loading import LoadedModel
    from kdforge.models.student import keep_layers

    with pytest.raises(KDForgeError, match="teacher.layers cuts a Hugging Face transformer") as err:
        keep_layers(LoadedModel(torch.nn.Linear(2, 2), None, "vision:resnet8"), [0], "teacher.layers")
    assert "\n" not in str(err.value)


def test_the_fingerprint_of_an_uncut_teacher_is_unchanged_and_a_cut_one_has_its_own(job_tree):
    from kdforge.roles.teachers import teacher_fingerprint
    from kdforge.tasks.base import build_task

    config = validate_config(job_tree)
    task = build_task(config.task)
    teacher = config.teacher
    before = json.dumps({"model": teacher.model, "finetune": teacher.finetune.model_dump(exclude={"seed", "store"}),
                         "task": task.fingerprint(), "seed": config.train.seed}, sort_keys=True)
    assert teacher_fingerprint(config, task) == hashlib.sha256(before.encode()).hexdigest()[:16]  # as stored so far
    cut = validate_config({**job_tree, "teacher": {**job_tree["teacher"], "layers": [0, 1]}})
    other = validate_config({**job_tree, "teacher": {**job_tree["teacher"], "layers": [0, 2]}})
    assert len({teacher_fingerprint(c, task) for c in (config, cut, other)}) == 3


def test_a_cut_teacher_is_fine_tuned_cut_and_a_study_shares_it(job_tree, tmp_path):
    from kdforge.models.loading import load_model
    from kdforge.roles.teachers import find_or_finetune_teacher
    from kdforge.study.teachers import with_shared_teachers
    from kdforge.tasks.base import build_task

    tree = {**job_tree, "teacher": {**job_tree["teacher"], "layers": [0, 1],
                                    "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 32}}}
    config = validate_config(tree)
    task = build_task(config.task)
    base = load_model(job_tree["teacher"]["model"], task)
    folder = tmp_path / "teacher"
    teacher = find_or_finetune_teacher(config, task, folder=folder)
    assert teacher.model.config.num_hidden_layers == 2
    again = load_model(str(folder / "model"), task)
    assert again.model.config.num_hidden_layers == 2
    assert torch.equal(layer_weight(again.model, 1), layer_weight(teacher.model, 1))
    assert not torch.equal(layer_weight(again.model, 1), layer_weight(base.model, 1))  # fine-tuned
    shared = validate_config(with_shared_teachers(tree, {"teacher": folder / "model"}))
    assert shared.teacher.layers is None and shared.teacher.model == str(folder / "model")


def test_preflight_finds_layers_the_model_lacks(job_tree):
    from kdforge.preflight import check_models

    bad = validate_config({**job_tree, "teacher": {**job_tree["teacher"], "layers": [0, 4]}})
    with pytest.raises(KDForgeError, match=r"teacher.layers: 4 is not a layer of teacher.model, which has 4"):
        check_models(bad, "distill")
    deep = validate_config({**job_tree, "teacher": {**job_tree["teacher"], "layers": [0, 1]},
                            "student": {"layers": [0, 2]}})  # the student is built from the 2-layer teacher
    with pytest.raises(KDForgeError, match="student.layers: 2 is not a layer of the teacher, which has 2"):
        check_models(deep, "distill")
    own = validate_config({**job_tree, "student": {"model": job_tree["teacher"]["model"], "layers": [5]}})
    with pytest.raises(KDForgeError, match="student.layers: 5 is not a layer of student.model"):
        check_models(own, "distill")
    check_models(validate_config({**job_tree, "teacher": {**job_tree["teacher"], "layers": [0, 1]},
                                  "student": {"model": job_tree["teacher"]["model"], "layers": [3]}}), "distill")
