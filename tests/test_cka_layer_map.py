"""Hint layers chosen by CKA from the stage's data: ``tinybert_hidden`` with ``layer_map: cka`` maps student
layer j to the j-th teacher layer that kdforge.objectives.hint_points picks, and a stage gives such a term
its first training rows (in the data's order) before it is set up."""

from __future__ import annotations

import pytest
import torch

from kdforge.config import ObjectiveConfig, validate_config
from kdforge.errors import KDForgeError
from kdforge.objectives.base import Objective, build_objective
from tests.helpers import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seed: int = 0, count: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 90, (8, 12), generator=generator),
             "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(count)]


def test_cka_layer_map_uses_the_hint_points_of_the_teacher():
    from kdforge.objectives.hint_points import hint_points_for

    teacher, student = tiny_bert(100, layers=6).eval(), tiny_bert(100, layers=2, seed=1)
    term = build_objective(ObjectiveConfig(name="tinybert_hidden", layer_map="cka", cka_rows=24))
    assert term.calibration_rows == 24
    assert build_objective(ObjectiveConfig(name="tinybert_hidden")).calibration_rows == 0
    data = batches()
    term.calibrate(student, teacher, data)
    points = hint_points_for(teacher, data, 2)
    assert term.cka_points == points and len(points) == 2 and all(1 <= p <= 6 for p in points)
    term.setup(student, teacher)
    assert term.layer_map == [(0, 0), (1, points[0]), (2, points[1])]


def test_cka_layer_map_refuses_a_strategy_that_gives_no_rows_and_a_shallower_teacher():
    term = build_objective(ObjectiveConfig(name="tinybert_hidden", layer_map="cka"))
    with pytest.raises(KDForgeError, match="give an explicit layer_map") as err:
        term.setup(tiny_bert(100, layers=2), tiny_bert(100, layers=4))
    assert "\n" not in str(err.value)
    with pytest.raises(KDForgeError, match="the teacher needs at least as many layers"):
        term.calibrate(tiny_bert(100, layers=4), tiny_bert(100, layers=2), batches())
    with pytest.raises(KDForgeError, match="layer_map"):
        build_objective(ObjectiveConfig(name="tinybert_hidden", layer_map=[]))


class Records(Objective):
    """A term that keeps the rows it was calibrated on."""

    calibration_rows = 5
    uses_teacher = True

    def calibrate(self, student, teacher, batches):
        self.seen = (teacher, batches)

    def forward(self, student, teacher, batch, progress):
        return student.logits.sum() * 0


def test_a_stage_calibrates_its_terms_on_its_first_training_rows(job_tree):
    from kdforge.models.loading import load_model
    from kdforge.objectives.composite import WeightedLoss
    from kdforge.recipes.base import StageContext
    from kdforge.recipes.catalog import data_source_for
    from kdforge.recipes.offline import stage_parts
    from kdforge.tasks.base import build_task

    config = validate_config({**job_tree, "teacher": {"model": job_tree["teacher"]["model"]},
                              "student": {"layers": [0]}, "eval": {"batch_size": 2}})
    stage = config.all_stages()[0]
    task = build_task(config.task)
    teacher = load_model(config.teacher.model, task)
    data = data_source_for(stage, 0).build(stage, task, teacher, config, "cpu")
    ctx = StageContext(config, stage, 0, data, "student", teacher, {"teacher": teacher}, data.train,
                       data.collator(teacher.tokenizer, train=True), "cpu", task=task)
    term = Records()
    stage_parts(ctx, WeightedLoss.from_config([(term, 1.0, None)], ["teacher"]))
    model, seen = term.seen
    assert model is teacher.model and [len(b["input_ids"]) for b in seen] == [2, 2, 1]  # eval.batch_size 2
    expected = data.collator(teacher.tokenizer, train=False)([data.train[i] for i in range(5)])
    assert torch.equal(torch.cat([b["labels"] for b in seen]), expected["labels"])
