"""The similarity information of a model's responses (evaluation/similarity.py) against values derived by
hand, and its place in a model's report."""

import math

import numpy as np
import pytest

from kdforge.evaluation.similarity import non_target_distributions, similarity_information

LN = math.log


def h2(p):  # entropy of (p, 1 - p) in bits: normalised by log(C - 1) = log 2
    return -(p * LN(p) + (1 - p) * LN(1 - p)) / LN(2)


# class 0: q over classes (1, 2) = (0.75, 0.25) twice; the second predicts class 1 (ln 3 > 0)
# class 1: q over (0, 2) = (0.1, 0.9) twice; the second predicts class 2 (ln 9 > 1)
# class 2: q over (0, 1) = (0.8, 0.2) twice; both right
LOGITS = [[4.0, LN(3), 0.0], [0.0, LN(3), 0.0], [0.0, 4.0, LN(9)], [0.0, 1.0, LN(9)],
          [LN(4), 0.0, 5.0], [LN(4), 0.0, 5.0]]
LABELS = [0, 0, 1, 1, 2, 2]


def test_non_target_distributions_by_hand():
    q = non_target_distributions(np.array(LOGITS), np.array(LABELS))
    expected = [[0.75, 0.25], [0.75, 0.25], [0.1, 0.9], [0.1, 0.9], [0.8, 0.2], [0.8, 0.2]]
    assert np.allclose(q, expected)


def test_similarity_information_by_hand():
    found = similarity_information(LOGITS, LABELS)
    assert found["non_target_entropy"] == pytest.approx((h2(0.75) + h2(0.1) + h2(0.8)) / 3)
    # soft M over the class pairs (0,1) (0,2) (1,0) (1,2) (2,0) (2,1) = (.75, .25, .1, .9, .8, .2): ranks 4 3 1 6 5 2
    # confusion rates K = (.5, 0, 0, .5, 0, 0): ranks 5.5 2.5 2.5 5.5 2.5 2.5 (ties averaged)
    # Pearson of the ranks = 9 / sqrt(17.5 * 12)
    assert found["confusion_rank_correlation"] == pytest.approx(9 / math.sqrt(17.5 * 12))
    p = np.exp(np.array(LOGITS)) / np.exp(np.array(LOGITS)).sum(1, keepdims=True)
    assert found["non_target_mass"] == pytest.approx(float(np.mean(1 - p[np.arange(6), LABELS])))


def test_two_classes_have_no_similarity_to_measure_and_extreme_confidence_stays_finite():
    binary = similarity_information([[2.0, 0.0], [0.0, 1.0]], [0, 1])
    assert binary["non_target_entropy"] is None and binary["confusion_rank_correlation"] is None
    assert binary["non_target_mass"] == pytest.approx((1 / (1 + math.e**2) + 1 / (1 + math.e)) / 2)
    sure = similarity_information([[1000.0, 0.0, -LN(3)], [0.0, 1000.0, 0.0]], [0, 1])
    # q = (0.75, 0.25) and (0.5, 0.5) although p(target) is 1 in float64; no errors: no confusion structure
    assert sure["non_target_entropy"] == pytest.approx((h2(0.75) + 1.0) / 2)
    assert sure["confusion_rank_correlation"] is None and sure["non_target_mass"] == pytest.approx(0.0)


def test_uniform_wrong_classes_carry_no_similarity_information():
    found = similarity_information([[3.0, 0.0, 0.0, 0.0], [1.0, 5.0, 1.0, 1.0]], [0, 1])
    assert found["non_target_entropy"] == pytest.approx(1.0)


def test_a_model_report_keeps_its_similarity_through_json():
    import json

    from kdforge.evaluation.model_report import ModelReport
    from kdforge.study.summary import values

    report = ModelReport("teacher", {"accuracy": 0.9}, "accuracy", 0.05, 10, 1.0, {},
                         similarity=similarity_information(LOGITS, LABELS))
    saved = json.loads(json.dumps(report.to_dict()))
    assert ModelReport.from_dict(saved) == report
    flat = values(saved)  # what a study keeps of it
    assert flat["non_target_entropy"] == pytest.approx(report.similarity["non_target_entropy"])
    assert flat["confusion_rank_correlation"] == pytest.approx(9 / math.sqrt(17.5 * 12))
    older = {k: v for k, v in saved.items() if k != "similarity"}  # a metrics.json written before the measure
    assert "non_target_entropy" not in values(older) and ModelReport.from_dict(older).similarity is None


@pytest.mark.usefixtures("one_thread")
def test_a_scored_classifier_reports_its_similarity(job_tree):
    from kdforge.config import validate_config
    from kdforge.engine.predict import predict
    from kdforge.evaluation.evaluate import pytorch_form, score_form
    from kdforge.models.loading import load_model
    from kdforge.tasks.base import build_task

    config = validate_config(job_tree)
    task = build_task(config.task)
    loaded = load_model(config.teacher.model, task)
    form = pytorch_form("teacher", loaded, task, config.eval)
    data = task.split(task.eval_split)
    report = score_form(form, task, data, config.eval)
    logits, labels = predict(form.adapter, data, task.collator(form.tokenizer, train=False), 16, "cpu", "again")
    assert report.similarity == pytest.approx(similarity_information(logits, labels))
    assert report.similarity["non_target_entropy"] is None  # two classes
