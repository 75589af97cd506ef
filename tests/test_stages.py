"""Multi-stage recipes: PTP labels, head replacement, corpus stages, stage-wise resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge import jobs
from kdforge.config import CorpusConfig, validate_config
from kdforge.errors import KDForgeError
from kdforge.models.heads import head_size, replace_head
from kdforge.recipes.catalog import check_stages
from kdforge.recipes.ptp import ptp_labels
from kdforge.tasks.passages import corpus_texts
from tests.helpers import Killed, kill_at, tiny_bert


def test_ptp_labels_by_hand():
    # gold 0 for all; teacher max-prob / argmax:
    #   a: 0.9 correct, b: 0.6 correct, c: 0.8 wrong, d: 0.55 wrong, e: 0.7 correct
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.7, 0.3]])
    gold = np.zeros(5, dtype=int)
    labels, t1, t2 = ptp_labels(probs, gold)
    # t1 = median(0.9, 0.6, 0.7) = 0.7; t2 = median(0.8, 0.55) = 0.675
    assert t1 == pytest.approx(0.7) and t2 == pytest.approx(0.675)
    assert labels.tolist() == [0, 1, 2, 3, 0]
    labels, _, _ = ptp_labels(probs, gold, t1=0.95, t2=0.5)
    assert labels.tolist() == [1, 1, 2, 2, 1]


def test_replace_head_changes_outputs_and_config():
    model = tiny_bert(100)
    replace_head(model, 4, ["a", "b", "c", "d"])
    assert head_size(model) == 4 and model.config.num_labels == 4 and model.config.id2label[3] == "d"
    out = model(input_ids=torch.randint(5, 100, (2, 5))).logits
    assert out.shape == (2, 4)
    net = torch.nn.Sequential()
    with pytest.raises(KDForgeError, match="classification head"):
        head_size(net)


def test_corpus_texts_dedupes_samples_and_reads_files(tmp_path):
    (tmp_path / "a.txt").write_text("one line\n\nsecond line\none line\n")
    assert corpus_texts(CorpusConfig(files=[str(tmp_path / "a.txt")])) == ["one line", "second line"]
    assert len(corpus_texts(CorpusConfig(files=[str(tmp_path / "a.txt")], limit=1))) == 1
    with pytest.raises(KDForgeError, match="corpus.files"):
        corpus_texts(CorpusConfig(files=[str(tmp_path / "missing.txt")]))


def test_stage_config_errors(job_tree):
    check = lambda tree: check_stages(validate_config(tree))  # noqa: E731
    tree = dict(job_tree, stages=[{"name": "a", "data": "ptp", "objectives": [{"name": "ce"}]}])
    with pytest.raises(KDForgeError, match="last stage must learn the task"):
        check(tree)
    tree = dict(job_tree, stages=[{"name": "a", "objectives": [{"name": "ce"}], "train": {"epochz": 1}}])
    with pytest.raises(KDForgeError, match="stages.0.train.epochz: this config key does not exist"):
        validate_config(tree)
    tree = dict(job_tree, stages=[{"name": "a", "data": "corpus", "objectives": [{"name": "ce"}]},
                                  {"name": "b", "objectives": [{"name": "ce"}]}])
    with pytest.raises(KDForgeError, match="corpus"):
        check(tree)
    tree["stages"][1]["augment"] = {"copies": 1}
    tree["stages"][0] = {**tree["stages"][0], "corpus": {"files": ["x.txt"]}, "augment": {"copies": 1}}
    with pytest.raises(KDForgeError, match=r"stages\.0\.augment: .*`data: corpus` does not give the task's own"):
        check(tree)


@pytest.mark.parametrize("stage, message", [
    ({"data": "ptp", "ptp": {"t3": 0.5}}, r"^data source 'ptp' \(stages\.0\.ptp\): `t3`: this config key does not "
                                          r"exist; fix it"),
    ({"data": "ptp", "ptp": {"t1": 2}}, r"^data source 'ptp' \(stages\.0\.ptp\): `t1`: Input should be less"),
    ({"data": "ptp", "ptp": {"t1": "inf"}}, r"`stages\.0\.ptp\.t1` is inf"),
    ({"data": "corpus", "corpus": {"files": []}}, r"\(stages\.0\.corpus\): give corpus\.glue"),
    ({"data": "task", "ptp": {"t1": 0.5}}, r"^config: `stages\.0\.ptp`: this config key does not exist \(beside "
                                          r"the stage's keys only its data source's parameters.*`ptp:` goes with "
                                          r"`data: ptp`"),
    ({"data": "ptp", "agument": {}}, r"`stages\.0\.agument`: this config key does not exist"),
    ({"data": "nope"}, r"unknown data source 'nope' \(config key `stages\.0\.data`\); known: .*corpus, fsbbt, ptp"),
])
def test_a_data_source_validates_its_own_parameters(job_tree, stage, message):
    """`data: NAME` with its parameters under `NAME:`; each source validates them: one line naming the key."""
    tree = dict(job_tree, stages=[{"name": "a", "objectives": [{"name": "ce"}], **stage},
                                  {"name": "b", "objectives": [{"name": "ce"}]}])
    with pytest.raises(KDForgeError, match=message) as err:
        check_stages(validate_config(tree))
    assert "\n" not in str(err.value)


def test_a_data_source_builds_stage_data_that_names_no_source(job_tree, tmp_path):
    """The sources build one StageData each: datasets, collator, what the batches carry."""
    from kdforge.models.loading import load_model
    from kdforge.recipes.catalog import data_source_for
    from kdforge.tasks.base import build_task

    (tmp_path / "c.txt").write_text("one passage\nanother passage\n")
    tree = dict(job_tree, teacher={"model": job_tree["teacher"]["model"]}, stages=[
        {"name": "c", "data": "corpus", "corpus": {"files": [str(tmp_path / "c.txt")], "max_length": 8},
         "objectives": [{"name": "ce"}]},
        {"name": "p", "data": "ptp", "ptp": {"t1": 0.5}, "objectives": [{"name": "ce"}]},
        {"name": "t", "objectives": [{"name": "ce"}]}])
    config = validate_config(tree)
    check_stages(config)
    task = build_task(config.task)
    teacher = load_model(config.teacher.model, task)
    corpus, ptp, plain = (data_source_for(stage, i).build(stage, task, teacher, config, "cpu")
                          for i, stage in enumerate(config.stages))
    assert corpus.carries == frozenset() and corpus.selection is None and corpus.num_labels is None
    assert [e["text_a"] for e in corpus.train] == ["one passage", "another passage"]
    assert corpus.collator(teacher.tokenizer, train=True)(list(corpus.train))["input_ids"].shape[1] <= 8
    assert ptp.carries == {"labels"} and ptp.num_labels == 4 and ptp.info["thresholds"][0] == 0.5
    assert {e["label"] for e in ptp.train} <= {0, 1, 2, 3} and ptp.main_metric == "accuracy"
    assert plain.carries == {"labels", "gold_labels"} and plain.num_labels == 2 and plain.scorer is task
    assert plain.fingerprint == task.fingerprint() and ptp.fingerprint.startswith(task.fingerprint() + "-ptp-0.5")
    assert data_source_for(config.stages[0], 0).texts() == ["one passage", "another passage"]



def three_stage_tree(job_tree, tmp_path, name):
    tree = json.loads(json.dumps(job_tree))
    (tmp_path / "corpus.txt").write_text("\n".join(f"the film was {w} and long" for w in
                                                   ["good", "bad", "great", "dull", "fine", "poor"] * 4))
    tree["teacher"] = {"model": job_tree["teacher"]["model"]}
    tree["stages"] = [
        {"name": "general", "data": "corpus", "corpus": {"files": [str(tmp_path / "corpus.txt")], "max_length": 16},
         "objectives": [{"name": "tinybert_hidden"}], "train": {"epochs": 1}},
        {"name": "ptp", "data": "ptp", "objectives": [{"name": "ce"}], "train": {"epochs": 2}},
        {"name": "kd", "head": "reinit", "objectives": [{"name": "ce", "weight": 0.5},
                                                        {"name": "hinton_kd", "weight": 0.5}]},
    ]
    tree["output_dir"] = str(tmp_path / name)
    return validate_config(tree)


def test_three_stage_recipe_runs_and_resumes_stage_by_stage(tmp_path, job_tree):
    reference = jobs.run_distill(three_stage_tree(job_tree, tmp_path, "ref"))
    metrics = json.loads((tmp_path / "ref/metrics.json").read_text())
    stages = [h["stage"] for h in metrics["history"]]
    assert stages == ["general", "ptp", "ptp", "kd", "kd"]
    assert "accuracy" not in metrics["history"][0]  # the corpus stage is not evaluated
    assert reference.student.metrics["accuracy"] > 0.5

    with pytest.raises(Killed):
        jobs.run_distill(three_stage_tree(job_tree, tmp_path, "run"), callbacks=[kill_at(3, stage="kd")])
    done = sorted(p.name for p in (tmp_path / "run/stages").iterdir())
    assert done == ["general.json", "general.pt", "ptp.json", "ptp.pt"]
    resumed = jobs.run_distill(three_stage_tree(job_tree, tmp_path, "run"), resume=True)
    assert resumed.student.metrics == reference.student.metrics
    assert Path(tmp_path / "run/student/config.json").is_file()


def test_pea_kd_recipe_exports_unrolled_and_compact_forms_that_agree(tmp_path, job_tree):
    """SPS student + PTP stage + PKD-style distillation; both exports predict identically."""
    from transformers import AutoModelForSequenceClassification

    from kdforge.engine.predict import predict
    from kdforge.models.adapter import ModelAdapter
    from kdforge.models.loading import load_model
    from kdforge.tasks.base import build_task

    tree = json.loads(json.dumps(job_tree))
    tree.update(teacher={"model": job_tree["teacher"]["model"]}, student={"layers": [0, 3], "sps": "swap"},
                stages=[{"name": "ptp", "data": "ptp", "objectives": [{"name": "ce"}], "train": {"epochs": 1}},
                        {"name": "distill", "head": "reinit",
                         "objectives": [{"name": "ce", "weight": 0.3},
                                        {"name": "hinton_kd", "weight": 0.7, "temperature": 10.0},
                                        {"name": "pkd", "weight": 100.0}]}],
                teacher_cache={"hidden_states": [1, 2, 3], "folder": str(tmp_path / "cache")})
    config = validate_config(tree)
    result = jobs.run_distill(config)
    run = Path(tree["output_dir"])
    task = build_task(config.task)
    dev = task.split("dev")
    unrolled = AutoModelForSequenceClassification.from_pretrained(run / "student").eval()
    compact = load_model(str(run / "student-compact"), task, "student")
    assert unrolled.config.num_hidden_layers == 4  # 2 physical layers run twice
    assert compact.model.config.num_hidden_layers == 4
    a, _ = predict(ModelAdapter(unrolled), dev, task.collator(compact.tokenizer), 16)
    b, labels = predict(ModelAdapter(compact.model), dev, task.collator(compact.tokenizer), 16)
    assert np.allclose(a, b, atol=1e-5)
    assert (a.argmax(-1) == labels).mean() == pytest.approx(result.student.metrics["accuracy"])
    # the report counts the shared parameters once: fewer than the unrolled model's
    from kdforge.evaluation.size import count_parameters

    assert result.student.params == count_parameters(compact.model) < count_parameters(unrolled)
